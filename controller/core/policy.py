"""Safety and policy around the optimizer: stale data, thermal, dwell, wake latency, ramps.

`decide` is the single entry point the daemon and the backtest call: it bounds what
policy forbids changing, asks the optimizer for the rest, and records why each miner
got its level. Pure and vectorised: arrays and time in, decision out, no loop per miner.

The rules, in the order they bind (the first one that decided a miner is its reason):

1. Stale or offline: counted at the miner's maximum power against the cap, never
   commanded (its real draw is unknown; that is the worst case for the grid).
2. Thermal: at or above ``critical_c`` the miner sleeps. Between ``derate_start_c``
   and ``critical_c`` its highest power target falls linearly from max to min power.
3. Never-curtail: pinned at its (thermally allowed) maximum.
4. Dwell: a miner that switched on stays on for ``min_run_s``; one that went to sleep
   stays asleep for ``min_sleep_s``. Thermal shutdowns are not held on.
5. Wake latency: the policy cannot see the future price, so a sleeping miner is woken
   for a price only once the price has been below its wake threshold for at least
   ``wake_latency_factor * wake_s`` seconds, or when the market's ``expected_dip_s``
   (a forecast) says the cheap spell lasts that long. A dip that has already lasted
   as long as the wake-up is, on a real price trace, more likely to last through it
   than a fresh one; a shorter one would mostly be spent ramping. The first decision
   after a start has no history and does not wait.
6. Hysteresis: a miner keeps its current level if that level would be the best choice
   at some price within ``hysteresis_usd_per_mwh`` of the current price, so price
   noise around a break-even does not flap targets or switch miners on and off.
7. Cap and grid: the optimizer fills the cap in descending marginal efficiency
   (higher ``priority`` first). The cap is a hard limit: when it binds, hysteresis
   holds are dropped; when the pinned minimum alone exceeds it, dwell and wake holds
   are dropped, then never-curtail miners are shed last, and if stale miners alone
   still exceed it the decision is marked ``infeasible`` with everything else asleep.
8. Ramp: planned site power moves at most ``ramp_kw_per_min`` per minute in either
   direction for economic reasons. Reductions demanded by the cap or a grid
   obligation are never slowed down, and a ramp-down never pushes above the cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from controller.core import optimizer as opt
from controller.core.optimizer import FloatArray, IntArray, Plan, PreparedFleet, solve
from controller.protocol.reasons import Reason

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class PolicyKnobs:
    """Operator-tunable rules (from the site config's [policy] table)."""

    min_run_s: float = 300.0  # a miner switched on stays on at least this long
    min_sleep_s: float = 300.0  # a miner put to sleep stays asleep at least this long
    hysteresis_usd_per_mwh: float = 5.0  # price band within which levels are kept
    wake_latency_factor: float = 1.0  # cheap spell needed before waking, x wake_s
    default_wake_s: float = 180.0  # wake time when MinerInputs.wake_s is not given
    ramp_kw_per_min: float = math.inf  # site ramp limit for economic moves
    derate_start_c: float = 80.0  # above this, the max power target falls linearly
    critical_c: float = 95.0  # at or above this, the miner sleeps
    aux_in_energy_cost: bool = True  # cooling energy is paid at the same price


@dataclass(frozen=True, slots=True)
class MarketInputs:
    """Prices and limits at decision time."""

    price_usd_per_mwh: float
    hashprice_usd_per_ph_day: float
    cap_w: float  # tightest of site cap, grid obligation and generation, incl. aux load
    aux_fraction: float = 0.0
    cap_is_grid: bool = False  # the binding limit comes from a grid obligation
    adder_usd_per_mwh: float = 0.0  # delivery charges and fees on top of the price
    expected_dip_s: float | None = None  # forecast: how long the current price holds


@dataclass(frozen=True, slots=True)
class MinerInputs:
    """What the controller knows of each miner now (arrays indexed like the fleet)."""

    stale: BoolArray  # no fresh telemetry, or announced offline: unknown actual draw
    never_curtail: BoolArray
    temp_c: FloatArray | None = None  # hottest sensor, deg C; NaN or None = unknown
    priority: npt.NDArray[np.integer] | None = None  # small int, higher = shed later
    wake_s: FloatArray | None = None  # time from wake to full hashrate, s (model data)
    offline: BoolArray | None = None  # announced offline (refines STALE to OFFLINE)
    force_sleep: BoolArray | None = None  # grid obligation: these sleep (emergency, frequency)


@dataclass(slots=True)
class PolicyState:
    """Memory across decisions: last planned level, switch times, cheap spells, site power."""

    level: IntArray
    switched_at: FloatArray = field(default_factory=lambda: np.empty(0))
    # Since when the price has been worth waking each miner for; NaN: it is not now;
    # -inf: no history yet (first decision after a start does not wait).
    cheap_since_s: FloatArray = field(default_factory=lambda: np.empty(0))
    site_power_w: float = math.nan  # last planned site power incl. aux
    decided_at_s: float = math.nan

    @classmethod
    def initial(cls, n: int, start_level: IntArray) -> PolicyState:
        # -inf: nothing has switched yet, so no dwell holds a miner at start.
        return cls(
            level=np.asarray(start_level, dtype=np.intp).copy(),
            switched_at=np.full(n, -np.inf),
            cheap_since_s=np.full(n, -np.inf),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """Final per-miner plan with reasons; `commandable` is False for miners not to be sent."""

    level: IntArray
    power_w: FloatArray
    reason: npt.NDArray[np.uint8]
    commandable: BoolArray
    site_power_w: float
    hashrate_ths: FloatArray | None = None
    cap_binding: bool = False  # the cap (or ramp-up limit) held the fleet below its optimum
    infeasible: bool = False  # even the unmovable miners exceed the cap
    multiplier_usd_per_mwh: float = 0.0  # shadow price of site power under the cap
    site_reason: Reason = Reason.PROFIT  # what bound the site as a whole

    def reason_counts(self) -> npt.NDArray[np.int64]:
        """Number of miners per Reason code (index = code), for metrics."""
        counts: npt.NDArray[np.int64] = np.bincount(self.reason, minlength=len(Reason))
        return counts


def thermal_max_level(
    fleet: PreparedFleet, temp_c: FloatArray, knobs: PolicyKnobs
) -> tuple[IntArray, BoolArray, BoolArray]:
    """Highest level each miner may run at its temperature.

    Returns (max_level, critical, derated): critical miners get 0; derated ones a
    max power falling linearly from the top target at ``derate_start_c`` to the
    lowest target at ``critical_c`` (never below the lowest target).
    """
    t = np.asarray(temp_c, dtype=np.float64)
    known = np.isfinite(t)
    critical = known & (t >= knobs.critical_c)
    derated = known & (t > knobs.derate_start_c) & ~critical
    hi = fleet.top.copy()
    rows = np.flatnonzero(derated)
    if rows.size and fleet.k > 1:
        span_c = max(knobs.critical_c - knobs.derate_start_c, 1e-9)
        frac = np.clip((t[rows] - knobs.derate_start_c) / span_c, 0.0, 1.0)
        p = fleet.power_w.T[:, rows]  # (k, m): level-major, like the prepared arrays
        top = fleet.top[rows]
        p_min, p_max = p[1], p[top, np.arange(rows.size)]
        allowed_w = p_max - frac * (p_max - p_min)
        levels = np.arange(1, fleet.k)[:, None]
        ok = (p[1:] <= allowed_w[None, :] + 1e-9) & (levels <= top[None, :])
        hi[rows] = np.maximum(ok.sum(axis=0), 1)
    hi[critical] = 0
    return hi, critical, derated & (hi < fleet.top)


def decide(
    fleet: PreparedFleet,
    market: MarketInputs,
    miners: MinerInputs,
    state: PolicyState,
    knobs: PolicyKnobs,
    *,
    now_s: float,
) -> Decision:
    """Plan every miner's level under policy; update `state` in place.

    Args:
        fleet: Prepared operating points.
        market: Prices and the cap at this moment.
        miners: Per-miner facts (stale, never-curtail, temperature, priority).
        state: Memory from the previous decision; updated in place.
        knobs: Policy rules.
        now_s: Decision time (any monotonic clock, seconds).

    Returns:
        The decision: level, power and a Reason per miner, and site-level flags.
    """
    n = fleet.n
    top = fleet.top
    prev = state.level
    offline = miners.offline if miners.offline is not None else np.zeros(n, dtype=bool)
    unknown = miners.stale | offline
    nc = miners.never_curtail & ~unknown
    movable = ~unknown & ~nc

    def position(price_usd_per_mwh: float) -> int:
        return opt.position_at_price(
            fleet,
            price_usd_per_mwh=price_usd_per_mwh,
            hashprice_usd_per_ph_day=market.hashprice_usd_per_ph_day,
            aux_fraction=market.aux_fraction,
            adder_usd_per_mwh=market.adder_usd_per_mwh,
            aux_in_cost=knobs.aux_in_energy_cost,
        )

    r_now = position(market.price_usd_per_mwh)

    # Hard bounds: thermal, never-curtail, unknown draw counted at maximum.
    if miners.temp_c is not None:
        hi, critical, derated = thermal_max_level(fleet, miners.temp_c, knobs)
    else:
        hi, critical, derated = top.copy(), np.zeros(n, bool), np.zeros(n, bool)
    # A grid obligation (emergency, under-frequency) outranks never-curtail and dwell.
    forced = np.zeros(n, bool) if miners.force_sleep is None else miners.force_sleep & ~unknown
    hi[forced] = 0
    lo = np.zeros(n, dtype=np.intp)
    lo[nc] = hi[nc]
    lo[unknown] = hi[unknown] = top[unknown]
    hard = opt.make_bounds(fleet, lo, hi)
    free = opt.levels_at(fleet, hard, r_now)

    # Dwell.
    running = prev > 0
    since = now_s - state.switched_at
    hold_on = movable & running & (since < knobs.min_run_s) & (hi >= 1)
    hold_off = movable & ~running & (since < knobs.min_sleep_s)

    # Wake latency: how long has waking this miner been worth it?
    worth = free > 0
    cheap_since = np.where(
        worth, np.where(np.isnan(state.cheap_since_s), now_s, state.cheap_since_s), np.nan
    )
    wake_s = miners.wake_s if miners.wake_s is not None else knobs.default_wake_s
    latency = np.broadcast_to(np.asarray(wake_s, dtype=np.float64), (n,)) * (
        knobs.wake_latency_factor
    )
    waited = (now_s - cheap_since) >= latency
    if market.expected_dip_s is not None:
        waited |= market.expected_dip_s >= latency
    block_wake = movable & ~running & ~hold_off & worth & ~waited

    lo_d, hi_d = lo.copy(), hi.copy()
    lo_d[hold_on] = np.maximum(lo_d[hold_on], 1)
    hi_d[hold_off | block_wake] = 0

    held = opt.make_bounds(fleet, lo_d, hi_d)
    econ_d = opt.levels_at(fleet, held, r_now)

    # Hysteresis: keep a level that is optimal somewhere within the price band.
    keep = np.zeros(n, dtype=bool)
    band = knobs.hysteresis_usd_per_mwh
    if band > 0:
        dearer = opt.levels_at(fleet, held, position(market.price_usd_per_mwh + band))
        cheaper = opt.levels_at(fleet, held, position(market.price_usd_per_mwh - band))
        keep = (
            movable
            & (prev != econ_d)
            & (prev >= dearer)
            & (prev <= cheaper)
            & (prev >= lo_d)
            & (prev <= hi_d)
        )

    # Ramp limit on economic moves; the cap is never relaxed by it.
    cap_eff, floor_w, floor_cut_by_cap = market.cap_w, 0.0, False
    if (
        math.isfinite(knobs.ramp_kw_per_min)
        and math.isfinite(state.site_power_w)
        and math.isfinite(state.decided_at_s)
    ):
        step_w = knobs.ramp_kw_per_min * 1e3 * max(now_s - state.decided_at_s, 0.0) / 60.0
        cap_eff = min(market.cap_w, state.site_power_w + step_w)
        floor_w = max(state.site_power_w - step_w, 0.0)
        floor_cut_by_cap = floor_w > market.cap_w  # the cap demands a faster cut
        floor_w = min(floor_w, market.cap_w)

    def run(bounds: opt.Bounds, prio: npt.NDArray[np.integer] | None = miners.priority) -> Plan:
        return solve(
            fleet,
            price_usd_per_mwh=market.price_usd_per_mwh,
            cap_w=cap_eff,
            floor_w=floor_w,
            priority=prio,
            hashprice_usd_per_ph_day=market.hashprice_usd_per_ph_day,
            aux_fraction=market.aux_fraction,
            adder_usd_per_mwh=market.adder_usd_per_mwh,
            aux_in_cost=knobs.aux_in_energy_cost,
            bounds=bounds,
        )

    def within_limits(level: IntArray) -> Plan | None:
        """The plan of these levels if the cap, ramp and floor all leave them be."""
        site_w = float(fleet.gather(fleet.power_w, level).sum()) * (1.0 + market.aux_fraction)
        if not floor_w <= site_w <= cap_eff:
            return None
        return opt.plan_at(fleet, level, aux_fraction=market.aux_fraction)

    def over_cap(p: Plan) -> bool:
        return p.infeasible and p.site_power_w > market.cap_w

    # Stages: 0 all holds, 1 no hysteresis (cap binds), 2 no dwell/wake (pins break
    # the cap), 3 never-curtail shed last. Each is tried only if the previous fails.
    stage = 0
    maybe = within_limits(np.where(keep, prev, econ_d)) if keep.any() else None
    if maybe is None:
        stage = 1
        maybe = within_limits(econ_d)
    plan = maybe if maybe is not None else run(held)
    if over_cap(plan):
        stage = 2
        plan = run(hard)
    if stage == 2 and over_cap(plan):
        stage = 3
        base = np.zeros(n, np.int64) if miners.priority is None else np.asarray(miners.priority)
        boosted = np.where(nc, int(base.max(initial=0)) + 1, base)
        lo_nc = lo.copy()
        lo_nc[nc] = 0
        plan = run(opt.make_bounds(fleet, lo_nc, hi), boosted)

    level = plan.level
    if cap_eff < market.cap_w and not plan.infeasible and not floor_cut_by_cap:
        cap_reason = Reason.RAMP
    else:
        cap_reason = Reason.GRID if market.cap_is_grid else Reason.CAP
    holds = stage <= 1
    conditions = [
        offline,
        unknown,
        critical,
        forced,
        nc & (stage < 3),
        holds & hold_on & (free == 0),
        holds & hold_off & (free > 0),
        holds & block_wake & (level == 0),
        (stage == 0) & keep & (level == prev),
        plan.reason == Reason.CAP,
        plan.reason == Reason.RAMP,
        derated & (level == hi),
    ]
    choices = [
        Reason.OFFLINE,
        Reason.STALE,
        Reason.THERMAL,
        Reason.GRID,
        Reason.NEVER_CURTAIL,
        Reason.DWELL,
        Reason.DWELL,
        Reason.WAKE_LATENCY,
        Reason.HYSTERESIS,
        cap_reason,
        Reason.RAMP,
        Reason.THERMAL,
    ]
    reason = np.select(conditions, [np.uint8(c) for c in choices], np.uint8(Reason.PROFIT))
    reason = reason.astype(np.uint8)

    if plan.infeasible or plan.cap_binding or (plan.floor_binding and floor_cut_by_cap):
        site_reason = cap_reason
    elif plan.floor_binding:
        site_reason = Reason.RAMP
    else:
        site_reason = Reason.PROFIT

    known = ~unknown
    switched = known & ((level > 0) != running)
    state.switched_at[switched] = now_s
    state.level[known] = level[known]
    state.cheap_since_s = cheap_since
    state.site_power_w = plan.site_power_w
    state.decided_at_s = now_s
    return Decision(
        level=level,
        power_w=plan.power_w,
        reason=reason,
        commandable=known,
        site_power_w=plan.site_power_w,
        hashrate_ths=plan.hashrate_ths,
        cap_binding=plan.cap_binding,
        infeasible=plan.infeasible,
        multiplier_usd_per_mwh=plan.multiplier_usd_per_mwh,
        site_reason=site_reason,
    )

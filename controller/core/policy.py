"""Safety and policy around the optimizer: stale data, thermal, dwell, wake latency, ramps.

`decide` is the single entry point the daemon and the backtest call: it bounds what
policy forbids changing, asks the optimizer for the rest, and records why each miner
got its level. Pure and vectorised: arrays and time in, decision out, no loop per miner.
Each rule below is one function; `decide` runs them in order.

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
   With ``MarketInputs.cost_steps`` (an energy campus: on-site surplus, then grid
   import) the optimizer decides against the steps; rules 5 and 6 read the price of
   the step the plan belongs on (:func:`stepped_price`), and a held level is kept only
   while the plan stays on that step. A miner a step's boundary holds back has reason
   PROFIT: the next watt costs more than it earns.
8. Ramp: planned site power moves at most ``ramp_kw_per_min`` per minute in either
   direction for economic reasons. Reductions demanded by the cap or a grid
   obligation are never slowed down, and a ramp-down never pushes above the cap.

The clocks in :class:`PolicyState` and the holds they time are this module's contract
with anything that replays decisions (the backtest): :attr:`PolicyState.CLOCKS`,
:func:`hold_durations_s` and :func:`hold_ends_s`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from controller.config_types import PolicyKnobs
from controller.core import optimizer as opt
from controller.core.optimizer import LEVEL, FloatArray, IntArray, LevelArray, Plan, PreparedFleet
from controller.protocol.reasons import Reason

BoolArray = npt.NDArray[np.bool_]


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
    # An energy campus prices power by steps (on-site surplus, then grid import, all in);
    # price_usd_per_mwh and adder_usd_per_mwh are then unused (controller/core/campus.py).
    cost_steps: opt.CostSteps | None = None


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
    # Identical miners each row stands for (the backtest's cohorts); None: one each.
    unit_count: npt.NDArray[np.integer] | None = None


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

    # The contract with replays: fields holding a time on the decisions' clock (now_s),
    # and fields holding one value per miner. Renaming a field means changing these.
    CLOCKS: ClassVar[tuple[str, ...]] = ("switched_at", "cheap_since_s", "decided_at_s")
    PER_MINER: ClassVar[tuple[str, ...]] = ("level", "switched_at", "cheap_since_s")

    @classmethod
    def initial(cls, n: int, start_level: npt.NDArray[np.integer]) -> PolicyState:
        """The memory before the first decision: n miners at `start_level`, (n,)."""
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
    split: tuple[int, int] | None = None  # with MinerInputs.unit_count: see Plan.split

    def reason_counts(self) -> npt.NDArray[np.int64]:
        """Number of miners per Reason code (index = code), for metrics."""
        counts: npt.NDArray[np.int64] = np.bincount(self.reason, minlength=len(Reason))
        return counts


# -- the holds' clocks, for replays ---------------------------------------------------------


def _latency_s(knobs: PolicyKnobs, wake_s: FloatArray | float | None) -> FloatArray:
    """Cheap spell needed before waking, s, per miner (or one value)."""
    w = knobs.default_wake_s if wake_s is None else wake_s
    out: FloatArray = np.asarray(w, dtype=np.float64) * knobs.wake_latency_factor
    return out


def hold_durations_s(knobs: PolicyKnobs, wake_s: FloatArray | None) -> list[float]:
    """Every length a hold can have (dwell, wake latency), s, finite and positive, sorted."""
    out = [knobs.min_run_s, knobs.min_sleep_s, *np.unique(_latency_s(knobs, wake_s)).tolist()]
    return sorted({float(d) for d in out if math.isfinite(d) and d > 0})


def hold_ends_s(state: PolicyState, knobs: PolicyKnobs, wake_s: FloatArray | None) -> FloatArray:
    """(n, 3): when each miner's minimum run, minimum sleep and wake latency run out.

    A decision at or after such a time may differ from one before it; nothing else
    in the policy changes with time alone (the ramp aside, which moves continuously).
    NaN or -inf where the clock is not running.
    """
    latency = np.broadcast_to(_latency_s(knobs, wake_s), state.switched_at.shape)
    return np.stack([state.switched_at + knobs.min_run_s, state.switched_at + knobs.min_sleep_s,
                     state.cheap_since_s + latency], axis=1)


# -- rules 1-3: what no economic rule may change --------------------------------------------


def thermal_max_level(
    fleet: PreparedFleet, temp_c: FloatArray, knobs: PolicyKnobs
) -> tuple[LevelArray, BoolArray, BoolArray]:
    """Highest level each miner may run at its temperature.

    Returns (max_level, critical, derated): critical miners get 0; derated ones a
    max power falling linearly from the top target at ``derate_start_c`` to the
    lowest target at ``critical_c`` (never below the lowest target).
    """
    t = np.asarray(temp_c, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        critical = t >= knobs.critical_c  # NaN (unknown) compares False: no derate
        derated = (t > knobs.derate_start_c) & ~critical
    hi = fleet.top.copy()
    rows = np.flatnonzero(derated)
    if rows.size and fleet.k > 1:
        span_c = max(knobs.critical_c - knobs.derate_start_c, 1e-9)
        frac = np.clip((t[rows] - knobs.derate_start_c) / span_c, 0.0, 1.0)
        p = fleet.kind_power_w[fleet.kind[rows]]  # (m, k): the derated miners only
        top = fleet.top[rows].astype(np.intp)
        p_min, p_max = p[:, 1], p[np.arange(rows.size), top]
        allowed_w = p_max - frac * (p_max - p_min)
        levels = np.arange(1, fleet.k)[None, :]
        ok = (p[:, 1:] <= allowed_w[:, None] + 1e-9) & (levels <= top[:, None])
        hi[rows] = np.maximum(ok.sum(axis=1), 1)
    hi *= ~critical
    return hi, critical, derated & (hi < fleet.top)


@dataclass(frozen=True, slots=True)
class _Hard:
    """Rules 1-3 and grid obligations: bounds no economic rule may move."""

    unknown: BoolArray  # stale or offline: pinned at max, not commanded
    offline: BoolArray
    never: BoolArray  # never-curtail (and known)
    movable: BoolArray  # neither of those
    critical: BoolArray
    derated: BoolArray
    forced: BoolArray  # a grid obligation sleeps these
    lo: LevelArray
    hi: LevelArray
    bounds: opt.Bounds


def hard_bounds(fleet: PreparedFleet, miners: MinerInputs, knobs: PolicyKnobs) -> _Hard:
    """Stale and offline miners counted at max; thermal limits; grid sleeps; never-curtail."""
    n = fleet.n
    offline = miners.offline if miners.offline is not None else np.zeros(n, dtype=bool)
    unknown = miners.stale | offline
    never = miners.never_curtail & ~unknown
    if miners.temp_c is not None:
        hi, critical, derated = thermal_max_level(fleet, miners.temp_c, knobs)
    else:
        hi, critical, derated = fleet.top.copy(), np.zeros(n, bool), np.zeros(n, bool)
    # A grid obligation (emergency, under-frequency) outranks never-curtail and dwell.
    forced = np.zeros(n, bool) if miners.force_sleep is None else miners.force_sleep & ~unknown
    hi *= ~forced
    lo = hi * never
    lo += (fleet.top - lo) * unknown
    hi += (fleet.top - hi) * unknown
    return _Hard(unknown, offline, never, ~unknown & ~never, critical, derated, forced,
                 lo, hi, opt.make_bounds(fleet, lo, hi))


# -- rules 4-6: holds -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Holds:
    """Rules 4-6: what the dwell, wake-latency and hysteresis rules hold, and the bounds."""

    free: LevelArray  # economic levels under the hard bounds alone
    on: BoolArray  # dwell: recently woken, kept awake
    off: BoolArray  # dwell: recently slept, kept asleep
    wake: BoolArray  # wake latency: not woken for a dip that has not lasted
    cheap_since_s: FloatArray  # the cheap-spell clocks after this decision
    lo: LevelArray
    hi: LevelArray
    bounds: opt.Bounds


def dwell(state: PolicyState, hard: _Hard, running: BoolArray, knobs: PolicyKnobs,
          now_s: float) -> tuple[BoolArray, BoolArray]:
    """Rule 4: (kept on, kept asleep) by the minimum run and sleep times.

    A hold lasts while its end (:func:`hold_ends_s`, the same sums) is after now.
    """
    with np.errstate(invalid="ignore"):
        on = hard.movable & running & (state.switched_at + knobs.min_run_s > now_s)
        off = hard.movable & ~running & (state.switched_at + knobs.min_sleep_s > now_s)
    return on & (hard.hi >= 1), off


def wake_latency(state: PolicyState, worth: BoolArray, miners: MinerInputs, knobs: PolicyKnobs,
                 *, expected_dip_s: float | None, now_s: float) -> tuple[BoolArray, FloatArray]:
    """Rule 5: (not yet woken, cheap-spell clocks): waking pays, but not for long enough.

    `worth`: the price pays for waking the miner (its economic level is above sleep).
    """
    cheap_since = np.fmin(state.cheap_since_s, now_s)  # a spell starts now if none runs
    cheap_since[~worth] = np.nan
    latency = _latency_s(knobs, miners.wake_s)
    with np.errstate(invalid="ignore"):
        waited = cheap_since + latency <= now_s  # the same sum as hold_ends_s
    if expected_dip_s is not None:
        waited |= expected_dip_s >= latency
    return worth & ~waited, cheap_since


def holds(fleet: PreparedFleet, state: PolicyState, hard: _Hard, miners: MinerInputs,
          knobs: PolicyKnobs, *, r_now: int, expected_dip_s: float | None,
          now_s: float) -> _Holds:
    """Rules 4 and 5 as bounds on top of the hard ones."""
    running = state.level > 0
    on, off = dwell(state, hard, running, knobs, now_s)
    free = opt.levels_at(fleet, hard.bounds, r_now)
    block, cheap_since = wake_latency(state, free > 0, miners, knobs,
                                      expected_dip_s=expected_dip_s, now_s=now_s)
    block &= hard.movable & ~running & ~off
    lo = np.maximum(hard.lo, on.view(np.int8)).astype(LEVEL, copy=False)
    hi = hard.hi * ~(off | block)
    return _Holds(free, on, off, block, cheap_since, lo, hi, opt.make_bounds(fleet, lo, hi))


def hysteresis(fleet: PreparedFleet, held: _Holds, hard: _Hard, *, prev: LevelArray,
               econ: LevelArray, positions: tuple[int, int, int]) -> BoolArray:
    """Rule 6: miners whose current level is the best at some price within the band.

    `positions`: the order positions of the price, the price + band, the price - band.
    """
    r_now, r_dearer, r_cheaper = positions
    if r_dearer == r_now == r_cheaper:
        return np.zeros(fleet.n, dtype=bool)  # no level changes within the band
    dearer = econ if r_dearer == r_now else opt.levels_at(fleet, held.bounds, r_dearer)
    cheaper = econ if r_cheaper == r_now else opt.levels_at(fleet, held.bounds, r_cheaper)
    keep: BoolArray = (hard.movable & (prev != econ) & (prev >= dearer) & (prev <= cheaper)
                       & (prev >= held.lo) & (prev <= held.hi))
    return keep


# -- rules 7-8: cap, relaxation and ramp ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Limits:
    """Rule 8 applied to the cap: what the plan must stay within this time."""

    cap_w: float  # the cap, or less while a ramp-up is limited
    floor_w: float  # ramp-down limit (never above the cap)
    floor_cut_by_cap: bool  # the cap demands a faster cut than the ramp allows


def ramp_limits(state: PolicyState, market: MarketInputs, knobs: PolicyKnobs,
                now_s: float) -> _Limits:
    """Rule 8: economic moves at most ramp_kw_per_min; the cap is never relaxed by it."""
    if not (math.isfinite(knobs.ramp_kw_per_min) and math.isfinite(state.site_power_w)
            and math.isfinite(state.decided_at_s)):
        return _Limits(market.cap_w, 0.0, False)
    step_w = knobs.ramp_kw_per_min * 1e3 * max(now_s - state.decided_at_s, 0.0) / 60.0
    floor_w = max(state.site_power_w - step_w, 0.0)
    return _Limits(min(market.cap_w, state.site_power_w + step_w), min(floor_w, market.cap_w),
                   floor_w > market.cap_w)


@dataclass(frozen=True, slots=True)
class _Ask:
    """Everything the optimizer is asked with, but the bounds and priorities."""

    fleet: PreparedFleet
    market: MarketInputs
    limits: _Limits
    aux_in_cost: bool
    unit_count: npt.NDArray[np.integer] | None
    # With cost steps: the site W of the step the plan belongs on (a plan elsewhere pays
    # another price than the one its levels were chosen at).
    step_w: tuple[float, float] | None = None

    def solve(self, bounds: opt.Bounds, priority: npt.NDArray[np.integer] | None) -> Plan:
        m = self.market
        return opt.solve(
            self.fleet, price_usd_per_mwh=m.price_usd_per_mwh, cap_w=self.limits.cap_w,
            floor_w=self.limits.floor_w, priority=priority,
            hashprice_usd_per_ph_day=m.hashprice_usd_per_ph_day, aux_fraction=m.aux_fraction,
            adder_usd_per_mwh=m.adder_usd_per_mwh, aux_in_cost=self.aux_in_cost,
            bounds=bounds, unit_count=self.unit_count, cost_steps=m.cost_steps,
        )

    def within_limits(self, level: LevelArray) -> Plan | None:
        """The plan of these levels if the cap, ramp and floor (and the step) leave them be."""
        power_w = self.fleet.power_at(level)
        site_w = float(power_w.sum()) * (1.0 + self.market.aux_fraction)
        if not self.limits.floor_w <= site_w <= self.limits.cap_w:
            return None
        if self.step_w is not None and not self.step_w[0] <= site_w <= self.step_w[1]:
            return None
        return opt.plan_at(self.fleet, level, aux_fraction=self.market.aux_fraction,
                           power_w=power_w)

    def over_cap(self, plan: Plan) -> bool:
        return plan.infeasible and plan.site_power_w > self.market.cap_w


def relax(ask: _Ask, hard: _Hard, held: _Holds, *, keep: BoolArray, prev: LevelArray,
          econ: LevelArray, priority: npt.NDArray[np.integer] | None) -> tuple[Plan, int]:
    """Rule 7: the plan, and the stage it took to respect the cap.

    Stages: 0 all holds, 1 no hysteresis (the cap binds), 2 no dwell or wake holds
    (pinned miners break the cap), 3 never-curtail shed last. Each is tried only if
    the one before fails.
    """
    maybe = ask.within_limits(prev + (econ - prev) * ~keep) if keep.any() else None
    if maybe is not None:
        return maybe, 0
    maybe = ask.within_limits(econ)
    plan = maybe if maybe is not None else ask.solve(held.bounds, priority)
    if not ask.over_cap(plan):
        return plan, 1
    plan = ask.solve(hard.bounds, priority)
    if not ask.over_cap(plan):
        return plan, 2
    base = np.zeros(hard.never.size, np.int64) if priority is None else np.asarray(priority)
    boosted = np.where(hard.never, int(base.max(initial=0)) + 1, base)
    lo = hard.lo * ~hard.never
    return ask.solve(opt.make_bounds(ask.fleet, lo, hard.hi), boosted), 3


# -- reasons and memory ---------------------------------------------------------------------


def reasons(plan: Plan, hard: _Hard, held: _Holds, keep: BoolArray, *, prev: LevelArray,
            stage: int, cap_reason: Reason) -> npt.NDArray[np.uint8]:
    """Each miner's Reason: the first rule, in the module's order, that decided it."""
    level, free = plan.level, held.free
    dwell_or_wake = stage <= 1
    rules: list[tuple[BoolArray | None, Reason]] = [
        (hard.offline, Reason.OFFLINE),
        (hard.unknown, Reason.STALE),
        (hard.critical, Reason.THERMAL),
        (hard.forced, Reason.GRID),
        (hard.never if stage < 3 else None, Reason.NEVER_CURTAIL),
        (held.on & (free == 0) if dwell_or_wake else None, Reason.DWELL),
        (held.off & (free > 0) if dwell_or_wake else None, Reason.DWELL),
        (held.wake & (level == 0) if dwell_or_wake else None, Reason.WAKE_LATENCY),
        (keep & (level == prev) if stage == 0 else None, Reason.HYSTERESIS),
        (plan.reason == Reason.CAP, cap_reason),
        (plan.reason == Reason.RAMP, Reason.RAMP),
        (hard.derated & (level == hard.hi), Reason.THERMAL),
    ]
    out = np.zeros(level.size, dtype=np.uint8)  # PROFIT
    for cond, code in reversed(rules):  # the earlier rules overwrite the later ones
        if cond is not None and cond.any():
            out += cond * (np.uint8(code) - out)  # uint8 arithmetic: out becomes code
    return out


def site_reason(plan: Plan, limits: _Limits, cap_reason: Reason) -> Reason:
    """What bound the site as a whole."""
    if plan.infeasible or plan.cap_binding or (plan.floor_binding and limits.floor_cut_by_cap):
        return cap_reason
    return Reason.RAMP if plan.floor_binding else Reason.PROFIT


def remember(state: PolicyState, plan: Plan, hard: _Hard, cheap_since_s: FloatArray, *,
             prev: LevelArray, now_s: float) -> None:
    """Update the memory in place: levels of the miners it commands, switch times, clocks."""
    known = ~hard.unknown
    level = prev + (plan.level - prev) * known  # a miner it cannot see keeps its last level
    switched = known & ((plan.level > 0) != (prev > 0))
    state.switched_at[switched] = now_s
    state.level[:] = level
    state.cheap_since_s = cheap_since_s
    state.site_power_w = plan.site_power_w
    state.decided_at_s = now_s


# -- the decision ---------------------------------------------------------------------------


def stepped_price(fleet: PreparedFleet, market: MarketInputs, hard: _Hard, limits: _Limits,
                  knobs: PolicyKnobs) -> tuple[MarketInputs, tuple[float, float] | None]:
    """The market at the price of the cost step the plan belongs on, and that step's site W.

    The rules that read one price (wake latency, hysteresis) read that one. Without cost
    steps: the market as it is, and None.
    """
    if market.cost_steps is None:
        return market, None
    choice = opt.stepped_choice(
        fleet, market.cost_steps, hashprice_usd_per_ph_day=market.hashprice_usd_per_ph_day,
        cap_w=limits.cap_w, bounds=hard.bounds, aux_fraction=market.aux_fraction,
        floor_w=limits.floor_w, aux_in_cost=knobs.aux_in_energy_cost)
    priced = dataclasses.replace(market, price_usd_per_mwh=choice.price_usd_per_mwh,
                                 adder_usd_per_mwh=0.0)
    return priced, (choice.lower_w, choice.upper_w)


def _positions(fleet: PreparedFleet, market: MarketInputs, knobs: PolicyKnobs
               ) -> tuple[int, int, int]:
    """Order positions of the price, the price + the hysteresis band, the price - the band."""
    band = knobs.hysteresis_usd_per_mwh if knobs.hysteresis_usd_per_mwh > 0 else 0.0
    return tuple(  # type: ignore[return-value]
        opt.position_at_price(
            fleet, price_usd_per_mwh=market.price_usd_per_mwh + d,
            hashprice_usd_per_ph_day=market.hashprice_usd_per_ph_day,
            aux_fraction=market.aux_fraction, adder_usd_per_mwh=market.adder_usd_per_mwh,
            aux_in_cost=knobs.aux_in_energy_cost,
        )
        for d in (0.0, band, -band)
    )


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
    prev = state.level.astype(LEVEL)
    hard = hard_bounds(fleet, miners, knobs)
    limits = ramp_limits(state, market, knobs, now_s)
    priced, step_w = stepped_price(fleet, market, hard, limits, knobs)
    positions = _positions(fleet, priced, knobs)
    held = holds(fleet, state, hard, miners, knobs, r_now=positions[0],
                 expected_dip_s=market.expected_dip_s, now_s=now_s)
    econ = opt.levels_at(fleet, held.bounds, positions[0])
    keep = hysteresis(fleet, held, hard, prev=prev, econ=econ, positions=positions)
    ask = _Ask(fleet, market, limits, knobs.aux_in_energy_cost, miners.unit_count, step_w)
    plan, stage = relax(ask, hard, held, keep=keep, prev=prev, econ=econ,
                        priority=miners.priority)
    if limits.cap_w < market.cap_w and not plan.infeasible and not limits.floor_cut_by_cap:
        cap_reason = Reason.RAMP
    else:
        cap_reason = Reason.GRID if market.cap_is_grid else Reason.CAP
    reason = reasons(plan, hard, held, keep, prev=prev, stage=stage, cap_reason=cap_reason)
    remember(state, plan, hard, held.cheap_since_s, prev=prev, now_s=now_s)
    return Decision(
        level=plan.level.astype(np.intp),
        power_w=plan.power_w,
        reason=reason,
        commandable=~hard.unknown,
        site_power_w=plan.site_power_w,
        hashrate_ths=plan.hashrate_ths,
        cap_binding=plan.cap_binding,
        infeasible=plan.infeasible,
        multiplier_usd_per_mwh=plan.multiplier_usd_per_mwh,
        site_reason=site_reason(plan, limits, cap_reason),
        split=plan.split,
    )

"""Safety and policy around the optimizer: stale data, never-curtail, dwell times.

`decide` is the single entry point the daemon and the backtest call: it pins
what policy forbids changing, asks the optimizer for the rest, and records why.
Pure: arrays and time in, decision out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from controller.optimizer import FloatArray, IntArray, PreparedFleet, solve
from controller.reasons import Reason

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class PolicyKnobs:
    """Operator-tunable rules (from the site config's [policy] table)."""

    min_run_s: float = 300.0
    min_sleep_s: float = 300.0


@dataclass(frozen=True, slots=True)
class MarketInputs:
    """Prices and limits at decision time."""

    price_usd_per_mwh: float
    hashprice_usd_per_ph_day: float
    cap_w: float  # tightest of site cap, grid obligation and generation, incl. aux load
    aux_fraction: float = 0.0
    cap_is_grid: bool = False  # the binding limit comes from a grid obligation


@dataclass(frozen=True, slots=True)
class MinerInputs:
    """What the controller knows of each miner now (arrays indexed like the fleet)."""

    stale: BoolArray  # no fresh telemetry, or announced offline: unknown actual draw
    never_curtail: BoolArray


@dataclass(slots=True)
class PolicyState:
    """Memory across decisions: last planned level and when it last switched on/off."""

    level: IntArray
    switched_at: FloatArray = field(default_factory=lambda: np.empty(0))

    @classmethod
    def initial(cls, n: int, start_level: IntArray) -> PolicyState:
        # -inf: nothing has switched yet, so no dwell holds a miner at start.
        return cls(level=start_level.copy(), switched_at=np.full(n, -np.inf))


@dataclass(frozen=True, slots=True)
class Decision:
    """Final per-miner plan with reasons; `commandable` is False for miners not to be sent."""

    level: IntArray
    power_w: FloatArray
    reason: npt.NDArray[np.uint8]
    commandable: BoolArray
    site_power_w: float


def decide(
    fleet: PreparedFleet,
    market: MarketInputs,
    miners: MinerInputs,
    state: PolicyState,
    knobs: PolicyKnobs,
    *,
    now_s: float,
) -> Decision:
    """Plan every miner's level under policy; update `state` in place."""
    top = fleet.max_level
    lo = np.zeros(fleet.n, dtype=np.intp)
    hi = top.copy()
    pinned_reason = np.full(fleet.n, 255, dtype=np.uint8)

    # Dwell: a miner that just switched on/off keeps that side for a while.
    running = state.level > 0
    since = now_s - state.switched_at
    hold_on = running & (since < knobs.min_run_s)
    hold_off = ~running & (since < knobs.min_sleep_s)
    lo[hold_on] = np.maximum(lo[hold_on], 1)
    hi[hold_off] = 0
    pinned_reason[hold_on | hold_off] = Reason.DWELL

    lo[miners.never_curtail] = hi[miners.never_curtail] = top[miners.never_curtail]
    pinned_reason[miners.never_curtail] = Reason.NEVER_CURTAIL
    # Unknown state is the worst case for the grid: count it at full power.
    lo[miners.stale] = hi[miners.stale] = top[miners.stale]
    pinned_reason[miners.stale] = Reason.STALE

    plan = solve(
        fleet,
        price_usd_per_mwh=market.price_usd_per_mwh,
        hashprice_usd_per_ph_day=market.hashprice_usd_per_ph_day,
        cap_w=market.cap_w,
        aux_fraction=market.aux_fraction,
        min_level=lo,
        max_level=hi,
    )
    reason = plan.reason.copy()
    if market.cap_is_grid:
        reason[reason == Reason.CAP] = Reason.GRID
    # Dwell only explains a miner where it actually held the choice back.
    dwell_bound = (pinned_reason == Reason.DWELL) & (
        ((plan.level == lo) & hold_on) | ((plan.level == 0) & hold_off)
    )
    fixed = (pinned_reason != 255) & (pinned_reason != Reason.DWELL)
    reason[fixed] = pinned_reason[fixed]
    reason[dwell_bound] = Reason.DWELL

    switched = (plan.level > 0) != (state.level > 0)
    state.switched_at[switched & ~miners.stale] = now_s
    state.level[~miners.stale] = plan.level[~miners.stale]
    return Decision(
        level=plan.level,
        power_w=plan.power_w,
        reason=reason,
        commandable=~miners.stale,
        site_power_w=plan.site_power_w,
    )

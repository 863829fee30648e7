"""Policy tests: one table per rule, each isolating its rule with the others switched off."""

from __future__ import annotations

import dataclasses
import math
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

from controller.catalogue import load_catalogue, operating_points
from controller.config_types import PolicyKnobs
from controller.core import optimizer as opt
from controller.core.policy import (
    Decision,
    MarketInputs,
    MinerInputs,
    PolicyState,
    decide,
    hold_durations_s,
    hold_ends_s,
)
from controller.protocol.reasons import Reason

# One test miner, repeated: sleep 10 W, then 1000..3000 W in 500 W steps.
# Wake chord 60 TH/s / 990 W and step slopes 0.05, 0.04, 0.03, 0.02 TH/s per W give,
# at 50 $/PH/day and no aux, these best levels by price ($/MWh):
#   < 41.7 -> 5, < 62.5 -> 4, < 83.3 -> 3, < 104.2 -> 2, < 126.3 -> 1, above -> sleep.
POWER = [10.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0]
HASH = [0.0, 60.0, 85.0, 105.0, 120.0, 130.0]
HASHPRICE = 50.0
TOP = 5
LEVEL_AT = {30.0: 5, 50.0: 4, 70.0: 3, 90.0: 2, 115.0: 1, 140.0: 0}
OFF = PolicyKnobs(
    min_run_s=0.0,
    min_sleep_s=0.0,
    hysteresis_usd_per_mwh=0.0,
    wake_latency_factor=0.0,
)
BIG = 1e12


def fleet_of(n: int) -> opt.PreparedFleet:
    return opt.prepare(np.tile(POWER, (n, 1)), np.tile(HASH, (n, 1)))


def no_flags(n: int) -> MinerInputs:
    return MinerInputs(stale=np.zeros(n, dtype=bool), never_curtail=np.zeros(n, dtype=bool))


def market(price: float, cap_w: float = BIG, **kw: object) -> MarketInputs:
    return MarketInputs(
        price_usd_per_mwh=price,
        hashprice_usd_per_ph_day=HASHPRICE,
        cap_w=cap_w,
        **kw,  # type: ignore[arg-type]
    )


def state_at(levels: list[int], **kw: object) -> PolicyState:
    s = PolicyState.initial(len(levels), np.array(levels, dtype=np.intp))
    for key, value in kw.items():
        setattr(s, key, value)
    return s


def run(
    levels: list[int],
    price: float,
    *,
    knobs: PolicyKnobs = OFF,
    miners: MinerInputs | None = None,
    state: PolicyState | None = None,
    now_s: float = 1000.0,
    **market_kw: object,
) -> tuple[Decision, PolicyState]:
    n = len(levels)
    st = state if state is not None else state_at(levels)
    d = decide(
        fleet_of(n),
        market(price, **market_kw),  # type: ignore[arg-type]
        miners if miners is not None else no_flags(n),
        st,
        knobs,
        now_s=now_s,
    )
    return d, st


@pytest.mark.parametrize(("price", "level"), sorted(LEVEL_AT.items()))
def test_price_alone_sets_the_level(price: float, level: int) -> None:
    d, st = run([TOP, 0], price)
    assert d.level.tolist() == [level, level]
    assert d.reason.tolist() == [Reason.PROFIT] * 2
    assert st.level.tolist() == [level, level]
    assert d.site_reason == Reason.PROFIT


# --- stale, offline, never-curtail ------------------------------------------------


@pytest.mark.parametrize(
    ("stale", "offline", "never", "price", "level", "reason", "commandable"),
    [
        (True, False, False, 140.0, TOP, Reason.STALE, False),
        (True, True, False, 30.0, TOP, Reason.OFFLINE, False),
        (False, False, True, 140.0, TOP, Reason.NEVER_CURTAIL, True),
        (False, False, True, 30.0, TOP, Reason.NEVER_CURTAIL, True),
        (False, False, False, 140.0, 0, Reason.PROFIT, True),
    ],
)
def test_unknown_and_never_curtail(
    *,
    stale: bool,
    offline: bool,
    never: bool,
    price: float,
    level: int,
    reason: Reason,
    commandable: bool,
) -> None:
    miners = MinerInputs(
        stale=np.array([stale]),
        never_curtail=np.array([never]),
        offline=np.array([offline]),
    )
    d, st = run([2], price, miners=miners)
    assert (int(d.level[0]), int(d.reason[0]), bool(d.commandable[0])) == (
        level,
        reason,
        commandable,
    )
    # A miner the controller cannot see keeps its last known level in state.
    assert int(st.level[0]) == (2 if stale else level)


def test_stale_counts_at_max_against_the_cap() -> None:
    miners = MinerInputs(stale=np.array([True, False]), never_curtail=np.zeros(2, dtype=bool))
    d, _ = run([0, 0], 30.0, miners=miners, cap_w=3000.0 + 1500.0)  # exactly fits
    assert d.level.tolist() == [TOP, 2]
    assert d.site_power_w <= 4500.0
    assert d.reason.tolist() == [Reason.STALE, Reason.CAP]


# --- thermal ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temp", "never", "level", "reason"),
    [
        (70.0, False, TOP, Reason.PROFIT),
        (math.nan, False, TOP, Reason.PROFIT),  # unknown temperature: no derate
        (85.0, False, 3, Reason.THERMAL),  # 1/3 of the way: max 3000 - 667 W -> 2000 W
        (94.0, False, 1, Reason.THERMAL),
        (95.0, False, 0, Reason.THERMAL),  # critical: sleep
        (99.0, True, 0, Reason.THERMAL),  # safety beats never-curtail
        (85.0, True, 3, Reason.NEVER_CURTAIL),  # pinned at its derated maximum
    ],
)
def test_thermal_derating(temp: float, never: bool, level: int, reason: Reason) -> None:
    knobs = replace(OFF, derate_start_c=80.0, critical_c=95.0)
    miners = MinerInputs(
        stale=np.array([False]), never_curtail=np.array([never]), temp_c=np.array([temp])
    )
    d, _ = run([TOP], 30.0, knobs=knobs, miners=miners)
    assert (int(d.level[0]), int(d.reason[0])) == (level, reason)


def test_thermal_shutdown_overrides_min_run() -> None:
    knobs = replace(OFF, min_run_s=600.0)
    miners = MinerInputs(
        stale=np.array([False]), never_curtail=np.array([False]), temp_c=np.array([120.0])
    )
    st = state_at([TOP], switched_at=np.array([990.0]))
    d, _ = run([TOP], 30.0, knobs=knobs, miners=miners, state=st)
    assert (int(d.level[0]), int(d.reason[0])) == (0, Reason.THERMAL)


# --- dwell --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prev", "switched_at", "price", "level", "reason"),
    [
        (TOP, 900.0, 140.0, 1, Reason.DWELL),  # on 100 s ago, min run 300: stays on
        (TOP, 600.0, 140.0, 0, Reason.PROFIT),  # on 400 s ago: may sleep
        (0, 900.0, 30.0, 0, Reason.DWELL),  # asleep 100 s, min sleep 300: stays asleep
        (0, 600.0, 30.0, TOP, Reason.PROFIT),  # asleep 400 s: may wake
        (TOP, 900.0, 90.0, 2, Reason.PROFIT),  # dwell does not hold the power target
    ],
)
def test_dwell(prev: int, switched_at: float, price: float, level: int, reason: Reason) -> None:
    knobs = replace(OFF, min_run_s=300.0, min_sleep_s=300.0)
    st = state_at([prev], switched_at=np.array([switched_at]))
    d, st = run([prev], price, knobs=knobs, state=st, now_s=1000.0)
    assert (int(d.level[0]), int(d.reason[0])) == (level, reason)
    switched = (level > 0) != (prev > 0)
    assert float(st.switched_at[0]) == (1000.0 if switched else switched_at)


def test_dwell_yields_to_the_cap() -> None:
    knobs = replace(OFF, min_run_s=300.0)
    st = state_at([TOP, TOP], switched_at=np.array([990.0, 990.0]))
    d, _ = run([TOP, TOP], 30.0, knobs=knobs, state=st, cap_w=1500.0, cap_is_grid=True)
    assert d.site_power_w <= 1500.0
    assert d.site_reason == Reason.GRID
    assert sorted(d.level.tolist()) == [0, 1]  # 1500 W + 10 W asleep would not fit


# --- wake latency -------------------------------------------------------------------


def test_wake_latency_waits_for_a_dip_to_last() -> None:
    knobs = replace(OFF, wake_latency_factor=1.0, default_wake_s=180.0)
    fleet = fleet_of(1)
    st = state_at([0])
    steps = [
        # (time, price, expected level, reason)
        (0.0, 140.0, 0, Reason.PROFIT),  # expensive: asleep, no cheap spell
        (10.0, 30.0, 0, Reason.WAKE_LATENCY),  # dip starts
        (100.0, 30.0, 0, Reason.WAKE_LATENCY),  # 90 s < 180 s
        (150.0, 140.0, 0, Reason.PROFIT),  # dip over: clock resets
        (160.0, 30.0, 0, Reason.WAKE_LATENCY),  # new dip
        (339.0, 30.0, 0, Reason.WAKE_LATENCY),  # 179 s
        (340.0, 30.0, TOP, Reason.PROFIT),  # 180 s: worth waking
    ]
    for now, price, level, reason in steps:
        d = decide(fleet, market(price), no_flags(1), st, knobs, now_s=now)
        assert (now, int(d.level[0]), int(d.reason[0])) == (now, level, reason)


@pytest.mark.parametrize(
    ("expected_dip_s", "wake_s", "factor", "level", "reason"),
    [
        (None, 180.0, 1.0, 0, Reason.WAKE_LATENCY),  # dip 10 s old
        (60.0, 180.0, 1.0, 0, Reason.WAKE_LATENCY),  # forecast dip shorter than the wake-up
        (600.0, 180.0, 1.0, TOP, Reason.PROFIT),  # forecast says the dip lasts
        (None, 8.0, 1.0, TOP, Reason.PROFIT),  # fast-waking miner: dip already long enough
        (None, 180.0, 0.05, TOP, Reason.PROFIT),  # scaled wake time (fast simulator)
    ],
)
def test_wake_latency_forecast_and_wake_time(
    expected_dip_s: float | None, wake_s: float, factor: float, level: int, reason: Reason
) -> None:
    knobs = replace(OFF, wake_latency_factor=factor)
    fleet = fleet_of(1)
    st = state_at([0])
    miners = replace(no_flags(1), wake_s=np.array([wake_s]))
    decide(fleet, market(140.0), miners, st, knobs, now_s=0.0)
    m = market(30.0, expected_dip_s=expected_dip_s)
    decide(fleet, m, miners, st, knobs, now_s=10.0)
    d = decide(fleet, m, miners, st, knobs, now_s=20.0)
    assert (int(d.level[0]), int(d.reason[0])) == (level, reason)


def test_first_decision_after_start_does_not_wait() -> None:
    d, _ = run([0], 30.0, knobs=replace(OFF, wake_latency_factor=1.0))
    assert int(d.level[0]) == TOP


# --- hysteresis ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prev", "price", "level", "reason"),
    [
        (4, 64.0, 4, Reason.HYSTERESIS),  # 3 is best at 64, but 4 is best at 59
        (4, 70.0, 3, Reason.PROFIT),  # outside the 5 $/MWh band
        (3, 60.0, 3, Reason.HYSTERESIS),  # symmetric going up
        (3, 55.0, 4, Reason.PROFIT),
        (1, 128.0, 1, Reason.HYSTERESIS),  # does not switch off for a 2 $/MWh excursion
        (0, 124.0, 0, Reason.HYSTERESIS),  # nor on
        (0, 120.0, 1, Reason.PROFIT),
    ],
)
def test_hysteresis(prev: int, price: float, level: int, reason: Reason) -> None:
    knobs = replace(OFF, hysteresis_usd_per_mwh=5.0)
    d, _ = run([prev], price, knobs=knobs)
    assert (int(d.level[0]), int(d.reason[0])) == (level, reason)


def test_hysteresis_yields_to_a_binding_cap() -> None:
    knobs = replace(OFF, hysteresis_usd_per_mwh=5.0)
    # Both at 4 and held by hysteresis at 64 $/MWh; the cap needs less.
    d, _ = run([4, 4], 64.0, knobs=knobs, cap_w=4000.0)
    assert d.site_power_w <= 4000.0
    assert set(d.reason.tolist()) <= {Reason.PROFIT, Reason.CAP}


# --- ramp ---------------------------------------------------------------------------


RAMP = replace(OFF, ramp_kw_per_min=1.2)  # 1.2 kW/min = 1200 W per 60 s


@pytest.mark.parametrize(
    ("prev_site_w", "price", "cap_w", "low_w", "high_w", "site_reason"),
    [
        (2 * 1000.0, 30.0, BIG, 2000.0, 3200.0, Reason.RAMP),  # up: at most +1200 W
        (2 * 3000.0, 140.0, BIG, 4800.0, 6000.0, Reason.RAMP),  # down: at most -1200 W
        (2 * 3000.0, 140.0, 1000.0, 0.0, 1000.0, Reason.CAP),  # a cap is not ramped
        (2 * 2000.0, 70.0, BIG, 4000.0, 4000.0, Reason.PROFIT),  # no change needed
    ],
)
def test_ramp_limit(
    *,
    prev_site_w: float,
    price: float,
    cap_w: float,
    low_w: float,
    high_w: float,
    site_reason: Reason,
) -> None:
    prev = {2000.0: 1, 6000.0: TOP, 4000.0: 3}[prev_site_w]
    st = state_at([prev, prev], site_power_w=prev_site_w, decided_at_s=940.0)
    d, st = run([prev, prev], price, knobs=RAMP, state=st, now_s=1000.0, cap_w=cap_w)
    assert low_w - 1e-6 <= d.site_power_w <= high_w + 1e-6
    assert d.site_reason == site_reason
    if site_reason == Reason.RAMP:
        assert Reason.RAMP in d.reason.tolist()
    assert st.site_power_w == d.site_power_w and st.decided_at_s == 1000.0


def test_grid_event_reason_and_aux_counted() -> None:
    d, _ = run([TOP] * 4, 30.0, cap_w=7000.0, cap_is_grid=True, aux_fraction=0.1)
    assert d.site_power_w <= 7000.0
    assert d.site_power_w == pytest.approx(d.power_w.sum() * 1.1)
    assert d.site_reason == Reason.GRID
    assert Reason.GRID in d.reason.tolist()
    assert d.cap_binding and d.multiplier_usd_per_mwh > 0


# --- cap, priorities and infeasible pins --------------------------------------------


def test_priority_class_keeps_power_under_cap() -> None:
    miners = replace(no_flags(4), priority=np.array([1, 1, 0, 0]))
    d, _ = run([TOP] * 4, 30.0, miners=miners, cap_w=6500.0)
    assert d.level[:2].tolist() == [TOP, TOP]
    assert d.level[2:].tolist() == [0, 0]


@pytest.mark.parametrize(
    ("stale", "never", "cap_w", "levels", "infeasible"),
    [
        # never-curtail pinned at max fits: the others fill what is left
        ([0, 0, 0], [1, 0, 0], 4010.0, [TOP, 1, 0], False),
        # never-curtail alone breaks the cap: it is shed last, but shed
        ([0, 0, 0], [1, 1, 0], 4000.0, None, False),
        # stale alone breaks the cap: everything else sleeps, flagged
        ([1, 1, 0], [0, 0, 1], 4000.0, [TOP, TOP, 0], True),
    ],
)
def test_cap_with_unmovable_miners(
    stale: list[int], never: list[int], cap_w: float, levels: list[int] | None, infeasible: bool
) -> None:
    miners = MinerInputs(stale=np.array(stale, bool), never_curtail=np.array(never, bool))
    d, _ = run([TOP] * 3, 30.0, miners=miners, cap_w=cap_w)
    assert d.infeasible == infeasible
    if levels is not None:
        assert d.level.tolist() == levels
    if not infeasible:
        assert d.site_power_w <= cap_w
        if levels is None:  # shed never-curtail miners say why
            assert Reason.CAP in d.reason.tolist()
    else:
        assert d.site_reason == Reason.CAP


def test_reason_counts_and_vectorised_scale() -> None:
    n = 20_000
    rng = np.random.default_rng(0)
    fleet = fleet_of(n)
    miners = MinerInputs(
        stale=rng.random(n) < 0.01,
        never_curtail=rng.random(n) < 0.01,
        temp_c=rng.normal(75, 8, n),
        priority=rng.integers(0, 3, n),
    )
    st = PolicyState.initial(n, fleet.max_level)
    knobs = PolicyKnobs(ramp_kw_per_min=5000.0)
    for i, (price, cap) in enumerate([(30.0, BIG), (90.0, 3e7), (140.0, 1e7), (30.0, 2e7)]):
        d = decide(fleet, market(price, cap), miners, st, knobs, now_s=60.0 * i)
        assert d.site_power_w <= cap or d.infeasible
        counts = d.reason_counts()
        assert counts.sum() == n and counts.size == len(Reason)
        assert np.all(d.commandable == ~miners.stale)


def test_a_decision_allocates_per_miner_vectors_only() -> None:
    """No (miners x levels) temporaries: a decision's peak is a few bytes per miner."""
    n = 20_000
    models = list(load_catalogue().models.values())
    points_w, points_ths = operating_points(models)
    pick = np.random.default_rng(2).integers(0, len(models), n)
    p, h = points_w[pick], points_ths[pick]
    assert p.shape[1] >= 30  # the catalogue's firmware steps: 30-odd levels
    fleet = opt.prepare(p, h)
    rng = np.random.default_rng(2)
    miners = MinerInputs(stale=rng.random(n) < 0.01, never_curtail=np.zeros(n, dtype=bool),
                         temp_c=rng.normal(75, 6, n), priority=rng.integers(0, 3, n),
                         wake_s=np.full(n, 180.0))
    state = PolicyState.initial(n, fleet.max_level)
    full = float(p[:, -1].sum())
    knobs = PolicyKnobs()
    tracemalloc.start()
    try:
        peaks = []
        for i, frac in enumerate((2.0, 0.7, 0.4, 0.7, 2.0)):
            market = MarketInputs(price_usd_per_mwh=40.0 + i, hashprice_usd_per_ph_day=50.0,
                                  cap_w=frac * full)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            decide(fleet, market, miners, state, knobs, now_s=10.0 * i)
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()
    # One (n, levels) float array alone would be 8 x 30-odd = 250+ bytes per miner.
    assert max(peaks) / n < 150, peaks


# --- the clocks' contract with replays (the backtest) ------------------------------


CLOCK_KNOBS = PolicyKnobs(min_run_s=300.0, min_sleep_s=300.0, ramp_kw_per_min=3.0)
CLOCK_MINERS = replace(no_flags(6), wake_s=np.linspace(30.0, 300.0, 6))


def busy_history() -> tuple[PolicyState, float]:
    """Six miners run, sleep through a spike (dwell), then a cheap spell starts (latency)."""
    fleet = fleet_of(6)
    st = PolicyState.initial(6, fleet.max_level)
    for now, price in [(0.0, 30.0), (40.0, 140.0), (400.0, 140.0), (460.0, 30.0), (520.0, 30.0)]:
        decide(fleet, market(price), CLOCK_MINERS, st, CLOCK_KNOBS, now_s=now)
    return st, 520.0


def decide_shifted(later: float, shifted: tuple[str, ...], shift: float = 1e4) -> Decision:
    st, now = busy_history()
    for name in shifted:
        setattr(st, name, getattr(st, name) + shift)
    return decide(fleet_of(6), market(30.0), CLOCK_MINERS, st, CLOCK_KNOBS,
                  now_s=now + later + shift)


def same(a: Decision, b: Decision) -> bool:
    return (a.level.tolist() == b.level.tolist() and a.reason.tolist() == b.reason.tolist()
            and a.site_power_w == b.site_power_w)


def test_clock_fields_are_the_whole_time_contract() -> None:
    """Shifting PolicyState.CLOCKS and now together changes nothing, at every stage of the
    holds (dwell, wake latency, ramp); leaving any one clock behind changes something."""
    cases = (10.0, 200.0, 260.0)
    for later in cases:
        assert same(decide_shifted(later, (), 0.0), decide_shifted(later, PolicyState.CLOCKS))
    for name in PolicyState.CLOCKS:
        rest = tuple(c for c in PolicyState.CLOCKS if c != name)
        assert any(not same(decide_shifted(t, (), 0.0), decide_shifted(t, rest))
                   for t in cases), name
    fields = {f.name for f in dataclasses.fields(PolicyState)}
    assert set(PolicyState.CLOCKS) <= fields
    state, _ = busy_history()
    assert {f for f in fields if np.ndim(getattr(state, f)) == 1} == set(PolicyState.PER_MINER)


def test_hold_ends_are_when_decisions_change() -> None:
    knobs = replace(OFF, min_run_s=300.0, min_sleep_s=200.0, wake_latency_factor=1.0)
    wake_s = np.array([180.0])
    st = state_at([TOP], switched_at=np.array([900.0]))
    miners = replace(no_flags(1), wake_s=wake_s)
    d = decide(fleet_of(1), market(140.0), miners, st, knobs, now_s=1000.0)
    assert int(d.reason[0]) == Reason.DWELL  # on since 900: held on until 1200
    ends = hold_ends_s(st, knobs, wake_s)
    assert ends.tolist() == [[1200.0, 1100.0, pytest.approx(np.nan, nan_ok=True)]]
    just_before = decide(fleet_of(1), market(140.0), miners, state_at(
        [int(st.level[0])], switched_at=st.switched_at.copy()), knobs, now_s=1199.0)
    at_end = decide(fleet_of(1), market(140.0), miners, state_at(
        [int(st.level[0])], switched_at=st.switched_at.copy()), knobs, now_s=1200.0)
    assert (int(just_before.level[0]), int(at_end.level[0])) == (1, 0)
    assert hold_durations_s(knobs, np.array([180.0, 180.0, 240.0])) == [180.0, 200.0, 240.0,
                                                                        300.0]


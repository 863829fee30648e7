"""The optimizer against a stepped cost of power (an energy campus): brute force, hand cases.

A campus prices the miners' power by steps: on-site surplus first (a generator's marginal
cost, or the export price it would have earned), then grid import at market plus
adders. `solve(cost_steps=...)` must find the best plan for any such curve (rising or
not) within one entry, never break the cap, and call a miner held at a step's boundary
PROFIT (the price holds it there, not the cap).
"""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.core import optimizer as opt
from controller.protocol.reasons import Reason
from controller.units import usd_per_ths_hour
from tests.test_optimizer import SETTINGS, miner_rows, pad, scenarios

FloatArray = npt.NDArray[np.float64]


def steps_of(widths: list[float], prices: list[float]) -> opt.CostSteps:
    return opt.CostSteps(np.cumsum(np.array(widths, dtype=np.float64)),
                         np.array(prices, dtype=np.float64))


def profit(fleet: opt.PreparedFleet, level: npt.NDArray[np.integer], steps: opt.CostSteps, *,
           hashprice: float, aux: float) -> tuple[float, float]:
    """($/h, site W) of given levels against the steps (aux paid at the same prices)."""
    site_w = float(fleet.power_at(np.asarray(level)).sum()) * (1 + aux)
    revenue = usd_per_ths_hour(hashprice) * float(fleet.hashrate_at(np.asarray(level)).sum())
    return revenue - steps.cost_usd_per_h(site_w), site_w


def brute_force(fleet: opt.PreparedFleet, steps: opt.CostSteps, *, hashprice: float,
                aux: float, cap_w: float, lo: npt.NDArray[np.intp],
                hi: npt.NDArray[np.intp]) -> float:
    best = -np.inf
    for combo in itertools.product(*(range(a, b + 1) for a, b in zip(lo, hi, strict=True))):
        value, site_w = profit(fleet, np.array(combo), steps, hashprice=hashprice, aux=aux)
        if site_w <= cap_w:
            best = max(best, value)
    return float(best)


def one_entry_usd_per_h(fleet: opt.PreparedFleet, steps: opt.CostSteps, *, hashprice: float,
                        aux: float) -> float:
    """What one entry (a wake-up or a firmware step) can be worth or cost, at most."""
    p, h = fleet.points()
    dp = np.concatenate([(p[:, 1:] - p[:, :1]).ravel(), np.diff(p[:, 1:], axis=1).ravel()])
    dh = np.concatenate([(h[:, 1:] - h[:, :1]).ravel(), np.diff(h[:, 1:], axis=1).ravel()])
    dearest = float(np.abs(steps.price_usd_per_mwh).max())
    worth = usd_per_ths_hour(hashprice) * dh + dearest * dp * (1 + aux) * 1e-6
    return float(worth.max(initial=0.0))


@st.composite
def stepped(draw: st.DrawFn) -> dict[str, object]:
    s = draw(scenarios())
    fleet = s["fleet"]
    assert isinstance(fleet, opt.PreparedFleet)
    full = float(fleet.points()[0].max(axis=1).sum()) * (1 + float(s["aux"]))  # type: ignore[arg-type]
    n = draw(st.integers(1, 4))
    widths = [draw(st.floats(0.02, 0.8)) * full for _ in range(n)]
    # Any prices: rising (surplus, then import), or a cheaper step after a dearer one.
    prices = [draw(st.floats(-40, 300)) for _ in range(n)]
    return {**s, "steps": steps_of(widths, prices)}


def solve_stepped(s: dict[str, object], **kw: object) -> opt.Plan:
    fleet = s["fleet"]
    assert isinstance(fleet, opt.PreparedFleet)
    return opt.solve(
        fleet, price_usd_per_mwh=1e6, hashprice_usd_per_ph_day=float(s["hashprice"]),  # type: ignore[arg-type]
        cap_w=float(s["cap"]), aux_fraction=float(s["aux"]),  # type: ignore[arg-type]
        min_level=s["lo"], max_level=s["hi"], cost_steps=s["steps"], **kw)  # type: ignore[arg-type]


@SETTINGS
@given(stepped())
def test_stepped_cost_matches_brute_force_within_one_entry(s: dict[str, object]) -> None:
    fleet, steps = s["fleet"], s["steps"]
    assert isinstance(fleet, opt.PreparedFleet) and isinstance(steps, opt.CostSteps)
    hashprice, aux, cap = float(s["hashprice"]), float(s["aux"]), float(s["cap"])  # type: ignore[arg-type]
    lo, hi = np.asarray(s["lo"]), np.asarray(s["hi"])
    plan = solve_stepped(s)
    assert np.all(plan.level >= lo) and np.all(plan.level <= hi)
    best = brute_force(fleet, steps, hashprice=hashprice, aux=aux, cap_w=cap, lo=lo, hi=hi)
    if best == -np.inf:
        assert plan.infeasible
        return
    ours, site_w = profit(fleet, plan.level, steps, hashprice=hashprice, aux=aux)
    assert site_w <= cap * (1 + 1e-12)
    scale = 1e-9 * max(1.0, abs(best))
    assert ours <= best + scale
    assert best - ours <= one_entry_usd_per_h(fleet, steps, hashprice=hashprice, aux=aux) + scale


@st.composite
def racks(draw: st.DrawFn) -> dict[str, object]:
    """A few kinds, several identical miners each: one entry is a small part of the plan."""
    kinds = draw(st.lists(miner_rows(), min_size=1, max_size=2))
    counts = [draw(st.integers(2, 5)) for _ in kinds]
    rows = [row for row, c in zip(kinds, counts, strict=True) for _ in range(c)]
    p, h = pad(rows)
    aux = draw(st.floats(0, 0.2))
    full = float(p.max(axis=1).sum()) * (1 + aux)
    n = draw(st.integers(2, 4))
    widths = [draw(st.floats(0.05, 0.6)) * full for _ in range(n)]
    prices = [draw(st.floats(-20, 200)) for _ in range(n)]
    return {"p": p, "h": h, "counts": counts, "aux": aux, "cap": draw(st.floats(0.1, 1.2)) * full,
            "hashprice": draw(st.floats(15, 90)), "steps": steps_of(widths, prices)}


def brute_force_racks(s: dict[str, object]) -> float:
    """Best profit over every count of miners per level, kind by kind (miners are alike)."""
    p, h, counts = np.asarray(s["p"]), np.asarray(s["h"]), list(s["counts"])  # type: ignore[call-overload]
    steps = s["steps"]
    assert isinstance(steps, opt.CostSteps)
    aux, cap, hp = float(s["aux"]), float(s["cap"]), float(s["hashprice"])  # type: ignore[arg-type]
    starts = np.cumsum([0, *counts[:-1]])
    per_kind = []
    for start, c in zip(starts.tolist(), counts, strict=True):
        k = p.shape[1]
        options = []
        for combo in itertools.combinations_with_replacement(range(k), c):
            lv = np.array(combo)
            options.append((float(p[start, lv].sum()), float(h[start, lv].sum())))
        per_kind.append(sorted(set(options)))
    best = -np.inf
    value = usd_per_ths_hour(hp)
    for pick in itertools.product(*per_kind):
        w = sum(x for x, _ in pick) * (1 + aux)
        if w <= cap:
            best = max(best, value * sum(y for _, y in pick) - steps.cost_usd_per_h(w))
    return float(best)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(racks())
def test_stepped_cost_on_racks_within_one_entry(s: dict[str, object]) -> None:
    fleet = opt.prepare(np.asarray(s["p"]), np.asarray(s["h"]))  # type: ignore[call-overload]
    steps = s["steps"]
    assert isinstance(steps, opt.CostSteps)
    hp, aux, cap = float(s["hashprice"]), float(s["aux"]), float(s["cap"])  # type: ignore[arg-type]
    plan = opt.solve(fleet, price_usd_per_mwh=0.0, hashprice_usd_per_ph_day=hp, cap_w=cap,
                     aux_fraction=aux, cost_steps=steps)
    ours, site_w = profit(fleet, plan.level, steps, hashprice=hp, aux=aux)
    best = brute_force_racks(s)
    if best == -np.inf:  # asleep, the miners already draw more than the cap
        assert plan.infeasible
        return
    assert site_w <= cap
    scale = 1e-9 * max(1.0, abs(best))
    assert ours <= best + scale
    assert best - ours <= one_entry_usd_per_h(fleet, steps, hashprice=hp, aux=aux) + scale


@SETTINGS
@given(scenarios())
def test_one_step_is_the_single_price_plan(s: dict[str, object]) -> None:
    fleet = s["fleet"]
    assert isinstance(fleet, opt.PreparedFleet)
    common = {"hashprice_usd_per_ph_day": float(s["hashprice"]), "cap_w": float(s["cap"]),  # type: ignore[arg-type]
              "aux_fraction": float(s["aux"]), "min_level": s["lo"], "max_level": s["hi"]}  # type: ignore[arg-type]
    single = opt.solve(fleet, price_usd_per_mwh=float(s["price"]), **common)  # type: ignore[arg-type]
    by_steps = opt.solve(fleet, price_usd_per_mwh=0.0,
                         cost_steps=opt.CostSteps.single(float(s["price"])), **common)  # type: ignore[arg-type]
    assert np.array_equal(single.level, by_steps.level)
    assert by_steps.cap_binding == single.cap_binding
    assert np.array_equal(single.reason, by_steps.reason)


@SETTINGS
@given(stepped(), st.floats(0, 1.2))
def test_stepped_floor_and_cap_hold(s: dict[str, object], floor_frac: float) -> None:
    fleet = s["fleet"]
    assert isinstance(fleet, opt.PreparedFleet)
    aux1 = 1 + float(s["aux"])  # type: ignore[arg-type]
    cap = float(s["cap"])  # type: ignore[arg-type]
    floor_w = floor_frac * float(fleet.points()[0].max(axis=1).sum()) * aux1
    plan = solve_stepped(s, floor_w=floor_w)
    if plan.infeasible:
        return
    assert plan.site_power_w <= cap
    top_w = float(fleet.power_at(np.asarray(s["hi"])).sum()) * aux1
    p, _ = fleet.points()
    entry_w = float(max((p[:, 1:] - p[:, :1]).max(initial=0.0), 0.0)) * aux1
    # The floor is met, or everything allowed runs, or one more entry would break the cap.
    assert (plan.site_power_w >= min(floor_w, cap) - entry_w - 1e-6
            or plan.site_power_w >= top_w - 1e-6)


# -- hand cases ---------------------------------------------------------------------------

# One miner model: asleep (0 W, 0 TH/s) or at 3 kW and 100 TH/s.
P_ONE, H_ONE = [0.0, 3000.0], [0.0, 100.0]


def ten_miners() -> opt.PreparedFleet:
    return opt.prepare(*pad([(P_ONE, H_ONE)] * 10))


def break_even_hashprice(price_usd_per_mwh: float) -> float:
    """The hashprice at which a 3 kW, 100 TH/s miner breaks even at this price, $/PH/day."""
    usd_per_h = price_usd_per_mwh * 3000.0 * 1e-6
    return usd_per_h / 100.0 * 1000.0 * 24.0


def test_surplus_is_filled_exactly_and_the_grid_not_touched() -> None:
    # 9 kW of solar surplus at $0, then grid at $500/MWh, which no miner pays for.
    fleet = ten_miners()
    plan = opt.solve(fleet, price_usd_per_mwh=0.0, cap_w=30_000.0,
                     hashprice_usd_per_ph_day=break_even_hashprice(100.0),
                     cost_steps=steps_of([9000.0, 21_000.0], [0.0, 500.0]))
    assert int((plan.level == 1).sum()) == 3
    assert plan.site_power_w == pytest.approx(9000.0)
    assert not plan.cap_binding
    assert np.all(plan.reason == Reason.PROFIT)


def test_cheap_grid_behind_a_dear_genset_is_reached() -> None:
    # The first 9 kW cost $45 (a genset's fuel), the rest $25 (night-time grid); the
    # miners break even at $35. Stopping at the first step (a greedy that assumes prices
    # rise) earns nothing; running all 30 kW pays: 30 kW x $35 > 9 kW x $45 + 21 kW x $25.
    fleet = ten_miners()
    steps = steps_of([9000.0, 21_000.0], [45.0, 25.0])
    hp = break_even_hashprice(35.0)
    plan = opt.solve(fleet, price_usd_per_mwh=0.0, cap_w=30_000.0,
                     hashprice_usd_per_ph_day=hp, cost_steps=steps)
    assert np.all(plan.level == 1)
    ours, _ = profit(fleet, plan.level, steps, hashprice=hp, aux=0.0)
    assert ours == pytest.approx(30 * 35e-6 * 1000 - (9 * 45e-3 + 21 * 25e-3), rel=1e-9)
    # The choice says so: the lower end of nothing, the cap end of the cheap step.
    choice = opt.stepped_choice(fleet, steps, hashprice_usd_per_ph_day=hp, cap_w=30_000.0,
                                bounds=opt.make_bounds(fleet, None, None))
    assert (choice.segment, choice.price_usd_per_mwh) == (1, 25.0)


def test_a_dear_genset_step_too_wide_to_pay_for_is_left_alone() -> None:
    # The same, but the $45 step is 24 kW wide: 24 x 45 + 6 x 25 > 30 x 35, nothing runs.
    fleet = ten_miners()
    plan = opt.solve(fleet, price_usd_per_mwh=0.0, cap_w=30_000.0,
                     hashprice_usd_per_ph_day=break_even_hashprice(35.0),
                     cost_steps=steps_of([24_000.0, 6000.0], [45.0, 25.0]))
    assert np.all(plan.level == 0)


def test_the_cap_below_a_cheap_step_is_the_cap() -> None:
    # Everything below the cap is cheap: the cap binds (reason CAP), not a step.
    fleet = ten_miners()
    plan = opt.solve(fleet, price_usd_per_mwh=0.0, cap_w=12_500.0,
                     hashprice_usd_per_ph_day=break_even_hashprice(100.0),
                     cost_steps=steps_of([20_000.0, 10_000.0], [0.0, 500.0]))
    assert int((plan.level == 1).sum()) == 4
    assert plan.cap_binding
    assert int((plan.reason == Reason.CAP).sum()) == 6


def test_underclocking_fills_a_step_to_its_boundary() -> None:
    # One miner with a concave curve; $0 surplus for 2.2 kW then $400 grid: the miner runs
    # at the highest level within 2.2 kW (it would run higher on surplus alone).
    p, h = pad([([0.0, 1500.0, 2000.0, 2500.0, 3000.0], [0.0, 60.0, 75.0, 87.0, 95.0])])
    fleet = opt.prepare(p, h)
    plan = opt.solve(fleet, price_usd_per_mwh=0.0, cap_w=10_000.0,
                     hashprice_usd_per_ph_day=break_even_hashprice(60.0),
                     cost_steps=steps_of([2200.0, 7800.0], [0.0, 400.0]))
    assert plan.level.tolist() == [2]
    assert plan.reason.tolist() == [Reason.PROFIT]


def test_cost_steps_reject_bad_curves() -> None:
    with pytest.raises(ValueError, match="ascending"):
        opt.CostSteps(np.array([2.0, 1.0]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        opt.CostSteps(np.array([1.0]), np.array([np.nan]))
    with pytest.raises(ValueError, match="equal"):
        opt.CostSteps(np.array([1.0, 2.0]), np.array([0.0]))
    assert opt.CostSteps.single(30.0).cost_usd_per_h(2e6) == pytest.approx(60.0)
    assert steps_of([1e6, 1e6], [10.0, 20.0]).cost_usd_per_h(1.5e6) == pytest.approx(20.0)


def test_the_policy_decides_on_the_steps_and_keeps_no_level_off_its_step() -> None:
    from controller.core.policy import (  # noqa: PLC0415
        MarketInputs,
        MinerInputs,
        PolicyKnobs,
        PolicyState,
        decide,
    )

    fleet = ten_miners()
    steps = steps_of([9000.0, 21_000.0], [0.0, 500.0])
    market = MarketInputs(price_usd_per_mwh=500.0, hashprice_usd_per_ph_day=break_even_hashprice(
        100.0), cap_w=30_000.0, cost_steps=steps)
    miners = MinerInputs(stale=np.zeros(10, bool), never_curtail=np.zeros(10, bool))
    knobs = PolicyKnobs(min_run_s=0, min_sleep_s=0, wake_latency_factor=0,
                        hysteresis_usd_per_mwh=50.0)
    # Five run now; at the step's $0 each would run, and a $50 band would keep them: but
    # five do not fit on the $0 step, and the next watt costs $500. Three run.
    state = PolicyState.initial(10, np.array([1] * 5 + [0] * 5))
    d = decide(fleet, market, miners, state, knobs, now_s=100.0)
    assert int((d.level == 1).sum()) == 3
    assert d.site_power_w == pytest.approx(9000.0)
    assert np.all(d.reason == Reason.PROFIT) and not d.cap_binding
    # The same at once on a second decision (memory carried): still three.
    d = decide(fleet, market, miners, state, knobs, now_s=105.0)
    assert int((d.level == 1).sum()) == 3

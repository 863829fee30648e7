"""Optimizer tests: brute-force equivalence, cap safety, monotonicity, efficiency order."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.catalogue import load_catalogue, operating_points
from controller.core import optimizer as opt
from controller.protocol.reasons import Reason
from controller.units import usd_per_ths_hour

FloatArray = npt.NDArray[np.float64]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pad(rows: list[tuple[list[float], list[float]]]) -> tuple[FloatArray, FloatArray]:
    """Rows of (powers, hashrates) padded to one width by repeating the last point."""
    k = max(len(p) for p, _ in rows)
    power = np.array([list(p) + [p[-1]] * (k - len(p)) for p, _ in rows], dtype=np.float64)
    hashrate = np.array([list(h) + [h[-1]] * (k - len(h)) for _, h in rows], dtype=np.float64)
    return power, hashrate


@st.composite
def miner_rows(draw: st.DrawFn) -> tuple[list[float], list[float]]:
    """One miner: sleep point, then a concave increasing curve of 1..5 points."""
    n_points = draw(st.integers(1, 5))
    sleep_w = draw(st.floats(0, 60))
    min_w = draw(st.floats(400, 2500))
    steps = draw(st.lists(st.floats(20, 600), min_size=n_points - 1, max_size=n_points - 1))
    slopes = sorted(
        draw(st.lists(st.floats(0.002, 0.09), min_size=n_points - 1, max_size=n_points - 1)),
        reverse=True,
    )
    h_min = draw(st.floats(5, 200))
    power = [sleep_w, min_w, *(min_w + np.cumsum(steps)).tolist()]
    hashrate = [0.0, h_min, *(h_min + np.cumsum(np.multiply(slopes, steps))).tolist()]
    return power, hashrate


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    rows = draw(st.lists(miner_rows(), min_size=1, max_size=4))
    power, hashrate = pad(rows)
    fleet = opt.prepare(power, hashrate)
    hi = np.array([draw(st.integers(0, int(t))) for t in fleet.top], dtype=np.intp)
    lo = np.array(
        [draw(st.sampled_from([0, 0, min(1, int(h)), int(h)])) for h in hi], dtype=np.intp
    )
    aux = draw(st.floats(0, 0.3))
    full = float(power.max(axis=1).sum()) * (1 + aux)
    return {
        "fleet": fleet,
        "lo": lo,
        "hi": hi,
        "price": draw(st.floats(-30, 250)),
        "hashprice": draw(st.floats(15, 90)),
        "aux": aux,
        "cap": draw(st.floats(0, 1.3)) * full,
    }


def brute_force(
    fleet: opt.PreparedFleet,
    *,
    value: float,
    cost: float,
    budget: float,
    lo: npt.NDArray[np.intp],
    hi: npt.NDArray[np.intp],
) -> float:
    """Best objective over every combination of allowed levels (-inf if none fits)."""
    best = -np.inf
    for combo in itertools.product(*(range(a, b + 1) for a, b in zip(lo, hi, strict=True))):
        level = np.array(combo)
        p = fleet.power_at(level).sum()
        if p <= budget:
            best = max(best, value * fleet.hashrate_at(level).sum() - cost * p)
    return float(best)


def one_step_value(fleet: opt.PreparedFleet, value: float, cost: float) -> float:
    """Largest objective gain of one firmware step (the sleep->level jump counts as one)."""
    p, h = fleet.points()
    wake = value * (h[:, 1:] - h[:, :1]) - cost * (p[:, 1:] - p[:, :1])
    step = value * np.diff(h[:, 1:], axis=1) - cost * np.diff(p[:, 1:], axis=1)
    return float(max(wake.max(initial=0.0), step.max(initial=0.0), 0.0))


def run(s: dict[str, object], **kw: object) -> opt.Plan:
    fleet = s["fleet"]
    assert isinstance(fleet, opt.PreparedFleet)
    return opt.solve(
        fleet,
        price_usd_per_mwh=float(s["price"]),  # type: ignore[arg-type]
        hashprice_usd_per_ph_day=float(s["hashprice"]),  # type: ignore[arg-type]
        cap_w=float(s["cap"]),  # type: ignore[arg-type]
        aux_fraction=float(s["aux"]),  # type: ignore[arg-type]
        min_level=s["lo"],  # type: ignore[arg-type]
        max_level=s["hi"],  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def objective(s: dict[str, object], plan: opt.Plan) -> tuple[float, float]:
    value = usd_per_ths_hour(float(s["hashprice"]))  # type: ignore[arg-type]
    cost = float(s["price"]) * (1 + float(s["aux"])) / 1e6  # type: ignore[arg-type]
    return value, cost


@SETTINGS
@given(scenarios())
def test_matches_brute_force_within_one_step(s: dict[str, object]) -> None:
    fleet = s["fleet"]
    assert isinstance(fleet, opt.PreparedFleet)
    plan = run(s)
    value, cost = objective(s, plan)
    lo, hi = s["lo"], s["hi"]
    budget = float(s["cap"]) / (1 + float(s["aux"]))  # type: ignore[arg-type]
    best = brute_force(fleet, value=value, cost=cost, budget=budget, lo=lo, hi=hi)  # type: ignore[arg-type]
    assert np.all(plan.level >= lo) and np.all(plan.level <= hi)  # type: ignore[operator]
    if best == -np.inf:
        assert plan.infeasible
        return
    ours = value * plan.hashrate_ths.sum() - cost * plan.power_w.sum()
    scale = 1e-9 * max(1.0, abs(best))
    assert ours <= best + scale
    if plan.cap_binding:
        assert best - ours <= one_step_value(fleet, value, cost) + scale
    else:
        assert best - ours <= scale  # unconstrained: exact


@SETTINGS
@given(scenarios())
def test_cap_never_exceeded(s: dict[str, object]) -> None:
    plan = run(s)
    if not plan.infeasible:
        assert plan.site_power_w <= float(s["cap"])  # type: ignore[arg-type]
    # Whatever happens, reported power is the sum of the chosen points.
    aux1 = 1 + float(s["aux"])  # type: ignore[arg-type]
    assert plan.site_power_w == pytest.approx(plan.power_w.sum() * aux1)


@SETTINGS
@given(scenarios(), st.floats(0, 200))
def test_higher_price_never_raises_power(s: dict[str, object], rise: float) -> None:
    low = run(s)
    high = run({**s, "price": float(s["price"]) + rise})  # type: ignore[arg-type]
    assert high.power_w.sum() <= low.power_w.sum() + 1e-9
    assert np.all(high.level <= low.level)


@SETTINGS
@given(miner_rows(), st.floats(0.5, 0.99), st.floats(-30, 250), st.floats(0, 1.2))
def test_less_efficient_twin_never_favoured(
    row: tuple[list[float], list[float]], worse: float, price: float, cap_frac: float
) -> None:
    power, hashrate = row
    twin = [h * worse for h in hashrate]  # same shape, fewer TH/s at every power
    p, h = pad([(power, twin), (power, hashrate), (power, twin)])
    fleet = opt.prepare(p, h)
    plan = opt.solve(
        fleet,
        price_usd_per_mwh=price,
        hashprice_usd_per_ph_day=45.0,
        cap_w=cap_frac * float(p.max(axis=1).sum()),
    )
    assert plan.level[0] <= plan.level[1]
    assert plan.level[2] <= plan.level[1]


@SETTINGS
@given(scenarios(), st.floats(0, 1.2))
def test_floor_kept_and_cap_wins(s: dict[str, object], floor_frac: float) -> None:
    fleet = s["fleet"]
    assert isinstance(fleet, opt.PreparedFleet)
    aux1 = 1 + float(s["aux"])  # type: ignore[arg-type]
    floor_w = floor_frac * float(fleet.points()[0].max(axis=1).sum()) * aux1
    plan = run(s, floor_w=floor_w)
    free = run(s)
    if plan.infeasible:
        return
    assert plan.site_power_w <= float(s["cap"])  # type: ignore[arg-type]
    assert plan.site_power_w >= min(free.site_power_w, float(s["cap"])) - 1e-6  # type: ignore[arg-type]
    if plan.floor_binding:
        top_w = fleet.power_at(np.asarray(s["hi"])).sum() * aux1  # type: ignore[arg-type]
        # Either the floor is met, or the next step would break the cap, or all is on.
        assert (
            plan.site_power_w >= floor_w - 1e-6
            or plan.site_power_w >= top_w - 1e-6
            or plan.site_power_w + one_step_w(fleet) * aux1 > float(s["cap"])  # type: ignore[arg-type]
        )
        assert np.all(plan.reason[plan.level > free.level] == Reason.RAMP)


def one_step_w(fleet: opt.PreparedFleet) -> float:
    p, _ = fleet.points()
    return float(max((p[:, 1:] - p[:, :1]).max(initial=0.0), 0.0))


def catalogue_fleet(n: int, seed: int = 0) -> tuple[FloatArray, FloatArray]:
    models = list(load_catalogue().models.values())
    p, h = operating_points(models)
    pick = np.random.default_rng(seed).integers(0, len(models), n)
    return p[pick], h[pick]


def test_catalogue_fleet_unconstrained_is_per_miner_optimum() -> None:
    p, h = catalogue_fleet(300)
    fleet = opt.prepare(p, h)
    value = usd_per_ths_hour(40.0)
    for price in (-10.0, 20.0, 45.0, 70.0, 90.0, 400.0):
        plan = opt.solve(fleet, price_usd_per_mwh=price, hashprice_usd_per_ph_day=40.0, cap_w=1e12)
        per_miner = value * h - price / 1e6 * p
        best = per_miner.max(axis=1)
        got = per_miner[np.arange(fleet.n), plan.level]
        np.testing.assert_allclose(got, best, rtol=0, atol=1e-12)
        assert not plan.cap_binding and plan.multiplier_usd_per_mwh == 0.0


def test_cap_binding_fills_by_efficiency_and_reports_multiplier() -> None:
    p, h = catalogue_fleet(500, seed=3)
    fleet = opt.prepare(p, h)
    free = opt.solve(fleet, price_usd_per_mwh=30.0, hashprice_usd_per_ph_day=45.0, cap_w=1e12)
    cap = 0.6 * free.site_power_w
    plan = opt.solve(fleet, price_usd_per_mwh=30.0, hashprice_usd_per_ph_day=45.0, cap_w=cap)
    assert plan.cap_binding and plan.site_power_w <= cap
    # The greedy stops within one step of the cap.
    assert cap - plan.site_power_w <= one_step_w(fleet)
    assert plan.multiplier_usd_per_mwh > 0
    assert set(np.unique(plan.reason)) <= {Reason.PROFIT, Reason.CAP}
    assert np.all((plan.reason == Reason.CAP) == (plan.level < free.level))


def test_priorities_shed_lower_class_first() -> None:
    p, h = catalogue_fleet(200, seed=5)
    fleet = opt.prepare(p, h)
    prio = np.where(np.arange(200) < 100, 2, 1)
    free = opt.solve(fleet, price_usd_per_mwh=10.0, hashprice_usd_per_ph_day=50.0, cap_w=1e12)
    cap = 0.55 * free.site_power_w
    plan = opt.solve(
        fleet, price_usd_per_mwh=10.0, hashprice_usd_per_ph_day=50.0, cap_w=cap, priority=prio
    )
    assert plan.site_power_w <= cap
    high, low = plan.level[:100], plan.level[100:]
    assert np.all(high == free.level[:100])  # the high class keeps its optimum
    assert low.sum() < free.level[100:].sum()


def test_pinned_miners_over_cap_sleep_everyone_else() -> None:
    p, h = catalogue_fleet(10, seed=1)
    fleet = opt.prepare(p, h)
    pinned = np.zeros(10, dtype=np.intp)
    pinned[:3] = fleet.top[:3]
    cap = 0.5 * float(p[np.arange(3), fleet.top[:3]].sum())
    plan = opt.solve(
        fleet, price_usd_per_mwh=0.0, hashprice_usd_per_ph_day=50.0, cap_w=cap, min_level=pinned
    )
    assert plan.infeasible
    assert np.all(plan.level[3:] == 0)
    assert np.all(plan.level[:3] == fleet.top[:3])
    assert np.all(plan.reason[3:] == Reason.CAP)


def test_padding_presets_and_single_point_rows() -> None:
    rows = [
        ([10.0, 1500.0, 2000.0, 2500.0], [0.0, 60.0, 75.0, 85.0]),  # presets
        ([15.0, 3000.0], [0.0, 150.0]),  # one target only
        ([5.0], [0.0]),  # sleep only (e.g. decommissioned)
    ]
    p, h = pad(rows)
    fleet = opt.prepare(p, h)
    assert fleet.top.tolist() == [3, 1, 0]
    plan = opt.solve(fleet, price_usd_per_mwh=0.0, hashprice_usd_per_ph_day=50.0, cap_w=1e9)
    assert plan.level.tolist() == [3, 1, 0]
    plan = opt.solve(fleet, price_usd_per_mwh=1e6, hashprice_usd_per_ph_day=50.0, cap_w=1e9)
    assert plan.level.tolist() == [0, 0, 0]


def test_sleep_to_min_jump_uses_the_hull() -> None:
    # Sleep draws a lot, so waking is only worth it straight to a high target:
    # the low targets are below the hull of (sleep, targets) and never chosen.
    p, h = pad([([900.0, 1000.0, 2000.0, 3000.0], [0.0, 2.0, 90.0, 140.0])])
    fleet = opt.prepare(p, h)
    seen = set()
    for price in np.linspace(0, 300, 61):
        plan = opt.solve(fleet, price_usd_per_mwh=price, hashprice_usd_per_ph_day=50, cap_w=1e9)
        seen.add(int(plan.level[0]))
    assert seen == {0, 2, 3}


def test_non_concave_input_still_respects_the_cap() -> None:
    rng = np.random.default_rng(7)
    p = np.sort(rng.uniform(100, 4000, size=(50, 6)), axis=1)
    p[:, 0] = 10.0
    h = np.sort(rng.uniform(0, 300, size=(50, 6)), axis=1)
    h[:, 0] = 0.0
    fleet = opt.prepare(p, h)
    for frac in (0.1, 0.3, 0.6, 0.9):
        cap = frac * float(p[:, -1].sum())
        plan = opt.solve(fleet, price_usd_per_mwh=5.0, hashprice_usd_per_ph_day=60, cap_w=cap)
        assert plan.site_power_w <= cap


def test_negative_price_runs_everything_and_zero_hashprice_nothing() -> None:
    p, h = catalogue_fleet(20)
    fleet = opt.prepare(p, h)
    plan = opt.solve(fleet, price_usd_per_mwh=-50.0, hashprice_usd_per_ph_day=0.0, cap_w=1e12)
    assert np.all(plan.level == fleet.top)
    plan = opt.solve(fleet, price_usd_per_mwh=50.0, hashprice_usd_per_ph_day=0.0, cap_w=1e12)
    assert np.all(plan.level == 0)


@pytest.mark.parametrize(
    ("power", "hashrate"),
    [
        (np.ones((2, 3)), np.ones((2, 2))),
        (np.array([[10.0, 5.0, 20.0]]), np.array([[0.0, 1.0, 2.0]])),
        (np.array([[10.0, np.nan]]), np.array([[0.0, 1.0]])),
    ],
)
def test_prepare_rejects_bad_points(power: FloatArray, hashrate: FloatArray) -> None:
    with pytest.raises(ValueError, match=r"."):
        opt.prepare(power, hashrate)


def test_large_fleet_blocks_agree_with_small_search() -> None:
    # Thousands of entries span many blocks; the blockwise search must give the
    # same plan as a direct cumulative sum over the sorted order.
    p, h = catalogue_fleet(3000, seed=11)
    h = h * np.random.default_rng(11).normal(1, 0.03, size=(3000, 1))
    fleet = opt.prepare(p, h)
    free = opt.solve(fleet, price_usd_per_mwh=25.0, hashprice_usd_per_ph_day=45.0, cap_w=1e12)
    for frac in (0.2, 0.5, 0.8, 0.99):
        cap = frac * free.site_power_w
        plan = opt.solve(fleet, price_usd_per_mwh=25.0, hashprice_usd_per_ph_day=45.0, cap_w=cap)
        assert plan.site_power_w <= cap
        assert cap - plan.site_power_w <= one_step_w(fleet)


# -- the greedy's specification, one entry at a time ---------------------------------------


def chain_slopes(p: list[float], h: list[float], top: int) -> tuple[list[float], list[int],
                                                                   list[float]]:
    """One miner's wake chords (slope and level per max level f+1) and step slopes.

    A step's slope is taken no higher than the step before it, nor than the wake chord
    it follows (true of exact concave points; it absorbs rounding).
    """
    avg = [(h[lv] - h[0]) / (p[lv] - p[0]) for lv in range(1, top + 1)]
    chord, wake = [], []
    for f in range(top):
        best = max(range(f + 1), key=lambda j: (avg[j], -j))
        chord.append(avg[best])
        wake.append(best + 1)
    steps: list[float] = []
    for e in range(top - 1):
        s = (h[e + 2] - h[e + 1]) / (p[e + 2] - p[e + 1])
        if wake[e + 1] <= e + 1:
            s = min(s, chord[e + 1])
        steps.append(min(s, steps[-1]) if steps else s)
    return chord, wake, steps


def greedy_reference(
    p: FloatArray, h: FloatArray, lo: list[int], hi: list[int], prio: list[int], *,
    price: float, hashprice: float, aux: float, cap: float,
) -> list[int]:
    """The optimizer's rule with no cleverness: every entry sorted, taken while it fits.

    Order: priority (higher first), slope (steeper first), wake chords before steps,
    lower level, the kind whose first miner comes first, lower miner. An entry that
    does not fit is skipped and its miner takes nothing more, except that a miner
    whose wake chord does not fit wakes at the best paying level below it that fits.
    """
    value = usd_per_ths_hour(hashprice)
    cost = price * (1 + aux) / 1e6
    t = cost / value
    rows = [tuple(p[i]) + tuple(h[i]) for i in range(len(p))]
    kinds: dict[tuple[float, ...], int] = {}
    kind = [kinds.setdefault(r, len(kinds)) for r in rows]
    level, entries = [], []
    for i, (pi, hi_row) in enumerate(zip(p.tolist(), h.tolist(), strict=True)):
        top = next(j for j in range(len(pi)) if pi[j] == pi[-1] and hi_row[j] == hi_row[-1])
        up, low = min(hi[i], top), min(lo[i], hi[i], top)
        level.append(low)
        if up == 0:
            continue
        chord, wake, steps = chain_slopes(pi, hi_row, top)
        start = low
        if low == 0:
            start = wake[up - 1]
            entries.append((-prio[i], -chord[up - 1], 0, up - 1, kind[i], i, 0, start))
        entries += [(-prio[i], -steps[e], 1, e, kind[i], i, e + 1, e + 2)
                    for e in range(start - 1, up - 1)]
    room = cap / (1 + aux) - sum(p[i][level[i]] for i in range(len(p)))
    blocked = set()
    for _, neg, _, _, _, i, frm, to in sorted(entries):
        if -neg <= t or i in blocked or level[i] != frm:
            continue
        w = p[i][to] - p[i][frm]
        if w <= room:
            level[i], room = to, room - w
            continue
        blocked.add(i)
        if frm == 0:  # a wake-up that does not fit: the best paying level below it
            fits = [lv for lv in range(1, to) if p[i][lv] - p[i][0] <= room
                    and h[i][lv] - h[i][0] > t * (p[i][lv] - p[i][0])]
            if fits:
                best = max(fits, key=lambda lv: (value * (h[i][lv] - h[i][0])
                                                 - cost * (p[i][lv] - p[i][0]), -lv))
                level[i], room = best, room - (p[i][best] - p[i][0])
    return level


@st.composite
def ranked_fleets(draw: st.DrawFn) -> dict[str, object]:
    """A few kinds of miner, each one to three times, with bounds and priorities."""
    kinds = draw(st.lists(miner_rows(), min_size=1, max_size=3))
    rows = [r for r in kinds for _ in range(draw(st.integers(1, 3)))]
    power, hashrate = pad(rows)
    fleet = opt.prepare(power, hashrate)
    hi = [draw(st.integers(0, int(t))) for t in fleet.top]
    lo = [draw(st.sampled_from([0, 0, 0, min(1, h), h])) for h in hi]
    aux = draw(st.floats(0, 0.3))
    full = float(power.max(axis=1).sum()) * (1 + aux)
    return {
        "power": power, "hashrate": hashrate, "fleet": fleet, "lo": lo, "hi": hi,
        "prio": [draw(st.sampled_from([0, 0, 1, 2])) for _ in rows],
        "price": draw(st.floats(-30, 250)), "hashprice": draw(st.floats(15, 90)), "aux": aux,
        "cap": draw(st.floats(0.05, 1.1)) * full,
    }


def solve_ranked(s: dict[str, object]) -> tuple[opt.Plan, float, float, float, float]:
    """solve() on a ranked_fleets() example; the plan, price, hashprice, aux and cap."""
    fleet = s["fleet"]
    assert isinstance(fleet, opt.PreparedFleet)
    price, hashprice, aux, cap = (float(s[k]) for k in ("price", "hashprice", "aux", "cap"))  # type: ignore[arg-type]
    plan = opt.solve(fleet, price_usd_per_mwh=price, hashprice_usd_per_ph_day=hashprice,
                     cap_w=cap, aux_fraction=aux, min_level=np.array(s["lo"]),
                     max_level=np.array(s["hi"]), priority=np.array(s["prio"]))
    return plan, price, hashprice, aux, cap


@SETTINGS
@given(ranked_fleets())
def test_the_search_is_the_sorted_greedy(s: dict[str, object]) -> None:
    """Fast path and specification agree miner by miner, fill and wake-below-hull included."""
    plan, price, hashprice, aux, cap = solve_ranked(s)
    if plan.infeasible or not plan.cap_binding:
        return  # the pinned minimum alone breaks the cap, or nothing to search
    want = greedy_reference(s["power"], s["hashrate"], s["lo"], s["hi"], s["prio"],  # type: ignore[arg-type]
                            price=price, hashprice=hashprice, aux=aux, cap=cap)
    assert plan.level.tolist() == want


@SETTINGS
@given(ranked_fleets())
def test_no_miner_could_step_up_within_the_cap_and_earn_more(s: dict[str, object]) -> None:
    plan, price, hashprice, aux, cap = solve_ranked(s)
    if plan.infeasible:
        return
    fleet = s["fleet"]
    assert isinstance(fleet, opt.PreparedFleet)
    p, h = fleet.points()
    value, cost = usd_per_ths_hour(hashprice), price * (1 + aux) / 1e6
    room = cap / (1 + aux) - float(plan.power_w.sum())
    for i, now in enumerate(plan.level.tolist()):
        for up in range(now + 1, min(int(s["hi"][i]), int(fleet.top[i])) + 1):  # type: ignore[index]
            dp, dh = p[i, up] - p[i, now], h[i, up] - h[i, now]
            gain = value * dh - cost * dp
            assert dp > room - 1e-9 or gain <= 1e-12 * max(1.0, abs(value * h[i, up])), (i, up)


def test_a_wake_chord_the_cap_cuts_leaves_room_for_a_smaller_miner() -> None:
    """The backtest's counterexample: an M60S (better TH/W) does not fit, an S19 XP does."""
    cat = load_catalogue()
    p, h = operating_points([cat.get("m60s"), cat.get("s19_xp")])
    fleet = opt.prepare(p, h)
    cap = 0.25 * (3700 + 3300) / 1000 * 1.05 * 1000  # 1,837.5 W incl. 5 % aux
    plan = opt.solve(fleet, price_usd_per_mwh=0.0, hashprice_usd_per_ph_day=20.0, cap_w=cap,
                     aux_fraction=0.05)
    assert plan.cap_binding
    assert plan.power_w.tolist() == [15.0, 1700.0]  # M60S asleep, S19 XP at 1,700 W
    assert plan.reason.tolist() == [Reason.CAP, Reason.CAP]


def test_a_miner_wakes_below_its_hull_vertex_when_only_that_fits() -> None:
    # Sleep draws 100 W, so waking pays best at 2,000 W (the hull vertex, 130 TH/s);
    # at 1,000 W (50 TH/s) it still pays, and only that fits under the cap.
    p, h = pad([([100.0, 1000.0, 2000.0], [0.0, 50.0, 130.0])])
    fleet = opt.prepare(p, h)
    assert int(fleet.wake_level[0, 1]) == 2
    plan = opt.solve(fleet, price_usd_per_mwh=20.0, hashprice_usd_per_ph_day=50.0, cap_w=1500.0)
    assert plan.level.tolist() == [1]
    # Level 1 breaks even at 115.7 $/MWh, the vertex at 142.5: in between, waking pays
    # but only at the vertex, which does not fit: it stays asleep.
    dear = opt.solve(fleet, price_usd_per_mwh=130.0, hashprice_usd_per_ph_day=50.0, cap_w=1500.0)
    assert dear.level.tolist() == [0]


def test_leftover_of_a_higher_priority_goes_to_a_lower_one() -> None:
    cat = load_catalogue()
    p, h = operating_points([cat.get("s21_xp_hydro"), cat.get("s19j_pro")])
    fleet = opt.prepare(p, h)
    # The hydro (priority 1) needs 2,885 W to wake; 2,000 W is there: the S19j Pro
    # (priority 0) wakes in it rather than the budget staying unused.
    plan = opt.solve(fleet, price_usd_per_mwh=10.0, hashprice_usd_per_ph_day=50.0,
                     cap_w=2000.0 + 30.0, priority=np.array([1, 0]))
    assert plan.level[0] == 0 and plan.power_w[1] == 2000.0


def test_identical_miners_split_at_the_cut_and_name_the_row() -> None:
    # Four identical S21s as one row of four (unit_count) and as four rows: the row
    # cannot take a step only some of its miners fit, and says how many would.
    cat = load_catalogue()
    p, h = operating_points([cat.get("s21")])
    single = opt.prepare(np.repeat(p, 4, axis=0), np.repeat(h, 4, axis=0))
    cap = 4 * 15.0 + 2 * (1800.0 - 15.0) + 100.0  # two wake-ups and a bit
    per_miner = opt.solve(single, price_usd_per_mwh=0.0, hashprice_usd_per_ph_day=50.0,
                          cap_w=cap)
    assert sorted(per_miner.level.tolist()) == [0, 0, 1, 2]
    row = opt.prepare(p, h, unit_count=np.array([4]))
    plan = opt.solve(row, price_usd_per_mwh=0.0, hashprice_usd_per_ph_day=50.0, cap_w=cap,
                     unit_count=np.array([4]))
    assert plan.level.tolist() == [0] and plan.split == (0, 2)
    assert plan.site_power_w == 4 * 15.0  # the row's four miners asleep
    with pytest.raises(ValueError, match="unit_count differs"):
        opt.solve(single, price_usd_per_mwh=0.0, hashprice_usd_per_ph_day=50.0, cap_w=cap,
                  unit_count=np.ones(4, dtype=np.int64))


def test_rows_of_several_miners_keep_the_per_miner_order() -> None:
    """Rows of 1, 2 and 1 identical S21s are one kind, taken in row order like miners.

    Room for two wake-ups: the per-miner plan wakes miners 0 and 1, so the row of two
    is named (its first miner wakes, its second does not); as rows 1, 1, 1, 1 the plan
    is the per-miner one. Before rows of several miners were a kind of their own, the
    row of two came after both single rows and they took the wake-ups instead.
    """
    cat = load_catalogue()
    p, h = operating_points([cat.get("s21")])
    cap = 4 * 15.0 + 2 * (1800.0 - 15.0) + 100.0
    kw = {"price_usd_per_mwh": 0.0, "hashprice_usd_per_ph_day": 50.0, "cap_w": cap}
    per_miner = opt.solve(opt.prepare(np.repeat(p, 4, axis=0), np.repeat(h, 4, axis=0)), **kw)
    rows = opt.prepare(np.repeat(p, 3, axis=0), np.repeat(h, 3, axis=0),
                       unit_count=np.array([1, 2, 1]))
    assert rows.kinds == 1
    plan = opt.solve(rows, **kw)
    assert plan.split == (1, 1)
    ones = opt.prepare(np.repeat(p, 4, axis=0), np.repeat(h, 4, axis=0),
                       unit_count=np.ones(4, dtype=np.int64))
    refined = opt.solve(ones, **kw)
    assert refined.split is None
    assert refined.level.tolist() == per_miner.level.tolist()
    assert per_miner.level.tolist()[2:] == [0, 0]
    assert refined.site_power_w == per_miner.site_power_w


@SETTINGS
@given(data=st.data())
def test_rows_of_several_miners_refined_by_their_splits_plan_as_miners(
    data: st.DataObject,
) -> None:
    """Rows with counts, the row each plan names split until none is: the per-miner plan,
    miner for miner, through the cut, the fill, wake-ups below the hull vertex, bounds,
    priorities and the ramp floor (the backtest's cohorts rest on this).

    Powers are whole watts, as the catalogue's: sums of count times W and of the miners
    one by one are then the same numbers, so a cap met exactly is met by both.
    """
    curves = data.draw(st.lists(miner_rows(), min_size=1, max_size=3))
    if data.draw(st.booleans()):
        curves.append(([100.0, 1000.0, 2000.0], [0.0, 50.0, 130.0]))  # wakes at level 2
    p_kind, h_kind = pad(curves)
    p_kind = np.round(p_kind)
    top = opt.highest_level(p_kind, h_kind)
    n_rows = data.draw(st.integers(1, 6))
    kind = np.array([data.draw(st.integers(0, len(curves) - 1)) for _ in range(n_rows)])
    count = np.array([data.draw(st.integers(1, 5)) for _ in range(n_rows)])
    prio = np.array([data.draw(st.integers(0, 1)) for _ in range(n_rows)])
    hi = np.array([data.draw(st.integers(0, int(top[k]))) for k in kind])
    lo = np.array([data.draw(st.sampled_from([0, 0, min(1, int(h)), int(h)])) for h in hi])
    aux = data.draw(st.floats(0, 0.3))
    full = float((p_kind[kind].max(axis=1) * count).sum()) * (1 + aux)
    kw = {"price_usd_per_mwh": data.draw(st.floats(-30, 250)),
          "hashprice_usd_per_ph_day": data.draw(st.floats(15, 90)), "aux_fraction": aux,
          "cap_w": data.draw(st.floats(0, 1.3)) * full,
          "floor_w": data.draw(st.sampled_from([0.0, 0.0, 0.3, 0.8])) * full}
    each = np.repeat(np.arange(n_rows), count)
    miners = opt.prepare(p_kind[kind[each]], h_kind[kind[each]])
    want = opt.solve(miners, min_level=lo[each], max_level=hi[each], priority=prio[each], **kw)
    for _ in range(int(count.sum())):  # each split adds a row: at most one per miner
        rows = opt.prepare(p_kind[kind], h_kind[kind], unit_count=count)
        plan = opt.solve(rows, min_level=lo, max_level=hi, priority=prio, unit_count=count,
                         **kw)
        if plan.split is None:
            break
        r, first = plan.split
        assert 0 < first < count[r]
        kind, prio, lo, hi = (np.insert(a, r + 1, a[r]) for a in (kind, prio, lo, hi))
        count = np.insert(count, r + 1, count[r] - first)
        count[r] = first
    assert plan.split is None
    np.testing.assert_array_equal(np.repeat(plan.level, count), want.level)
    assert plan.site_power_w == want.site_power_w
    assert plan.cap_binding == want.cap_binding and plan.infeasible == want.infeasible


def test_kinds_group_equal_points_only() -> None:
    """Miners share a kind exactly when all their points are equal, bit for bit."""
    p, h = catalogue_fleet(50, seed=4)
    h = h.copy()
    h[7, 3] = np.nextafter(h[7, 3], np.inf)  # one miner one bit away from its model
    fleet = opt.prepare(p, h)
    same = [[bool(np.array_equal(p[i], p[j]) and np.array_equal(h[i], h[j])) for j in range(50)]
            for i in range(50)]
    assert (fleet.kind[:, None] == fleet.kind[None, :]).tolist() == same
    first = [int(np.flatnonzero(fleet.kind == k)[0]) for k in range(fleet.kinds)]
    assert first == sorted(first)  # numbered by their first miner
    back_p, back_h = fleet.points()
    np.testing.assert_array_equal(back_p, p)
    np.testing.assert_array_equal(back_h, h)


def test_long_orders_are_searched_by_blocks_with_the_same_answer() -> None:
    """All-different curves (3,000 kinds, ~200k entries): block sums, same cut as a scan."""
    p, h = catalogue_fleet(3000, seed=12)
    h = h * np.random.default_rng(12).normal(1, 0.03, size=(3000, 1))
    fleet = opt.prepare(p, h)
    m_total = fleet.neg_slope.size
    assert m_total > 16 * opt._BLOCK
    cls = np.zeros(fleet.n, dtype=np.intp)
    b = opt.make_bounds(fleet, None, None)
    eco = opt._economics(fleet, 30.0, 45.0, aux_fraction=0.0, adder_usd_per_mwh=0.0,
                         aux_in_cost=True)
    econ = opt.levels_at(fleet, b, eco.r0)
    ctx = opt._Context(fleet, b, eco, econ, cls, 1, fleet.power_at(econ))
    w = opt._entry_weights(ctx, 0)
    dense = w.between(0, m_total)
    cum = np.cumsum(dense)
    rng = np.random.default_rng(1)
    for start, stop in [(0, m_total), (0, eco.r0), (eco.r0, m_total), (5000, 5001), (7, 70_001)]:
        part = np.cumsum(dense[start:stop])
        for amount in (-1.0, *rng.uniform(0, float(part[-1]), 30).tolist(), float(cum[-1]) + 1):
            g, before = opt._first_passing(w, start, stop, amount)
            assert g == start + int(np.searchsorted(part, amount, side="right"))
            assert before == pytest.approx(float(part[g - start - 1]) if g > start else 0.0,
                                           rel=1e-9, abs=1e-6)

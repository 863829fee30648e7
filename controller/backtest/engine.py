"""Backtest: the daemon's own optimizer and policy over historical prices, in simulated time.

What runs (no MQTT, no sleeping; time is passed in):

* **mineops**: :func:`controller.core.policy.decide` (which calls
  :func:`controller.core.optimizer.solve`) at every interval start on the *previous*
  interval's price (the last one published before the interval starts), bounded to the
  site's `[energy]` floor and cap as the daemon bounds it (`bounded_prices`), and again
  inside an interval when a policy hold (dwell, wake latency) expires, as the daemon's
  tick would. Revenue and cost are settled at the interval's *actual* price,
  time-weighted over those segments.
* **optimum**: :func:`controller.core.optimizer.solve` per interval with that interval's own
  price, no policy: the hindsight ceiling.
* **always_on**: every miner at its stock power target (the firmware target nearest the
  vendor's nominal power), shed least-efficient-first only where the cap forces it.
* **onoff**: the strike-price rule: a miner runs at stock while the previous (bounded)
  price is below its model's break-even, else sleeps (solve() on a sleep/stock-only fleet).
* **optimum_onoff**: the hindsight optimum on that sleep/stock-only fleet; the difference
  to **optimum** is the value of underclocking.

Every strategy is settled at the file's own prices, bounded or not: a price beyond the
cap is what the site would have paid. The hindsight strategies plan with them too (the
best any plan could have done).

All strategies plan against the same cap: the site cap (or a grid window's) less the
configured headroom, incl. auxiliary load; never-curtail miners are pinned on. Priorities
order only mineops' shedding (as the daemon's): the optimum and the baselines maximise
profit, so what priorities cost shows in the ratio rather than in a lower ceiling.

Speed, exactly: miners of one class (model, priority, never-curtail) that share a policy
history are identical to the optimizer and the policy, so they are kept as one *cohort*
with a count. The cohorts are the per-miner fleet run-length encoded: class by class
(classes in the order of their first configured miner), each class's miners as
consecutive blocks in the per-miner run's order. A cohort is one optimizer row with
its count (``prepare(unit_count=...)``): the rows of one model are one kind, so the
optimizer takes them in row order as it takes miners by index, and sums count times W
as the per-miner search does. Only where the per-miner plan treats a cohort's miners
unalike (the cap cuts through it, or the budget it leaves does) can a row not stand
for its miners: the optimizer names the first such row and how many of its first
miners take the entry (``Plan.split``), the cohort splits there and the decision is
re-run until none is named (each split adds a cohort, so this ends). The plan is then
the per-miner plan. Cohorts whose histories become equivalent (same level; clocks
older than every hold) merge again, but only with a neighbour: a merge across another
history would reorder miners that the per-miner plan tells apart by index.
(Miners of one model in two classes never meet at one entry of the optimizer's walk:
priorities are walked apart, and never-curtail miners are pinned at their top, or,
when the policy sheds them last, walked as a priority of their own.)

Decisions are memoised on (cohorts in order, state relative to now, the price's
position in the optimizer's step order at the price and at +/- the hysteresis band,
cap): identical inputs give identical outputs. Tests check the whole against a plain
per-miner run (``exact=True``), the daemon's own call without counts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.backtest.classes import FleetClasses
from controller.backtest.result import BacktestResult, Series, Settings
from controller.backtest.windows import Window, window_caps
from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.config_types import PolicyKnobs
from controller.core.optimizer import (
    CostSteps,
    PreparedFleet,
    highest_level,
    position_at_price,
    prepare,
    solve,
)
from controller.core.policy import (
    MarketInputs,
    MinerInputs,
    PolicyState,
    decide,
    hold_durations_s,
    hold_ends_s,
)
from controller.core.prices import PriceBounds
from controller.units import usd_per_ths_hour

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_MAX_EVENTS = 32  # policy-hold expiries decided on inside one interval
_MEMO_LIMIT = 500_000
_LOW_PRICE = -1e9  # $/MWh: every step worth taking; only the cap limits (always-on)


@dataclass(frozen=True)
class _Table:
    """One kind of fleet (full points or stock only) over the classes."""

    classes: FleetClasses
    points_w: FloatArray
    points_ths: FloatArray
    top: IntArray


class PriceBoundsError(ValueError):
    """A price no market has: NaN, infinite, or 100 times beyond the site's bounds."""


# -- cohorts: identical miners with one history -------------------------------------------


@dataclass
class _Cohorts:
    """Cohorts in the per-miner order; `cols` holds each per-miner state field per cohort.

    Class by class (classes in the order of their first configured miner), each class's
    miners as consecutive blocks of one history: the miners the per-miner run would
    have in that order, so the optimizer's tie order (miner index) is kept.
    """

    cls: IntArray
    weight: IntArray
    level: IntArray  # planned level (what is settled)
    cols: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.cls.size)

    def split(self, j: int, first: int) -> _Cohorts:
        """Cohort j into its first `first` miners, then the rest, both with j's history."""
        idx = np.insert(np.arange(len(self)), j + 1, j)
        weight = self.weight[idx].copy()
        weight[j] = first
        weight[j + 1] = self.weight[j] - first
        return _Cohorts(
            self.cls[idx], weight, self.level[idx],
            {k: v[idx] for k, v in self.cols.items()}, dict(self.scalars),
        )


@dataclass(frozen=True)
class _Rows:
    """Cohorts as the optimizer's rows: one row per cohort, with its count of miners."""

    cls: IntArray
    weight: IntArray
    unit_count: IntArray | None  # weight, or None in the per-miner run
    fleet: PreparedFleet
    stale: npt.NDArray[np.bool_]
    never_curtail: npt.NDArray[np.bool_]
    priority: IntArray
    wake_s: FloatArray
    min_level: IntArray
    max_level: IntArray


class _Engine:
    """Prepared fleets per row structure, cap-cut refinement, time normalisation."""

    def __init__(self, table: _Table, horizon_s: float, aggregate: bool) -> None:
        self.t = table
        self.horizon_s = horizon_s
        self.aggregate = aggregate
        self._rows_cache: dict[bytes, _Rows] = {}

    def initial(self, level: IntArray | None = None) -> _Cohorts:
        c = self.t.classes
        if self.aggregate:
            cls = np.arange(c.n_classes, dtype=np.int64)
            weight = c.count.copy()
        else:
            cls = c.member.copy()
            weight = np.ones(cls.size, dtype=np.int64)
        lvl = self.t.top[cls].copy() if level is None else level
        return _Cohorts(cls, weight, lvl)

    def rows(self, coh: _Cohorts) -> _Rows:
        key = coh.cls.tobytes() + b"|" + coh.weight.tobytes()
        hit = self._rows_cache.get(key)
        if hit is not None:
            return hit
        cls, weight = coh.cls.copy(), coh.weight.copy()
        t, c = self.t, self.t.classes
        # The per-miner run is the daemon's own call: no counts.
        units = weight if self.aggregate else None
        fleet = prepare(t.points_w[cls], t.points_ths[cls], unit_count=units)
        nc = c.never_curtail[cls]
        top = t.top[cls]
        rows = _Rows(
            cls=cls, weight=weight, unit_count=units, fleet=fleet,
            stale=np.zeros(cls.size, dtype=bool), never_curtail=nc,
            priority=c.priority[cls], wake_s=c.wake_s[cls],
            min_level=np.where(nc, top, 0), max_level=top,
        )
        if len(self._rows_cache) > 4096:
            self._rows_cache.clear()
        self._rows_cache[key] = rows
        return rows

    def split(self, coh: _Cohorts, split: tuple[int, int] | None) -> _Cohorts | None:
        """The cohort a plan would treat unalike, in two, where the per-miner plan does.

        `split` is the optimizer's (row, miners) (``Plan.split``): the row's first
        `miners` would take an entry its others would not. A row is a cohort, so the
        cohort splits into those miners and the rest, in that order.

        Raises:
            RuntimeError: the split does not leave miners on both sides (the optimizer
                broke its contract: going on would settle a plan that is not the
                per-miner one).
        """
        if split is None:
            return None
        row, first = split
        if not 0 < first < int(coh.weight[row]):
            raise RuntimeError(f"optimizer split {split} outside a cohort of "
                               f"{int(coh.weight[row])} miners")
        return coh.split(row, first)

    def regroup(
        self, rows: _Rows, level: IntArray, cols: dict[str, npt.NDArray[Any]],
        scalars: dict[str, Any], now: float,
    ) -> _Cohorts:
        """Rows back to cohorts: neighbouring rows of one class with an equal history merge.

        Only neighbours: a merge across a row with another history would reorder the
        miners, and the per-miner plan gives an entry by miner index.
        """
        n = rows.cls.size
        if not self.aggregate or n < 2:
            return _Cohorts(rows.cls.copy(), rows.weight.copy(), level.copy(), cols, scalars)
        # Compared bit for bit, so that NaN (a clock not running) equals NaN.
        bits = np.ascontiguousarray(self.state_matrix(rows.cls, level, cols, now)).view(
            np.uint64)
        starts = np.flatnonzero(np.concatenate(([True], np.any(bits[1:] != bits[:-1], axis=1))))
        if starts.size == n:
            return _Cohorts(rows.cls.copy(), rows.weight.copy(), level.copy(), cols, scalars)
        weight = np.add.reduceat(rows.weight, starts).astype(np.int64)
        return _Cohorts(
            rows.cls[starts], weight, level[starts], {k: v[starts] for k, v in cols.items()},
            scalars,
        )

    def rel(self, name: str, values: npt.NDArray[Any], now: float) -> npt.NDArray[Any]:
        """Time fields as 'seconds ago', capped at the horizon where they stop mattering."""
        if name not in PolicyState.CLOCKS:
            return values
        # -inf (never) becomes the horizon; NaN (not running) stays NaN.
        return np.minimum(now - np.asarray(values, dtype=np.float64), self.horizon_s)

    def state_matrix(
        self, cls: IntArray, level: IntArray, cols: dict[str, npt.NDArray[Any]], now: float
    ) -> FloatArray:
        n = cls.size
        parts = [cls.reshape(n, 1), level.reshape(n, 1)]
        parts += [self.rel(name, cols[name], now).reshape(n, -1) for name in sorted(cols)]
        return np.hstack(parts, dtype=np.float64)


# -- stateless strategies: one solve() per distinct (price position, cap) ------------------


def _solve_totals(
    eng: _Engine, price: float, *, hp: float, cap_w: float, aux: float, adder: float,
    aux_in_cost: bool, cost_steps: CostSteps | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per-class IT W, TH/s and miners asleep for solve() at one price (or cost steps) and cap.

    Re-solved with the named cohort split until no split is named: each split adds a
    cohort, so this ends (at worst at one cohort per miner).
    """
    coh: _Cohorts | None = eng.initial()
    while coh is not None:
        rows = eng.rows(coh)
        plan = solve(
            rows.fleet, price_usd_per_mwh=price, hashprice_usd_per_ph_day=hp, cap_w=cap_w,
            aux_fraction=aux, min_level=rows.min_level, max_level=rows.max_level,
            adder_usd_per_mwh=adder, aux_in_cost=aux_in_cost, unit_count=rows.unit_count,
            cost_steps=cost_steps,
        )
        coh = eng.split(coh, plan.split)
    level = np.asarray(plan.level, dtype=np.int64)
    return _class_totals(eng, rows.cls, rows.weight, level)


def _class_totals(
    eng: _Engine, cls: IntArray, weight: IntArray, level: IntArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    n_cls = eng.t.classes.n_classes
    w = weight.astype(np.float64)
    it = np.bincount(cls, weights=w * eng.t.points_w[cls, level], minlength=n_cls)
    ths = np.bincount(cls, weights=w * eng.t.points_ths[cls, level], minlength=n_cls)
    asleep = np.bincount(cls, weights=w * (level == 0), minlength=n_cls)
    return it.astype(np.float64), ths.astype(np.float64), asleep.astype(np.float64)


def _position(fleet: PreparedFleet, price: float, *, hp: float, aux: float, adder: float,
              aux_in_cost: bool) -> int:
    """Where a price falls in the optimizer's step order: all solve() sees of it."""
    return position_at_price(
        fleet, price_usd_per_mwh=price, hashprice_usd_per_ph_day=hp, aux_fraction=aux,
        adder_usd_per_mwh=adder, aux_in_cost=aux_in_cost,
    )


# -- the run -------------------------------------------------------------------------------


Progress = Callable[[int, int], None]


def run_backtest(
    cfg: SiteConfig,
    start_s: FloatArray,
    price_usd_per_mwh: FloatArray,
    interval_s: float,
    settings: Settings,
    *,
    windows: Sequence[Window] = (),
    exact: bool = False,
    progress: Progress | None = None,
    with_window_cost: bool = True,
) -> BacktestResult:
    """Run every strategy over a price series and settle each interval at its own price.

    Args:
        cfg: The site: fleet, cap, energy.
        start_s: Interval start times, Unix s, regular.
        price_usd_per_mwh: Market price of each interval.
        interval_s: Interval length, s.
        settings: Hashprice, adder, cap, policy knobs.
        windows: Grid events / peak windows lowering the cap.
        exact: One row per miner and no memo (the reference the fast path is tested against).
        progress: Called with (done, total) intervals now and then.
        with_window_cost: With windows, also run mineops without them to price them.
    """
    started = time.perf_counter()
    start_s = np.asarray(start_s, dtype=np.float64)
    price = np.asarray(price_usd_per_mwh, dtype=np.float64)
    if start_s.shape != price.shape or price.size == 0:
        raise ValueError("start_s and price_usd_per_mwh must be equal, non-empty 1-D arrays")
    planned, clamped = bounded_prices(cfg, price)
    classes = FleetClasses.from_config(cfg)
    headroom = 1.0 - settings.headroom_fraction
    site_cap, grid = window_caps(start_s, interval_s, windows, settings.cap_w)
    cap = site_cap * headroom
    decision_price = np.concatenate([planned[:1], planned[:-1]])

    full = _Table(classes, classes.points_w, classes.points_ths, classes.top)
    sp, sh = classes.stock_points()
    stock = _Table(classes, sp, sh, highest_level(sp, sh).astype(np.int64))
    horizon = _horizon(settings.knobs, classes, interval_s)

    series: dict[str, Series] = {}
    mo, decisions = _run_mineops(
        full, horizon, start_s=start_s, interval_s=interval_s, decision_price=decision_price,
        cap=cap, grid=grid, st=settings, exact=exact, progress=progress)
    series["mineops"] = _settle(mo, price, interval_s, settings)
    stateless = {
        "optimum": (full, price, None),
        "always_on": (stock, np.full(price.size, _LOW_PRICE), None),
        "onoff": (stock, decision_price, None),
        "optimum_onoff": (stock, price, None),
    }
    for name, (table, at, _) in stateless.items():
        eng = _Engine(table, horizon, aggregate=not exact)
        totals = _run_stateless(eng, at, cap, settings)
        series[name] = _settle(totals, price, interval_s, settings)

    no_window: float | None = None
    if windows and with_window_cost and grid.any():
        plain_cap = np.full(price.size, settings.cap_w * headroom)
        nw, _ = _run_mineops(
            full, horizon, start_s=start_s, interval_s=interval_s, decision_price=decision_price,
            cap=plain_cap, grid=np.zeros(price.size, dtype=bool), st=settings, exact=exact,
            progress=None)
        no_window = float(_settle(nw, price, interval_s, settings).profit_usd.sum())

    strike = _strikes(classes, settings)
    return BacktestResult(
        settings=settings, classes=classes, start_s=start_s, interval_s=interval_s,
        price_usd_per_mwh=price, decision_price_usd_per_mwh=decision_price, cap_w=cap,
        grid_window=grid, series=series, strike_usd_per_mwh=strike, decisions=decisions,
        elapsed_s=time.perf_counter() - started, no_window_profit_usd=no_window,
        prices_clamped=clamped, price_bounds_usd_per_mwh=price_bounds(cfg),
    )


def price_bounds(cfg: SiteConfig) -> tuple[float, float]:
    """The site's (floor, cap) in $/MWh, as the backtest bounds prices."""
    b = PriceBounds.of_site(cfg)
    return b.floor_usd_per_mwh, b.cap_usd_per_mwh


def bounded_prices(cfg: SiteConfig, price_usd_per_mwh: FloatArray
                   ) -> tuple[FloatArray, dict[str, int]]:
    """The prices mineops decides on: within the site's `[energy]` floor and cap.

    The daemon's own bounds (`PriceBounds`, as its ingest applies them), so the backtest
    plans with the price the daemon would. Returns the bounded prices, shape as given,
    and how many were clamped to each bound ("cap", "floor").

    Raises:
        PriceBoundsError: a price is NaN, infinite or absurd (beyond 100 times the bounds).
    """
    try:
        planned, clamped = PriceBounds.of_site(cfg).bound_all(price_usd_per_mwh)
    except ValueError as e:
        raise PriceBoundsError(f"prices: {e}") from None
    return planned, {str(bound): n for bound, n in clamped.items()}


def _horizon(knobs: PolicyKnobs, classes: FleetClasses, interval_s: float) -> float:
    """Seconds after which no policy clock can matter: the longest hold, plus margin."""
    return max(hold_durations_s(knobs, classes.wake_s), default=0.0) + 2.0 * interval_s + 1.0


@dataclass
class _Totals:
    it_w: FloatArray
    ths: FloatArray
    asleep: FloatArray


def _run_stateless(eng: _Engine, at: FloatArray, cap: FloatArray, st: Settings) -> _Totals:
    hp, aux, adder = st.hashprice_usd_per_ph_day, st.aux_fraction, st.adder_usd_per_mwh
    pays = st.knobs.aux_in_energy_cost
    base = eng.rows(eng.initial()).fleet
    uniq, inverse = np.unique(np.stack([at, cap], axis=1), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    # solve() sees a price only through its position in the step order: one solve per
    # distinct (position, cap), whatever the number of intervals.
    key_of = [
        (_position(base, float(p), hp=hp, aux=aux, adder=adder, aux_in_cost=pays), float(c))
        for p, c in uniq
    ]
    done: dict[tuple[int, float], tuple[FloatArray, FloatArray, FloatArray]] = {}
    n_cls = eng.t.classes.n_classes
    it, ths, asleep = (np.empty((uniq.shape[0], n_cls)) for _ in range(3))
    for u, key in enumerate(key_of):
        if key not in done:
            done[key] = _solve_totals(eng, float(uniq[u, 0]), hp=hp, cap_w=key[1], aux=aux,
                                      adder=adder, aux_in_cost=pays)
        it[u], ths[u], asleep[u] = done[key]
    return _Totals(it[inverse], ths[inverse], asleep[inverse].sum(axis=1))


def _settle(x: _Totals, price: FloatArray, interval_s: float, st: Settings) -> Series:
    dt_h = interval_s / 3600.0
    it_w = x.it_w.sum(axis=1)
    ths = x.ths.sum(axis=1)
    site_w = it_w * (1.0 + st.aux_fraction)
    energy = site_w * dt_h / 1e6
    paid_mwh = energy if st.knobs.aux_in_energy_cost else it_w * dt_h / 1e6
    cost = (price + st.adder_usd_per_mwh) * paid_mwh
    revenue = ths * usd_per_ths_hour(st.hashprice_usd_per_ph_day) * dt_h
    return Series(
        it_w=it_w, ths=ths, asleep=x.asleep, class_it_w=x.it_w, class_ths=x.ths,
        site_w=site_w, energy_mwh=energy, revenue_usd=revenue, energy_cost_usd=cost,
        profit_usd=revenue - cost,
    )


def _strikes(classes: FleetClasses, st: Settings) -> dict[str, float]:
    """Each model's break-even as a market price (the on/off rule's strike).

    The catalogue's all-in break-even at stock (`MinerModel.breakeven_usd_per_mwh`, the one
    every view shows) less the adders.
    """
    catalogue = load_catalogue()
    return {key: catalogue.get(key).breakeven_usd_per_mwh(
        st.hashprice_usd_per_ph_day, aux_fraction=st.paid_aux_fraction)
        - st.adder_usd_per_mwh for key in dict.fromkeys(classes.model_keys)}


# -- mineops: decide() through time --------------------------------------------------------


def _run_mineops(
    table: _Table, horizon: float, *, start_s: FloatArray, interval_s: float,
    decision_price: FloatArray, cap: FloatArray, grid: npt.NDArray[np.bool_], st: Settings,
    exact: bool, progress: Progress | None, steps: Sequence[CostSteps | None] | None = None,
) -> tuple[_Totals, int]:
    eng = _Engine(table, horizon, aggregate=not exact)
    runner = _Mineops(eng, st, memo=not exact)
    n_int, n_cls = start_s.size, table.classes.n_classes
    it = np.zeros((n_int, n_cls))
    ths = np.zeros((n_int, n_cls))
    asleep = np.zeros(n_int)
    p_w, p_h = table.points_w, table.points_ths
    step = max(n_int // 200, 1)
    for t in range(n_int):
        t0 = float(start_s[t])
        t1 = t0 + interval_s
        now = t0
        for _ in range(_MAX_EVENTS):
            runner.step(float(decision_price[t]), float(cap[t]), bool(grid[t]), now,
                        None if steps is None else steps[t])
            nxt = runner.next_event(now, t1)
            frac = ((nxt if nxt is not None else t1) - now) / interval_s
            coh = runner.coh
            w = coh.weight * frac
            it[t] += np.bincount(coh.cls, weights=w * p_w[coh.cls, coh.level], minlength=n_cls)
            ths[t] += np.bincount(coh.cls, weights=w * p_h[coh.cls, coh.level], minlength=n_cls)
            asleep[t] += float(w[coh.level == 0].sum())
            if nxt is None:
                break
            now = nxt
        if progress is not None and (t % step == 0 or t == n_int - 1):
            progress(t + 1, n_int)
    return _Totals(it, ths, asleep), runner.decisions


class _Mineops:
    """The policy's memory, kept per cohort, and decide() with cap-cut refinement."""

    def __init__(self, eng: _Engine, st: Settings, *, memo: bool) -> None:
        self.eng, self.st = eng, st
        coh = eng.initial()
        rows = eng.rows(coh)
        # As the daemon starts: every miner assumed at full power, no holds.
        state = PolicyState.initial(rows.cls.size, rows.fleet.max_level)
        cols, scalars = _state_parts(state)
        self.memo_ok = memo and all(_hashable(v) for v in scalars.values())
        self.coh = eng.regroup(rows, np.asarray(state.level, dtype=np.int64), cols, scalars,
                               0.0)
        self.band = st.knobs.hysteresis_usd_per_mwh
        self.memo: dict[tuple[Any, ...], tuple[_Cohorts, float]] = {}
        self.decisions = 0

    def market(self, price: float, cap_w: float, grid: bool,
               steps: CostSteps | None = None) -> MarketInputs:
        st = self.st
        return MarketInputs(
            price_usd_per_mwh=price, hashprice_usd_per_ph_day=st.hashprice_usd_per_ph_day,
            cap_w=cap_w, aux_fraction=st.aux_fraction, cap_is_grid=grid,
            adder_usd_per_mwh=st.adder_usd_per_mwh, cost_steps=steps,
        )

    def step(self, price: float, cap_w: float, grid: bool, now: float,
             steps: CostSteps | None = None) -> None:
        key: tuple[Any, ...] | None = None
        if self.memo_ok:
            key = self._key(price, cap_w, grid, now)
            if steps is not None:  # a campus: the steps are the price
                key += (steps.upper_w.tobytes(), steps.price_usd_per_mwh.tobytes())
            hit = self.memo.get(key)
            if hit is not None:
                self.coh = self._restore(hit[0], now)
                return
        self.coh = self._decide(price, cap_w, grid, now, steps)
        if key is not None:
            if len(self.memo) > _MEMO_LIMIT:
                self.memo.clear()
            self.memo[key] = (self._relative(self.coh, now), now)

    def _key(self, price: float, cap_w: float, grid: bool, now: float) -> tuple[Any, ...]:
        coh, eng, st = self.coh, self.eng, self.st
        fleet = eng.rows(coh).fleet
        pos = tuple(
            _position(fleet, price + d, hp=st.hashprice_usd_per_ph_day, aux=st.aux_fraction,
                      adder=st.adder_usd_per_mwh, aux_in_cost=st.knobs.aux_in_energy_cost)
            for d in (0.0, self.band, -self.band)
        )
        m = eng.state_matrix(coh.cls, coh.level, coh.cols, now)
        scal = tuple((k, float(eng.rel(k, np.asarray(v, dtype=np.float64), now)))
                     for k, v in sorted(coh.scalars.items()))
        return (coh.weight.tobytes(), m.tobytes(), pos, cap_w, grid, scal)

    def _relative(self, coh: _Cohorts, now: float) -> _Cohorts:
        rel = self.eng.rel
        return _Cohorts(
            coh.cls, coh.weight, coh.level, {k: rel(k, v, now) for k, v in coh.cols.items()},
            {k: rel(k, np.asarray(v, dtype=np.float64), now) for k, v in coh.scalars.items()},
        )

    def _restore(self, coh: _Cohorts, now: float) -> _Cohorts:
        clocks = PolicyState.CLOCKS
        scalars = {k: now - float(v) if k in clocks else float(v)
                   for k, v in coh.scalars.items()}
        cols = {k: now - v if k in clocks else v.copy() for k, v in coh.cols.items()}
        return _Cohorts(coh.cls, coh.weight, coh.level, cols, scalars)

    def _decide(self, price: float, cap_w: float, grid: bool, now: float,
                steps: CostSteps | None = None) -> _Cohorts:
        eng = self.eng
        market = self.market(price, cap_w, grid, steps)
        coh: _Cohorts | None = self.coh
        while coh is not None:  # ends: each split adds a cohort (see _solve_totals)
            rows = eng.rows(coh)
            fields: dict[str, Any] = {k: v.copy() for k, v in coh.cols.items()}
            state = PolicyState(**fields, **coh.scalars)
            d = decide(
                rows.fleet, market,
                MinerInputs(stale=rows.stale, never_curtail=rows.never_curtail,
                            priority=rows.priority, wake_s=rows.wake_s,
                            unit_count=rows.unit_count),
                state, self.st.knobs, now_s=now,
            )
            self.decisions += 1
            coh = eng.split(coh, d.split)
        cols, scalars = _state_parts(state)
        return eng.regroup(rows, np.asarray(d.level, dtype=np.int64), cols, scalars, now)

    def next_event(self, now: float, end: float) -> float | None:
        """Earliest time inside (now, end) when a policy hold ends, as a tick would see it."""
        coh = self.coh
        parts: dict[str, Any] = {**coh.cols, **coh.scalars}
        state = PolicyState(**parts)
        ends = hold_ends_s(state, self.st.knobs, self.eng.t.classes.wake_s[coh.cls]).ravel()
        with np.errstate(invalid="ignore"):
            inside = ends[(ends > now + 1e-6) & (ends < end - 1e-6)]
        return float(inside.min()) if inside.size else None


def _state_parts(state: PolicyState) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    """The policy's memory as per-miner columns and site-wide scalars (its own contract)."""
    cols = {name: getattr(state, name) for name in PolicyState.PER_MINER}
    scalars = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
               if f.name not in PolicyState.PER_MINER}
    return cols, scalars


def _hashable(v: Any) -> bool:
    return isinstance(v, int | float | bool | np.floating | np.integer)

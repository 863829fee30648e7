"""Curtailment optimizer: a pure function from fleet arrays and prices to per-miner levels.

Maximise ``sum_i v*h_i(p_i) - c*p_i`` subject to ``sum_i p_i*(1+aux) <= cap`` over each
miner's operating points (level 0 = sleep). No I/O, no clock, no config reads.

How it works (and why it is exact and fast):

* Miners with the same operating points are one *kind* (a catalogue model, or a model
  under one firmware's presets): a site of 300,000 miners has a handful. Everything
  that depends on the points is prepared once per kind by :func:`prepare`; a decision
  is a few passes over per-miner vectors (bounds, levels: one small integer each)
  plus searches in the small per-kind arrays, and allocates nothing of size miners x
  levels. (A fleet whose every miner has its own curve has as many kinds as miners:
  then the per-kind arrays are that size, and a decision costs what the per-miner
  design did.)
* Each miner's choice is a chain of *entries*: one "wake" chord from sleep to the
  hull vertex the sleep point sees best (``wake_level``), then one entry per
  firmware step along its concave curve. The slope of an entry (extra TH/s per
  extra W) does not depend on the price, so :func:`prepare` sorts the entries of
  every kind once, by descending slope. Points below the upper concave hull of a
  miner's points (sleep included) are never optimal for a price on power, which
  is why the sleep->min_w jump is a single chord and not a step. A step's slope is
  taken no higher than the step before it nor than the wake chord it follows (true
  of exact concave points; it absorbs rounding), so a miner's entries keep their
  chain order.
* A price threshold ``t = c / v`` becomes a *position* ``r`` in that order
  (``np.searchsorted``): every entry before ``r`` is worth taking. A kind's level at
  ``r`` is a count of its steps before ``r``, and a miner's is that count clipped to
  its bounds, so the unconstrained optimum needs no sort and no iteration.
* When the cap binds, entries are taken by priority class (higher first), then
  descending slope, then miner index, while they fit. Per-class totals and one
  cumulative sum over the kinds' entries (by blocks when the order is long) find the
  entry where the cap cuts; the first miners of that entry that fit take it. What is
  left of the budget then goes, in the same order, to every later entry that still
  fits (another kind's wake-up, a step of a smaller model, a lower priority); a miner
  whose entry does not fit takes nothing more, except that one whose wake chord does
  not fit wakes at the most profitable level below its hull vertex that fits. Only the
  entries the leftover can still pay for are visited.

Exactness: everything before the cut is the LP optimum rounded down at one entry and
the fill only adds to it, so the plan is within one entry's objective value of the
best combination of points: one firmware step, or one wake-up where the cap cuts at a
wake chord; and no miner could move up a level within the cap and earn more. (One
firmware step whatever the points would be a knapsack problem: two miners that do not
both fit are the counterexample.) Unconstrained, the plan is exact. The planned power
never exceeds the cap.

Bounds per miner (``min_level``/``max_level``) come from policy. Ties between entries
of equal slope go to the wake chord first, then the lower level, then the kind whose
first miner comes first, then the lower miner index, so plans are deterministic.

Rows of several miners (``prepare(unit_count=...)``, the backtest's cohorts of identical
miners with one history): a row is its miners in a block, one kind with every other
row of the same points whatever its count, so the order above is the per-miner order
of the miners row after row. Sums are of count times W, as the per-miner search sums
count times W; a row takes an entry whole or not at all, and the first row the
per-miner plan would take only in part is named in :attr:`Plan.split`.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.protocol.reasons import Reason
from controller.units import usd_per_ths_hour, usd_per_wh

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
LevelArray = npt.NDArray[np.int16]
BoolArray = npt.NDArray[np.bool_]
PosArray = npt.NDArray[np.signedinteger[Any]]
LEVEL = np.int16  # levels are column indices: a few dozen, one small integer per miner

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the exact row hash
_SHAVES = 8  # searches before a plan that rounding keeps over the cap falls back to minima
_BLOCK = 4096  # entries summed at once when a class's order is long


@dataclass(frozen=True, slots=True)
class PreparedFleet:
    """The miners' kinds and the order of their kinds' entries, built once.

    Kind tables are (K, ...) for K kinds, level columns as in :func:`prepare` (column
    0 = sleep, rows padded by repeating their last point). The positions index the
    order of all the kinds' entries (M of them) by descending slope. Built by
    :func:`prepare`; treat every array as read-only.
    """

    kind: IntArray  # (n,) kind of each miner
    row: IntArray  # (n,) kind * k: the miner's row in the flattened (K, k) tables
    chord_row: IntArray  # (n,) kind * (k - 1): its row in the flattened (K, k - 1) tables
    top: LevelArray  # (n,) highest real level: first column of the repeated tail
    top_chord_idx: IntArray  # (n,) chord_row + top - 1: the wake chord of an unbounded miner
    top_wake: LevelArray  # (n,) the level it wakes to
    top_chord_pos: PosArray  # (n,) that chord's position in the order
    runs_kind: IntArray  # kinds of the runs of equal kinds, in miner order
    runs_len: IntArray  # and their lengths (a rack is one run)
    kind_power_w: FloatArray  # (K, k) W per level
    kind_hashrate_ths: FloatArray  # (K, k) TH/s per level
    kind_top: IntArray  # (K,) highest real level
    wake_level: LevelArray  # (K, k - 1): level woken to when the max level is f + 1
    wake_w: FloatArray  # (K, k - 1): W of that wake chord (one miner)
    chord_pos: PosArray  # (K, k - 1): its position in the order
    step_w: FloatArray  # (K, k - 2): W of the step from level e + 1 to e + 2
    curve_pos: PosArray  # (K, k - 2): its position in the order
    neg_slope: FloatArray  # (M,) -slope by position (ascending, for searchsorted)
    entry_kind: IntArray  # (M,) kind of the entry at each position
    entry_level: IntArray  # (M,) a step's lower level e + 1; a chord's -(f + 1)
    entry_w: FloatArray  # (M,) W of the entry for one miner
    min_entry_w: float  # the smallest W any entry or wake-up takes: less is left over
    wakes_below_vertex: bool  # some kind's best wake-up is above its first level
    # (n,) identical miners each row stands for (the backtest's cohorts), or None: one.
    # Rows of one kind are then still one kind, taken in row order like miners.
    units: FloatArray | None = None

    @property
    def n(self) -> int:
        """How many miners (rows)."""
        return int(self.kind.size)

    @property
    def k(self) -> int:
        """Levels per kind, sleep and padding included (the tables' width)."""
        return int(self.kind_power_w.shape[1])

    @property
    def kinds(self) -> int:
        """How many kinds (distinct operating-point tables), K."""
        return int(self.kind_power_w.shape[0])

    @property
    def max_level(self) -> IntArray:
        """Highest real level per miner (padding columns are never reported)."""
        return self.top.astype(np.intp)

    @property
    def nbytes(self) -> int:
        """Memory held by the prepared fleet, in bytes."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return sum(v.nbytes for v in values if isinstance(v, np.ndarray))

    def position(self, threshold_ths_per_w: float) -> int:
        """Number of entries whose slope is above a threshold (TH/s per W)."""
        return int(np.searchsorted(self.neg_slope, -threshold_ths_per_w, side="left"))

    def per_miner(self, per_kind: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """A (K,) per-kind array as (n,) per miner: one copy per run of equal kinds."""
        if self.runs_len.size * 8 <= self.n:
            return np.repeat(per_kind[self.runs_kind], self.runs_len)
        out: npt.NDArray[Any] = per_kind.take(self.kind)
        return out

    def power_at(self, level: npt.NDArray[np.integer]) -> FloatArray:
        """W of every row at the given levels (n,): all the miners it stands for."""
        out: FloatArray = self.kind_power_w.ravel().take(self.row + level)
        return out if self.units is None else out * self.units

    def hashrate_at(self, level: npt.NDArray[np.integer]) -> FloatArray:
        """TH/s of every row at the given levels (n,): all the miners it stands for."""
        out: FloatArray = self.kind_hashrate_ths.ravel().take(self.row + level)
        return out if self.units is None else out * self.units

    def points(self) -> tuple[FloatArray, FloatArray]:
        """The (n, k) operating points of one miner of each row, W and TH/s (allocates)."""
        return self.kind_power_w[self.kind], self.kind_hashrate_ths[self.kind]


@dataclass(frozen=True, slots=True)
class Plan:
    """Optimizer output: a level (column index) and power per miner, with reasons."""

    level: LevelArray
    power_w: FloatArray
    hashrate_ths: FloatArray
    reason: npt.NDArray[np.uint8]
    site_power_w: float  # including auxiliary load
    cap_binding: bool
    # Shadow price of site power when the cap binds ($/MWh of site energy): what one
    # more MWh under the cap would earn. 0 when the cap does not bind.
    multiplier_usd_per_mwh: float = 0.0
    # Even every miner at its minimum allowed level exceeds the cap (pinned miners):
    # everything else sleeps and the plan is that minimum.
    infeasible: bool = False
    floor_binding: bool = False  # held up by floor_w (ramp-down limit)
    econ_level: LevelArray | None = None  # best level at this price, bounds but no cap/floor
    # With unit counts (prepare(unit_count=...)): (row, miners) for the first row whose
    # miners the per-miner plan would not treat alike: its first `miners` (1 <= miners
    # < its count) would take an entry (or a lower wake-up, or a floor's step) that the
    # rest would not. The plan is the per-miner one, in row order, only without a split.
    split: tuple[int, int] | None = None


# -- preparing ------------------------------------------------------------------------------


def _strictly_concave_slopes(p: FloatArray, h: FloatArray, top: IntArray) -> FloatArray:
    """Slopes of each curve step, replaced by the slope of its upper-hull segment.

    Catalogue curves are concave already (the catalogue validates that); this only
    makes arbitrary input safe. Padding steps get -inf so they sort last.
    """
    k = p.shape[1]
    kc = max(k - 2, 0)
    dp = p[:, 2:] - p[:, 1:-1]
    dh = h[:, 2:] - h[:, 1:-1]
    e = np.arange(kc)
    real = e[None, :] < (top - 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(real, dh / np.where(real, dp, 1.0), -np.inf)
    if kc < 2:
        return slope
    with np.errstate(invalid="ignore"):
        viol = np.any(np.diff(slope, axis=1) > 1e-12 * np.abs(slope[:, 1:]), axis=1)
    viol &= np.all(np.isfinite(slope) | ~real, axis=1)
    rows = np.flatnonzero(viol)
    if rows.size == 0:
        return slope
    # Antitonic regression by the min-max formula: the hull slope over step e is
    # min over a <= e of max over b >= e of the chord slope from point a to b+1.
    pc, hc = p[rows, 1:], h[rows, 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        chord = (hc[:, None, :] - hc[:, :, None]) / (pc[:, None, :] - pc[:, :, None])
    # chord[r, a, b+1] is the slope from point a to point b+1 (points 0-based on the curve)
    c = chord[:, :-1, 1:]  # (r, a, b) for steps a..b
    a_idx, b_idx = np.arange(kc)[:, None], np.arange(kc)[None, :]
    valid = (a_idx <= b_idx)[None] & (b_idx[None] < (top[rows] - 1)[:, None, None])
    c = np.where(valid, c, -np.inf)
    out = np.empty((rows.size, kc))
    for step in range(kc):  # loop over the few steps, vectorised over miners
        inner = c[:, : step + 1, step:].max(axis=2)  # max over b >= step, per a <= step
        out[:, step] = inner.min(axis=1)
    slope[rows] = np.where(real[rows], out, -np.inf)
    return slope


def _checked_points(power_w: FloatArray, hashrate_ths: FloatArray) -> tuple[FloatArray, FloatArray]:
    p = np.ascontiguousarray(power_w, dtype=np.float64)
    h = np.ascontiguousarray(hashrate_ths, dtype=np.float64)
    if p.shape != h.shape or p.ndim != 2 or p.shape[1] < 1 or p.shape[0] < 1:
        raise ValueError("power_w and hashrate_ths must be equal (n, k) arrays, n, k >= 1")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(h))):
        raise ValueError("operating points must be finite")
    return p, h


def _kinds(p: FloatArray, h: FloatArray) -> tuple[IntArray, IntArray]:
    """Kind of every row (equal points, equal kind), numbered by first row; first rows.

    Rows are hashed exactly (their bits, mixed as integers, a column at a time), grouped
    by hash, then compared with their group's first row; a collision falls back to
    sorting whole rows.
    """
    key = np.zeros(p.shape[0], dtype=np.uint64)
    for col in (*p.T, *h.T):  # a few dozen columns, vectorised over rows
        key = (key ^ col.view(np.uint64)) * _MIX
        key ^= key >> np.uint64(29)
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    rep = first[inv.ravel()]
    if not all(np.array_equal(col, col[rep]) for col in (*p.T, *h.T)):
        rows = np.hstack([p, h])
        _, first, inv = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    kind: IntArray = rank[inv.ravel()].astype(np.intp)
    return kind, first[order].astype(np.intp)


def _runs(kind: IntArray) -> tuple[IntArray, IntArray]:
    starts = np.flatnonzero(np.concatenate([[True], kind[1:] != kind[:-1]]))
    lengths = np.diff(np.concatenate([starts, [kind.size]]))
    return kind[starts].astype(np.intp), lengths.astype(np.intp)


def _wake_chords(p: FloatArray, h: FloatArray, top: IntArray) -> tuple[FloatArray, IntArray]:
    """Per row and max level f+1: slope of the best chord from sleep, and its level.

    The best is the steepest; among equals the lowest level. Chords to a max level
    above the row's top are -inf (no miner has them).
    """
    kf = p.shape[1] - 1
    cols = np.arange(kf)
    real = cols[None, :] < top[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        avg = (h[:, 1:] - h[:, :1]) / (p[:, 1:] - p[:, :1])
    avg = np.where(real, avg, -np.inf)
    avg = np.where(np.isnan(avg), -np.inf, avg)
    slope = np.maximum.accumulate(avg, axis=1)
    newmax = np.zeros(avg.shape, dtype=bool)
    newmax[:, 0] = True
    newmax[:, 1:] = avg[:, 1:] > slope[:, :-1]
    wake = np.maximum.accumulate(np.where(newmax, cols, 0), axis=1) + 1
    return np.where(real, slope, -np.inf), wake.astype(np.intp)


def _chain_slopes(curve: FloatArray, chord: FloatArray, wake: IntArray) -> FloatArray:
    """Step slopes never above the chord they follow, nor above the step before them.

    True of exact concave points already; this keeps each miner's entries in chain
    order in the sorted order when rounding makes equal slopes differ in the last bit
    (steps inside one linear segment of a catalogue curve), or the input is odd.
    """
    kc = curve.shape[1]
    if kc == 0:
        return curve
    # Step e follows wake chord f = e+1 exactly when that chord wakes at or below e+1;
    # the later chords are no flatter (max-accumulated), so that one bounds it.
    follows = wake[:, 1 : kc + 1] <= np.arange(1, kc + 1)[None, :]
    bounded = np.where(follows, np.minimum(curve, chord[:, 1 : kc + 1]), curve)
    out: FloatArray = np.minimum.accumulate(np.where(np.isnan(bounded), -np.inf, bounded), axis=1)
    return out


def highest_level(power_w: FloatArray, hashrate_ths: FloatArray) -> IntArray:
    """Highest real level of each row of (n, k) points: the first column of its repeated tail.

    Rows with fewer points than k repeat their last point (see PreparedFleet); the padding
    columns are never a level of their own.
    """
    same = (power_w == power_w[:, -1:]) & (hashrate_ths == hashrate_ths[:, -1:])
    top: IntArray = np.argmax(same, axis=1).astype(np.intp)
    return top


def prepare(power_w: FloatArray, hashrate_ths: FloatArray, *,
            unit_count: npt.NDArray[np.integer] | None = None) -> PreparedFleet:
    """Validate the operating points, find the kinds and order their entries.

    Args:
        power_w: (n, k) W per level of one miner; column 0 is sleep, then strictly
            ascending power targets; shorter rows repeat their last point to width k.
        hashrate_ths: (n, k) TH/s at those levels (0 or more at sleep).
        unit_count: (n,) integers >= 1 when each row stands for that many identical
            miners (the backtest's cohorts of miners with one history); None: one
            miner a row. Rows with equal points are one kind whatever their counts, so
            the plan is the per-miner plan of the miners in row order, as long as no
            row is left part-way through an entry (:attr:`Plan.split` names the first).

    Returns:
        The prepared fleet; rebuild it only when the fleet or its points change.

    Raises:
        ValueError: shapes differ, a value is not finite, power does not ascend
            before the padding, or a unit count is not a positive integer per row.
    """
    p_all, h_all = _checked_points(power_w, hashrate_ths)
    units = None if unit_count is None else _checked_units(unit_count, p_all.shape[0])
    kind, first = _kinds(p_all, h_all)
    p, h = p_all[first], h_all[first]
    n_kinds, k = p.shape
    top = highest_level(p, h)
    real = np.arange(k)[None, :] <= top[:, None]
    if k > 1 and np.any((np.diff(p, axis=1) <= 0) & real[:, 1:]):
        raise ValueError("power must be strictly ascending from sleep up to the last point")
    kf, kc = k - 1, max(k - 2, 0)
    chord_slope, wake = _wake_chords(p, h, top) if kf else (np.empty((n_kinds, 0)),
                                                            np.empty((n_kinds, 0), np.intp))
    curve_slope = _chain_slopes(_strictly_concave_slopes(p, h, top), chord_slope, wake)
    rows = np.arange(n_kinds)
    wake_w = p[rows[:, None], wake] - p[:, :1] if kf else np.empty((n_kinds, 0))
    step_w = p[:, 2:] - p[:, 1:-1] if kc else np.empty((n_kinds, 0))
    o = _entry_order(chord_slope, curve_slope, wake_w, step_w)
    usable = np.concatenate([wake_w[wake_w > 0], step_w[step_w > 0],
                             (p[:, 1:] - p[:, :1])[real[:, 1:]]])
    runs_kind, runs_len = _runs(kind)
    top_chord = (rows * max(kf, 1) + np.maximum(top, 1) - 1)[kind]
    return PreparedFleet(
        kind=kind,
        row=kind * k,
        chord_row=kind * max(kf, 1),
        top=top[kind].astype(LEVEL),
        top_chord_idx=top_chord,
        top_wake=(wake.ravel()[top_chord] if kf else np.zeros(kind.size)).astype(LEVEL),
        top_chord_pos=(o.chord_pos.ravel()[top_chord] if kf
                       else np.zeros(kind.size, o.chord_pos.dtype)),
        runs_kind=runs_kind,
        runs_len=runs_len,
        kind_power_w=p,
        kind_hashrate_ths=h,
        kind_top=top,
        wake_level=np.ascontiguousarray(wake, dtype=LEVEL),
        wake_w=np.ascontiguousarray(wake_w),
        chord_pos=np.ascontiguousarray(o.chord_pos),
        step_w=np.ascontiguousarray(step_w),
        curve_pos=np.ascontiguousarray(o.curve_pos),
        neg_slope=o.neg_slope,
        entry_kind=o.entry_kind,
        entry_level=o.entry_level,
        entry_w=o.entry_w,
        min_entry_w=float(usable.min(initial=math.inf)),
        wakes_below_vertex=bool(kf and np.any((wake >= 2) & (np.arange(kf) < top[:, None]))),
        units=units,
    )


@dataclass(frozen=True, slots=True)
class _Order:
    """Every kind's entries in descending slope order: PreparedFleet's fields of that name."""

    chord_pos: PosArray  # (K, k - 1)
    curve_pos: PosArray  # (K, k - 2)
    neg_slope: FloatArray  # (M,)
    entry_kind: IntArray  # (M,)
    entry_level: IntArray  # (M,)
    entry_w: FloatArray  # (M,)


def _entry_order(chord_slope: FloatArray, curve_slope: FloatArray, wake_w: FloatArray,
                 step_w: FloatArray) -> _Order:
    """The wake chords (K, k - 1) and curve steps (K, k - 2) of K kinds, by slope."""
    n_kinds, kf = chord_slope.shape
    kc = curve_slope.shape[1]
    # Entry ids are level-major: chord (f, kind) -> f*K + kind, step (e, kind) ->
    # K*kf + e*K + kind. A stable sort then breaks slope ties chord first, then by
    # level, then by kind.
    keys = np.concatenate([chord_slope.T.ravel(), curve_slope.T.ravel()])
    total = keys.size
    pos_dtype = np.int32 if total < 2**31 - 1 else np.int64
    order = np.argsort(-keys, kind="stable")
    pos: PosArray = np.empty(total, dtype=pos_dtype)
    pos[order] = np.arange(total, dtype=pos_dtype)
    is_chord = order < n_kinds * kf
    step_id = order - n_kinds * kf
    entry_kind = np.where(is_chord, order % max(n_kinds, 1), step_id % max(n_kinds, 1))
    entry_level = np.where(is_chord, -(order // max(n_kinds, 1)) - 1, step_id // n_kinds + 1)
    entry_w = np.where(is_chord, wake_w.T.ravel()[np.where(is_chord, order, 0)],
                       step_w.T.ravel()[np.where(is_chord, 0, step_id)] if kc else 0.0)
    return _Order(
        chord_pos=pos[: n_kinds * kf].reshape(kf, n_kinds).T,
        curve_pos=pos[n_kinds * kf :].reshape(kc, n_kinds).T,
        neg_slope=-keys[order],
        entry_kind=entry_kind.astype(np.intp),
        entry_level=entry_level.astype(np.intp),
        entry_w=entry_w.astype(np.float64),
    )


def _checked_units(unit_count: npt.NDArray[np.integer], n: int) -> FloatArray:
    u = np.asarray(unit_count)
    if u.shape != (n,) or not np.all(u >= 1) or not np.all(np.floor(u) == u):
        raise ValueError("unit_count must be (n,) whole numbers >= 1, one per row")
    return u.astype(np.float64)


# -- prices -----------------------------------------------------------------------------------


def energy_cost_usd_per_mwh_it(
    price_usd_per_mwh: float,
    *,
    aux_fraction: float = 0.0,
    adder_usd_per_mwh: float = 0.0,
    aux_in_cost: bool = True,
) -> float:
    """Cost of one MWh of IT (miner) energy: price plus adders, with its cooling share."""
    return (price_usd_per_mwh + adder_usd_per_mwh) * ((1.0 + aux_fraction) if aux_in_cost else 1.0)


def threshold_ths_per_w(cost_usd_per_mwh_it: float, hashprice_usd_per_ph_day: float) -> float:
    """Marginal TH/s per W a step must beat to pay for its energy."""
    value = usd_per_ths_hour(hashprice_usd_per_ph_day)
    cost = usd_per_wh(cost_usd_per_mwh_it)
    if value <= 0.0:
        # Hashrate worthless: run only if power itself pays (negative price).
        return -np.inf if cost < 0 else np.inf
    return cost / value


def position_at_price(
    fleet: PreparedFleet,
    *,
    price_usd_per_mwh: float,
    hashprice_usd_per_ph_day: float,
    aux_fraction: float = 0.0,
    adder_usd_per_mwh: float = 0.0,
    aux_in_cost: bool = True,
) -> int:
    """Position in the prepared order up to which every step pays at this price."""
    cost = energy_cost_usd_per_mwh_it(
        price_usd_per_mwh,
        aux_fraction=aux_fraction,
        adder_usd_per_mwh=adder_usd_per_mwh,
        aux_in_cost=aux_in_cost,
    )
    return fleet.position(threshold_ths_per_w(cost, hashprice_usd_per_ph_day))


@dataclass(frozen=True, slots=True)
class _Economics:
    """What one decision's prices make of the entries."""

    value: float  # $ per TH/s-hour
    cost: float  # $ per IT Wh
    threshold: float  # TH/s per W an entry must beat
    r0: int  # entries before this position pay


def _economics(fleet: PreparedFleet, price_usd_per_mwh: float, hashprice_usd_per_ph_day: float,
               *, aux_fraction: float, adder_usd_per_mwh: float, aux_in_cost: bool) -> _Economics:
    cost = energy_cost_usd_per_mwh_it(
        price_usd_per_mwh, aux_fraction=aux_fraction, adder_usd_per_mwh=adder_usd_per_mwh,
        aux_in_cost=aux_in_cost,
    )
    t = threshold_ths_per_w(cost, hashprice_usd_per_ph_day)
    return _Economics(usd_per_ths_hour(hashprice_usd_per_ph_day), usd_per_wh(cost), t,
                      fleet.position(t))


# -- bounds and levels --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bounds:
    """Per-decision view of each miner's chain under its level bounds (all (n,))."""

    lo: LevelArray
    hi: LevelArray
    start: LevelArray  # first level whose outgoing step is an entry (when awake)
    has_chord: BoolArray  # may sleep and may run: the wake chord is an entry
    chord_pos: PosArray  # position of that chord (meaningful where has_chord)
    chord_idx: IntArray  # its index in the flattened (K, k - 1) chord tables


def make_bounds(
    fleet: PreparedFleet,
    min_level: npt.NDArray[np.integer] | None,
    max_level: npt.NDArray[np.integer] | None,
) -> Bounds:
    """Per-decision view of each miner's steps under level bounds (reuse it across calls).

    A minimum above a maximum yields to the maximum (thermal limits are safety).
    """
    top = fleet.top
    hi = top if max_level is None else np.minimum(_levels(max_level), top)
    lo = np.zeros(fleet.n, LEVEL) if min_level is None else np.minimum(_levels(min_level), hi)
    has_chord = (lo == 0) & (hi >= 1)
    # Most miners may run to their top level: their chord is prepared; look up the rest.
    chord_idx, wake = fleet.top_chord_idx.copy(), fleet.top_wake.copy()
    chord_pos = fleet.top_chord_pos.copy()
    lower = np.flatnonzero(hi != top)
    if lower.size and fleet.k > 1:
        idx = fleet.chord_row[lower] + np.maximum(hi[lower], 1) - 1
        chord_idx[lower] = idx
        wake[lower] = fleet.wake_level.ravel().take(idx)
        chord_pos[lower] = fleet.chord_pos.ravel().take(idx)
    start = lo + (np.minimum(wake, hi) - lo) * has_chord
    return Bounds(lo, hi, start, has_chord, chord_pos, chord_idx)


def _levels(level: npt.NDArray[np.integer]) -> LevelArray:
    """Levels as the decision's small integers, negative ones as 0."""
    a = np.asarray(level)
    if a.dtype != LEVEL:
        a = np.clip(a, 0, np.iinfo(LEVEL).max).astype(LEVEL)
    out: LevelArray = np.maximum(a, LEVEL(0))
    return out


def levels_at(fleet: PreparedFleet, b: Bounds, r: int) -> LevelArray:
    """Level of every miner when exactly the entries before position r are taken."""
    taken = np.count_nonzero(fleet.curve_pos < r, axis=1).astype(LEVEL)
    run = np.minimum(np.maximum(fleet.per_miner(taken) + LEVEL(1), b.start), b.hi)
    awake = ~b.has_chord | (b.chord_pos < r)
    out: LevelArray = b.lo + (run - b.lo) * awake
    return out


def plan_at(fleet: PreparedFleet, level: npt.NDArray[np.integer], *,
            aux_fraction: float = 0.0, power_w: FloatArray | None = None) -> Plan:
    """A plan of given levels that the cap does not bind (all reasons PROFIT).

    power_w: ``fleet.power_at(level)`` when the caller has it already.
    """
    lv = np.asarray(level, dtype=LEVEL)
    pw = fleet.power_at(lv) if power_w is None else power_w
    return Plan(
        level=lv,
        power_w=pw,
        hashrate_ths=fleet.hashrate_at(lv),
        reason=np.zeros(fleet.n, dtype=np.uint8),
        site_power_w=float(pw.sum()) * (1.0 + aux_fraction),
        cap_binding=False,
        econ_level=lv,
    )


# -- the search under a cap or a floor ------------------------------------------------------------


def _classes(priority: npt.NDArray[np.integer] | None, n: int) -> tuple[IntArray, int]:
    """Dense class per miner, 0 = the highest priority present; and the number of classes."""
    if priority is None or np.size(priority) == 0:
        return np.zeros(n, dtype=np.intp), 1
    prio = np.asarray(priority)
    top, low = int(prio.max()), int(prio.min())
    if top == low:
        return np.zeros(n, dtype=np.intp), 1
    if top - low < 1024:
        below = (top - prio).astype(np.intp)
        present = np.bincount(below, minlength=top - low + 1) > 0
        rank = np.cumsum(present) - 1
        return rank.take(below), int(present.sum())
    values, inverse = np.unique(-prio.astype(np.int64), return_inverse=True)
    return inverse.ravel().astype(np.intp), int(values.size)


@dataclass(frozen=True, slots=True)
class _Context:
    """One decision's fixed inputs to the search: fleet, bounds, classes, prices."""

    fleet: PreparedFleet
    b: Bounds
    eco: _Economics
    econ: LevelArray  # levels at the price, bounds only
    cls: IntArray  # (n,) dense priority class, 0 first
    n_cls: int
    econ_w: FloatArray  # (n,) W at the economic levels

    @property
    def units(self) -> FloatArray | None:
        """(n,) identical miners per row, or None (one each)."""
        return self.fleet.units

    def in_class(self, c: int) -> IntArray | slice:
        """The miners of class c, in order (all of them when there is one class)."""
        return slice(None) if self.n_cls == 1 else np.flatnonzero(self.cls == c)

    def class_totals(self, upper_w: FloatArray, lower_w: FloatArray) -> FloatArray:
        """(classes,) W between two per-miner powers, summed by class."""
        if self.n_cls == 1:
            return np.array([float(upper_w.sum() - lower_w.sum())])
        out = np.bincount(self.cls, weights=upper_w - lower_w, minlength=self.n_cls)
        return out.astype(np.float64, copy=False)


@dataclass(frozen=True, slots=True)
class _ClassWeights:
    """W one class's miners take at each entry of each kind; positions looked up as needed."""

    fleet: PreparedFleet
    steps: FloatArray  # (K, k - 2)
    chords: FloatArray  # (K, k - 1)

    def between(self, start: int, stop: int) -> FloatArray:
        """W at positions start..stop-1 of the order, in order."""
        fleet = self.fleet
        kind, lv = fleet.entry_kind[start:stop], fleet.entry_level[start:stop]
        step = lv >= 1
        out = np.zeros(lv.size)
        if self.steps.size:
            idx = np.where(step, kind * (fleet.k - 2) + lv - 1, 0)
            out += step * self.steps.ravel().take(idx)
        if self.chords.size:
            idx = np.where(step, 0, kind * (fleet.k - 1) - lv - 1)
            out += ~step * self.chords.ravel().take(idx)
        return out

    def block_sums(self) -> FloatArray:
        """W per block of _BLOCK positions (the last block partly past the order's end)."""
        fleet = self.fleet
        blocks = fleet.neg_slope.size // _BLOCK + 1
        out = np.bincount(fleet.curve_pos.ravel() // _BLOCK, weights=self.steps.ravel(),
                          minlength=blocks)
        out += np.bincount(fleet.chord_pos.ravel() // _BLOCK, weights=self.chords.ravel(),
                           minlength=blocks)
        return out.astype(np.float64, copy=False)


def _entry_weights(ctx: _Context, c: int) -> _ClassWeights:
    """W the miners of class c take at each entry of each kind.

    A step (kind, e) is active for the miners of that kind with start <= e+1 < hi; a
    chord (kind, f) for those that may sleep and run with hi = f+1. Two histograms
    over the class's miners; nothing of size miners x levels.
    """
    fleet, b = ctx.fleet, ctx.b
    n_kinds, k = fleet.kind_power_w.shape
    if k < 2:
        return _ClassWeights(fleet, np.zeros((n_kinds, 0)), np.zeros((n_kinds, 0)))
    mine = ctx.in_class(c)
    row = fleet.row[mine]
    size = n_kinds * k
    u = None if ctx.units is None else ctx.units[mine]
    # Miners with start <= level < hi: those starting at or below it, less those whose
    # maximum is at or below it (running sums over each kind's levels).
    active = np.bincount(row + b.start[mine], u, size).reshape(n_kinds, k).cumsum(1)
    active -= np.bincount(row + b.hi[mine], u, size).reshape(n_kinds, k).cumsum(1)
    steps = active[:, 1 : k - 1] * fleet.step_w
    sleepy = b.has_chord[mine]
    chords = np.bincount(b.chord_idx[mine][sleepy], None if u is None else u[sleepy],
                         n_kinds * (k - 1))
    return _ClassWeights(fleet, steps, chords.reshape(n_kinds, k - 1) * fleet.wake_w)


@dataclass(slots=True)
class _Search:
    """State of one greedy pass: levels so far, budget left, and what the pass saw."""

    level: LevelArray
    room_w: float  # IT W still free under the cap
    cut_pos: int = -1  # first position whose entry did not fit whole (-1: none yet)
    split: tuple[int, int] | None = None


def _first_passing(w: _ClassWeights, start: int, stop: int, amount: float) -> tuple[int, float]:
    """First position in [start, stop) where the running sum of W from start passes amount.

    Returns it and the sum before it; (stop, the sum) when it never does. A long stretch
    (a fleet of all-different curves) is summed by blocks, and only the block that passes
    entry by entry: nothing the size of the order is built.
    """
    if stop - start <= 4 * _BLOCK:
        cum = np.cumsum(w.between(start, stop))
        g = int(np.searchsorted(cum, amount, side="right"))
        return start + g, float(cum[g - 1]) if g else 0.0
    first, last = -(-start // _BLOCK), stop // _BLOCK  # whole blocks first..last-1
    g, acc = _first_passing(w, start, first * _BLOCK, amount)
    if g < first * _BLOCK:
        return g, acc
    cum_blocks = acc + np.cumsum(w.block_sums()[first:last])
    j = int(np.searchsorted(cum_blocks, amount, side="right"))
    before = float(cum_blocks[j - 1]) if j else acc
    block_end = (first + j + 1) * _BLOCK if j < last - first else stop
    g, acc = _first_passing(w, (first + j) * _BLOCK, block_end, amount - before)
    return g, before + acc


def _greedy_prefix(ctx: _Context, room_w: float) -> tuple[_Search, int]:
    """Every entry before the cut, class by class; returns the search and the cut class.

    Classes that fit whole take their economic levels; in the class the cap cuts, the
    entries before the cut position; the classes after it keep their minimum.
    """
    r0 = ctx.eco.r0
    totals = ctx.class_totals(ctx.econ_w, ctx.fleet.power_at(ctx.b.lo))
    for c, total in enumerate(totals.tolist()):
        if total <= room_w:
            room_w -= total
            continue
        g, before = _first_passing(_entry_weights(ctx, c), 0, r0, room_w)
        room_w -= before
        at_g = levels_at(ctx.fleet, ctx.b, g)
        level = np.where(ctx.cls < c, ctx.econ, np.where(ctx.cls == c, at_g, ctx.b.lo))
        return _Search(level.astype(LEVEL), room_w, cut_pos=g if g < r0 else -1), c
    return _Search(ctx.econ.copy(), room_w), totals.size


@dataclass(slots=True)
class _Waiting:
    """Miners of one class waiting at each entry, per kind: at a step or at a wake chord."""

    fleet: PreparedFleet
    steps: npt.NDArray[np.int64]  # (K * k,): at the step from level l of kind (kind * k + l)
    chords: npt.NDArray[np.int64]  # (K * (k - 1),): at the wake chord (kind, f)

    def _index(self, pos: IntArray) -> tuple[IntArray, BoolArray]:
        fleet = self.fleet
        kind, lv = fleet.entry_kind[pos], fleet.entry_level[pos]
        step = lv >= 1
        idx = np.where(step, kind * fleet.k + lv, kind * (fleet.k - 1) - lv - 1)
        return idx, step

    def at(self, pos: IntArray) -> npt.NDArray[np.int64]:
        """Miners waiting at these positions."""
        idx, step = self._index(pos)
        out: npt.NDArray[np.int64] = np.where(
            step, self.steps.take(np.where(step, idx, 0)),
            self.chords.take(np.where(step, 0, idx)) if self.chords.size else 0)
        return out

    def clear(self, g: int) -> None:
        idx, step = self._index(np.array([g]))
        (self.steps if step[0] else self.chords)[idx[0]] = 0

    def positions(self) -> IntArray:
        """Positions where some miner waits, in order."""
        fleet = self.fleet
        k = fleet.k
        steps = self.steps.reshape(-1, k)[:, 1 : k - 1] if k > 2 else np.zeros((0, 0))
        out = np.concatenate([fleet.curve_pos.ravel()[np.flatnonzero(steps.ravel())],
                              fleet.chord_pos.ravel()[np.flatnonzero(self.chords)]])
        return np.sort(out).astype(np.intp)


def _waiting(ctx: _Context, level: LevelArray, c: int) -> _Waiting:
    """Class c's miners at their next entry, as two histograms.

    A running miner below its maximum waits at its next step, a sleeping one that may
    wake at its wake chord.
    """
    fleet, b = ctx.fleet, ctx.b
    n_kinds, k = fleet.kind_power_w.shape
    mine = ctx.in_class(c)
    lv, hi = level[mine], b.hi[mine]
    up = (lv >= 1) & (lv < hi)
    steps = np.bincount(fleet.row[mine][up] + lv[up], minlength=n_kinds * k)
    asleep = b.has_chord[mine] & (lv == 0)
    chords = np.bincount(b.chord_idx[mine][asleep], minlength=n_kinds * max(k - 1, 0))
    return _Waiting(fleet, steps.astype(np.int64), chords.astype(np.int64))


def _least_w(ctx: _Context, stop: int) -> FloatArray:
    """(stop,) the least W each entry's group can still use: one miner, a lower wake."""
    fleet = ctx.fleet
    least = fleet.entry_w[:stop]
    if not fleet.wakes_below_vertex:
        return least
    p, h = fleet.kind_power_w, fleet.kind_hashrate_ths
    dp, dh = p[:, 1:] - p[:, :1], h[:, 1:] - h[:, :1]
    with np.errstate(invalid="ignore"):
        pays = dh > ctx.eco.threshold * dp
    low = np.minimum.accumulate(np.where(pays, dp, np.inf), axis=1)  # levels 1..j+1
    vertex = fleet.wake_level.astype(np.intp)
    below = np.where(vertex >= 2, np.take_along_axis(low, np.maximum(vertex - 2, 0), 1),
                     np.inf)  # (K, k - 1): paying levels under the hull vertex
    chord = np.flatnonzero(fleet.entry_level[:stop] < 0)
    idx = fleet.entry_kind[chord] * (fleet.k - 1) - fleet.entry_level[chord] - 1
    least = least.copy()
    least[chord] = np.minimum(least[chord], below.ravel()[idx])
    return least


@dataclass(slots=True)
class _Fill:
    """The fill's walk in one class: miners left out of a wake-up, miners waiting."""

    blocked: BoolArray  # woke below the hull vertex: takes nothing more
    waiting: _Waiting


def _members(ctx: _Context, s: _Search, f: _Fill, c: int, g: int) -> IntArray:
    """Miners (in order) of class c whose next entry is the one at position g."""
    fleet, b = ctx.fleet, ctx.b
    lv = int(fleet.entry_level[g])
    mine = (fleet.kind == int(fleet.entry_kind[g])) & ~f.blocked
    if ctx.n_cls > 1:
        mine &= ctx.cls == c
    if lv >= 1:  # a step from level lv
        mine &= (s.level == lv) & (b.hi > lv)
    else:  # the wake chord of sleeping miners whose max level is -lv
        mine &= (s.level == 0) & b.has_chord & (b.hi == -lv)
    return np.flatnonzero(mine)


def _miners_fitting(total: int, w: float, room_w: float) -> int:
    """How many of `total` miners fit in room_w taking w W each (the count times w fits)."""
    t = min(total, int(room_w // w))
    while t and t * w > room_w:
        t -= 1
    return t


def _miner_count(ctx: _Context, rows: IntArray) -> int:
    return int(rows.size) if ctx.units is None else int(ctx.units[rows].sum())


def _whole_rows(ctx: _Context, rows: IntArray, miners: int
                ) -> tuple[int, int, tuple[int, int] | None]:
    """The first `miners` miners of these rows (in order), as the rows they fill whole.

    Returns the number of those rows, the miners in them, and (row, miners of it) when
    the count ends part-way through a row: the split the backtest refines. One miner a
    row: (miners, miners, None).
    """
    if ctx.units is None:
        return miners, miners, None
    cum = np.cumsum(ctx.units[rows])
    t = int(np.searchsorted(cum, miners, side="right"))
    whole = int(cum[t - 1]) if t else 0
    return t, whole, (int(rows[t]), miners - whole) if whole < miners else None


def _wake_lower(ctx: _Context, s: _Search, rest: IntArray) -> None:
    """Miners whose wake chord did not fit wake, in order, at the best level that fits.

    They share a kind and a hull vertex; the candidates are the levels below the
    vertex that pay at this price. Rows of several identical miners wake whole at the
    level their miners would choose; where that choice ends part-way through a row,
    ``split`` names it and the rows from there stay asleep.
    """
    fleet, eco = ctx.fleet, ctx.eco
    kind, wake = int(fleet.kind[rest[0]]), int(ctx.b.start[rest[0]])
    lv = np.arange(1, wake)
    dp = fleet.kind_power_w[kind, lv] - fleet.kind_power_w[kind, 0]
    dh = fleet.kind_hashrate_ths[kind, lv] - fleet.kind_hashrate_ths[kind, 0]
    gain = np.where(dh > eco.threshold * dp, eco.value * dh - eco.cost * dp, -np.inf)
    done = 0
    while done < rest.size:
        fits = (dp <= s.room_w) & np.isfinite(gain)
        if not fits.any():
            return
        j = int(np.argmax(np.where(fits, gain, -np.inf)))
        left = rest[done:]
        count = _miners_fitting(_miner_count(ctx, left), float(dp[j]), s.room_w)
        rows, miners, split = _whole_rows(ctx, left, count)
        s.level[left[:rows]] = lv[j]
        s.room_w -= miners * float(dp[j])
        done += rows
        if split is not None:
            if s.split is None:
                s.split = split
            return


def _take_group(ctx: _Context, s: _Search, members: IntArray, g: int) -> IntArray:
    """The first members of one group take its entry while it fits; returns those that did.

    Rows of several miners take it whole or not at all; the first that would take it
    only in part is named in ``split``.
    """
    w = float(ctx.fleet.entry_w[g])
    count = _miners_fitting(_miner_count(ctx, members), w, s.room_w)
    t, miners, split = _whole_rows(ctx, members, count)
    taken, rest = members[:t], members[t:]
    s.room_w -= miners * w
    if rest.size and s.cut_pos < 0:
        s.cut_pos = g
    if split is not None and s.split is None:
        s.split = split
    if int(ctx.fleet.entry_level[g]) >= 1:
        s.level[taken] += LEVEL(1)
    else:
        s.level[taken] = ctx.b.start[taken]
    return taken


def _fill(ctx: _Context, s: _Search, first_cls: int) -> None:
    """Give what is left of the budget to the later entries that still fit, in order.

    Walks the groups (a class's miners waiting at one entry) in the greedy's order,
    class by class from the one the cap cut; in each one visited, its first miners take
    the entry while they fit; a miner left out takes nothing more, except that a
    sleeping one may wake below its hull vertex (:func:`_wake_lower`).
    """
    fleet = ctx.fleet
    if s.room_w < fleet.min_entry_w:
        return
    least = _least_w(ctx, ctx.eco.r0)
    blocked = np.zeros(fleet.n, dtype=bool)
    for c in range(first_cls, ctx.n_cls):
        if s.room_w < fleet.min_entry_w:
            return
        _walk(ctx, s, _Fill(blocked, _waiting(ctx, s.level, c)), c, least)


def _walk(ctx: _Context, s: _Search, f: _Fill, c: int, least: FloatArray) -> None:
    """Visit class c's groups in order, only those that are not empty and could still fit.

    The candidates are listed once; what the budget no longer pays for is skipped a
    chunk at a time, and groups that miners step up into are queued as they appear.
    """
    r0 = least.size
    cand = f.waiting.positions()
    cand = cand[cand < r0]
    cand = cand[least[cand] <= s.room_w]
    queued: list[int] = []  # positions that got waiting miners during the walk
    i = 0
    while True:
        i = _next_alive(cand, i, f.waiting, least, s.room_w)
        while queued and (least[queued[0]] > s.room_w
                          or not f.waiting.at(np.array(queued[:1]))[0]):
            heapq.heappop(queued)
        if i >= cand.size and not queued:
            return
        if queued and (i >= cand.size or queued[0] < cand[i]):
            g = heapq.heappop(queued)
        else:
            g, i = int(cand[i]), i + 1
        members = _members(ctx, s, f, c, g)
        f.waiting.clear(g)
        taken = _take_group(ctx, s, members, g)
        if taken.size < members.size and int(ctx.fleet.entry_level[g]) < 0:
            rest = members[taken.size :]
            _wake_lower(ctx, s, rest)
            f.blocked[rest[s.level[rest] > 0]] = True
        for p in _advance(ctx, s, f, taken).tolist():
            if p < r0 and least[p] <= s.room_w:
                heapq.heappush(queued, p)


def _next_alive(cand: IntArray, i: int, waiting: _Waiting, least: FloatArray,
                room_w: float) -> int:
    """Index of the first candidate from i on with waiting miners and affordable (or end)."""
    while i < cand.size:
        chunk = cand[i : i + 256]
        ok = (least[chunk] <= room_w) & (waiting.at(chunk) > 0)
        if ok.any():
            return i + int(np.argmax(ok))
        i += chunk.size
    return i


def _advance(ctx: _Context, s: _Search, f: _Fill, taken: IntArray) -> IntArray:
    """Count the miners that took an entry at their next one; returns those positions."""
    fleet, b = ctx.fleet, ctx.b
    lv = s.level[taken]
    more = taken[(lv < b.hi[taken]) & (lv >= 1)]
    if not more.size or fleet.k <= 2:
        return np.zeros(0, dtype=np.intp)
    np.add.at(f.waiting.steps, fleet.row[more] + s.level[more], 1)
    pos = fleet.curve_pos.ravel()[fleet.kind[more] * (fleet.k - 2) + s.level[more] - 1]
    out: IntArray = np.unique(pos).astype(np.intp)
    return out


def _group_members(ctx: _Context, in_class: BoolArray, g: int) -> IntArray:
    """Miners (in order) whose entry at position g is active: its kind, its level range."""
    fleet, b = ctx.fleet, ctx.b
    lv = int(fleet.entry_level[g])
    mine = in_class & (fleet.kind == int(fleet.entry_kind[g]))
    if lv >= 1:  # a step from level lv
        mine &= (b.start <= lv) & (b.hi > lv)
    else:  # the wake chord of miners whose max level is -lv
        mine &= b.has_chord & (b.hi == -lv)
    return np.flatnonzero(mine)


def _fill_to_floor(ctx: _Context, need_w: float, room_w: float
                   ) -> tuple[LevelArray, tuple[int, int] | None]:
    """Keep the least unprofitable entries, in order, until the floor; never past the cap.

    Classes before the one the floor stops in run everything they may; in that class,
    the entries up to the one that reaches the floor (that one only if it fits); later
    classes keep their economic levels. Returns the levels and, with rows of several
    miners, the row the floor ends part-way through (as :func:`_take_group`).
    """
    fleet, r0 = ctx.fleet, ctx.eco.r0
    m_total = fleet.neg_slope.size
    level = ctx.econ.copy()
    split: tuple[int, int] | None = None
    every = levels_at(fleet, ctx.b, m_total)
    for c, total in enumerate(ctx.class_totals(fleet.power_at(every), ctx.econ_w).tolist()):
        in_c = ctx.cls == c
        if total < need_w:
            level = np.where(in_c, every, level).astype(LEVEL)
            need_w -= total
            room_w -= total
            continue
        g, before = _first_passing(_entry_weights(ctx, c), r0, m_total, need_w)
        level = np.where(in_c, levels_at(fleet, ctx.b, g), level).astype(LEVEL)
        if g < m_total:
            w = float(fleet.entry_w[g])
            members = _group_members(ctx, in_c, g)
            size = _miner_count(ctx, members)
            keep = min(size, int((need_w - before) // w))
            if keep < size and before + (keep + 1) * w <= room_w:
                keep += 1  # the entry that reaches the floor, since the cap allows it
            rows, _, split = _whole_rows(ctx, members, keep)
            taken = members[:rows]
            if int(fleet.entry_level[g]) >= 1:
                level[taken] += LEVEL(1)
            else:
                level[taken] = ctx.b.start[taken]
        break
    return level, split


def _plan(fleet: PreparedFleet, level: LevelArray, econ: LevelArray, aux1: float, *,
          binding: bool, multiplier: float = 0.0, infeasible: bool = False,
          floor_binding: bool = False, split: tuple[int, int] | None = None) -> Plan:
    pw = fleet.power_at(level)
    below = (level < econ).view(np.uint8)
    above = (level > econ).view(np.uint8)
    reason = below * np.uint8(Reason.CAP) + above * np.uint8(Reason.RAMP)  # PROFIT is 0
    return Plan(
        level=level,
        power_w=pw,
        hashrate_ths=fleet.hashrate_at(level),
        reason=reason.astype(np.uint8, copy=False),
        site_power_w=float(pw.sum()) * aux1,
        cap_binding=binding,
        multiplier_usd_per_mwh=multiplier,
        infeasible=infeasible,
        floor_binding=floor_binding,
        econ_level=econ,
        split=split,
    )


def _multiplier(fleet: PreparedFleet, cut_pos: int, eco: _Economics, aux1: float) -> float:
    """Shadow price of site power ($/MWh) at the entry the cap cut."""
    if not 0 <= cut_pos < fleet.neg_slope.size:
        return 0.0
    slope = -float(fleet.neg_slope[cut_pos])
    return max((eco.value * slope - eco.cost) * 1e6 / aux1, 0.0)


def _search(ctx: _Context, *, budget: float, base_total: float, floor_it: float,
            binding: bool, aux1: float) -> Plan:
    """One greedy pass under the cap (binding) or up to the floor (not binding)."""
    if binding:
        s, first_cls = _greedy_prefix(ctx, budget - base_total)
        _fill(ctx, s, first_cls)
        return _plan(ctx.fleet, s.level, ctx.econ, aux1, binding=True, split=s.split,
                     multiplier=_multiplier(ctx.fleet, s.cut_pos, ctx.eco, aux1))
    econ_total = float(ctx.econ_w.sum())
    level, split = _fill_to_floor(ctx, floor_it - econ_total, budget - econ_total)
    return _plan(ctx.fleet, level, ctx.econ, aux1, binding=False, floor_binding=True,
                 split=split)


def _search_under(ctx: _Context, cap_w: float, *, base_total: float, floor_it: float,
                  binding: bool, aux1: float) -> Plan | None:
    """The search, repeated with a smaller budget while rounding keeps it over the cap."""
    budget = cap_w / aux1
    for attempt in range(_SHAVES):
        out = _search(ctx, budget=budget, base_total=base_total, floor_it=floor_it,
                      binding=binding, aux1=aux1)
        if out.site_power_w <= cap_w:
            return out
        # Float rounding of the sums put the plan a hair over an exactly-met cap: shave
        # the budget and search again, four times more each time, so that the plan
        # moves even where the rounding is not in the budget's accounting.
        excess = (out.site_power_w - cap_w) / aux1
        budget -= (2.0 * excess + 1e-12 * abs(budget)) * 4.0**attempt
        floor_it = min(floor_it, budget)
    return None


def solve(
    fleet: PreparedFleet,
    *,
    price_usd_per_mwh: float,
    hashprice_usd_per_ph_day: float,
    cap_w: float,
    aux_fraction: float = 0.0,
    min_level: npt.NDArray[np.integer] | None = None,
    max_level: npt.NDArray[np.integer] | None = None,
    floor_w: float = 0.0,
    priority: npt.NDArray[np.integer] | None = None,
    adder_usd_per_mwh: float = 0.0,
    aux_in_cost: bool = True,
    bounds: Bounds | None = None,
    unit_count: npt.NDArray[np.integer] | None = None,
    cost_steps: CostSteps | None = None,
) -> Plan:
    """Choose each miner's level to maximise profit under the site cap.

    The energy cost of an IT watt is ``(price + adder) * (1 + aux)`` (cooling is
    bought at the same price; ``aux_in_cost=False`` charges IT power only). The cap
    and the floor cover IT power times ``(1 + aux_fraction)``.

    Args:
        fleet: From :func:`prepare`.
        price_usd_per_mwh: Real-time energy price.
        hashprice_usd_per_ph_day: Revenue of hashrate.
        cap_w: Site power limit incl. auxiliary load; never exceeded unless the
            pinned minimum alone exceeds it (then ``infeasible`` is set).
        aux_fraction: Auxiliary (cooling) load as a fraction of IT power.
        min_level: Per-miner lowest allowed level (policy pins with min == max).
        max_level: Per-miner highest allowed level (thermal derating, dwell).
        floor_w: Keep site power at least this high if the cap allows (ramp-down
            limit): the least unprofitable steps are kept, in efficiency order.
        priority: Per-miner small non-negative int; under a binding cap, power goes
            to higher priorities first (lexicographic), by efficiency within one.
        adder_usd_per_mwh: Delivery charges and fees on top of the price.
        aux_in_cost: Whether auxiliary load is paid for in the energy cost.
        bounds: ``make_bounds(fleet, min_level, max_level)`` computed already; when
            given, min_level and max_level are ignored.
        unit_count: The rows' miner counts when the fleet was prepared with them
            (``prepare(unit_count=...)``; the backtest's cohorts): checked against the
            fleet's, so that counts meant for another fleet are an error rather than a
            plan. With counts (given here or not) the plan names, in ``split``, the
            first row of which some miners but not all would have taken an entry.
        cost_steps: The price of power by steps (an energy campus: on-site surplus,
            then grid import); price_usd_per_mwh and adder_usd_per_mwh are then
            ignored. The plan is the one at the step :func:`stepped_choice` picks;
            a miner held at a step's boundary has reason PROFIT (the next watt costs
            more than it earns), only the cap's own limit gives CAP.

    Returns:
        The plan; reasons are PROFIT, CAP (held below its economic level by the
        cap) or RAMP (held above it by the floor).
    """
    aux1 = 1.0 + aux_fraction
    if unit_count is not None and not (
            fleet.units is not None and np.array_equal(fleet.units, unit_count)):
        raise ValueError("unit_count differs from the counts the fleet was prepared with")
    b = bounds if bounds is not None else make_bounds(fleet, min_level, max_level)
    if cost_steps is not None:
        return _solve_stepped(fleet, cost_steps, hashprice_usd_per_ph_day=hashprice_usd_per_ph_day,
                              cap_w=cap_w, aux_fraction=aux_fraction, b=b, floor_w=floor_w,
                              priority=priority, aux_in_cost=aux_in_cost)
    eco = _economics(fleet, price_usd_per_mwh, hashprice_usd_per_ph_day,
                     aux_fraction=aux_fraction, adder_usd_per_mwh=adder_usd_per_mwh,
                     aux_in_cost=aux_in_cost)
    return _solve_at_price(fleet, b, eco, cap_w=cap_w, floor_w=floor_w, aux1=aux1,
                           priority=priority)


def _solve_at_price(fleet: PreparedFleet, b: Bounds, eco: _Economics, *, cap_w: float,
                    floor_w: float, aux1: float,
                    priority: npt.NDArray[np.integer] | None) -> Plan:
    """:func:`solve` at one price, its economics `eco` known.

    The economic plan if the cap and the floor allow it, else the search under them (by
    priority class).
    """
    budget = cap_w / aux1
    econ = levels_at(fleet, b, eco.r0)
    econ_w = fleet.power_at(econ)
    econ_total = float(econ_w.sum())
    floor_it = min(floor_w / aux1, budget)
    if floor_it <= econ_total and econ_total * aux1 <= cap_w:
        return _plan(fleet, econ, econ, aux1, binding=False)
    base_total = float(fleet.power_at(b.lo).sum())
    if base_total * aux1 > cap_w:
        return _plan(fleet, b.lo.copy(), econ, aux1, binding=True, infeasible=True)
    cls, n_cls = _classes(priority, fleet.n)
    ctx = _Context(fleet, b, eco, econ, cls, n_cls, econ_w)
    binding = econ_total * aux1 > cap_w
    out = _search_under(ctx, cap_w, base_total=base_total, floor_it=floor_it,
                        binding=binding, aux1=aux1)
    if out is not None:
        return out
    if not binding:
        # Only the floor pushed past the cap: the economic plan fits, keep it.
        return _plan(fleet, econ, econ, aux1, binding=False)
    return _plan(fleet, b.lo.copy(), econ, aux1, binding=True)


# -- a stepped cost of power ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CostSteps:
    """What the miners' site power costs, by steps: a stepped (not one) price of power.

    Segment j runs from ``upper_w[j - 1]`` (0 for the first) to ``upper_w[j]`` W of the
    miners' site power (incl. auxiliary load) and costs ``price_usd_per_mwh[j]``, all
    in (market price plus adders for grid import; a generator's marginal cost, or the
    export price it would have earned, for on-site surplus). The last segment runs on to
    the cap. Prices need not rise: a curve whose later step is cheaper is decided
    exactly too. Both arrays are (S,), S >= 1, finite; ``upper_w`` strictly ascending
    and positive.
    """

    upper_w: FloatArray
    price_usd_per_mwh: FloatArray

    def __post_init__(self) -> None:
        u, p = self.upper_w, self.price_usd_per_mwh
        if u.ndim != 1 or u.shape != p.shape or u.size < 1:
            raise ValueError("upper_w and price_usd_per_mwh must be equal (S,) arrays, S >= 1")
        if not (np.all(np.isfinite(p)) and np.all(~np.isnan(u))):
            raise ValueError("cost steps must be finite")
        if u[0] <= 0 or np.any(np.diff(u) <= 0):
            raise ValueError("upper_w must be positive and strictly ascending")

    @classmethod
    def single(cls, price_usd_per_mwh: float) -> CostSteps:
        """One price for any power: what ``solve(price_usd_per_mwh=...)`` plans with."""
        return cls(np.array([math.inf]), np.array([float(price_usd_per_mwh)]))

    def cost_usd_per_h(self, site_w: float) -> float:
        """$ per hour of drawing ``site_w`` W (the integral of the steps from 0)."""
        lower = np.concatenate([[0.0], self.upper_w[:-1]])
        width = np.clip(np.minimum(self.upper_w, site_w) - lower, 0.0, None)
        width[-1] = max(site_w - lower[-1], 0.0)  # the last step runs on
        return float((width * self.price_usd_per_mwh).sum()) * 1e-6


@dataclass(frozen=True, slots=True)
class SteppedChoice:
    """Where on a stepped cost the plan belongs: one segment, and how it ends there.

    ``lower_w``..``upper_w`` is the segment as the decision may use it (site W incl.
    aux: clipped to the pinned minimum, the floor and the cap). ``at`` says where the
    best power of that segment lies: "inside" (every entry that pays at the segment's
    price, which then fits), "upper" (its upper end: the next watt costs more than any
    entry earns) or "lower" (its lower end: the miners fill the dearer step before to
    reach a cheaper one, or the floor holds them there). ``site_w`` is that power by
    the relaxation (fractional entries), which the plan meets within one entry.
    """

    segment: int
    price_usd_per_mwh: float
    lower_w: float
    upper_w: float
    at: str  # "inside", "upper", "lower"
    site_w: float


def _entry_hash(fleet: PreparedFleet) -> tuple[FloatArray, FloatArray]:
    """TH/s one miner gains by each entry: (K, k - 2) steps and (K, k - 1) wake chords."""
    p, h = fleet.kind_power_w, fleet.kind_hashrate_ths
    kinds, k = p.shape
    steps = h[:, 2:] - h[:, 1:-1] if k > 2 else np.zeros((kinds, 0))
    if k < 2:
        return steps, np.zeros((kinds, 0))
    wake = fleet.wake_level.astype(np.intp)
    chords = np.take_along_axis(h, wake, axis=1) - h[:, :1]
    return steps, chords


def _sum_before(w: _ClassWeights, blocks: FloatArray | None, r: int) -> float:
    """The sum of the weights at positions 0..r-1 (by blocks when the order is long)."""
    if r <= 4 * _BLOCK or blocks is None:
        return float(w.between(0, r).sum())
    whole = r // _BLOCK
    return float(blocks[:whole].sum() + w.between(whole * _BLOCK, r).sum())


@dataclass(frozen=True, slots=True)
class _Relaxation:
    """The entries in slope order (no priorities) as a concave hashrate-of-power curve."""

    power: _ClassWeights  # W all miners take at each entry
    hashrate: _ClassWeights  # TH/s they gain there
    power_blocks: FloatArray | None
    hash_blocks: FloatArray | None
    size: int

    def hashrate_at(self, above_w: float) -> float:
        """TH/s above the pinned minimum when ``above_w`` IT W above it are taken, in order."""
        if above_w <= 0.0:
            return 0.0
        g, before = _first_passing(self.power, 0, self.size, above_w)
        out = _sum_before(self.hashrate, self.hash_blocks, g)
        if g < self.size:
            w_g = float(self.power.between(g, g + 1)[0])
            if w_g > 0.0:
                out += (above_w - before) / w_g * float(self.hashrate.between(g, g + 1)[0])
        return out

    def power_before(self, r: int) -> float:
        """IT W above the pinned minimum of every entry before position r."""
        return _sum_before(self.power, self.power_blocks, min(r, self.size))


def _relaxation(fleet: PreparedFleet, b: Bounds, eco: _Economics) -> _Relaxation:
    ctx = _Context(fleet, b, eco, b.lo, np.zeros(fleet.n, dtype=np.intp), 1,
                   np.zeros(fleet.n))
    w = _entry_weights(ctx, 0)
    step_h, chord_h = _entry_hash(fleet)
    with np.errstate(invalid="ignore", divide="ignore"):
        steps_n = np.where(fleet.step_w > 0, np.rint(w.steps / fleet.step_w), 0.0)
        chords_n = np.where(fleet.wake_w > 0, np.rint(w.chords / fleet.wake_w), 0.0)
    h = _ClassWeights(fleet, steps_n * step_h, chords_n * chord_h)
    size = int(fleet.neg_slope.size)
    long = size > 4 * _BLOCK
    return _Relaxation(w, h, w.block_sums() if long else None,
                       h.block_sums() if long else None, size)


def stepped_choice(
    fleet: PreparedFleet,
    steps: CostSteps,
    *,
    hashprice_usd_per_ph_day: float,
    cap_w: float,
    bounds: Bounds,
    aux_fraction: float = 0.0,
    floor_w: float = 0.0,
    aux_in_cost: bool = True,
) -> SteppedChoice:
    """The segment of a stepped cost the best plan lies in, and where in it.

    Exact for the relaxation (an entry may be taken in part) whatever the steps: on each
    segment the price is one number, so profit is concave in power there and its best
    is the segment's own single-price optimum clipped to the segment; the best segment
    wins. Rising prices make that the greedy in slope order with the threshold raised at
    each step's boundary; a cheaper later step (a genset dearer than the grid behind it)
    is the case the comparison is for. Priorities do not move a step's boundary (they
    order who sheds under the cap, not what power costs).

    Args:
        fleet: As for :func:`solve`.
        steps: The cost of the miners' site power.
        hashprice_usd_per_ph_day: Revenue of hashrate.
        cap_w: The hard limit, site W incl. aux; the steps are cut there.
        bounds: As for :func:`solve`.
        aux_fraction: As for :func:`solve`.
        floor_w: Site power the plan keeps at least (ramp-down limit), W.
        aux_in_cost: As for :func:`solve`.
    """
    aux1 = 1.0 + aux_fraction
    paid = aux1 if aux_in_cost else 1.0
    value = usd_per_ths_hour(hashprice_usd_per_ph_day)
    base_it = float(fleet.power_at(bounds.lo).sum())
    base_site = base_it * aux1
    low = max(base_site, min(floor_w, cap_w))
    high = max(cap_w, low)
    upper = steps.upper_w.astype(np.float64).copy()
    upper[-1] = math.inf
    lower = np.concatenate([[0.0], upper[:-1]])
    seg_lo, seg_hi = np.maximum(lower, low), np.minimum(upper, high)
    live = np.flatnonzero(seg_hi > seg_lo)
    if live.size == 0:  # no room between the pinned minimum (or floor) and the cap
        live = np.array([min(int(np.searchsorted(upper, low, side="left")), upper.size - 1)])
    first_eco = _economics(fleet, float(steps.price_usd_per_mwh[live[0]]),
                           hashprice_usd_per_ph_day, aux_fraction=aux_fraction,
                           adder_usd_per_mwh=0.0, aux_in_cost=aux_in_cost)
    relax = _relaxation(fleet, bounds, first_eco)
    best: SteppedChoice | None = None
    best_profit = 0.0
    for j in live.tolist():
        price = float(steps.price_usd_per_mwh[j])
        hi = float(seg_hi[j])
        lo = min(float(seg_lo[j]), hi)
        r = fleet.position(threshold_ths_per_w(price * paid, hashprice_usd_per_ph_day))
        econ_site = (base_it + relax.power_before(r)) * aux1
        site = min(max(econ_site, lo), hi)
        at = "upper" if econ_site > hi else "lower" if econ_site < lo else "inside"
        hash_ths = relax.hashrate_at(site / aux1 - base_it)
        profit = value * hash_ths - steps.cost_usd_per_h(site) * paid / aux1
        # A later segment must earn more by more than rounding to be preferred.
        if best is None or profit > best_profit + 1e-9 * max(abs(best_profit), 1.0):
            best_profit = profit
            best = SteppedChoice(j, price, lo, hi, at, site)
    assert best is not None
    return best


def _solve_stepped(fleet: PreparedFleet, steps: CostSteps, *, hashprice_usd_per_ph_day: float,
                   cap_w: float, aux_fraction: float, b: Bounds, floor_w: float,
                   priority: npt.NDArray[np.integer] | None, aux_in_cost: bool) -> Plan:
    """:func:`solve` against stepped costs: the single-price search at the chosen step."""
    choice = stepped_choice(fleet, steps, hashprice_usd_per_ph_day=hashprice_usd_per_ph_day,
                            cap_w=cap_w, bounds=b, aux_fraction=aux_fraction, floor_w=floor_w,
                            aux_in_cost=aux_in_cost)

    def at_price(cap: float, floor: float, prio: npt.NDArray[np.integer] | None) -> Plan:
        return solve(fleet, price_usd_per_mwh=choice.price_usd_per_mwh,
                     hashprice_usd_per_ph_day=hashprice_usd_per_ph_day, cap_w=cap,
                     aux_fraction=aux_fraction, floor_w=floor, priority=prio,
                     aux_in_cost=aux_in_cost, bounds=b)

    if choice.at == "upper" and choice.upper_w < cap_w:
        # A step's boundary, not the cap: the miners it holds are where profit puts them.
        return _economic(at_price(choice.upper_w, 0.0, None))
    if choice.at == "lower" and choice.lower_w > min(floor_w, cap_w):
        return _economic(at_price(cap_w, choice.lower_w, None))
    return at_price(cap_w, floor_w, priority)


def _economic(plan: Plan) -> Plan:
    """A plan held at a cost step's boundary: nothing binds but the price, so PROFIT."""
    return dataclasses.replace(plan, reason=np.zeros_like(plan.reason), cap_binding=False,
                               floor_binding=False, multiplier_usd_per_mwh=0.0,
                               econ_level=plan.level)

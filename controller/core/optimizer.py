"""Curtailment optimizer: a pure function from fleet arrays and prices to per-miner levels.

Maximise ``sum_i v*h_i(p_i) - c*p_i`` subject to ``sum_i p_i*(1+aux) <= cap`` over each
miner's operating points (level 0 = sleep). No I/O, no clock, no config reads.

How it works (and why it is exact and fast):

* Each miner's choice is a chain of *entries*: one "wake" chord from sleep to the
  hull vertex the sleep point sees best (``wake_level``), then one entry per
  firmware step along its concave curve. The slope of an entry (extra TH/s per
  extra W) does not depend on the price, so :func:`prepare` sorts every entry of
  the fleet once, by descending slope. Points below the upper concave hull of a
  miner's points (sleep included) are never optimal for a price on power, which
  is why the sleep->min_w jump is a single chord and not a step.
* A price threshold ``t = c / v`` becomes a *position* ``r`` in that order
  (``np.searchsorted``): every entry before ``r`` is worth taking. A miner's level
  at position ``r`` is a count of its entries before ``r`` (one pass over the
  arrays), so the unconstrained optimum needs no sort and no iteration.
* When the cap binds, the greedy by descending marginal efficiency is a prefix
  of the same order. Its power is found with block sums (``np.bincount`` over
  prepared block ids) and then exactly inside one block, so a decision costs a
  few passes over the arrays whatever the number of miners. The prefix is the
  LP optimum rounded down at one entry, so the result is within one firmware
  step (one entry's objective value) of the best combination of points, and
  the planned power never exceeds the cap.

Bounds per miner (``min_level``/``max_level``) come from policy. Ties between
entries of equal slope go to the wake chord first, then to the lower miner index,
so plans are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.protocol.reasons import Reason

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
PosArray = npt.NDArray[np.signedinteger[Any]]

_BLOCK_SHIFT = 10  # 1024 entries per block: the exact search touches one block


@dataclass(frozen=True, slots=True)
class PreparedFleet:
    """Operating points per miner and the fleet-wide order of their steps, built once.

    power_w and hashrate_ths are (n_miners, k) with ascending power per row and
    column 0 = sleep; rows with fewer real points repeat their last point. They are
    stored column-major, and the derived arrays level-major ((levels, n)), because
    every per-decision pass runs over all miners for one level at a time.
    The derived arrays come from :func:`prepare`; treat them as read-only.
    """

    power_w: FloatArray
    hashrate_ths: FloatArray
    top: IntArray  # (n,) highest real level: first column of the repeated tail
    wake_level_t: npt.NDArray[np.int16]  # (k-1, n): level woken to when max level is f+1
    chord_pos_t: PosArray  # (k-1, n): position of that wake chord in `order`
    curve_pos_t: PosArray  # (k-2, n): position of the step from level e+1 to e+2
    order: PosArray  # (N,) entry ids by descending slope (chords, then steps)
    neg_slope: FloatArray  # (N,) -slope in that order (ascending, for searchsorted)
    index: npt.NDArray[np.int64]  # (n,) 0..n-1, to gather one point per miner
    step_w_t: FloatArray  # (k-2, n): power of the step from level e+1 to e+2
    default_start: IntArray  # (n,) first stepping level with no bounds (the wake level)
    default_block_w: FloatArray  # (blocks,) step power per block of `order`, no bounds

    @property
    def n(self) -> int:
        return int(self.power_w.shape[0])

    @property
    def k(self) -> int:
        return int(self.power_w.shape[1])

    @property
    def max_level(self) -> IntArray:
        """Highest real level per miner (padding columns are never reported)."""
        return self.top.copy()

    @property
    def nbytes(self) -> int:
        """Memory held by the prepared fleet, in bytes."""
        arrays = (
            self.power_w,
            self.hashrate_ths,
            self.top,
            self.wake_level_t,
            self.chord_pos_t,
            self.curve_pos_t,
            self.order,
            self.neg_slope,
            self.index,
            self.step_w_t,
            self.default_start,
            self.default_block_w,
        )
        return sum(a.nbytes for a in arrays)

    def position(self, threshold_ths_per_w: float) -> int:
        """Number of entries whose slope is above a threshold (TH/s per W)."""
        return int(np.searchsorted(self.neg_slope, -threshold_ths_per_w, side="left"))

    def gather(self, values: FloatArray, level: IntArray) -> FloatArray:
        """values[i, level[i]] for every miner (values shaped like power_w)."""
        out: FloatArray = np.take(values.T.ravel(), level * self.n + self.index)
        return out


@dataclass(frozen=True, slots=True)
class Plan:
    """Optimizer output: a level (column index) and power per miner, with reasons."""

    level: IntArray
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
    econ_level: IntArray | None = None  # best level at this price, bounds but no cap/floor


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


def prepare(power_w: FloatArray, hashrate_ths: FloatArray) -> PreparedFleet:
    """Validate the operating points and build the fleet-wide order of steps.

    Args:
        power_w: (n, k) W per level; column 0 is sleep, then strictly ascending
            power targets; shorter rows repeat their last point to width k.
        hashrate_ths: (n, k) TH/s at those levels (0 or more at sleep).

    Returns:
        The prepared fleet; rebuild it only when the fleet or its models change.

    Raises:
        ValueError: shapes differ, or power does not ascend before the padding.
    """
    p = np.ascontiguousarray(power_w, dtype=np.float64)
    h = np.ascontiguousarray(hashrate_ths, dtype=np.float64)
    if p.shape != h.shape or p.ndim != 2 or p.shape[1] < 1:
        raise ValueError("power_w and hashrate_ths must be equal (n, k) arrays with k >= 1")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(h))):
        raise ValueError("operating points must be finite")
    n, k = p.shape
    # top = first column equal to the row's last point: the padding starts after it.
    same = (p == p[:, -1:]) & (h == h[:, -1:])
    top = np.argmax(same, axis=1).astype(np.intp)
    cols = np.arange(k)
    real = cols[None, :] <= top[:, None]
    if k > 1 and np.any((np.diff(p, axis=1) <= 0) & real[:, 1:]):
        raise ValueError("power must be strictly ascending from sleep up to the last point")

    kf = k - 1
    # Wake chords: best average slope from sleep to a level <= f+1, and which level.
    with np.errstate(divide="ignore", invalid="ignore"):
        avg = (h[:, 1:] - h[:, :1]) / (p[:, 1:] - p[:, :1])
    avg = np.where(real[:, 1:], avg, -np.inf)
    chord_slope = np.maximum.accumulate(avg, axis=1) if kf else avg
    wake = np.zeros((n, kf), dtype=np.int16)
    if kf:
        newmax = np.zeros((n, kf), dtype=bool)
        newmax[:, 0] = True
        newmax[:, 1:] = avg[:, 1:] > chord_slope[:, :-1]
        wake = np.maximum.accumulate(np.where(newmax, cols[:kf], 0), axis=1) + 1
    curve_slope = _strictly_concave_slopes(p, h, top)

    # Entry ids are level-major: chord (f, i) -> f*n + i, step (e, i) -> n*kf + e*n + i.
    # A stable sort then breaks slope ties chord first and keeps each miner's steps
    # in chain order, which the level counts in _levels rely on.
    keys = np.concatenate([chord_slope.T.ravel(), curve_slope.T.ravel()])
    keys = np.where(np.isnan(keys), -np.inf, keys)
    total = keys.size
    pos_dtype = np.int32 if total < 2**31 - 1 else np.int64
    order: PosArray = np.argsort(-keys, kind="stable").astype(pos_dtype)
    pos: PosArray = np.empty(total, dtype=pos_dtype)
    pos[order] = np.arange(total, dtype=pos_dtype)
    kc = max(k - 2, 0)
    pt = np.asfortranarray(p)
    step_w_t = np.ascontiguousarray(pt.T[2:] - pt.T[1:-1])
    curve_pos_t = pos[n * kf :].reshape(kc, n)
    default_start = np.ones(n, dtype=np.intp)
    if kf:
        default_start = np.minimum(wake[np.arange(n), np.maximum(top - 1, 0)], top)
    e = np.arange(kc)[:, None]
    default_w = np.where(
        (e >= (default_start - 1)[None, :]) & (e < (top - 1)[None, :]), step_w_t, 0.0
    )
    n_blocks = (total >> _BLOCK_SHIFT) + 1
    default_block_w = np.bincount(
        (curve_pos_t >> _BLOCK_SHIFT).ravel(), weights=default_w.ravel(), minlength=n_blocks
    ).astype(np.float64)
    return PreparedFleet(
        power_w=pt,
        hashrate_ths=np.asfortranarray(h),
        top=top,
        wake_level_t=np.ascontiguousarray(wake.T, dtype=np.int16),
        chord_pos_t=pos[: n * kf].reshape(kf, n),
        curve_pos_t=curve_pos_t,
        order=order,
        neg_slope=-keys[order],
        index=np.arange(n, dtype=np.int64),
        step_w_t=step_w_t,
        default_start=default_start.astype(np.intp),
        default_block_w=default_block_w,
    )


def usd_per_ths_hour(hashprice_usd_per_ph_day: float) -> float:
    """Revenue of one TH/s for one hour at a hashprice in $/PH/day."""
    return hashprice_usd_per_ph_day / 1000.0 / 24.0


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
    cost = cost_usd_per_mwh_it / 1e6  # $/Wh
    if value <= 0.0:
        # Hashrate worthless: run only if power itself pays (negative price).
        return -np.inf if cost < 0 else np.inf
    return cost / value


@dataclass(frozen=True, slots=True)
class Bounds:
    """Per-decision view of each miner's chain under its level bounds."""

    lo: IntArray
    hi: IntArray
    start: IntArray  # first level whose outgoing step is an entry (when awake)
    has_chord: npt.NDArray[np.bool_]  # may sleep and may run: the wake chord is an entry
    chord_pos: PosArray  # (n,) position of that chord (meaningful where has_chord)


def make_bounds(
    fleet: PreparedFleet, min_level: IntArray | None, max_level: IntArray | None
) -> Bounds:
    """Per-decision view of each miner's steps under level bounds (reuse it across calls).

    A minimum above a maximum yields to the maximum (thermal limits are safety).
    """
    n = fleet.n
    if max_level is None:
        hi = fleet.top
    else:
        hi = np.maximum(np.minimum(np.asarray(max_level, dtype=np.intp), fleet.top), 0)
    if min_level is None:
        lo = np.zeros(n, dtype=np.intp)
    else:
        lo = np.minimum(np.maximum(np.asarray(min_level, dtype=np.intp), 0), hi)
    has_chord = (lo == 0) & (hi >= 1)
    if fleet.k > 1:
        flat = np.maximum(hi - 1, 0) * n + fleet.index
        wake = np.take(fleet.wake_level_t.ravel(), flat).astype(np.intp)
        chord_pos = np.take(fleet.chord_pos_t.ravel(), flat)
    else:
        wake = np.zeros(n, dtype=np.intp)
        chord_pos = np.zeros(n, dtype=np.int64)
    start = np.where(has_chord, np.minimum(wake, hi), lo)
    return Bounds(lo, hi, start, has_chord, chord_pos)


def levels_at(fleet: PreparedFleet, b: Bounds, r: int | PosArray) -> IntArray:
    """Level of every miner when exactly the entries before position r are taken.

    r is one position for the fleet (see :func:`position_at_price`), or one per miner.
    """
    rr = r if isinstance(r, int) else np.asarray(r)[None, :]
    count_dtype = np.uint8 if fleet.k < 256 else np.int32
    below = (fleet.curve_pos_t < rr).view(np.uint8)
    taken = below.sum(axis=0, dtype=count_dtype).astype(np.intp)
    run = np.minimum(np.maximum(taken + 1, b.start), b.hi)
    awake = ~b.has_chord | (b.chord_pos < r)
    return np.where(awake, run, b.lo)


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


def plan_at(fleet: PreparedFleet, level: IntArray, *, aux_fraction: float = 0.0) -> Plan:
    """A plan of given levels that the cap does not bind (all reasons PROFIT)."""
    pw = fleet.gather(fleet.power_w, level)
    return Plan(
        level=level,
        power_w=pw,
        hashrate_ths=fleet.gather(fleet.hashrate_ths, level),
        reason=np.zeros(fleet.n, dtype=np.uint8),
        site_power_w=float(pw.sum()) * (1.0 + aux_fraction),
        cap_binding=False,
        econ_level=level,
    )


def levels_at_price(
    fleet: PreparedFleet,
    *,
    price_usd_per_mwh: float,
    hashprice_usd_per_ph_day: float,
    aux_fraction: float = 0.0,
    adder_usd_per_mwh: float = 0.0,
    aux_in_cost: bool = True,
    min_level: IntArray | None = None,
    max_level: IntArray | None = None,
) -> IntArray:
    """Each miner's most profitable level at a price, within bounds, ignoring the cap."""
    r0 = position_at_price(
        fleet, price_usd_per_mwh=price_usd_per_mwh,
        hashprice_usd_per_ph_day=hashprice_usd_per_ph_day, aux_fraction=aux_fraction,
        adder_usd_per_mwh=adder_usd_per_mwh, aux_in_cost=aux_in_cost,
    )
    return levels_at(fleet, make_bounds(fleet, min_level, max_level), r0)


class _Entries:
    """Weights (W) of every entry under the current bounds, and their block sums per class.

    Without priority classes the step weights start from the sums prepared for
    unbounded miners and are corrected only for miners whose bounds change their
    steps (derated, pinned, held); the wake chords are summed every time.
    """

    def __init__(self, fleet: PreparedFleet, b: Bounds, cls: IntArray | None, n_cls: int):
        self.fleet, self.b, self.cls, self.n_cls = fleet, b, cls, n_cls
        n_blocks = int(fleet.default_block_w.size)
        size = n_blocks * n_cls
        pt = fleet.power_w.T  # (k, n) view, rows contiguous
        e = np.arange(max(fleet.k - 2, 0))[:, None]
        wake_w = fleet.gather(fleet.power_w, b.start) - pt[0]
        self.w_chord = np.where(b.has_chord, wake_w, 0.0)
        blk_chord = b.chord_pos >> _BLOCK_SHIFT
        if cls is None:
            changed = np.flatnonzero((b.start != fleet.default_start) | (b.hi != fleet.top))
            sub_start, sub_hi = b.start[changed], b.hi[changed]
            now = (e >= (sub_start - 1)[None, :]) & (e < (sub_hi - 1)[None, :])
            before = (e >= (fleet.default_start[changed] - 1)[None, :]) & (
                e < (fleet.top[changed] - 1)[None, :]
            )
            delta = fleet.step_w_t[:, changed] * (now.astype(np.int8) - before.astype(np.int8))
            blk = fleet.curve_pos_t[:, changed] >> _BLOCK_SHIFT
            curve = fleet.default_block_w + np.bincount(
                blk.ravel(), weights=delta.ravel(), minlength=size
            )
        else:
            active = (e >= (b.start - 1)[None, :]) & (e < (b.hi - 1)[None, :])
            w = np.where(active, fleet.step_w_t, 0.0)
            blk_all = (fleet.curve_pos_t >> _BLOCK_SHIFT) + (cls * n_blocks)[None, :]
            blk_chord = blk_chord + cls * n_blocks
            curve = np.bincount(blk_all.ravel(), weights=w.ravel(), minlength=size).astype(
                np.float64
            )
        chord = np.bincount(blk_chord, weights=self.w_chord, minlength=size)
        self.block_sums = (curve.astype(np.float64) + chord).reshape(n_cls, n_blocks)

    def span(self, start: int, stop: int) -> tuple[FloatArray, IntArray]:
        """Weights and classes of the entries at positions start..stop-1, in order."""
        fleet, b = self.fleet, self.b
        ids = fleet.order[start:stop].astype(np.int64)
        n = fleet.n
        n_chord = n * (fleet.k - 1)
        is_chord = ids < n_chord
        curve_id = np.where(is_chord, 0, ids - n_chord)
        miner = np.where(is_chord, ids, curve_id) % n
        f = ids // n
        chord_w = np.where(f == b.hi[miner] - 1, self.w_chord[miner], 0.0)
        if fleet.step_w_t.size:
            e = curve_id // n
            active = (e >= b.start[miner] - 1) & (e < b.hi[miner] - 1)
            curve_w = np.where(active, fleet.step_w_t.ravel()[curve_id], 0.0)
        else:
            curve_w = np.zeros(ids.size)
        w = np.where(is_chord, chord_w, curve_w)
        c = self.cls[miner] if self.cls is not None else np.zeros(ids.size, dtype=np.intp)
        return w, c

    def below(self, r: int) -> FloatArray:
        """Per-class sum of entry weights at positions before r."""
        blk = r >> _BLOCK_SHIFT
        out = self.block_sums[:, :blk].sum(axis=1)
        w, c = self.span(blk << _BLOCK_SHIFT, r)
        part = np.bincount(c, weights=w, minlength=self.n_cls)[: self.n_cls]
        total: FloatArray = out + part.astype(np.float64)
        return total

    def first_exceeding(self, c: int, start: int, stop: int, amount: float) -> tuple[int, float]:
        """First position p in [start, stop) where class c's running sum from start passes amount.

        Returns (p, sum of class c's weights in [start, p)); p == stop if never passed.
        Walks the head of the first block, then whole blocks by their sums, then one
        block exactly: a few thousand entries whatever the fleet size.
        """
        if start >= stop:
            return start, 0.0
        first_block = start >> _BLOCK_SHIFT
        head_stop = min(stop, (first_block + 1) << _BLOCK_SHIFT)
        p, acc = self._exact(c, start, head_stop, amount, 0.0)
        if p < head_stop or head_stop == stop:
            return p, acc
        last_block = stop >> _BLOCK_SHIFT  # [last_block << shift, stop) is the partial tail
        full = self.block_sums[c, first_block + 1 : last_block]
        cum = acc + np.cumsum(full)
        j = int(np.searchsorted(cum, amount, side="right"))
        if j < full.size:
            s0 = (first_block + 1 + j) << _BLOCK_SHIFT
            return self._exact(
                c, s0, s0 + (1 << _BLOCK_SHIFT), amount, float(cum[j - 1]) if j else acc
            )
        return self._exact(
            c, last_block << _BLOCK_SHIFT, stop, amount, float(cum[-1]) if full.size else acc
        )

    def _exact(self, c: int, s0: int, s1: int, amount: float, acc: float) -> tuple[int, float]:
        w, cl = self.span(s0, s1)
        cw = acc + np.cumsum(np.where(cl == c, w, 0.0))
        j = int(np.searchsorted(cw, amount, side="right"))
        if j >= cw.size:
            return s1, float(cw[-1]) if cw.size else acc
        return s0 + j, float(cw[j - 1]) if j else acc


def solve(
    fleet: PreparedFleet,
    *,
    price_usd_per_mwh: float,
    hashprice_usd_per_ph_day: float,
    cap_w: float,
    aux_fraction: float = 0.0,
    min_level: IntArray | None = None,
    max_level: IntArray | None = None,
    floor_w: float = 0.0,
    priority: npt.NDArray[np.integer] | None = None,
    adder_usd_per_mwh: float = 0.0,
    aux_in_cost: bool = True,
    bounds: Bounds | None = None,
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

    Returns:
        The plan; reasons are PROFIT, CAP (held below its economic level by the
        cap) or RAMP (held above it by the floor).
    """
    n = fleet.n
    aux1 = 1.0 + aux_fraction
    b = bounds if bounds is not None else make_bounds(fleet, min_level, max_level)
    cost = energy_cost_usd_per_mwh_it(
        price_usd_per_mwh,
        aux_fraction=aux_fraction,
        adder_usd_per_mwh=adder_usd_per_mwh,
        aux_in_cost=aux_in_cost,
    )
    r0 = fleet.position(threshold_ths_per_w(cost, hashprice_usd_per_ph_day))
    budget = cap_w / aux1
    floor_it = min(floor_w / aux1, budget)

    econ = levels_at(fleet, b, r0)
    econ_total = float(fleet.gather(fleet.power_w, econ).sum())

    def plan(
        level: IntArray,
        *,
        binding: bool,
        multiplier: float = 0.0,
        infeasible: bool = False,
        floor_binding: bool = False,
    ) -> Plan:
        pw = fleet.gather(fleet.power_w, level)
        reason = np.full(n, Reason.PROFIT, dtype=np.uint8)
        reason[level < econ] = Reason.CAP
        reason[level > econ] = Reason.RAMP
        return Plan(
            level=level,
            power_w=pw,
            hashrate_ths=fleet.gather(fleet.hashrate_ths, level),
            reason=reason,
            site_power_w=float(pw.sum()) * aux1,
            cap_binding=binding,
            multiplier_usd_per_mwh=multiplier,
            infeasible=infeasible,
            floor_binding=floor_binding,
            econ_level=econ,
        )

    if floor_it <= econ_total and econ_total * aux1 <= cap_w:
        return plan(econ, binding=False)

    base_total = float(fleet.gather(fleet.power_w, b.lo).sum())
    if base_total * aux1 > cap_w:
        return plan(b.lo.copy(), binding=True, infeasible=True)

    cls, n_cls = _classes(priority)
    ent = _Entries(fleet, b, cls, n_cls)
    total_entries = int(fleet.order.size)
    below = ent.below(r0)  # per class: weight of the entries worth taking at this price
    acc_total = base_total + float(below.sum())
    above = ent.block_sums.sum(axis=1) - below
    binding = econ_total * aux1 > cap_w

    def prefixes(budget: float) -> tuple[npt.NDArray[np.int64], int]:
        """Per-class prefix of the order to take, and where the cap cut it (-1: nowhere)."""
        r_cls = np.full(n_cls, r0, dtype=np.int64)
        if binding:
            # Greedy by descending marginal efficiency, class by class, until the cap.
            remaining = budget - base_total
            for c in range(n_cls):  # a few priority classes, never one per miner
                if below[c] <= remaining:
                    remaining -= float(below[c])
                    continue
                cut_pos, _ = ent.first_exceeding(c, 0, r0, remaining)
                r_cls[c] = cut_pos
                r_cls[c + 1 :] = 0
                return r_cls, cut_pos
            return r_cls, -1
        # Below the floor: keep the least unprofitable steps, never above the cap.
        need = floor_it - acc_total
        room = budget - acc_total
        for c in range(n_cls):
            if above[c] < need:
                r_cls[c] = total_entries
                need -= float(above[c])
                room -= float(above[c])
                continue
            p_first, acc = ent.first_exceeding(c, r0, total_entries, need)
            w_at, c_at = ent.span(p_first, min(p_first + 1, total_entries))
            step = float(w_at[0]) if w_at.size and c_at[0] == c else 0.0
            fits = acc + step <= room
            r_cls[c] = min(p_first + 1, total_entries) if fits else p_first
            break
        return r_cls, -1

    value = usd_per_ths_hour(hashprice_usd_per_ph_day)
    for _ in range(3):
        r_cls, cut_pos = prefixes(budget)
        r_miner: int | npt.NDArray[np.int64] = int(r_cls[0]) if cls is None else r_cls[cls]
        multiplier = 0.0
        if 0 <= cut_pos < total_entries:
            slope = -float(fleet.neg_slope[cut_pos])
            multiplier = max((value * slope * 1e6 - cost) / aux1, 0.0)
        out = plan(
            levels_at(fleet, b, r_miner),
            binding=binding,
            multiplier=multiplier,
            floor_binding=not binding,
        )
        if out.site_power_w <= cap_w:
            return out
        # Float rounding of the sums put the plan a hair over an exactly-met cap:
        # shave the budget by the excess and search again.
        excess = (out.site_power_w - cap_w) / aux1
        budget -= 2.0 * excess + 1e-12 * abs(budget)
    if not binding:
        # Only the floor pushed past the cap: the economic plan fits, keep it.
        return plan(econ, binding=False)
    return plan(b.lo.copy(), binding=True)


def _classes(priority: npt.NDArray[np.integer] | None) -> tuple[IntArray | None, int]:
    """Map priorities to dense classes, 0 = highest priority present."""
    if priority is None:
        return None, 1
    prio = np.asarray(priority, dtype=np.int64)
    if prio.size == 0:
        return None, 1
    lo = int(prio.min())
    if int(prio.max()) - lo < 65536:
        present = np.bincount(prio - lo) > 0
        rank = (np.cumsum(present[::-1]) - 1)[::-1]
        return rank[prio - lo].astype(np.intp), int(present.sum())
    values, inverse = np.unique(-prio, return_inverse=True)
    return inverse.astype(np.intp), int(values.size)

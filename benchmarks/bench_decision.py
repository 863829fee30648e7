"""Benchmark the full decision as the daemon runs it, against a plain sorted greedy.

Run: ``python benchmarks/bench_decision.py [--sizes 10000,100000,300000]``. Prints a
table and, as its last line, one JSON object. Not a test: it only measures (and
checks that the optimizer and the baseline give the same plan).

The daemon's real case: the example site's racks (deploy/site.example.toml: eight
models, priorities, a never-curtail rack) scaled to n miners; operating points from
``FleetState(cfg.inventory)`` (the catalogue's firmware ranges and 100 W steps: 19 to
35 levels a miner); ``decide()`` called as ``controller/daemon/loop.py`` calls it, with
``PolicyState`` carried from tick to tick (5 s apart), priorities always passed,
temperatures that drift (a few miners derated), a few stale or offline miners, and a
price that moves a little every tick and sometimes a lot, with the cap binding in
some stretches and not in others. Warm-up ticks are not counted.

Per decision it prints true percentiles over every timed tick, the memory a decision
allocates at its peak (tracemalloc, on separate ticks: tracing slows numpy down), and
minor page faults. ``solve`` is the optimizer alone on the policy's hard bounds (stale
and never-curtail pinned, thermal limits) with priorities and the tick's cap;
``greedy`` is the fair baseline on exactly the same inputs: every entry of every miner
(wake chord, then each firmware step) built and sorted by priority and marginal
efficiency at each decision, taken in that order while it fits, skipping what does not
(as the optimizer's module docstring specifies), with the optimizer's tie order; the
two plans must be equal miner by miner. ``pass`` is one read of the (n, levels)
operating-point arrays, the memory floor of any per-miner-per-level method.

``--spread 0.04`` gives every miner its own curve (hashrate x N(1, 0.04)): no two
miners alike, the case the decision's per-kind arrays cannot compress.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import resource
import time
import tomllib
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.config import SiteConfig
from controller.config_types import PolicyKnobs
from controller.core import optimizer as opt
from controller.core.fleet_state import FleetState
from controller.core.policy import MarketInputs, MinerInputs, PolicyState, decide, thermal_max_level
from controller.units import usd_per_ths_hour

ROOT = Path(__file__).resolve().parent.parent
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
TICK_S = 5.0
HASHPRICE = 42.0


def site(n: int) -> SiteConfig:
    """The example site's racks with their counts scaled to about n miners."""
    with (ROOT / "deploy" / "site.example.toml").open("rb") as f:
        data = tomllib.load(f)
    groups = data["fleet"]["groups"]
    total = sum(g["count"] for g in groups)
    out: list[dict[str, Any]] = []
    for g in groups:
        left = max(1, round(g["count"] * n / total))
        while left > 0:  # a group holds at most 100,000 miners
            out.append({**g, "name": f"{g['name']}-{len(out)}", "count": min(left, 100_000)})
            left -= 100_000
    data["fleet"] = {"groups": out}
    # The cap scales with the fleet, as the site's connection would (the config refuses a
    # cap the never-curtail racks alone exceed, and the benches set their own caps).
    data["power_cap_kw"] = data["power_cap_kw"] * sum(g["count"] for g in out) / total
    data["grid"]["keep_alive_groups"] = []
    return SiteConfig.model_validate(data)


@dataclass
class Tick:
    market: MarketInputs
    miners: MinerInputs
    now_s: float


class Ticks:
    """What a live daemon sees tick after tick (seeded, so runs compare)."""

    def __init__(self, fs: FleetState, cfg: SiteConfig, seed: int) -> None:
        self.fs, self.rng = fs, np.random.default_rng(seed)
        n = fs.n
        self.base_temp_c = self.rng.normal(72.0, 4.0, n)
        self.full_w = float(fs.max_w.sum()) * (1.0 + cfg.energy.aux_fraction)
        self.aux = cfg.energy.aux_fraction
        self.adder = cfg.energy.adders_usd_per_mwh
        self.price = 45.0
        self.offline = np.zeros(n, dtype=bool)
        self.offline[self.rng.integers(0, n, max(1, n // 500))] = True
        self.i = 0

    def next(self) -> Tick:
        rng, n = self.rng, self.fs.n
        u = rng.random()
        if u < 0.03:  # a jump: spike, dip or back to normal
            self.price = float(rng.choice([-15.0, 20.0, 60.0, 140.0, 400.0]))
        elif u < 0.15:
            self.price += float(rng.normal(0.0, 8.0))
        else:
            self.price += float(rng.normal(0.0, 0.6))
        # Stretches of 40 ticks: cap free, binding a little, binding hard, a grid window.
        frac, grid = [(2.0, False), (0.8, False), (2.0, False), (0.6, False), (0.35, True)][
            (self.i // 40) % 5
        ]
        temp = self.base_temp_c + rng.normal(0.0, 0.4, n)
        stale = rng.random(n) < 0.002
        market = MarketInputs(
            price_usd_per_mwh=self.price + self.adder,
            hashprice_usd_per_ph_day=HASHPRICE,
            cap_w=frac * self.full_w * 0.99,
            aux_fraction=self.aux,
            cap_is_grid=grid,
        )
        miners = MinerInputs(
            stale=stale | self.offline, never_curtail=self.fs.never_curtail, temp_c=temp,
            priority=self.fs.priority, wake_s=self.fs.wake_s, offline=self.offline,
            force_sleep=None,
        )
        self.i += 1
        return Tick(market, miners, 1000.0 + TICK_S * self.i)


def knobs_of(cfg: SiteConfig) -> PolicyKnobs:
    pc = cfg.policy  # as controller/daemon/loop.py builds them
    return PolicyKnobs(
        min_run_s=pc.min_run_s, min_sleep_s=pc.min_sleep_s,
        hysteresis_usd_per_mwh=pc.hysteresis_usd_per_mwh,
        wake_latency_factor=pc.wake_latency_factor, ramp_kw_per_min=pc.ramp_kw_per_min,
        derate_start_c=pc.derate_start_c, critical_c=pc.critical_c,
    )


# -- the fair baseline ------------------------------------------------------------------


def kinds(p: FloatArray, h: FloatArray) -> IntArray:
    """Miners with equal points share a kind, numbered by their first miner (fixed per fleet)."""
    _, first, inv = np.unique(np.hstack([p, h]), axis=0, return_index=True, return_inverse=True)
    rank: IntArray = np.argsort(np.argsort(first))[inv.ravel()]
    return rank


def sorted_greedy(
    p: FloatArray, h: FloatArray, kind: IntArray, lo: npt.NDArray[np.integer],
    hi: npt.NDArray[np.integer], *,
    prio: npt.NDArray[np.integer], threshold: float, value: float, cost: float,
    budget_w: float,
) -> IntArray:
    """Every entry of every miner, sorted at each call, taken in order while it fits.

    p, h: (n, k) points per miner (column 0 sleep, padded rows repeat their last
    point); kind: from :func:`kinds` (only for the tie order); lo, hi: level bounds;
    prio: higher first; threshold: TH/s per W an entry must beat; value: $ per
    TH/s-hour; cost: $ per IT W-hour; budget_w: IT W for the whole fleet.
    Returns the level of every miner.
    """
    n, k = p.shape
    rows = np.arange(n)
    same = (p == p[:, -1:]) & (h == h[:, -1:])
    top = np.argmax(same, axis=1)
    hi = np.minimum(hi, top)
    lo = np.minimum(lo, hi)
    # Wake chord: sleep to the level (<= hi) the sleep point sees steepest, lowest first.
    with np.errstate(divide="ignore", invalid="ignore"):
        avg = (h[:, 1:] - h[:, :1]) / (p[:, 1:] - p[:, :1])
    avg[np.arange(1, k)[None, :] > hi[:, None]] = -np.inf
    wake = np.argmax(avg, axis=1) + 1
    has_chord = (lo == 0) & (hi >= 1)
    start = np.where(has_chord, wake, lo)
    # Step slopes, made non-increasing along each curve as prepare() does (steps inside
    # one linear segment of a curve differ by rounding; a miner's steps stay in order).
    with np.errstate(divide="ignore", invalid="ignore"):
        curve = (h[:, 2:] - h[:, 1:-1]) / (p[:, 2:] - p[:, 1:-1])
    curve = np.minimum.accumulate(np.where(np.arange(k - 2) < (top - 1)[:, None], curve,
                                           -np.inf), axis=1)
    # Entries laid out in the optimizer's tie order (wake chords first, then by level,
    # kind, miner), so that stable sorts by slope and then priority keep it among equals.
    by_kind = np.lexsort((rows, kind))
    chords = by_kind[has_chord[by_kind]]
    chords = chords[np.argsort(hi[chords] - 1, kind="stable")]
    e_miner, e_from, e_to = [chords], [np.zeros(chords.size, dtype=np.intp)], [wake[chords]]
    e_slope = [avg[chords, wake[chords] - 1]]
    for e in range(k - 2):  # step from level e+1 to e+2
        m = by_kind[((start <= e + 1) & (e + 1 < hi))[by_kind]]
        e_miner.append(m)
        e_from.append(np.full(m.size, e + 1))
        e_to.append(np.full(m.size, e + 2))
        e_slope.append(curve[m, e])
    miner, frm, to = np.concatenate(e_miner), np.concatenate(e_from), np.concatenate(e_to)
    slope = np.concatenate(e_slope)
    step = np.arange(miner.size) >= chords.size
    keep = slope > threshold
    miner, frm, to, slope, step = (a[keep] for a in (miner, frm, to, slope, step))
    order = np.argsort(-slope, kind="stable")
    order = order[np.argsort(-np.asarray(prio, dtype=np.int16)[miner[order]], kind="stable")]
    miner, frm, to, step = miner[order], frm[order], to[order], step[order]
    w = p[miner, to] - p[miner, frm]
    level = lo.astype(np.intp)
    room = budget_w - float(p[rows, lo].sum())
    cum = np.cumsum(w)
    cut = int(np.searchsorted(cum, room, side="right"))
    np.maximum.at(level, miner[:cut], to[:cut])  # a miner's entries come in chain order
    room -= float(cum[cut - 1]) if cut else 0.0
    # The fill: the rest of the order, taking what still fits; a miner whose entry is
    # skipped takes nothing more, but one whose wake does not fit may wake lower.
    at = np.full((n, k), -1, dtype=np.int64)  # order index of each miner's step from a level
    at[miner, frm] = np.arange(miner.size)
    first = np.full(n, -1, dtype=np.int64)  # each miner's first entry at or after the cut
    first[miner[cut:][::-1]] = np.arange(miner.size - 1, cut - 1, -1)
    heads = first[first >= 0]
    wake_min = p[miner[heads], 1] - p[miner[heads], 0]
    heads = heads[(w[heads] <= room) | (~step[heads] & (wake_min <= room))]
    smallest = min(float(w.min(initial=np.inf)), float((p[:, 1] - p[:, 0]).min()))
    heap = heads.tolist()
    heapq.heapify(heap)
    while heap and room >= smallest:
        j = heapq.heappop(heap)
        i = int(miner[j])
        if w[j] <= room:
            level[i] = to[j]
            room -= float(w[j])
            if to[j] < k and at[i, to[j]] >= 0:
                heapq.heappush(heap, int(at[i, to[j]]))
        elif not step[j]:
            below = np.arange(1, to[j])
            dp = p[i, below] - p[i, 0]
            dh = h[i, below] - h[i, 0]
            ok = (dp <= room) & (dh > threshold * dp)
            if ok.any():
                best = int(below[ok][np.argmax((value * dh - cost * dp)[ok])])
                level[i] = best
                room -= float(p[i, best] - p[i, 0])
    return level


# -- the run --------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call takes."""
    c0 = time.perf_counter()
    fn()
    return time.perf_counter() - c0


def percentiles(ms: list[float]) -> tuple[float, float, float, float]:
    a = np.asarray(ms)
    return (float(np.percentile(a, 50)), float(np.percentile(a, 90)),
            float(np.percentile(a, 99)), float(a.max()))


def bench(n: int, ticks: int, compare_every: int, spread: float) -> dict[str, Any]:
    cfg = site(n)
    fs = FleetState(cfg.inventory)
    if spread:
        fs.points_ths = fs.points_ths * np.random.default_rng(7).normal(1.0, spread, (fs.n, 1))
    t0 = time.perf_counter()
    fleet = opt.prepare(fs.points_w, fs.points_ths)
    prepare_ms = 1e3 * (time.perf_counter() - t0)
    knobs = knobs_of(cfg)
    kind = kinds(fs.points_w, fs.points_ths)
    state = PolicyState.initial(fs.n, fleet.max_level)
    src = Ticks(fs, cfg, seed=1)
    for _ in range(30):  # warm-up: the state settles, pages are touched
        t = src.next()
        decide(fleet, t.market, t.miners, state, knobs, now_s=t.now_s)

    decide_ms: list[float] = []
    cpu_ms: list[float] = []
    faults: list[int] = []
    solve_ms: list[float] = []
    greedy_ms: list[float] = []
    binding = mismatched = 0
    for j in range(ticks):
        t = src.next()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, p0 = time.perf_counter(), time.thread_time()
        d = decide(fleet, t.market, t.miners, state, knobs, now_s=t.now_s)
        decide_ms.append(1e3 * (time.perf_counter() - c0))
        cpu_ms.append(1e3 * (time.thread_time() - p0))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        binding += bool(d.cap_binding)
        if j % compare_every == 0:
            s_ms, g_ms, same = compare(fs, kind, fleet, t, knobs)
            solve_ms.append(s_ms)
            greedy_ms.append(g_ms)
            mismatched += not same
    alloc_mb = []
    tracemalloc.start()
    for _ in range(min(20, ticks)):
        t = src.next()
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        decide(fleet, t.market, t.miners, state, knobs, now_s=t.now_s)
        alloc_mb.append((tracemalloc.get_traced_memory()[1] - before) / 1e6)
    tracemalloc.stop()
    pass_ms = 1e3 * min(timed(lambda: float(fs.points_w.sum() + fs.points_ths.sum()))
                        for _ in range(5))
    return {
        "n": fs.n, "k": int(fs.points_w.shape[1]), "prepare_ms": prepare_ms,
        "kinds": getattr(fleet, "kinds", "-"),
        "decide": percentiles(decide_ms), "cpu": percentiles(cpu_ms),
        "solve": percentiles(solve_ms),
        "greedy": percentiles(greedy_ms), "alloc_mb": float(np.median(alloc_mb)),
        "alloc_mb_max": float(np.max(alloc_mb)), "faults": float(np.median(faults)),
        "pass_ms": pass_ms, "binding": binding / ticks, "ticks": ticks,
        "compared": len(solve_ms), "mismatched": mismatched,
    }


def compare(fs: FleetState, kind: IntArray, fleet: opt.PreparedFleet, t: Tick,
            knobs: PolicyKnobs) -> tuple[float, float, bool]:
    """solve() and the sorted greedy on the policy's hard bounds: times and equality."""
    m, mi = t.market, t.miners
    assert mi.temp_c is not None and mi.priority is not None
    hi, _, _ = thermal_max_level(fleet, mi.temp_c, knobs)
    unknown = mi.stale
    nc = mi.never_curtail & ~unknown
    hi = np.where(unknown, fleet.max_level, hi)
    lo = np.where(unknown | nc, hi, 0)
    c0 = time.perf_counter()
    plan = opt.solve(
        fleet, price_usd_per_mwh=m.price_usd_per_mwh,
        hashprice_usd_per_ph_day=m.hashprice_usd_per_ph_day, cap_w=m.cap_w,
        aux_fraction=m.aux_fraction, min_level=lo, max_level=hi, priority=mi.priority,
    )
    s_ms = 1e3 * (time.perf_counter() - c0)
    value = usd_per_ths_hour(m.hashprice_usd_per_ph_day)
    cost_mwh = opt.energy_cost_usd_per_mwh_it(m.price_usd_per_mwh, aux_fraction=m.aux_fraction)
    c0 = time.perf_counter()
    level = sorted_greedy(
        fs.points_w, fs.points_ths, kind, lo, hi, prio=mi.priority,
        threshold=opt.threshold_ths_per_w(cost_mwh, m.hashprice_usd_per_ph_day),
        value=value, cost=cost_mwh / 1e6, budget_w=m.cap_w / (1.0 + m.aux_fraction),
    )
    g_ms = 1e3 * (time.perf_counter() - c0)
    return s_ms, g_ms, bool(np.array_equal(level, plan.level))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,300000")
    parser.add_argument("--ticks", type=int, default=0, help="timed decisions (0: by size)")
    parser.add_argument("--spread", type=float, default=0.0, help="per-miner hashrate spread")
    args = parser.parse_args()
    rows = []
    load = os.getloadavg()[0]
    print("decide = policy + optimizer as the daemon calls it (wall, and CPU of this thread);")
    print("solve = optimizer alone; greedy = plain sorted greedy, same inputs, same answer;")
    print("ms percentiles over every timed tick; MB = peak allocated by one decision;")
    print(f"faults = minor page faults per decision; pass = one read of the points "
          f"(load average {load:.1f} on {os.cpu_count()} cores at the start)")
    print(f"{'miners':>8} {'k':>3} {'kinds':>5} {'decide p50':>10} {'p90':>6} {'p99':>6} "
          f"{'max':>6} {'cpu p50':>7} {'p99':>6} {'solve p50':>9} {'p99':>6} {'greedy p50':>10} "
          f"{'x':>5} {'MB':>5} {'faults':>6} {'pass':>5} {'bind':>4} {'same':>5}")
    for n in (int(s) for s in args.sizes.split(",")):
        ticks = args.ticks or (400 if n <= 100_000 else 150)
        r = bench(n, ticks, compare_every=max(ticks // 10, 1), spread=args.spread)
        rows.append(r)
        d, c, s, g = r["decide"], r["cpu"], r["solve"], r["greedy"]
        print(f"{r['n']:>8,} {r['k']:>3} {r['kinds']:>5} {d[0]:>10.2f} {d[1]:>6.2f} {d[2]:>6.2f} "
              f"{d[3]:>6.2f} {c[0]:>7.2f} {c[2]:>6.2f} {s[0]:>9.2f} {s[2]:>6.2f} {g[0]:>10.1f} "
              f"{g[0] / s[0]:>4.0f}x {r['alloc_mb']:>5.1f} {r['faults']:>6.0f} "
              f"{r['pass_ms']:>5.2f} {r['binding']:>4.2f} "
              f"{r['compared'] - r['mismatched']:>2}/{r['compared']:<2}", flush=True)
    print(f"(load average {os.getloadavg()[0]:.1f} at the end)")
    out: dict[str, Any] = {"spread": args.spread, "load_average": round(load, 2)}
    for r in rows:
        tag = f"{r['n'] // 1000}k"
        for name in ("decide", "cpu", "solve"):
            for i, q in enumerate(("p50", "p90", "p99")):
                out[f"{name}_{tag}_{q}_ms"] = round(r[name][i], 3)
        out[f"greedy_{tag}_p50_ms"] = round(r["greedy"][0], 3)
        out[f"alloc_{tag}_mb"] = round(r["alloc_mb"], 2)
        out[f"same_{tag}"] = f"{r['compared'] - r['mismatched']}/{r['compared']}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()

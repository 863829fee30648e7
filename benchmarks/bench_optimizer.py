"""Benchmark the curtailment optimizer against a naive bisection and a one-pass floor.

Run: ``python benchmarks/bench_optimizer.py``. Prints a table and, as its last line,
one JSON object (medians in ms). Not a test: it only measures.

Fleet: the catalogue's models, each with 8 operating points (sleep plus 7 power
targets spread over its firmware range, like a preset firmware), with +-4 %
unit-to-unit hashrate spread, so no two miners share a curve.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from controller.catalogue import load_catalogue
from controller.core import optimizer as opt
from controller.core.policy import MarketInputs, MinerInputs, PolicyKnobs, PolicyState, decide

FloatArray = npt.NDArray[np.float64]
PRICE, HASHPRICE, AUX = 35.0, 42.0, 0.05


def make_fleet(n: int, points: int = 8, seed: int = 0) -> tuple[FloatArray, FloatArray]:
    """(n, points) power and hashrate arrays from the catalogue's models."""
    models = list(load_catalogue().models.values())
    p_rows, h_rows = [], []
    for m in models:
        targets = np.linspace(m.min_w, m.max_w, points - 1)
        p_rows.append(np.concatenate([[m.sleep_w], targets]))
        h_rows.append(np.concatenate([[0.0], m.hashrate_ths(targets)]))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(models), n)
    spread = rng.normal(1.0, 0.04, n)[:, None]
    return np.array(p_rows)[pick], np.array(h_rows)[pick] * spread


def naive_solve(p: FloatArray, h: FloatArray, cap_w: float) -> npt.NDArray[np.intp]:
    """Baseline: 40-step bisection on the multiplier, every miner re-evaluated each step."""
    value = opt.usd_per_ths_hour(HASHPRICE)
    rows = np.arange(p.shape[0])

    def pick(multiplier: float) -> npt.NDArray[np.intp]:
        cost = (PRICE + multiplier) * (1 + AUX) / 1e6
        return np.argmax(value * h - cost * p, axis=1)

    def site_w(level: npt.NDArray[np.intp]) -> float:
        return float(p[rows, level].sum() * (1 + AUX))

    level = pick(0.0)
    if site_w(level) <= cap_w:
        return level
    lo, hi = 0.0, 1e5
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if site_w(pick(mid)) > cap_w:
            lo = mid
        else:
            hi = mid
    return pick(hi)


def floor_pass(p: FloatArray, h: FloatArray) -> float:
    """Lower bound for any decision: read both arrays once."""
    return float(p.sum() + h.sum())


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm up (page faults, caches)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def bench(n: int, reps: int, naive_reps: int) -> dict[str, float]:
    p, h = make_fleet(n)
    t = time.perf_counter()
    fleet = opt.prepare(p, h)
    prepare_ms = 1e3 * (time.perf_counter() - t)

    def solve(cap_w: float) -> opt.Plan:
        return opt.solve(
            fleet,
            price_usd_per_mwh=PRICE,
            hashprice_usd_per_ph_day=HASHPRICE,
            cap_w=cap_w,
            aux_fraction=AUX,
        )

    free = solve(1e15)
    cap = 0.6 * free.site_power_w  # binding: sheds 40 % of the economic load
    binding = solve(cap)
    assert binding.cap_binding and binding.site_power_w <= cap
    naive_level = naive_solve(p, h, cap)
    naive_w = float(p[np.arange(n), naive_level].sum() * (1 + AUX))
    assert naive_w <= cap

    state = PolicyState.initial(n, fleet.max_level)
    miners = MinerInputs(
        stale=np.zeros(n, dtype=bool),
        never_curtail=np.zeros(n, dtype=bool),
        temp_c=np.random.default_rng(1).normal(72.0, 6.0, n),
    )
    knobs = PolicyKnobs(min_run_s=0.0, min_sleep_s=0.0)
    market = MarketInputs(
        price_usd_per_mwh=PRICE, hashprice_usd_per_ph_day=HASHPRICE, cap_w=cap, aux_fraction=AUX
    )
    clock = iter(range(10**9))

    def run_decide() -> object:
        return decide(fleet, market, miners, state, knobs, now_s=float(next(clock)))

    state_bytes = state.level.nbytes + state.switched_at.nbytes + state.cheap_since_s.nbytes
    return {
        "n": n,
        "k": p.shape[1],
        "prepare_ms": prepare_ms,
        "free_ms": median_ms(lambda: solve(1e15), reps),
        "cap_ms": median_ms(lambda: solve(cap), reps),
        "decide_ms": median_ms(run_decide, reps),
        "naive_ms": median_ms(lambda: naive_solve(p, h, cap), naive_reps),
        "floor_ms": median_ms(lambda: floor_pass(p, h), reps),
        "cap_use": binding.site_power_w / cap,
        "naive_use": naive_w / cap,
        "bytes_per_miner": (fleet.nbytes + state_bytes) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    header = (
        f"{'miners':>9} {'k':>3} {'prepare':>9} {'free':>8} {'cap':>8} {'decide':>8} "
        f"{'naive':>9} {'floor':>7} {'speedup':>8} {'cap use':>8} {'naive use':>9} {'B/miner':>8}"
    )
    print("times are medians in ms; free = cap not binding, cap = cap binding (60 %),")
    print("decide = policy + optimizer with the cap binding; use = planned / cap")
    print(header)
    for n in sizes:
        reps = 25 if n <= 100_000 else 5
        naive_reps = 7 if n <= 100_000 else 3
        r = bench(n, reps, naive_reps)
        rows.append(r)
        print(
            f"{r['n']:>9,} {r['k']:>3} {r['prepare_ms']:>9.1f} {r['free_ms']:>8.2f} "
            f"{r['cap_ms']:>8.2f} {r['decide_ms']:>8.2f} {r['naive_ms']:>9.1f} "
            f"{r['floor_ms']:>7.2f} {r['naive_ms'] / r['cap_ms']:>7.1f}x "
            f"{r['cap_use']:>8.5f} {r['naive_use']:>9.5f} {r['bytes_per_miner']:>8.0f}",
            flush=True,
        )
    ref = next((r for r in rows if r["n"] == 100_000), rows[-1])
    summary = {
        "miners_100k_ms": round(ref["cap_ms"], 3),
        "miners_100k_free_ms": round(ref["free_ms"], 3),
        "decide_100k_ms": round(ref["decide_ms"], 3),
        "naive_100k_ms": round(ref["naive_ms"], 3),
        "speedup_vs_naive": round(ref["naive_ms"] / ref["cap_ms"], 2),
        "floor_100k_ms": round(ref["floor_ms"], 3),
        "bytes_per_miner": round(ref["bytes_per_miner"], 1),
        "points_per_miner": int(ref["k"]),
        "miners_1m_ms": round(rows[-1]["cap_ms"], 3) if rows[-1]["n"] >= 1_000_000 else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

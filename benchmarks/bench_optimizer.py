"""Benchmark the optimizer alone on the daemon's operating points, against a sorted greedy.

Run: ``python benchmarks/bench_optimizer.py [--sizes 10000,100000,300000,1000000]``.
Prints a table and, as its last line, one JSON object. Not a test: it only measures
(and checks that both methods give the same plan).

Fleet: the example site's racks scaled to n (benchmarks/bench_decision.py), points
from ``FleetState(cfg.inventory)``: the catalogue's firmware ranges in 100 W steps,
19 to 35 levels a miner, priorities as configured. ``solve`` is called as the policy
calls it, with priorities, every time at a new price (a random walk with jumps) and a
cap that is free, binding a little, binding hard, or a grid window; ``free`` and
``cap`` split the percentiles by whether the cap bound. The baseline builds every
entry of every miner and sorts them at each call (``sorted_greedy``), on the same
inputs, and must give the same plan. ``pass`` is one read of the (n, levels) points:
what any method that looks at every point of every miner pays at least.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from bench_decision import kinds, percentiles, site, sorted_greedy, timed

from controller.core import optimizer as opt
from controller.core.fleet_state import FleetState
from controller.units import usd_per_ths_hour

HASHPRICE, AUX = 42.0, 0.05
CAP_FRACTIONS = (2.0, 0.85, 0.6, 0.35)


def bench(n: int, solves: int, compared: int) -> dict[str, Any]:
    fs = FleetState(site(n).inventory)
    t0 = time.perf_counter()
    fleet = opt.prepare(fs.points_w, fs.points_ths)
    prepare_ms = 1e3 * (time.perf_counter() - t0)
    full_w = float(fs.max_w.sum()) * (1.0 + AUX)
    rng = np.random.default_rng(3)
    price = 45.0
    free_ms: list[float] = []
    cap_ms: list[float] = []
    greedy_ms: list[float] = []
    same = 0
    kind = kinds(fs.points_w, fs.points_ths)
    for j in range(solves):
        price = float(rng.choice([-10.0, 30.0, 90.0, 250.0])) if rng.random() < 0.05 else (
            price + float(rng.normal(0.0, 2.0)))
        cap = CAP_FRACTIONS[j % len(CAP_FRACTIONS)] * full_w
        c0 = time.perf_counter()
        plan = opt.solve(fleet, price_usd_per_mwh=price, hashprice_usd_per_ph_day=HASHPRICE,
                         cap_w=cap, aux_fraction=AUX, priority=fs.priority)
        (cap_ms if plan.cap_binding else free_ms).append(1e3 * (time.perf_counter() - c0))
        if j < compared:
            cost = opt.energy_cost_usd_per_mwh_it(price, aux_fraction=AUX)
            c0 = time.perf_counter()
            level = sorted_greedy(
                fs.points_w, fs.points_ths, kind, np.zeros(fs.n, np.intp), fleet.max_level,
                prio=fs.priority, threshold=opt.threshold_ths_per_w(cost, HASHPRICE),
                value=usd_per_ths_hour(HASHPRICE), cost=cost / 1e6, budget_w=cap / (1 + AUX))
            greedy_ms.append(1e3 * (time.perf_counter() - c0))
            same += bool(np.array_equal(level, plan.level))
    pass_ms = 1e3 * min(timed(lambda: float(fs.points_w.sum() + fs.points_ths.sum()))
                        for _ in range(5))
    return {
        "n": fs.n, "k": int(fs.points_w.shape[1]), "kinds": getattr(fleet, "kinds", "-"),
        "prepare_ms": prepare_ms, "free": percentiles(free_ms or [np.nan]),
        "cap": percentiles(cap_ms or [np.nan]), "greedy": percentiles(greedy_ms),
        "pass_ms": pass_ms, "same": same, "compared": compared,
        "bytes_per_miner": fleet.nbytes / fs.n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,300000,1000000")
    args = parser.parse_args()
    print("solve() with priorities on the daemon's points; ms percentiles over every call;")
    print("greedy = every entry sorted at each call, same inputs, same plan (p50);")
    print("B/miner = the prepared fleet's memory per miner")
    print(f"{'miners':>9} {'k':>3} {'kinds':>5} {'prepare':>8} {'free p50':>8} {'p99':>6} "
          f"{'cap p50':>8} {'p90':>6} {'p99':>6} {'greedy':>8} {'x':>5} {'pass':>6} "
          f"{'B/miner':>7} {'same':>5}")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        solves = 400 if n <= 100_000 else 120
        compared = 8 if n <= 300_000 else 2
        r = bench(n, solves, compared)
        rows.append(r)
        f, c, g = r["free"], r["cap"], r["greedy"]
        print(f"{r['n']:>9,} {r['k']:>3} {r['kinds']:>5} {r['prepare_ms']:>8.0f} {f[0]:>8.2f} "
              f"{f[2]:>6.2f} {c[0]:>8.2f} {c[1]:>6.2f} {c[2]:>6.2f} {g[0]:>8.1f} "
              f"{g[0] / c[0]:>4.0f}x {r['pass_ms']:>6.2f} {r['bytes_per_miner']:>7.0f} "
              f"{r['same']:>2}/{r['compared']:<2}", flush=True)
    out: dict[str, Any] = {}
    for r in rows:
        tag = f"{r['n'] // 1000}k"
        out[f"free_{tag}_p50_ms"] = round(r["free"][0], 3)
        out[f"cap_{tag}_p50_ms"] = round(r["cap"][0], 3)
        out[f"cap_{tag}_p99_ms"] = round(r["cap"][2], 3)
        out[f"greedy_{tag}_p50_ms"] = round(r["greedy"][0], 3)
        out[f"same_{tag}"] = f"{r['same']}/{r['compared']}"
        out[f"bytes_per_miner_{tag}"] = round(r["bytes_per_miner"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

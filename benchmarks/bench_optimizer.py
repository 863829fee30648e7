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

``stepped`` is an energy campus's case, the same call with ``cost_steps`` instead of one
price: on-site surplus at $0 (a quarter of the fleet's draw), surplus the site could
export at the market price (a tenth), then grid import at market plus $8 up to the cap;
every other call a $45 genset step first (dearer than the grid behind it on cheap
hours). ``best`` counts the checked calls whose plan earns, on the steps, at least what
the single-price plan at each step's price earns (the stepped plan must never be worse;
both without priorities, which trade profit for who sheds last).
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
    stepped_ms: list[float] = []
    best = 0
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
        steps = campus_steps(full_w, price, genset=j % 2 == 1)
        c0 = time.perf_counter()
        opt.solve(fleet, price_usd_per_mwh=price, hashprice_usd_per_ph_day=HASHPRICE,
                  cap_w=cap, aux_fraction=AUX, priority=fs.priority, cost_steps=steps)
        stepped_ms.append(1e3 * (time.perf_counter() - c0))
        if j < compared * 4:
            best += no_worse(fleet, steps, cap)
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
        "stepped": percentiles(stepped_ms), "best": best, "checked": min(compared * 4, solves),
        "bytes_per_miner": fleet.nbytes / fs.n,
    }


def campus_steps(full_w: float, price: float, *, genset: bool) -> opt.CostSteps:
    """Surplus at $0, exportable surplus at the market price, grid at price + $8."""
    widths = [0.25 * full_w, 0.10 * full_w, 10.0 * full_w]
    prices = [0.0, price, price + 8.0]
    if genset:
        widths.insert(0, 0.10 * full_w)
        prices.insert(0, 45.0)
    return opt.CostSteps(np.cumsum(widths), np.array(prices))


def profit_on(fleet: opt.PreparedFleet, plan: opt.Plan, steps: opt.CostSteps) -> float:
    revenue = usd_per_ths_hour(HASHPRICE) * float(plan.hashrate_ths.sum())
    return revenue - steps.cost_usd_per_h(plan.site_power_w)


def no_worse(fleet: opt.PreparedFleet, steps: opt.CostSteps, cap: float) -> bool:
    """The stepped plan earns on the steps at least what each flat-price plan does.

    Without priorities: they order who sheds under the cap, not what earns most.
    """
    plan = opt.solve(fleet, price_usd_per_mwh=0.0, hashprice_usd_per_ph_day=HASHPRICE,
                     cap_w=cap, aux_fraction=AUX, cost_steps=steps)
    ours = profit_on(fleet, plan, steps)
    for p in steps.price_usd_per_mwh.tolist():
        flat = opt.solve(fleet, price_usd_per_mwh=p, hashprice_usd_per_ph_day=HASHPRICE,
                         cap_w=cap, aux_fraction=AUX)
        if profit_on(fleet, flat, steps) > ours + 1e-6 * abs(ours) + 1e-3:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,300000,1000000")
    args = parser.parse_args()
    print("solve() with priorities on the daemon's points; ms percentiles over every call;")
    print("greedy = every entry sorted at each call, same inputs, same plan (p50);")
    print("B/miner = the prepared fleet's memory per miner; stepped = with campus cost steps,")
    print("best = its plans no worse on the steps than any flat-price plan")
    print(f"{'miners':>9} {'k':>3} {'kinds':>5} {'prepare':>8} {'free p50':>8} {'p99':>6} "
          f"{'cap p50':>8} {'p90':>6} {'p99':>6} {'greedy':>8} {'x':>5} {'pass':>6} "
          f"{'B/miner':>7} {'same':>5} {'stepped p50':>11} {'p99':>6} {'best':>7}")
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
              f"{r['same']:>2}/{r['compared']:<2} {r['stepped'][0]:>11.2f} "
              f"{r['stepped'][2]:>6.2f} {r['best']:>3}/{r['checked']:<3}", flush=True)
    out: dict[str, Any] = {}
    for r in rows:
        tag = f"{r['n'] // 1000}k"
        out[f"free_{tag}_p50_ms"] = round(r["free"][0], 3)
        out[f"cap_{tag}_p50_ms"] = round(r["cap"][0], 3)
        out[f"cap_{tag}_p99_ms"] = round(r["cap"][2], 3)
        out[f"greedy_{tag}_p50_ms"] = round(r["greedy"][0], 3)
        out[f"same_{tag}"] = f"{r['same']}/{r['compared']}"
        out[f"bytes_per_miner_{tag}"] = round(r["bytes_per_miner"], 1)
        out[f"stepped_{tag}_p50_ms"] = round(r["stepped"][0], 3)
        out[f"stepped_{tag}_p99_ms"] = round(r["stepped"][2], 3)
        out[f"stepped_best_{tag}"] = f"{r['best']}/{r['checked']}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()

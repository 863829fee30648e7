"""Benchmark: a year of 5-minute prices for a 10,000-miner fleet through `run_backtest`.

The prices are the packaged ERCOT trace (`ercot-hb-south-2024-summer`, 15-minute,
June-September 2024) resampled to 5 minutes with a little noise and repeated to a full
year (105,120 intervals); the fleet is deploy/site.example.toml's racks ten times over
(10,000 miners, cap x 10). Nothing is written into the project.
Run: .venv/bin/python benchmarks/bench_backtest.py
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

from controller.backtest import Settings, run_backtest
from controller.config import SiteConfig
from drivers.prices import load_prices

ROOT = Path(__file__).resolve().parent.parent
YEAR_5MIN = 365 * 288


def year_of_prices(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """105,120 five-minute prices from the ERCOT trace (resampled, noised, repeated)."""
    src = load_prices("ercot-hb-south-2024-summer").price_usd_per_mwh
    rng = np.random.default_rng(seed)
    five = np.repeat(src, 3)
    reps = -(-YEAR_5MIN // five.size)
    prices = np.tile(five, reps)[:YEAR_5MIN]
    prices = prices + rng.normal(0.0, 2.0, prices.size)
    start = 1_704_067_200.0 + 300.0 * np.arange(YEAR_5MIN)  # 2024-01-01 00:00 UTC
    return start, prices


def fleet_10k() -> SiteConfig:
    """The example site's racks ten times over: 10,000 miners in 8 models."""
    with (ROOT / "deploy/site.example.toml").open("rb") as f:
        data = tomllib.load(f)
    groups = [
        {**g, "name": f"{g['name']}-x{k}"} for k in range(10) for g in data["fleet"]["groups"]
    ]
    miners = [
        {**m, "id": f"{m['id']}-x{k}"} for k in range(10) for m in data["fleet"]["miners"]
    ]
    data["fleet"] = {"groups": groups, "miners": miners}
    data["power_cap_kw"] = data["power_cap_kw"] * 10
    # Group names changed: grid settings that name groups follow them.
    grid = data.get("grid", {})
    grid["keep_alive_groups"] = [f"{g}-x{k}" for k in range(10)
                                 for g in grid.get("keep_alive_groups", [])]
    return SiteConfig.model_validate(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hashprice", type=float, default=40.0)
    ap.add_argument("--adder", type=float, default=25.0)
    args = ap.parse_args()
    cfg = fleet_10k()
    start, prices = year_of_prices()
    settings = Settings.from_config(cfg, hashprice=args.hashprice, adder=args.adder)
    t0 = time.perf_counter()
    result = run_backtest(cfg, start, prices, 300.0, settings)
    elapsed = time.perf_counter() - t0
    s = result.summary()
    print(f"{len(cfg.inventory):,} miners x {s['intervals']:,} five-minute intervals: "
          f"{elapsed:.1f} s ({s['decisions']:,} decide() calls)")
    print(f"profit ${s['profit_usd']:,.0f}, optimum ${s['optimum_profit_usd']:,.0f}, "
          f"ratio {s['ratio_to_optimum']}, on/off ${s['onoff_profit_usd']:,.0f}")
    return 0 if elapsed < 60.0 else 1


if __name__ == "__main__":
    sys.exit(main())

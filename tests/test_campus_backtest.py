"""The campus backtest: traces from CSV onto the price grid, surplus used before the grid,
import avoided, and the hindsight bound for the same campus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.backtest.campus import (
    CampusTraces,
    campus_text_report,
    load_campus_traces,
    resample,
    run_campus_backtest,
)
from controller.backtest.engine import Settings
from controller.config import SiteConfig
from drivers.prices import PriceFileError

DAY = 1_717_200_000.0  # 2024-06-01 00:00 UTC
HOUR = 3600.0


def site(**campus: Any) -> SiteConfig:
    """20 S21s (about 80 kW with cooling) behind a 60 kW interconnect with solar and a GPU
    hall; no dwell or wake holds, so each interval's plan is its own."""
    table: dict[str, Any] = {
        "poi": {"import_limit_kw": 60.0, "meter": "poi"},
        "firm_loads": [{"id": "gpu-hall", "meter": "gpu", "max_kw": 30.0}],
        "generators": [{"id": "solar", "kind": "solar", "meter": "pv", "rating_kw": 50.0},
                       {"id": "genset", "kind": "genset", "meter": "gen", "rating_kw": 20.0,
                        "marginal_cost_usd_per_mwh": 45.0, "reserve_kw": 2.0,
                        "max_load_step_kw": 5.0}],
        **campus,
    }
    return SiteConfig.model_validate({
        "site_id": "bt", "fleet": {"groups": [{"name": "r1", "model": "s21", "count": 20}]},
        "meters": [{"type": "mineops", "id": "poi"},
                   *({"type": "mineops", "id": m, "role": "aux"} for m in ("gpu", "pv", "gen"))],
        "power_cap_kw": 100.0, "hashprice_usd_per_ph_day": 42.0,
        "energy": {"adders_usd_per_mwh": 8.0, "aux_fraction": 0.05},
        "policy": {"min_run_s": 0, "min_sleep_s": 0, "wake_latency_factor": 0,
                   "hysteresis_usd_per_mwh": 0, "cap_headroom_fraction": 0.0},
        "campus": table,
    })


def test_resample_averages_a_finer_trace_and_holds_a_coarser_one() -> None:
    five = np.arange(12, dtype=np.float64)  # an hour of 5-minute values 0..11
    start = DAY + np.arange(4) * 900.0
    got = resample(DAY + np.arange(12) * 300.0, 300.0, five, start, 900.0)
    assert got is not None and got.tolist() == [1.0, 4.0, 7.0, 10.0]
    hourly = np.array([10.0, 20.0])
    got = resample(DAY + np.arange(2) * HOUR, HOUR, hourly, DAY + np.arange(8) * 900.0, 900.0)
    assert got is not None and got.tolist() == [10.0] * 4 + [20.0] * 4
    # A trace that ends before the prices do covers nothing.
    assert resample(DAY + np.arange(2) * HOUR, HOUR, hourly, DAY + np.arange(9) * 900.0,
                    900.0) is None


def write(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_traces_are_read_like_price_files(tmp_path: Path) -> None:
    cfg = site()
    assert cfg.campus is not None
    # 5-minute trace in US Central time (naive, with --timezone), 15-minute prices in UTC.
    rows = ["timestamp,gpu-hall,solar"] + [
        f"2024-05-31T19:{m:02d}:00,{10 + i},{2 * i}" for i, m in enumerate(range(0, 60, 5))]
    path = write(tmp_path / "campus.csv", rows)
    start = DAY + np.arange(4) * 900.0  # 00:00-01:00 UTC = 19:00-20:00 CDT
    traces = load_campus_traces(path, cfg.campus, start, 900.0, timezone="America/Chicago")
    assert traces.part_w["gpu-hall"].tolist() == [11e3, 14e3, 17e3, 20e3]
    assert traces.part_w["solar"].tolist() == [2e3, 8e3, 14e3, 20e3]
    assert traces.missing == ("genset",)
    with pytest.raises(PriceFileError, match="not the prices' whole period"):
        load_campus_traces(path, cfg.campus, DAY + np.arange(5) * 900.0, 900.0,
                           timezone="America/Chicago")
    other = write(tmp_path / "other.csv", ["timestamp,office", "2024-06-01T00:00:00Z,1",
                                           "2024-06-01T00:15:00Z,1"])
    with pytest.raises(PriceFileError, match="no column named after a campus part"):
        load_campus_traces(other, cfg.campus, start[:1], 900.0)


def run(cfg: SiteConfig, price: list[float], parts: dict[str, list[float]],
        **kw: Any) -> Any:
    start = DAY + np.arange(len(price)) * HOUR
    traces = CampusTraces({k: np.array(v) * 1000.0 for k, v in parts.items()},
                          missing=("genset",), source="test")
    return run_campus_backtest(cfg, start, np.array(price), HOUR, Settings.from_config(cfg),
                               traces, **kw)


def test_surplus_is_used_before_grid_power_and_priced_as_such() -> None:
    cfg = site()
    # Hours 0-1: $300 grid power (an S21 breaks even near $100), 40 kW of solar over a
    # 10 kW GPU hall: 30 kW of surplus. Hours 2-3: $30 grid power, no solar.
    price = [300.0, 300.0, 30.0, 30.0]
    result = run(cfg, price, {"gpu-hall": [10, 10, 10, 10], "solar": [40, 40, 0, 0]})
    s = result.summary()
    mo, flat, best = (s["strategies"][k] for k in ("mineops", "mineops_grid_price", "optimum"))
    # mineops decides hour 0 on hour 0's price (the first has no previous): the miners fill
    # the 30 kW of surplus, within one entry (an S21 wakes at 1.8 kW, steps by 100 W), and
    # take no grid power at $308.
    taken = result.series["mineops"].site_w[:2]
    assert np.all((taken <= 30_000) & (taken >= 30_000 - 1800 * 1.05))
    ours = result.series["mineops"]
    assert ours.surplus_mwh.sum() == pytest.approx(taken.sum() / 1e6, rel=1e-9)
    assert result.series["mineops"].grid_mwh[:2].tolist() == [0.0, 0.0]
    # ... where the grid price alone would run nothing at $308 (asleep, 15 W each).
    asleep_w = 20 * 15 * 1.05
    assert result.series["mineops_grid_price"].site_w[:2] == pytest.approx([asleep_w] * 2)
    assert flat["surplus_mwh"] == pytest.approx(2 * asleep_w / 1e6, abs=1e-3)
    # Hour 2 was decided on hour 1's $300: nothing (the surplus is gone); hour 3 on $30:
    # the 50 kW of headroom (60 kW import - 10 kW GPU) filled, for 84 kW of miners.
    assert result.series["mineops"].site_w[2] == pytest.approx(asleep_w)
    assert 50_000 - 1800 * 1.05 <= result.series["mineops"].site_w[3] <= 50_000
    # Import avoided: what the surplus energy would have cost from the grid ($308), minus
    # the $0 it cost as curtailed solar.
    avoided = (ours.grid_cost_usd - ours.energy_cost_usd).sum()
    assert avoided == pytest.approx(taken.sum() / 1e6 * 308.0, rel=1e-9)
    assert mo["import_avoided_usd"] == pytest.approx(avoided, abs=0.01)
    assert s["surplus_available_mwh"] == pytest.approx(0.060, rel=1e-9)
    # The bound for the same campus is a bound, and pricing by the campus's steps beats
    # pricing by the grid alone.
    assert best["profit_usd"] >= mo["profit_usd"] - 1e-6
    assert s["gain_over_grid_price_usd"] > 0
    assert mo["profit_usd"] > flat["profit_usd"]
    text = campus_text_report(result)
    assert "hindsight bound (campus)" in text and "import avoided" in text
    assert "counted at their worst case: genset" in text


def test_the_headroom_binds_and_the_bound_holds_on_a_varied_day() -> None:
    cfg = site(poi={"import_limit_kw": 60.0, "export_limit_kw": 10.0, "meter": "poi"})
    rng = np.random.default_rng(7)
    hours = 48
    price = (60 + 80 * np.sin(np.arange(hours) / 24 * 2 * np.pi) + rng.normal(0, 30, hours))
    solar = np.clip(50 * np.sin((np.arange(hours) % 24 - 6) / 14 * np.pi), 0, None)
    gpu = rng.choice([5.0, 25.0], hours)
    result = run(cfg, price.tolist(), {"gpu-hall": gpu.tolist(), "solar": solar.tolist()})
    s = result.summary()
    for name in ("mineops", "mineops_grid_price", "optimum"):
        x = result.series[name]
        # The miners never take more than the campus leaves them.
        assert np.all(x.site_w <= result.headroom_w + 1e-6), name
        assert np.all(x.site_w <= 100_000 + 1e-6)
    best = s["strategies"]["optimum"]["profit_usd"]
    assert best >= s["strategies"]["mineops"]["profit_usd"] - 1e-6
    assert best >= s["strategies"]["mineops_grid_price"]["profit_usd"] - 1e-6
    assert 0.8 < s["ratio_to_optimum"] <= 1.0


def test_cohorts_give_the_per_miner_result() -> None:
    cfg = site()
    price = [300.0, 120.0, 95.0, 30.0, 200.0]
    parts = {"gpu-hall": [10, 20, 5, 25, 10], "solar": [40, 10, 30, 0, 45]}
    fast = run(cfg, price, parts)
    exact = run(cfg, price, parts, exact=True)
    for name in ("mineops", "optimum"):
        assert fast.series[name].site_w == pytest.approx(exact.series[name].site_w, rel=1e-9)
        assert fast.summary()["strategies"][name] == exact.summary()["strategies"][name]


def test_cli_backtest_with_campus_traces(tmp_path: Path) -> None:
    import json  # noqa: PLC0415

    from tests.test_demo_cli import mineops  # noqa: PLC0415

    site_toml = tmp_path / "site.toml"
    site_toml.write_text("""
site_id = "bt"
power_cap_kw = 100
hashprice_usd_per_ph_day = 42
[[fleet.groups]]
name = "r1"
model = "s21"
count = 20
[[meters]]
type = "mineops"
id = "poi"
[[meters]]
type = "mineops"
id = "pv"
role = "aux"
[campus.poi]
import_limit_kw = 60
meter = "poi"
[[campus.generators]]
id = "solar"
kind = "solar"
meter = "pv"
rating_kw = 50
""")
    hours = [f"2024-06-01T{h:02d}:00:00Z" for h in range(6)]
    prices = write(tmp_path / "prices.csv", ["timestamp,price_usd_per_mwh"]
                   + [f"{t},{p}" for t, p in zip(hours, [300, 300, 30, 30, 300, 30], strict=True)])
    traces = write(tmp_path / "campus.csv", ["timestamp,solar"]
                   + [f"{t},{kw}" for t, kw in zip(hours, [40, 40, 0, 0, 20, 0], strict=True)])
    r = mineops("backtest", "--config", str(site_toml), "--prices", str(prices),
                "--campus-traces", str(traces), "--json", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout)
    assert set(s["strategies"]) == {"mineops", "mineops_grid_price", "optimum"}
    assert s["surplus_available_mwh"] == pytest.approx(0.1)
    assert s["strategies"]["mineops"]["surplus_mwh"] > 0.05
    assert s["strategies"]["optimum"]["profit_usd"] >= s["strategies"]["mineops"]["profit_usd"]
    # A site file without a campus: a usage error that says so.
    plain = tmp_path / "plain.toml"
    plain.write_text(site_toml.read_text().split("[campus.poi]")[0])
    r = mineops("backtest", "--config", str(plain), "--prices", str(prices),
                "--campus-traces", str(traces))
    assert r.returncode == 2 and "has no [campus] table" in r.stderr

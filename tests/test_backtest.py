"""Backtest: accounting, ordering of strategies, hand-computed case, exactness, real ERCOT data."""

from __future__ import annotations

import json
import math
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.backtest import (
    STRATEGIES,
    BacktestResult,
    Settings,
    Window,
    WindowFileError,
    load_windows,
    run_backtest,
)
from controller.catalogue import load_catalogue
from controller.cli.main import main
from controller.config import SiteConfig
from drivers.prices import load_prices
from tests.conftest import ERCOT

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_717_200_000.0  # 2024-06-01 00:00 UTC
MODELS = sorted(load_catalogue().models)


def site(groups: list[tuple[str, int]], *, cap_kw: float = 10_000.0, hashprice: float = 40.0,
         adder: float = 0.0, aux: float = 0.05, policy: dict[str, Any] | None = None,
         priority: dict[int, int] | None = None) -> SiteConfig:
    return SiteConfig.model_validate({
        "site_id": "bt",
        "fleet": {"groups": [
            {"name": f"g{i}", "model": m, "count": c, "priority": (priority or {}).get(i, 0)}
            for i, (m, c) in enumerate(groups)
        ]},
        "power_cap_kw": cap_kw,
        "hashprice_usd_per_ph_day": hashprice,
        "energy": {"adders_usd_per_mwh": adder, "aux_fraction": aux},
        "policy": {"cap_headroom_fraction": 0.0, **(policy or {})},
    })


def run(cfg: SiteConfig, prices: list[float] | np.ndarray, interval_s: float = 900.0,
        **kw: Any) -> BacktestResult:
    p = np.asarray(prices, dtype=np.float64)
    start = (T0 + interval_s * np.arange(p.size)).astype(np.float64)
    return run_backtest(cfg, start, p, interval_s, Settings.from_config(cfg), **kw)


def check_accounts(r: BacktestResult) -> None:
    dt_h = r.interval_s / 3600.0
    aux1 = 1.0 + r.settings.aux_fraction
    value = r.settings.hashprice_usd_per_ph_day / 1000.0 / 24.0
    s = r.summary()
    for name in STRATEGIES:
        x = r.series[name]
        np.testing.assert_allclose(x.revenue_usd - x.energy_cost_usd, x.profit_usd, atol=1e-9)
        np.testing.assert_allclose(x.energy_mwh, x.it_w * aux1 * dt_h / 1e6, rtol=1e-12)
        np.testing.assert_allclose(
            x.energy_cost_usd,
            (r.price_usd_per_mwh + r.settings.adder_usd_per_mwh) * x.energy_mwh, rtol=1e-12,
            atol=1e-12)
        np.testing.assert_allclose(x.revenue_usd, x.ths * value * dt_h, rtol=1e-12)
        np.testing.assert_allclose(x.class_it_w.sum(axis=1), x.it_w, rtol=1e-12)
        fits = r.cap_w > 0
        assert np.all(x.site_w[fits] <= r.cap_w[fits] * (1 + 1e-9) + 1e-6)
        t = s["strategies"][name]
        assert t["profit_usd"] == pytest.approx(t["revenue_usd"] - t["energy_cost_usd"], abs=0.02)
        assert t["energy_mwh"] == pytest.approx(float(x.energy_mwh.sum()), abs=1e-3)
    models = r.by_model()
    assert sum(m["profit_usd"] for m in models.values()) == pytest.approx(s["profit_usd"], abs=1)
    assert sum(m["miners"] for m in models.values()) == s["miners"]


# -- hand-computed ------------------------------------------------------------------------


def test_two_miners_four_intervals_by_hand() -> None:
    """An S21 and an S19j Pro, prices 10, 10, 300, 10 $/MWh, adder 10, aux 5 %.

    At $10 (+10 adder, x1.05) every step of both curves pays, so mineops and the optimum
    run both at their top targets (3800 W / 210.3 TH/s and 3300 W / 108.7 TH/s). mineops
    decides interval 2 on interval 1's price, so it runs through the $300 spike and
    sleeps in interval 3 (decided on $300). The optimum sleeps in the spike only. Stock
    is the firmware target nearest nominal: 3500 W / 200 TH/s and 3100 W, where the
    S19j Pro's curve gives 104 + 32/232 * 4.7 TH/s. Sleep draws 15 W each.
    """
    cfg = site([("s21", 1), ("s19j_pro", 1)], adder=10.0, aux=0.05)
    r = run(cfg, [10.0, 10.0, 300.0, 10.0])
    v = 40.0 / 1000 / 24 * 0.25  # $ per TH/s per interval
    aux1 = 1.05

    def money(price: float, watts: float, ths: float) -> float:
        mwh = watts * aux1 * 0.25 / 1e6
        return ths * v - (price + 10.0) * mwh

    top = (3800.0 + 3300.0, 210.3 + 108.7)
    sleep = (30.0, 0.0)
    stock = (3500.0 + 3100.0, 200.0 + 104.0 + 32.0 / 232.0 * 4.7)
    prices = [10.0, 10.0, 300.0, 10.0]
    expect = {
        "mineops": [top, top, top, sleep],
        "optimum": [top, top, sleep, top],
        "always_on": [stock] * 4,
        "onoff": [stock, stock, stock, sleep],
        "optimum_onoff": [stock, stock, sleep, stock],
    }
    for name, plan in expect.items():
        want = [money(p, w, h) for p, (w, h) in zip(prices, plan, strict=True)]
        np.testing.assert_allclose(r.series[name].profit_usd, want, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(r.series[name].it_w, [w for w, _ in plan], err_msg=name)
    s = r.summary()
    assert s["profit_usd"] == pytest.approx(sum(money(p, *x) for p, x in
                                                zip(prices, expect["mineops"], strict=True)),
                                            abs=0.006)
    assert s["ratio_to_optimum"] == pytest.approx(
        float(r.series["mineops"].profit_usd.sum() / r.series["optimum"].profit_usd.sum()),
        abs=1e-5)
    check_accounts(r)


# -- constant prices, spikes ---------------------------------------------------------------


def test_constant_price_below_every_break_even_all_agree() -> None:
    cfg = site([(m, 3) for m in MODELS], adder=5.0)
    cheapest = min(load_catalogue().get(m).breakeven_usd_per_mwh(40.0) for m in MODELS)
    r = run(cfg, np.full(48, cheapest / 4))
    s = r.summary()
    for name in STRATEGIES:
        assert np.all(r.series[name].asleep == 0), f"{name} slept below every break-even"
    # With nothing to curtail, mineops is the optimum and on/off is always-on.
    assert s["profit_usd"] == pytest.approx(s["optimum_profit_usd"], abs=1e-6)
    assert s["onoff_profit_usd"] == pytest.approx(s["always_on_profit_usd"], abs=1e-6)
    np.testing.assert_array_equal(r.series["mineops"].it_w, r.series["optimum"].it_w)
    assert s["curtailed_hours"] == 0
    check_accounts(r)


def test_spike_above_every_break_even_everything_sleeps() -> None:
    cfg = site([(m, 2) for m in MODELS])
    highest = max(load_catalogue().get(m).breakeven_usd_per_mwh(40.0) for m in MODELS)
    prices = np.array([20.0] * 6 + [highest * 3] * 5 + [20.0] * 6)
    spike = np.flatnonzero(prices > highest)
    r = run(cfg, prices)
    n = 2 * len(MODELS)
    # The optimum knows each interval's price: asleep for the whole spike.
    assert np.all(r.series["optimum"].asleep[spike] == n)
    # No look-ahead: the first spike interval was decided on the last normal price;
    # from the next one on, mineops and on/off sleep through it.
    for name in ("mineops", "onoff"):
        assert np.all(r.series[name].asleep[spike[1:]] == n), name
        assert r.series[name].asleep[spike[0]] == 0, name
    # Sleep draw only, during the held intervals.
    assert np.allclose(r.series["mineops"].it_w[spike[1:]], 15.0 * n)
    # Back on after the spike (wake latency: within the first interval after it).
    after = spike[-1] + 2
    assert r.series["mineops"].asleep[after] < n
    assert np.all(r.series["mineops"].asleep[after + 1:] == 0)
    check_accounts(r)


# -- any input: the optimum is the ceiling -------------------------------------------------


prices_st = st.lists(
    st.one_of(st.floats(-20, 80), st.floats(80, 400), st.sampled_from([1000.0, 3000.0])),
    min_size=2, max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prices=prices_st,
    models=st.lists(st.tuples(st.sampled_from(MODELS), st.integers(1, 9)), min_size=1,
                    max_size=4),
    cap_frac=st.floats(0.05, 1.5),
    hashprice=st.floats(20, 90),
    adder=st.floats(0, 50),
    interval=st.sampled_from([300.0, 900.0]),
    prio=st.booleans(),
)
def test_optimum_is_the_ceiling_on_any_input(
    *, prices: list[float], models: list[tuple[str, int]], cap_frac: float, hashprice: float,
    adder: float, interval: float, prio: bool,
) -> None:
    cat = load_catalogue()
    max_kw = sum(cat.get(m).max_w * c for m, c in models) / 1000 * 1.05
    cfg = site(models, cap_kw=max(max_kw * cap_frac, 0.1), hashprice=hashprice, adder=adder,
               priority={0: 3} if prio else None)
    r = run(cfg, prices, interval)
    opt = r.series["optimum"].profit_usd
    # The optimizer is exact when the cap does not bind and within one firmware step (or
    # one wake-up) of the best combination when it does; a cent of tolerance per interval.
    tol = 1e-6 + 0.01 * len(prices)
    for name in ("mineops", "always_on", "onoff", "optimum_onoff"):
        assert opt.sum() >= r.series[name].profit_usd.sum() - tol, name
    # Per interval, the baselines live in the optimum's own operating points.
    unbound = r.series["optimum"].site_w < r.cap_w * 0.999 - 4000 * 1.05
    for name in ("always_on", "onoff", "optimum_onoff"):
        gap = opt[unbound] - r.series[name].profit_usd[unbound]
        assert np.all(gap >= -1e-9), name
    check_accounts(r)


def test_optimum_fills_what_a_wake_chord_cut_leaves() -> None:
    """Found by the test above: the optimum left both miners asleep, mineops ran one.

    Prices [0, 0], an S19 XP (priority 3) and an M60S, cap 25 % of their maximum incl.
    5 % aux (1,837.5 W), hashprice 20, no adder, 15-minute intervals. The M60S wakes
    best (116.7 TH/s for 1,785 W) but does not fit in the 1,720 W left after both
    control boards; the S19 XP does, at 1,700 W (92.7 TH/s). Right: both run it.
    """
    cat = load_catalogue()
    models = [("s19_xp", 1), ("m60s", 1)]
    max_kw = sum(cat.get(m).max_w * c for m, c in models) / 1000 * 1.05
    cfg = site(models, cap_kw=max_kw * 0.25, hashprice=20.0, adder=0.0, priority={0: 3})
    r = run(cfg, [0.0, 0.0], 900.0)
    for name in ("optimum", "mineops"):
        np.testing.assert_array_equal(r.series[name].class_it_w, [[1700.0, 15.0]] * 2, name)
    ths = 88.8 + 100.0 / 206.0 * (96.9 - 88.8)  # the catalogue's curve at 1,700 W
    value = 20.0 / 1000 / 24 * 0.25  # $ per TH/s per interval
    np.testing.assert_allclose(r.series["optimum"].profit_usd, [ths * value] * 2, rtol=1e-12)
    assert r.series["optimum"].profit_usd.sum() >= r.series["mineops"].profit_usd.sum()
    check_accounts(r)


# -- the fast path equals the per-miner run -----------------------------------------------


@pytest.mark.parametrize("cap_kw", [300.0, 90.0, 60.0])
def test_cohorts_match_per_miner_run(cap_kw: float) -> None:
    cfg = site([("s19j_pro", 13), ("s21", 9), ("s19j_pro", 7), ("m60s", 11),
                ("s21_xp_hydro", 5)], cap_kw=cap_kw, adder=20.0, priority={3: 1})
    prices = load_prices(ERCOT).price_usd_per_mwh[6000:6400]
    fast = run(cfg, prices)
    exact = run(cfg, prices, exact=True)
    for name in STRATEGIES:
        a, b = fast.series[name], exact.series[name]
        np.testing.assert_allclose(a.it_w, b.it_w, rtol=1e-12, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(a.ths, b.ths, rtol=1e-12, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(a.asleep, b.asleep, atol=1e-9, err_msg=name)
    assert fast.decisions < exact.decisions


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prices=st.lists(st.one_of(st.floats(-20, 120), st.sampled_from([0.0, 300.0])), min_size=2,
                    max_size=12),
    models=st.lists(st.tuples(st.sampled_from(MODELS), st.integers(1, 6)), min_size=1,
                    max_size=3),
    cap_frac=st.floats(0.05, 1.1),
    prio=st.booleans(),
)
def test_cohorts_match_per_miner_run_on_any_input(
    *, prices: list[float], models: list[tuple[str, int]], cap_frac: float, prio: bool,
) -> None:
    """Wherever the cap cuts (a step, a wake-up, the leftover after it), cohorts split right."""
    cat = load_catalogue()
    max_kw = sum(cat.get(m).max_w * c for m, c in models) / 1000 * 1.05
    cfg = site(models, cap_kw=max(max_kw * cap_frac, 0.1), adder=5.0,
               priority={0: 2} if prio else None)
    fast = run(cfg, prices, with_window_cost=False)
    exact = run(cfg, prices, exact=True, with_window_cost=False)
    for name in STRATEGIES:
        a, b = fast.series[name], exact.series[name]
        np.testing.assert_allclose(a.it_w, b.it_w, rtol=1e-12, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(a.ths, b.ths, rtol=1e-12, atol=1e-6, err_msg=name)


# -- grid windows ---------------------------------------------------------------------------


def test_grid_windows_lower_the_cap_and_show_their_cost(tmp_path: Path) -> None:
    cfg = site([("s21", 10), ("s19j_pro", 10)], cap_kw=100.0)
    f = tmp_path / "w.csv"
    f.write_text("start,end,cap_kw,name\n"
                 "2024-06-01T02:00:00Z,2024-06-01T03:00:00Z,20,4cp\n"
                 f"{T0 + 5 * 3600:.0f},{T0 + 5.5 * 3600:.0f},0,shed all\n")
    windows = load_windows(f)
    assert [w.name for w in windows] == ["4cp", "shed all"]
    r = run(cfg, np.full(32, 25.0), windows=windows)
    hit = r.grid_window
    assert hit.sum() == 6
    dr = hit & (r.cap_w > 0)
    for name in STRATEGIES:
        x = r.series[name]
        assert np.all(x.site_w[dr] <= r.cap_w[dr] + 1e-6), name
        # A zero cap cannot be met by sleeping miners (control boards draw): all asleep.
        assert np.all(x.asleep[r.cap_w == 0] == 20), name
    s = r.summary()
    assert s["grid_window_intervals"] == 6
    assert s["grid_window_cost_usd"] > 0
    check_accounts(r)
    j = tmp_path / "w.json"
    j.write_text(json.dumps({"windows": [{"start": T0, "end": T0 + 900, "cap_kw": 5}]}))
    assert load_windows(j) == [Window(T0, T0 + 900, 5.0)]


@pytest.mark.parametrize(("text", "why"), [
    ("start,end\n1,2\n", "missing column"),
    ("start,end,cap_kw\n2024-06-01T01:00:00,2024-06-01T00:00:00,5\n", "end after start"),
    ("start,end,cap_kw\nyesterday,2024-06-01,5\n", "line 2: unparseable"),
])
def test_bad_window_files_are_clear_errors(tmp_path: Path, text: str, why: str) -> None:
    f = tmp_path / "w.csv"
    f.write_text(text)
    with pytest.raises(WindowFileError, match=why):
        load_windows(f)


# -- CLI ------------------------------------------------------------------------------------


def write_site(tmp_path: Path) -> Path:
    f = tmp_path / "site.toml"
    f.write_text('site_id = "cli"\npower_cap_kw = 60\nhashprice_usd_per_ph_day = 45\n'
                 '[[fleet.groups]]\nname = "r1"\nmodel = "s21"\ncount = 8\n'
                 '[[fleet.groups]]\nname = "r2"\nmodel = "s19j_pro"\ncount = 8\n')
    return f


def test_cli_json_and_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prices = tmp_path / "p.csv"
    rows = [f"{T0 + 300 * i:.0f},{20 + 40 * math.sin(i / 7):.2f}" for i in range(300)]
    prices.write_text("timestamp,price_usd_per_mwh\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = main(["backtest", "--config", str(write_site(tmp_path)), "--prices", str(prices),
                 "--adder", "12", "--json", "--out", str(out), "--progress", "off"])
    assert code == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("profit_usd", "revenue_usd", "energy_cost_usd", "energy_mwh",
                "optimum_profit_usd", "always_on_profit_usd", "onoff_profit_usd",
                "ratio_to_optimum", "intervals"):
        assert key in s
    assert s["intervals"] == 300 and s["adder_usd_per_mwh"] == 12
    assert (out / "backtest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "backtest.csv").read_text().splitlines()
    assert len(lines) == 301 and lines[0].startswith("interval_start_utc,price_usd_per_mwh")


def test_cli_text_report_on_ercot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["backtest", "--config", str(write_site(tmp_path)), "--prices", ERCOT,
                 "--price-column", "hb_south_dam_spp_usd_mwh", "--knob",
                 "hysteresis_usd_per_mwh=2", "--progress", "off"])
    assert code == 0
    text = capsys.readouterr().out
    assert "ratio_to_optimum" in text and "11,712 intervals" in text and "elapsed" in text


@pytest.mark.parametrize(("content", "args", "why"), [
    ("timestamp,price_usd_per_mwh\n2024-06-01 00:00,1\n2024-06-01 00:15,2\n"
     "2024-06-01 00:30,3\n2024-06-01 01:00,3\n2024-06-01 01:15,3\n", [], "gap"),
    ("timestamp,price_usd_per_mwh\n2024-06-01 00:00,1\n2024-06-01 00:15,2\n"
     "2024-06-01 00:15,3\n2024-06-01 00:30,3\n", [], "duplicate"),
    ("timestamp,price_usd_per_mwh\n2024-06-01 00:00,1\n2024-06-01 00:15,abc\n", [],
     "unparseable"),
    ("timestamp,price_usd_per_mwh\n2024-06-01 00:00,1\n2024-06-01 00:15,2\n",
     ["--price-column", "nope"], "unknown column"),
    ("timestamp,price_usd_per_mwh\n2024-06-01 00:00,1\n2024-06-01 00:15,2\n",
     ["--knob", "nope=1"], "--knob"),
])
def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                    args: list[str], why: str) -> None:
    prices = tmp_path / "p.csv"
    prices.write_text(content)
    code = main(["backtest", "--config", str(write_site(tmp_path)), "--prices", str(prices),
                 *args])
    assert code == 2
    assert why in capsys.readouterr().err


# -- the targets on real ERCOT prices ------------------------------------------------------


def test_ercot_six_cases_close_to_optimum_and_beat_onoff() -> None:
    """The example site's mix at 1/8 scale (123 miners, the same models and shares).

    Cohorts make the cost independent of the fleet size; the 1,000-miner run of the docs
    gives the same ratios to three decimals.
    """
    with (ROOT / "deploy" / "site.example.toml").open("rb") as f:
        data = tomllib.load(f)
    for g in data["fleet"]["groups"]:
        g["count"] = max(1, g["count"] // 8)
    data["fleet"]["miners"] = data["fleet"]["miners"][::8]
    data["power_cap_kw"] /= 8
    cfg = SiteConfig.model_validate(data)
    prices = load_prices(ERCOT)
    results = {}
    for hp in (40.0, 55.0):
        for adder in (0.0, 25.0, 40.0):
            st_ = Settings.from_config(cfg, hashprice=hp, adder=adder)
            r = run_backtest(cfg, prices.start_s, prices.price_usd_per_mwh, prices.interval_s,
                             st_)
            results[(hp, adder)] = r.summary()
    for case, s in results.items():
        assert s["ratio_to_optimum"] >= 0.985, (case, s["ratio_to_optimum"])
        assert s["profit_usd"] > s["onoff_profit_usd"], case
        assert s["optimum_profit_usd"] >= s["profit_usd"], case


# -- prices beyond the site's [energy] bounds ---------------------------------------------


def spike_file(tmp_path: Path, spike: float = 9000.0) -> Path:
    """The reviewer's file: 15-minute prices at $25 with two intervals at `spike`."""
    rows = [f"2024-06-01T{9 + i // 4:02d}:{15 * (i % 4):02d}:00-05:00,"
            f"{spike if i in (3, 4) else 25.0:g}" for i in range(8)]
    path = tmp_path / "spike9k.csv"
    path.write_text("timestamp,price_usd_per_mwh\n" + "\n".join(rows) + "\n")
    return path


def test_prices_beyond_the_cap_are_decided_on_at_the_cap_and_settled_as_paid() -> None:
    cfg = site([("s21", 4), ("s19j_pro", 4)])
    prices = [25.0] * 4 + [9000.0] * 2 + [25.0] * 4
    r = run(cfg, prices)
    assert r.prices_clamped == {"cap": 2, "floor": 0}
    assert r.summary()["prices_clamped"] == {"cap": 2, "floor": 0}
    # mineops decides on the previous interval's price, bounded to the cap ...
    assert r.decision_price_usd_per_mwh.tolist() == [25.0] * 5 + [5000.0] * 2 + [25.0] * 3
    # ... so it plans exactly as on a file that stopped at the cap ...
    at_cap = run(cfg, [25.0] * 4 + [5000.0] * 2 + [25.0] * 4)
    for name in ("mineops", "onoff"):
        np.testing.assert_array_equal(r.series[name].it_w, at_cap.series[name].it_w)
    # ... and pays what the file says the site would have paid.
    assert r.price_usd_per_mwh.tolist() == prices
    assert r.series["mineops"].profit_usd[4] < at_cap.series["mineops"].profit_usd[4]
    check_accounts(r)
    assert run(cfg, [-300.0, 25.0, 25.0]).prices_clamped == {"cap": 0, "floor": 1}


def test_backtest_and_controller_plan_with_the_same_bounded_price() -> None:
    """One function bounds prices for both: the demo's controller and the backtest agree."""
    from controller.backtest.engine import bounded_prices  # noqa: PLC0415
    from controller.daemon.loop import Controller  # noqa: PLC0415
    from controller.protocol.payloads import PriceSignal  # noqa: PLC0415

    energy = {"adders_usd_per_mwh": 0.0, "aux_fraction": 0.05,
              "price_floor_usd_per_mwh": -150.0, "price_cap_usd_per_mwh": 2000.0}
    cfg = SiteConfig.model_validate({**site([("s21", 4)]).model_dump(), "energy": energy})
    prices = [-9000.0, -150.5, -150.0, 0.0, 1999.0, 2000.5, 9000.0]
    planned, clamped = bounded_prices(cfg, np.array(prices))
    controller = Controller(cfg)
    for price, backtest_price in zip(prices, planned, strict=True):
        controller.on_message(controller.topics.price, PriceSignal(
            ts=time.time(), price_usd_per_mwh=price).encode())
        assert controller.price().market_usd_per_mwh == backtest_price
    assert planned.tolist() == [-150.0, -150.0, -150.0, 0.0, 1999.0, 2000.0, 2000.0]
    assert clamped == {"cap": 2, "floor": 2}
    assert dict(controller.ingest.prices_clamped) == {"cap": 2, "floor": 2}


def test_cli_reports_prices_clamped_to_the_cap(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = ["backtest", "--config", str(write_site(tmp_path)), "--prices",
            str(spike_file(tmp_path)), "--progress", "off"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert ("prices above the site's cap $5,000/MWh ([energy] price_cap_usd_per_mwh): 2 "
            "intervals; mineops and on/off decided on them at the cap") in text
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prices_clamped"] == {"cap": 2, "floor": 0}
    assert main(["backtest", "--config", str(write_site(tmp_path)), "--prices",
                 str(spike_file(tmp_path, 40.0)), "--progress", "off"]) == 0
    assert "prices above" not in capsys.readouterr().out, "nothing to say without a clamp"


@pytest.mark.parametrize(("spike", "why"), [
    (6000.0, "is not a market price (beyond 100 times [energy] price_floor/cap_usd_per_mwh "
             "-30..50)"),
    (1e9, "beyond any market's"),
])
def test_cli_refuses_prices_no_market_has(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          spike: float, why: str) -> None:
    f = write_site(tmp_path)
    f.write_text(f.read_text().replace(
        "hashprice_usd_per_ph_day = 45\n", "hashprice_usd_per_ph_day = 45\n[energy]\n"
        "price_floor_usd_per_mwh = -30\nprice_cap_usd_per_mwh = 50\n"))
    code = main(["backtest", "--config", str(f), "--prices", str(spike_file(tmp_path, spike)),
                 "--progress", "off"])
    err = capsys.readouterr().err
    assert code == 2 and why in err and "Traceback" not in err


@pytest.mark.parametrize(("row", "note"), [
    # The reviewer's: an hour on the clock, two hours of real time across the fall-back.
    ("2024-11-03 01:00,2024-11-03 02:00", "line 2: start 2024-11-03 01:00 occurs twice and "
     "is read as its first pass (CDT); it spans the change from CDT to CST: 2 h of real "
     "time, not the 1 h its clock times differ by (naive times on America/Chicago's clock"),
    ("2024-11-03 00:30,2024-11-03 01:30", "line 2: end 2024-11-03 01:30 occurs twice and is "
     "read as its first pass (CDT) (naive"),
    ("2024-03-10 01:00,2024-03-10 04:00", "line 2: it spans the change from CST to CDT: 2 h "
     "of real time, not the 3 h its clock times differ by"),
    ("2024-03-10 02:30,2024-03-10 04:00", "line 2: start 2024-03-10 02:30 does not exist (the "
     "clocks skip it) and is read as 03:30 CDT; it spans a daylight-saving change: 0.5 h"),
    ("2024-11-02 01:00,2024-11-02 02:00", ""),
    ("2024-11-03T01:00-06:00,2024-11-03T02:00-06:00", ""),
    ("1730613600,1730617200", ""),
])
def test_naive_windows_across_a_clock_change_say_how_they_are_read(
        tmp_path: Path, row: str, note: str) -> None:
    f = tmp_path / "w.csv"
    f.write_text(f"start,end,cap_kw\n{row},100\n")
    from zoneinfo import ZoneInfo  # noqa: PLC0415

    (w,) = load_windows(f, naive_tz=ZoneInfo("America/Chicago"))
    if not note:
        assert w.note == ""
    else:
        assert w.note.startswith(f"{f}: {note}"), w.note
        assert w.note.endswith("write them with their UTC offset, e.g. 2024-11-03T01:00-06:00, "
                               "to mean otherwise)")


def test_cli_reports_a_window_that_spans_a_clock_change(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prices = tmp_path / "p.csv"
    rows = [f"{1730437200 + 900 * i},{30 + 10 * math.sin(i / 9):.2f}" for i in range(4 * 96)]
    prices.write_text("timestamp,price_usd_per_mwh\n" + "\n".join(rows) + "\n")
    windows = tmp_path / "w.csv"
    windows.write_text("start,end,cap_kw\n2024-11-03 01:00,2024-11-03 02:00,20\n")
    code = main(["backtest", "--config", str(write_site(tmp_path)), "--prices", str(prices),
                 "--timezone", "America/Chicago", "--windows", str(windows),
                 "--progress", "off"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (f"mineops: warning: --windows {windows}: line 2: start 2024-11-03 01:00 occurs "
            "twice") in err
    assert "grid windows          8 intervals" in out, "two real hours: eight intervals"

"""Backtest output: the text summary, the interval CSV and the PNG chart (matplotlib, Agg)."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from controller.backtest.engine import STRATEGIES, BacktestResult

LABELS = {
    "mineops": "mineops (no look-ahead)",
    "optimum": "hindsight optimum",
    "always_on": "always on at stock",
    "onoff": "on/off at break-even",
    "optimum_onoff": "hindsight on/off",
}


def text_report(result: BacktestResult) -> str:
    """A human summary: strategies side by side, the ratio, the per-model breakdown."""
    s = result.summary()
    first = datetime.fromtimestamp(float(result.start_s[0]), UTC)
    lines = [
        f"backtest: {s['miners']:,} miners, {s['intervals']:,} intervals of "
        f"{result.interval_s / 60:g} min from {first:%Y-%m-%d %H:%M} UTC ({s['hours']:,.1f} h); "
        f"hashprice ${s['hashprice_usd_per_ph_day']:g}/PH/day, adder "
        f"${s['adder_usd_per_mwh']:g}/MWh",
        "",
        f"{'strategy':<26}{'profit $':>14}{'revenue $':>14}{'energy $':>14}{'MWh':>11}"
        f"{'curtailed h':>13}",
    ]
    for name in STRATEGIES:
        x = s["strategies"][name]
        lines.append(
            f"{LABELS[name]:<26}{x['profit_usd']:>14,.0f}{x['revenue_usd']:>14,.0f}"
            f"{x['energy_cost_usd']:>14,.0f}{x['energy_mwh']:>11,.1f}{x['curtailed_hours']:>13,.1f}"
        )
    ratio = s["ratio_to_optimum"]
    lines += [
        "",
        f"ratio_to_optimum      {ratio if ratio is not None else 'n/a (optimum <= 0)'}",
        f"gain over on/off      ${s['gain_over_onoff_usd']:,.0f}",
        f"value of underclocking ${s['underclocking_value_usd']:,.0f} "
        "(hindsight optimum with power targets minus with on/off only)",
    ]
    if "grid_window_cost_usd" in s:
        lines.append(f"grid windows          {s['grid_window_intervals']} intervals, cost "
                     f"${s['grid_window_cost_usd']:,.0f} of mineops profit")
    lines += ["", f"{'model (mineops)':<16}{'miners':>8}{'MWh':>11}{'profit $':>14}"
              f"{'strike $/MWh':>14}"]
    for key, m in s["models"].items():
        lines.append(f"{key:<16}{m['miners']:>8,}{m['energy_mwh']:>11,.1f}"
                     f"{m['profit_usd']:>14,.0f}{s['strike_usd_per_mwh'][key]:>14,.2f}")
    lines += ["", f"elapsed {s['elapsed_s']:.2f} s ({s['decisions']:,} policy decisions)"]
    return "\n".join(lines)


def write_csv(result: BacktestResult, path: Path) -> None:
    """One row per interval: prices, cap, and per strategy power and money."""
    ser = result.series
    cols = {
        "interval_start_utc": [
            datetime.fromtimestamp(float(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for t in result.start_s
        ],
        "price_usd_per_mwh": result.price_usd_per_mwh,
        "decision_price_usd_per_mwh": result.decision_price_usd_per_mwh,
        "cap_kw": result.cap_w / 1000.0,
        "grid_window": result.grid_window.astype(int),
        "mineops_hashrate_ths": ser["mineops"].ths,
        "mineops_miners_asleep": ser["mineops"].asleep,
    }
    for name in STRATEGIES:
        x = ser[name]
        cols[f"{name}_site_kw"] = x.site_w / 1000.0
        cols[f"{name}_revenue_usd"] = x.revenue_usd
        cols[f"{name}_energy_cost_usd"] = x.energy_cost_usd
        cols[f"{name}_profit_usd"] = x.profit_usd
    names = list(cols)
    rows = zip(*(cols[n] for n in names), strict=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for row in rows:
            w.writerow([v if isinstance(v, str) else f"{float(v):.6g}" for v in row])


def write_png(result: BacktestResult, path: Path) -> None:
    """Price with break-even lines, site power vs cap, cumulative profit per strategy."""
    from controller.extras import require  # noqa: PLC0415

    require("charts", "the backtest chart")
    import matplotlib  # noqa: PLC0415 - only `--out` pays for the import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t = np.array([datetime.fromtimestamp(float(x), UTC) for x in result.start_s])
    fig, (ax_p, ax_w, ax_c) = plt.subplots(3, 1, figsize=(13, 10), sharex=True,
                                           constrained_layout=True)
    price = result.price_usd_per_mwh
    ax_p.plot(t, price, lw=0.6, color="black", label="price")
    top = float(np.percentile(price, 99.5))
    strikes = sorted(result.strike_usd_per_mwh.items(), key=lambda kv: kv[1])
    for i, (key, strike) in enumerate(strikes):
        ax_p.axhline(strike, lw=0.9, ls="--", color=f"C{i % 10}", label=f"{key} break-even")
        top = max(top, strike)
    ax_p.set_ylim(min(float(price.min()), 0.0) - 5, top * 1.15 + 5)
    spikes = int((price > top * 1.15 + 5).sum())
    title = "energy price, \\$/MWh"
    if spikes:
        title += f" ({spikes} intervals above the axis)"
    ax_p.set_title(title)
    ax_p.legend(fontsize=7, ncol=5, loc="upper left")

    ser = result.series
    ax_w.plot(t, ser["mineops"].site_w / 1000.0, lw=0.6, label="mineops site power")
    ax_w.plot(t, ser["optimum"].site_w / 1000.0, lw=0.6, alpha=0.5, label="optimum site power")
    ax_w.plot(t, result.cap_w / 1000.0, lw=0.9, color="red", label="planning cap")
    ax_w.set_title("site power incl. auxiliary load, kW")
    ax_w.legend(fontsize=7, loc="lower left")

    for name in ("optimum", "mineops", "onoff", "always_on"):
        ax_c.plot(t, np.cumsum(ser[name].profit_usd), lw=1.0, label=LABELS[name])
    ax_c.set_title("cumulative profit, \\$")
    ax_c.legend(fontsize=8, loc="upper left")
    s = result.summary()
    # "\\$": a bare $ starts matplotlib's math mode.
    fig.suptitle(
        f"{s['miners']:,} miners, hashprice \\${s['hashprice_usd_per_ph_day']:g}/PH/day, "
        f"adder \\${s['adder_usd_per_mwh']:g}/MWh: ratio to optimum {s['ratio_to_optimum']}"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Backtest output: the text summary, the interval CSV and the PNG chart (matplotlib, Agg).

matplotlib is the `charts` extra: only the chart needs it, and asks for it by name.
"""

from __future__ import annotations

import csv
import math
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from controller.backtest.result import STRATEGIES, BacktestResult
from controller.catalogue import breakeven_label

FloatArray = npt.NDArray[np.float64]

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
    lines += clamped_text(result.prices_clamped, result.price_bounds_usd_per_mwh)
    if "grid_window_cost_usd" in s:
        lines.append(f"grid windows          {s['grid_window_intervals']} intervals, cost "
                     f"${s['grid_window_cost_usd']:,.0f} of mineops profit")
    lines += ["", f"{'model (mineops)':<16}{'miners':>8}{'MWh':>11}{'profit $':>14}"
              f"{'break-even $/MWh':>18}{'on/off strike':>15}"]
    for key, m in s["models"].items():
        lines.append(f"{key:<16}{m['miners']:>8,}{m['energy_mwh']:>11,.1f}"
                     f"{m['profit_usd']:>14,.0f}{s['breakeven_usd_per_mwh'][key]:>18,.2f}"
                     f"{s['strike_usd_per_mwh'][key]:>15,.2f}")
    st = result.settings
    lines += [f"{breakeven_label(st.hashprice_usd_per_ph_day, st.paid_aux_fraction)}; "
              f"on/off strike: that less the {usd_text(st.adder_usd_per_mwh)}/MWh adders, the "
              "market price the on/off rule switches at"]
    lines += ["", f"elapsed {s['elapsed_s']:.2f} s ({s['decisions']:,} policy decisions)"]
    return "\n".join(lines)


def clamped_text(clamped: dict[str, int], bounds: tuple[float, float] | None, *,
                 deciders: str = "mineops and on/off") -> list[str]:
    """A line per bound that prices went beyond (none when every price was within).

    `bounds` is the site's (floor, cap) in $/MWh; `deciders` the strategies that decided
    on the bounded price.
    """
    out = []
    for bound, i, setting in (("cap", 1, "price_cap"), ("floor", 0, "price_floor")):
        n = clamped.get(bound, 0)
        if not n:
            continue
        at = "" if bounds is None else f" {usd_text(bounds[i])}/MWh"
        side = "above" if bound == "cap" else "below"
        out.append(f"prices {side} the site's {bound}{at} ([energy] {setting}_usd_per_mwh): "
                   f"{n:,} interval{'s' if n != 1 else ''}; {deciders} decided on "
                   f"{'them' if n != 1 else 'it'} at the {bound}, as the controller does; "
                   "every strategy settled at the file's price")
    return out


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


def usd_text(x: float, _pos: object = None) -> str:
    """Dollars for an axis or a label: "$800,000", "-$1,250", "$0.50" under $10."""
    sign = "-" if x < 0 else ""
    v = abs(x)
    return f"{sign}${v:,.2f}" if 0 < v < 10 else f"{sign}${v:,.0f}"


def _tex(text: str) -> str:
    """Text for matplotlib: a bare $ starts its math mode, so two of them garble a label."""
    return text.replace("$", "\\$")


def day_keys(result: BacktestResult, tz: tzinfo) -> npt.NDArray[np.str_]:
    """Each interval's local date (YYYY-MM-DD in `tz`), shape (intervals,)."""
    return np.array([datetime.fromtimestamp(float(t), UTC).astimezone(tz).strftime("%Y-%m-%d")
                     for t in result.start_s])


def expensive_days(result: BacktestResult, tz: tzinfo, n: int = 3) -> list[str]:
    """The `n` local days with the highest price interval, most expensive first.

    Those are the days when curtailment is worth the most and can be seen at 15-minute
    resolution; over months the same intervals are hairlines.
    """
    days = day_keys(result, tz)
    peak: dict[str, float] = {}
    for d, p in zip(days, result.price_usd_per_mwh, strict=True):
        peak[d] = max(peak.get(d, -math.inf), float(p))
    return sorted(peak, key=lambda d: -peak[d])[:n]


def shortfall_pct(result: BacktestResult, name: str) -> FloatArray:
    """How far `name`'s cumulative profit is below the hindsight optimum's, % of it.

    Shape (intervals,); NaN while the optimum has earned nothing yet (no ratio to show).
    The gap, not the two profit lines, is drawn: at 0.4 % the lines would lie on each other.
    """
    opt = np.cumsum(result.series["optimum"].profit_usd)
    mine = np.cumsum(result.series[name].profit_usd)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.where(opt > 0, (opt - mine) / opt * 100.0, np.nan)
    return gap.astype(np.float64)


def write_png(result: BacktestResult, path: Path, *, timezone: str = "UTC",
              zoom_days: int = 3) -> None:
    """The backtest chart as PNG; see `chart`.

    Raises:
        MissingExtra: matplotlib (the `charts` extra) is not installed.
    """
    from controller.extras import require  # noqa: PLC0415

    require("charts", "the backtest chart")
    import matplotlib  # noqa: PLC0415 - only `--out` pays for the import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig = chart(result, timezone=timezone, zoom_days=zoom_days)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def zone_label(timezone: str, when: list[datetime]) -> str:
    """The zone of an axis: its name and the abbreviations its times are in, in order.

    E.g. "America/Chicago (CDT/CST)" for a span across the fall-back.
    """
    names = list(dict.fromkeys(w.strftime("%Z") for w in when))
    return f"{timezone} ({'/'.join(names)})" if names else timezone


@dataclass(frozen=True, slots=True)
class _ChartData:
    """What every panel of the chart reads: the result and its intervals on the chart's clock.

    `when` is each interval's start in `tz`, `t` the same as matplotlib date numbers
    (days, shape (intervals,)), `days` its local date (`day_keys`). `band` is the lowest
    and the highest model break-even market price, (model, $/MWh) each, None without
    models. `dollars` formats a $ axis.
    """

    result: BacktestResult
    timezone: str
    tz: ZoneInfo
    when: list[datetime]
    t: FloatArray
    days: npt.NDArray[np.str_]
    band: tuple[tuple[str, float], tuple[str, float]] | None
    dollars: Any


def chart(result: BacktestResult, *, timezone: str = "UTC", zoom_days: int = 3) -> Any:
    """A matplotlib Figure: the whole period, and the most expensive days up close.

    Top: daily peak and mean market price with each model's break-even market price (the
    zoomed days marked).
    Middle: each strategy's cumulative profit as a gap below the hindsight optimum, in %
    on a log scale, so that mineops' fraction of a percent and always-on's tens of percent
    are both legible. Bottom: the `zoom_days` days with the highest price, each with its
    price and the site power of mineops and of the optimum against the cap, interval by
    interval. Money in dollars ($ on every axis), times in `timezone` (named on the axes).
    """
    import matplotlib.pyplot as plt  # noqa: PLC0415

    data = _chart_data(result, timezone)
    s = result.summary()
    fig = plt.figure(figsize=(14, 12), constrained_layout=True)
    n_zoom = max(1, min(zoom_days, len(set(data.days))))
    grid = fig.add_gridspec(4, n_zoom, height_ratios=[1.0, 1.0, 0.8, 0.8])
    ax_p = fig.add_subplot(grid[0, :])
    ax_g = fig.add_subplot(grid[1, :], sharex=ax_p)
    zoomed = expensive_days(result, data.tz, n_zoom)
    _daily_price_panel(ax_p, data, zoomed)
    _gap_panel(ax_g, data, s["optimum_profit_usd"])
    # The gap panel's dates serve both: the price panel shares its x axis.
    plt.setp(ax_p.get_xticklabels(), visible=False)
    ax_p.xaxis.get_offset_text().set_visible(False)
    for col, d in enumerate(zoomed):
        _zoomed_day_panels(fig, grid[2, col], grid[3, col], data, rank=col + 1, day=d)
    ratio = s["ratio_to_optimum"]
    fig.suptitle(_tex(
        f"{s['miners']:,} miners, hashprice ${s['hashprice_usd_per_ph_day']:g}/PH/day, adder "
        f"${s['adder_usd_per_mwh']:g}/MWh: mineops earned "
        + (f"{ratio * 100:.2f} %" if ratio is not None else "n/a")
        + " of the hindsight optimum's profit"))
    for ax in fig.axes:
        ax.grid(True, lw=0.3, alpha=0.5)
    return fig


def _chart_data(result: BacktestResult, timezone: str) -> _ChartData:
    """The result's times in `timezone` and its break-even band, for the chart's panels."""
    import matplotlib.dates as mdates  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    tz = ZoneInfo(timezone)
    when = [datetime.fromtimestamp(float(x), UTC).astimezone(tz) for x in result.start_s]
    # Matplotlib's date numbers (days): plain floats for every x of the panels.
    t = np.asarray(mdates.date2num(when), dtype=np.float64)  # type: ignore[no-untyped-call]
    strikes = sorted(result.strike_usd_per_mwh.items(), key=lambda kv: kv[1])
    return _ChartData(
        result=result, timezone=timezone, tz=tz, when=when, t=t, days=day_keys(result, tz),
        band=(strikes[0], strikes[-1]) if strikes else None,
        dollars=FuncFormatter(lambda x, _p: _tex(usd_text(x))))


def _daily_price_panel(ax: Any, data: _ChartData, zoomed: list[str]) -> None:
    """The whole period's daily peak and mean price, the break-even band, the zoomed days."""
    import matplotlib.dates as mdates  # noqa: PLC0415

    result, price, days, when = data.result, data.result.price_usd_per_mwh, data.days, data.when
    order = list(dict.fromkeys(days))
    day_start = [float(mdates.date2num(  # type: ignore[no-untyped-call]
        when[int(np.argmax(days == d))].replace(hour=0, minute=0, second=0))) for d in order]
    day_peak = [float(price[days == d].max()) for d in order]
    day_mean = [float(price[days == d].mean()) for d in order]
    ax.step(day_start, day_peak, where="post", lw=0.9, color="black", label="daily peak")
    ax.step(day_start, day_mean, where="post", lw=0.9, color="0.55", label="daily mean")
    # One band from the lowest to the highest break-even, not a line per model: eight
    # dashed lines within a factor of three of each other hide the prices.
    if data.band is not None:
        (low_model, low), (high_model, high) = data.band
        st = result.settings
        named = breakeven_label(st.hashprice_usd_per_ph_day, st.paid_aux_fraction,
                                less_adders_usd_per_mwh=st.adder_usd_per_mwh)
        ax.axhspan(low, high, color="C2", alpha=0.15, lw=0,
                   label=_tex(f"{usd_text(low)} ({low_model}) to "
                              f"{usd_text(high)} ({high_model}):\n"
                              + textwrap.fill(named, 34, break_on_hyphens=False)))
    ax.set_yscale("symlog", linthresh=100.0)
    ax.set_ylim(bottom=min(0.0, min(day_mean, default=0.0)))
    ax.yaxis.set_major_formatter(data.dollars)
    shade = ax.get_xaxis_transform()
    placed: list[float] = []
    t = data.t
    span_days = max(t[-1] - t[0], 1.0) if t.size else 1.0
    for rank, d in enumerate(zoomed, 1):
        x = day_start[order.index(d)]
        ax.axvspan(x, x + 1.0, color="gold", alpha=0.5, lw=0)
        # Inside the axes, under its top edge: above it they ran into the title. Days
        # closer than a label's width (a heat wave's) get their labels stacked down.
        level = sum(abs(x - other) < span_days / 40.0 for other in placed)
        placed.append(x)
        ax.text(x + 0.5, 0.97 - 0.09 * level, f"#{rank}", transform=shade, fontsize=8,
                ha="center", va="top",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                      "alpha": 0.8})
    ax.set_title(_tex("market price per day, $/MWh (shaded: the most expensive days, "
                      "shown below)"), fontsize=10)
    # Beside the axes, not on them: no legend can cover a line it explains.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _gap_panel(ax: Any, data: _ChartData, optimum_profit_usd: float) -> None:
    """The whole period's cumulative profit of each strategy below the optimum's, dated."""
    import matplotlib.dates as mdates  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    tz = data.tz
    for name, color in (("mineops", "C0"), ("onoff", "C1"), ("always_on", "C3")):
        gap = shortfall_pct(data.result, name)
        # A log axis needs positive values: a strategy level with the optimum shows at
        # the axis floor rather than vanishing.
        ax.plot(data.t, np.clip(gap, 0.01, None), lw=1.2, color=color,
                label=f"{LABELS[name]}: {gap[-1]:.2f} % below at the end"
                if np.isfinite(gap[-1]) else LABELS[name])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _p: f"{y:g} %"))
    ax.set_title(_tex("cumulative profit below the hindsight optimum, % (log scale, "
                      f"0.01 % = level with it); optimum {usd_text(optimum_profit_usd)} over "
                      "the period"), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.xaxis_date(tz)
    # matplotlib's concise dates: each date once, then the hours between (a short period
    # ticked "%b %d" every few hours repeated its dates).
    locator = mdates.AutoDateLocator(tz=tz)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    concise = mdates.ConciseDateFormatter(locator, tz=tz)  # type: ignore[no-untyped-call]
    # The year and month beside the axis; the default's full date under hourly ticks
    # read as if the period ended that day.
    concise.offset_formats = ["", "%Y", "%Y", "%Y-%b", "%Y-%b-%d", "%Y-%b-%d %H:%M"]
    ax.xaxis.set_major_formatter(concise)
    ax.set_xlabel(f"date, {zone_label(data.timezone, data.when)}")


def _zoomed_day_panels(fig: Any, price_cell: Any, power_cell: Any, data: _ChartData, *,
                       rank: int, day: str) -> None:
    """One of the most expensive days up close: its price, and the site power against the cap.

    `day` (YYYY-MM-DD) is the `rank`-th most expensive, from 1; the first carries the axis
    names and the legend. `price_cell` and `power_cell` are its two grid cells, one above
    the other.
    """
    import matplotlib.dates as mdates  # noqa: PLC0415
    import matplotlib.pyplot as plt  # noqa: PLC0415

    result, tz = data.result, data.tz
    price, ser = result.price_usd_per_mwh, result.series
    sel = data.days == day
    tt = data.t[sel]
    zp = fig.add_subplot(price_cell)
    zw = fig.add_subplot(power_cell, sharex=zp)
    zp.step(tt, price[sel], where="post", lw=1.0, color="black")
    if data.band is not None:
        zp.axhspan(data.band[0][1], data.band[1][1], color="C2", alpha=0.15, lw=0)
    zp.set_yscale("symlog", linthresh=100.0)
    zp.yaxis.set_major_formatter(data.dollars)
    day_profit = {n: float(ser[n].profit_usd[sel].sum()) for n in ("mineops", "optimum")}
    zp.set_title(_tex(f"#{rank} {day}: peak {usd_text(float(price[sel].max()))}/MWh\n"
                      f"profit: mineops {usd_text(day_profit['mineops'])}, optimum "
                      f"{usd_text(day_profit['optimum'])}"), fontsize=9)
    # The optimum wide and pale under mineops thin and dark: both stay visible where
    # they agree, which is most of the time.
    zw.step(tt, ser["optimum"].site_w[sel] / 1e6, where="post", lw=4.0, color="C2",
            alpha=0.35, label="hindsight optimum")
    zw.step(tt, ser["mineops"].site_w[sel] / 1e6, where="post", lw=1.1, color="C0",
            label="mineops")
    zw.step(tt, result.cap_w[sel] / 1e6, where="post", lw=0.9, ls="--", color="red",
            label="planning cap")
    zw.set_ylim(bottom=0)
    zw.xaxis_date(tz)
    zw.xaxis.set_major_formatter(
        mdates.DateFormatter("%H:%M", tz=tz))  # type: ignore[no-untyped-call]
    zw.xaxis.set_major_locator(mdates.HourLocator(  # type: ignore[no-untyped-call]
        byhour=range(0, 24, 6), tz=tz))
    zw.set_xlabel(
        f"time, {zone_label(data.timezone, [data.when[i] for i in np.flatnonzero(sel)])}")
    plt.setp(zp.get_xticklabels(), visible=False)
    if rank == 1:
        zp.set_ylabel("price, $/MWh")
        zw.set_ylabel("site power, MW")
        zw.legend(fontsize=7, loc="lower left")

"""The backtest chart: dollars on the axes, the gap to the optimum, the expensive days, zones.

Drawn from a real backtest of a small mixed fleet over the ERCOT summer 2024 trace, and
read back from the matplotlib Figure (titles, labels, tick formatters, scales), so the
tests check what the chart says, not only that a PNG was written.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import matplotlib
import matplotlib.dates as mdates
import numpy as np
import pytest

from controller.backtest import BacktestResult, Settings, run_backtest
from controller.backtest.report import (
    chart,
    expensive_days,
    shortfall_pct,
    usd_text,
    write_png,
    zone_label,
)
from drivers.prices import load_prices
from tests.conftest import ERCOT
from tests.test_backtest import site

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def result() -> BacktestResult:
    cfg = site([("s19j_pro", 40), ("s21", 40), ("s23_hydro", 20)], cap_kw=400.0,
               hashprice=42.0, adder=8.0)
    p = load_prices(ERCOT)
    return run_backtest(cfg, p.start_s, p.price_usd_per_mwh, p.interval_s,
                        Settings.from_config(cfg))


def test_dollars_read_as_dollars() -> None:
    assert usd_text(800_000.0) == "$800,000"
    assert usd_text(-1250.4) == "-$1,250"
    assert usd_text(0.5) == "$0.50"
    assert usd_text(0.0) == "$0"
    assert usd_text(4857.82) == "$4,858"


def test_the_most_expensive_days_are_the_spike_days(result: BacktestResult) -> None:
    days = expensive_days(result, ZoneInfo("America/Chicago"), 3)
    # 2024-08-20 19:30 CDT: $4,857.82/MWh, the trace's highest interval.
    assert days[0] == "2024-08-20"
    assert len(set(days)) == 3
    # Days are local days: in UTC the evening spike falls on the next date (00:30 UTC).
    assert expensive_days(result, ZoneInfo("UTC"), 1) == ["2024-08-21"]


def test_the_gap_to_the_optimum_is_the_ratio_seen_from_below(result: BacktestResult) -> None:
    ratio = result.summary()["ratio_to_optimum"]
    gap = shortfall_pct(result, "mineops")
    assert gap[-1] == pytest.approx((1.0 - ratio) * 100.0, abs=1e-3)
    assert 0.0 < gap[-1] < 2.0, "close to the optimum, and a visible fraction of a percent"
    assert shortfall_pct(result, "always_on")[-1] > gap[-1]
    assert shortfall_pct(result, "optimum")[-1] == 0.0
    assert np.isnan(shortfall_pct(result, "mineops")).sum() < result.intervals


def test_chart_says_dollars_zones_and_zooms(result: BacktestResult, tmp_path: Path) -> None:
    fig = chart(result, timezone="America/Chicago", zoom_days=3)
    axes = fig.axes
    assert len(axes) == 2 + 2 * 3, "overview, gap, and price + power for three days"
    overview, gap = axes[0], axes[1]
    assert gap.get_yscale() == "log"
    assert "below the hindsight optimum" in gap.get_title()
    assert gap.get_xlabel() == "date, America/Chicago (CDT)"
    legend = [t.get_text() for t in gap.get_legend().get_texts()]
    assert legend[0].startswith("mineops (no look-ahead): ") and "% below at the end" in legend[0]
    money = overview.yaxis.get_major_formatter()
    assert money(800_000.0, 0).replace("\\$", "$") == "$800,000"
    zoom_titles = [ax.get_title() for ax in axes[2:] if ax.get_title()]
    assert zoom_titles[0].startswith("#1 2024-08-20: peak \\$4,858/MWh")
    assert all("profit: mineops \\$" in t for t in zoom_titles)
    assert all(ax.get_xlabel() == "time, America/Chicago (CDT)" for ax in axes[2:]
               if ax.get_xlabel())
    assert "of the hindsight optimum's profit" in fig._suptitle.get_text()
    out = tmp_path / "chart.png"
    write_png(result, out, timezone="America/Chicago")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fall_back() -> BacktestResult:
    """Four days across the end of daylight saving (2024-11-03, America/Chicago), the
    spikes on the CST days: the reviewer's chart said "(CDT)" on them."""
    cfg = site([("s19j_pro", 20), ("s21", 20)], cap_kw=200.0, hashprice=42.0, adder=8.0)
    start = datetime(2024, 11, 1, tzinfo=ZoneInfo("America/Chicago")).timestamp()
    n = 4 * 96 + 4
    prices = 25.0 + 20.0 * np.sin(np.arange(n) / 10.0)
    prices[300:305], prices[220:224], prices[30:33] = 3000.0, 800.0, 400.0
    return run_backtest(cfg, start + 900.0 * np.arange(n), prices, 900.0,
                        Settings.from_config(cfg))


def _drawn(fig: Any) -> Any:
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_zones_are_named_per_interval_across_a_change(fall_back: BacktestResult) -> None:
    chicago = ZoneInfo("America/Chicago")
    when = [datetime(2024, 11, 3, 0, 30, tzinfo=chicago), datetime(2024, 11, 3, 3, tzinfo=chicago)]
    assert zone_label("America/Chicago", when) == "America/Chicago (CDT/CST)"
    fig = chart(fall_back, timezone="America/Chicago", zoom_days=3)
    assert fig.axes[1].get_xlabel() == "date, America/Chicago (CDT/CST)"
    zooms = [(ax.get_title(), ax) for ax in fig.axes[2:]]
    labels = {title.split(":")[0].split(" ", 1)[1]: fig.axes[fig.axes.index(ax) + 1].get_xlabel()
              for title, ax in zooms if title}
    assert labels == {"2024-11-04": "time, America/Chicago (CST)",
                      "2024-11-03": "time, America/Chicago (CDT/CST)",
                      "2024-11-01": "time, America/Chicago (CDT)"}


@pytest.mark.parametrize("which", ["ercot", "fall_back"])
def test_labels_stay_clear_of_titles_dates_once_legends_beside_the_lines(
        which: str, request: pytest.FixtureRequest) -> None:
    r: BacktestResult = request.getfixturevalue("result" if which == "ercot" else which)
    fig = chart(r, timezone="America/Chicago", zoom_days=3)
    renderer = _drawn(fig)
    overview, gap = fig.axes[0], fig.axes[1]
    # The #1/#2/#3 marks: inside the overview, clear of its title and of each other.
    marks = [t for t in overview.texts if t.get_text().startswith("#")]
    assert sorted(t.get_text() for t in marks) == ["#1", "#2", "#3"]
    title = overview.title.get_window_extent(renderer)
    box = overview.get_window_extent(renderer)
    extents = [t.get_window_extent(renderer) for t in marks]
    for e in extents:
        assert not e.overlaps(title), "a day's mark runs into the title"
        assert box.y0 <= e.y0 and e.y1 <= box.y1 + 1
    for i, a in enumerate(extents):
        assert not any(a.overlaps(b) for b in extents[i + 1:]), "marks overprinted"
    # Each date once on the date axis: ticks between two dates are hours ("12:00"), not
    # the date again ("Nov 02, Nov 02").
    chicago = ZoneInfo("America/Chicago")
    ticks = [(mdates.num2date(loc, chicago).date(), t.get_text())
             for loc, t in zip(gap.get_xticks(), gap.get_xticklabels(), strict=True)
             if t.get_text()]
    dated = [day for day, text in ticks if ":" not in text]
    assert len(dated) == len(set(dated)), ticks
    assert len(ticks) >= 3
    # Legends beside their axes: none covers a line it explains.
    for ax in (overview, gap):
        legend = ax.get_legend().get_window_extent(renderer)
        assert legend.x0 >= ax.get_window_extent(renderer).x1, "legend over the plot"
    assert "break-even market price: the all-in one at stock incl. 5 % aux" in " ".join(
        t.get_text().replace("\n", " ") for t in overview.get_legend().get_texts())

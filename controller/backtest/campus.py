"""Backtest on an energy campus: the fleet behind one interconnect with firm loads and generation.

Traces of the campus's parts come from one CSV file, `timestamp` plus one column per part
id of the `[campus]` table, in kW in the part's own sign (a firm load's draw, a
generator's output); it is read like a price file (drivers/prices: any time zone, DST
markers, a regular grid) and averaged onto the price intervals. A part without a column
counts at its worst case throughout (a firm load at `max_kw`, a generator at 0), as the
daemon counts a part without a reading. The battery is not traced: it counts idle.

Per interval the campus gives the miners a headroom and a cost curve
(controller/core/campus.py) from that interval's readings, and three strategies run on
it:

* **mineops**: the daemon's policy on the cost steps, at the previous interval's price
  (as the backtest's mineops always decides), under the headroom;
* **mineops_grid_price**: the same policy on the grid price alone under the same
  headroom: a campus that caps the miners but prices their power as if it all came from
  the grid;
* **optimum**: the hindsight bound for the same campus: the optimizer on each interval's
  own cost steps and headroom, no policy.

Each is settled on the interval's actual cost curve: the miners' power costs its steps
(surplus at its marginal cost or the export price it would have earned, then grid import
at market plus adders). The report adds, per strategy, the energy the miners took from
on-site surplus, what they drew from the grid, and the import avoided: what their energy
would have cost from the grid alone, less what it cost on the curve. Load-step limits of
an islanded campus act within seconds and are not modelled at market intervals: the
headroom is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.backtest.classes import FleetClasses
from controller.backtest.engine import (
    Progress,
    _Engine,
    _horizon,
    _run_mineops,
    _solve_totals,
    _Table,
    _Totals,
    bounded_prices,
    price_bounds,
)
from controller.backtest.report import clamped_text
from controller.backtest.result import Settings
from controller.campus_config import CampusConfig
from controller.config import SiteConfig
from controller.core.campus import CampusPicture, PartReading, campus_picture
from controller.core.optimizer import CostSteps
from controller.units import usd_per_ths_hour
from drivers.prices import PriceFileError, load_price_csv

FloatArray = npt.NDArray[np.float64]

CAMPUS_STRATEGIES = ("mineops", "mineops_grid_price", "optimum")


# -- traces ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CampusTraces:
    """Each traced part's power per price interval, W, and the parts without a trace.

    Each part's power is in its own sign (a firm load's draw, a generator's output);
    `missing` names the parts without a column, counted at their worst case.
    """

    part_w: dict[str, FloatArray]
    missing: tuple[str, ...] = ()
    source: str = ""


def resample(trace_start_s: FloatArray, trace_interval_s: float, values: FloatArray,
             start_s: FloatArray, interval_s: float) -> FloatArray | None:
    """The time-weighted mean of a regular step trace over each interval.

    None when the trace does not cover every interval.
    """
    t0 = float(trace_start_s[0])
    end = t0 + trace_interval_s * values.size
    if float(start_s[0]) < t0 - 1e-6 or float(start_s[-1]) + interval_s > end + 1e-6:
        return None
    cum = np.concatenate([[0.0], np.cumsum(values * trace_interval_s)])

    def integral(t: FloatArray) -> FloatArray:
        k = np.clip(np.floor((t - t0) / trace_interval_s).astype(np.int64), 0, values.size - 1)
        out: FloatArray = cum[k] + values[k] * (t - (t0 + k * trace_interval_s))
        return out

    out: FloatArray = (integral(start_s + interval_s) - integral(start_s)) / interval_s
    return out


def load_campus_traces(path: Path | str, campus: CampusConfig, start_s: FloatArray,
                       interval_s: float, *, timezone: str | None = None) -> CampusTraces:
    """Read a campus trace file onto the price intervals (module docstring).

    Raises:
        PriceFileError: the file cannot be read as a series (naming the line and why),
            has no column for any part, or does not cover the prices' period.
    """
    parts = [f.id for f in campus.firm_loads] + [g.id for g in campus.generators]
    out: dict[str, FloatArray] = {}
    missing: list[str] = []
    for part in parts:
        try:
            series = load_price_csv(path, column=part, timezone=timezone)
        except PriceFileError as e:
            if f"unknown column {part!r}" in str(e):
                missing.append(part)
                continue
            raise
        kw = np.asarray(series.price_usd_per_mwh, dtype=np.float64)
        if np.any(~np.isfinite(kw)):
            raise PriceFileError(f"{path}: column {part!r}: a value that is not a number")
        mean = resample(series.start_s, series.interval_s, kw * 1000.0, start_s, interval_s)
        if mean is None:
            raise PriceFileError(
                f"{path}: column {part!r} covers {series.span_text()}, not the prices' "
                "whole period")
        out[part] = mean
    if not out:
        raise PriceFileError(f"{path}: no column named after a campus part (expected some of "
                             f"{', '.join(parts)}, in kW)")
    return CampusTraces(out, tuple(missing), str(path))


# -- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CampusSeries:
    """One strategy on the campus, per interval."""

    site_w: FloatArray  # the miners' mean power incl. aux
    ths: FloatArray
    revenue_usd: FloatArray
    energy_cost_usd: FloatArray  # on the interval's actual cost curve
    grid_cost_usd: FloatArray  # the same energy, all from the grid at market + adders
    surplus_mwh: FloatArray  # taken from on-site surplus (and the battery)
    grid_mwh: FloatArray  # drawn from the grid

    @property
    def profit_usd(self) -> FloatArray:
        """Revenue less energy cost per interval, $ (on the campus's own cost curve)."""
        out: FloatArray = self.revenue_usd - self.energy_cost_usd
        return out


@dataclass(frozen=True)
class CampusBacktestResult:
    """Everything the campus report needs; `summary()` is the JSON object of the CLI."""

    settings: Settings
    classes: FleetClasses
    start_s: FloatArray
    interval_s: float
    price_usd_per_mwh: FloatArray
    headroom_w: FloatArray  # the campus's headroom for the miners, per interval
    on_site_w: FloatArray  # of which on-site surplus (and battery) supplies
    cap_w: FloatArray  # what mineops planned under: the tighter of site cap and headroom
    series: dict[str, CampusSeries]
    decisions: int
    elapsed_s: float
    missing_parts: tuple[str, ...] = ()
    traces: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Intervals decided on at the site's price cap or floor (engine.bounded_prices).
    prices_clamped: dict[str, int] = field(default_factory=dict)
    price_bounds_usd_per_mwh: tuple[float, float] | None = None  # (floor, cap)

    def summary(self) -> dict[str, Any]:
        """The run's totals as JSON-ready values: $, MWh, hours, per strategy and overall."""
        dt_h = self.interval_s / 3600.0
        strategies: dict[str, dict[str, float]] = {}
        for name, x in self.series.items():
            strategies[name] = {
                "profit_usd": round(float(x.profit_usd.sum()), 2),
                "revenue_usd": round(float(x.revenue_usd.sum()), 2),
                "energy_cost_usd": round(float(x.energy_cost_usd.sum()), 2),
                "energy_mwh": round(float((x.surplus_mwh + x.grid_mwh).sum()), 3),
                "surplus_mwh": round(float(x.surplus_mwh.sum()), 3),
                "grid_mwh": round(float(x.grid_mwh.sum()), 3),
                "import_avoided_usd": round(float((x.grid_cost_usd - x.energy_cost_usd).sum()),
                                            2),
            }
        best = strategies["optimum"]["profit_usd"]
        ours = strategies["mineops"]["profit_usd"]
        available = float(self.on_site_w.sum()) * dt_h / 1e6
        return {
            "intervals": int(self.start_s.size),
            "interval_s": self.interval_s,
            "hours": round(self.start_s.size * dt_h, 2),
            "miners": int(self.classes.count.sum()),
            "hashprice_usd_per_ph_day": self.settings.hashprice_usd_per_ph_day,
            "adder_usd_per_mwh": self.settings.adder_usd_per_mwh,
            "surplus_available_mwh": round(available, 3),
            "ratio_to_optimum": round(ours / best, 4) if best > 0 else None,
            "gain_over_grid_price_usd": round(
                ours - strategies["mineops_grid_price"]["profit_usd"], 2),
            "missing_parts": list(self.missing_parts),
            "prices_clamped": {"cap": self.prices_clamped.get("cap", 0),
                               "floor": self.prices_clamped.get("floor", 0)},
            "strategies": strategies,
            "decisions": self.decisions,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _pictures(campus: CampusConfig, traces: CampusTraces, start_s: FloatArray,
              price: FloatArray, settings: Settings) -> list[CampusPicture]:
    meters = {f.id: f.meter for f in campus.firm_loads}
    meters |= {g.id: g.meter for g in campus.generators}
    out = []
    for t in range(start_s.size):
        now = float(start_s[t])
        readings = {meters[part]: PartReading(float(w[t]), now)
                    for part, w in traces.part_w.items()}
        out.append(campus_picture(
            campus, readings, now_unix_s=now, stale_s=math.inf,
            margin_fraction=settings.headroom_fraction,
            market_usd_per_mwh=float(price[t]),
            adders_usd_per_mwh=settings.adder_usd_per_mwh))
    return out


def _settle(x: _Totals, steps: Sequence[CostSteps | None], *, on_site_w: FloatArray,
            price: FloatArray, interval_s: float, st: Settings) -> CampusSeries:
    dt_h = interval_s / 3600.0
    aux1 = 1.0 + st.aux_fraction
    site_w = x.it_w.sum(axis=1) * aux1
    ths = x.ths.sum(axis=1)
    paid = 1.0 if st.knobs.aux_in_energy_cost else 1.0 / aux1
    grid_price = price + st.adder_usd_per_mwh
    cost = np.array([
        (s.cost_usd_per_h(float(w)) if s is not None else float(w) * float(g) * 1e-6)
        for s, w, g in zip(steps, site_w, grid_price, strict=True)]) * paid * dt_h
    surplus = np.minimum(site_w, on_site_w)
    return CampusSeries(
        site_w=site_w, ths=ths,
        revenue_usd=ths * usd_per_ths_hour(st.hashprice_usd_per_ph_day) * dt_h,
        energy_cost_usd=cost,
        grid_cost_usd=site_w * grid_price * 1e-6 * paid * dt_h,
        surplus_mwh=surplus * dt_h / 1e6,
        grid_mwh=(site_w - surplus) * dt_h / 1e6)


def run_campus_backtest(  # noqa: PLR0917 - run_backtest's arguments, and the traces
    cfg: SiteConfig,
    start_s: FloatArray,
    price_usd_per_mwh: FloatArray,
    interval_s: float,
    settings: Settings,
    traces: CampusTraces,
    *,
    exact: bool = False,
    progress: Progress | None = None,
) -> CampusBacktestResult:
    """Run the campus strategies over a price series and campus traces (module docstring).

    Raises:
        ValueError: the site has no `[campus]` table, or the series do not match.
    """
    if cfg.campus is None:
        raise ValueError("the site file has no [campus] table")
    started = time.perf_counter()
    start_s = np.asarray(start_s, dtype=np.float64)
    price = np.asarray(price_usd_per_mwh, dtype=np.float64)
    if start_s.shape != price.shape or price.size == 0:
        raise ValueError("start_s and price_usd_per_mwh must be equal, non-empty 1-D arrays")
    if any(w.shape != price.shape for w in traces.part_w.values()):
        raise ValueError("every trace must have one value per price interval")
    planned, clamped = bounded_prices(cfg, price)
    decision_price = np.concatenate([planned[:1], planned[:-1]])
    decided = _pictures(cfg.campus, traces, start_s, decision_price, settings)
    actual = _pictures(cfg.campus, traces, start_s, price, settings)
    headroom = np.array([p.headroom_w for p in actual])
    on_site = np.array([p.curve.on_site_w for p in actual])
    own_cap = settings.cap_w * (1.0 - settings.headroom_fraction)
    cap = np.minimum(own_cap, headroom)
    steps_decided = [p.curve.steps() for p in decided]
    steps_actual = [p.curve.steps() for p in actual]

    classes = FleetClasses.from_config(cfg)
    full = _Table(classes, classes.points_w, classes.points_ths, classes.top)
    horizon = _horizon(settings.knobs, classes, interval_s)
    no_grid = np.zeros(price.size, dtype=bool)
    series: dict[str, CampusSeries] = {}
    decisions = 0
    for name, steps in (("mineops", steps_decided), ("mineops_grid_price", None)):
        totals, n = _run_mineops(
            full, horizon, start_s=start_s, interval_s=interval_s,
            decision_price=decision_price, cap=cap, grid=no_grid, st=settings, exact=exact,
            progress=progress if name == "mineops" else None, steps=steps)
        decisions += n
        series[name] = _settle(totals, steps_actual, on_site_w=on_site, price=price,
                               interval_s=interval_s, st=settings)
    bound = _optimum(full, horizon, price=price, cap=cap, steps=steps_actual, st=settings,
                     exact=exact)
    series["optimum"] = _settle(bound, steps_actual, on_site_w=on_site, price=price,
                                interval_s=interval_s, st=settings)
    return CampusBacktestResult(
        settings=settings, classes=classes, start_s=start_s, interval_s=interval_s,
        price_usd_per_mwh=price, headroom_w=headroom, on_site_w=on_site, cap_w=cap,
        series=series, decisions=decisions, elapsed_s=time.perf_counter() - started,
        missing_parts=traces.missing, traces=traces.source, prices_clamped=clamped,
        price_bounds_usd_per_mwh=price_bounds(cfg))


def _optimum(table: _Table, horizon: float, *, price: FloatArray, cap: FloatArray,
             steps: Sequence[CostSteps | None], st: Settings, exact: bool) -> _Totals:
    """The hindsight bound: each interval's own cost steps and headroom, no policy."""
    eng = _Engine(table, horizon, aggregate=not exact)
    n_cls = table.classes.n_classes
    it, ths = np.zeros((price.size, n_cls)), np.zeros((price.size, n_cls))
    asleep = np.zeros(price.size)
    done: dict[tuple[bytes, bytes, float], tuple[FloatArray, FloatArray, FloatArray]] = {}
    for t, s in enumerate(steps):
        key = (b"" if s is None else s.upper_w.tobytes(),
               b"" if s is None else s.price_usd_per_mwh.tobytes(), float(cap[t]))
        if key not in done:
            done[key] = _solve_totals(
                eng, float(price[t]), hp=st.hashprice_usd_per_ph_day, cap_w=float(cap[t]),
                aux=st.aux_fraction, adder=st.adder_usd_per_mwh,
                aux_in_cost=st.knobs.aux_in_energy_cost, cost_steps=s)
        it[t], ths[t], sleeping = done[key]
        asleep[t] = float(sleeping.sum())
    return _Totals(it, ths, asleep)


LABELS = {"mineops": "mineops on the campus", "mineops_grid_price": "mineops, grid price only",
          "optimum": "hindsight bound (campus)"}


def campus_text_report(result: CampusBacktestResult) -> str:
    """The campus backtest as text: strategies with their surplus, grid and import avoided."""
    s = result.summary()
    lines = [
        f"campus backtest: {s['miners']:,} miners, {s['intervals']:,} intervals of "
        f"{result.interval_s / 60:g} min ({s['hours']:,.1f} h); traces {result.traces}",
        f"on-site surplus available to the miners: {s['surplus_available_mwh']:,.1f} MWh",
    ]
    if result.missing_parts:
        lines.append(f"not in the traces, counted at their worst case: "
                     f"{', '.join(result.missing_parts)}")
    lines += clamped_text(result.prices_clamped, result.price_bounds_usd_per_mwh,
                          deciders="mineops")
    lines += ["", f"{'strategy':<28}{'profit $':>13}{'energy $':>12}{'surplus MWh':>13}"
              f"{'grid MWh':>11}{'import avoided $':>18}"]
    for name in CAMPUS_STRATEGIES:
        x = s["strategies"][name]
        lines.append(f"{LABELS[name]:<28}{x['profit_usd']:>13,.0f}{x['energy_cost_usd']:>12,.0f}"
                     f"{x['surplus_mwh']:>13,.1f}{x['grid_mwh']:>11,.1f}"
                     f"{x['import_avoided_usd']:>18,.0f}")
    ratio = s["ratio_to_optimum"]
    lines += ["", f"ratio_to_optimum       {ratio if ratio is not None else 'n/a (bound <= 0)'}",
              f"gain over grid price   ${s['gain_over_grid_price_usd']:,.0f} (pricing the "
              "miners' power by the campus's steps rather than the grid's price)"]
    return "\n".join(lines)

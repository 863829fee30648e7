"""What a backtest run is given and what it gives: settings, per-strategy series, the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.backtest.classes import FleetClasses
from controller.config import SiteConfig
from controller.config_types import PolicyKnobs
from controller.units import usd_per_ths_hour

FloatArray = npt.NDArray[np.float64]

STRATEGIES = ("mineops", "optimum", "always_on", "onoff", "optimum_onoff")


@dataclass(frozen=True)
class Settings:
    """Economics and limits of one backtest run."""

    hashprice_usd_per_ph_day: float
    adder_usd_per_mwh: float
    aux_fraction: float
    cap_w: float  # site cap incl. aux
    headroom_fraction: float
    knobs: PolicyKnobs

    @property
    def paid_aux_fraction(self) -> float:
        """The aux fraction the energy cost counts (0 when the knobs leave aux unpaid)."""
        return self.aux_fraction if self.knobs.aux_in_energy_cost else 0.0

    @classmethod
    def from_config(
        cls, cfg: SiteConfig, *, hashprice: float | None = None, adder: float | None = None,
        knob_overrides: dict[str, Any] | None = None,
    ) -> Settings:
        """The site file's economics and limits; `hashprice`, `adder` and knobs override."""
        knobs = cfg.policy.knobs(**(knob_overrides or {}))
        return cls(
            hashprice_usd_per_ph_day=cfg.hashprice_usd_per_ph_day if hashprice is None
            else hashprice,
            adder_usd_per_mwh=cfg.energy.adders_usd_per_mwh if adder is None else adder,
            aux_fraction=cfg.energy.aux_fraction,
            cap_w=cfg.power_cap_kw * 1000.0,
            headroom_fraction=cfg.policy.cap_headroom_fraction,
            knobs=knobs,
        )


@dataclass(frozen=True)
class Series:
    """One strategy, per interval: mean power, hashrate, money; per class power and hash."""

    it_w: FloatArray
    ths: FloatArray
    asleep: FloatArray  # miners asleep (time-weighted mean over the interval)
    class_it_w: FloatArray  # (intervals, classes)
    class_ths: FloatArray
    site_w: FloatArray
    energy_mwh: FloatArray
    revenue_usd: FloatArray
    energy_cost_usd: FloatArray
    profit_usd: FloatArray


@dataclass(frozen=True)
class BacktestResult:
    """Everything a report needs; `summary()` is the JSON object of the CLI."""

    settings: Settings
    classes: FleetClasses
    start_s: FloatArray
    interval_s: float
    price_usd_per_mwh: FloatArray  # settled
    decision_price_usd_per_mwh: FloatArray  # what mineops and on/off decided on
    cap_w: FloatArray  # planning cap per interval (after headroom)
    grid_window: npt.NDArray[np.bool_]
    series: dict[str, Series]
    # Per model, the catalogue's break-even all-in price at stock less the adders: about
    # the market price the on/off rule switches at (its stock point is the nearest
    # firmware target, its sleep draw saved: under 1 % above).
    strike_usd_per_mwh: dict[str, float]
    decisions: int
    elapsed_s: float
    no_window_profit_usd: float | None = None
    # Intervals whose price was beyond [energy] price_cap/floor_usd_per_mwh: decided on
    # at that bound, settled at the file's price. {"cap": n, "floor": m}
    prices_clamped: dict[str, int] = field(default_factory=dict)
    price_bounds_usd_per_mwh: tuple[float, float] | None = None  # (floor, cap)

    @property
    def intervals(self) -> int:
        """How many price intervals the run covered."""
        return int(self.start_s.size)

    def summary(self) -> dict[str, Any]:
        """The run's totals as JSON-ready values ($, MWh, hours), the CLI's JSON line."""
        s = self.series
        mo, opt = s["mineops"], s["optimum"]
        dt_h = self.interval_s / 3600.0
        n = int(self.classes.count.sum())

        def total(x: FloatArray) -> float:
            return round(float(x.sum()), 2)

        opt_profit = float(opt.profit_usd.sum())
        out: dict[str, Any] = {
            "intervals": self.intervals,
            "interval_s": self.interval_s,
            "hours": round(self.intervals * dt_h, 2),
            "miners": n,
            "hashprice_usd_per_ph_day": self.settings.hashprice_usd_per_ph_day,
            "adder_usd_per_mwh": self.settings.adder_usd_per_mwh,
            "profit_usd": total(mo.profit_usd),
            "revenue_usd": total(mo.revenue_usd),
            "energy_cost_usd": total(mo.energy_cost_usd),
            "energy_mwh": round(float(mo.energy_mwh.sum()), 3),
            "curtailed_hours": round(float(mo.asleep.sum()) * dt_h / n, 2),
            "optimum_profit_usd": total(opt.profit_usd),
            "always_on_profit_usd": total(s["always_on"].profit_usd),
            "onoff_profit_usd": total(s["onoff"].profit_usd),
            "optimum_onoff_profit_usd": total(s["optimum_onoff"].profit_usd),
            "ratio_to_optimum": round(float(mo.profit_usd.sum()) / opt_profit, 5)
            if opt_profit > 0 else None,
            "gain_over_onoff_usd": round(float(mo.profit_usd.sum() - s["onoff"].profit_usd.sum()),
                                         2),
            "underclocking_value_usd": round(
                opt_profit - float(s["optimum_onoff"].profit_usd.sum()), 2),
            "grid_window_intervals": int(self.grid_window.sum()),
            "decisions": self.decisions,
            "elapsed_s": round(self.elapsed_s, 3),
            "strategies": {
                name: {
                    "profit_usd": total(x.profit_usd),
                    "revenue_usd": total(x.revenue_usd),
                    "energy_cost_usd": total(x.energy_cost_usd),
                    "energy_mwh": round(float(x.energy_mwh.sum()), 3),
                    "curtailed_hours": round(float(x.asleep.sum()) * dt_h / n, 2),
                }
                for name, x in s.items()
            },
            "models": self.by_model(),
            "strike_usd_per_mwh": {k: round(v, 2) for k, v in self.strike_usd_per_mwh.items()},
            "breakeven_usd_per_mwh": {
                k: round(v + self.settings.adder_usd_per_mwh, 2)
                for k, v in self.strike_usd_per_mwh.items()},
            "prices_clamped": {"cap": self.prices_clamped.get("cap", 0),
                               "floor": self.prices_clamped.get("floor", 0)},
        }
        if self.no_window_profit_usd is not None:
            out["grid_window_cost_usd"] = round(
                self.no_window_profit_usd - float(mo.profit_usd.sum()), 2)
        return out

    def by_model(self, strategy: str = "mineops") -> dict[str, dict[str, float]]:
        """Per model: miners, MWh, revenue, cost (aux shared pro rata), profit, hours asleep."""
        x = self.series[strategy]
        c = self.classes
        dt_h = self.interval_s / 3600.0
        aux1 = 1.0 + self.settings.aux_fraction
        paid = (self.price_usd_per_mwh + self.settings.adder_usd_per_mwh)[:, None]
        pays_aux = self.settings.knobs.aux_in_energy_cost
        mwh = x.class_it_w * aux1 * dt_h / 1e6
        cost = paid * (mwh if pays_aux else x.class_it_w * dt_h / 1e6)
        rev = x.class_ths * usd_per_ths_hour(self.settings.hashprice_usd_per_ph_day) * dt_h
        out: dict[str, dict[str, float]] = {}
        for j, key in enumerate(c.model_keys):
            row = out.setdefault(key, {"miners": 0, "energy_mwh": 0.0, "revenue_usd": 0.0,
                                       "energy_cost_usd": 0.0, "profit_usd": 0.0})
            row["miners"] += int(c.count[j])
            row["energy_mwh"] += float(mwh[:, j].sum())
            row["revenue_usd"] += float(rev[:, j].sum())
            row["energy_cost_usd"] += float(cost[:, j].sum())
            row["profit_usd"] += float(rev[:, j].sum() - cost[:, j].sum())
        return {k: {f: round(v, 2) if isinstance(v, float) else v for f, v in r.items()}
                for k, r in out.items()}

"""Miner-model catalogue: validated model facts and the operating points derived from them."""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from controller.units import W_PER_MW, usd_per_ths_hour

CATALOGUE_PATH = Path(__file__).with_name("miner_models.toml")


class MinerModel(BaseModel):
    """One ASIC model: stock figures, firmware power-target range and hashrate curve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Marketing name, e.g. 'Antminer S21'")
    vendor: str
    cooling: Literal["air", "hydro", "immersion"] = "air"
    nominal_ths: float = Field(gt=0, description="Stock hashrate in TH/s")
    nominal_w: float = Field(gt=0, description="Stock power draw in W")
    min_w: float = Field(gt=0, description="Lowest power target the firmware accepts, W")
    max_w: float = Field(gt=0, description="Highest power target the firmware accepts, W")
    step_w: float = Field(gt=0, description="Power-target granularity of the firmware, W")
    presets_w: tuple[float, ...] | None = Field(
        default=None, description="Only these targets, for preset-only firmwares"
    )
    sleep_w: float = Field(default=15.0, ge=0, description="Draw while asleep (control board), W")
    sleep_s: float = Field(default=10.0, gt=0, description="Time to stop hashing, s")
    wake_s: float = Field(default=180.0, gt=0, description="Time from wake to full hashrate, s")
    settle_s: float = Field(default=8.0, gt=0, description="Time for a power-target change, s")
    curve: tuple[tuple[float, float], ...] = Field(
        min_length=2, description="(power W, hashrate TH/s) points, concave, ascending power"
    )

    @model_validator(mode="after")
    def _check(self) -> MinerModel:
        if self.min_w > self.max_w:
            raise ValueError(f"min_w {self.min_w} is above max_w {self.max_w}")
        powers = [p for p, _ in self.curve]
        if powers != sorted(powers) or len(set(powers)) != len(powers):
            raise ValueError("curve powers must be strictly ascending")
        if powers[0] > self.min_w or powers[-1] < self.max_w:
            raise ValueError("curve must cover min_w..max_w")
        slopes = np.diff([h for _, h in self.curve]) / np.diff(powers)
        # Concavity is what makes the price-on-power decomposition exact.
        if np.any(slopes <= 0) or np.any(np.diff(slopes) > 1e-9):
            raise ValueError("curve must be increasing and concave (falling TH/s per W)")
        return self

    @property
    def efficiency_j_per_th(self) -> float:
        """Energy per hash at the stock point, J/TH (W per TH/s)."""
        return self.nominal_w / self.nominal_ths

    def targets_w(self) -> npt.NDArray[np.float64]:
        """Power targets the firmware accepts, ascending."""
        if self.presets_w is not None:
            return np.array(sorted(self.presets_w), dtype=np.float64)
        n = int(np.floor((self.max_w - self.min_w) / self.step_w + 1e-9)) + 1
        return self.min_w + self.step_w * np.arange(n, dtype=np.float64)

    def hashrate_ths(self, power_w: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Hashrate at the given power targets (linear between curve points)."""
        p, h = zip(*self.curve, strict=True)
        out: npt.NDArray[np.float64] = np.interp(np.asarray(power_w, dtype=np.float64), p, h)
        return out

    def breakeven_usd_per_mwh(self, hashprice_usd_per_ph_day: float, *,
                              aux_fraction: float = 0.0) -> float:
        """The all-in energy price, $/MWh, at which the model at stock earns exactly nothing.

        All-in: market price plus adders; at stock: its nominal TH/s and W.

        `aux_fraction`: the site's cooling and auxiliary load per W of miner, when the site
        pays for it at the same price (as the controller decides: `[energy] aux_fraction`);
        0: the miner's own draw alone. The one break-even of the project: the live view,
        `mineops models`, the backtest and the metrics all take it from here and name it
        with `breakeven_label`.
        """
        usd_per_hour = self.nominal_ths * usd_per_ths_hour(hashprice_usd_per_ph_day)
        return usd_per_hour / (self.nominal_w * (1.0 + aux_fraction) / W_PER_MW)


def breakeven_label(hashprice_usd_per_ph_day: float, aux_fraction: float = 0.0, *,
                    less_adders_usd_per_mwh: float | None = None) -> str:
    """What a `breakeven_usd_per_mwh` figure is, for every view that shows one.

    E.g. "break-even all-in price (market + adders) at stock incl. 5 % aux, at $42.00/PH/day".

    `less_adders_usd_per_mwh`: the figure is that break-even less these adders, a market
    price (what the backtest's on/off rule and chart compare with market prices).
    """
    aux = f" incl. {aux_fraction * 100:.3g} % aux" if aux_fraction else ""
    terms = f"at stock{aux}, at ${hashprice_usd_per_ph_day:,.2f}/PH/day"
    if less_adders_usd_per_mwh is None:
        return f"break-even all-in price (market + adders) {terms}"
    return (f"break-even market price: the all-in one {terms}, less "
            f"${less_adders_usd_per_mwh:,.2f}/MWh adders")


class Catalogue(BaseModel):
    """All known models, keyed by a short id such as 's21'."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, MinerModel]

    def get(self, key: str) -> MinerModel:
        """The model with this key.

        Raises:
            KeyError: an unknown key; the message lists the known ones.
        """
        try:
            return self.models[key]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise KeyError(f"unknown miner model {key!r}; known models: {known}") from None


@cache
def load_catalogue(path: Path = CATALOGUE_PATH) -> Catalogue:
    """Load and validate a catalogue file (cached: it is read-only data)."""
    with path.open("rb") as f:
        return Catalogue.model_validate(tomllib.load(f))


def operating_points(
    models: list[MinerModel],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per-model operating points as padded (n_models, k) arrays of W and TH/s.

    Column 0 is sleep. Models with fewer points repeat their last point, so the
    extra columns add nothing and cost nothing.
    """
    rows = [
        (
            np.concatenate([[m.sleep_w], m.targets_w()]),
            np.concatenate([[0.0], m.hashrate_ths(m.targets_w())]),
        )
        for m in models
    ]
    k = max(len(p) for p, _ in rows)
    power = np.empty((len(rows), k))
    hashrate = np.empty((len(rows), k))
    for i, (p, h) in enumerate(rows):
        power[i, : len(p)], power[i, len(p) :] = p, p[-1]
        hashrate[i, : len(h)], hashrate[i, len(h) :] = h, h[-1]
    return power, hashrate

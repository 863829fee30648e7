"""Curtailment optimizer: a pure function from fleet arrays and prices to per-miner levels.

Maximise sum_i v*h_i(p_i) - c*p_i subject to sum_i p_i*(1+aux) <= cap, over each
miner's operating points (level 0 = sleep). No I/O, no clock, no config reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.reasons import Reason

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


@dataclass(frozen=True, slots=True)
class PreparedFleet:
    """Operating points per miner, prepared once when the fleet changes.

    power_w and hashrate_ths are (n_miners, k) with ascending power per row and
    column 0 = sleep; rows with fewer real points repeat their last point.
    """

    power_w: FloatArray
    hashrate_ths: FloatArray

    @property
    def n(self) -> int:
        return int(self.power_w.shape[0])

    @property
    def max_level(self) -> IntArray:
        return np.full(self.n, self.power_w.shape[1] - 1, dtype=np.intp)


@dataclass(frozen=True, slots=True)
class Plan:
    """Optimizer output: a level (column index) and power per miner, with reasons."""

    level: IntArray
    power_w: FloatArray
    hashrate_ths: FloatArray
    reason: npt.NDArray[np.uint8]
    site_power_w: float  # including auxiliary load
    cap_binding: bool


def prepare(power_w: FloatArray, hashrate_ths: FloatArray) -> PreparedFleet:
    """Validate and freeze the operating-point arrays."""
    if power_w.shape != hashrate_ths.shape or power_w.ndim != 2:
        raise ValueError("power_w and hashrate_ths must be equal (n, k) arrays")
    return PreparedFleet(np.ascontiguousarray(power_w), np.ascontiguousarray(hashrate_ths))


def usd_per_ths_hour(hashprice_usd_per_ph_day: float) -> float:
    """Revenue of one TH/s for one hour at a hashprice in $/PH/day."""
    return hashprice_usd_per_ph_day / 1000.0 / 24.0


def solve(
    fleet: PreparedFleet,
    *,
    price_usd_per_mwh: float,
    hashprice_usd_per_ph_day: float,
    cap_w: float,
    aux_fraction: float = 0.0,
    min_level: IntArray | None = None,
    max_level: IntArray | None = None,
) -> Plan:
    """Choose each miner's level to maximise profit under the site cap.

    min_level/max_level bound each miner's choice (policy pins a miner with
    min_level == max_level). The cap covers IT power times (1 + aux_fraction).
    """
    n, k = fleet.power_w.shape
    lo = np.zeros(n, dtype=np.intp) if min_level is None else min_level
    hi = fleet.max_level if max_level is None else max_level
    cols = np.arange(k)
    allowed = (cols >= lo[:, None]) & (cols <= hi[:, None])
    value = usd_per_ths_hour(hashprice_usd_per_ph_day)

    def pick(multiplier_usd_per_mwh: float) -> IntArray:
        cost = (price_usd_per_mwh + multiplier_usd_per_mwh * (1 + aux_fraction)) / 1e6
        objective = value * fleet.hashrate_ths - cost * fleet.power_w
        return np.argmax(np.where(allowed, objective, -np.inf), axis=1)

    def site_w(level: IntArray) -> float:
        return float(fleet.power_w[np.arange(n), level].sum() * (1 + aux_fraction))

    level = pick(0.0)
    binding = site_w(level) > cap_w
    if binding:
        lo_m, hi_m = 0.0, 1e7
        for _ in range(60):
            mid = 0.5 * (lo_m + hi_m)
            if site_w(pick(mid)) > cap_w:
                lo_m = mid
            else:
                hi_m = mid
        level = pick(hi_m)
    rows = np.arange(n)
    reason = np.full(n, Reason.CAP if binding else Reason.PROFIT, dtype=np.uint8)
    return Plan(
        level=level,
        power_w=fleet.power_w[rows, level],
        hashrate_ths=fleet.hashrate_ths[rows, level],
        reason=reason,
        site_power_w=site_w(level),
        cap_binding=binding,
    )

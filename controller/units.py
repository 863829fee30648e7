"""Unit conversions the decision and its reports share, each written once.

Hashprice is quoted per PH/s per day (the pools' and Luxor's convention); the
optimizer values hashrate per TH/s per hour and prices energy per Wh.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

TH_PER_PH = 1000.0
HOURS_PER_DAY = 24.0
WH_PER_MWH = 1e6
W_PER_MW = 1e6


def usd_per_ths_hour(hashprice_usd_per_ph_day: float) -> float:
    """Revenue of one TH/s for one hour at a hashprice in $/PH/day."""
    return hashprice_usd_per_ph_day / TH_PER_PH / HOURS_PER_DAY


def usd_per_wh(price_usd_per_mwh: float) -> float:
    """An energy price in $/MWh as $ per Wh."""
    return price_usd_per_mwh / WH_PER_MWH


def energy_mwh(power_w: npt.ArrayLike, hours: float) -> npt.NDArray[np.float64]:
    """Energy in MWh of a power (W, scalar or array) held for some hours."""
    out: npt.NDArray[np.float64] = np.asarray(power_w, dtype=np.float64) * hours / WH_PER_MWH
    return out

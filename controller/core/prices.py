"""The energy price in force: which market price applies now, and what is added to it.

"Market price" is the ISO's price alone ($/MWh); the price the optimizer plans with is
the market price plus the site's adders (delivery charges, fees). The two are named
apart everywhere: `market_usd_per_mwh` and `total_usd_per_mwh`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from controller.core.fleet_state import SiteReadings

# A real-time price older than this is not trusted (an hour covers a missed 5/15-minute
# interval or two and the feed's restarts); the day-ahead schedule, then the default follow.
REAL_TIME_STALE_S = 3600.0

PriceSource = Literal["real_time", "day_ahead", "default"]


@dataclass(frozen=True, slots=True)
class PriceInForce:
    """The price a decision plans with, and its parts."""

    market_usd_per_mwh: float
    source: PriceSource
    adders_usd_per_mwh: float

    @property
    def total_usd_per_mwh(self) -> float:
        """Market price plus adders: what one more MWh costs the site."""
        return self.market_usd_per_mwh + self.adders_usd_per_mwh


def price_in_force(site: SiteReadings, *, now_monotonic_s: float, now_unix_s: float,
                   default_usd_per_mwh: float, adders_usd_per_mwh: float) -> PriceInForce:
    """Real-time if fresh, else the day-ahead schedule's interval, else the cautious default."""
    market = site.market_price_usd_per_mwh
    if market is not None and now_monotonic_s - site.price_at < REAL_TIME_STALE_S:
        return PriceInForce(market, "real_time", adders_usd_per_mwh)
    scheduled = None if site.price_schedule is None else site.price_schedule.price_at(now_unix_s)
    if scheduled is not None:
        return PriceInForce(scheduled, "day_ahead", adders_usd_per_mwh)
    return PriceInForce(default_usd_per_mwh, "default", adders_usd_per_mwh)

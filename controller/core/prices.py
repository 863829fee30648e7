"""The energy price in force: which market price applies now, and what is added to it.

"Market price" is the ISO's price alone ($/MWh); the price the optimizer plans with is
the market price plus the site's adders (delivery charges, fees). The two are named
apart everywhere: `market_usd_per_mwh` and `total_usd_per_mwh`. A market price is
planned with within the site's `[energy]` floor and cap (`PriceBounds`), but it is still
the market's price that the site pays: `PriceInForce` carries both, so that what is shown
and what is costed (`real_market_usd_per_mwh`, `real_total_usd_per_mwh`) is the market's,
and only the plan uses the bounded price.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from controller.config import SiteConfig
from controller.core.fleet_state import SiteReadings

# A real-time price older than this is not trusted (an hour covers a missed 5/15-minute
# interval or two and the feed's restarts); the day-ahead schedule, then the default follow.
REAL_TIME_STALE_S = 3600.0

PriceSource = Literal["real_time", "day_ahead", "default"]
PriceBound = Literal["cap", "floor"]


@dataclass(frozen=True, slots=True)
class PriceInForce:
    """The price a decision plans with, its parts, and the market's own price.

    Attributes:
        market_usd_per_mwh: the market price as planned with, within the site's
            `[energy]` bounds, $/MWh.
        source: where the market price came from.
        adders_usd_per_mwh: the site's adders, $/MWh.
        bound: the bound the market's price was planned at ("cap": it was above
            `price_cap_usd_per_mwh`; "floor": below the floor); None: within the bounds.
        beyond_bound_usd_per_mwh: the market's own price when `bound` is set, $/MWh
            (None when within the bounds: then `market_usd_per_mwh` is the market's).
    """

    market_usd_per_mwh: float
    source: PriceSource
    adders_usd_per_mwh: float
    bound: PriceBound | None = None
    beyond_bound_usd_per_mwh: float | None = None

    @property
    def total_usd_per_mwh(self) -> float:
        """Market price as planned with plus adders: what the optimizer weighs, $/MWh."""
        return self.market_usd_per_mwh + self.adders_usd_per_mwh

    @property
    def real_market_usd_per_mwh(self) -> float:
        """The market's own price, bounded or not: what the site is charged, $/MWh."""
        b = self.beyond_bound_usd_per_mwh
        return self.market_usd_per_mwh if b is None else b

    @property
    def real_total_usd_per_mwh(self) -> float:
        """The market's own price plus adders: what one more MWh costs the site, $/MWh."""
        return self.real_market_usd_per_mwh + self.adders_usd_per_mwh


def price_in_force(site: SiteReadings, *, now_monotonic_s: float, now_unix_s: float,
                   default_usd_per_mwh: float, adders_usd_per_mwh: float,
                   bounds: PriceBounds | None = None) -> PriceInForce:
    """Real-time if fresh, else the day-ahead schedule's interval, else the cautious default.

    `site` holds the market's prices as they came; a price beyond `bounds` (default:
    `PriceBounds()`) is planned with at the bound, and the market's own price is kept
    beside it. The default price is the site's own and is taken as it is.
    """
    b = PriceBounds() if bounds is None else bounds
    market = site.market_price_usd_per_mwh
    if market is not None and now_monotonic_s - site.price_at < REAL_TIME_STALE_S:
        return b.in_force(market, "real_time", adders_usd_per_mwh)
    scheduled = None if site.price_schedule is None else site.price_schedule.price_at(now_unix_s)
    if scheduled is not None:
        return b.in_force(scheduled, "day_ahead", adders_usd_per_mwh)
    return PriceInForce(default_usd_per_mwh, "default", adders_usd_per_mwh)


# A price this many times beyond the configured bounds is no market's (a unit slip, a
# corrupt feed): rejected, not clamped. Within it, a price beyond a bound is a real,
# extreme price the site's bounds did not expect (ERCOT settled at $9,000 in February
# 2021 above a $5,000 cap set from today's rules).
ABSURD_MULTIPLE = 100.0


@dataclass(frozen=True, slots=True)
class PriceBounds:
    """`[energy] price_floor_usd_per_mwh`..`price_cap_usd_per_mwh`: what a decision plans with.

    A market price above the cap is planned with at the cap, below the floor at the
    floor. For curtailment that is the safe side: at the cap the fleet sleeps, as it would
    at the higher price. Prices further out than ABSURD_MULTIPLE times the larger bound's
    magnitude, and NaN or infinite ones, are refused. The controller (ingest) and the
    backtest both bound prices here, so they plan with the same price.
    """

    floor_usd_per_mwh: float = -250.0
    cap_usd_per_mwh: float = 5000.0

    @classmethod
    def of_site(cls, cfg: SiteConfig) -> PriceBounds:
        """The site file's `[energy]` bounds."""
        return cls(cfg.energy.price_floor_usd_per_mwh, cfg.energy.price_cap_usd_per_mwh)

    @property
    def absurd_beyond_usd_per_mwh(self) -> float:
        """Magnitude beyond which a price is refused, $/MWh."""
        return ABSURD_MULTIPLE * max(self.cap_usd_per_mwh, abs(self.floor_usd_per_mwh))

    def bound(self, price_usd_per_mwh: float) -> tuple[float, PriceBound | None]:
        """The price to plan with and which bound it was clamped to (None: within).

        Raises:
            ValueError: NaN, infinite, or absurd (see the class docstring); the message
                names the price and the bounds.
        """
        p = price_usd_per_mwh
        if not math.isfinite(p) or abs(p) > self.absurd_beyond_usd_per_mwh:
            raise ValueError(
                f"price {p:g} $/MWh is not a market price (beyond "
                f"{ABSURD_MULTIPLE:g} times [energy] price_floor/cap_usd_per_mwh "
                f"{self.floor_usd_per_mwh:g}..{self.cap_usd_per_mwh:g})")
        if p > self.cap_usd_per_mwh:
            return self.cap_usd_per_mwh, "cap"
        if p < self.floor_usd_per_mwh:
            return self.floor_usd_per_mwh, "floor"
        return p, None

    def in_force(self, market_usd_per_mwh: float, source: PriceSource,
                 adders_usd_per_mwh: float) -> PriceInForce:
        """The price in force for a market price: planned within the bounds, kept as it is.

        A price `bound` refuses (ingest drops those, so none should arrive) is planned
        with at the nearer bound, the market's value kept: never a crash mid-decision.
        """
        try:
            planned, bound = self.bound(market_usd_per_mwh)
        except ValueError:
            cap = not market_usd_per_mwh < self.floor_usd_per_mwh  # NaN: the safe side
            planned = self.cap_usd_per_mwh if cap else self.floor_usd_per_mwh
            bound = "cap" if cap else "floor"
        if bound is None:
            return PriceInForce(planned, source, adders_usd_per_mwh)
        return PriceInForce(planned, source, adders_usd_per_mwh, bound, market_usd_per_mwh)

    def bound_all(self, prices_usd_per_mwh: npt.ArrayLike
                  ) -> tuple[npt.NDArray[np.float64], dict[PriceBound, int]]:
        """`bound` over an array (a price file).

        Returns the bounded prices, shape as given, and how many were clamped to each bound.

        Raises:
            ValueError: any price NaN, infinite or absurd (the first one is named).
        """
        p = np.asarray(prices_usd_per_mwh, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(p) | (np.abs(p) > self.absurd_beyond_usd_per_mwh)
        if bad.any():
            i = int(np.argmax(bad))
            try:
                self.bound(float(p.flat[i]))
            except ValueError as e:
                raise ValueError(f"interval {i}: {e}") from None
        above = p > self.cap_usd_per_mwh
        below = p < self.floor_usd_per_mwh
        out = np.clip(p, self.floor_usd_per_mwh, self.cap_usd_per_mwh)
        return out, {"cap": int(above.sum()), "floor": int(below.sum())}

"""The price series every loader returns, and the error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt


class PriceFileError(ValueError):
    """A price file that cannot be used as it is.

    The message names the file, the line where it applies, and what was found against
    what was expected.
    """


@dataclass(frozen=True, slots=True)
class PriceSeries:
    """Regular price intervals.

    Attributes:
        start_s: interval start times, Unix seconds UTC, shape (n,), strictly increasing by
            `interval_s`.
        price_usd_per_mwh: the price of each interval, shape (n,), finite.
        interval_s: the one interval length, seconds.
        column: the price column the values come from (or "synthetic").
        timezone: IANA name of the zone in which to show times: the market's, the one named
            with --timezone, or "UTC" when neither is known. It changes no value.
        location: the settlement point or node the prices are for, when the file says.
    """

    start_s: npt.NDArray[np.float64]
    price_usd_per_mwh: npt.NDArray[np.float64]
    interval_s: float
    column: str
    timezone: str = "UTC"
    location: str | None = None

    def __len__(self) -> int:
        return len(self.start_s)

    def local_time(self, t_s: float) -> datetime:
        """`t_s` (Unix s) as an aware datetime in the series' zone."""
        return datetime.fromtimestamp(t_s, UTC).astimezone(ZoneInfo(self.timezone))

    def span_text(self) -> str:
        """First and last interval start in local time with the zone, for reports.

        Example: "2024-06-01 00:00 CDT to 2024-09-30 23:45 CDT (America/Chicago)".
        """
        if len(self) == 0:
            return "no intervals"
        first = self.local_time(float(self.start_s[0]))
        last = self.local_time(float(self.start_s[-1]))
        return f"{first:%Y-%m-%d %H:%M %Z} to {last:%Y-%m-%d %H:%M %Z} ({self.timezone})"

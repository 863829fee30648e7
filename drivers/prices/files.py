"""Price series from CSV: the ERCOT export format and a generic `timestamp,price_usd_per_mwh`.

Generic format: a header line `timestamp,price_usd_per_mwh`, then one row per
interval; timestamps ISO 8601 (`2024-06-01 00:15:00`, `2024-06-01T00:15:00Z`)
or Unix seconds; intervals regular (gaps and duplicates are errors).
ERCOT format: `interval_start_local` plus price columns such as
`hb_south_rtm_spp_usd_mwh`, chosen with `column`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

TIME_COLUMNS = ("timestamp", "interval_start_local", "interval_start_utc", "time")
DEFAULT_PRICE_COLUMNS = ("price_usd_per_mwh", "hb_south_rtm_spp_usd_mwh")


class PriceFileError(ValueError):
    """A price file that cannot be used as it is; the message names the line and why."""


@dataclass(frozen=True, slots=True)
class PriceSeries:
    """Regular price intervals: start times (Unix s) and prices ($/MWh)."""

    start_s: npt.NDArray[np.float64]
    price_usd_per_mwh: npt.NDArray[np.float64]
    interval_s: float
    column: str

    def __len__(self) -> int:
        return len(self.start_s)


def _parse_time(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:  # naive local market time: keep it regular, treat as UTC
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def load_price_csv(path: Path | str, column: str | None = None) -> PriceSeries:
    """Read and check a price file; raise PriceFileError on anything doubtful."""
    path = Path(path)
    try:
        f = path.open(newline="")
    except OSError as e:
        raise PriceFileError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise PriceFileError(f"{path}: empty file")
        header = [h.strip() for h in header]
        tcol = next((c for c in TIME_COLUMNS if c in header), None)
        if tcol is None:
            raise PriceFileError(
                f"{path}: no time column (expected one of {', '.join(TIME_COLUMNS)})"
            )
        if column is None:
            column = next((c for c in DEFAULT_PRICE_COLUMNS if c in header), None)
            if column is None:
                raise PriceFileError(
                    f"{path}: no price column found; name one with --price-column "
                    f"(columns: {', '.join(header)})"
                )
        elif column not in header:
            raise PriceFileError(
                f"{path}: unknown column {column!r} (columns: {', '.join(header)})"
            )
        ti, pi = header.index(tcol), header.index(column)
        times: list[float] = []
        prices: list[float] = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                t = _parse_time(row[ti])
                p = float(row[pi])
            except (ValueError, IndexError):
                raise PriceFileError(f"{path}:{line_no}: unparseable row {row!r}") from None
            if not np.isfinite(p):
                raise PriceFileError(f"{path}:{line_no}: price is not a number: {row[pi]!r}")
            times.append(t)
            prices.append(p)
    if len(times) < 2:
        raise PriceFileError(f"{path}: needs at least two intervals")
    start = np.array(times)
    steps = np.diff(start)
    interval = float(np.median(steps))
    if interval <= 0:
        raise PriceFileError(f"{path}: timestamps do not increase")
    bad = np.flatnonzero(steps != interval)
    if bad.size:
        i = int(bad[0])
        kind = "duplicate" if steps[i] == 0 else ("gap" if steps[i] > interval else "out of order")
        raise PriceFileError(
            f"{path}:{i + 3}: {kind} after {datetime.fromtimestamp(start[i], UTC):%Y-%m-%d %H:%M}"
            f" (step {steps[i]:g} s, expected {interval:g} s)"
        )
    return PriceSeries(start, np.array(prices), interval, column)

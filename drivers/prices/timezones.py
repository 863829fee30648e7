"""From a price file's clock to UTC: offsets, named zones, the repeated and the skipped hour.

A naive local time is ambiguous once a year (the fall-back hour happens twice) and
impossible once a year (the spring-forward hour never happens). The repeated hour is told
apart by a DST flag column when the file has one (ERCOT's `DSTFlag`: "Y" on the second,
standard-time pass), else by the order of the rows: the first pass in the file's time
order is daylight time. A time inside the skipped hour is an error, never shifted.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from drivers.prices.series import PriceFileError

# Zones that US market files are written in; used only to name the zone of a file whose
# timestamps carry offsets, for showing local times.
MARKET_ZONES = ("America/Chicago", "America/New_York", "America/Los_Angeles")

_FORMATS = (
    "%m/%d/%Y %I:%M:%S %p",  # PJM Data Miner: 11/3/2024 1:00:00 AM
    "%m/%d/%Y %I:%M %p",
    "%m/%d/%Y %H:%M:%S",  # ERCOT: 11/03/2024 01:00:00
    "%m/%d/%Y %H:%M",
    "%m/%d/%Y",
    "%d.%m.%Y %H:%M:%S",  # European spreadsheets: 03.11.2024 01:00
    "%d.%m.%Y %H:%M",
    "%d.%m.%Y",
)
_TRUE = frozenset({"y", "yes", "true", "t", "1"})
_FALSE = frozenset({"n", "no", "false", "f", "0"})


def get_zone(name: str) -> ZoneInfo:
    """The IANA zone `name` (e.g. "America/Chicago").

    Raises:
        PriceFileError: unknown name, or no time zone database on this machine.
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        if not available_timezones():
            raise PriceFileError(f"time zone {name!r}: this machine has no IANA time zone "
                                 "database (install the tzdata package)") from None
        raise PriceFileError(f"unknown time zone {name!r}: give an IANA name such as "
                             "America/Chicago, America/New_York, America/Los_Angeles or UTC"
                             ) from None


def parse_datetime(text: str) -> datetime:
    """ISO 8601 (offset or `Z` optional), US `M/D/YYYY [h:mm[:ss] [AM|PM]]`, or `D.M.YYYY [H:MM]`.

    Raises:
        ValueError: none of these.
    """
    s = text.strip()
    try:
        return datetime.fromisoformat(s)
    except ValueError:
        pass
    for fmt in _FORMATS:
        try:
            return datetime.strptime(s, fmt)
        except ValueError:
            continue
    raise ValueError(f"not a date and time: {s!r}")


def parse_flag(text: str) -> bool | None:
    """A DST flag cell: True for the repeated (standard-time) pass, None when empty.

    Raises:
        ValueError: not one of Y/N, yes/no, true/false, T/F, 1/0.
    """
    s = text.strip().lower()
    if not s:
        return None
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError(f"DST flag {text.strip()!r} is not Y or N")


@dataclass(frozen=True, slots=True)
class Stamp:
    """One row's time as the file gives it, before conversion to UTC."""

    line: int
    when: datetime  # aware, or naive in the file's zone
    dst_flag: bool | None = None


def _exists(naive: datetime, zone: ZoneInfo, fold: int) -> bool:
    local = naive.replace(tzinfo=zone, fold=fold)
    return local.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == naive


def to_utc_s(stamps: Sequence[Stamp], zone: ZoneInfo | None, where: str,
             unknown_zone_hint: str) -> list[float]:
    """Unix seconds UTC for each stamp, in the order given.

    Aware stamps use their own offset. Naive stamps are read in `zone`; the fall-back
    hour's two passes are told apart by the DST flag, else by the file's time order
    (ascending or descending, whichever the file mostly is).

    Raises:
        PriceFileError: a naive stamp and no zone (the message adds `unknown_zone_hint`), a
            time in the spring-forward gap, or a local time given more than twice.
    """
    naive = [s.when for s in stamps if s.when.tzinfo is None]
    if naive and zone is None:
        first = next(s for s in stamps if s.when.tzinfo is None)
        raise PriceFileError(f"{where}:{first.line}: {first.when:%Y-%m-%d %H:%M} has no UTC "
                             f"offset and the file does not say its time zone; "
                             f"{unknown_zone_hint}")
    descending = sum(b < a for a, b in pairwise(naive)) > len(naive) // 2
    seen: dict[datetime, int] = {}
    out: list[float] = []
    for s in stamps:
        if s.when.tzinfo is not None:
            out.append(s.when.timestamp())
            continue
        assert zone is not None
        early, late = s.when.replace(tzinfo=zone, fold=0), s.when.replace(tzinfo=zone, fold=1)
        if early.utcoffset() == late.utcoffset():
            out.append(early.timestamp())
            continue
        if not _exists(s.when, zone, 0) and not _exists(s.when, zone, 1):
            raise PriceFileError(
                f"{where}:{s.line}: {s.when:%Y-%m-%d %H:%M} does not exist in {zone.key}: "
                "the clocks skip that hour when daylight saving starts; the file is not in "
                f"{zone.key} local time, or this row is wrong")
        if s.dst_flag is not None:
            fold = int(s.dst_flag)
        else:
            n = seen.get(s.when, 0)
            if n >= 2:
                raise PriceFileError(
                    f"{where}:{s.line}: duplicate: {s.when:%Y-%m-%d %H:%M} ({zone.key}) a third "
                    "time; the fall-back hour repeats only once")
            seen[s.when] = n + 1
            fold = 1 - n if descending else n
        out.append(s.when.replace(tzinfo=zone, fold=fold).timestamp())
    return out


def zone_of_offsets(times: Sequence[datetime]) -> str | None:
    """The one zone of MARKET_ZONES (or UTC) whose offsets match every aware time, else None."""
    aware = [t for t in times if t.tzinfo is not None]
    if not aware:
        return None
    if all(t.utcoffset() == UTC.utcoffset(None) for t in aware):
        return "UTC"
    matches = [name for name in MARKET_ZONES
               if all(t.astimezone(ZoneInfo(name)).utcoffset() == t.utcoffset() for t in aware)]
    return matches[0] if len(matches) == 1 else None

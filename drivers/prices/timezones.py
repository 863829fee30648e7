"""From a price file's clock to UTC: offsets, named zones, the repeated and the skipped hour.

A naive local time is ambiguous once a year (the fall-back hour happens twice) and
impossible once a year (the spring-forward hour never happens). The repeated hour is told
apart by a DST flag column when the file has one (ERCOT's `DSTFlag`: "Y" on the second,
standard-time pass), else by the order of the rows: the first pass in the file's time
order is daylight time. A time inside the skipped hour is an error, never shifted.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
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
    hour's two passes are told apart by the DST flag, else by the file's time order: the
    rows must ascend (or descend) in UTC too, and where that leaves a choice (a file that
    starts or ends inside the repeated hour) the reading whose steps are most regular wins.

    Raises:
        PriceFileError: a naive stamp and no zone (the message adds `unknown_zone_hint`), a
            time in the spring-forward gap, a local time given more than twice, or a
            repeated hour without flags in a file that is not in time order.
    """
    first_naive = next((s for s in stamps if s.when.tzinfo is None), None)
    if first_naive is None:
        return [s.when.timestamp() for s in stamps]
    if zone is None:
        raise PriceFileError(f"{where}:{first_naive.line}: {first_naive.when:%Y-%m-%d %H:%M} "
                             "has no UTC offset and the file does not say its time zone; "
                             f"{unknown_zone_hint}")
    known = _known_utc(stamps, zone, where)
    open_rows = [i for i, u in enumerate(known) if u is None]
    if not open_rows:
        return [u for u in known if u is not None]
    naive = [s.when for s in stamps]
    ascending = _by_order(known, naive, zone)
    if ascending is not None:
        return ascending
    descending = _by_order(known[::-1], naive[::-1], zone)
    if descending is not None:
        return descending[::-1]
    s = stamps[open_rows[0]]
    raise PriceFileError(
        f"{where}:{s.line}: {s.when:%Y-%m-%d %H:%M} is in the hour that {zone.key} repeats "
        "when daylight saving ends, the file has no DST flag column and its rows are not in "
        "time order, so the two passes cannot be told apart; sort the file by time or add a "
        "DSTFlag column (Y on the second pass)")


def _known_utc(stamps: Sequence[Stamp], zone: ZoneInfo, where: str) -> list[float | None]:
    """UTC of every stamp that needs no row order (None for the repeated hour unflagged)."""
    seen: dict[datetime, int] = {}
    out: list[float | None] = []
    for s in stamps:
        if s.when.tzinfo is not None:
            out.append(s.when.timestamp())
            continue
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
            out.append(s.when.replace(tzinfo=zone, fold=int(s.dst_flag)).timestamp())
            continue
        seen[s.when] = seen.get(s.when, 0) + 1
        if seen[s.when] > 2:
            raise PriceFileError(
                f"{where}:{s.line}: duplicate: {s.when:%Y-%m-%d %H:%M} ({zone.key}) a third "
                "time; the fall-back hour repeats only once")
        out.append(None)
    return out


def _by_order(known: list[float | None], naive: list[datetime],
              zone: ZoneInfo) -> list[float] | None:
    """Fill the open stamps so that UTC strictly ascends; None when no filling does.

    In ascending order a run of open stamps is some first-pass (daylight) times followed
    by second-pass (standard) times: one split point per run, chosen for the most regular
    steps against the file's other steps.
    """
    # Wall-clock steps equal real ones everywhere but at the two changes: a fair reference.
    steps = [(b - a).total_seconds() for a, b in pairwise(naive) if b > a]
    ref = statistics.median(steps) if steps else None
    out = list(known)
    i = 0
    while i < len(out):
        if out[i] is not None:
            i += 1
            continue
        j = i
        while j < len(out) and out[j] is None:
            j += 1
        early = [naive[k].replace(tzinfo=zone, fold=0).timestamp() for k in range(i, j)]
        late = [naive[k].replace(tzinfo=zone, fold=1).timestamp() for k in range(i, j)]
        before = [out[i - 1]] if i > 0 else []
        after = [out[j]] if j < len(out) else []
        best: tuple[float, int] | None = None
        for m in range(j - i, -1, -1):  # more first-pass times first: the tie-break
            chain = [*before, *early[:m], *late[m:], *after]
            diffs = [b - a for a, b in pairwise(chain)]  # type: ignore[operator]
            if any(d <= 0 for d in diffs):
                continue
            score = sum(abs(d - ref) for d in diffs) if ref is not None else 0.0
            if best is None or score < best[0]:
                best = (score, m)
        if best is None:
            return None
        m = best[1]
        out[i:j] = [*early[:m], *late[m:]]
        i = j
    filled = [u for u in out if u is not None]
    return filled if all(b > a for a, b in pairwise(filled)) else None


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

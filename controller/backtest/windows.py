"""Grid windows of a backtest: events and peak alerts as a cap over intervals, from a file."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.prices import parse_datetime

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Window:
    """A grid event or peak window: the site may draw at most cap_kw from start to end."""

    start_s: float
    end_s: float
    cap_kw: float
    name: str = ""
    # What the file's naive times mean across a daylight-saving change, when that is not
    # what they seem to say (load_windows); "" otherwise.
    note: str = ""


class WindowFileError(ValueError):
    """A grid-window file that cannot be used; the message names the entry and why."""


def _window_time(text: Any, naive_tz: tzinfo = UTC) -> tuple[float, datetime | None]:
    """Unix seconds, or a date and time as price files write them (`parse_datetime`).

    Returned with the naive local time when the text had no offset (None otherwise).
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text), None
    value = str(text).strip()
    try:
        return float(value), None
    except ValueError:
        pass
    dt = parse_datetime(value)
    if dt.tzinfo is None:  # naive: on the price file's clock (its zone, passed in)
        return dt.replace(tzinfo=naive_tz).timestamp(), dt
    return dt.timestamp(), None


def _naive_note(start: datetime | None, end: datetime | None, start_s: float, end_s: float,
                tz: tzinfo) -> str:
    """How naive window times read across a daylight-saving change, when it matters.

    A time of the repeated hour is read as its first pass, one of the skipped hour as if
    the clocks had not changed yet; a window whose ends are on different sides of a
    change lasts longer or shorter than its clock times differ by. "" when none applies.
    """
    parts = []
    for label, naive in (("start", start), ("end", end)):
        if naive is None:
            continue
        first, second = naive.replace(tzinfo=tz), naive.replace(tzinfo=tz, fold=1)
        if first.utcoffset() == second.utcoffset():
            continue
        back = datetime.fromtimestamp(first.timestamp(), UTC).astimezone(tz)
        if back.replace(tzinfo=None) == naive:
            parts.append(f"{label} {naive:%Y-%m-%d %H:%M} occurs twice and is read as its "
                         f"first pass ({first:%Z})")
        else:
            parts.append(f"{label} {naive:%Y-%m-%d %H:%M} does not exist (the clocks skip "
                         f"it) and is read as {back:%H:%M %Z}")
    if start is not None and end is not None:
        clock_h = (end - start).total_seconds() / 3600.0
        real_h = (end_s - start_s) / 3600.0
        if abs(real_h - clock_h) > 1e-9:
            a, b = (datetime.fromtimestamp(x, UTC).astimezone(tz) for x in (start_s, end_s))
            change = (f"the change from {a:%Z} to {b:%Z}" if a.tzname() != b.tzname()
                      else "a daylight-saving change")
            parts.append(f"it spans {change}: {real_h:g} h of real time, not the "
                         f"{clock_h:g} h its clock times differ by")
    if not parts:
        return ""
    return ("; ".join(parts) + f" (naive times on {getattr(tz, 'key', tz)}'s clock; write "
            "them with their UTC offset, e.g. 2024-11-03T01:00-06:00, to mean otherwise)")


def load_windows(path: Path | str, naive_tz: tzinfo = UTC) -> list[Window]:
    """Grid events and peak windows from CSV (`start,end,cap_kw[,name]`) or JSON.

    JSON is a list of objects with the same keys, or {"windows": [...]}. Times are ISO
    8601 or Unix seconds; naive times are in `naive_tz` (the price series' zone, UTC by
    default; in the fall-back hour the first pass). A window whose naive times read
    otherwise than they seem across a daylight-saving change (a repeated or skipped
    time, a span of more or fewer real hours) carries a `note` saying how it was read.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise WindowFileError(f"{path}: cannot open: {e.strerror}") from None
    entries: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise WindowFileError(f"{path}: not valid JSON: {e}") from None
        if isinstance(data, dict):
            data = data.get("windows")
        if not isinstance(data, list):
            raise WindowFileError(f"{path}: expected a list of windows or {{\"windows\": [...]}}")
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise WindowFileError(f"{path}: window {i}: expected an object")
            entries.append((f"window {i}", item))
    else:
        reader = csv.DictReader(text.splitlines())
        missing = {"start", "end", "cap_kw"} - set(reader.fieldnames or [])
        if missing:
            raise WindowFileError(
                f"{path}: missing column(s) {', '.join(sorted(missing))} "
                "(header: start,end,cap_kw[,name])"
            )
        entries = [(f"line {n}", row) for n, row in enumerate(reader, start=2)]
    out: list[Window] = []
    for where, item in entries:
        try:
            start_s, start = _window_time(item["start"], naive_tz)
            end_s, end = _window_time(item["end"], naive_tz)
            note = _naive_note(start, end, start_s, end_s, naive_tz)
            w = Window(start_s=start_s, end_s=end_s, cap_kw=float(item["cap_kw"]),
                       name=str(item.get("name") or ""),
                       note=f"{path}: {where}: {note}" if note else "")
        except (KeyError, TypeError, ValueError) as e:
            raise WindowFileError(f"{path}: {where}: unparseable window ({e})") from None
        if not (w.end_s > w.start_s and math.isfinite(w.cap_kw) and w.cap_kw >= 0):
            raise WindowFileError(
                f"{path}: {where}: needs end after start and a cap_kw >= 0")
        out.append(w)
    return out


def window_caps(
    start_s: FloatArray, interval_s: float, windows: Sequence[Window], site_cap_w: float
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Cap per interval incl. aux: a window applies to every interval it overlaps."""
    cap = np.full(start_s.size, site_cap_w)
    grid = np.zeros(start_s.size, dtype=bool)
    for w in windows:
        hit = (start_s < w.end_s) & (start_s + interval_s > w.start_s)
        lower = hit & (w.cap_kw * 1000.0 < cap)
        cap[lower] = w.cap_kw * 1000.0
        grid |= lower
    return cap, grid

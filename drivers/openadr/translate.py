"""One OpenADR 2.0b event (as openleadr parses it) into the site's GridEvents: pure, no I/O.

What an event means for the site:

- One `GridEvent` per interval that carries an obligation. SIMPLE levels 1-3 map to the
  configured site targets (`level_N_kw`); level 0 is no obligation. LOAD_DISPATCH
  `setpoint` is a site target, `delta` (negative) a shed below baseline.
- Interval times follow OpenADR 2.0b (the EiEvent model of the 2.0b profile
  specification): intervals run one after another from the active period's `dtstart`,
  each for its `duration`. An interval that carries its own `dtstart` (openleadr's VTN
  sends one) starts there, and the intervals after it continue from its end.
- A `duration` of 0 ("until cancelled") is open-ended: its GridEvent ends at the next
  interval's own start when there is one, otherwise a rolling hold (`open_ended_end_ts`)
  that the VEN pushes forward while the VTN still lists the event.
- Ids are `oadr-<event id>-m<modification>-s<signal>-i<interval uid>`; `version` is the
  modification number.
- The opt decision follows the `opt_in` policy; anything that cannot be used is listed in
  `Translation.skipped` with a fixed reason code (see docs/openadr.md).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from controller.protocol.payloads import GridEvent
from drivers.openadr.config import OpenAdrConfig

Opt = Literal["optIn", "optOut"]
OPT_IN: Opt = "optIn"
OPT_OUT: Opt = "optOut"

# Watts per unit of an OpenADR SI scale code, for LOAD_DISPATCH in W/kW/MW.
_SCALE_TO_KW = {"none": 1e-3, "k": 1.0, "M": 1e3}
_MAX_KW = 10_000_000.0  # GridEvent's bound: beyond it a value is absurd, not a target
_ID_SAFE = re.compile(r"[^A-Za-z0-9_.:@-]")

# An open-ended interval's GridEvent ends on a whole number of steps after its start, at
# least OPEN_ENDED_LEAD_S from now. The end moves only once a step, so a copy published
# again (or by a restarted VEN) within the hour is the same message; the lead is twice the
# longest `republish_s`, so the VEN always extends it well before the controller would
# close it, and a VEN that is gone stops holding the site after 2-3 hours, not never.
OPEN_ENDED_STEP_S = 3600.0
OPEN_ENDED_LEAD_S = 7200.0


@dataclass(frozen=True, slots=True)
class Skipped:
    """A signal or interval that was not translated, and why (a fixed reason code)."""

    reason: str
    detail: str
    signal: int | None = None
    interval: int | None = None


@dataclass(frozen=True, slots=True)
class Translation:
    """What one OpenADR event means for the site.

    `open_ended` holds the ids of the GridEvents whose end is a rolling hold (an interval
    "until cancelled"): the VEN moves their end forward with `open_ended_end_ts`.
    """

    event_id: str
    modification: int
    cancelled: bool
    events: list[GridEvent] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    opt: Opt = OPT_OUT
    open_ended: frozenset[str] = frozenset()


def safe_id(text: str, max_len: int = 64) -> str:
    """An OpenADR id made safe for a GridEvent id; a hash keeps altered ids distinct."""
    clean = _ID_SAFE.sub("_", text)
    if clean == text and len(clean) <= max_len:
        return clean
    digest = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{clean[: max_len - 9]}-{digest}"


def grid_event_id(event_id: str, modification: int, signal: int, uid: int | str) -> str:
    """The GridEvent id of one interval of one signal of one modification of an event."""
    return f"oadr-{safe_id(event_id)}-m{modification}-s{signal}-i{safe_id(str(uid), 16)}"


def open_ended_end_ts(start_ts: float, now_ts: float) -> float:
    """The end (Unix s) an open-ended GridEvent starting at `start_ts` carries at `now_ts`.

    `start_ts` + a whole number (≥ 1) of `OPEN_ENDED_STEP_S`, at least `OPEN_ENDED_LEAD_S`
    after `now_ts`: within [now + lead, now + lead + step) once the interval has begun.
    """
    steps = math.ceil((now_ts + OPEN_ENDED_LEAD_S - start_ts) / OPEN_ENDED_STEP_S)
    return start_ts + max(1, steps) * OPEN_ENDED_STEP_S


def _seconds(value: Any) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _ts(value: Any) -> float | None:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # OpenADR times are UTC; openleadr makes them aware
            value = value.replace(tzinfo=UTC)
        return float(value.timestamp())
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _interval_target(
    cfg: OpenAdrConfig, signal: Mapping[str, Any], value: float
) -> tuple[Literal["target_kw", "shed_kw"], float] | Skipped | None:
    """(kind, kW) for one interval's payload, None for no obligation, or why it is skipped."""
    name = signal.get("signal_name")
    stype = signal.get("signal_type")
    if name in ("SIMPLE", "simple"):
        if stype != "level":
            return Skipped("unsupported_signal_type", f"SIMPLE with type {stype!r}")
        if value != int(value) or not 0 <= value <= 3:
            return Skipped("level_out_of_range", f"SIMPLE level {value:g} (0-3)")
        level = int(value)
        if level == 0:
            return None
        kw = (cfg.level_1_kw, cfg.level_2_kw, cfg.level_3_kw)[level - 1]
        if kw is None:
            return Skipped("level_not_configured", f"SIMPLE level {level}: no level_{level}_kw")
        return "target_kw", kw
    if name == "LOAD_DISPATCH":
        measurement = signal.get("measurement") or {}
        unit = measurement.get("unit") or "W"
        scale = measurement.get("scale") or ("k" if not measurement else "none")
        if unit != "W" or scale not in _SCALE_TO_KW:
            return Skipped("bad_unit", f"LOAD_DISPATCH in {scale}{unit} (W, kW or MW)")
        kw = value * _SCALE_TO_KW[scale]
        if stype == "setpoint":
            if not 0 <= kw <= _MAX_KW:
                return Skipped("value_out_of_range", f"setpoint {kw:g} kW")
            return "target_kw", kw
        if stype == "delta":
            if kw > 0:
                return Skipped("load_increase_unsupported", f"delta +{kw:g} kW")
            if -kw > _MAX_KW:
                return Skipped("value_out_of_range", f"delta {kw:g} kW")
            return ("shed_kw", -kw) if kw < 0 else None
        return Skipped("unsupported_signal_type", f"LOAD_DISPATCH with type {stype!r}")
    return Skipped("unsupported_signal", f"signal {name!r} of type {stype!r}")


@dataclass(frozen=True, slots=True)
class _Placed:
    """An interval on the clock: start (Unix s) and duration (s; 0 = until cancelled)."""

    start_ts: float
    duration_s: float
    own_start: bool  # the interval carried its own dtstart


def _place_intervals(intervals: list[Any], period_start_ts: float | None
                     ) -> list[_Placed | Skipped]:
    """Each interval's start and duration, or why it has none (no signal index set yet).

    An interval without its own dtstart begins where the one before it ended, the first
    at the active period's start. After an interval with no usable duration, or an
    open-ended one, there is no "where it ended": later intervals need their own dtstart.
    """
    out: list[_Placed | Skipped] = []
    cursor = period_start_ts
    why_no_cursor = "no dtstart, and the active period has none"
    for k, interval in enumerate(intervals):
        if not isinstance(interval, Mapping):
            out.append(Skipped("bad_interval", "not an interval", None, k))
            cursor, why_no_cursor = None, f"no dtstart, and interval {k} before it is unusable"
            continue
        own = _ts(interval.get("dtstart"))
        start = own if own is not None else cursor
        duration = _seconds(interval.get("duration"))
        if start is None:
            out.append(Skipped("bad_interval", why_no_cursor, None, k))
            continue
        if duration is None or duration < 0:
            out.append(Skipped("bad_interval",
                               f"no usable duration ({interval.get('duration')!r})", None, k))
            cursor = None
            why_no_cursor = f"no dtstart, and interval {k} before it has no usable duration"
            continue
        out.append(_Placed(start, duration, own is not None))
        if duration == 0:
            cursor = None
            why_no_cursor = f"no dtstart, and interval {k} before it is open-ended"
        else:
            cursor = start + duration
    return out


def _interval_uids(intervals: list[Any]) -> list[int | str]:
    """The uid of each interval for its GridEvent id; positions when uids are unusable.

    Each interval needs an id of its own: when one uid is missing or two are the same,
    the signal's intervals are named by their position instead (still stable across
    repeated deliveries of the same modification).
    """
    uids = [i.get("uid") if isinstance(i, Mapping) else None for i in intervals]
    texts = [str(u) for u in uids]
    if any(u is None or isinstance(u, bool) for u in uids) or len(set(texts)) != len(texts):
        return list(range(len(intervals)))
    return [u if isinstance(u, int) else str(u) for u in uids]


@dataclass(frozen=True, slots=True)
class _Event:
    """What every interval of one event shares."""

    cfg: OpenAdrConfig
    event_id: str
    modification: int
    start_ts: float | None  # the active period's dtstart, Unix s
    ramp_s: float | None  # x-eiRampUp, s, when usable (0 < ramp <= 1 day)
    source: str  # GridEvent.source: openadr:<vtn id>
    now_ts: float


def _interval_end(placed: list[_Placed | Skipped], k: int, now_ts: float) -> tuple[float, bool]:
    """Interval k's end, Unix s, and whether it lasts until cancelled (duration 0)."""
    where = placed[k]
    assert isinstance(where, _Placed)
    if where.duration_s > 0:
        return where.start_ts + where.duration_s, False
    # "Until cancelled": up to the next interval when that one has its own start.
    following = placed[k + 1] if k + 1 < len(placed) else None
    if isinstance(following, _Placed) and following.own_start \
            and following.start_ts > where.start_ts:
        return following.start_ts, False
    return open_ended_end_ts(where.start_ts, now_ts), True


def _interval_event(ctx: _Event, signal: Mapping[str, Any], j: int, k: int, *,
                    placed: list[_Placed | Skipped], uid: int | str,
                    skipped: list[Skipped]) -> tuple[GridEvent, bool] | None:
    """Interval k of signal j as a GridEvent, and whether it lasts until cancelled.

    None when there is nothing to send: it is over already, it sets no obligation
    (SIMPLE 0, delta 0), or it cannot be translated (the reason is added to `skipped`).
    A target below `min_target_kw` is noted in `skipped`, and sent only under opt_in
    "always".
    """
    where = placed[k]
    if isinstance(where, Skipped):
        skipped.append(Skipped(where.reason, where.detail, j, k))
        return None
    start = where.start_ts
    end, until_cancelled = _interval_end(placed, k, ctx.now_ts)
    if end <= ctx.now_ts:
        return None  # over already: nothing to do, nothing wrong
    interval = signal["intervals"][k]
    value = _number(interval.get("signal_payload"))
    if value is None:
        skipped.append(Skipped("bad_value", f"payload {interval.get('signal_payload')!r}",
                               j, k))
        return None
    target = _interval_target(ctx.cfg, signal, value)
    if isinstance(target, Skipped):
        skipped.append(Skipped(target.reason, target.detail, j, k))
        return None
    if target is None:
        return None  # no obligation (SIMPLE 0, delta 0)
    kind, kw = target
    if kind == "target_kw" and kw < ctx.cfg.min_target_kw:
        skipped.append(Skipped("below_min_target",
                               f"{kw:g} kW < min_target_kw {ctx.cfg.min_target_kw:g}", j, k))
        if ctx.cfg.opt_in != "always":
            return None
    deadline = start
    if ctx.cfg.deadline_from_ramp_up and ctx.ramp_s is not None and start == ctx.start_ts:
        deadline = start + min(ctx.ramp_s, end - start)
    try:
        event = GridEvent(
            id=grid_event_id(ctx.event_id, ctx.modification, j, uid), kind=kind, value_kw=kw,
            start_ts=start, end_ts=end, deadline_ts=deadline, source=ctx.source,
            version=ctx.modification)
    except ValidationError as e:
        skipped.append(Skipped("bad_value", str(e.errors()[0]["msg"]), j, k))
        return None
    return event, until_cancelled


def translate_event(event: Mapping[str, Any], cfg: OpenAdrConfig, *, vtn_id: str,
                    now_ts: float) -> Translation:
    """Turn one parsed OpenADR event (openleadr's dict) into GridEvents and an opt decision.

    `event` is one entry of openleadr's parsed oadrDistributeEvent `events` (times as
    aware datetimes, durations as timedeltas); `now_ts` is Unix s. Pure: no I/O, no clock.
    Intervals that have ended are dropped without complaint; anything that cannot be
    translated is listed in `skipped` with a reason. Never raises on bad input.
    """
    descriptor = event.get("event_descriptor") or {}
    event_id = str(descriptor.get("event_id") or "")
    modification = descriptor.get("modification_number")
    if not event_id or isinstance(modification, bool) or not isinstance(modification, int) \
            or modification < 0:
        return Translation(event_id or "?", -1, False,
                           skipped=[Skipped("bad_event", "no event_id or modification_number")])
    if descriptor.get("event_status") == "cancelled":
        return Translation(event_id, modification, True, opt=OPT_IN)

    active = event.get("active_period") or {}
    ramp_s = _seconds(active.get("ramp_up", active.get("ramp_up_period")))
    ctx = _Event(cfg, event_id, modification, _ts(active.get("dtstart")),
                 ramp_s if ramp_s is not None and 0 < ramp_s <= 86_400 else None,
                 f"openadr:{vtn_id}"[:128], now_ts)
    out: list[GridEvent] = []
    open_ended: set[str] = set()
    skipped: list[Skipped] = []
    signals = event.get("event_signals") or []
    if not isinstance(signals, list) or not signals:
        skipped.append(Skipped("bad_event", "no event signals"))
        signals = []
    for j, signal in enumerate(signals):
        intervals = signal.get("intervals") if isinstance(signal, Mapping) else None
        if not isinstance(intervals, list) or not intervals:
            skipped.append(Skipped("bad_signal", "no intervals", j))
            continue
        placed = _place_intervals(intervals, ctx.start_ts)
        uids = _interval_uids(intervals)
        for k in range(len(intervals)):
            got = _interval_event(ctx, signal, j, k, placed=placed, uid=uids[k],
                                  skipped=skipped)
            if got is not None:
                out.append(got[0])
                if got[1]:
                    open_ended.add(got[0].id)
    if cfg.opt_in == "never":
        opt = OPT_OUT
    elif cfg.opt_in == "always":
        opt = OPT_IN
    else:
        opt = OPT_OUT if skipped else OPT_IN
    return Translation(event_id, modification, False,
                       events=out if opt == OPT_IN else [], skipped=skipped, opt=opt,
                       open_ended=frozenset(open_ended) if opt == OPT_IN else frozenset())

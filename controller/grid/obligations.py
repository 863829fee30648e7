"""Grid obligations: demand-response events and under-frequency shedding, as a cap over time.

Lifecycle of an event: scheduled -> active -> completed, or cancelled. It takes
effect `prepare_s` before its deadline (so the site is at the target when the
deadline comes, not starting to shed then), holds until its end, and afterwards
the cap rises back at the recovery ramp rather than all at once. Overlapping
events: the tightest wins. An under-frequency reading sheds the configured groups at
once; after `restore_hold_s` above the restore threshold they come back at the
recovery ramp.

Obey first, record after: an event takes effect from memory, and its journal write
is queued (`GridJournal`), so a full or read-only disk delays the record, never the
obedience. Versions: an event's `version` (OpenADR's modificationNumber, the send
time in ms from `mineops events send`) orders its copies; an older or unversioned copy
never replaces a versioned one, and a cancelled event stays cancelled unless a newer
version reinstates it. Refused copies raise `PayloadError` (counted and logged by
ingest as invalid grid messages, reasons in `REFUSED`).

Time: events are in wall-clock Unix seconds; durations (recovery ramps, sample
intervals, energy, the frequency hold) run on the monotonic clock. A wall-clock step
is detected (`WallClockGuard`); until the clocks agree again an event is in force if
either the wall clock or the wall clock carried on from before the step says so, and
it ends when both say it has ended, so a step can neither end an event early nor
delay or skip one. Records are truthful: baselines, samples after the deadline,
"reached" and curtailed energy come from meter readings alone; without a fresh
reading a sample says so (no meter value) and is counted apart.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import structlog

from controller.grid.journal import EventRow, GridJournal
from controller.protocol.payloads import GridEvent, PayloadError

log = structlog.get_logger("mineops.grid")

OPEN = ("scheduled", "active")
# Why a copy of an event was refused (ingest's invalid-message reasons for kind "grid").
REFUSED = ("stale_version", "unversioned_after_versioned", "conflicting_version",
           "event_cancelled")


@dataclass(frozen=True, slots=True)
class Obligation:
    """What the grid asks of the site now."""

    cap_w: float  # incl. aux; inf when nothing is in force
    force_sleep: npt.NDArray[np.bool_] | None  # miners that must sleep (emergency, frequency)
    event: EventRow | None  # the tightest event in force, for metrics
    deadline_ts: float | None


@dataclass(frozen=True, slots=True)
class GridRules:
    """Operator settings for obligations (from the site config's [grid] table)."""

    prepare_s: float = 30.0
    recovery_w_per_s: float = 10_000.0
    record_interval_s: float = 5.0
    tolerance_fraction: float = 0.005  # meter noise allowance when judging compliance
    shed_below_hz: float = 59.7
    restore_above_hz: float = 59.9
    restore_hold_s: float = 30.0
    peak_hold_w: float | None = None  # level held through a peak alert that names none
    clock_step_tolerance_s: float = 2.0  # wall clock off the monotonic one by more: a step


class WallClockGuard:
    """Detects wall-clock steps against the monotonic clock; two views of "now" meanwhile.

    `observe()` returns the views: the wall clock as read and, while a step is unresolved,
    the wall clock carried on along the monotonic clock from the last reading before the
    step. Which one is right, the controller cannot know
    (NTP correcting a wrong clock, or an operator's mistake), so both are kept until the
    wall clock agrees with the carried one again: an event is in force when either view
    says so and over when both do. A wrong clock then costs curtailment (an event can be
    in force in both timelines), never a missed event. `offset_s` (a metric) says an
    unresolved step is in force.

    Args:
        tolerance_s: The largest disagreement between the clocks that is not a step, s.
    """

    def __init__(self, tolerance_s: float = 2.0) -> None:
        self.tolerance_s = tolerance_s
        self.steps = 0
        self.offset_s = 0.0  # wall - carried; 0 when no step is unresolved
        self._last: tuple[float, float] | None = None  # (wall, monotonic) last seen
        self._anchor: tuple[float, float] | None = None  # the last reading before the step

    def observe(self, wall_s: float, mono_s: float) -> tuple[float, ...]:
        """The views of "now" at this reading of both clocks, Unix s.

        (wall,) when no step is unresolved, else (wall, carried) (see the class).
        """
        if self._last is not None:
            jump = wall_s - (self._last[0] + (mono_s - self._last[1]))
            if abs(jump) > self.tolerance_s:
                self.steps += 1
                if self._anchor is None:
                    self._anchor = self._last
                log.warning("wall_clock_step", step_s=round(jump, 3), steps=self.steps,
                            hint="grid events are judged by the clock before the step and "
                            "by the new one until they agree again; durations are timed "
                            "on the monotonic clock")
        self._last = (wall_s, mono_s)
        if self._anchor is None:
            self.offset_s = 0.0
            return (wall_s,)
        carried = self._anchor[0] + (mono_s - self._anchor[1])
        if abs(wall_s - carried) <= self.tolerance_s:
            log.info("wall_clock_step_resolved", offset_s=round(wall_s - carried, 3))
            self._anchor = None
            self.offset_s = 0.0
            return (wall_s,)
        self.offset_s = wall_s - carried
        return wall_s, carried


@dataclass(frozen=True, slots=True)
class _Reading:
    """A site-meter reading as compliance uses it: power, when (monotonic, wall, views)."""

    power_w: float
    at_mono: float
    at_ts: float
    views: tuple[float, ...]  # the reading's time in each of the clock's views


def _clocks(now_ts: float | None, now_mono: float | None) -> tuple[float, float]:
    """(wall, monotonic) now, s: both read when neither is given.

    A caller that passes only a wall time (a replay, a test) gets its durations on that
    same timeline.
    """
    if now_ts is None:
        return time.time(), time.monotonic() if now_mono is None else now_mono
    return now_ts, now_ts if now_mono is None else now_mono


def _refusal(event: GridEvent, known: EventRow) -> tuple[str, str] | None:
    """Why a copy of a known event must not replace it, or None (a newer copy, or an update)."""
    new, old = event.version, known.version
    newer = new is not None and old is not None and new > old
    if known.status == "cancelled" and not newer:
        return "event_cancelled", (f"{event.id} was cancelled (version {old}); only a newer "
                                   "version reinstates it")
    if new is None and old is not None:
        return "unversioned_after_versioned", (f"{event.id} has version {old}; a copy without "
                                               "one cannot be ordered against it")
    if new is not None and old is not None and new < old:
        return "stale_version", f"{event.id}: version {new} is older than {old}"
    if new is not None and new == old:
        return "conflicting_version", (f"{event.id}: version {new} again with other content; "
                                       "the first copy is kept")
    return None


class GridObligations:
    """Events (from the journal at start) plus frequency state; `obligation()` gives the cap.

    Args:
        journal: Where events and samples are recorded (after they take effect).
        rules: Operator settings.
        keep_alive: (miners,) bool: run through an emergency.
        frequency_shed: (miners,) bool: sleep on under-frequency.
        keep_alive_w: Site power of the keep-alive set at full power, W (an emergency's cap).
    """

    def __init__(self, journal: GridJournal, rules: GridRules, *,
                 keep_alive: npt.NDArray[np.bool_], frequency_shed: npt.NDArray[np.bool_],
                 keep_alive_w: float) -> None:
        self.journal = journal
        self.rules = rules
        self.keep_alive = keep_alive
        self.frequency_shed = frequency_shed
        self.keep_alive_w = keep_alive_w
        self.clock = WallClockGuard(rules.clock_step_tolerance_s)
        self.rows: dict[str, EventRow] = {}
        # Every event ever journaled, for versions and duplicates (open ones are in rows).
        self.known: dict[str, EventRow] = {}
        for r in journal.rows():
            if r.kind == "frequency" and r.status in OPEN:
                # A shed from before a restart: the meter re-decides it.
                r.status = "completed"
                journal.save(r, r.received_ts, flush=False)
            self.known[r.id] = r
            if r.status in OPEN:
                self.rows[r.id] = r
        journal.flush()
        # Recovery ramps: (monotonic end, cap at end W; NaN: from the meter at release).
        self._recovering: list[tuple[float, float]] = []
        self._in_force: dict[str, float] = {}  # event id -> its target W, last decision
        self._last_sample: dict[str, float] = {}  # event id -> monotonic time
        # Per event in force: since when (monotonic), the last reading integrated and the
        # last one sampled (monotonic reading times).
        self._in_force_since: dict[str, float] = {}
        self._metered: dict[str, float] = {}
        self._sampled: dict[str, float] = {}
        self.frequency_low_since: float | None = None
        self.frequency_ok_since: float | None = None  # monotonic
        self.frequency_event: str | None = None
        if self.rows:
            log.info("grid_events_resumed", events=sorted(self.rows))

    # -- intake -----------------------------------------------------------------

    def accept(self, event: GridEvent, now_ts: float | None = None,
               now_mono: float | None = None) -> bool:
        """Take an event (new, updated or cancelled) into force, then journal it.

        Returns:
            True if anything changed; False for a copy identical to the one known.

        Raises:
            PayloadError: a copy that must not replace the known one (reason in REFUSED).
        """
        now_ts, now_mono = _clocks(now_ts, now_mono)
        payload = event.model_dump(mode="json")
        known = self.known.get(event.id)
        if known is not None:
            if json.dumps(known.payload, sort_keys=True) == json.dumps(payload, sort_keys=True):
                return False
            refused = _refusal(event, known)
            if refused is not None:
                raise PayloadError(*refused)
            if event.cancelled:
                # A cancel ends the event that was agreed: its record keeps those terms
                # (kind, target, times) whatever the cancel message carries, so the
                # settlement record is never rewritten; only the status and version change.
                payload = {**known.payload, "cancelled": True, "version": event.version}
                event = GridEvent.model_validate(payload)
        # Over only by both views while a clock step is unresolved.
        ended = now_ts >= event.end_ts and now_ts - self.clock.offset_s >= event.end_ts
        status = "cancelled" if event.cancelled else ("completed" if ended else "scheduled")
        prior = self.rows.get(event.id)
        row = EventRow(id=event.id, kind=event.kind, payload=payload,
                       received_ts=now_ts if known is None else known.received_ts,
                       status=status, baseline_w=None, target_w=None, reached_ts=None,
                       curtailed_wh=0.0, violations=0, samples_after_deadline=0,
                       version=event.version)
        if prior is not None:
            # An update keeps what was measured so far; only the terms change.
            row.status = prior.status if status == "scheduled" else status
            row.baseline_w, row.target_basis_w = prior.baseline_w, prior.target_basis_w
            row.reached_ts, row.curtailed_wh = prior.reached_ts, prior.curtailed_wh
            row.violations = prior.violations
            row.samples_after_deadline = prior.samples_after_deadline
            row.samples_without_meter = prior.samples_without_meter
            row.target_w = prior.target_w
        self.known[event.id] = row
        if row.status in OPEN:
            self.rows[event.id] = row
            self.journal.save(row, now_ts)
        else:
            self._close(row, row.status, now_ts, now_mono)
        if event.kind == "peak" and event.value_kw is None and self.rules.peak_hold_w is None:
            log.error("peak_alert_without_level", id=event.id,
                      hint="set grid.peak_hold_kw or send value_kw")
        log.info("grid_event_accepted", id=event.id, kind=event.kind, value_kw=event.value_kw,
                 start_ts=event.start_ts, end_ts=event.end_ts, status=row.status,
                 source=event.source, version=event.version,
                 durable=self.journal.pending == 0)
        return True

    def _close(self, row: EventRow, status: str, now_ts: float, now_mono: float) -> None:
        self.rows.pop(row.id, None)
        target = self._in_force.pop(row.id, None)
        self._metered.pop(row.id, None)
        self._in_force_since.pop(row.id, None)
        if target is not None:
            self._recovering.append((now_mono, target))
        row.status = status
        self.known[row.id] = row
        self.journal.save(row, now_ts)
        log.info("grid_event_closed", id=row.id, status=status, complied=row.complied,
                 curtailed_kwh=round(row.curtailed_wh / 1000, 3))

    def frequency(self, hz: float, now_ts: float | None = None,
                  now_mono: float | None = None) -> str | None:
        """Feed a frequency reading: "shed" (act at once), "restored", or None."""
        r = self.rules
        now_ts, now_mono = _clocks(now_ts, now_mono)
        if hz < r.shed_below_hz:
            self.frequency_ok_since = None
            if self.frequency_event is None:
                self.frequency_event = f"frequency-{int(now_ts * 1000)}"
                row = EventRow(id=self.frequency_event, kind="frequency",
                               payload={"min_hz": hz, "threshold_hz": r.shed_below_hz,
                                        "start_ts": now_ts},
                               received_ts=now_ts, status="active", baseline_w=None,
                               target_w=None, reached_ts=None, curtailed_wh=0.0, violations=0,
                               samples_after_deadline=0)
                self.known[row.id] = row
                log.warning("under_frequency_shed", hz=hz, threshold_hz=r.shed_below_hz,
                            miners=int(self.frequency_shed.sum()))
                self.journal.save(row, now_ts)
                return "shed"
            return None
        if self.frequency_event is not None and hz >= r.restore_above_hz:
            if self.frequency_ok_since is None:
                self.frequency_ok_since = now_mono
            elif now_mono - self.frequency_ok_since >= r.restore_hold_s:
                row = self.known[self.frequency_event]
                row.status = "completed"
                log.info("under_frequency_restored", hz=hz, event_id=self.frequency_event)
                self.frequency_event = None
                self._recovering.append((now_mono, math.nan))  # ramp back from measured power
                self.journal.save(row, now_ts)
                return "restored"
        return None

    # -- the cap in force -----------------------------------------------------------

    def _target_w(self, row: EventRow) -> float | None:
        p = row.payload
        if row.kind == "target_kw":
            return float(p["value_kw"]) * 1000.0
        if row.kind == "shed_kw":
            if row.target_basis_w is None:
                return None
            return max(0.0, row.target_basis_w - float(p["value_kw"]) * 1000.0)
        if row.kind == "peak":
            value = p.get("value_kw")
            return float(value) * 1000.0 if value is not None else self.rules.peak_hold_w
        return self.keep_alive_w  # emergency

    def next_change_ts(self, now_ts: float) -> float | None:
        """The next wall-clock time (Unix s) an open event comes into force or ends.

        The decision loop wakes then, not at its next tick: a target is in force
        `prepare_s` before its deadline, to the tick's length at most late otherwise.
        """
        times = [t for r in self.rows.values()
                 for t in ((r.payload.get("deadline_ts") or r.payload["start_ts"])
                           - self.rules.prepare_s, r.payload["end_ts"])
                 if t > now_ts]
        return min(times, default=None)

    def obligation(self, now_ts: float, meter_w: float | None, site_cap_w: float, *,
                   now_mono: float | None = None, meter_at: float | None = None,
                   least_w: float | None = None) -> Obligation:
        """Advance every event to now and return the tightest cap in force.

        Args:
            now_ts: Wall clock, Unix s.
            meter_w: A fresh site-meter reading, W; None when there is none (never a plan).
            site_cap_w: The site's own cap, W.
            now_mono: Monotonic clock, s (default: `now_ts`, for callers on one timeline).
            meter_at: When `meter_w` was read, on the monotonic clock (default: now). A
                compliance sample is one reading: a reading is sampled once, at its time.
            least_w: The least the site can be drawing now, W, from what else is known:
                a shed_kw target taking effect without a meter reading is computed from it
                (the worst case for the grid), and recorded as not metered.
        """
        now_ts, now_mono = _clocks(now_ts, now_mono)
        views = self.clock.observe(now_ts, now_mono)
        cap = math.inf
        tightest: EventRow | None = None
        deadline: float | None = None
        emergency = False
        in_force: set[str] = set()
        reading: _Reading | None = None
        if meter_w is not None:
            at = now_mono if meter_at is None else min(meter_at, now_mono)
            age = now_mono - at
            reading = _Reading(meter_w, at, now_ts - age, tuple(t - age for t in views))
        for row in list(self.rows.values()):
            p = row.payload
            met_by = p.get("deadline_ts") or p["start_ts"]
            if all(t >= p["end_ts"] for t in views):
                self._close(row, "completed", now_ts, now_mono)
                continue
            if not any(met_by - self.rules.prepare_s <= t < p["end_ts"] for t in views):
                continue
            if row.status == "scheduled":
                row.status = "active"
                row.baseline_w = meter_w
                row.target_basis_w = meter_w if meter_w is not None else (
                    least_w if least_w is not None else 0.0)
                log.info("grid_event_active", id=row.id,
                         baseline_kw=None if meter_w is None else round(meter_w / 1e3, 1),
                         target_basis_kw=round(row.target_basis_w / 1e3, 1),
                         metered=meter_w is not None)
            target = self._target_w(row)
            if target is None:
                continue
            row.target_w = target
            in_force.add(row.id)
            if row.id not in self._in_force:
                self._in_force_since[row.id] = now_mono
            self._in_force[row.id] = target
            self._account(row, now_ts, now_mono, met_by=met_by, views=views, reading=reading,
                          target=target)
            if target < cap:
                cap, tightest, deadline = target, row, met_by
            emergency |= row.kind == "emergency"
        for gone in set(self._in_force) - in_force:
            # Out of force without ending (a clock step put it outside its window): ramp back.
            self._recovering.append((now_mono, self._in_force.pop(gone)))
            self._metered.pop(gone, None)
            self._in_force_since.pop(gone, None)
        cap = min(cap, self._recovery_cap(now_mono, meter_w, site_cap_w))
        self.journal.flush()
        force = None
        if emergency:
            force = ~self.keep_alive
        if self.frequency_event is not None:
            force = self.frequency_shed if force is None else (force | self.frequency_shed)
        return Obligation(cap, force, tightest, deadline)

    def _recovery_cap(self, now_mono: float, meter_w: float | None, site_cap_w: float) -> float:
        cap = math.inf
        keep = []
        for ended, start_w in self._recovering:
            # NaN (a frequency restore): ramp from the power measured at release; without a
            # reading, from nothing.
            base = (meter_w or 0.0) if math.isnan(start_w) else start_w
            level = base + self.rules.recovery_w_per_s * max(0.0, now_mono - ended)
            if level < site_cap_w:
                keep.append((ended, base))
                cap = min(cap, level)
        self._recovering = keep
        return cap

    def _account(self, row: EventRow, now_ts: float, now_mono: float, *, met_by: float,
                 views: tuple[float, ...], reading: _Reading | None, target: float) -> None:
        """Compliance from meter readings: reached, energy curtailed, samples after the deadline.

        Each sample is one reading, taken once, at the reading's time; a decision without
        a fresh reading records a sample without a meter value ("no meter data").
        """
        tolerance = 1 + self.rules.tolerance_fraction
        if reading is None:
            self._metered.pop(row.id, None)  # an energy gap, not a curtailment
        else:
            last = self._metered.get(row.id)
            if last is not None and row.baseline_w is not None and reading.at_mono > last:
                row.curtailed_wh += max(0.0, row.baseline_w - reading.power_w) * (
                    reading.at_mono - last) / 3600
            self._metered[row.id] = reading.at_mono
            since = self._in_force_since.get(row.id, now_mono)
            if row.reached_ts is None and reading.at_mono >= since \
                    and reading.power_w <= target * tolerance:
                row.reached_ts = reading.at_ts
        if now_mono - self._last_sample.get(row.id, -math.inf) < self.rules.record_interval_s:
            return
        if reading is None:
            self._last_sample[row.id] = now_mono
            if any(t >= met_by for t in views):
                row.samples_without_meter += 1
            self.journal.add_sample(row.id, now_ts, None, target, target)
        elif reading.at_mono > self._sampled.get(row.id, -math.inf):
            self._last_sample[row.id] = now_mono
            self._sampled[row.id] = reading.at_mono
            if any(t >= met_by for t in reading.views):
                row.samples_after_deadline += 1
                if reading.power_w > target * tolerance:
                    row.violations += 1
            self.journal.add_sample(row.id, reading.at_ts, reading.power_w, target, target)
        else:
            return  # no reading since the last sample: wait for the next one
        self.journal.save(row, now_ts, flush=False)

"""Grid obligations: demand-response events and under-frequency shedding, as a cap over time.

Lifecycle of an event: scheduled -> active -> completed, or cancelled. It takes
effect `prepare_s` before its deadline (so the site is at the target when the
deadline comes, not starting to shed then), holds until its end, and afterwards
the cap rises back at the recovery ramp rather than all at once. Overlapping
events: the tightest wins. `shed_kw` events measure their baseline from the meter
when they take effect. An under-frequency reading sheds the configured groups at
once; after `restore_hold_s` above the restore threshold they come back at the
recovery ramp. Time here is wall-clock Unix seconds, passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import structlog

from controller.grid.journal import EventRow, GridJournal
from controller.protocol.payloads import GridEvent

log = structlog.get_logger("mineops.grid")

OPEN = ("scheduled", "active")


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


class GridObligations:
    """Events from the journal plus frequency state; `obligation()` gives the cap in force."""

    def __init__(self, journal: GridJournal, rules: GridRules, *,
                 keep_alive: npt.NDArray[np.bool_], frequency_shed: npt.NDArray[np.bool_],
                 keep_alive_w: float) -> None:
        self.journal = journal
        self.rules = rules
        self.keep_alive = keep_alive
        self.frequency_shed = frequency_shed
        self.keep_alive_w = keep_alive_w
        self.rows: dict[str, EventRow] = {}
        for r in journal.rows(open_only=True):
            if r.kind == "frequency":  # a shed from before a restart: the meter re-decides it
                r.status = "completed"
                journal.update(r, r.received_ts)
            else:
                self.rows[r.id] = r
        # Recovery: (end time, cap at end) of events that ended, for the ramp back up.
        self._recovering: list[tuple[float, float]] = []
        self._last_sample: dict[str, float] = {}
        self._last_meter: tuple[float, float] | None = None
        self.frequency_low_since: float | None = None
        self.frequency_ok_since: float | None = None
        self.frequency_event: str | None = None
        if self.rows:
            log.info("grid_events_resumed", events=sorted(self.rows))

    # -- intake -----------------------------------------------------------------

    def accept(self, event: GridEvent, now_ts: float) -> bool:
        """Journal an event (new, updated or cancelled); True if anything changed."""
        status = "cancelled" if event.cancelled else (
            "completed" if now_ts >= event.end_ts else "scheduled")
        payload = event.model_dump(mode="json")
        if not self.journal.upsert(event.id, event.kind, payload, now_ts, status):
            return False
        fresh = next(r for r in self.journal.rows() if r.id == event.id)
        prior = self.rows.get(event.id)
        if prior is not None and status != "cancelled":
            # An update keeps what was measured so far; only the terms change.
            fresh.status, fresh.baseline_w = prior.status, prior.baseline_w
            fresh.reached_ts, fresh.curtailed_wh = prior.reached_ts, prior.curtailed_wh
        if status in OPEN:
            self.rows[event.id] = fresh
        else:
            self._close(fresh, status, now_ts)
        if event.kind == "peak" and event.value_kw is None and self.rules.peak_hold_w is None:
            log.error("peak_alert_without_level", id=event.id,
                      hint="set grid.peak_hold_kw or send value_kw")
        log.info("grid_event_accepted", id=event.id, kind=event.kind, value_kw=event.value_kw,
                 start_ts=event.start_ts, end_ts=event.end_ts, status=status,
                 source=event.source)
        return True

    def _close(self, row: EventRow, status: str, now_ts: float) -> None:
        prior = self.rows.pop(row.id, None)
        if prior is not None and prior.status == "active" and prior.target_w is not None:
            self._recovering.append((now_ts, prior.target_w))
            row = prior
        row.status = status
        self.journal.update(row, now_ts)
        log.info("grid_event_closed", id=row.id, status=status, complied=row.complied,
                 curtailed_kwh=round(row.curtailed_wh / 1000, 3))

    def frequency(self, hz: float, now_ts: float) -> str | None:
        """Feed a frequency reading: "shed" (act at once), "restored", or None."""
        r = self.rules
        if hz < r.shed_below_hz:
            self.frequency_ok_since = None
            if self.frequency_event is None:
                self.frequency_event = f"frequency-{int(now_ts * 1000)}"
                self.journal.upsert(self.frequency_event, "frequency",
                                    {"min_hz": hz, "threshold_hz": r.shed_below_hz,
                                     "start_ts": now_ts}, now_ts, "active")
                log.warning("under_frequency_shed", hz=hz, threshold_hz=r.shed_below_hz,
                            miners=int(self.frequency_shed.sum()))
                return "shed"
            return None
        if self.frequency_event is not None and hz >= r.restore_above_hz:
            if self.frequency_ok_since is None:
                self.frequency_ok_since = now_ts
            elif now_ts - self.frequency_ok_since >= r.restore_hold_s:
                row = next(x for x in self.journal.rows() if x.id == self.frequency_event)
                row.status = "completed"
                self.journal.update(row, now_ts)
                log.info("under_frequency_restored", hz=hz, event_id=self.frequency_event)
                self.frequency_event = None
                self._recovering.append((now_ts, math.nan))  # ramp back from measured power
                return "restored"
        return None

    # -- the cap in force -----------------------------------------------------------

    def _target_w(self, row: EventRow, meter_w: float | None) -> float | None:
        p = row.payload
        if row.kind == "target_kw":
            return float(p["value_kw"]) * 1000.0
        if row.kind == "shed_kw":
            if row.baseline_w is None:
                return None
            return max(0.0, row.baseline_w - float(p["value_kw"]) * 1000.0)
        if row.kind == "peak":
            value = p.get("value_kw")
            return float(value) * 1000.0 if value is not None else self.rules.peak_hold_w
        return self.keep_alive_w  # emergency

    def obligation(self, now_ts: float, meter_w: float | None, site_cap_w: float) -> Obligation:
        """Advance every event to `now_ts` and return the tightest cap in force."""
        cap = math.inf
        tightest: EventRow | None = None
        deadline: float | None = None
        emergency = False
        for row in list(self.rows.values()):
            p = row.payload
            met_by = p.get("deadline_ts") or p["start_ts"]
            if now_ts >= p["end_ts"]:
                self._close(row, "completed", now_ts)
                continue
            if now_ts < met_by - self.rules.prepare_s:
                continue
            if row.status == "scheduled":
                row.status = "active"
                row.baseline_w = meter_w if meter_w is not None else site_cap_w
                log.info("grid_event_active", id=row.id, baseline_kw=round(row.baseline_w / 1e3, 1))
            target = self._target_w(row, meter_w)
            if target is None:
                continue
            row.target_w = target
            self._account(row, now_ts, met_by, meter_w, target)
            if target < cap:
                cap, tightest, deadline = target, row, met_by
            emergency |= row.kind == "emergency"
        if meter_w is not None:
            self._last_meter = (now_ts, meter_w)
        cap = min(cap, self._recovery_cap(now_ts, meter_w, site_cap_w))
        force = None
        if emergency:
            force = ~self.keep_alive
        if self.frequency_event is not None:
            force = self.frequency_shed if force is None else (force | self.frequency_shed)
        return Obligation(cap, force, tightest, deadline)

    def _recovery_cap(self, now_ts: float, meter_w: float | None, site_cap_w: float) -> float:
        cap = math.inf
        keep = []
        for ended_ts, start_w in self._recovering:
            # NaN (a frequency restore): ramp from the power measured at release.
            base = (meter_w or 0.0) if math.isnan(start_w) else start_w
            level = base + self.rules.recovery_w_per_s * (now_ts - ended_ts)
            if level < site_cap_w:
                keep.append((ended_ts, base))
                cap = min(cap, level)
        self._recovering = keep
        return cap

    def _account(self, row: EventRow, now_ts: float, met_by: float, meter_w: float | None,
                 target: float) -> None:
        """Compliance: time to reach the target, curtailed energy, samples after the deadline."""
        last = self._last_meter
        if meter_w is not None and last is not None and row.baseline_w is not None:
            dt = max(0.0, now_ts - last[0])
            row.curtailed_wh += max(0.0, row.baseline_w - meter_w) * dt / 3600.0
        if meter_w is not None and row.reached_ts is None and now_ts >= row.payload["start_ts"] \
                - self.rules.prepare_s and meter_w <= target * (1 + self.rules.tolerance_fraction):
            row.reached_ts = now_ts
        if now_ts - self._last_sample.get(row.id, -math.inf) >= self.rules.record_interval_s:
            self._last_sample[row.id] = now_ts
            if now_ts >= met_by and meter_w is not None:
                row.samples_after_deadline += 1
                if meter_w > target * (1 + self.rules.tolerance_fraction):
                    row.violations += 1
            self.journal.add_sample(row.id, now_ts, meter_w, target, target)
            self.journal.update(row, now_ts)

"""The closed loop on the meter: the site's measured power is held under the cap in force.

The plan is open loop: it assumes every miner does what it acknowledged and that
the rest of the site draws `aux_fraction` on top. When that is not so (firmware that
acknowledges and ignores, a restart back to stock, more cooling than configured) only
the meter tells. Each decision `MeterGuard.observe` compares and answers with a
*trim* (W taken off the planning cap) and whether to re-send every setpoint:

- The trim follows what the plan cannot see: load the meter shows beyond what the
  miners report (times `1 + aux_fraction`), plus what settled miners report beyond
  their plan (a miner that acknowledged its command and still runs above it). Each
  is the least seen over the last `confirm_s`, so a transition (miners stopping or
  waking between two telemetry messages) does not count. A miner with fresh telemetry
  but no power reading counts at its model's maximum.
- Over the cap in force beyond noise (`noise_fraction`) for `confirm_s`, and not in
  the settling time after the cap dropped: every setpoint is re-sent, whatever the
  miners acknowledged, and the trim grows by the excess over the planning cap. That
  part decays at `release_w_per_s` while the site is under the cap, never below
  what the first rule sees.
- Without a fresh meter reading the plan is as without this loop (stale miners at their
  maximum, the worst case); the site power is then the telemetry's upper estimate
  (unknown at maximum), which still triggers re-sends, and the meter's last view of the
  unexplained load is kept. `LoopStatus.meter` says which, for a metric and a warning.

All power is site power incl. aux, W; times are monotonic seconds.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.core.fleet_state import STATES, FleetState

log = structlog.get_logger("mineops.closed_loop")

_RUNNING, _WAKING, _SLEEPING, _STOPPING = (STATES.index(s) for s in
                                           ("running", "waking", "sleeping", "stopping"))
METER_WARNING_EVERY_S = 60.0
MeterState = Literal["fresh", "stale", "absent"]


@dataclass(frozen=True, slots=True)
class TelemetryView:
    """What the miners' own telemetry says the site draws now (incl. aux), W.

    `most_w` counts each miner whose draw is unknown (stale, or fresh without a power
    reading) at its model's maximum, `least_w` at its sleep power. `over_plan_w` is what
    settled miners draw beyond their plan (see `MeterGuard`).
    """

    most_w: float
    least_w: float
    over_plan_w: float
    power_unknown: int  # fresh miners without a power reading
    temperature_unknown: int  # fresh miners without a temperature


def telemetry_view(fleet: FleetState, *, now_s: float, stale_s: float, aux_fraction: float,
                   planned_w: npt.NDArray[np.float64] | None,
                   acked: npt.NDArray[np.bool_] | None) -> TelemetryView:
    """Sum the fleet's telemetry (see `TelemetryView`).

    Args:
        fleet: Fleet state.
        now_s: Monotonic now.
        stale_s: Telemetry older than this is stale.
        aux_fraction: Site load beyond the miners, as a fraction of theirs.
        planned_w: (miners,) the last decision's power per miner, W (None: no decision yet).
        acked: (miners,) bool: the miner acknowledged its last command.
    """
    aux = 1.0 + aux_fraction
    fresh = ~fleet.stale(now_s, stale_s)
    power = fleet.power_w
    unknown_power = fresh & np.isnan(power)
    sleep_w = fleet.points_w[:, 0]
    known = fresh & ~unknown_power
    reported = np.where(known, power, fleet.max_w)
    over = 0.0
    if planned_w is not None and acked is not None:
        state = fleet.state
        asleep = planned_w <= sleep_w + 1.0
        target = fleet.target_w
        above_target = np.where(np.isnan(target), np.nan_to_num(power, nan=np.inf)
                                > planned_w * 1.05 + 50.0, target > planned_w + 1.0)
        disobeys = fresh & acked & (
            (asleep & ((state == _RUNNING) | (state == _WAKING)))
            | (~asleep & (state == _RUNNING) & above_target))
        over = float(np.clip(reported - planned_w, 0.0, None)[disobeys].sum()) * aux
    return TelemetryView(
        most_w=float(reported.sum()) * aux,
        least_w=float(np.where(known, power, sleep_w).sum()) * aux,
        over_plan_w=over,
        power_unknown=int(unknown_power.sum()),
        temperature_unknown=int((fresh & np.isnan(fleet.temp_c)).sum()),
    )


@dataclass(frozen=True, slots=True)
class LoopStatus:
    """The closed loop at one decision, for metrics and the log."""

    meter: MeterState
    site_w: float | None  # the meter, else the telemetry's upper estimate
    over_cap: bool  # site power over the cap in force beyond noise now
    trim_w: float  # taken off the planning cap
    resend: bool  # this decision re-sends every setpoint
    telemetry: TelemetryView


class MeterGuard:
    """See the module docstring.

    Args:
        confirm_s: Over the cap this long before acting; the window of the trim's minimum.
        settle_s: After the cap in force dropped (or the guard acted), this long before
            an over-cap counts: miners told to sleep take this long to stop.
        noise_fraction: Meter noise allowance above the cap in force.
        release_w_per_s: How fast the over-cap part of the trim decays.
    """

    def __init__(self, *, confirm_s: float, settle_s: float, noise_fraction: float,
                 release_w_per_s: float) -> None:
        self.confirm_s = confirm_s
        self.settle_s = settle_s
        self.noise_fraction = noise_fraction
        self.release_w_per_s = release_w_per_s
        self.escalated_w = 0.0  # trim from over-cap episodes, decaying
        self.resends = 0
        self.over_cap_s = 0.0  # time the site was seen over the cap in force
        # (time, W) over the last confirm_s: load the meter shows beyond the miners (kept as
        # it was while the meter is stale), and what settled miners draw beyond their plan.
        self._unexplained: deque[tuple[float, float]] = deque()
        self._over_plan: deque[tuple[float, float]] = deque()
        self._cap_w: float | None = None
        self._quiet_until = -math.inf  # settling: start, a cap drop, an escalation
        self._over_since: float | None = None
        self._last_s: float | None = None
        self._meter_warned = -math.inf
        self._warned_at = -math.inf

    def observe(self, now_s: float, *, meter_w: float | None, meter_seen: bool,
                telemetry: TelemetryView, cap_in_force_w: float, planning_w: float
                ) -> LoopStatus:
        """One decision's look at the site; see the module docstring.

        Args:
            now_s: Monotonic now.
            meter_w: A fresh site-meter reading, W, or None.
            meter_seen: Whether any reading ever arrived (stale vs absent).
            telemetry: The fleet's telemetry now, against the last plan.
            cap_in_force_w: The cap in force (site or grid), W.
            planning_w: The cap the plan aims under before any trim, W.
        """
        dt = 0.0 if self._last_s is None else max(0.0, now_s - self._last_s)
        self._last_s = now_s
        meter: MeterState = "fresh" if meter_w is not None else (
            "stale" if meter_seen else "absent")
        self._meter_log(meter, now_s)
        if self._cap_w is None or cap_in_force_w < self._cap_w * (1 - self.noise_fraction):
            self._quiet_until = now_s + self.settle_s
        self._cap_w = cap_in_force_w
        if meter_w is not None:
            _window(self._unexplained, now_s, max(0.0, meter_w - telemetry.most_w),
                    self.confirm_s)
        _window(self._over_plan, now_s, telemetry.over_plan_w, self.confirm_s)
        floor_w = min((u for _, u in self._unexplained), default=0.0) + min(
            p for _, p in self._over_plan)

        site_w = meter_w if meter_w is not None else telemetry.most_w
        over = math.isfinite(cap_in_force_w) and site_w > cap_in_force_w * (
            1 + self.noise_fraction)
        if over:
            self.over_cap_s += dt
            if self._over_since is None:
                self._over_since = now_s
        else:
            self._over_since = None
            self.escalated_w = max(0.0, self.escalated_w - self.release_w_per_s * dt)
        resend = False
        if self._over_since is not None and now_s - self._over_since >= self.confirm_s:
            # Re-sending costs a few messages: at once, whatever the miners acknowledged.
            resend = True
            self.resends += 1
            self._over_since = now_s  # again after another confirm_s if still over
            # Shedding more waits out the settling time: miners told to sleep are stopping.
            grow = now_s >= self._quiet_until and (
                meter_w is not None or telemetry.over_plan_w > 0)
            if grow:
                self.escalated_w = max(self.escalated_w, floor_w) + max(0.0, site_w - planning_w)
                self._quiet_until = now_s + self.settle_s
            if grow or now_s - self._warned_at >= METER_WARNING_EVERY_S:
                self._warned_at = now_s
                log.warning("site_over_cap", site_kw=round(site_w / 1e3, 1),
                            cap_kw=round(cap_in_force_w / 1e3, 1), source=meter,
                            trim_kw=round(max(floor_w, self.escalated_w) / 1e3, 1),
                            resends=self.resends,
                            hint="every setpoint re-sent" + ("; the plan sheds the excess"
                                                             if grow else ""))
        trim_w = min(max(floor_w, self.escalated_w), max(planning_w, 0.0))
        return LoopStatus(meter=meter, site_w=site_w, over_cap=over, trim_w=trim_w,
                          resend=resend, telemetry=telemetry)

    def _meter_log(self, meter: MeterState, now_s: float) -> None:
        if meter == "fresh":
            if self._meter_warned > -math.inf:
                log.info("site_meter_fresh_again")
            self._meter_warned = -math.inf  # the next stale spell is warned about at once
        elif now_s - self._meter_warned >= METER_WARNING_EVERY_S:
            self._meter_warned = now_s
            log.warning("site_meter_" + meter, hint="planning the worst case: miners without "
                        "fresh telemetry at their maximum, no correction from the meter")


def _window(values: deque[tuple[float, float]], now_s: float, value: float,
            span_s: float) -> None:
    """Append (now, value) and drop what is older than `span_s`."""
    values.append((now_s, value))
    while values[0][0] < now_s - span_s:
        values.popleft()


class LoopCollector(Collector):
    """The closed loop's, the journal's and the clock's series (see docs/reliability.md).

    Args:
        status: The latest `LoopStatus` (None before the first decision).
        guard: The meter guard (its counters).
        journal: (records not yet durable, write errors, samples dropped).
        clock: (wall-clock steps seen, the unresolved offset in s).
        resends: Setpoint re-sends by why ("over_cap", "sequence_restart", "back_online").
        decision_failures: Decisions that raised.
    """

    def __init__(self, *, status: Callable[[], LoopStatus | None], guard: MeterGuard,
                 journal: Callable[[], tuple[int, int, int]],
                 clock: Callable[[], tuple[int, float]],
                 resends: Callable[[], dict[str, int]],
                 decision_failures: Callable[[], int]) -> None:
        self._status = status
        self._guard = guard
        self._journal = journal
        self._clock = clock
        self._resends = resends
        self._failures = decision_failures

    def collect(self) -> Iterator[Metric]:
        """Every series of one scrape (prometheus_client's Collector protocol)."""
        status = self._status()
        if status is not None:
            yield GaugeMetricFamily("mineops_site_meter_fresh",
                                    "1 while decisions see a fresh site-meter reading",
                                    value=1.0 if status.meter == "fresh" else 0.0)
            yield GaugeMetricFamily("mineops_site_over_cap",
                                    "1 while site power is over the cap in force beyond noise",
                                    value=1.0 if status.over_cap else 0.0)
            yield GaugeMetricFamily("mineops_cap_trim_watts",
                                    "Taken off the planning cap for load the plan does not see",
                                    value=status.trim_w)
            yield GaugeMetricFamily("mineops_miners_power_unknown",
                                    "Miners reporting without a power reading (counted at max)",
                                    value=float(status.telemetry.power_unknown))
            yield GaugeMetricFamily("mineops_miners_temperature_unknown",
                                    "Miners reporting without a temperature",
                                    value=float(status.telemetry.temperature_unknown))
        over = CounterMetricFamily("mineops_site_over_cap_seconds",
                                   "Time the site was seen over the cap in force beyond noise")
        over.add_metric([], self._guard.over_cap_s)
        yield over
        resends = CounterMetricFamily("mineops_setpoint_resends",
                                      "Setpoints re-sent whatever was acknowledged, by why",
                                      labels=["why"])
        for why, n in sorted(self._resends().items()):
            resends.add_metric([why], float(n))
        yield resends
        pending, errors, dropped = self._journal()
        yield GaugeMetricFamily("mineops_grid_journal_pending_records",
                                "Grid-journal records held in memory, not yet durable",
                                value=float(pending))
        err = CounterMetricFamily("mineops_grid_journal_write_errors",
                                  "Grid-journal writes the disk refused (retried)")
        err.add_metric([], float(errors))
        yield err
        drop = CounterMetricFamily("mineops_grid_journal_samples_dropped",
                                   "Compliance samples dropped while the journal was not durable")
        drop.add_metric([], float(dropped))
        yield drop
        steps, offset_s = self._clock()
        st = CounterMetricFamily("mineops_wall_clock_steps", "Wall-clock steps detected")
        st.add_metric([], float(steps))
        yield st
        yield GaugeMetricFamily("mineops_wall_clock_offset_seconds",
                                "Wall clock minus the clock carried on from before an "
                                "unresolved step (0: none)", value=offset_s)
        fail = CounterMetricFamily("mineops_decision_failures", "Decisions that raised")
        fail.add_metric([], float(self._failures()))
        yield fail

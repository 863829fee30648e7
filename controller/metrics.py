"""Prometheus metrics: every name declared here, with fixed label sets, one registry per controller.

Gauges are computed from fleet state when Prometheus scrapes, by one custom
collector: a handful of numpy reductions (`bincount` over the group index), so
a scrape costs about the same at 100 or 100,000 miners. Site- and group-level
series are always exported; per-miner series only with `metrics.per_miner`,
because their cardinality grows with the fleet. Counters and the decision
histogram are updated where things happen (ingest, actuation).

A value the controller does not know is left out rather than invented: no
site-meter series before the first reading, no grid-event series without an
event, no efficiency while nothing hashes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from threading import Thread
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.catalogue import load_catalogue
from controller.reasons import REASON_NAMES
from controller.topics import Kind

if TYPE_CHECKING:
    from controller.daemon import Controller

# Operator view of a miner, in the order of the `state` label values.
VIEW_STATES = ("running", "underclocked", "sleeping", "waking", "error", "offline")
_RUNNING, _UNDER, _SLEEPING, _WAKING, _ERROR, _OFFLINE, _UNSEEN = range(7)
# Reported state codes (controller.fleet_state.STATES).
_REPORTED = {"running": 1, "sleeping": 2, "waking": 3, "stopping": 4, "error": 5}

# Kinds the controller reads and reasons it drops messages for: their counters start at 0,
# so a dashboard's rate() has a series before the first bad message (new ones still count).
INVALID_KINDS = (
    Kind.MINER_TELEMETRY, Kind.MINER_AVAILABILITY, Kind.GROUP_TELEMETRY,
    Kind.GROUP_AVAILABILITY, Kind.METER_TELEMETRY, Kind.PRICE, Kind.HASHPRICE, Kind.UNKNOWN,
)
INVALID_REASONS = (
    "bad_json", "bad_schema", "bad_value", "bad_version", "out_of_range", "oversized",
    "wrong_type", "unknown_miner", "unknown_group", "unknown_meter", "unknown_topic",
    "internal_error",
)

DECISION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Longer gaps between meter readings are not integrated: the energy in them is unknown.
ENERGY_MAX_GAP_S = 60.0


@dataclass(frozen=True, slots=True)
class GridEventStatus:
    """What the controller knows of the grid event in force; exported only while one exists.

    Set by the controller from the grid obligation in force; between events it is
    None and the `mineops_grid_event_*` series are absent.
    """

    target_w: float  # site power the event asks for, incl. aux
    deadline_unix_s: float  # by when the site must be at or below the target
    on_track: bool  # the plan reaches the target by the deadline


@dataclass(slots=True)
class EnergyCounter:
    """Site import energy in joules, from the meter's register or, without one, power over time."""

    joules: float = 0.0
    _register_wh: float | None = None
    _power_w: float = math.nan
    _at: float = -math.inf

    def observe(self, power_w: float, register_wh: float | None, now: float) -> None:
        """Add one meter reading (monotonic `now`); never goes backwards."""
        if register_wh is not None:
            # A register that went down was reset (meter replaced or rebooted): restart from it.
            if self._register_wh is not None and register_wh >= self._register_wh:
                self.joules += (register_wh - self._register_wh) * 3600.0
            self._register_wh = register_wh
        else:
            dt = now - self._at
            if 0.0 < dt <= ENERGY_MAX_GAP_S and not math.isnan(self._power_w):
                self.joules += max(0.0, 0.5 * (self._power_w + power_w)) * dt
        self._power_w = power_w
        self._at = now


def _package_version() -> str:
    try:
        return version("mineops")
    except PackageNotFoundError:
        return "unknown"


def view_states(controller: Controller, now: float) -> npt.NDArray[np.intp]:
    """Each miner's operator state as an index into VIEW_STATES (len(VIEW_STATES): none yet).

    Same rules as FleetState.counts_by_state, vectorised so groups can be counted too.
    """
    fleet = controller.fleet
    stale = fleet.stale(now, controller.cfg.policy.telemetry_stale_s)
    code = np.full(fleet.n, _UNSEEN, dtype=np.intp)
    state = fleet.state
    running = state == _REPORTED["running"]
    code[running] = _RUNNING
    code[running & (fleet.target_w < fleet.nominal_w - 1.0)] = _UNDER
    code[(state == _REPORTED["sleeping"]) | (state == _REPORTED["stopping"])] = _SLEEPING
    code[state == _REPORTED["waking"]] = _WAKING
    code[state == _REPORTED["error"]] = _ERROR
    code[stale] = _OFFLINE
    return code


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, labels: list[str],
              rows: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


def _incoming_queue(transport: object) -> int:
    """Messages waiting in the MQTT client's incoming queue (0 while disconnected)."""
    # Transport has no accessor for this yet; aiomqtt's `client.messages` has a public len().
    client = getattr(transport, "_client", None)
    return len(client.messages) if client is not None else 0


class SiteCollector(Collector):
    """Site, group, model and (optionally) miner gauges, read from the controller at scrape time."""

    def __init__(self, controller: Controller) -> None:
        self._c = controller
        fleet = controller.fleet
        catalogue = load_catalogue()
        self._models = {k: catalogue.get(k) for k in fleet.model_keys}
        self._groups = list(fleet.groups)
        n_groups = len(self._groups)
        # The model of each group (a group is one model in config; mixed: the first seen).
        first = np.full(n_groups, -1, dtype=np.intp)
        for i in range(fleet.n - 1, -1, -1):
            first[fleet.group_idx[i]] = fleet.model_idx[i]
        self._group_model = [fleet.model_keys[m] if m >= 0 else "" for m in first]
        self._version = _package_version()

    def collect(self) -> Iterator[Metric]:
        c = self._c
        now = time.monotonic()
        yield from self._info()
        yield from self._site(c, now)
        code = view_states(c, now)
        yield from self._miners(c, code)
        yield from self._groups_series(c, code)
        yield from self._grid_event(c)
        yield from self._mqtt(c)
        if c.cfg.metrics.per_miner:
            yield from self._per_miner(c, code)

    def _info(self) -> Iterator[Metric]:
        c = self._c
        yield _labelled("mineops_controller_info", "The controller: site id and version",
                        ["site", "version"], [([c.cfg.site_id, self._version], 1.0)])
        yield _labelled("mineops_group_info", "Each miner group and its model",
                        ["group", "model"],
                        (([g, m], 1.0) for g, m in zip(self._groups, self._group_model,
                                                       strict=True)))
        yield _labelled("mineops_model_info", "Each miner model on site",
                        ["model", "name", "vendor", "cooling"],
                        (([k, m.name, m.vendor, m.cooling], 1.0)
                         for k, m in self._models.items()))

    def _site(self, c: Controller, now: float) -> Iterator[Metric]:
        fleet, site, cfg = c.fleet, c.fleet.site, c.cfg
        if not math.isnan(site.meter_power_w):
            yield _gauge("mineops_site_power_watts", "Site power measured by the site meter",
                         site.meter_power_w)
        meter_unix = time.time() - (now - site.meter_at) if math.isfinite(site.meter_at) else 0.0
        yield _gauge("mineops_site_meter_last_reading_timestamp_seconds",
                     "Unix time of the last site-meter reading (0: none yet)", meter_unix)
        if not math.isnan(c.last_planned_w):
            yield _gauge("mineops_site_power_planned_watts",
                         "Site power the last decision planned, incl. aux", c.last_planned_w)
        yield _gauge("mineops_site_power_cap_watts", "Site power cap in force", c.cap_w())
        energy = CounterMetricFamily("mineops_site_energy",
                                     "Site import energy seen by the meter", unit="joules")
        energy.add_metric([], c.metrics.energy.joules)
        yield energy
        if not math.isnan(site.frequency_hz):
            yield _gauge("mineops_grid_frequency_hertz", "Grid frequency from the site meter",
                         site.frequency_hz)

        price = c.price_usd_per_mwh()
        hashprice = c.hashprice_usd_per_ph_day()
        yield _gauge("mineops_energy_price_usd_per_mwh", "Energy price in force incl. adders",
                     price)
        yield _gauge("mineops_hashprice_usd_per_ph_day", "Hashprice in force", hashprice)
        yield _labelled("mineops_breakeven_price_usd_per_mwh",
                        "Energy price at which a model at stock earns nothing", ["model"],
                        (([k], m.breakeven_usd_per_mwh(hashprice))
                         for k, m in self._models.items()))

        fresh = ~fleet.stale(now, cfg.policy.telemetry_stale_s)
        power_w = float(fleet.power_w[fresh].sum())
        hashrate_ths = float(fleet.hashrate_ths[fresh].sum())
        yield _gauge("mineops_fleet_power_watts",
                     "Power the miners report (fresh telemetry), excl. aux", power_w)
        yield _gauge("mineops_fleet_hashrate_hashes_per_second",
                     "Hashrate the miners report (fresh telemetry)", hashrate_ths * 1e12)
        if hashrate_ths > 0:
            yield _gauge("mineops_fleet_efficiency_joules_per_terahash",
                         "Reported miner power over reported hashrate", power_w / hashrate_ths)
        revenue = hashrate_ths / 1000.0 * hashprice / 24.0
        yield _gauge("mineops_revenue_rate_usd_per_hour",
                     "Mining revenue at the hashprice in force", revenue)
        meter_fresh = now - site.meter_at <= cfg.policy.telemetry_stale_s
        if meter_fresh and not math.isnan(site.meter_power_w):
            cost = max(0.0, site.meter_power_w) / 1e6 * price
            yield _gauge("mineops_energy_cost_rate_usd_per_hour",
                         "Measured site power at the price in force", cost)
            yield _gauge("mineops_profit_rate_usd_per_hour",
                         "Revenue minus energy cost (needs a fresh meter reading)", revenue - cost)
        if c.decision_count:
            yield _gauge("mineops_last_decision_timestamp_seconds",
                         "Unix time of the last decision", c.last_decision_unix_s)

    def _miners(self, c: Controller, code: npt.NDArray[np.intp]) -> Iterator[Metric]:
        counts = np.bincount(code, minlength=len(VIEW_STATES) + 1)
        yield _labelled("mineops_miners", "Miners by observed state", ["state"],
                        (([s], float(counts[i])) for i, s in enumerate(VIEW_STATES)))
        yield _gauge("mineops_miners_configured", "Miners in the site's inventory",
                     float(c.fleet.n))
        yield _labelled("mineops_miners_by_reason", "Miners by reason of the last decision",
                        ["reason"], (([name], float(count)) for name, count
                                     in zip(REASON_NAMES, c.reason_counts, strict=True)))

    def _groups_series(self, c: Controller, code: npt.NDArray[np.intp]) -> Iterator[Metric]:
        fleet, groups = c.fleet, self._groups
        g, n_groups = fleet.group_idx, len(groups)
        fresh = code != _OFFLINE
        power = np.bincount(g, weights=np.where(fresh, fleet.power_w, 0.0), minlength=n_groups)
        hashrate = np.bincount(g, weights=np.where(fresh, fleet.hashrate_ths, 0.0),
                               minlength=n_groups)
        yield _labelled("mineops_group_power_watts", "Power a group's miners report",
                        ["group"], (([name], float(power[i])) for i, name in enumerate(groups)))
        yield _labelled("mineops_group_hashrate_hashes_per_second",
                        "Hashrate a group's miners report", ["group"],
                        (([name], float(hashrate[i]) * 1e12) for i, name in enumerate(groups)))
        if c.planned_power_w is not None:
            planned = np.bincount(g, weights=c.planned_power_w, minlength=n_groups)
            yield _labelled("mineops_group_power_planned_watts",
                            "Miner power the last decision planned for a group, excl. aux",
                            ["group"],
                            (([name], float(planned[i])) for i, name in enumerate(groups)))
        k = len(VIEW_STATES) + 1
        by_state = np.bincount(g * k + code, minlength=n_groups * k).reshape(n_groups, k)
        yield _labelled("mineops_group_miners", "A group's miners by observed state",
                        ["group", "state"],
                        (([name, s], float(by_state[i, j])) for i, name in enumerate(groups)
                         for j, s in enumerate(VIEW_STATES)))

    def _grid_event(self, c: Controller) -> Iterator[Metric]:
        event = c.grid_event
        if event is None:
            return
        yield _gauge("mineops_grid_event_target_watts",
                     "Site power the grid event in force asks for", event.target_w)
        yield _gauge("mineops_grid_event_deadline_timestamp_seconds",
                     "Unix time by which the site must be at the event target",
                     event.deadline_unix_s)
        yield _gauge("mineops_grid_event_on_track",
                     "1 if the plan reaches the event target by its deadline, else 0",
                     1.0 if event.on_track else 0.0)

    def _mqtt(self, c: Controller) -> Iterator[Metric]:
        t = c.transport
        yield _gauge("mineops_mqtt_connected", "1 while connected to the broker",
                     1.0 if t.connected.is_set() else 0.0)
        connects = CounterMetricFamily("mineops_mqtt_connects", "Successful broker connections")
        connects.add_metric([], float(t.connects))
        yield connects
        yield _gauge("mineops_mqtt_incoming_queue_messages",
                     "Messages received but not yet handled", float(_incoming_queue(t)))

    def _per_miner(self, c: Controller, code: npt.NDArray[np.intp]) -> Iterator[Metric]:
        fleet = c.fleet
        labels = ["miner", "group"]
        keys = [[m, self._groups[gi]] for m, gi in zip(fleet.ids, fleet.group_idx, strict=True)]
        fresh = code != _OFFLINE

        def rows(values: npt.NDArray[np.float64], only: npt.NDArray[np.bool_]
                 ) -> Iterator[tuple[list[str], float]]:
            for i in np.flatnonzero(only & ~np.isnan(values)):
                yield keys[i], float(values[i])

        yield _labelled("mineops_miner_up", "1 while the miner's telemetry is fresh", labels,
                        ((k, 1.0 if f else 0.0) for k, f in zip(keys, fresh, strict=True)))
        yield _labelled("mineops_miner_power_watts", "Power the miner reports", labels,
                        rows(fleet.power_w, fresh))
        yield _labelled("mineops_miner_hashrate_hashes_per_second", "Hashrate the miner reports",
                        labels, rows(fleet.hashrate_ths * 1e12, fresh))
        yield _labelled("mineops_miner_power_target_watts", "Power target the miner reports",
                        labels, rows(fleet.target_w, fresh))
        yield _labelled("mineops_miner_temperature_celsius", "Hottest sensor the miner reports",
                        labels, rows(fleet.temp_c, fresh))


@dataclass
class Metrics:
    """All of a controller's metrics; one instance per controller (tests run several)."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True))
    energy: EnergyCounter = field(default_factory=EnergyCounter)

    def __post_init__(self) -> None:
        r = self.registry
        # process_start_time_seconds tells a restart (alerted on); python_info the runtime.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        # No _created series: they double every counter for nothing the dashboards use.
        # prometheus_client 0.26 has no per-registry switch, so this is process-wide.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.messages = Counter("mineops_mqtt_messages", "MQTT messages received",
                                ["kind"], registry=r)
        self.invalid = Counter("mineops_mqtt_messages_invalid",
                               "MQTT messages dropped as invalid", ["kind", "reason"], registry=r)
        for kind in INVALID_KINDS:
            for reason in INVALID_REASONS:
                self.invalid.labels(kind.value, reason)
        self.commands = Counter("mineops_commands_sent", "Miner setpoints sent", registry=r)
        self.command_messages = Counter("mineops_command_messages_sent",
                                        "Command messages published (one per group batch)",
                                        registry=r)
        self.decisions = Counter("mineops_decisions", "Decisions made", ["trigger"], registry=r)
        self.decision_seconds = Histogram(
            "mineops_decision_duration_seconds", "Time to decide and actuate", registry=r,
            buckets=DECISION_BUCKETS_S,
        )

    def attach(self, controller: Controller) -> None:
        self.registry.register(SiteCollector(controller))

    def serve(self, host: str, port: int) -> MetricsServer:
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)


@dataclass
class MetricsServer:
    """The /metrics HTTP endpoint; `port` is the one actually bound (useful with port 0)."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

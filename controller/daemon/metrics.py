"""Prometheus metrics: every name declared here, with fixed label sets, one registry per controller.

Gauges come from the latest `DecisionSnapshot` when Prometheus scrapes, through one
custom collector: what a scrape shows is always one consistent decision, and a scrape
never reads the controller's working state. Group series are a `bincount` over the
group index, so a scrape costs about the same at 100 or 100,000 miners. Per-miner
series only with `metrics.per_miner`, because their cardinality grows with the fleet
(they read the fleet's latest telemetry). Counters and the decision histogram are
updated where things happen (ingest, actuation).

A value the controller does not know is left out rather than invented: nothing from
a decision before the first one, no site-meter series without a fresh reading, no
grid-event series without an event, no efficiency while nothing hashes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from threading import Thread
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
from controller.core.fleet_state import VIEW_STATES, FleetState
from controller.daemon.snapshot import DecisionSnapshot
from controller.protocol.reasons import REASON_NAMES
from controller.protocol.topics import Kind
from controller.protocol.transport import LinkStatus
from controller.units import usd_per_ths_hour

# Kinds the controller reads and reasons it drops messages for: their counters start at 0,
# so a dashboard's rate() has a series before the first bad message (new ones still count).
INVALID_KINDS = (
    Kind.MINER_TELEMETRY, Kind.MINER_AVAILABILITY, Kind.GROUP_TELEMETRY,
    Kind.GROUP_AVAILABILITY, Kind.METER_TELEMETRY, Kind.PRICE, Kind.HASHPRICE, Kind.UNKNOWN,
)
INVALID_REASONS = (
    "bad_json", "bad_schema", "bad_value", "bad_version", "out_of_range", "oversized",
    "wrong_type", "unknown_miner", "unknown_group", "unknown_meter", "unknown_topic",
    "unsupported_component", "no_base_status", "internal_error", "bad_timestamp", "stale",
    "wrong_group",
)
# Why a reading is left out of a telemetry message whose other readings apply (ingest).
READING_REASONS = ("unknown_miner", "wrong_group", "bad_value", "out_of_range", "bad_ack")

DECISION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Longer gaps between meter readings are not integrated: the energy in them is unknown.
ENERGY_MAX_GAP_S = 60.0
_OFFLINE = VIEW_STATES.index("offline")


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


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, labels: list[str],
              rows: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


class SiteCollector(Collector):
    """Site, group, model and (optionally) miner gauges, from the latest decision snapshot.

    Args:
        site_id: The site's id (info series).
        fleet: The fleet: miner ids, groups and models; per-miner series read its telemetry.
        per_miner: Export per-miner series.
        stale_s: Per-miner series only for telemetry younger than this, s.
        snapshot: Returns the latest decision snapshot (None before the first decision).
        energy: The site's import energy counter.
        link: Returns the broker connection's status.
    """

    def __init__(self, *, site_id: str, fleet: FleetState, per_miner: bool, stale_s: float,
                 snapshot: Callable[[], DecisionSnapshot | None], energy: EnergyCounter,
                 link: Callable[[], LinkStatus]) -> None:
        self._site_id = site_id
        self._fleet = fleet
        self._per_miner = per_miner
        self._stale_s = stale_s
        self._snapshot = snapshot
        self._energy = energy
        self._link = link
        catalogue = load_catalogue()
        self._models = {k: catalogue.get(k) for k in fleet.model_keys}
        self._groups = list(fleet.groups)
        # The model of each group (a group is one model in config; mixed: the first seen).
        first = np.full(len(self._groups), -1, dtype=np.intp)
        first[fleet.group_idx[::-1]] = fleet.model_idx[::-1]
        self._group_model = [fleet.model_keys[m] if m >= 0 else "" for m in first]
        self._version = _package_version()

    def collect(self) -> Iterator[Metric]:
        """Every series of one scrape (prometheus_client's Collector protocol)."""
        snap = self._snapshot()
        yield from self._info()
        yield from self._always()
        if snap is not None:
            yield from self._site(snap)
            yield from self._market(snap)
            yield from self._miners(snap)
            yield from self._groups_series(snap)
            yield from self._grid_event(snap)
            if self._per_miner:
                yield from self._per_miner_series(snap)

    def _info(self) -> Iterator[Metric]:
        yield _labelled("mineops_controller_info", "The controller: site id and version",
                        ["site", "version"], [([self._site_id, self._version], 1.0)])
        yield _labelled("mineops_group_info", "Each miner group and its model",
                        ["group", "model"],
                        (([g, m], 1.0) for g, m in zip(self._groups, self._group_model,
                                                       strict=True)))
        yield _labelled("mineops_model_info", "Each miner model on site",
                        ["model", "name", "vendor", "cooling"],
                        (([k, m.name, m.vendor, m.cooling], 1.0)
                         for k, m in self._models.items()))

    def _always(self) -> Iterator[Metric]:
        """Series that exist before any decision: inventory, energy, the broker link."""
        yield _gauge("mineops_miners_configured", "Miners in the site's inventory",
                     float(self._fleet.n))
        energy = CounterMetricFamily("mineops_site_energy",
                                     "Site import energy seen by the meter", unit="joules")
        energy.add_metric([], self._energy.joules)
        yield energy
        link = self._link()
        yield _gauge("mineops_mqtt_connected", "1 while connected to the broker",
                     1.0 if link.connected else 0.0)
        connects = CounterMetricFamily("mineops_mqtt_connects", "Successful broker connections")
        connects.add_metric([], float(link.connects))
        yield connects
        yield _gauge("mineops_mqtt_incoming_queue_messages",
                     "Messages received but not yet handled", float(link.incoming_queue_messages))
        dropped = CounterMetricFamily(
            "mineops_mqtt_messages_dropped",
            "Messages dropped before handling (queue_full: the bounded incoming queue, "
            "oldest telemetry first)", labels=["kind", "reason"])
        for (kind, reason), count in sorted({("group_telemetry", "queue_full"): 0,
                                             ("miner_telemetry", "queue_full"): 0,
                                             **link.dropped}.items()):
            dropped.add_metric([kind, reason], float(count))
        yield dropped

    def _site(self, snap: DecisionSnapshot) -> Iterator[Metric]:
        if snap.measured_site_power_w is not None:
            yield _gauge("mineops_site_power_watts", "Site power measured by the site meter",
                         snap.measured_site_power_w)
        if snap.meter_reading_unix_s is not None:
            yield _gauge("mineops_site_meter_last_reading_timestamp_seconds",
                         "Unix time of the last fresh site-meter reading",
                         snap.meter_reading_unix_s)
        yield _gauge("mineops_site_power_planned_watts",
                     "Site power the last decision planned, incl. aux", snap.planned_site_power_w)
        yield _gauge("mineops_site_power_cap_watts",
                     "Site power cap in force (the site's, or a grid obligation's), incl. aux",
                     snap.cap.in_force_w)
        yield _gauge("mineops_site_power_cap_configured_watts",
                     "The site's own power cap from its config, incl. aux", snap.cap.site_w)
        if snap.frequency_hz is not None:
            yield _gauge("mineops_grid_frequency_hertz", "Grid frequency from the site meter",
                         snap.frequency_hz)
        yield _gauge("mineops_last_decision_timestamp_seconds",
                     "Unix time of the last decision", snap.at_unix_s)

    def _market(self, snap: DecisionSnapshot) -> Iterator[Metric]:
        price, hashprice = snap.price, snap.hashprice_usd_per_ph_day
        yield _gauge("mineops_energy_price_usd_per_mwh", "Energy price in force incl. adders",
                     price.total_usd_per_mwh)
        yield _gauge("mineops_energy_market_price_usd_per_mwh",
                     "Market price in force, without adders", price.market_usd_per_mwh)
        yield _gauge("mineops_hashprice_usd_per_ph_day", "Hashprice in force", hashprice)
        yield _labelled("mineops_breakeven_price_usd_per_mwh",
                        "Energy price at which a model at stock earns nothing", ["model"],
                        (([k], m.breakeven_usd_per_mwh(hashprice))
                         for k, m in self._models.items()))
        power_w, hashrate_ths = snap.fleet_power_w, snap.fleet_hashrate_ths
        yield _gauge("mineops_fleet_power_watts",
                     "Power the miners report (fresh telemetry), excl. aux", power_w)
        yield _gauge("mineops_fleet_hashrate_hashes_per_second",
                     "Hashrate the miners report (fresh telemetry)", hashrate_ths * 1e12)
        if hashrate_ths > 0:
            yield _gauge("mineops_fleet_efficiency_joules_per_terahash",
                         "Reported miner power over reported hashrate", power_w / hashrate_ths)
        revenue = hashrate_ths * usd_per_ths_hour(hashprice)
        yield _gauge("mineops_revenue_rate_usd_per_hour",
                     "Mining revenue at the hashprice in force", revenue)
        if snap.measured_site_power_w is not None:
            cost = max(0.0, snap.measured_site_power_w) / 1e6 * price.total_usd_per_mwh
            yield _gauge("mineops_energy_cost_rate_usd_per_hour",
                         "Measured site power at the price in force", cost)
            yield _gauge("mineops_profit_rate_usd_per_hour",
                         "Revenue minus energy cost (needs a fresh meter reading)", revenue - cost)

    def _miners(self, snap: DecisionSnapshot) -> Iterator[Metric]:
        counts = snap.miners_by_state
        yield _labelled("mineops_miners", "Miners by observed state", ["state"],
                        (([s], float(counts[s])) for s in VIEW_STATES))
        yield _labelled("mineops_miners_by_reason", "Miners by reason of the last decision",
                        ["reason"], (([name], float(count)) for name, count
                                     in zip(REASON_NAMES, snap.reason_counts, strict=True)))

    def _groups_series(self, snap: DecisionSnapshot) -> Iterator[Metric]:
        fleet, groups = self._fleet, self._groups
        g, n_groups = fleet.group_idx, len(groups)
        yield _labelled("mineops_group_power_watts", "Power a group's miners report",
                        ["group"], (([name], float(snap.group_power_w[i]))
                                    for i, name in enumerate(groups)))
        yield _labelled("mineops_group_hashrate_hashes_per_second",
                        "Hashrate a group's miners report", ["group"],
                        (([name], float(snap.group_hashrate_ths[i]) * 1e12)
                         for i, name in enumerate(groups)))
        planned = np.bincount(g, weights=snap.planned_power_w, minlength=n_groups)
        yield _labelled("mineops_group_power_planned_watts",
                        "Miner power the last decision planned for a group, excl. aux",
                        ["group"], (([name], float(planned[i])) for i, name in enumerate(groups)))
        k = len(VIEW_STATES)
        by_state = np.bincount(g * k + snap.view_state, minlength=n_groups * k).reshape(
            n_groups, k)
        yield _labelled("mineops_group_miners", "A group's miners by observed state",
                        ["group", "state"],
                        (([name, s], float(by_state[i, j])) for i, name in enumerate(groups)
                         for j, s in enumerate(VIEW_STATES)))

    def _grid_event(self, snap: DecisionSnapshot) -> Iterator[Metric]:
        event = snap.grid_event
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

    def _per_miner_series(self, snap: DecisionSnapshot) -> Iterator[Metric]:
        fleet = self._fleet
        labels = ["miner", "group"]
        keys = [[m, self._groups[gi]] for m, gi in zip(fleet.ids, fleet.group_idx, strict=True)]
        fresh = snap.view_state != _OFFLINE

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
        self.readings_rejected = Counter(
            "mineops_telemetry_readings_rejected",
            "Miner readings left out of a telemetry message whose other readings applied "
            "(bad_ack: only the acknowledgement was left out)", ["reason"], registry=r)
        for reason in READING_REASONS:
            self.readings_rejected.labels(reason)
        self.meter_values_unknown = Counter(
            "mineops_meter_values_unknown",
            "Values a vendor meter sent that its applied reading leaves unknown (reason "
            "out_of_range: not physical; channels_disagree: live channels' frequencies "
            "disagree); docs/meters.md", ["meter", "value", "reason"], registry=r)
        self.commands = Counter("mineops_commands_sent", "Miner setpoints sent", registry=r)
        self.command_messages = Counter("mineops_command_messages_sent",
                                        "Command messages published (one per group batch)",
                                        registry=r)
        self.decisions = Counter("mineops_decisions", "Decisions made", ["trigger"], registry=r)
        self.decision_seconds = Histogram(
            "mineops_decision_duration_seconds", "Time to decide and actuate", registry=r,
            buckets=DECISION_BUCKETS_S,
        )

    def attach(self, collector: Collector) -> None:
        """Register the collector that renders the gauges at scrape time."""
        self.registry.register(collector)

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

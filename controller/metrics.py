"""Prometheus metrics: declared here, with fixed label sets, in a registry per controller.

Site-level gauges are read from fleet state at scrape time by a custom
collector (cheap at any fleet size: a few array sums); counters and the
decision histogram are updated as things happen.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from threading import Thread
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.reasons import REASON_NAMES

if TYPE_CHECKING:
    from controller.daemon import Controller


class SiteCollector(Collector):
    """Gauges computed from the controller's state when Prometheus scrapes."""

    def __init__(self, controller: Controller) -> None:
        self._c = controller

    def collect(self) -> Iterator[Metric]:
        c = self._c
        now = time.monotonic()
        site = c.fleet.site

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("mineops_site_power_watts", "Site power measured by the site meter",
                    site.meter_power_w)
        yield gauge("mineops_site_power_planned_watts", "Site power the last decision planned",
                    c.last_planned_w)
        yield gauge("mineops_site_power_cap_watts", "Site power cap in force", c.cap_w())
        fresh = ~c.fleet.stale(now, c.cfg.policy.telemetry_stale_s)
        yield gauge("mineops_fleet_hashrate_hashes_per_second", "Reported hashrate of the fleet",
                    float(c.fleet.hashrate_ths[fresh].sum()) * 1e12)
        yield gauge("mineops_energy_price_usd_per_mwh", "Energy price in force incl. adders",
                    c.price_usd_per_mwh())
        yield gauge("mineops_hashprice_usd_per_ph_day", "Hashprice in force",
                    c.hashprice_usd_per_ph_day())
        yield gauge("mineops_grid_frequency_hertz", "Grid frequency from the site meter",
                    site.frequency_hz)
        yield gauge("mineops_mqtt_connected", "1 while connected to the broker",
                    1.0 if c.transport.connected.is_set() else 0.0)
        states = GaugeMetricFamily("mineops_miners", "Miners by observed state", labels=["state"])
        for state, count in c.fleet.counts_by_state(now, c.cfg.policy.telemetry_stale_s).items():
            states.add_metric([state], count)
        yield states
        reasons = GaugeMetricFamily(
            "mineops_miners_by_reason", "Miners by reason of the last decision", labels=["reason"]
        )
        for name, count in zip(REASON_NAMES, c.reason_counts, strict=True):
            reasons.add_metric([name], float(count))
        yield reasons


@dataclass
class Metrics:
    """All of a controller's metrics; one instance per controller (tests run several)."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.messages = Counter("mineops_mqtt_messages", "MQTT messages received",
                                ["kind"], registry=r)
        self.invalid = Counter("mineops_mqtt_messages_invalid",
                               "MQTT messages dropped as invalid", ["kind", "reason"], registry=r)
        self.commands = Counter("mineops_commands_sent", "Miner setpoints sent", registry=r)
        self.command_messages = Counter("mineops_command_messages_sent",
                                        "Command messages published (one per group batch)",
                                        registry=r)
        self.decisions = Counter("mineops_decisions", "Decisions made", ["trigger"], registry=r)
        self.decision_seconds = Histogram(
            "mineops_decision_duration_seconds", "Time to decide and actuate", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
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


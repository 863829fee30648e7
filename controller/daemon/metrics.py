"""Prometheus metrics: every name declared here, with fixed label sets, one set per controller.

Gauges come from the latest `DecisionSnapshot`: what a scrape shows is always one
consistent decision, and a scrape never reads the controller's working state (only
the opt-in per-miner series read the fleet's latest telemetry). Counters and the
decision histogram are updated where things happen (ingest, actuation) and rendered
by prometheus_client.

A scrape must not hold up the controller. The HTTP server runs in its own thread,
but rendering holds the GIL, and at 300,000 miners in 7,500 racks prometheus_client's
generic rendering of ~75,000 group series took 0.25-1.2 s of the event loop's time
per scrape. So the snapshot's series are rendered here, straight to the text format:
once per decision at most (the first scrape after it; later scrapes reuse the bytes),
each per-group family with one C-level `%` format over a template built at start,
and gzip (what Prometheus asks for) compresses the cached part once too. A scrape
then costs the loop a few ms (benchmarks/bench_scrape.py). Per-group series are
bounded: `[metrics] per_group = "auto"` exports them up to PER_GROUP_AUTO_MAX groups.

A value the controller does not know is left out rather than invented: nothing from
a decision before the first one, no site-meter series without a fresh reading, no
grid-event series without an event, no efficiency while nothing hashes.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from socketserver import ThreadingMixIn
from threading import Thread
from typing import Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
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
# Handling time minus the reading's own timestamp (includes any clock offset of the sender).
TELEMETRY_LAG_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Longer gaps between meter readings are not integrated: the energy in them is unknown.
ENERGY_MAX_GAP_S = 60.0
# `[metrics] per_group = "auto"`: per-group series up to this many groups, ~10 series each.
PER_GROUP_AUTO_MAX = 10_000
PerGroup = Literal["auto", "always", "never"]
_OFFLINE = VIEW_STATES.index("offline")
# Values as the text format carries them: 12 significant digits (a watt of a 100 GW site).
_FLOAT = "%.12g"


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


def _label_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _head(name: str, doc: str, kind: str = "gauge") -> str:
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{k}="{_label_value(v)}"' for k, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _gauge(name: str, doc: str, value: float) -> str:
    return f"{_head(name, doc)}{name} {_value(value)}\n"


def _labelled(name: str, doc: str, labels: Sequence[str],
              rows: Iterable[tuple[Sequence[str], float]], kind: str = "gauge") -> str:
    lines = [f"{name}{_labels(labels, v)} {_value(x)}\n" for v, x in rows]
    return _head(name, doc, kind) + "".join(lines)


class _Rows:
    """One family's samples for fixed label sets, formatted in one C-level `%` operation.

    The template (every line's name and labels, a placeholder for its value) is built
    once; a render is `template % values`, ~0.1 us a line against ~3 us through
    prometheus_client's generic path.
    """

    def __init__(self, name: str, doc: str, labels: Sequence[str],
                 rows: Sequence[Sequence[str]], spec: str = _FLOAT) -> None:
        self.head = _head(name, doc)
        self.template = "".join(f"{name}{_labels(labels, r)} ".replace("%", "%%") + spec + "\n"
                                for r in rows)
        self.n = len(rows)

    def render(self, values: npt.NDArray[np.floating] | npt.NDArray[np.integer]) -> str:
        assert values.shape == (self.n,)
        return self.head + self.template % tuple(values.tolist())


class SiteCollector:
    """The site, group, model and (optionally) miner gauges, from the latest decision snapshot.

    Args:
        site_id: The site's id (info series).
        fleet: The fleet: miner ids, groups and models; per-miner series read its telemetry.
        per_miner: Export per-miner series.
        stale_s: Per-miner series only for telemetry younger than this, s.
        snapshot: Returns the latest decision snapshot (None before the first decision).
        energy: The site's import energy counter.
        link: Returns the broker connection's status.
        per_group: Per-group series: "auto" (up to PER_GROUP_AUTO_MAX groups), "always",
            "never".
        aux_fraction: The site's aux fraction, counted in the break-even prices as the
            controller counts it.
    """

    def __init__(self, *, site_id: str, fleet: FleetState, per_miner: bool, stale_s: float,
                 snapshot: Callable[[], DecisionSnapshot | None], energy: EnergyCounter,
                 link: Callable[[], LinkStatus], per_group: PerGroup = "auto",
                 aux_fraction: float = 0.0) -> None:
        self._fleet = fleet
        self._aux_fraction = aux_fraction
        self._per_miner = per_miner
        self._stale_s = stale_s
        self._snapshot = snapshot
        self._energy = energy
        self._link = link
        catalogue = load_catalogue()
        self._models = {k: catalogue.get(k) for k in fleet.model_keys}
        groups = list(fleet.groups)
        self.per_group = per_group == "always" or (
            per_group == "auto" and len(groups) <= PER_GROUP_AUTO_MAX)
        # The model of each group (a group is one model in config; mixed: the first seen).
        first = np.full(len(groups), -1, dtype=np.intp)
        first[fleet.group_idx[::-1]] = fleet.model_idx[::-1]
        group_model = [fleet.model_keys[m] if m >= 0 else "" for m in first]
        # What never changes: inventory and identity.
        static = [
            _labelled("mineops_controller_info", "The controller: site id and version",
                      ["site", "version"], [([site_id, _package_version()], 1.0)]),
            _labelled("mineops_model_info", "Each miner model on site",
                      ["model", "name", "vendor", "cooling"],
                      (([k, m.name, m.vendor, m.cooling], 1.0) for k, m in self._models.items())),
            _gauge("mineops_miners_configured", "Miners in the site's inventory", float(fleet.n)),
        ]
        if self.per_group:
            static.insert(1, _labelled("mineops_group_info", "Each miner group and its model",
                                       ["group", "model"],
                                       (([g, m], 1.0) for g, m in zip(groups, group_model,
                                                                      strict=True))))
        self._static = "".join(static)
        one = [[g] for g in groups]
        self._group_power = _Rows("mineops_group_power_watts", "Power a group's miners report",
                                  ["group"], one)
        self._group_hashrate = _Rows("mineops_group_hashrate_hashes_per_second",
                                     "Hashrate a group's miners report", ["group"], one)
        self._group_planned = _Rows(
            "mineops_group_power_planned_watts",
            "Miner power the last decision planned for a group, excl. aux", ["group"], one)
        self._group_miners = _Rows("mineops_group_miners", "A group's miners by observed state",
                                   ["group", "state"], [[g, s] for g in groups
                                                        for s in VIEW_STATES], "%d")
        self._lock = threading.Lock()
        self._cached: tuple[int, bytes] = (-1, self._static.encode())

    def snapshot_text(self) -> tuple[int, bytes]:
        """(snapshot seq or -1, the text of every series that changes only per decision).

        Rendered at the first call after a new decision, then reused.
        """
        snap = self._snapshot()
        seq = -1 if snap is None else snap.seq
        with self._lock:
            if self._cached[0] != seq and snap is not None:
                self._cached = (seq, self._render(snap).encode())
            return self._cached

    def live_text(self) -> bytes:
        """The series read at every scrape: energy and the broker link (a few lines)."""
        link = self._link()
        return "".join([
            _labelled("mineops_site_energy_joules_total", "Site import energy seen by the meter",
                      [], [([], self._energy.joules)], "counter"),
            _gauge("mineops_mqtt_connected", "1 while connected to the broker",
                   1.0 if link.connected else 0.0),
            _labelled("mineops_mqtt_connects_total", "Successful broker connections", [],
                      [([], float(link.connects))], "counter"),
            _gauge("mineops_mqtt_incoming_queue_messages", "Messages received but not yet handled",
                   float(link.incoming_queue_messages)),
            _labelled("mineops_mqtt_messages_dropped_total",
                      "Messages dropped before handling (queue_full: the bounded incoming "
                      "queue, oldest telemetry first)", ["kind", "reason"],
                      ((list(key), float(count)) for key, count in sorted(
                          {("group_telemetry", "queue_full"): 0,
                           ("miner_telemetry", "queue_full"): 0, **link.dropped}.items())),
                      "counter"),
        ]).encode()

    def render(self) -> str:
        """Everything this collector exports, now (tests and tools; a scrape uses the parts)."""
        return self.snapshot_text()[1].decode() + self.live_text().decode()

    def _render(self, snap: DecisionSnapshot) -> str:
        parts = [self._static, self._site(snap), self._market(snap), self._miners(snap)]
        if self.per_group:
            parts.append(self._groups_series(snap))
        parts.append(self._grid_event(snap))
        if self._per_miner:
            parts.append(self._per_miner_series(snap))
        return "".join(parts)

    def _site(self, snap: DecisionSnapshot) -> str:
        out = []
        if snap.measured_site_power_w is not None:
            out.append(_gauge("mineops_site_power_watts", "Site power measured by the site meter",
                              snap.measured_site_power_w))
        if snap.meter_reading_unix_s is not None:
            out.append(_gauge("mineops_site_meter_last_reading_timestamp_seconds",
                              "Unix time of the last fresh site-meter reading",
                              snap.meter_reading_unix_s))
        out += [
            _gauge("mineops_site_power_planned_watts",
                   "Site power the last decision planned, incl. aux", snap.planned_site_power_w),
            _gauge("mineops_site_power_cap_watts",
                   "Site power cap in force (the site's, or a grid obligation's), incl. aux",
                   snap.cap.in_force_w),
            _gauge("mineops_site_power_cap_configured_watts",
                   "The site's own power cap from its config, incl. aux", snap.cap.site_w),
        ]
        if snap.frequency_hz is not None:
            out.append(_gauge("mineops_grid_frequency_hertz", "Grid frequency from the site meter",
                              snap.frequency_hz))
        out.append(_gauge("mineops_last_decision_timestamp_seconds",
                          "Unix time of the last decision", snap.at_unix_s))
        return "".join(out)

    def _market(self, snap: DecisionSnapshot) -> str:
        price, hashprice = snap.price, snap.hashprice_usd_per_ph_day
        out = [
            _gauge("mineops_energy_price_usd_per_mwh",
                   "Energy price in force incl. adders, at the market's own price",
                   price.real_total_usd_per_mwh),
            _gauge("mineops_energy_market_price_usd_per_mwh",
                   "Market price in force, without adders, as the market set it",
                   price.real_market_usd_per_mwh),
            _gauge("mineops_energy_planned_price_usd_per_mwh",
                   "Energy price incl. adders the decision planned with: the market price "
                   "within [energy] price_floor/cap_usd_per_mwh", price.total_usd_per_mwh),
            _gauge("mineops_hashprice_usd_per_ph_day", "Hashprice in force", hashprice),
            _labelled("mineops_breakeven_price_usd_per_mwh",
                      "All-in energy price (market + adders) at which a model at stock earns "
                      "nothing, incl. its share of aux (catalogue.breakeven_usd_per_mwh)",
                      ["model"],
                      (([k], m.breakeven_usd_per_mwh(hashprice, aux_fraction=self._aux_fraction))
                       for k, m in self._models.items())),
        ]
        power_w, hashrate_ths = snap.fleet_power_w, snap.fleet_hashrate_ths
        out += [
            _gauge("mineops_fleet_power_watts",
                   "Power the miners report (fresh telemetry), excl. aux", power_w),
            _gauge("mineops_fleet_hashrate_hashes_per_second",
                   "Hashrate the miners report (fresh telemetry)", hashrate_ths * 1e12),
        ]
        if hashrate_ths > 0:
            out.append(_gauge("mineops_fleet_efficiency_joules_per_terahash",
                              "Reported miner power over reported hashrate",
                              power_w / hashrate_ths))
        revenue = hashrate_ths * usd_per_ths_hour(hashprice)
        out.append(_gauge("mineops_revenue_rate_usd_per_hour",
                          "Mining revenue at the hashprice in force", revenue))
        if snap.measured_site_power_w is not None:
            # At the market's own price: during a spike past the cap the site pays it.
            cost = max(0.0, snap.measured_site_power_w) / 1e6 * price.real_total_usd_per_mwh
            out += [
                _gauge("mineops_energy_cost_rate_usd_per_hour",
                       "Measured site power at the market's own price plus adders", cost),
                _gauge("mineops_profit_rate_usd_per_hour",
                       "Revenue minus energy cost (needs a fresh meter reading)", revenue - cost),
            ]
        return "".join(out)

    def _miners(self, snap: DecisionSnapshot) -> str:
        counts = snap.miners_by_state
        return (_labelled("mineops_miners", "Miners by observed state", ["state"],
                          (([s], float(counts[s])) for s in VIEW_STATES))
                + _labelled("mineops_miners_by_reason", "Miners by reason of the last decision",
                            ["reason"], (([name], float(count)) for name, count
                                         in zip(REASON_NAMES, snap.reason_counts, strict=True))))

    def _groups_series(self, snap: DecisionSnapshot) -> str:
        g, n_groups = self._fleet.group_idx, self._group_power.n
        planned = np.bincount(g, weights=snap.planned_power_w, minlength=n_groups)
        k = len(VIEW_STATES)
        by_state = np.bincount(g * k + snap.view_state, minlength=n_groups * k)
        return "".join([
            self._group_power.render(snap.group_power_w),
            self._group_hashrate.render(snap.group_hashrate_ths * 1e12),
            self._group_planned.render(planned),
            self._group_miners.render(by_state),
        ])

    def _grid_event(self, snap: DecisionSnapshot) -> str:
        event = snap.grid_event
        if event is None:
            return ""
        return "".join([
            _gauge("mineops_grid_event_target_watts",
                   "Site power the grid event in force asks for", event.target_w),
            _gauge("mineops_grid_event_deadline_timestamp_seconds",
                   "Unix time by which the site must be at the event target",
                   event.deadline_unix_s),
            _gauge("mineops_grid_event_on_track",
                   "1 if the plan reaches the event target by its deadline, else 0",
                   1.0 if event.on_track else 0.0),
        ])

    def _per_miner_series(self, snap: DecisionSnapshot) -> str:
        fleet, groups = self._fleet, self._fleet.groups
        keys = [f'{{miner="{_label_value(m)}",group="{_label_value(groups[gi])}"}} '
                for m, gi in zip(fleet.ids, fleet.group_idx.tolist(), strict=True)]
        fresh = snap.view_state != _OFFLINE

        def rows(name: str, doc: str, values: npt.NDArray[np.float64],
                 only: npt.NDArray[np.bool_]) -> str:
            sel = np.flatnonzero(only & ~np.isnan(values))
            template = "".join([name + keys[i].replace("%", "%%") + _FLOAT + "\n"
                                for i in sel.tolist()])
            return _head(name, doc) + template % tuple(values[sel].tolist())

        everyone = np.ones(fleet.n, dtype=bool)
        return "".join([
            rows("mineops_miner_up", "1 while the miner's telemetry is fresh",
                 fresh.astype(np.float64), everyone),
            rows("mineops_miner_power_watts", "Power the miner reports", fleet.power_w, fresh),
            rows("mineops_miner_hashrate_hashes_per_second", "Hashrate the miner reports",
                 fleet.hashrate_ths * 1e12, fresh),
            rows("mineops_miner_power_target_watts", "Power target the miner reports",
                 fleet.target_w, fresh),
            rows("mineops_miner_temperature_celsius", "Hottest sensor the miner reports",
                 fleet.temp_c, fresh),
        ])


@dataclass
class Metrics:
    """All of a controller's metrics; one instance per controller (tests run several).

    `registry` holds what prometheus_client renders (counters, the decision histogram,
    process and runtime series); the attached `SiteCollector` renders the snapshot's
    gauges. `render()` is one scrape's text; `serve()` the HTTP endpoint.
    """

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True))
    energy: EnergyCounter = field(default_factory=EnergyCounter)
    site: SiteCollector | None = None

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
        self.price_clamped = Counter(
            "mineops_price_clamped",
            "Market prices beyond [energy] price_floor/cap_usd_per_mwh, planned with at that "
            "bound (bound: cap or floor)", ["bound"], registry=r)
        for bound in ("cap", "floor"):
            self.price_clamped.labels(bound)
        self.commands = Counter("mineops_commands_sent", "Miner setpoints sent", registry=r)
        self.command_messages = Counter("mineops_command_messages_sent",
                                        "Command messages published (one per group batch)",
                                        registry=r)
        self.decisions = Counter("mineops_decisions", "Decisions made", ["trigger"], registry=r)
        self.decision_seconds = Histogram(
            "mineops_decision_duration_seconds", "Time to decide and actuate", registry=r,
            buckets=DECISION_BUCKETS_S,
        )
        self.telemetry_lag = Histogram(
            "mineops_telemetry_lag_seconds",
            "Telemetry handled this long after the reading's own timestamp (incl. clock offset)",
            registry=r, buckets=TELEMETRY_LAG_BUCKETS_S)
        self._gzip_lock = threading.Lock()
        # (snapshot seq, gzip of the cached part, the compressor right after it).
        self._gzip: tuple[int, bytes, zlib._Compress] | None = None

    def attach(self, collector: SiteCollector | Collector) -> None:
        """Add a collector to the exposition.

        The `SiteCollector` (the snapshot's gauges) is rendered once per decision; another
        prometheus_client `Collector` with a few series (campus, closed loop) is rendered
        at every scrape with the registry.
        """
        if isinstance(collector, SiteCollector):
            self.site = collector
        else:
            self.registry.register(collector)

    def render(self) -> bytes:
        """One scrape in the text format (version 0.0.4)."""
        cached = b"" if self.site is None else self.site.snapshot_text()[1]
        return cached + self._live()

    def render_gzip(self) -> bytes:
        """`render()` gzipped; the part cached per decision is compressed once per decision.

        One gzip stream: the compressor's state after the cached part is kept, and each
        scrape continues a copy of it with the live part.
        """
        if self.site is None:
            return zlib.compress(self._live(), 1, wbits=31)
        seq, cached = self.site.snapshot_text()
        with self._gzip_lock:
            if self._gzip is None or self._gzip[0] != seq:
                z = zlib.compressobj(1, wbits=31)
                head = z.compress(cached) + z.flush(zlib.Z_SYNC_FLUSH)
                self._gzip = (seq, head, z)
            _, head, z = self._gzip
            tail = z.copy()
        return head + tail.compress(self._live()) + tail.flush()

    def _live(self) -> bytes:
        live = b"" if self.site is None else self.site.live_text()
        return live + generate_latest(self.registry)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve `/metrics` (any path) on host:port from a thread; gzip when asked."""
        def app(environ: dict[str, str], start_response: Callable[..., object]) -> list[bytes]:
            gz = "gzip" in environ.get("HTTP_ACCEPT_ENCODING", "")
            body = self.render_gzip() if gz else self.render()
            headers = [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4),
                       ("Content-Length", str(len(body)))]
            if gz:
                headers.append(("Content-Encoding", "gzip"))
            start_response("200 OK", headers)
            return [body]

        server = make_server(host, port, app,
                             server_class=_ThreadingServer, handler_class=_QuietHandler)
        thread = Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        return MetricsServer(server, thread)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A thread per request, as prometheus_client's server: a slow client blocks no other."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not logged (one every few seconds)."""


@dataclass
class MetricsServer:
    """The /metrics HTTP endpoint; `port` is the one actually bound (useful with port 0)."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        """The TCP port the endpoint listens on."""
        return int(self.server.server_address[1])

    def close(self) -> None:
        """Stop serving and wait (up to 5 s) for the server thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

"""Ingest: every received message validated and applied to what the controller knows.

Dispatch is a table: the topic's kind gives the payload type (`topics.PAYLOAD_TYPES`)
and the handler. A message that fails validation is counted by kind and reason,
logged (once a minute per kind and reason) and dropped; it never raises and never
half-applies. Meters in vendor formats are decoded by their drivers and handed to the
same meter handler as the project's own meter messages.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from controller.core.fleet_state import FleetState
from controller.daemon.metrics import Metrics
from controller.grid.obligations import GridObligations
from controller.logs import LogLimiter
from controller.protocol.payloads import (
    GridEvent,
    GroupCapabilities,
    GroupTelemetry,
    HashpriceSignal,
    MeterTelemetry,
    MinerTelemetry,
    PayloadError,
    PriceSchedule,
    PriceSignal,
    decode,
)
from controller.protocol.topics import (
    PAYLOAD_TYPES,
    Kind,
    Parsed,
    SiteTopics,
    parse_availability,
)
from drivers.meters import MeterRouter

log = structlog.get_logger("mineops.ingest")

Handler = Callable[[str, Any], None]


class Ingest:
    """Applies messages to the fleet state, the site readings and the grid obligations.

    Args:
        topics: The site's topics.
        fleet: Fleet state, updated in place.
        grid: Grid obligations; events are journaled through it.
        meters: Vendor-format meter drivers, by topic.
        site_meter_ids: Ids of the project's own meters with role "site" (empty: any id).
        metrics: Message and invalid-message counters, the energy counter.
        on_change: Asks for a decision now; called with the trigger's name.
        on_shed: Sleeps the miners of a mask at once (under-frequency).
        on_points_changed: The fleet's operating points changed (firmware capabilities).
    """

    def __init__(self, *, topics: SiteTopics, fleet: FleetState, grid: GridObligations,
                 meters: MeterRouter, site_meter_ids: set[str], metrics: Metrics,
                 on_change: Callable[[str], None],
                 on_shed: Callable[[npt.NDArray[np.bool_]], None],
                 on_points_changed: Callable[[], None]) -> None:
        self.topics = topics
        self.fleet = fleet
        self.grid = grid
        self.meters = meters
        self.site_meter_ids = site_meter_ids
        self.metrics = metrics
        self.on_change = on_change
        self.on_shed = on_shed
        self.on_points_changed = on_points_changed
        self.invalid: Counter[tuple[str, str]] = Counter()
        self._quiet = LogLimiter(60.0)
        self._handlers: dict[Kind, Handler] = {
            Kind.GROUP_TELEMETRY: self._group_telemetry,
            Kind.MINER_TELEMETRY: self._miner_telemetry,
            Kind.MINER_AVAILABILITY: self._miner_availability,
            Kind.GROUP_AVAILABILITY: self._group_availability,
            Kind.METER_TELEMETRY: self._meter,
            Kind.GRID: self._grid_event,
            Kind.PRICE: self._price,
            Kind.PRICE_SCHEDULE: self._price_schedule,
            Kind.HASHPRICE: self._hashprice,
            Kind.GROUP_CAPABILITIES: self._capabilities,
        }

    def subscriptions(self) -> list[str]:
        """Topic filters for every kind this ingest handles, vendor meters included."""
        t = self.topics
        return [
            t.miner("+", "telemetry"),
            t.miner("+", "availability"),
            t.group("+", "telemetry"),
            t.group("+", "availability"),
            t.group("+", "capabilities"),
            t.meter("+"),
            t.price,
            t.price_schedule,
            t.hashprice,
            t.grid,
            *self.meters.subscriptions(),
        ]

    # -- dispatch -----------------------------------------------------------------

    def on_message(self, topic: str, raw: bytes) -> None:
        """Validate and apply one message; a bad one is counted and dropped, never raised."""
        vendor = self.meters.claims(topic)
        parsed = Parsed(Kind.METER_TELEMETRY) if vendor else self.topics.parse(topic)
        kind = parsed.kind
        self.metrics.messages.labels(kind.value).inc()
        try:
            if vendor:
                self._vendor_meter(topic, raw)
                return
            handler = self._handlers.get(kind)
            if handler is None:
                raise PayloadError("unknown_topic", "not a topic the controller reads")
            model = PAYLOAD_TYPES[kind]
            handler(parsed.device, parse_availability(raw) if model is None
                    else decode(model, raw))
        except PayloadError as e:
            self.reject(kind, e.reason, topic, e.detail)
        except Exception as e:  # a bug must not take the controller down with it
            log.exception("message_handler_failed", topic=topic)
            self.reject(kind, "internal_error", topic, repr(e))

    def reject(self, kind: Kind, reason: str, topic: str, detail: str) -> None:
        """Count a dropped message and log it (rate-limited per kind and reason)."""
        self.invalid[(kind.value, reason)] += 1
        self.metrics.invalid.labels(kind.value, reason).inc()
        suppressed = self._quiet.allow(kind.value, reason)
        if suppressed is not None:
            log.warning("message_dropped", kind=kind.value, reason=reason, topic=topic,
                        detail=detail[:200], suppressed_since_last=suppressed)

    # -- miners -------------------------------------------------------------------

    def _miner(self, miner_id: str) -> int:
        i = self.fleet.index.get(miner_id)
        if i is None:
            raise PayloadError("unknown_miner", miner_id)
        return i

    def _group_telemetry(self, group: str, msg: GroupTelemetry) -> None:
        self.metrics.telemetry_lag.observe(time.time() - msg.ts)
        index = self.fleet.index
        found = [(index.get(r.id), r) for r in msg.miners]
        known = [(i, r) for i, r in found if i is not None]
        if known:
            idx, readings = zip(*known, strict=True)
            self.fleet.update_many(idx, readings, time.monotonic())
        unknown = len(found) - len(known)
        if unknown:
            raise PayloadError("unknown_miner", f"{unknown} unknown miner id(s) in {group}")

    def _miner_telemetry(self, miner_id: str, msg: MinerTelemetry) -> None:
        self.metrics.telemetry_lag.observe(time.time() - msg.ts)
        self.fleet.update(self._miner(miner_id), msg, time.monotonic())

    def _miner_availability(self, miner_id: str, online: bool) -> None:
        self.fleet.set_available(self._miner(miner_id), online)
        if not online:
            self.on_change("availability")

    def _group_availability(self, group: str, online: bool) -> None:
        if group not in self.fleet.groups:
            raise PayloadError("unknown_group", group)
        self.fleet.set_available(self.fleet.members(group), online)
        if not online:
            self.on_change("availability")

    def _capabilities(self, _group: str, caps: GroupCapabilities) -> None:
        """A bridge's firmware facts: preset-only miners plan over their presets alone."""
        fleet = self.fleet
        changed = False
        for s in caps.sets:
            idx = [i for i in (fleet.index.get(m) for m in s.miners) if i is not None]
            by_model: dict[int, list[int]] = {}
            for i in idx:
                by_model.setdefault(int(fleet.model_idx[i]), []).append(i)
            for m, ix in by_model.items():
                if s.control == "presets" and s.presets_w:
                    changed |= fleet.set_points(ix, s.presets_w, s.presets_ths)
                elif s.control == "none":  # stock firmware: stock or asleep
                    changed |= fleet.set_points(ix, [fleet.models[m].nominal_w], None)
        if changed:
            log.info("operating_points_updated", sets=len(caps.sets))
            self.on_points_changed()

    # -- site: meters, markets, grid -----------------------------------------------

    def _vendor_meter(self, topic: str, raw: bytes) -> None:
        routed = self.meters.decode(topic, raw)
        if routed is not None and routed.role == "site":
            self._apply_meter(routed.reading.telemetry(time.time()))

    def _meter(self, meter_id: str, reading: MeterTelemetry) -> None:
        if self.site_meter_ids and meter_id not in self.site_meter_ids:
            raise PayloadError("unknown_meter", meter_id)
        self._apply_meter(reading)

    def _apply_meter(self, reading: MeterTelemetry) -> None:
        now = time.monotonic()
        site = self.fleet.site
        site.meter_power_w = reading.power_w
        site.meter_at = now
        self.metrics.energy.observe(reading.power_w, reading.energy_import_wh, now)
        if reading.frequency_hz is None:
            return
        site.frequency_hz = reading.frequency_hz
        change = self.grid.frequency(reading.frequency_hz, time.time())
        if change == "shed":
            self.on_shed(self.grid.frequency_shed)
        if change:
            self.on_change("frequency")

    def _grid_event(self, _device: str, event: GridEvent) -> None:
        if self.grid.accept(event, time.time()):
            self.on_change("grid")

    def _price(self, _device: str, price: PriceSignal) -> None:
        site = self.fleet.site
        changed = price.price_usd_per_mwh != site.market_price_usd_per_mwh
        site.market_price_usd_per_mwh = price.price_usd_per_mwh
        site.price_at = time.monotonic()
        if changed:
            self.on_change("price")

    def _price_schedule(self, _device: str, schedule: PriceSchedule) -> None:
        self.fleet.site.price_schedule = schedule
        self.on_change("price_schedule")

    def _hashprice(self, _device: str, hp: HashpriceSignal) -> None:
        self.fleet.site.hashprice_usd_per_ph_day = hp.hashprice_usd_per_ph_day
        self.on_change("hashprice")

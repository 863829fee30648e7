"""OpenADR 2.0b VEN: a utility's demand-response events in as GridEvents, site power out as reports.

The VEN polls the VTN (openleadr's client) and bridges it to the site's MQTT:

- Each OpenADR event becomes one `GridEvent` per interval that carries an obligation,
  published on mineops/<site>/signal/grid (QoS 1, retained). SIMPLE levels 1-3 map to the
  configured site targets (`level_N_kw`); level 0 is no obligation and publishes nothing.
  LOAD_DISPATCH `setpoint` is a site target, `delta` (negative) a shed below baseline.
- Ids are `oadr-<event id>-m<modification>-s<signal>-i<interval uid>`. A modification
  cancels the previous modification's GridEvents and publishes the new ones; a cancelled
  OpenADR event cancels them (same ids, `cancelled: true`).
- The VEN opts in when the event can be honoured (`opt_in` policy) and publishes only
  what it opted into; bad input (unknown signal, absurd level) is logged with a reason and
  skipped, and the VEN keeps running.
- Site power (the latest `power_w` of the site meters on mineops/<site>/meter/+/telemetry)
  is offered as a TELEMETRY_USAGE report of real power in W and delivered as the VTN asks.

`translate_event` is a pure function (time passed in); `OpenAdrVen` owns the I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog
from openleadr import OpenADRClient, enums, objects
from pydantic import ValidationError

from controller.cancellation import propagate_lost_cancel
from controller.config import OpenAdrConfig, SiteConfig
from controller.logs import LogLimiter
from controller.payloads import GridEvent, MeterTelemetry, PayloadError, decode
from controller.topics import Kind, SiteTopics
from controller.transport import Transport

log = structlog.get_logger("mineops.openadr")

Opt = Literal["optIn", "optOut"]
OPT_IN: Opt = "optIn"
OPT_OUT: Opt = "optOut"

# Watts per unit of an OpenADR SI scale code, for LOAD_DISPATCH in W/kW/MW.
_SCALE_TO_KW = {"none": 1e-3, "k": 1.0, "M": 1e3}
_MAX_KW = 10_000_000.0  # GridEvent's bound: beyond it a value is absurd, not a target
_ID_SAFE = re.compile(r"[^A-Za-z0-9_.:@-]")


class OpenAdrConfigMissing(ValueError):
    """The site file has no [openadr] table."""


@dataclass(frozen=True, slots=True)
class Skipped:
    """A signal or interval that was not translated, and why (a fixed reason code)."""

    reason: str
    detail: str
    signal: int | None = None
    interval: int | None = None


@dataclass(frozen=True, slots=True)
class Translation:
    """What one OpenADR event means for the site."""

    event_id: str
    modification: int
    cancelled: bool
    events: list[GridEvent] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    opt: Opt = OPT_OUT


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


def _seconds(value: Any) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
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


def translate_event(event: Mapping[str, Any], cfg: OpenAdrConfig, *, vtn_id: str,
                    now_ts: float) -> Translation:
    """Turn one parsed OpenADR event (openleadr's dict) into GridEvents and an opt decision.

    Pure: no I/O, no clock. Intervals that have ended are dropped without complaint;
    anything that cannot be translated is listed in `skipped` with a reason.
    """
    descriptor = event.get("event_descriptor") or {}
    event_id = str(descriptor.get("event_id") or "")
    modification = descriptor.get("modification_number")
    if not event_id or not isinstance(modification, int) or modification < 0:
        return Translation(event_id or "?", -1, False,
                           skipped=[Skipped("bad_event", "no event_id or modification_number")])
    if descriptor.get("event_status") == "cancelled":
        return Translation(event_id, modification, True, opt=OPT_IN)

    active = event.get("active_period") or {}
    ramp_s = _seconds(active.get("ramp_up", active.get("ramp_up_period")))
    ramp_s = ramp_s if ramp_s is not None and 0 < ramp_s <= 86_400 else None
    event_start = _ts(active.get("dtstart"))
    source = f"openadr:{vtn_id}"[:128]
    out: list[GridEvent] = []
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
        for k, interval in enumerate(intervals):
            start = _ts(interval.get("dtstart"))
            duration = _seconds(interval.get("duration"))
            value = _number(interval.get("signal_payload"))
            uid = interval.get("uid", k)
            if start is None or duration is None or duration < 0:
                skipped.append(Skipped("bad_interval", "no start or duration", j, k))
                continue
            if duration == 0:
                skipped.append(Skipped("open_ended_interval", "duration 0 (until cancelled)",
                                       j, k))
                continue
            if start + duration <= now_ts:
                continue  # over already: nothing to do, nothing wrong
            if value is None:
                skipped.append(Skipped("bad_value", f"payload {interval.get('signal_payload')!r}",
                                       j, k))
                continue
            target = _interval_target(cfg, signal, value)
            if isinstance(target, Skipped):
                skipped.append(Skipped(target.reason, target.detail, j, k))
                continue
            if target is None:
                continue  # no obligation (SIMPLE 0, delta 0)
            kind, kw = target
            if kind == "target_kw" and kw < cfg.min_target_kw:
                skipped.append(Skipped("below_min_target",
                                       f"{kw:g} kW < min_target_kw {cfg.min_target_kw:g}", j, k))
                if cfg.opt_in != "always":
                    continue
            deadline = start
            if cfg.deadline_from_ramp_up and ramp_s is not None and start == event_start:
                deadline = start + min(ramp_s, duration)
            try:
                out.append(GridEvent(
                    id=grid_event_id(event_id, modification, j, uid), kind=kind, value_kw=kw,
                    start_ts=start, end_ts=start + duration, deadline_ts=deadline,
                    source=source))
            except ValidationError as e:
                skipped.append(Skipped("bad_value", str(e.errors()[0]["msg"]), j, k))
    if cfg.opt_in == "never":
        opt = OPT_OUT
    elif cfg.opt_in == "always":
        opt = OPT_IN
    else:
        opt = OPT_OUT if skipped else OPT_IN
    return Translation(event_id, modification, False,
                       events=out if opt == OPT_IN else [], skipped=skipped, opt=opt)


class SitePower:
    """The latest readings of the site meters; their sum is what the VEN reports."""

    def __init__(self, meter_ids: list[str], stale_s: float) -> None:
        self.meter_ids = meter_ids  # empty: every meter seen on the topic
        self.stale_s = stale_s
        self.readings: dict[str, MeterTelemetry] = {}

    def update(self, meter_id: str, reading: MeterTelemetry) -> None:
        if self.meter_ids and meter_id not in self.meter_ids:
            return
        last = self.readings.get(meter_id)
        if last is None or reading.ts >= last.ts:
            self.readings[meter_id] = reading

    def latest(self, now_ts: float) -> tuple[float, float] | None:
        """(oldest ts, total W) when every site meter has a fresh reading, else None."""
        ids = self.meter_ids or list(self.readings)
        got = [self.readings.get(i) for i in ids]
        fresh = [r for r in got if r is not None and now_ts - r.ts <= self.stale_s]
        if not ids or len(fresh) != len(ids):
            return None
        return min(r.ts for r in fresh), sum(r.power_w for r in fresh)


class OpenAdrVen:
    """The site's VEN: an openleadr client and an MQTT transport, run until cancelled."""

    def __init__(self, cfg: SiteConfig, *, clock: Callable[[], float] = time.time,
                 openleadr_log_level: int = logging.WARNING) -> None:
        if cfg.openadr is None:
            raise OpenAdrConfigMissing("the site file has no [openadr] table (see docs/openadr.md)")
        self.cfg = cfg
        self.oa: OpenAdrConfig = cfg.openadr
        self.topics = SiteTopics(cfg.site_id)
        self.clock = clock
        self.openleadr_log_level = openleadr_log_level
        site_meters = [m.id for m in cfg.meters if m.type == "mineops" and m.role == "site"]
        self.power = SitePower(site_meters, self.oa.report_stale_s)
        self.transport = Transport(
            cfg.broker, client_id=f"mineops-ven-{cfg.site_id}-{os.getpid()}",
            subscriptions=[self.topics.meter("+")], on_connect=self._flush)
        self.vtn_id = "unknown"
        self.client: Any = None  # the openleadr client of the current registration
        self.registered = asyncio.Event()
        self.opts: dict[str, Opt] = {}  # OpenADR event id -> our last answer
        self._open: dict[str, list[GridEvent]] = {}  # OpenADR event id -> GridEvents in force
        self._outbox: dict[str, GridEvent] = {}  # not yet taken by the broker, in order
        self._flush_lock = asyncio.Lock()
        self._bad_meter = LogLimiter(60.0)

    # --- MQTT side -------------------------------------------------------------------

    def _on_mqtt(self, topic: str, raw: bytes) -> None:
        parsed = self.topics.parse(topic)
        if parsed.kind is not Kind.METER_TELEMETRY:
            return
        try:
            reading = decode(MeterTelemetry, raw)
        except PayloadError as e:
            if (n := self._bad_meter.allow(parsed.device, e.reason)) is not None:
                log.warning("openadr_meter_dropped", topic=topic, reason=e.reason,
                            detail=e.detail, suppressed=n)
            return
        self.power.update(parsed.device, reading)

    def _enqueue(self, event: GridEvent) -> None:
        self._outbox.pop(event.id, None)  # re-sent: moves to the end, keeps the latest copy
        self._outbox[event.id] = event

    async def _flush(self) -> None:
        """Publish the outbox in order (QoS 1, retained); what fails stays for the next try."""
        async with self._flush_lock:
            while self._outbox:
                event_id, event = next(iter(self._outbox.items()))
                ok = await self.transport.publish(self.topics.grid, event.encode(), qos=1,
                                                  retain=True)
                if not ok:
                    log.warning("openadr_grid_publish_deferred", pending=len(self._outbox))
                    return
                if self._outbox.get(event_id) is event:
                    del self._outbox[event_id]
                log.info("openadr_grid_event_published", id=event.id, kind=event.kind,
                         value_kw=event.value_kw, start_ts=event.start_ts, end_ts=event.end_ts,
                         deadline_ts=event.deadline_ts, cancelled=event.cancelled)

    async def _republish(self) -> None:
        """Re-send open events now and then: a controller that starts later still gets them."""
        while True:
            await asyncio.sleep(self.oa.republish_s)
            now = self.clock()
            for oadr_id in list(self._open):
                live = [e for e in self._open[oadr_id] if e.end_ts > now]
                if live:
                    self._open[oadr_id] = live
                    for e in live:
                        self._enqueue(e)
                else:
                    del self._open[oadr_id]
            await self._flush()

    # --- OpenADR side ----------------------------------------------------------------

    def _cancel_open(self, event: dict[str, Any], t: Translation) -> None:
        """Cancel what an earlier modification published.

        A VEN restarted since then does not know it: for a cancelled event it cancels the
        ids the previous modification number would have had (a VTN cancels by raising the
        modification number by one).
        """
        previous = self._open.pop(t.event_id, None)
        if previous is None and t.cancelled and t.modification > 0:
            descriptor = {**event["event_descriptor"], "event_status": "active",
                          "modification_number": t.modification - 1}
            guess = translate_event({**event, "event_descriptor": descriptor}, self.oa,
                                    vtn_id=self.vtn_id, now_ts=self.clock())
            previous = guess.events
        for e in previous or []:
            self._enqueue(e.model_copy(update={"cancelled": True}))

    async def on_event(self, event: dict[str, Any]) -> Opt:
        """openleadr's on_event and on_update_event: translate, publish, answer optIn/optOut."""
        try:
            t = translate_event(event, self.oa, vtn_id=self.vtn_id, now_ts=self.clock())
        except Exception as e:  # the VEN keeps running whatever the VTN sends
            log.exception("openadr_event_rejected", reason="exception", error=str(e))
            return OPT_OUT
        for s in t.skipped:
            log.warning("openadr_signal_skipped", event_id=t.event_id,
                        modification=t.modification, reason=s.reason, detail=s.detail,
                        signal=s.signal, interval=s.interval)
        if t.modification < 0:
            return OPT_OUT
        self._cancel_open(event, t)
        if t.cancelled:
            log.info("openadr_event_cancelled", event_id=t.event_id, modification=t.modification)
        else:
            if t.events:
                self._open[t.event_id] = t.events
            for ge in t.events:
                self._enqueue(ge)
            log.info("openadr_event", event_id=t.event_id, modification=t.modification,
                     opt=t.opt, grid_events=len(t.events), skipped=len(t.skipped))
        self.opts[t.event_id] = t.opt
        await self._flush()
        return t.opt

    def report_site_power(self) -> list[tuple[datetime, float]]:
        """The report callback: the latest site power in W, or nothing when it is stale."""
        latest = self.power.latest(self.clock())
        if latest is None:
            return []
        ts, power_w = latest
        return [(datetime.fromtimestamp(ts, UTC), power_w)]

    def _after_parse(self, message_type: str, payload: dict[str, Any]) -> None:
        vtn_id = payload.get("vtn_id")
        if isinstance(vtn_id, str) and vtn_id:
            self.vtn_id = safe_id(vtn_id, 100)
        if message_type == "oadrCreatedPartyRegistration" and self.oa.poll_interval_s:
            # openleadr polls as often as the registration answer asks; our setting wins.
            payload["requested_oadr_poll_freq"] = timedelta(seconds=self.oa.poll_interval_s)

    def _make_client(self) -> Any:
        oa = self.oa
        client = _Client(
            has_reading=lambda: self.power.latest(self.clock()) is not None,
            ven_name=oa.ven_name, vtn_url=oa.vtn_url, ven_id=oa.ven_id,
            cert=str(oa.cert_file) if oa.cert_file else None,
            key=str(oa.key_file) if oa.key_file else None,
            passphrase=oa.key_passphrase.get_secret_value() if oa.key_passphrase else None,
            ca_file=str(oa.ca_file) if oa.ca_file else None,
            vtn_fingerprint=oa.vtn_fingerprint, show_fingerprint=False,
            disable_signature=oa.cert_file is None)
        client.add_handler("on_event", self.on_event)
        client.add_handler("on_update_event", self.on_event)
        client.add_hook("after_parse_xml", self._after_parse)
        interval = timedelta(seconds=oa.report_interval_s)
        client.add_report(
            callback=self.report_site_power, resource_id=self.cfg.site_id,
            measurement="REAL_POWER", unit="W", scale="none",
            report_name=enums.REPORT_NAME.TELEMETRY_USAGE,
            report_type=enums.REPORT_TYPE.READING,
            reading_type=enums.READING_TYPE.DIRECT_READ,
            sampling_rate=_sampling_rate(interval),
            report_duration=timedelta(hours=1),
            report_specifier_id=f"mineops-{self.cfg.site_id}-power",
            r_id=f"{self.cfg.site_id}-site-power-w")
        return client

    async def _run_openadr(self) -> None:
        """Register with the VTN (retrying with backoff), then let openleadr poll."""
        attempt = 0
        while True:
            client = self._make_client()
            try:
                with propagate_lost_cancel():  # openleadr must not swallow the VEN's stop
                    await client.run()
            except Exception as e:  # a VTN answer openleadr could not digest
                log.warning("openadr_register_failed", error=f"{type(e).__name__}: {e}")
            try:
                if client.registration_id and client.scheduler.running:
                    self.client = client
                    self.registered.set()
                    attempt = 0
                    log.info("openadr_registered", vtn_id=self.vtn_id, ven_id=client.ven_id,
                             registration_id=client.registration_id,
                             poll_s=client.poll_frequency.total_seconds())
                    await asyncio.Event().wait()  # openleadr's scheduler polls from here on
            finally:
                self.registered.clear()
                await _stop_client(client)
            attempt += 1
            delay = min(300.0, 2.0 ** min(attempt, 8))
            log.warning("openadr_vtn_unreachable", vtn_url=self.oa.vtn_url, retry_in_s=delay,
                        attempt=attempt)
            await asyncio.sleep(delay)

    async def run(self) -> None:
        """Run the MQTT side and the OpenADR side until cancelled."""
        # openleadr logs every poll and report at INFO: by default keep its warnings only.
        logging.getLogger("openleadr").setLevel(self.openleadr_log_level)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.transport.run(self._on_mqtt), name="ven-mqtt")
            tg.create_task(self._run_openadr(), name="ven-openadr")
            tg.create_task(self._republish(), name="ven-republish")


class _Client(OpenADRClient):  # type: ignore[misc]  # openleadr ships no type hints
    """openleadr's client, except that it sends no report while there is no fresh reading.

    openleadr would send a report without intervals, which openleadr's own VTN answers
    with an HTTP 500; and stale power is no measurement to give a utility.
    """

    def __init__(self, *args: Any, has_reading: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._has_reading = has_reading
        self._skipped = LogLimiter(300.0)

    async def update_report(self, report_request_id: str) -> None:
        if not self._has_reading():
            if (n := self._skipped.allow("report")) is not None:
                log.warning("openadr_report_skipped", reason="no_fresh_reading",
                            report_request_id=report_request_id, suppressed=n)
            return
        await super().update_report(report_request_id)


def _sampling_rate(interval: timedelta) -> Any:
    return objects.SamplingRate(min_period=interval,
                                max_period=max(interval, timedelta(hours=1)), on_change=False)


async def _stop_client(client: Any) -> None:
    """Stop openleadr's scheduler and HTTP session; safe to call twice."""
    try:
        if client.scheduler.running:
            client.scheduler.shutdown(wait=False)
        if client.report_queue_task:
            client.report_queue_task.cancel()
        if client.client_session is not None and not client.client_session.closed:
            await client.client_session.close()
    except Exception as e:  # stopping must not fail the caller
        log.warning("openadr_stop_failed", error=str(e))

"""OpenADR 2.0b VEN: a utility's demand-response events in as GridEvents, site power out as reports.

The VEN polls the VTN (openleadr's client) and bridges it to the site's MQTT:

- Each OpenADR event becomes one `GridEvent` per interval that carries an obligation
  (`drivers.openadr.translate`), published on mineops/<site>/signal/grid (QoS 1, retained).
- Ids are `oadr-<event id>-m<modification>-s<signal>-i<interval uid>`. A modification
  cancels the previous modification's GridEvents and publishes the new ones; an older
  modification than the one in force is ignored; a cancelled OpenADR event cancels them
  (same ids, `cancelled: true`).
- Implied cancellation (OpenADR 2.0b): every oadrDistributeEvent lists all of the VEN's
  events, so an event the VEN knows that a later one does not list is cancelled, and an
  empty one cancels all. openleadr 0.5 calls the event handlers only for listed events and
  not at all for an empty list; the VEN sees the whole list through openleadr's
  `after_parse_xml` hook.
- Open-ended intervals ("until cancelled") are held: their GridEvents' end is moved
  forward on each re-publication while the VTN still lists the event.
- The VEN opts in when the event can be honoured (`opt_in` policy) and publishes only
  what it opted into; bad input (unknown signal, absurd level) is logged with a reason and
  skipped, and the VEN keeps running.
- Site power (the latest `power_w` of the site meters on mineops/<site>/meter/+/telemetry)
  is offered as a TELEMETRY_USAGE report of real power in W and delivered as the VTN asks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from openleadr import OpenADRClient, enums, objects

from controller.cancellation import propagate_lost_cancel
from controller.config import BrokerConfig
from controller.logs import LogLimiter
from controller.protocol.payloads import GridEvent, MeterTelemetry, PayloadError, decode
from controller.protocol.topics import Kind, SiteTopics
from controller.protocol.transport import Transport
from drivers.openadr.config import OpenAdrConfig
from drivers.openadr.translate import (
    OPT_IN,
    OPT_OUT,
    Opt,
    Translation,
    open_ended_end_ts,
    safe_id,
    translate_event,
)

__all__ = ["OPT_IN", "OPT_OUT", "OpenAdrVen", "SitePower"]

log = structlog.get_logger("mineops.openadr")




class SitePower:
    """The latest readings of the site meters; their sum is what the VEN reports.

    Args:
        meter_ids: The site meters whose readings count; empty: every meter seen.
        stale_s: A reading older than this is not reported, s (`openadr.report_stale_s`).
    """

    def __init__(self, meter_ids: list[str], stale_s: float) -> None:
        self.meter_ids = meter_ids  # empty: every meter seen on the topic
        self.stale_s = stale_s
        self.readings: dict[str, MeterTelemetry] = {}

    def update(self, meter_id: str, reading: MeterTelemetry) -> None:
        """Keep the reading if the meter counts and it is not older than the one held."""
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

    def __init__(self, openadr: OpenAdrConfig, *, site_id: str, broker: BrokerConfig,
                 site_meter_ids: Sequence[str], clock: Callable[[], float] = time.time,
                 openleadr_log_level: int = logging.WARNING) -> None:
        """The VEN of site `site_id` for the `[openadr]` table `openadr`.

        Args:
            openadr: The VTN, the VEN's identity and how events map to kW.
            site_id: The site's id (its topics, the report's resource id).
            broker: The site's broker.
            site_meter_ids: The project's own site meters whose readings are reported.
            clock: Unix time source (tests pass their own).
            openleadr_log_level: Log level of the openleadr library.
        """
        self.site_id = site_id
        self.oa = openadr
        self.topics = SiteTopics(site_id)
        self.clock = clock
        self.openleadr_log_level = openleadr_log_level
        self.power = SitePower(list(site_meter_ids), self.oa.report_stale_s)
        self.transport = Transport(
            broker, client_id=f"mineops-ven-{site_id}-{os.getpid()}",
            subscriptions=[self.topics.meter("+")], on_connect=self._flush)
        self.vtn_id = "unknown"
        self.client: Any = None  # the openleadr client of the current registration
        self.registered = asyncio.Event()
        self.opts: dict[str, Opt] = {}  # OpenADR event id -> our last answer
        # OpenADR event id -> modification in force, for every event the VTN still lists
        # that is not cancelled (opted out of or not): what an implied cancel applies to.
        self._known: dict[str, int] = {}
        # OpenADR event id -> newest modification seen, cancellations included, while listed.
        self._newest: dict[str, int] = {}
        self._open: dict[str, list[GridEvent]] = {}  # OpenADR event id -> GridEvents in force
        self._open_ended: set[str] = set()  # GridEvent ids whose end is a rolling hold
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

    def _republish_once(self, now_ts: float) -> None:
        """Queue every open GridEvent again; extend the rolling ends, drop the ended."""
        for oadr_id in list(self._open):
            live: list[GridEvent] = []
            for published in self._open[oadr_id]:
                e = published
                if e.id in self._open_ended:
                    end_ts = open_ended_end_ts(e.start_ts, now_ts)
                    if end_ts != e.end_ts:
                        e = e.model_copy(update={"end_ts": end_ts})
                if e.end_ts > now_ts:
                    live.append(e)
                    self._enqueue(e)
                else:
                    self._open_ended.discard(e.id)
            if live:
                self._open[oadr_id] = live
            else:
                del self._open[oadr_id]

    async def _republish(self) -> None:
        """Re-send open events now and then: a controller that starts later still gets them."""
        while True:
            await asyncio.sleep(self.oa.republish_s)
            self._republish_once(self.clock())
            await self._flush()

    # --- OpenADR side ----------------------------------------------------------------

    def _cancel(self, events: list[GridEvent], now_ts: float) -> int:
        """Queue cancelled copies of the GridEvents not yet over; how many."""
        n = 0
        for e in events:
            held = e.id in self._open_ended
            self._open_ended.discard(e.id)
            if e.end_ts > now_ts or held:  # an ended one stays completed in the journal
                self._enqueue(e.model_copy(update={"cancelled": True}))
                n += 1
        return n

    def _supersede(self, event: Mapping[str, Any], t: Translation, now_ts: float) -> None:
        """Cancel what an earlier modification published that this one does not.

        A VEN restarted since then does not know it: for a cancelled event it has not
        seen, it cancels the ids the previous modification number would have had (a VTN
        cancels by raising the modification number by one).
        """
        previous = self._open.pop(t.event_id, None)
        if previous is None and t.cancelled and t.modification > 0 \
                and t.event_id not in self._known:
            descriptor = {**event["event_descriptor"], "event_status": "active",
                          "modification_number": t.modification - 1}
            guess = translate_event({**event, "event_descriptor": descriptor}, self.oa,
                                    vtn_id=self.vtn_id, now_ts=now_ts)
            previous = guess.events
            self._open_ended |= guess.open_ended
        kept = {e.id for e in t.events}
        self._cancel([e for e in previous or [] if e.id not in kept], now_ts)

    async def on_event(self, event: dict[str, Any]) -> Opt:
        """Handle an event from the VTN: translate, publish, answer optIn/optOut.

        openleadr calls it as on_event and on_update_event; `event` is one parsed event
        of an oadrDistributeEvent (openleadr's dict).
        """
        now_ts = self.clock()
        try:
            t = translate_event(event, self.oa, vtn_id=self.vtn_id, now_ts=now_ts)
        except Exception as e:  # the VEN keeps running whatever the VTN sends
            log.exception("openadr_event_rejected", reason="exception", error=str(e))
            return OPT_OUT
        if t.modification < 0:
            for s in t.skipped:
                log.warning("openadr_signal_skipped", event_id=t.event_id, reason=s.reason,
                            detail=s.detail, signal=s.signal, interval=s.interval)
            return OPT_OUT
        in_force = self._newest.get(t.event_id)
        if in_force is not None and t.modification < in_force:
            # A VTN that sends an older modification again must not undo a newer one.
            log.warning("openadr_event_stale", event_id=t.event_id, reason="older_modification",
                        modification=t.modification, in_force=in_force)
            return self.opts.get(t.event_id, OPT_OUT)
        for s in t.skipped:
            log.warning("openadr_signal_skipped", event_id=t.event_id,
                        modification=t.modification, reason=s.reason, detail=s.detail,
                        signal=s.signal, interval=s.interval)
        self._supersede(event, t, now_ts)
        self._newest[t.event_id] = t.modification
        if t.cancelled:
            self._known.pop(t.event_id, None)
            log.info("openadr_event_cancelled", event_id=t.event_id, modification=t.modification)
        else:
            self._known[t.event_id] = t.modification
            if t.events:
                self._open[t.event_id] = list(t.events)
            self._open_ended |= t.open_ended
            for ge in t.events:
                self._enqueue(ge)
            log.info("openadr_event", event_id=t.event_id, modification=t.modification,
                     opt=t.opt, grid_events=len(t.events), skipped=len(t.skipped),
                     until_cancelled=len(t.open_ended))
        self.opts[t.event_id] = t.opt
        await self._flush()
        return t.opt

    async def on_distribute(self, payload: Mapping[str, Any]) -> list[str]:
        """Implied cancellation: cancel every known event that `payload` does not list.

        `payload` is a parsed oadrDistributeEvent (openleadr's dict; no `events` key when
        it lists none). OpenADR 2.0b has every oadrDistributeEvent list all of the VEN's
        events, so one that is missing is cancelled and an empty one cancels all. Runs
        before openleadr hands the listed events to `on_event`. Returns the ids dropped.
        """
        events = payload.get("events") or []
        listed = {str(e["event_descriptor"]["event_id"]) for e in events
                  if isinstance(e, Mapping) and isinstance(e.get("event_descriptor"), Mapping)
                  and e["event_descriptor"].get("event_id")}
        for event_id in [i for i in self._newest if i not in listed]:
            del self._newest[event_id]
        gone = [i for i in {**self._known, **self._open} if i not in listed]
        if not gone:
            return []
        now_ts = self.clock()
        for event_id in gone:
            self._known.pop(event_id, None)
            n = self._cancel(self._open.pop(event_id, []), now_ts)
            log.info("openadr_event_unlisted", event_id=event_id, cancelled_grid_events=n,
                     listed=len(listed))
        await self._flush()
        return gone

    def report_site_power(self) -> list[tuple[datetime, float]]:
        """The report callback: the latest site power in W, or nothing when it is stale."""
        latest = self.power.latest(self.clock())
        if latest is None:
            return []
        ts, power_w = latest
        return [(datetime.fromtimestamp(ts, UTC), power_w)]

    async def _after_parse(self, client: _Client, message_type: str,
                           payload: dict[str, Any]) -> None:
        """See every message the VTN sent before it is acted on (after_parse_xml hook).

        openleadr logs and swallows what a hook raises; this one logs it under our name.
        """
        try:
            vtn_id = payload.get("vtn_id")
            if isinstance(vtn_id, str) and vtn_id:
                self.vtn_id = safe_id(vtn_id, 100)
            if message_type == "oadrCreatedPartyRegistration" and self.oa.poll_interval_s:
                # openleadr polls as often as the registration answer asks; our setting wins.
                payload["requested_oadr_poll_freq"] = timedelta(seconds=self.oa.poll_interval_s)
            if message_type == "oadrDistributeEvent":
                gone = await self.on_distribute(payload)
                client.sync_known_events(payload.get("events") or [], gone)
        except Exception as e:  # the VEN keeps running whatever the VTN sends
            log.exception("openadr_distribute_failed", message_type=message_type, error=str(e))

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

        async def after_parse(message_type: str, payload: dict[str, Any]) -> None:
            await self._after_parse(client, message_type, payload)

        client.add_hook("after_parse_xml", after_parse)
        interval = timedelta(seconds=oa.report_interval_s)
        client.add_report(
            callback=self.report_site_power, resource_id=self.site_id,
            measurement="REAL_POWER", unit="W", scale="none",
            report_name=enums.REPORT_NAME.TELEMETRY_USAGE,
            report_type=enums.REPORT_TYPE.READING,
            reading_type=enums.READING_TYPE.DIRECT_READ,
            sampling_rate=_sampling_rate(interval),
            report_duration=timedelta(hours=1),
            report_specifier_id=f"mineops-{self.site_id}-power",
            r_id=f"{self.site_id}-site-power-w")
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

    def sync_known_events(self, listed: list[Any], gone: list[str]) -> None:
        """Bring openleadr's memory of events in line with an oadrDistributeEvent's list.

        openleadr 0.5 remembers each event it handed to the VEN (`received_events`) and
        the answer it gave (`responded_events`), and calls no handler again for an event it
        remembers at the same modification number. An event dropped by implied
        cancellation is forgotten here, so that a VTN that lists it again is heard. A
        cancelled event it has already answered is forgotten by openleadr in the answers
        but not in the events, and a second listing of it would fail with a KeyError that
        opts out of every event in the message; the answer to a cancellation (optIn) is
        put back for it.
        """
        dropped = set(gone)
        self.received_events[:] = [
            e for e in self.received_events if e["event_descriptor"]["event_id"] not in dropped]
        for gone_id in dropped:
            self.responded_events.pop(gone_id, None)
        remembered = {e["event_descriptor"]["event_id"] for e in self.received_events}
        for event in listed:
            descriptor = event.get("event_descriptor") or {}
            listed_id = descriptor.get("event_id")
            if descriptor.get("event_status") == "cancelled" and listed_id in remembered \
                    and listed_id not in self.responded_events:
                self.responded_events[listed_id] = OPT_IN


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

"""OpenADR VEN: event translation (pure), and a real openleadr VTN talking to the VEN over loopback.

The integration tests run an openleadr `OpenADRServer` in-process on 127.0.0.1 (plain
HTTP, unsigned messages: openleadr checks signatures only on TLS connections), register
the VEN with it, and watch both ends: the VTN's opt and report callbacks, and the MQTT
grid topic through a real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from openleadr import OpenADRServer, enums, objects
from openleadr.messaging import parse_message, validate_xml_schema
from structlog.testing import capture_logs

from controller.cli.main import main as cli_main
from controller.config import SiteConfig
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import GridEvent, MeterTelemetry, decode
from controller.protocol.topics import SiteTopics
from drivers.openadr.config import OpenAdrConfig
from drivers.openadr.translate import (
    OPEN_ENDED_LEAD_S,
    OPEN_ENDED_STEP_S,
    OPT_IN,
    OPT_OUT,
    grid_event_id,
    open_ended_end_ts,
    translate_event,
)
from drivers.openadr.ven import OpenAdrVen
from tests.conftest import Peer, make_site, ven_of, wait_for

# openleadr's VTN keys its aiohttp app by string: a library matter, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")

NOW = 1_760_000_000.0
VEN_ID = "ven-test"
FIELD_CASES = Path(__file__).parent / "fixtures" / "field-cases"


def dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def oa(**kw: Any) -> OpenAdrConfig:
    base: dict[str, Any] = {"vtn_url": "http://127.0.0.1:1/OpenADR2/Simple/2.0b",
                            "ven_name": "mine-1", "level_1_kw": 3000.0, "level_2_kw": 1500.0,
                            "level_3_kw": 200.0}
    return OpenAdrConfig(**{**base, **kw})


def simple_event(levels: list[float], *, start: float = NOW + 600, step: float = 900,
                 mod: int = 0, status: str = "far", ramp_s: float | None = None,
                 name: str = "SIMPLE", stype: str = "level",
                 measurement: dict[str, Any] | None = None) -> dict[str, Any]:
    """An event as openleadr's client hands it to on_event."""
    active: dict[str, Any] = {"dtstart": dt(start), "duration": timedelta(seconds=step * len(
        levels))}
    if ramp_s is not None:
        active["ramp_up"] = timedelta(seconds=ramp_s)
    signal: dict[str, Any] = {
        "signal_name": name, "signal_type": stype, "signal_id": "s1",
        "intervals": [{"dtstart": dt(start + i * step), "duration": timedelta(seconds=step),
                       "signal_payload": v, "uid": i} for i, v in enumerate(levels)]}
    if measurement is not None:
        signal["measurement"] = measurement
    return {"event_descriptor": {"event_id": "ev-1", "modification_number": mod,
                                 "event_status": status, "priority": 0},
            "active_period": active, "event_signals": [signal], "response_required": "always"}


# --- translation (no I/O) -------------------------------------------------------------


def test_simple_levels_map_to_targets_one_grid_event_per_interval_with_an_obligation() -> None:
    t = translate_event(simple_event([1, 2, 0, 3]), oa(), vtn_id="VTN", now_ts=NOW)
    assert t.opt == OPT_IN and not t.skipped
    assert [(e.kind, e.value_kw) for e in t.events] == [
        ("target_kw", 3000.0), ("target_kw", 1500.0), ("target_kw", 200.0)]
    first, second, third = t.events
    assert first.id == grid_event_id("ev-1", 0, 0, 0) == "oadr-ev-1-m0-s0-i0"
    assert third.id == "oadr-ev-1-m0-s0-i3"  # level 0 (interval 2) is no obligation
    assert (first.start_ts, first.end_ts, first.deadline_ts) == (NOW + 600, NOW + 1500, NOW + 600)
    assert (second.start_ts, second.deadline_ts) == (NOW + 1500, NOW + 1500)
    assert first.source == "openadr:VTN" and not first.cancelled


def test_ramp_up_moves_the_first_deadline_only_when_configured() -> None:
    event = simple_event([2, 2], ramp_s=120)
    t = translate_event(event, oa(deadline_from_ramp_up=True), vtn_id="VTN", now_ts=NOW)
    assert [e.deadline_ts for e in t.events] == [NOW + 720, NOW + 1500]
    t = translate_event(event, oa(), vtn_id="VTN", now_ts=NOW)
    assert [e.deadline_ts for e in t.events] == [NOW + 600, NOW + 1500], "safe default"


def test_ended_intervals_are_dropped_and_the_running_one_is_kept() -> None:
    t = translate_event(simple_event([2, 1], start=NOW - 1000, step=900), oa(), vtn_id="V",
                        now_ts=NOW)
    assert t.opt == OPT_IN and [e.value_kw for e in t.events] == [3000.0]


@pytest.mark.parametrize(("event", "reason"), [
    (simple_event([7]), "level_out_of_range"),
    (simple_event([-1]), "level_out_of_range"),
    (simple_event([1.5]), "level_out_of_range"),
    (simple_event([float("nan")]), "bad_value"),
    (simple_event(["x"]), "bad_value"),  # type: ignore[list-item]
    (simple_event([2], stype="price"), "unsupported_signal_type"),
    (simple_event([30], name="ELECTRICITY_PRICE", stype="price"), "unsupported_signal"),
    (simple_event([1], name="x-unknown", stype="level"), "unsupported_signal"),
    (simple_event([5], name="LOAD_DISPATCH", stype="multiplier"), "unsupported_signal_type"),
    (simple_event([1e12], name="LOAD_DISPATCH", stype="setpoint"), "value_out_of_range"),
    (simple_event([-5], name="LOAD_DISPATCH", stype="setpoint"), "value_out_of_range"),
    (simple_event([100], name="LOAD_DISPATCH", stype="delta"), "load_increase_unsupported"),
    (simple_event([5], name="LOAD_DISPATCH", stype="setpoint",
                  measurement={"name": "energyReal", "unit": "Wh", "scale": "k"}), "bad_unit"),
])
def test_bad_input_is_skipped_with_a_reason_and_opted_out(event: dict[str, Any],
                                                          reason: str) -> None:
    t = translate_event(event, oa(), vtn_id="VTN", now_ts=NOW)
    assert [s.reason for s in t.skipped] == [reason]
    assert t.opt == OPT_OUT and t.events == []


def test_garbage_events_do_not_raise() -> None:
    events: list[dict[str, Any]] = [
        {}, {"event_descriptor": {"event_id": "e", "modification_number": 0}},
        {"event_descriptor": {"event_id": "e", "modification_number": 0},
         "event_signals": [{"intervals": [{"dtstart": "soon"}]}]},
        {"event_descriptor": {"event_id": "e", "modification_number": "1"}}]
    for event in events:
        t = translate_event(event, oa(), vtn_id="VTN", now_ts=NOW)
        assert t.opt == OPT_OUT and t.skipped and not t.events


def test_load_dispatch_in_watts_kilowatts_and_megawatts() -> None:
    for scale, value, kw in [("none", 750_000, 750.0), ("k", 750, 750.0), ("M", 0.75, 750.0)]:
        event = simple_event([value], name="LOAD_DISPATCH", stype="setpoint", measurement={
            "name": "powerReal", "description": "RealPower", "unit": "W", "scale": scale})
        t = translate_event(event, oa(), vtn_id="VTN", now_ts=NOW)
        assert [(e.kind, e.value_kw) for e in t.events] == [("target_kw", kw)], scale
    t = translate_event(simple_event([-400], name="LOAD_DISPATCH", stype="delta"), oa(),
                        vtn_id="VTN", now_ts=NOW)  # no item base: kW
    assert [(e.kind, e.value_kw) for e in t.events] == [("shed_kw", 400.0)]


def test_opt_in_policies() -> None:
    unmapped = simple_event([1, 3])
    cfg_missing = {"level_3_kw": None}
    t = translate_event(unmapped, oa(**cfg_missing), vtn_id="V", now_ts=NOW)
    assert t.opt == OPT_OUT and t.events == [] and t.skipped[0].reason == "level_not_configured"
    t = translate_event(unmapped, oa(opt_in="always", **cfg_missing), vtn_id="V", now_ts=NOW)
    assert t.opt == OPT_IN and [e.value_kw for e in t.events] == [3000.0]
    t = translate_event(unmapped, oa(opt_in="never"), vtn_id="V", now_ts=NOW)
    assert t.opt == OPT_OUT and t.events == []
    t = translate_event(simple_event([3]), oa(min_target_kw=500), vtn_id="V", now_ts=NOW)
    assert t.opt == OPT_OUT and t.skipped[0].reason == "below_min_target"
    t = translate_event(simple_event([0, 0]), oa(), vtn_id="V", now_ts=NOW)
    assert t.opt == OPT_IN and t.events == []  # nothing asked: trivially honoured


def test_odd_event_ids_become_valid_distinct_grid_event_ids() -> None:
    a = grid_event_id("evt/2024 #1", 3, 0, 0)
    b = grid_event_id("evt_2024__1", 3, 0, 0)
    long = grid_event_id("x" * 500, 0, 0, 0)
    for i in (a, b, long):
        GridEvent(id=i, kind="emergency", start_ts=1, end_ts=2)  # valid id
    assert a != b and len(long) <= 128


def test_config_rejects_inverted_levels_and_half_a_key_pair() -> None:
    with pytest.raises(ValueError, match="higher SIMPLE level"):
        oa(level_1_kw=100, level_2_kw=500)
    with pytest.raises(ValueError, match="go together"):
        oa(cert_file="ven.pem")


def test_cli_ven_without_openadr_table_is_a_clear_error(tmp_path: Any,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    site = tmp_path / "site.toml"
    site.write_text('site_id = "s"\npower_cap_kw = 20\nhashprice_usd_per_ph_day = 40\n'
                    '[[fleet.groups]]\nname = "a"\nmodel = "s21"\ncount = 2\n')
    assert cli_main(["ven", "--config", str(site)]) == 2
    assert "no [openadr] table" in capsys.readouterr().err


# --- interval times, open-ended intervals, versions (no I/O) --------------------------


def field_case_xml() -> bytes:
    return (FIELD_CASES / "openadr-intervals-without-dtstart" / "oadrDistributeEvent.xml"
            ).read_bytes()


def parse_distribute(xml: bytes) -> list[dict[str, Any]]:
    """The events of an oadrDistributeEvent, as openleadr's client parses them."""
    validate_xml_schema(xml)
    message_type, payload = parse_message(xml)
    assert message_type == "oadrDistributeEvent"
    events: list[dict[str, Any]] = payload["events"]
    return events


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_field_case_intervals_without_dtstart_run_one_after_another() -> None:
    (event,) = parse_distribute(field_case_xml())
    assert all("dtstart" not in i for i in event["event_signals"][0]["intervals"])
    t = translate_event(event, oa(), vtn_id="VTN123", now_ts=ts("2020-12-03T14:22:07+00:00"))
    assert t.opt == OPT_IN and t.skipped == []
    assert [(e.id, e.start_ts, e.end_ts, e.deadline_ts, e.value_kw) for e in t.events] == [
        ("oadr-event-0001-m0-s0-i0", ts("2020-12-03T14:30:00+00:00"),
         ts("2020-12-03T14:40:00+00:00"), ts("2020-12-03T14:30:00+00:00"), 3000.0),
        ("oadr-event-0001-m0-s0-i1", ts("2020-12-03T14:40:00+00:00"),
         ts("2020-12-03T14:50:00+00:00"), ts("2020-12-03T14:40:00+00:00"), 1500.0),
        ("oadr-event-0001-m0-s0-i2", ts("2020-12-03T14:50:00+00:00"),
         ts("2020-12-03T15:00:00+00:00"), ts("2020-12-03T14:50:00+00:00"), 3000.0)]
    assert {(e.kind, e.source, e.version, e.cancelled) for e in t.events} == {
        ("target_kw", "openadr:VTN123", 0, False)}


def test_field_case_mid_event_keeps_the_running_interval_at_its_place() -> None:
    (event,) = parse_distribute(field_case_xml())
    t = translate_event(event, oa(), vtn_id="VTN123", now_ts=ts("2020-12-03T14:45:00+00:00"))
    assert t.opt == OPT_IN
    assert [(e.id, e.start_ts, e.value_kw) for e in t.events] == [
        ("oadr-event-0001-m0-s0-i1", ts("2020-12-03T14:40:00+00:00"), 1500.0),
        ("oadr-event-0001-m0-s0-i2", ts("2020-12-03T14:50:00+00:00"), 3000.0)]


@pytest.mark.parametrize(("durations", "levels", "durations_s"), [
    (["PT5M", "PT15M", "PT10M"], ["3.0", "2.0", "0.0"], [300, 900, 600]),
    (["PT1H", "PT30M", "PT30M"], ["1.0", "1.0", "2.0"], [3600, 1800, 1800]),
    (["PT90S", "P0DT1H", "PT1M30S"], ["2.0", "3.0", "1.0"], [90, 3600, 90]),
])
def test_field_case_variants_start_where_the_previous_interval_ended(
        durations: list[str], levels: list[str], durations_s: list[float]) -> None:
    xml = field_case_xml().decode()
    for uid, (duration, level) in enumerate(zip(durations, levels, strict=True)):
        old = ('<xcal:duration><xcal:duration>PT10M</xcal:duration></xcal:duration>\n'
               '                  <uid xmlns="urn:ietf:params:xml:ns:icalendar-2.0">'
               f'<text>{uid}</text></uid>\n'
               '                  <ei:signalPayload><ei:payloadFloat><ei:value>')
        assert xml.count(old) == 1
        new = old.replace("PT10M", duration)
        xml = xml.replace(old, new)
        value_at = xml.index(new) + len(new)
        xml = xml[:value_at] + level + xml[xml.index("</ei:value>", value_at):]
    (event,) = parse_distribute(xml.encode())
    t = translate_event(event, oa(), vtn_id="V", now_ts=ts("2020-12-03T14:00:00+00:00"))
    kw = {"1.0": 3000.0, "2.0": 1500.0, "3.0": 200.0}
    expected, start = [], ts("2020-12-03T14:30:00+00:00")
    for level, seconds in zip(levels, durations_s, strict=True):
        if level in kw:  # level 0: no obligation, no GridEvent
            expected.append((start, start + seconds, kw[level]))
        start += seconds
    assert t.opt == OPT_IN and t.skipped == []
    assert [(e.start_ts, e.end_ts, e.value_kw) for e in t.events] == expected


def chained_event(intervals: list[dict[str, Any]], *, start: float | None = NOW + 600,
                  signals: int = 1, mod: int = 0, event_id: str = "ev-1") -> dict[str, Any]:
    """An event whose intervals carry what the caller gives (durations in s), like the field."""
    def interval(k: int, i: dict[str, Any]) -> dict[str, Any]:
        out = {"uid": k, "signal_payload": i.get("level", 2)}
        if "duration" in i:
            out["duration"] = timedelta(seconds=i["duration"])
        if "dtstart" in i:
            out["dtstart"] = dt(i["dtstart"])
        return out

    active: dict[str, Any] = {"duration": timedelta(seconds=sum(
        i.get("duration", 0) for i in intervals))}
    if start is not None:
        active["dtstart"] = dt(start)
    sigs = [{"signal_name": "SIMPLE", "signal_type": "level", "signal_id": f"s{j}",
             "intervals": [interval(k, i) for k, i in enumerate(intervals)]}
            for j in range(signals)]
    return {"event_descriptor": {"event_id": event_id, "modification_number": mod,
                                 "event_status": "far"},
            "active_period": active, "event_signals": sigs, "response_required": "always"}


def test_an_interval_with_its_own_dtstart_restarts_the_sequence() -> None:
    event = chained_event([{"duration": 600}, {"duration": 300, "dtstart": NOW + 3600},
                           {"duration": 900}])
    t = translate_event(event, oa(), vtn_id="V", now_ts=NOW)
    assert t.opt == OPT_IN
    assert [(e.start_ts, e.end_ts) for e in t.events] == [
        (NOW + 600, NOW + 1200), (NOW + 3600, NOW + 3900), (NOW + 3900, NOW + 4800)]


def test_every_signal_runs_from_the_active_period_start() -> None:
    event = chained_event([{"duration": 600}, {"duration": 600}], signals=2)
    t = translate_event(event, oa(), vtn_id="V", now_ts=NOW)
    assert [(e.id, e.start_ts) for e in t.events] == [
        ("oadr-ev-1-m0-s0-i0", NOW + 600), ("oadr-ev-1-m0-s0-i1", NOW + 1200),
        ("oadr-ev-1-m0-s1-i0", NOW + 600), ("oadr-ev-1-m0-s1-i1", NOW + 1200)]


def test_intervals_with_no_start_anywhere_are_skipped_with_a_reason() -> None:
    t = translate_event(chained_event([{"duration": 600}, {"duration": 600}], start=None),
                        oa(), vtn_id="V", now_ts=NOW)
    assert [(s.reason, s.interval) for s in t.skipped] == [("bad_interval", 0),
                                                           ("bad_interval", 1)]
    assert "active period has none" in t.skipped[0].detail
    assert t.opt == OPT_OUT and t.events == []


def test_after_an_interval_without_duration_the_next_cannot_be_placed() -> None:
    event = chained_event([{"duration": 600}, {}, {"duration": 600},
                           {"duration": 600, "dtstart": NOW + 7200}])
    t = translate_event(event, oa(), vtn_id="V", now_ts=NOW)
    assert [(s.reason, s.interval) for s in t.skipped] == [("bad_interval", 1),
                                                           ("bad_interval", 2)]
    assert "no usable duration" in t.skipped[0].detail and "interval 1" in t.skipped[1].detail
    assert t.opt == OPT_OUT and t.events == []
    t = translate_event(event, oa(opt_in="always"), vtn_id="V", now_ts=NOW)
    assert [(e.start_ts, e.end_ts) for e in t.events] == [(NOW + 600, NOW + 1200),
                                                          (NOW + 7200, NOW + 7800)]


def test_open_ended_interval_is_held_until_cancelled() -> None:
    t = translate_event(simple_event([2], step=0), oa(), vtn_id="V", now_ts=NOW)
    assert t.opt == OPT_IN and t.skipped == []
    (e,) = t.events
    assert (e.kind, e.value_kw, e.start_ts) == ("target_kw", 1500.0, NOW + 600)
    assert e.end_ts == open_ended_end_ts(NOW + 600, NOW) >= NOW + OPEN_ENDED_LEAD_S
    assert t.open_ended == {e.id}
    # Long after its start, still held (nothing ever makes it "over").
    later = NOW + 30 * 86_400
    (e,) = translate_event(simple_event([2], step=0), oa(), vtn_id="V", now_ts=later).events
    assert e.start_ts == NOW + 600 and e.end_ts >= later + OPEN_ENDED_LEAD_S


def test_open_ended_end_steps_forward_and_is_stable_within_a_step() -> None:
    start = NOW + 600
    for now in [NOW, start - 1, start, start + 1, start + 3599, start + 3600, start + 86_399]:
        end = open_ended_end_ts(start, now)
        steps = (end - start) / OPEN_ENDED_STEP_S
        assert steps == int(steps) and steps >= 1, now
        assert now + OPEN_ENDED_LEAD_S <= end < now + OPEN_ENDED_LEAD_S + OPEN_ENDED_STEP_S, now
    assert open_ended_end_ts(start, start + 10) == open_ended_end_ts(start, start + 3000)
    assert open_ended_end_ts(start, start + 3601) == open_ended_end_ts(start, start + 10) + 3600


def test_field_case_with_an_open_ended_last_interval() -> None:
    xml = field_case_xml().decode()
    last = '<xcal:duration>PT10M</xcal:duration></xcal:duration>\n                  <uid ' \
           'xmlns="urn:ietf:params:xml:ns:icalendar-2.0"><text>2</text>'
    assert xml.count(last) == 1
    xml = xml.replace(last, last.replace("PT10M", "PT0S")).replace(
        "<duration>PT30M</duration>", "<duration>PT0S</duration>")
    (event,) = parse_distribute(xml.encode())
    now = ts("2020-12-03T14:22:07+00:00")
    t = translate_event(event, oa(), vtn_id="V", now_ts=now)
    assert t.opt == OPT_IN
    assert [(e.start_ts, e.value_kw) for e in t.events] == [
        (ts("2020-12-03T14:30:00+00:00"), 3000.0), (ts("2020-12-03T14:40:00+00:00"), 1500.0),
        (ts("2020-12-03T14:50:00+00:00"), 3000.0)]
    held = t.events[2]
    assert t.open_ended == {held.id} and held.end_ts >= now + OPEN_ENDED_LEAD_S


def test_open_ended_interval_ends_where_a_later_one_has_its_own_start() -> None:
    event = chained_event([{"duration": 0, "level": 1},
                           {"duration": 600, "dtstart": NOW + 5000, "level": 3}])
    t = translate_event(event, oa(), vtn_id="V", now_ts=NOW)
    assert [(e.start_ts, e.end_ts, e.value_kw) for e in t.events] == [
        (NOW + 600, NOW + 5000, 3000.0), (NOW + 5000, NOW + 5600, 200.0)]
    assert t.open_ended == frozenset()
    # A chained interval after an open-ended one has no start: skipped, with the reason.
    t = translate_event(chained_event([{"duration": 0}, {"duration": 600}]), oa(),
                        vtn_id="V", now_ts=NOW)
    assert [(s.reason, s.interval) for s in t.skipped] == [("bad_interval", 1)]
    assert "open-ended" in t.skipped[0].detail and t.opt == OPT_OUT


def test_version_is_the_modification_number() -> None:
    t = translate_event(simple_event([1, 2], mod=4), oa(), vtn_id="V", now_ts=NOW)
    assert [(e.id, e.version) for e in t.events] == [("oadr-ev-1-m4-s0-i0", 4),
                                                     ("oadr-ev-1-m4-s0-i1", 4)]
    assert decode(GridEvent, t.events[0].encode()).version == 4


def test_missing_or_repeated_uids_name_intervals_by_position() -> None:
    for uids in ([0, 0, 0], [None, 1, 2], ["a", "a", "b"]):
        event = simple_event([1, 2, 1])
        for interval, uid in zip(event["event_signals"][0]["intervals"], uids, strict=True):
            interval["uid"] = uid
        t = translate_event(event, oa(), vtn_id="V", now_ts=NOW)
        assert [e.id for e in t.events] == [f"oadr-ev-1-m0-s0-i{k}" for k in range(3)], uids


# --- a real VTN -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Vtn:
    server: Any
    url: str
    opts: list[tuple[str, str]] = field(default_factory=list)  # (event_id, opt_type)
    reports: list[tuple[datetime, float]] = field(default_factory=list)
    registered_reports: list[tuple[str, str, str, str]] = field(default_factory=list)

    def on_opt(self, ven_id: str, event_id: str, opt_type: str) -> None:
        self.opts.append((event_id, opt_type))


@pytest.fixture
async def vtn_stopped() -> AsyncIterator[Vtn]:
    """A VTN set up but not started (`await vtn.server.run()`); stopped at the end if started."""
    port = free_port()
    server = OpenADRServer(vtn_id="TestVTN", http_host="127.0.0.1", http_port=port,
                           requested_poll_freq=timedelta(seconds=1))
    v = Vtn(server, f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b")
    server.add_handler("on_create_party_registration", lambda payload: (VEN_ID, "reg-1"))

    def on_register_report(*, ven_id: str, resource_id: str, measurement: str, unit: str,
                           scale: str, min_sampling_interval: timedelta,
                           max_sampling_interval: timedelta) -> tuple[Any, timedelta]:
        v.registered_reports.append((resource_id, measurement, unit, scale))
        return v.reports.extend, min_sampling_interval  # the VTN's update-report callback

    server.add_handler("on_register_report", on_register_report)
    try:
        yield v
    finally:
        if getattr(server, "app_runner", None) is not None:
            await server.stop()


@pytest.fixture
async def vtn(vtn_stopped: Vtn) -> Vtn:
    """A VTN on a free loopback port, polled every second."""
    await vtn_stopped.server.run()
    return vtn_stopped


def ven_site(broker: LocalBroker, vtn: Vtn | ListingVtn, **openadr: Any) -> SiteConfig:
    return make_site(broker, [("a", "s21", 2)], openadr={
        "vtn_url": vtn.url, "ven_name": "mine-test", "level_1_kw": 3000, "level_2_kw": 1500,
        "level_3_kw": 200, "report_interval_s": 1, **openadr})


async def start(cfg: SiteConfig, tasks: Any) -> tuple[OpenAdrVen, Peer]:
    ven = ven_of(cfg)
    grid = Peer(cfg, [SiteTopics(cfg.site_id).grid])
    tasks(ven.run(), "ven")
    tasks(grid.run(), "grid-peer")
    await wait_for(lambda: ven.registered.is_set() and ven.transport.connected.is_set()
                   and grid.transport.connected.is_set(), what="VEN registered, peers connected")
    return ven, grid


def grid_events(peer: Peer) -> list[GridEvent]:
    return [decode(GridEvent, raw) for _, raw in peer.received]


@pytest.mark.integration
async def test_vtn_event_opt_in_grid_event_reports_and_cancel(
        broker: LocalBroker, vtn: Vtn, tasks: Any) -> None:
    cfg = ven_site(broker, vtn)
    ven, grid = await start(cfg, tasks)
    assert vtn.registered_reports == [("test", "RealPower", "W", "none")]

    # The site meter publishes; the VTN receives its power in W.
    meter = Peer(cfg)
    tasks(meter.run(), "meter")

    async def meter_loop() -> None:
        while True:
            await meter.publish(SiteTopics("test").meter("poi"),
                                MeterTelemetry(ts=time.time(), power_w=2345.0).encode())
            await asyncio.sleep(0.3)

    tasks(meter_loop(), "meter-loop")
    await wait_for(lambda: any(value == 2345.0 for _, value in vtn.reports), timeout_s=15,
                   what="the meter's power reported to the VTN")

    # An event with SIMPLE level 2 for 10 minutes, then level 0: one GridEvent at 1500 kW.
    start_dt = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)
    vtn.server.add_event(
        ven_id=VEN_ID, signal_name="SIMPLE", signal_type="level", event_id="dr-42",
        intervals=[{"dtstart": start_dt, "duration": timedelta(minutes=10), "signal_payload": 2},
                   {"dtstart": start_dt + timedelta(minutes=10),
                    "duration": timedelta(minutes=5), "signal_payload": 0}],
        callback=vtn.on_opt)
    await wait_for(lambda: ("dr-42", "optIn") in vtn.opts, timeout_s=15, what="VEN opted in")
    await wait_for(lambda: len(grid.received) == 1, what="GridEvent on the grid topic")
    (event,) = grid_events(grid)
    assert event.id == "oadr-dr-42-m0-s0-i0"
    assert (event.kind, event.value_kw, event.cancelled) == ("target_kw", 1500.0, False)
    assert event.start_ts == start_dt.timestamp() == event.deadline_ts
    assert event.end_ts == start_dt.timestamp() + 600
    assert event.source == "openadr:TestVTN"

    # Retained: a controller that connects later still gets it.
    late = Peer(cfg, [SiteTopics("test").grid])
    tasks(late.run(), "late-peer")
    await wait_for(lambda: len(late.received) == 1, what="retained GridEvent")
    assert grid_events(late)[0] == event

    # The VTN cancels: the same id comes back cancelled.
    vtn.server.cancel_event(VEN_ID, "dr-42")
    await wait_for(lambda: len(grid.received) == 2, timeout_s=15, what="cancellation")
    cancelled = grid_events(grid)[1]
    assert cancelled == event.model_copy(update={"cancelled": True})
    assert ven.opts["dr-42"] == OPT_IN


@pytest.mark.integration
async def test_bad_vtn_events_are_skipped_and_the_ven_keeps_going(
        broker: LocalBroker, vtn_stopped: Vtn, tasks: Any) -> None:
    vtn = vtn_stopped
    # openleadr's VTN will not send a SIMPLE level above 3, so the test sends level 3 and
    # turns it into 9 on the wire (plain HTTP, unsigned: nothing notices).
    @web.middleware
    async def absurd_level(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if isinstance(response, web.Response) and response.text \
                and "<ei:eventID>absurd</ei:eventID>" in response.text:
            response.text = response.text.replace("<ei:value>3</ei:value>",
                                                  "<ei:value>9</ei:value>")
        return response

    vtn.server.app.middlewares.append(absurd_level)
    await vtn.server.run()
    cfg = ven_site(broker, vtn)
    with capture_logs() as logs:
        ven, grid = await start(cfg, tasks)
        await send_bad_and_good_events(vtn)
        await wait_for(lambda: {e for e, _ in vtn.opts} == {"absurd", "price", "dispatch"},
                       timeout_s=20, what="answers to all three events")
    skipped = {(e["event_id"], e["reason"]) for e in logs
               if e["event"] == "openadr_signal_skipped"}
    assert skipped == {("absurd", "level_out_of_range"), ("price", "unsupported_signal")}
    assert dict(vtn.opts) == {"absurd": "optOut", "price": "optOut", "dispatch": "optIn"}
    await wait_for(lambda: len(grid.received) >= 1, what="the dispatch GridEvent")
    await asyncio.sleep(0.5)
    (event,) = grid_events(grid)
    assert (event.id, event.kind, event.value_kw) == ("oadr-dispatch-m0-s0-i0", "target_kw", 800.0)
    assert ven.registered.is_set()


async def send_bad_and_good_events(vtn: Vtn) -> None:
    start_dt = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)
    interval = {"dtstart": start_dt, "duration": timedelta(minutes=30)}
    vtn.server.add_event(ven_id=VEN_ID, signal_name="SIMPLE", signal_type="level",
                         event_id="absurd", intervals=[{**interval, "signal_payload": 3}],
                         callback=vtn.on_opt)
    vtn.server.add_event(ven_id=VEN_ID, signal_name="ELECTRICITY_PRICE", signal_type="price",
                         event_id="price", intervals=[{**interval, "signal_payload": 0.3}],
                         callback=vtn.on_opt)
    # LOAD_DISPATCH with a real-power item base in kW.
    signal = objects.EventSignal(
        intervals=[objects.Interval(dtstart=start_dt, duration=timedelta(minutes=30),
                                    signal_payload=800.0)],
        signal_name="LOAD_DISPATCH", signal_type="setpoint", signal_id="ld-1",
        measurement=objects.Measurement(name="powerReal", description="RealPower", unit="W",
                                        scale="k", power_attributes=enums.MEASUREMENTS
                                        .REAL_POWER.power_attributes))
    dispatch = objects.Event(
        event_descriptor=objects.EventDescriptor(event_id="dispatch", modification_number=0,
                                                 market_context="oadr://test", event_status="far"),
        event_signals=[signal], targets=[{"ven_id": VEN_ID}])
    vtn.server.add_raw_event(ven_id=VEN_ID, event=dispatch, callback=vtn.on_opt)


@pytest.mark.integration
async def test_events_wait_for_the_broker(broker: LocalBroker, tasks: Any) -> None:
    """A GridEvent translated while MQTT is away is published once the broker is reachable."""
    cfg = make_site(broker, [("a", "s21", 2)], openadr={
        "vtn_url": "http://127.0.0.1:1/x", "ven_name": "v", "level_2_kw": 1500})
    ven = ven_of(cfg)
    opt = await ven.on_event(simple_event([2], start=time.time() + 600))
    assert opt == OPT_IN and len(ven._outbox) == 1  # nothing connected yet
    grid = Peer(cfg, [SiteTopics("test").grid])
    tasks(grid.run(), "grid-peer")
    await grid.transport.connected.wait()
    mqtt = tasks(ven.transport.run(ven._on_mqtt), "ven-mqtt")
    await wait_for(lambda: len(grid.received) == 1, what="deferred GridEvent")
    assert grid_events(grid)[0].id == "oadr-ev-1-m0-s0-i0" and not ven._outbox
    mqtt.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await mqtt


# --- implied cancellation: a VTN that keeps its own event list ------------------------


@dataclass
class ListingVtn:
    """An openleadr VTN with its own event list (openleadr's on_poll/on_request_event API).

    Every oadrDistributeEvent it sends lists all of the VEN's events, as OpenADR 2.0b
    requires, so removing one from `listed` and calling `distribute` is how a utility's
    VTN deletes an event; an empty list is sent as an empty oadrDistributeEvent.
    """

    server: Any
    url: str
    listed: list[objects.Event] = field(default_factory=list)
    pending: bool = False
    distributes: int = 0  # oadrDistributeEvents sent on polls
    opts: list[tuple[str, str]] = field(default_factory=list)

    def distribute(self, events: list[objects.Event]) -> None:
        self.listed, self.pending = list(events), True

    async def on_poll(self, ven_id: str) -> tuple[str, dict[str, Any]] | None:
        if not self.pending:
            return None
        self.pending = False
        self.distributes += 1
        return "oadrDistributeEvent", {"events": list(self.listed)}

    async def on_request_event(self, ven_id: str) -> list[objects.Event]:
        return list(self.listed)

    async def on_created_event(self, ven_id: str, event_id: str, opt_type: str) -> None:
        self.opts.append((event_id, opt_type))


@pytest.fixture
async def listing_vtn() -> AsyncIterator[ListingVtn]:
    port = free_port()
    server = OpenADRServer(vtn_id="ListingVTN", http_host="127.0.0.1", http_port=port,
                           requested_poll_freq=timedelta(seconds=1))
    v = ListingVtn(server, f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b")
    server.add_handler("on_create_party_registration", lambda payload: (VEN_ID, "reg-1"))
    server.add_handler("on_register_report", lambda report: None)  # wants no reports
    server.add_handler("on_poll", v.on_poll)
    server.add_handler("on_request_event", v.on_request_event)
    server.add_handler("on_created_event", v.on_created_event)
    await server.run()
    try:
        yield v
    finally:
        await server.stop()


def vtn_event(event_id: str, start: datetime, intervals: list[tuple[timedelta, float]], *,
              mod: int = 0, cancelled: bool = False, with_dtstart: bool = True
              ) -> objects.Event:
    """A SIMPLE event; `with_dtstart=False` sends its intervals with durations only."""
    at, out = start, []
    for duration, level in intervals:
        out.append(objects.Interval(dtstart=at if with_dtstart else None, duration=duration,
                                    signal_payload=level))
        at += duration
    event = objects.Event(
        event_descriptor=objects.EventDescriptor(
            event_id=event_id, modification_number=mod, market_context="oadr://test",
            event_status="far"),
        active_period=objects.ActivePeriod(dtstart=start, duration=at - start),
        event_signals=[objects.EventSignal(intervals=out, signal_name="SIMPLE",
                                           signal_type="level", signal_id=f"{event_id}-s")],
        targets=[{"ven_id": VEN_ID}])
    if cancelled:  # objects.Event sets the status from the clock; a VTN cancels after that
        event.event_descriptor.event_status = "cancelled"
    return event


def minute(now: datetime, minutes: int) -> datetime:
    return now.replace(second=0, microsecond=0) + timedelta(minutes=minutes)


@pytest.mark.integration
async def test_field_case_implied_cancel_against_a_real_vtn(
        broker: LocalBroker, listing_vtn: ListingVtn, tasks: Any) -> None:
    vtn = listing_vtn
    cfg = ven_site(broker, vtn, republish_s=1)
    with capture_logs() as logs:
        ven, grid = await start(cfg, tasks)
        now = datetime.now(UTC)
        peak_a = vtn_event("peak-A", minute(now, 30), [(timedelta(hours=2), 2)])
        # peak-B as utilities send it: intervals with a duration only.
        peak_b = vtn_event("peak-B", minute(now, 180), [(timedelta(minutes=30), 1),
                                                        (timedelta(minutes=30), 3)],
                           with_dtstart=False)

        # Distribute 1: peak-A.
        vtn.distribute([peak_a])
        await wait_for(lambda: ("peak-A", "optIn") in vtn.opts, timeout_s=15,
                       what="optIn to peak-A")
        await wait_for(lambda: len(grid.received) >= 1, what="peak-A's GridEvent")
        a = grid_events(grid)[0]
        assert (a.id, a.value_kw, a.cancelled) == ("oadr-peak-A-m0-s0-i0", 1500.0, False)
        assert (a.start_ts, a.end_ts) == (minute(now, 30).timestamp(),
                                          minute(now, 150).timestamp())

        # Distribute 2 lists only peak-B: peak-A is cancelled, peak-B published.
        vtn.distribute([peak_b])
        await wait_for(lambda: ("peak-B", "optIn") in vtn.opts, timeout_s=15,
                       what="optIn to peak-B")
        await wait_for(lambda: any(e.id == a.id and e.cancelled for e in grid_events(grid)),
                       what="peak-A cancelled")
        b_ids = ["oadr-peak-B-m0-s0-i0", "oadr-peak-B-m0-s0-i1"]
        await wait_for(lambda: {e.id for e in grid_events(grid)} >= {a.id, *b_ids},
                       what="peak-B's GridEvents")
        seen = grid_events(grid)
        assert seen.index(a.model_copy(update={"cancelled": True})) > 0
        b = {e.id: e for e in seen if e.id in b_ids}
        assert [(b[i].start_ts, b[i].end_ts, b[i].value_kw) for i in b_ids] == [
            (minute(now, 180).timestamp(), minute(now, 210).timestamp(), 3000.0),
            (minute(now, 210).timestamp(), minute(now, 240).timestamp(), 200.0)]

        # Distribute 3 lists nothing: every open event is cancelled.
        vtn.distribute([])
        await wait_for(lambda: vtn.distributes == 3, timeout_s=15, what="the empty distribute")
        await wait_for(lambda: {e.id for e in grid_events(grid) if e.cancelled} >= {
            a.id, *b_ids}, what="peak-B cancelled")
        # Nothing is re-published afterwards (republish_s is 1 s): the caps stay closed.
        count = len(grid.received)
        await asyncio.sleep(2.5)
        assert len(grid.received) == count
        last = {e.id: e for e in grid_events(grid)}
        assert all(last[i].cancelled for i in (a.id, *b_ids))
        assert ven.registered.is_set()
    unlisted = [(e["event_id"], e["cancelled_grid_events"]) for e in logs
                if e["event"] == "openadr_event_unlisted"]
    assert unlisted == [("peak-A", 1), ("peak-B", 2)]


@pytest.mark.integration
async def test_events_listed_again_after_a_cancellation_are_heard(
        broker: LocalBroker, listing_vtn: ListingVtn, tasks: Any) -> None:
    """Whole lists that repeat events: a cancelled event still listed, an unlisted one back.

    openleadr 0.5 alone opts out of every event in a message that lists an event it has
    already seen cancelled (a KeyError inside its handler), and does not call the VEN
    again for an event it remembers at the same modification number.
    """
    vtn = listing_vtn
    ven, grid = await start(ven_site(broker, vtn), tasks)
    now = datetime.now(UTC)
    x = vtn_event("ev-x", minute(now, 60), [(timedelta(hours=1), 1)])
    y = vtn_event("ev-y", minute(now, 120), [(timedelta(hours=1), 2)])
    z = vtn_event("ev-z", minute(now, 240), [(timedelta(hours=1), 3)])
    x_cancelled = vtn_event("ev-x", minute(now, 60), [(timedelta(hours=1), 1)], mod=1,
                            cancelled=True)
    vtn.distribute([x])
    await wait_for(lambda: ("ev-x", "optIn") in vtn.opts, timeout_s=15, what="optIn to ev-x")
    vtn.distribute([x_cancelled])
    await wait_for(lambda: any(e.cancelled for e in grid_events(grid)), timeout_s=15,
                   what="ev-x cancelled")
    # The cancelled event is still listed beside a new one: the new one is opted into.
    vtn.distribute([x_cancelled, y])
    await wait_for(lambda: ("ev-y", "optIn") in vtn.opts or ("ev-y", "optOut") in vtn.opts,
                   timeout_s=15, what="an answer to ev-y")
    assert ("ev-y", "optOut") not in vtn.opts
    await wait_for(lambda: "oadr-ev-y-m0-s0-i0" in {e.id for e in grid_events(grid)},
                   what="ev-y's GridEvent")
    # y drops out of the list (cancelled), then comes back unchanged: it holds again.
    vtn.distribute([z])
    await wait_for(lambda: any(e.id == "oadr-ev-y-m0-s0-i0" and e.cancelled
                               for e in grid_events(grid)), timeout_s=15, what="ev-y unlisted")
    vtn.distribute([y, z])
    await wait_for(lambda: vtn.distributes == 5, timeout_s=15, what="the fifth distribute")
    await wait_for(lambda: (last := {e.id: e for e in grid_events(grid)}).get(
        "oadr-ev-y-m0-s0-i0") is not None and not last["oadr-ev-y-m0-s0-i0"].cancelled,
        timeout_s=15, what="ev-y published again")
    assert ven._known == {"ev-y": 0, "ev-z": 0}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def ven_on_broker(broker: LocalBroker, tasks: Any, clock: Clock
                        ) -> tuple[OpenAdrVen, Peer]:
    """A VEN whose MQTT side runs (no VTN: the test hands it events), and a grid listener."""
    cfg = make_site(broker, [("a", "s21", 2)], openadr={
        "vtn_url": "http://127.0.0.1:1/x", "ven_name": "v", "level_1_kw": 3000,
        "level_2_kw": 1500})
    ven = ven_of(cfg, clock=clock)
    grid = Peer(cfg, [SiteTopics("test").grid])
    tasks(grid.run(), "grid-peer")
    tasks(ven.transport.run(ven._on_mqtt), "ven-mqtt")
    await wait_for(lambda: ven.transport.connected.is_set() and grid.transport.connected.is_set(),
                   what="VEN and peer connected")
    return ven, grid


@pytest.mark.integration
async def test_open_ended_event_is_held_while_listed_and_cancelled_when_unlisted(
        broker: LocalBroker, tasks: Any) -> None:
    clock = Clock(NOW)
    ven, grid = await ven_on_broker(broker, tasks, clock)
    event = simple_event([2], step=0)  # "until cancelled", from NOW + 600
    event["active_period"]["duration"] = timedelta(0)
    assert await ven.on_event(event) == OPT_IN
    await wait_for(lambda: len(grid.received) == 1, what="the open-ended GridEvent")
    (first,) = grid_events(grid)
    assert first.end_ts == open_ended_end_ts(NOW + 600, NOW)

    # Days later, still listed: each re-publication carries an end ahead of the clock.
    for hours in (1.5, 30, 24 * 9):
        clock.now = NOW + hours * 3600
        ven._republish_once(clock.now)
        await ven._flush()
        await wait_for(lambda: grid_events(grid)[-1].end_ts >= clock.now + OPEN_ENDED_LEAD_S,
                       what=f"the hold extended at +{hours} h")
        last = grid_events(grid)[-1]
        assert last == first.model_copy(update={"end_ts": open_ended_end_ts(first.start_ts,
                                                                            clock.now)})

    # The VTN stops listing it: cancelled, at once, and not re-published after.
    assert await ven.on_distribute({"events": []}) == ["ev-1"]
    await wait_for(lambda: grid_events(grid)[-1].cancelled, what="the cancellation")
    assert grid_events(grid)[-1].id == first.id
    count = len(grid.received)
    ven._republish_once(clock.now + 60)
    await ven._flush()
    await asyncio.sleep(0.3)
    assert len(grid.received) == count and not ven._open and not ven._open_ended


@pytest.mark.integration
async def test_an_older_modification_does_not_replace_a_newer_one(
        broker: LocalBroker, tasks: Any) -> None:
    clock = Clock(NOW)
    ven, grid = await ven_on_broker(broker, tasks, clock)
    assert await ven.on_event(simple_event([1], mod=1)) == OPT_IN
    assert await ven.on_event(simple_event([2], mod=2)) == OPT_IN
    await wait_for(lambda: len(grid.received) == 3, what="mod 1, its cancellation, mod 2")
    with capture_logs() as logs:
        assert await ven.on_event(simple_event([1], mod=1)) == OPT_IN  # late or replayed
    await asyncio.sleep(0.3)
    assert [(e.id, e.version, e.value_kw, e.cancelled) for e in grid_events(grid)] == [
        ("oadr-ev-1-m1-s0-i0", 1, 3000.0, False), ("oadr-ev-1-m1-s0-i0", 1, 3000.0, True),
        ("oadr-ev-1-m2-s0-i0", 2, 1500.0, False)]
    assert [(e["event"], e["modification"], e["in_force"]) for e in logs
            if e["event"] == "openadr_event_stale"] == [("openadr_event_stale", 1, 2)]
    assert ven._known == {"ev-1": 2}
    # Cancelled (the VTN raises the number); a replay of mod 2 does not reopen it.
    assert await ven.on_event(simple_event([2], mod=3, status="cancelled")) == OPT_IN
    await wait_for(lambda: len(grid.received) == 4, what="the cancellation")
    await ven.on_event(simple_event([2], mod=2))
    await asyncio.sleep(0.3)
    assert [(e.id, e.cancelled) for e in grid_events(grid)][3:] == [("oadr-ev-1-m2-s0-i0", True)]
    assert ven._known == {} and not ven._open


@pytest.mark.integration
async def test_an_unlisted_event_that_is_over_is_not_reported_cancelled(
        broker: LocalBroker, tasks: Any) -> None:
    """An event drops out of the VTN's list when it completes: its record stays completed."""
    clock = Clock(NOW)
    ven, grid = await ven_on_broker(broker, tasks, clock)
    assert await ven.on_event(simple_event([1, 2], start=NOW + 60, step=600)) == OPT_IN
    await wait_for(lambda: len(grid.received) == 2, what="two GridEvents")
    clock.now = NOW + 60 + 900  # the first interval is over, the second is running
    listing_another = {"events": [{"event_descriptor": {"event_id": "other"}}]}
    assert await ven.on_distribute(listing_another) == ["ev-1"]
    await wait_for(lambda: len(grid.received) == 3, what="one cancellation")
    await asyncio.sleep(0.3)
    assert [(e.id, e.cancelled) for e in grid_events(grid)] == [
        ("oadr-ev-1-m0-s0-i0", False), ("oadr-ev-1-m0-s0-i1", False),
        ("oadr-ev-1-m0-s0-i1", True)]

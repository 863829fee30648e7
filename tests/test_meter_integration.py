"""Vendor meters through a real broker: the controller reads them on their native topics.

A Tasmota and a Shelly Pro 3EM (both site meters here) publish on their own topics;
good payloads set the site power, malformed ones are counted under meter_telemetry
and dropped, and the controller keeps deciding throughout. The meter field cases
(tests/fixtures/field-cases/meter-*, sources in their READMEs) go the same way: a
dead phase sheds nothing, and a Shelly EM1 device is read or counted, never silent.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from controller.config import SiteConfig
from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import PriceSignal
from tests.conftest import DEVICE_PAYLOADS, Peer, make_site, wait_for

pytestmark = pytest.mark.integration

PAYLOADS = DEVICE_PAYLOADS
FIELD_CASES = Path(__file__).parent / "fixtures" / "field-cases"
DEAD_PHASES = FIELD_CASES / "meter-tasmota-dead-phases"
EM1_CASE = FIELD_CASES / "meter-shelly-gen2-em1"
PREFIX = "site/shellypro3em-0cb815fcaff4"


def rpc(method: str, **params: Any) -> bytes:
    return json.dumps({"src": "shellypro3em-0cb815fcaff4", "dst": f"{PREFIX}/events",
                       "method": method, "params": {"ts": time.time(), **params}}).encode()


async def started(cfg: SiteConfig, tasks: Any) -> tuple[Controller, Peer]:
    """The site's controller and a peer publishing for the meters, both connected."""
    controller = Controller(cfg)
    peer = Peer(cfg)
    tasks(controller.run(), "controller")
    tasks(peer.run(), "peer")
    await wait_for(lambda: controller.transport.connected.is_set()
                   and peer.transport.connected.is_set(), what="both connected")
    return controller, peer


async def test_vendor_meters_update_site_power_and_bad_payloads_are_counted(
        broker: LocalBroker, tasks: Any) -> None:
    cfg = make_site(broker, [("a", "s21", 4)], meters=[
        {"type": "tasmota", "id": "pow", "topic": "pow-r2"},
        {"type": "shelly_gen2", "id": "pro3em", "prefix": PREFIX},
    ])
    controller, peer = await started(cfg, tasks)
    await peer.publish(controller.topics.price,
                       PriceSignal(ts=time.time(), price_usd_per_mwh=20.0).encode(), qos=1)
    invalid = controller.ingest.invalid

    def dropped(reason: str) -> int:
        return invalid[("meter_telemetry", reason)]

    # A delta before any full status has nothing to merge onto.
    await peer.publish(f"{PREFIX}/events/rpc", rpc("NotifyStatus", **{"em:0": {
        "id": 0, "total_act_power": 1.0}}), qos=1)
    await wait_for(lambda: dropped("no_base_status") == 1, what="delta before status dropped")
    assert math.isnan(controller.fleet.site.meter_power_w)

    # Tasmota: the device example, then malformed ones.
    await peer.publish("tele/pow-r2/SENSOR", (PAYLOADS / "tasmota_pow_r2_SENSOR.json")
                       .read_bytes(), qos=1)
    await wait_for(lambda: controller.fleet.site.meter_power_w == 2635.0, what="tasmota power")
    await peer.publish("tele/pow-r2/SENSOR", b'{"Time": "2024-06-01T12:00:00", "ENERGY":', qos=1)
    await peer.publish("tele/pow-r2/SENSOR", b'{"Time": "2024-06-01T12:00:00"}', qos=1)
    await peer.publish("stat/pow-r2/STATUS8", b'{"StatusSNS": {"ENERGY": {"Power": "x"}}}',
                       qos=1)
    await wait_for(lambda: (dropped("bad_json"), dropped("bad_schema"), dropped("wrong_type"))
                   == (1, 1, 1), what="three bad tasmota payloads counted")
    assert controller.fleet.site.meter_power_w == 2635.0, "bad payloads change nothing"
    status = json.dumps({"StatusSNS": {"ENERGY": {"Power": [1000, 1200, 800],
                                                  "Voltage": [120.1, 119.8, 120.3],
                                                  "Frequency": 60.01, "Total": 12.5}}})
    await peer.publish("stat/pow-r2/STATUS8", status, qos=1)
    await wait_for(lambda: controller.fleet.site.meter_power_w == 3000.0, what="tasmota arrays")
    assert controller.fleet.site.frequency_hz == 60.01

    # Shelly Pro 3EM: the device's full status, a delta merged onto it, a malformed delta.
    await peer.publish(f"{PREFIX}/status/em:0",
                       (PAYLOADS / "shelly_pro3em_status_em0.json").read_bytes(), qos=1)
    await wait_for(lambda: controller.fleet.site.meter_power_w == 2581.781, what="shelly power")
    await peer.publish(f"{PREFIX}/events/rpc", rpc("NotifyStatus", **{"em:0": {
        "id": 0, "b_act_power": 3100.4, "total_act_power": 3027.1}}), qos=1)
    await wait_for(lambda: controller.fleet.site.meter_power_w == 3027.1, what="delta merged")
    await peer.publish(f"{PREFIX}/events/rpc", rpc("NotifyStatus", **{"em:0": {
        "id": 0, "total_act_power": "3027"}}), qos=1)
    await peer.publish(f"{PREFIX}/status/em:1", b'{"id": 0, "total_act_power": 1}', qos=1)
    await wait_for(lambda: dropped("wrong_type") == 2
                   and dropped("unsupported_component") == 1, what="bad shelly payloads counted")
    assert controller.fleet.site.meter_power_w == 3027.1
    # A negative import register is no register: unknown and counted, the power applies.
    await peer.publish(f"{PREFIX}/status/emdata:0", b'{"id": 0, "total_act": -5}', qos=1)
    await peer.publish(f"{PREFIX}/events/rpc", rpc("NotifyStatus", **{"em:0": {
        "id": 0, "total_act_power": 2900.5}}), qos=1)
    await wait_for(lambda: controller.fleet.site.meter_power_w == 2900.5, what="power applies")
    assert controller.metrics.registry.get_sample_value(
        "mineops_meter_values_unknown_total",
        {"meter": "pro3em", "value": "energy_import_wh", "reason": "out_of_range"}) == 2.0
    assert dropped("out_of_range") == 0

    # Still deciding after all of that.
    decided = controller.decisions
    await wait_for(lambda: controller.decisions >= decided + 2, what="more decisions")
    assert sum(n for (kind, _), n in invalid.items() if kind == "meter_telemetry") == 6



async def test_tasmota_dead_phase_sheds_nothing_through_the_controller(
        broker: LocalBroker, tasks: Any) -> None:
    cfg = make_site(broker, [("a", "s21", 4)], meters=[
        {"type": "tasmota", "id": "pow", "topic": "shelly3em-tasmota"}])
    controller, peer = await started(cfg, tasks)
    site = controller.fleet.site

    # 60 Hz split phase, one input floating at "48.85 Hz": 15,841.7 W, no shed.
    await peer.publish("tele/shelly3em-tasmota/SENSOR", (
        DEAD_PHASES / "sensor_60hz_split_phase_one_floating.json").read_bytes(), qos=1)
    await wait_for(lambda: site.meter_power_w == pytest.approx(15_841.7), what="60 Hz case")
    assert 59.98 <= site.frequency_hz <= 59.99
    await peer.publish("tele/shelly3em-tasmota/SENSOR", json.dumps({"ENERGY": {
        "Power": [100.0, 100.0, 0.0], "Voltage": [121.0, 121.0, 0.1],
        "Frequency": [60.0, 60.0, 48.85]}}), qos=1)
    await wait_for(lambda: site.meter_power_w == 200.0, what="a second reading")
    assert controller.grid.frequency_event is None
    assert not [r for r in controller.grid.journal.rows() if r.kind == "frequency"]

    # The review's split phase: live legs at 59.98 and 58.9 Hz (their mean, 59.44 Hz,
    # used to shed). Which is the grid's is unknown: the power applies, no shed, counted.
    await peer.publish("tele/shelly3em-tasmota/SENSOR", json.dumps({"ENERGY": {
        "Power": [7930.5, 7911.2, 0.0], "Voltage": [121.4, 121.1, 0.1],
        "Frequency": [59.98, 58.9, 48.85], "Current": [66, 66, 0]}}), qos=1)
    await wait_for(lambda: site.meter_power_w == pytest.approx(15_841.7), what="legs disagree")
    assert controller.grid.frequency_event is None
    assert controller.metrics.registry.get_sample_value(
        "mineops_meter_values_unknown_total",
        {"meter": "pow", "value": "frequency_hz", "reason": "channels_disagree"}) == 1.0
    # One Voltage for the device beside a Frequency array: the loaded channel's own.
    await peer.publish("tele/shelly3em-tasmota/SENSOR", json.dumps({"ENERGY": {
        "Power": [7930.5, 0.0, 0.0], "Voltage": 240.2, "Frequency": [59.96, 136.83, 48.85],
        "Current": [33, 0, 0]}}), qos=1)
    await wait_for(lambda: site.frequency_hz == 59.96, what="the loaded channel's frequency")
    assert controller.grid.frequency_event is None

    # The control: live phases that really are under frequency do shed.
    await peer.publish("tele/shelly3em-tasmota/SENSOR", json.dumps({"ENERGY": {
        "Power": [7000.0, 7000.0, 0.0], "Voltage": [121.0, 121.0, 0.1],
        "Frequency": [59.5, 59.5, 61.0]}}), qos=1)
    await wait_for(lambda: controller.grid.frequency_event is not None, what="a real shed")
    assert site.frequency_hz == 59.5
    assert not any(kind == "meter_telemetry" for kind, _ in controller.ingest.invalid)


async def test_shelly_em1_is_read_or_counted_through_the_controller(
        broker: LocalBroker, tasks: Any) -> None:
    em1_prefix = "shellyproem50-aabbccddeeff"
    cfg = make_site(broker, [("a", "s21", 4)], meters=[
        {"type": "shelly_gen2", "id": "proem", "prefix": em1_prefix, "em1_channels": [1]},
        {"type": "shelly_gen2", "id": "pro3em", "prefix": PREFIX, "role": "aux"},
    ], grid={"frequency": {"shed_below_hz": 49.7, "restore_above_hz": 49.9}})
    controller, peer = await started(cfg, tasks)
    site = controller.fleet.site
    rpc = (EM1_CASE / "rpc_notifystatus_em1.json").read_bytes()

    def dropped(reason: str) -> int:
        return controller.ingest.invalid[("meter_telemetry", reason)]

    # The field case's NotifyStatus before any full status: counted, not silent.
    await peer.publish(f"{em1_prefix}/events/rpc", rpc, qos=1)
    await wait_for(lambda: dropped("no_base_status") == 1, what="delta before status")
    assert math.isnan(site.meter_power_w)
    # Full status, a delta moving the power, then the field case's NotifyStatus.
    await peer.publish(f"{em1_prefix}/status/em1:1", (EM1_CASE / "em1_1.json").read_bytes(),
                       qos=1)
    await wait_for(lambda: site.meter_power_w == 6769.3, what="em1:1 status")
    assert site.frequency_hz == 50.0
    await peer.publish(f"{em1_prefix}/events/rpc", json.dumps({
        "src": em1_prefix, "method": "NotifyStatus",
        "params": {"ts": time.time(), "em1:1": {"id": 1, "act_power": 7012.0}}}), qos=1)
    await wait_for(lambda: site.meter_power_w == 7012.0, what="a delta")
    await peer.publish(f"{em1_prefix}/events/rpc", rpc, qos=1)
    await wait_for(lambda: site.meter_power_w == 6769.3, what="em1:1 NotifyStatus")
    # The same notification at a meter set up for em:0: counted, on its topic.
    await peer.publish(f"{PREFIX}/events/rpc", rpc, qos=1)
    await wait_for(lambda: dropped("unsupported_component") == 1, what="em1 on an em:0 meter")
    assert site.meter_power_w == 6769.3
    assert controller.grid.frequency_event is None

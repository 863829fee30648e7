"""Vendor meters through a real broker: the controller reads them on their native topics.

A Tasmota and a Shelly Pro 3EM (both site meters here) publish on their own topics;
good payloads set the site power, malformed ones are counted under meter_telemetry
and dropped, and the controller keeps deciding throughout.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest

from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import PriceSignal
from tests.conftest import DEVICE_PAYLOADS, Peer, make_site, wait_for

pytestmark = pytest.mark.integration

PAYLOADS = DEVICE_PAYLOADS
PREFIX = "site/shellypro3em-0cb815fcaff4"


def rpc(method: str, **params: Any) -> bytes:
    return json.dumps({"src": "shellypro3em-0cb815fcaff4", "dst": f"{PREFIX}/events",
                       "method": method, "params": {"ts": time.time(), **params}}).encode()


async def test_vendor_meters_update_site_power_and_bad_payloads_are_counted(
        broker: LocalBroker, tasks: Any) -> None:
    cfg = make_site(broker, [("a", "s21", 4)], meters=[
        {"type": "tasmota", "id": "pow", "topic": "pow-r2"},
        {"type": "shelly_gen2", "id": "pro3em", "prefix": PREFIX},
    ])
    controller = Controller(cfg)
    peer = Peer(cfg)
    tasks(controller.run(), "controller")
    tasks(peer.run(), "peer")
    await wait_for(lambda: controller.transport.connected.is_set()
                   and peer.transport.connected.is_set(), what="both connected")
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
    await peer.publish(f"{PREFIX}/status/emdata:0", b'{"id": 0, "total_act": -5}', qos=1)
    await wait_for(lambda: dropped("wrong_type") == 2 and dropped("out_of_range") == 1,
                   what="bad shelly payloads counted")
    assert controller.fleet.site.meter_power_w == 3027.1

    # Still deciding after all of that.
    decided = controller.decisions
    await wait_for(lambda: controller.decisions >= decided + 2, what="more decisions")
    assert sum(n for (kind, _), n in invalid.items() if kind == "meter_telemetry") == 6

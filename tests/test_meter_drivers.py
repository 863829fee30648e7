"""Meter drivers: real device examples, payloads built per the vendors' docs, bad input.

The examples are fixtures in tests/fixtures/device-payloads/ (sources in its README.md).
Payloads built here follow the vendors' documentation: Tasmota's ENERGY block (kWh
registers, arrays on multi-channel devices, Frequency, ExportActive), Shelly Gen2 EM /
EMData status and NotifyStatus, Shelly Gen1 per-value emeter topics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from controller.cli.main import main
from controller.config import (
    MeterConfig,
    ShellyGen1Meter,
    ShellyGen2Meter,
    SiteConfig,
    TasmotaMeter,
)
from controller.daemon.loop import Controller
from controller.protocol.payloads import MeterTelemetry, PayloadError
from drivers.meters import DRIVERS, MeterReading, MeterRouter, UnknownDriverError, driver_type
from drivers.meters.mineops import MineopsDriver
from drivers.meters.shelly_gen1 import ShellyGen1Driver
from drivers.meters.shelly_gen2 import EM_FIELDS, ShellyGen2Driver
from drivers.meters.tasmota import TasmotaDriver
from tests.conftest import DEVICE_PAYLOADS, make_site

TASMOTA_SENSOR = DEVICE_PAYLOADS / "tasmota_pow_r2_SENSOR.json"
SHELLY_EM0 = DEVICE_PAYLOADS / "shelly_pro3em_status_em0.json"

KEYS = ["power_w", "energy_import_wh", "energy_export_wh", "voltage_v", "current_a",
        "power_factor", "frequency_hz"]


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def tasmota(topic: str = "pow", **kw: Any) -> TasmotaDriver:
    return TasmotaDriver(TasmotaMeter(type="tasmota", id="pow", topic=topic, **kw))


def gen2(prefix: str = "shellypro3em-site") -> ShellyGen2Driver:
    return ShellyGen2Driver(ShellyGen2Meter(type="shelly_gen2", id="pro3em", prefix=prefix))


def gen1(channels: list[int] | None = None) -> ShellyGen1Driver:
    extra = {} if channels is None else {"channels": channels}
    return ShellyGen1Driver(ShellyGen1Meter(type="shelly_gen1", id="em3",
                                            device_id="shellyem3-ECFABCC7F0F0", **extra))


def reason_of(driver: Any, topic: str, raw: bytes) -> str:
    with pytest.raises(PayloadError) as e:
        driver.decode(topic, raw)
    return e.value.reason


# -- Tasmota --------------------------------------------------------------------------


def test_tasmota_shared_sensor_example() -> None:
    r = tasmota().decode("tele/pow/SENSOR", TASMOTA_SENSOR.read_bytes())
    assert r == MeterReading(power_w=2635.0, energy_import_wh=6294.0, energy_export_wh=None,
                             voltage_v=227.0, current_a=11.661, power_factor=0.99,
                             frequency_hz=None)


@pytest.mark.parametrize("leaf", ["STATUS8", "STATUS10"])
def test_tasmota_status_wraps_the_same_energy_block(leaf: str) -> None:
    sensor = json.loads(TASMOTA_SENSOR.read_bytes())
    d = tasmota()
    assert d.decode(f"stat/pow/{leaf}", js({"StatusSNS": sensor})) == d.decode(
        "tele/pow/SENSOR", TASMOTA_SENSOR.read_bytes())


def test_tasmota_three_phase_arrays_are_summed_and_averaged() -> None:
    # A three-phase meter under Tasmota: one value per phase; registers in kWh.
    energy = {"TotalStartTime": "2024-01-01T00:00:00", "Total": 1234.5, "Yesterday": 40.1,
              "Today": 12.3, "Power": [1000, 2000, -500], "ApparentPower": [1100, 2100, 600],
              "ReactivePower": [458, 640, 331], "Factor": [0.91, 0.95, 0.83],
              "Frequency": 50.02, "Voltage": [230, 231, 229], "Current": [4.8, 9.1, 2.6],
              "ExportActive": [0.1, 0.2, 0.3]}
    r = tasmota().decode("tele/pow/SENSOR", js({"Time": "2024-06-01T12:00:00", "ENERGY": energy}))
    assert r is not None
    assert r.power_w == 2500.0
    assert r.energy_import_wh == pytest.approx(1_234_500.0)
    assert r.energy_export_wh == pytest.approx(600.0)
    assert r.voltage_v == pytest.approx(230.0)
    assert r.current_a == pytest.approx(16.5)
    assert r.power_factor == pytest.approx(2500 / 3800), "total P over total S, not a mean"
    assert r.frequency_hz == pytest.approx(50.02)


def test_tasmota_per_phase_totals_and_frequencies() -> None:
    energy = {"Total": [1.0, 2.0, 3.5], "Power": [10, 20, 30], "Frequency": [59.9, 60.0, 60.1],
              "Voltage": [120, 121, 119]}
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": energy}))
    assert r is not None
    assert r.energy_import_wh == pytest.approx(6500.0)
    assert r.frequency_hz == pytest.approx(60.0)
    assert r.power_factor is None and r.current_a is None and r.energy_export_wh is None


def test_tasmota_two_channel_device_without_apparent_power_averages_factors() -> None:
    energy = {"Total": 0.5, "Power": [100, 50], "Factor": [0.8, 0.6], "Voltage": 230,
              "Current": [0.5, 0.3]}
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": energy}))
    assert r is not None
    assert (r.power_w, r.voltage_v) == (150.0, 230.0)
    assert r.power_factor == pytest.approx(0.7)
    assert r.current_a == pytest.approx(0.8)


def test_tasmota_export_is_negative_power() -> None:
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": {"Power": -1500, "Total": 3.0,
                                                           "ExportActive": 7.25}}))
    assert r is not None and r.power_w == -1500.0 and r.energy_export_wh == 7250.0


def test_tasmota_custom_full_topic() -> None:
    d = tasmota(full_topic="site/%topic%/%prefix%/")
    assert d.subscriptions() == ["site/pow/tele/SENSOR", "site/pow/stat/STATUS8",
                                 "site/pow/stat/STATUS10"]
    assert d.decode("site/pow/tele/SENSOR", TASMOTA_SENSOR.read_bytes()) is not None


@pytest.mark.parametrize(("raw", "reason"), [
    (b"{not json", "bad_json"),
    (b"", "bad_json"),
    (b'{"ENERGY": {"Power": NaN}}', "bad_json"),
    (b'[1, 2]', "wrong_type"),
    (b'{"Time": "2024-06-01T12:00:00"}', "bad_schema"),
    (b'{"ENERGY": "on"}', "bad_schema"),
    (b'{"ENERGY": {"Total": 1.0}}', "bad_schema"),
    (b'{"ENERGY": {"Power": "2635"}}', "wrong_type"),
    (b'{"ENERGY": {"Power": true}}', "wrong_type"),
    (b'{"ENERGY": {"Power": [1, null, 3]}}', "wrong_type"),
    (b'{"ENERGY": {"Power": []}}', "bad_value"),
    (b'{"ENERGY": {"Power": 100, "Frequency": 0}}', "out_of_range"),
    (b'{"ENERGY": {"Power": 100, "Total": -1}}', "out_of_range"),
    (b'{"ENERGY": {"Power": 1e300}}', "out_of_range"),
    (b'{"ENERGY": {"Power": 100, "Factor": 1.7}}', "out_of_range"),
    (b'{"ENERGY": {"Power": 1' + b"0" * 400 + b"}}", "out_of_range"),
    (b'{"ENERGY": {"Power": 1, "x": "' + b"a" * 20_000 + b'"}}', "oversized"),
])
def test_tasmota_malformed(raw: bytes, reason: str) -> None:
    assert reason_of(tasmota(), "tele/pow/SENSOR", raw) == reason


def test_tasmota_status_without_statussns_and_foreign_topic() -> None:
    assert reason_of(tasmota(), "stat/pow/STATUS8", TASMOTA_SENSOR.read_bytes()) == "bad_schema"
    assert reason_of(tasmota(), "tele/other/SENSOR", TASMOTA_SENSOR.read_bytes()) == (
        "unknown_topic")


# -- Shelly Gen2 / Gen3 --------------------------------------------------------------

P = "shellypro3em-site"
EMDATA = {"id": 0, "a_total_act_energy": 41000.25, "a_total_act_ret_energy": 2100.5,
          "b_total_act_energy": 52000.5, "b_total_act_ret_energy": 0.0,
          "c_total_act_energy": 30000.0, "c_total_act_ret_energy": 120.0,
          "total_act": 123000.75, "total_act_ret": 2220.5}


def notify(method: str, **components: Any) -> bytes:
    return js({"src": P, "dst": f"{P}/events", "method": method,
               "params": {"ts": 1718000000.25, **components}})


def test_shelly_gen2_shared_em_example() -> None:
    r = gen2().decode(f"{P}/status/em:0", SHELLY_EM0.read_bytes())
    assert r is not None
    assert r.power_w == 2581.781
    assert r.current_a == 12.259
    assert r.voltage_v == pytest.approx((230.5 + 228.5 + 232.1) / 3)
    assert r.frequency_hz == 50.0
    assert r.power_factor == pytest.approx(2581.781 / 2806.935)
    assert r.energy_import_wh is None and r.energy_export_wh is None


def test_shelly_gen2_emdata_registers_in_wh() -> None:
    d = gen2()
    assert d.decode(f"{P}/status/emdata:0", js(EMDATA)) is None, "no power known yet"
    r = d.decode(f"{P}/status/em:0", SHELLY_EM0.read_bytes())
    assert r is not None
    assert (r.energy_import_wh, r.energy_export_wh) == (123000.75, 2220.5)
    r2 = d.decode(f"{P}/status/emdata:0", js({**EMDATA, "total_act": 123100.0}))
    assert r2 is not None and r2.energy_import_wh == 123100.0 and r2.power_w == 2581.781


def test_shelly_gen2_notifystatus_delta_merges_onto_last_full_status() -> None:
    d = gen2()
    d.decode(f"{P}/status/em:0", SHELLY_EM0.read_bytes())
    d.decode(f"{P}/status/emdata:0", js(EMDATA))
    r = d.decode(f"{P}/events/rpc", notify(
        "NotifyStatus", **{"em:0": {"id": 0, "b_act_power": 3100.4, "b_current": 13.5,
                                    "total_act_power": 3027.1, "total_current": 14.151,
                                    "total_aprt_power": 3250.0}}))
    assert r is not None
    assert r.power_w == 3027.1 and r.current_a == 14.151
    assert r.voltage_v == pytest.approx((230.5 + 228.5 + 232.1) / 3), "unchanged fields kept"
    assert r.energy_import_wh == 123000.75
    r = d.decode(f"{P}/events/rpc", notify("NotifyStatus", **{"emdata:0": {
        "id": 0, "total_act": 123001.5}}))
    assert r is not None and r.energy_import_wh == 123001.5 and r.power_w == 3027.1
    assert r.energy_export_wh == 2220.5


def test_shelly_gen2_delta_before_any_full_status_is_an_error() -> None:
    d = gen2()
    delta = notify("NotifyStatus", **{"em:0": {"id": 0, "total_act_power": 10.0}})
    assert reason_of(d, f"{P}/events/rpc", delta) == "no_base_status"
    assert d.status == {}
    d.decode(f"{P}/status/em:0", SHELLY_EM0.read_bytes())
    r = d.decode(f"{P}/events/rpc", delta)
    assert r is not None and r.power_w == 10.0
    only_energy = notify("NotifyStatus", **{"emdata:0": {"id": 0, "total_act": 5.0}})
    assert reason_of(d, f"{P}/events/rpc", only_energy) == "no_base_status"


def test_shelly_gen2_full_status_notification_and_other_notifications() -> None:
    d = gen2()
    em = json.loads(SHELLY_EM0.read_bytes())
    full = notify("NotifyFullStatus", **{"em:0": em, "emdata:0": EMDATA,
                                         "sys": {"mac": "0CB815FCAFF4", "uptime": 1234}})
    r = d.decode(f"{P}/events/rpc", full)
    assert r is not None and r.power_w == 2581.781 and r.energy_import_wh == 123000.75
    event = js({"src": P, "dst": f"{P}/events", "method": "NotifyEvent",
                "params": {"ts": 1718000001.0, "events": [{"component": "sys",
                                                           "event": "scheduled_restart"}]}})
    assert d.decode(f"{P}/events/rpc", event) is None
    assert d.decode(f"{P}/events/rpc", notify("NotifyStatus", **{"switch:0": {
        "id": 0, "output": True}})) is None


def test_shelly_gen2_export_phase_and_missing_totals() -> None:
    em = {"id": 0, "a_act_power": -1200.0, "a_aprt_power": 1250.0, "a_voltage": 231.0,
          "a_current": 5.4, "a_pf": -0.96, "a_freq": 60.0, "total_act_power": -1200.0}
    r = gen2().decode(f"{P}/status/em:0", js(em))
    assert r is not None
    assert r.power_w == -1200.0 and r.current_a == 5.4 and r.frequency_hz == 60.0
    assert r.power_factor == -0.96, "one phase: the device's own factor"


@pytest.mark.parametrize(("topic", "raw", "reason"), [
    (f"{P}/status/em:0", b"{", "bad_json"),
    (f"{P}/status/em:0", b'{"id": 0, "a_act_power": 5}', "bad_schema"),
    (f"{P}/status/em:0", b'{"id": 0, "total_act_power": "5"}', "wrong_type"),
    (f"{P}/status/em:0", b'{"id": 0, "total_act_power": 5, "a_freq": 0}', "out_of_range"),
    (f"{P}/status/em:0", b'{"id": 0, "total_act_power": 5, "a_voltage": Infinity}', "bad_json"),
    (f"{P}/status/emdata:0", b'{"id": 0, "total_act_ret": 5}', "bad_schema"),
    (f"{P}/events/rpc", b'{"params": {}}', "bad_schema"),
    (f"{P}/events/rpc", b'{"method": "NotifyStatus", "params": [1]}', "bad_schema"),
    (f"{P}/events/rpc", b'{"method": "NotifyStatus", "params": {"em:0": 7}}', "wrong_type"),
    (f"{P}/status/em:1", b'{"id": 1, "total_act_power": 5}', "unknown_topic"),
])
def test_shelly_gen2_malformed(topic: str, raw: bytes, reason: str) -> None:
    assert reason_of(gen2(), topic, raw) == reason


def test_shelly_gen2_bad_delta_leaves_the_state_as_it_was() -> None:
    d = gen2()
    before = d.decode(f"{P}/status/em:0", SHELLY_EM0.read_bytes())
    bad = notify("NotifyStatus", **{"em:0": {"id": 0, "total_act_power": 1.0, "a_pf": "x"}})
    assert reason_of(d, f"{P}/events/rpc", bad) == "wrong_type"
    out_of_range = notify("NotifyStatus", **{"em:0": {"id": 0, "a_freq": 7.0, "b_freq": 7.0,
                                                      "c_freq": 7.0}})
    assert reason_of(d, f"{P}/events/rpc", out_of_range) == "out_of_range"
    ok = notify("NotifyStatus", **{"em:0": {"id": 0, "a_voltage": 230.5}})
    assert d.decode(f"{P}/events/rpc", ok) == before


def test_shelly_gen2_state_is_bounded_to_known_fields() -> None:
    em = {**json.loads(SHELLY_EM0.read_bytes()), **{f"junk_{i}": i for i in range(300)}}
    d = gen2()
    d.decode(f"{P}/status/em:0", js(em))
    d.decode(f"{P}/events/rpc", notify("NotifyStatus", **{"em:0": {f"more_{i}": i
                                                                    for i in range(300)}}))
    assert set(d.status) == {"em:0"}
    assert set(d.status["em:0"]) <= EM_FIELDS


# -- Shelly Gen1 EM / 3EM ------------------------------------------------------------

G1 = "shellies/shellyem3-ECFABCC7F0F0/emeter"


def publish_3em(d: ShellyGen1Driver, channel: int, **values: str) -> MeterReading | None:
    out = None
    for quantity, text in values.items():
        out = d.decode(f"{G1}/{channel}/{quantity}", text.encode())
    return out


def test_shelly_gen1_3em_waits_for_every_channel_then_merges() -> None:
    d = gen1()
    assert publish_3em(d, 0, power="1000.50", pf="0.95", current="4.60", voltage="229.10",
                       total="1500000.5", total_returned="250.0") is None
    assert publish_3em(d, 1, power="2000.00", pf="0.97", current="9.00", voltage="230.40",
                       total="2500000.0", total_returned="0.0") is None
    r = publish_3em(d, 2, power="-300.25", pf="-0.80", current="1.70", voltage="231.00",
                    total="1000.0", total_returned="90000.5")
    assert r is not None
    assert r.power_w == pytest.approx(2700.25)
    assert r.energy_import_wh == pytest.approx(4001000.5)
    assert r.energy_export_wh == pytest.approx(90250.5)
    assert r.voltage_v == pytest.approx((229.1 + 230.4 + 231.0) / 3)
    assert r.current_a == pytest.approx(15.3)
    va = 229.1 * 4.6 + 230.4 * 9.0 + 231.0 * 1.7
    assert r.power_factor == pytest.approx(2700.25 / va)
    assert r.frequency_hz is None
    r = d.decode(f"{G1}/1/power", b"2500")
    assert r is not None and r.power_w == pytest.approx(3200.25), "one value merged in"


def test_shelly_gen1_em_single_channel_with_reactive_power() -> None:
    d = gen1(channels=[0])
    d.decode(f"{G1}/0/reactive_power", b"-120.5")
    d.decode(f"{G1}/0/voltage", b"236.1")
    d.decode(f"{G1}/0/total", b"88123.4")
    r = d.decode(f"{G1}/0/power", b"850.2")
    assert r is not None
    assert r.power_w == 850.2 and r.energy_import_wh == 88123.4 and r.voltage_v == 236.1
    assert r.power_factor == pytest.approx(850.2 / math.hypot(850.2, 120.5))
    assert r.energy_export_wh is None and r.current_a is None
    # The other channel (another circuit) and the per-report counters are not the reading.
    assert d.decode(f"{G1}/1/power", b"99") is None
    assert d.decode(f"{G1}/0/energy", b"1234") is None
    assert d.decode(f"{G1}/0/returned_energy", b"0") is None
    assert set(d.values) == {0}


@pytest.mark.parametrize(("topic", "raw", "reason"), [
    (f"{G1}/0/power", b"abc", "bad_value"),
    (f"{G1}/0/power", b"", "bad_value"),
    (f"{G1}/0/power", b"nan", "out_of_range"),
    (f"{G1}/0/power", b"inf", "out_of_range"),
    (f"{G1}/0/pf", b"1.5", "out_of_range"),
    (f"{G1}/0/total", b"-5", "out_of_range"),
    (f"{G1}/0/power", b"1" * 64, "oversized"),
    (f"{G1}/x/power", b"1", "unknown_topic"),
    (f"{G1}/0/power/extra", b"1", "unknown_topic"),
    ("shellies/other/emeter/0/power", b"1", "unknown_topic"),
])
def test_shelly_gen1_malformed(topic: str, raw: bytes, reason: str) -> None:
    assert reason_of(gen1(channels=[0]), topic, raw) == reason


def test_shelly_gen1_bad_value_leaves_the_state_as_it_was() -> None:
    d = gen1(channels=[0])
    good = d.decode(f"{G1}/0/power", b"100")
    assert reason_of(d, f"{G1}/0/power", b"garbage") == "bad_value"
    assert d.decode(f"{G1}/0/energy", b"1") is None
    assert d.values[0] == {"power": 100.0} and good is not None


# -- the project's own format, registry, config, router -----------------------------


def test_mineops_driver_uses_the_project_payload() -> None:
    d = MineopsDriver(MineopsDriver.config_from_topics(["mineops/s/meter/poi/telemetry"]))
    r = d.decode("mineops/s/meter/poi/telemetry",
                 MeterTelemetry(ts=1.0, power_w=5e5, frequency_hz=59.95).encode())
    assert r == MeterReading(power_w=5e5, frequency_hz=59.95)
    assert reason_of(d, "mineops/s/meter/poi/telemetry", b'{"v":1,"ts":1}') == "bad_schema"


def test_registry_knows_every_config_type_and_names_them_on_a_typo() -> None:
    union = get_args(MeterConfig)[0]
    config_types = {get_args(m.model_fields["type"].annotation)[0] for m in get_args(union)}
    assert set(DRIVERS) == config_types
    with pytest.raises(UnknownDriverError, match="known drivers: mineops, shelly_gen1, "
                       "shelly_gen2, tasmota"):
        driver_type("tasmoto")


def site(meters: list[dict[str, Any]]) -> SiteConfig:
    return SiteConfig.model_validate({
        "site_id": "t", "fleet": {"groups": [{"name": "a", "model": "s21", "count": 2}]},
        "power_cap_kw": 100, "hashprice_usd_per_ph_day": 40, "meters": meters})


def test_config_picks_the_model_by_type() -> None:
    cfg = site([{"type": "mineops", "id": "poi"},
                {"type": "tasmota", "id": "pow", "topic": "pow-r2", "role": "aux"},
                {"type": "shelly_gen2", "id": "p3", "prefix": "site/shellypro3em-0cb8"},
                {"type": "shelly_gen1", "id": "em", "device_id": "shellyem-B9E8B7",
                 "channels": [1, 0]}])
    kinds = [type(m) for m in cfg.meters]
    assert kinds[1:] == [TasmotaMeter, ShellyGen2Meter, ShellyGen1Meter]
    assert cfg.meters[3].channels == [0, 1]  # type: ignore[union-attr]


@pytest.mark.parametrize(("meters", "match"), [
    ([{"type": "tasmoto", "id": "x", "topic": "t"}], "tasmota"),
    ([{"type": "tasmota", "id": "x", "topic": "t", "prefix": "p"}], "Extra inputs"),
    ([{"type": "tasmota", "id": "x", "topic": "a/b"}], "pattern"),
    ([{"type": "tasmota", "id": "x", "topic": "t", "full_topic": "%topic%/"}], "%prefix%"),
    ([{"type": "shelly_gen2", "id": "x", "prefix": "a/+/b"}], "pattern"),
    ([{"type": "shelly_gen1", "id": "x", "device_id": "d", "channels": [0, 0]}], "twice"),
    ([{"type": "shelly_gen1", "id": "x", "device_id": "d", "channels": [3]}], "less than"),
    ([{"type": "mineops", "id": "x"}, {"type": "tasmota", "id": "x", "topic": "t"}], "twice"),
    ([{"type": "tasmota", "id": "x", "topic": "t"}, {"type": "tasmota", "id": "y",
                                                     "topic": "t"}], "same device"),
])
def test_config_rejects_bad_meters(meters: list[dict[str, Any]], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        site(meters)


def test_router_claims_only_vendor_topics_of_configured_meters() -> None:
    cfg = site([{"type": "mineops", "id": "poi"},
                {"type": "tasmota", "id": "pow", "topic": "pow", "role": "aux"},
                {"type": "shelly_gen2", "id": "p3", "prefix": P},
                {"type": "shelly_gen1", "id": "em", "device_id": "shellyem3-ECFABCC7F0F0"}])
    router = MeterRouter(cfg.meters)
    assert router.subscriptions() == [
        "tele/pow/SENSOR", "stat/pow/STATUS8", "stat/pow/STATUS10", f"{P}/status/em:0",
        f"{P}/status/emdata:0", f"{P}/events/rpc", f"{G1}/+/+"]
    for topic in ("tele/pow/SENSOR", f"{P}/events/rpc", f"{G1}/2/total"):
        assert router.claims(topic)
    for topic in ("mineops/t/meter/poi/telemetry", "mineops/t/miner/a-0001/telemetry",
                  "tele/other/SENSOR", f"{P}/status/switch:0"):
        assert not router.claims(topic)
    routed = router.decode("tele/pow/SENSOR", TASMOTA_SENSOR.read_bytes())
    assert routed is not None and (routed.meter_id, routed.role) == ("pow", "aux")


def test_router_refuses_two_meters_on_one_topic() -> None:
    a = TasmotaMeter(type="tasmota", id="a", topic="t")
    b = TasmotaMeter(type="tasmota", id="b", topic="x", full_topic="%prefix%/t/")
    with pytest.raises(ValueError, match="'a' and 'b' both read tele/t/SENSOR"):
        MeterRouter([a, b])


def test_reading_converts_to_the_project_message() -> None:
    r = MeterReading(power_w=1.5, energy_import_wh=2.0, current_a=3.0, power_factor=0.9,
                     frequency_hz=60.0)
    m = r.telemetry(ts=10.0)
    assert (m.power_w, m.energy_import_wh, m.frequency_hz, m.ts) == (1.5, 2.0, 60.0, 10.0)
    assert list(r.as_dict()) == KEYS


# -- through the controller, without a broker ---------------------------------------


class _FakeAddress:
    """make_site reads host and port only; nothing connects in these tests."""

    host = "127.0.0.1"
    port = 1


def test_controller_applies_site_meters_and_counts_bad_vendor_payloads() -> None:
    cfg = make_site(_FakeAddress(), [("a", "s21", 2)], meters=[  # type: ignore[arg-type]
        {"type": "tasmota", "id": "pow", "topic": "pow"},
        {"type": "shelly_gen2", "id": "p3", "prefix": P, "role": "aux"}])
    c = Controller(cfg)
    assert "tele/pow/SENSOR" in c.ingest.subscriptions()
    assert f"{P}/events/rpc" in c.ingest.subscriptions()
    c.on_message("tele/pow/SENSOR", TASMOTA_SENSOR.read_bytes())
    assert c.fleet.site.meter_power_w == 2635.0
    c.on_message(f"{P}/status/em:0", SHELLY_EM0.read_bytes())
    assert c.fleet.site.meter_power_w == 2635.0, "an aux meter is decoded, not the site power"
    c.on_message("tele/pow/SENSOR", b'{"ENERGY": {"Power": "lots"}}')
    c.on_message(f"{P}/events/rpc", b"{")
    assert c.ingest.invalid[("meter_telemetry", "wrong_type")] == 1
    assert c.ingest.invalid[("meter_telemetry", "bad_json")] == 1
    c.on_message("tele/pow/SENSOR", js({"ENERGY": {"Power": 900, "Frequency": 59.98}}))
    assert (c.fleet.site.meter_power_w, c.fleet.site.frequency_hz) == (900.0, 59.98)


# -- mineops decode ------------------------------------------------------------------


def decode_cli(capsys: pytest.CaptureFixture[str], driver: str,
               *pairs: tuple[str, Path]) -> tuple[int, list[Any], str]:
    argv = ["decode", "--driver", driver]
    for topic, path in pairs:
        argv += ["--topic", topic, "--payload", str(path)]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_decode_cli_shared_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = decode_cli(capsys, "tasmota", ("tele/pow-r2/SENSOR", TASMOTA_SENSOR))
    assert code == 0
    assert lines == [{"power_w": 2635.0, "energy_import_wh": 6294.0, "energy_export_wh": None,
                      "voltage_v": 227.0, "current_a": 11.661, "power_factor": 0.99,
                      "frequency_hz": None}]
    code, lines, _ = decode_cli(capsys, "shelly_gen2", (f"{P}/status/em:0", SHELLY_EM0))
    assert code == 0 and list(lines[0]) == KEYS and lines[0]["power_w"] == 2581.781


def test_decode_cli_merges_a_delta_onto_the_status_before_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    emdata = tmp_path / "emdata.json"
    emdata.write_bytes(js(EMDATA))
    delta = tmp_path / "delta.json"
    delta.write_bytes(notify("NotifyStatus", **{"em:0": {"id": 0, "total_act_power": 99.5}}))
    code, lines, _ = decode_cli(capsys, "shelly_gen2", (f"{P}/status/emdata:0", emdata),
                                (f"{P}/status/em:0", SHELLY_EM0), (f"{P}/events/rpc", delta))
    assert code == 0
    assert lines[0] is None
    assert lines[1]["power_w"] == 2581.781 and lines[1]["energy_import_wh"] == 123000.75
    assert lines[2]["power_w"] == 99.5 and lines[2]["current_a"] == 12.259


def test_decode_cli_gen1_channels_from_the_topics(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = []
    for i, (channel, quantity, text) in enumerate(
            [(0, "power", "100"), (1, "power", "50.5"), (1, "total", "10")]):
        f = tmp_path / f"{i}.txt"
        f.write_text(text)
        pairs.append((f"{G1}/{channel}/{quantity}", f))
    code, lines, _ = decode_cli(capsys, "shelly_gen1", *pairs)
    assert code == 0
    assert lines[0] is None and lines[1]["power_w"] == 150.5 and lines[2]["power_w"] == 150.5


@pytest.mark.parametrize("case", [
    ("tasmota", "tele/pow/SENSOR", '{"ENERGY": {}}', "bad_schema: ENERGY.Power: missing"),
    ("shelly_gen2", f"{P}/events/rpc", '{"method": "NotifyStatus", "params": {"em:0": {}}}',
     "no_base_status"),
    ("tasmota", "stat/pow/RESULT", "{}", "unknown_topic"),
    ("tasmoto", "tele/pow/SENSOR", "{}", "known drivers: mineops, shelly_gen1"),
])
def test_decode_cli_fails_with_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], case: tuple[str, str, str, str],
) -> None:
    driver, topic, text, message = case
    f = tmp_path / "p.json"
    f.write_text(text)
    code, lines, err = decode_cli(capsys, driver, (topic, f))
    assert code == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith("mineops decode: ") and message in err


def test_decode_cli_needs_one_topic_per_payload(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["decode", "--driver", "tasmota", "--topic", "tele/a/SENSOR", "--topic",
                 "tele/a/SENSOR", "--payload", str(TASMOTA_SENSOR)])
    assert code == 2 and "2 --topic but 1 --payload" in capsys.readouterr().err
    code = main(["decode", "--driver", "tasmota", "--topic", "tele/a/SENSOR", "--payload",
                 "/nonexistent/p.json"])
    assert code == 2 and "cannot read" in capsys.readouterr().err

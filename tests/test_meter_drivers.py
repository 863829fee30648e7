"""Meter drivers: real device examples, payloads built per the vendors' docs, bad input.

The examples are fixtures in tests/fixtures/device-payloads/ (sources in its README.md);
inputs mineops once got wrong are in tests/fixtures/field-cases/meter-*/ (each with a
README naming its source and the right answer). Payloads built here follow the vendors'
documentation: Tasmota's ENERGY block (kWh registers, arrays on multi-channel devices,
Frequency, ImportActive, ExportActive), Shelly Gen2 EM / EMData and EM1 / EM1Data
status and NotifyStatus, Shelly Gen1 per-value emeter topics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from controller.cli.main import main
from controller.config import SiteConfig
from controller.daemon.loop import Controller
from controller.protocol.payloads import MeterTelemetry, PayloadError
from drivers.meters import (
    DRIVERS,
    MeterConfig,
    MeterReading,
    MeterRouter,
    UnknownDriverError,
    driver_type,
)
from drivers.meters.mineops import MineopsDriver
from drivers.meters.shelly_gen1 import ShellyGen1Driver, ShellyGen1Meter
from drivers.meters.shelly_gen2 import EM_FIELDS, ShellyGen2Driver, ShellyGen2Meter
from drivers.meters.tasmota import TasmotaDriver, TasmotaMeter
from tests.conftest import DEVICE_PAYLOADS, make_site

TASMOTA_SENSOR = DEVICE_PAYLOADS / "tasmota_pow_r2_SENSOR.json"
SHELLY_EM0 = DEVICE_PAYLOADS / "shelly_pro3em_status_em0.json"
FIELD_CASES = Path(__file__).parent / "fixtures" / "field-cases"
DEAD_PHASES = FIELD_CASES / "meter-tasmota-dead-phases"
IMPORT_REGISTER = FIELD_CASES / "meter-tasmota-import-register" / "sensor.json"
EM1_CASE = FIELD_CASES / "meter-shelly-gen2-em1"

KEYS = ["power_w", "energy_import_wh", "energy_export_wh", "voltage_v", "current_a",
        "power_factor", "frequency_hz"]


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def tasmota(topic: str = "pow", **kw: Any) -> TasmotaDriver:
    return TasmotaDriver(TasmotaMeter(type="tasmota", id="pow", topic=topic, **kw))


def gen2(prefix: str = "shellypro3em-site",
         em1_channels: list[int] | None = None) -> ShellyGen2Driver:
    return ShellyGen2Driver(ShellyGen2Meter(type="shelly_gen2", id="pro3em", prefix=prefix,
                                            em1_channels=em1_channels))


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
    # A three-phase meter under Tasmota: one value per phase; registers in kWh; every
    # phase live, so voltage and frequency are theirs.
    energy = {"TotalStartTime": "2024-01-01T00:00:00", "Total": 1234.5, "Yesterday": 40.1,
              "Today": 12.3, "Power": [1000, 2000, -500], "ApparentPower": [1100, 2100, 600],
              "ReactivePower": [458, 640, 331], "Factor": [0.91, 0.95, 0.83],
              "Frequency": 50.02, "Voltage": [230, 231, 229], "Current": [4.8, 9.1, 2.6],
              "ExportActive": [0.1, 0.2, 0.3]}
    r = tasmota().decode("tele/pow/SENSOR", js({"Time": "2024-06-01T12:00:00", "ENERGY": energy}))
    assert r is not None
    assert r.power_w == 2500.0
    assert r.energy_import_wh is None, "Total beside ExportActive is net of export"
    assert r.energy_export_wh == pytest.approx(600.0)
    assert r.voltage_v == pytest.approx(230.0)
    assert r.current_a == pytest.approx(16.5)
    assert r.power_factor == pytest.approx(2500 / 3800), "total P over total S, not a mean"
    assert r.frequency_hz == pytest.approx(50.02)


def test_tasmota_per_phase_totals_and_frequencies() -> None:
    energy = {"Total": [1.0, 2.0, 3.5], "Power": [10, 20, 30],
              "Frequency": [59.99, 60.0, 60.02], "Voltage": [120, 121, 119]}
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": energy}))
    assert r is not None
    assert r.energy_import_wh == pytest.approx(6500.0), "no export measured: Total is import"
    assert r.frequency_hz == 60.0, "the median of the live phases, which agree"
    assert r.voltage_v == pytest.approx(120.0)
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
    assert r.energy_import_wh is None


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
    (b'{"ENERGY": {"Power": [1, 2, 3], "Voltage": [230, 230]}}', "bad_value"),
    (b'{"ENERGY": {"Power": 1e300}}', "out_of_range"),
    (b'{"ENERGY": {"Power": -3e9, "Total": 1}}', "out_of_range"),
    (b'{"ENERGY": {"Power": 1' + b"0" * 400 + b"}}", "out_of_range"),
    (b'{"ENERGY": {"Power": 1, "x": "' + b"a" * 20_000 + b'"}}', "oversized"),
])
def test_tasmota_malformed(raw: bytes, reason: str) -> None:
    assert reason_of(tasmota(), "tele/pow/SENSOR", raw) == reason


def test_tasmota_status_without_statussns_and_foreign_topic() -> None:
    assert reason_of(tasmota(), "stat/pow/STATUS8", TASMOTA_SENSOR.read_bytes()) == "bad_schema"
    assert reason_of(tasmota(), "tele/other/SENSOR", TASMOTA_SENSOR.read_bytes()) == (
        "unknown_topic")


# Dead channels and registers: the field cases meter-tasmota-*, then more of their kinds.


def test_field_case_tasmota_50hz_one_phase_wired() -> None:
    # A Shelly 3EM under Tasmota with one phase wired (Tasmota issue 17178): the unwired
    # channels read 0.1 V at "48.85 Hz" and "136.83 Hz". The mean of all three, 78.5 Hz,
    # used to drop the whole reading.
    raw = (DEAD_PHASES / "sensor_50hz_one_phase_wired.json").read_bytes()
    r = tasmota().decode("tele/pow/SENSOR", raw)
    assert r is not None
    assert r.power_w == pytest.approx(-0.2)
    assert (r.frequency_hz, r.voltage_v) == (49.96, 236.9), "the live channel's alone"
    assert r.current_a == pytest.approx(0.040), "every channel's current, noise included"
    assert r.energy_export_wh == pytest.approx(24.67)
    assert r.energy_import_wh is None, "Total beside ExportActive is net of export"


def test_field_case_tasmota_60hz_split_phase_one_floating() -> None:
    # Split phase, the third input floating: it read "48.85 Hz" and the mean, 56.27 Hz,
    # shed the site for under-frequency.
    raw = (DEAD_PHASES / "sensor_60hz_split_phase_one_floating.json").read_bytes()
    r = tasmota().decode("tele/pow/SENSOR", raw)
    assert r is not None
    assert r.power_w == pytest.approx(15_841.7)
    assert r.frequency_hz is not None and 59.98 <= r.frequency_hz <= 59.99
    assert r.voltage_v == pytest.approx((121.4 + 121.1) / 2)


@pytest.mark.parametrize(("energy", "power_w", "voltage_v", "frequency_hz"), [
    # Three phases, one wired; a dead channel's noise may even fall inside the grid band.
    ({"Power": [812.5, 0.0, 0.3], "Voltage": [230.0, 0.1, 0.1],
      "Frequency": [50.02, 0.0, 61.5]}, 812.8, 230.0, 50.02),
    # One frequency for the device (Tasmota's frequency_common), one phase dead.
    ({"Power": [1000.0, 0.0, 950.0], "Voltage": [230.0, 0.1, 231.0], "Frequency": 49.98},
     1950.0, 230.5, 49.98),
    # One voltage for a two-channel device (Shelly 2.5), one channel's frequency noise.
    ({"Power": [400.0, 0.2], "Voltage": 120.2, "Frequency": [59.97, 136.8]},
     400.2, 120.2, 59.97),
    # Every channel dead (voltage lost): power as reported, no voltage, no frequency.
    ({"Power": [0.0, 0.1, 0.0], "Voltage": [0.1, 0.1, 0.2],
      "Frequency": [48.85, 0.0, 136.83]}, 0.1, None, None),
    # A device that reports 0 Hz when it cannot measure: no frequency; the power and the
    # voltage kept (a missing frequency says nothing about the voltage).
    ({"Power": 100.0, "Voltage": 231.0, "Frequency": 0}, 100.0, 231.0, None),
    ({"Power": [500, 500, 500], "Voltage": [230, 230, 230], "Frequency": [0, 0, 0]},
     1500.0, 230.0, None),
    # A frequency with no voltage at all: nothing shows the channel is live.
    ({"Power": 100.0, "Frequency": 59.5}, 100.0, None, None),
    # Three live phases, one reading off: the two that agree, not the mean of all three.
    ({"Power": [10.0, 20.0, 30.0], "Voltage": [230.0, 231.0, 229.0],
      "Frequency": [50.01, 50.02, 49.2]}, 60.0, 230.0, 50.015),
])
def test_tasmota_dead_channels_never_reach_voltage_or_frequency(
        energy: dict[str, Any], power_w: float, voltage_v: float | None,
        frequency_hz: float | None) -> None:
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": energy}))
    assert r is not None
    assert r.power_w == pytest.approx(power_w)
    assert r.voltage_v == (None if voltage_v is None else pytest.approx(voltage_v))
    assert r.frequency_hz == frequency_hz
    assert r.unknown == (), "a dead channel's noise is no fault to count"


def test_field_case_tasmota_import_register() -> None:
    # A three-phase Modbus meter exporting (Tasmota issue 17671): its own ImportActive
    # and ExportActive registers, kWh, beside Tasmota's Total (16,647.947 kWh).
    r = tasmota().decode("tele/pow/SENSOR", IMPORT_REGISTER.read_bytes())
    assert r is not None
    assert r.power_w == pytest.approx(-251.66)
    assert r.energy_import_wh == pytest.approx(11_489_575.0)
    assert r.energy_export_wh == pytest.approx(5_134_482.0)
    assert r.frequency_hz == 49.951
    assert r.voltage_v == pytest.approx((230.473 + 230.394 + 231.197) / 3)


@pytest.mark.parametrize(("energy", "import_wh", "export_wh"), [
    # A single-phase Modbus meter (SDM120): scalar registers beside Total.
    ({"Power": 640.0, "Total": 12.5, "ImportActive": 10.25, "ExportActive": 2.25},
     10_250.0, 2_250.0),
    # ImportActive wins over Total with or without an export register.
    ({"Power": 640.0, "Total": 99.0, "ImportActive": [3.0, 4.0, 5.5]}, 12_500.0, None),
    # Export measured, no import register: Total is net of export, so import is unknown;
    # a negative Total (a net exporter) is no error and does not drop the reading.
    ({"Power": -300.0, "Total": -4.5, "ExportActive": [9.0, 0.0, 0.0]}, None, 9_000.0),
    # Neither: a device that measures no export, whose Total is its import register.
    ({"Power": 640.0, "Total": [12.5, 1.0]}, 13_500.0, None),
])
def test_tasmota_explicit_registers_win_over_total(
        energy: dict[str, Any], import_wh: float | None, export_wh: float | None) -> None:
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": energy}))
    assert r is not None and r.power_w == energy["Power"]
    assert r.energy_import_wh == (None if import_wh is None else pytest.approx(import_wh))
    assert r.energy_export_wh == (None if export_wh is None else pytest.approx(export_wh))


# Frequency from channels that agree; one bad value costs only itself. The review's
# inputs (built from Tasmota's ENERGY format), then more of their kinds.


def unknown_of(r: MeterReading | None) -> list[tuple[str, str]]:
    assert r is not None
    return [(u.field, u.reason) for u in r.unknown]


@pytest.mark.parametrize(("energy", "frequency_hz"), [
    # The review's repro: one Voltage for the device, one loaded channel, and the unwired
    # ones' noise (136.83 Hz, and 48.85 Hz, as in the field case). It used to give 54.415
    # Hz, which sheds at the default 59.7 Hz. The loaded channel alone is the grid.
    ({"Total": 2, "Power": [7930.5, 0, 0], "Voltage": 240.2,
      "Frequency": [59.98, 136.83, 48.85], "Current": [33, 0, 0]}, 59.98),
    # The same at 50 Hz, shown live by its current alone (no Power array needed).
    ({"Power": 500, "Voltage": 230, "Frequency": [50, 136.8, 48.9], "Current": [2, 0, 0]},
     50.0),
    # An open input's noise current (0.014 A) and power (0.3 W) show no load.
    ({"Power": [1200.0, 0.3, 0.2], "Voltage": 120.2, "Frequency": [60.01, 52.1, 47.3],
      "Current": [10.0, 0.014, 0.013]}, 60.01),
    # Two loaded channels that agree: their median.
    ({"Power": [4000.0, 3900.0], "Voltage": 240.2, "Frequency": [59.98, 59.99]}, 59.985),
    # Exporting channels (negative power) carry load too.
    ({"Power": [-2500.0, 0.0], "Voltage": 230.0, "Frequency": [49.97, 136.8]}, 49.97),
    # One Voltage and nothing per channel to show which channel is energised: unknown.
    ({"Power": 7930.5, "Voltage": 240.2, "Frequency": [59.98, 48.85]}, None),
])
def test_tasmota_one_voltage_for_all_channels_each_shown_live_by_its_load(
        energy: dict[str, Any], frequency_hz: float | None) -> None:
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": energy}))
    assert r is not None
    assert r.frequency_hz == (None if frequency_hz is None else pytest.approx(frequency_hz))
    assert r.voltage_v == energy["Voltage"]
    assert r.unknown == ()


@pytest.mark.parametrize(("energy", "detail"), [
    # The review's split phase: two live legs at 59.98 and 58.9 Hz (and a dead third).
    # The median of the live ones was their mean, 59.44 Hz, under the shed threshold;
    # nothing says which leg is right, so the frequency is unknown.
    ({"Power": [7930.5, 7911.2, 0.0], "Voltage": [121.4, 121.1, 0.1],
      "Frequency": [59.98, 58.9, 48.85], "Current": [66, 66, 0]}, "59.98, 58.9 Hz"),
    # Two loaded channels under one Voltage, one of them reading the noise frequency.
    ({"Power": [7930.5, 7911.2], "Voltage": 240.2, "Frequency": [59.98, 48.85],
      "Current": [33, 33]}, "59.98, 48.85 Hz"),
    # Three live phases all apart.
    ({"Power": [10, 20, 30], "Voltage": [120, 121, 119], "Frequency": [59.9, 60.0, 60.3]},
     "59.9, 60, 60.3 Hz"),
    # Four channels, two pairs: no majority.
    ({"Power": [1, 1, 1, 1], "Voltage": [230] * 4, "Frequency": [50.0, 50.0, 49.5, 49.5]},
     "50, 50, 49.5, 49.5 Hz"),
])
def test_tasmota_live_channels_that_disagree_leave_the_frequency_unknown(
        energy: dict[str, Any], detail: str) -> None:
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": energy}))
    assert r is not None
    assert r.power_w == pytest.approx(sum(energy["Power"]))
    assert r.frequency_hz is None
    [note] = r.unknown
    assert (note.field, note.reason) == ("frequency_hz", "channels_disagree")
    assert detail in note.detail


@pytest.mark.parametrize(("frequencies", "frequency_hz"), [
    ([59.98, 59.99, 58.9], 59.985),  # two of three agree: the odd one is out
    ([50.0, 50.04, 50.08], 50.04),  # overlapping pairs: one group, its median
    ([59.99, 59.94, 59.97], 59.97),  # 0.05 Hz apart still agree
    ([59.5, 59.5, 61.0], 59.5),  # agreeing phases under frequency are believed
])
def test_tasmota_frequency_is_what_a_majority_of_live_channels_agree_on(
        frequencies: list[float], frequency_hz: float) -> None:
    energy = {"Power": [1000, 1000, 1000], "Voltage": [230, 230, 230],
              "Frequency": frequencies}
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": energy}))
    assert r is not None and r.unknown == ()
    assert r.frequency_hz == pytest.approx(frequency_hz)


def test_tasmota_live_channel_outside_the_grid_band_is_counted_not_used() -> None:
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": {
        "Power": 100, "Voltage": 230, "Frequency": 136.8}}))
    assert r is not None and r.frequency_hz is None and r.voltage_v == 230.0
    assert unknown_of(r) == [("frequency_hz", "out_of_range")]


@pytest.mark.parametrize(("energy", "import_wh", "export_wh", "field"), [
    # The review's repro: Total -0.001 kWh beside -250 W used to drop the whole reading.
    ({"Total": -0.001, "Power": -250, "Voltage": 230, "Frequency": 50.0, "Current": 1.1},
     None, None, "energy_import_wh"),
    ({"Total": -5.0, "Power": [-100, -100, -100], "Voltage": [230, 230, 230]},
     None, None, "energy_import_wh"),
    # Per channel: one negative channel among positive ones is no register either.
    ({"Total": [1.0, -0.5, 2.0], "Power": [10, 10, 10]}, None, None, "energy_import_wh"),
    ({"ImportActive": [1.0, -5.0], "ExportActive": [0.5, 0.5], "Power": [100, 0]},
     None, 1000.0, "energy_import_wh"),
    ({"ImportActive": 12.0, "ExportActive": -0.25, "Power": 100}, 12_000.0, None,
     "energy_export_wh"),
    # A bad ImportActive is not replaced by Total, which counts something else.
    ({"ImportActive": -1.0, "Total": 20.0, "Power": 100}, None, None, "energy_import_wh"),
    # A counter beyond anything a meter could count (1e300 kWh): a misread number.
    ({"Total": 1e300, "Power": 640.0}, None, None, "energy_import_wh"),
])
def test_tasmota_an_implausible_register_is_unknown_and_the_power_stands(
        energy: dict[str, Any], import_wh: float | None, export_wh: float | None,
        field: str) -> None:
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": energy}))
    assert r is not None
    assert r.power_w == pytest.approx(sum(as_list(energy["Power"])))
    assert r.energy_import_wh == import_wh and r.energy_export_wh == export_wh
    assert unknown_of(r) == [(field, "out_of_range")]


def as_list(value: Any) -> list[float]:
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize(("energy", "key", "value"), [
    ({"Power": 100, "Voltage": 2e6, "Frequency": 50}, "voltage_v", 100.0),
    ({"Power": 100, "Factor": 1.7}, "power_factor", 100.0),
    ({"Power": 100, "Current": -2.0}, "current_a", 100.0),
    ({"Power": [100, 50], "Current": [1.0, -3.0], "Voltage": [230, 230]}, "current_a", 150.0),
])
def test_tasmota_a_value_out_of_range_is_unknown_and_the_power_stands(
        energy: dict[str, Any], key: str, value: float) -> None:
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": energy}))
    assert r is not None and r.power_w == value
    assert getattr(r, key) is None
    assert unknown_of(r) == [(key, "out_of_range")]


@pytest.mark.parametrize(("energy", "key", "reason"), [
    ({"Power": 100, "ImportActive": "5"}, "energy_import_wh", "wrong_type"),
    ({"Power": 100, "Voltage": "230", "Frequency": 50}, "voltage_v", "wrong_type"),
    ({"Power": [100, 50], "Current": [1.0, "2"], "Voltage": [230, 230]}, "current_a",
     "wrong_type"),
    ({"Power": 100, "Factor": True}, "power_factor", "wrong_type"),
    ({"Power": 100, "Frequency": {"value": 50}, "Voltage": 230}, "frequency_hz", "wrong_type"),
    ({"Power": 100, "Voltage": []}, "voltage_v", "bad_value"),
    ({"Power": 100, "Total": 1e400}, "energy_import_wh", "out_of_range"),
])
def test_tasmota_a_malformed_field_other_than_power_is_unknown_and_the_power_stands(
        energy: dict[str, Any], key: str, reason: str) -> None:
    raw = json.dumps({"ENERGY": energy}).replace("Infinity", "1e400").encode()
    r = tasmota().decode("tele/pow/SENSOR", raw)
    assert r is not None and r.power_w == sum(as_list(energy["Power"]))
    assert getattr(r, key) is None
    assert unknown_of(r) == [(key, reason)]


def test_tasmota_null_channels_are_unknown_not_zero() -> None:
    # A channel whose value the device does not know: that channel's only. A sum over
    # it is unknown (never counted as 0); voltage and frequency come from the others.
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": {
        "Power": [1000, 900, 0], "Voltage": [230, 231, None], "Frequency": [50, 50.01, None],
        "Current": [4.3, None, 0], "Total": [1.0, None, 0.0]}}))
    assert r is not None and r.power_w == 1900.0
    assert (r.voltage_v, r.frequency_hz) == (230.5, pytest.approx(50.005))
    assert r.current_a is None and r.energy_import_wh is None
    assert r.unknown == ()
    # Power is the reading: a null in it is no reading.
    assert reason_of(tasmota(), "tele/pow/SENSOR", js({"ENERGY": {"Power": [100, None]}})) == (
        "wrong_type")
    # A malformed Total beside ImportActive is not read at all, so not counted.
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": {
        "Power": 100, "ImportActive": 2.0, "Total": "x"}}))
    assert r is not None and r.energy_import_wh == 2000.0 and r.unknown == ()


@pytest.mark.parametrize(("energy", "named"), [
    ({"Power": [100, 200, 300], "Voltage": [230, 230], "Frequency": [50, 50, 50]},
     "Power 3, Voltage 2, Frequency 3"),
    ({"Power": [100, 200], "Frequency": [50, 50, 50]}, "Power 2, Frequency 3"),
    ({"Power": [100, 200, 300], "ExportActive": [1.0]}, "Power 3, ExportActive 1"),
    ({"Power": 5, "Current": [1, 2], "Factor": [0.9, 0.9, 0.9]}, "Current 2, Factor 3"),
])
def test_tasmota_arrays_of_unequal_length_are_bad_value_naming_them(
        energy: dict[str, Any], named: str) -> None:
    with pytest.raises(PayloadError) as e:
        tasmota().decode("tele/pow/SENSOR", js({"ENERGY": energy}))
    assert e.value.reason == "bad_value" and named in e.value.detail


def test_tasmota_arrays_the_reading_does_not_use_may_differ() -> None:
    # Period and ReactivePower are not read, so their shape does not matter here.
    r = tasmota().decode("tele/pow/SENSOR", js({"ENERGY": {
        "Power": [100, 200], "Voltage": [230, 231], "Period": [1, 2, 3]}}))
    assert r is not None and r.power_w == 300.0


# -- Shelly Gen2 / Gen3 --------------------------------------------------------------

P = "shellypro3em-site"
EP = "shellyproem50-aabbccddeeff"  # a Pro EM: em1 components
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
    (f"{P}/status/em:0", b'{"id": 0, "total_act_power": 3e9}', "out_of_range"),
    (f"{P}/status/em:0", b'{"id": 0, "total_act_power": 5, "a_voltage": Infinity}', "bad_json"),
    (f"{P}/status/emdata:0", b'{"id": 0, "total_act_ret": 5}', "bad_schema"),
    (f"{P}/events/rpc", b'{"params": {}}', "bad_schema"),
    (f"{P}/events/rpc", b'{"method": "NotifyStatus", "params": [1]}', "bad_schema"),
    (f"{P}/events/rpc", b'{"method": "NotifyStatus", "params": {"em:0": 7}}', "wrong_type"),
    (f"{P}/status/em:1", b'{"id": 1, "total_act_power": 5}', "unsupported_component"),
    (f"{P}/status/em1:0", b'{"id": 0, "act_power": 5}', "unsupported_component"),
    (f"{P}/status/em:0/x", b'{"id": 0, "total_act_power": 5}', "unknown_topic"),
    (f"{P}/events/other", b'{}', "unknown_topic"),
    ("shellypro3em-other/status/em:0", b'{"id": 0, "total_act_power": 5}', "unknown_topic"),
])
def test_shelly_gen2_malformed(topic: str, raw: bytes, reason: str) -> None:
    assert reason_of(gen2(), topic, raw) == reason


def test_shelly_gen2_bad_delta_leaves_the_state_as_it_was() -> None:
    d = gen2()
    before = d.decode(f"{P}/status/em:0", SHELLY_EM0.read_bytes())
    for bad, reason in (
            ({"id": 0, "total_act_power": "1.0", "a_voltage": 1.0}, "wrong_type"),
            ({"id": 0, "total_act_power": None}, "bad_schema"),
            ({"id": 0, "total_act_power": 3e9}, "out_of_range"),
            ({"id": 1, "total_act_power": 1.0}, "bad_value")):
        assert reason_of(d, f"{P}/events/rpc", notify("NotifyStatus", **{"em:0": bad})) == (
            reason)
    assert d.decode(f"{P}/events/rpc", notify("NotifyStatus", **{"em:0": {"id": 0}})) == (
        before)


def test_shelly_gen2_a_bad_field_other_than_power_is_unknown_and_the_power_stands() -> None:
    d = gen2()
    before = d.decode(f"{P}/status/em:0", SHELLY_EM0.read_bytes())
    assert before is not None and before.voltage_v == pytest.approx(230.366667)
    # A voltage of 5 MV is no voltage, but the power beside it stands.
    r = d.decode(f"{P}/events/rpc", notify("NotifyStatus", **{"em:0": {
        "id": 0, "a_voltage": 5e6, "total_act_power": 2600.0}}))
    assert r is not None and r.power_w == 2600.0 and r.voltage_v is None
    assert unknown_of(r) == [("voltage_v", "out_of_range")]
    # A malformed voltage is unknown from then on, not its old value (nor 5 MV).
    r = d.decode(f"{P}/events/rpc", notify("NotifyStatus", **{"em:0": {
        "id": 0, "a_voltage": "230.5", "b_freq": None, "total_act_power": 2610.0}}))
    assert r is not None and r.power_w == 2610.0
    assert r.voltage_v == pytest.approx((228.5 + 232.1) / 2), "phases B and C only"
    assert r.frequency_hz == 50.0, "phase C's: B's went null, A has no voltage"
    assert unknown_of(r) == [("voltage_v", "wrong_type")]
    assert "a_voltage" not in d.status["em:0"] and "b_freq" not in d.status["em:0"]
    r = d.decode(f"{P}/events/rpc", notify("NotifyStatus", **{"em:0": {
        "id": 0, "a_voltage": 230.5, "b_freq": 50.0, "total_act_power": 2581.781}}))
    assert r == before
    # The same in a full status, and in an em1 channel's.
    em = {**json.loads(SHELLY_EM0.read_bytes()), "total_current": "12.259"}
    r = gen2().decode(f"{P}/status/em:0", js(em))
    assert r is not None and r.power_w == 2581.781
    assert r.current_a == pytest.approx(12.259), "the phases' sum stands in for the total"
    assert unknown_of(r) == [("current_a", "wrong_type")]
    r = gen2(EP, [1]).decode(f"{EP}/status/em1:1", js({
        "id": 1, "act_power": 6769.3, "voltage": 221.4, "freq": [50.0]}))
    assert r is not None and r.power_w == 6769.3 and r.frequency_hz is None
    assert unknown_of(r) == [("frequency_hz", "wrong_type")]


def test_shelly_gen2_state_is_bounded_to_known_fields() -> None:
    em = {**json.loads(SHELLY_EM0.read_bytes()), **{f"junk_{i}": i for i in range(300)}}
    d = gen2()
    d.decode(f"{P}/status/em:0", js(em))
    d.decode(f"{P}/events/rpc", notify("NotifyStatus", **{"em:0": {f"more_{i}": i
                                                                    for i in range(300)}}))
    assert set(d.status) == {"em:0"}
    assert set(d.status["em:0"]) <= EM_FIELDS


def test_shelly_gen2_em0_dead_phase_does_not_poison_voltage_or_frequency() -> None:
    # A Pro 3EM with phase C unwired: its input reads noise.
    em = {**json.loads(SHELLY_EM0.read_bytes()), "a_freq": 49.97, "b_freq": 49.98,
          "c_voltage": 0.1, "c_freq": 136.83, "c_current": 0.014, "c_act_power": 0.0,
          "c_aprt_power": 0.0, "c_pf": 0.0}
    d = gen2()
    r = d.decode(f"{P}/status/em:0", js(em))
    assert r is not None
    assert r.power_w == 2581.781
    assert r.voltage_v == pytest.approx((230.5 + 228.5) / 2)
    assert r.frequency_hz == pytest.approx(49.975)
    # Phase B is lost later (a blown fuse): a delta; the live phase still gives both.
    r = d.decode(f"{P}/events/rpc", notify("NotifyStatus", **{"em:0": {
        "id": 0, "b_voltage": 0.2, "b_freq": 0.0, "b_act_power": 0.0,
        "total_act_power": -75.4}}))
    assert r is not None
    assert (r.power_w, r.voltage_v, r.frequency_hz) == (-75.4, 230.5, 49.97)


def test_shelly_gen2_em0_split_phase_live_legs_must_agree() -> None:
    # A Pro 3EM on US split phase, phase C unused: the legs agree, 59.98 and 59.99 Hz.
    em = {"id": 0, "a_current": 66.0, "a_voltage": 121.4, "a_act_power": 7930.5,
          "a_aprt_power": 8012, "a_pf": 0.99, "a_freq": 59.98, "b_current": 65.98,
          "b_voltage": 121.1, "b_act_power": 7911.2, "b_aprt_power": 7990.4, "b_pf": 0.99,
          "b_freq": 59.99, "c_current": 0.014, "c_voltage": 0.1, "c_act_power": 0.0,
          "c_aprt_power": 0.0, "c_pf": 0, "c_freq": 48.85, "total_current": 131.994,
          "total_act_power": 15841.7, "total_aprt_power": 16002.4}
    d = gen2()
    r = d.decode(f"{P}/status/em:0", js(em))
    assert r is not None and r.frequency_hz == pytest.approx(59.985) and r.unknown == ()
    # Leg B's frequency goes astray: which leg is the grid's is unknown, and so is the
    # frequency (the mean, 59.44 Hz, would shed).
    r = d.decode(f"{P}/events/rpc", notify("NotifyStatus", **{"em:0": {
        "id": 0, "b_freq": 58.9}}))
    assert r is not None and r.power_w == 15841.7 and r.frequency_hz is None
    assert unknown_of(r) == [("frequency_hz", "channels_disagree")]


def test_shelly_gen2_negative_register_is_unknown_and_the_power_stands() -> None:
    d = gen2()
    d.decode(f"{P}/status/em:0", SHELLY_EM0.read_bytes())
    r = d.decode(f"{P}/status/emdata:0", js({**EMDATA, "total_act": -5.0}))
    assert r is not None and r.power_w == 2581.781
    assert r.energy_import_wh is None and r.energy_export_wh == 2220.5
    assert unknown_of(r) == [("energy_import_wh", "out_of_range")]
    # em1 channels: one channel's negative register is no part of a sum.
    d = gen2(EP, em1_channels=[0, 1])
    for n in (0, 1):
        d.decode(f"{EP}/status/em1:{n}", js({"id": n, "act_power": 100.0}))
    d.decode(f"{EP}/status/em1data:0", js({"id": 0, "total_act_energy": 10.0,
                                           "total_act_ret_energy": 1.0}))
    r = d.decode(f"{EP}/status/em1data:1", js({"id": 1, "total_act_energy": 20.0,
                                               "total_act_ret_energy": -1.0}))
    assert r is not None and r.power_w == 200.0
    assert (r.energy_import_wh, r.energy_export_wh) == (30.0, None)
    assert unknown_of(r) == [("energy_export_wh", "out_of_range")]
    assert "em1data:1.total_act_ret_energy: -1 Wh is negative" in r.unknown[0].detail


@pytest.mark.parametrize(("em1_channels", "topic", "raw"), [
    # The review's repro: channel 0's status on channel 1's topic was read as channel 1.
    ([1], f"{EP}/status/em1:1", b'{"id": 0, "act_power": 4500.0, "voltage": 230.0}'),
    ([1], f"{EP}/status/em1data:1", b'{"id": 0, "total_act_energy": 12345.6}'),
    ([1], f"{EP}/events/rpc", notify("NotifyStatus", **{"em1:1": {"id": 0, "act_power": 1.0}})),
    (None, f"{P}/status/em:0", b'{"id": 1, "total_act_power": 5}'),
    (None, f"{P}/status/emdata:0", b'{"id": 2, "total_act": 5}'),
])
def test_shelly_gen2_a_payload_of_another_channel_is_bad_value(
        em1_channels: list[int] | None, topic: str, raw: bytes) -> None:
    d = gen2(EP if em1_channels else P, em1_channels)
    with pytest.raises(PayloadError) as e:
        d.decode(topic, raw)
    assert e.value.reason == "bad_value" and ".id is " in e.value.detail
    assert d.status == {}


def test_shelly_gen2_component_id_of_the_wrong_type() -> None:
    assert reason_of(gen2(), f"{P}/status/em:0", b'{"id": "0", "total_act_power": 5}') == (
        "wrong_type")
    r = gen2().decode(f"{P}/status/em:0", b'{"total_act_power": 5}')
    assert r is not None and r.power_w == 5.0, "a status without an id is read"


SWITCH = {"id": 0, "source": "init", "output": True, "apower": 270.0, "voltage": 230.1,
          "freq": 50.0, "current": 1.2, "aenergy": {"total": 1234.5, "by_minute": [0, 0, 0],
                                                    "minute_ts": 1707932870},
          "temperature": {"tC": 40.0, "tF": 104.0}}


@pytest.mark.parametrize(("topic", "raw"), [
    # The review's repro: a Plus 1PM's switch:0 decoded to null, silently, for ever.
    (f"{P}/status/switch:0", js(SWITCH)),
    (f"{P}/status/cover:0", js({"id": 0, "state": "stopped", "apower": 0.0, "voltage": 231.0})),
    (f"{P}/status/light:0", js({"id": 0, "output": True, "brightness": 50, "apower": 12.4})),
    (f"{P}/events/rpc", notify("NotifyStatus", **{"switch:1": {"id": 1, "apower": 35.5}})),
    (f"{P}/events/rpc", notify("NotifyFullStatus", **{"switch:0": SWITCH,
                                                       "sys": {"uptime": 5}})),
])
def test_shelly_gen2_metering_relays_are_unsupported_components(topic: str, raw: bytes) -> None:
    for d in (gen2(), gen2(em1_channels=[0])):
        with pytest.raises(PayloadError) as e:
            d.decode(topic, raw)
        assert e.value.reason == "unsupported_component"
        assert "power meter of a relay, plug, dimmer" in e.value.detail
    # A relay status without a power reading is no meter's business.
    assert gen2().decode(f"{P}/status/switch:0", js({"id": 0, "output": False})) is None
    assert gen2().decode(f"{P}/status/switch:0", js({"id": 0, "apower": None})) is None


# EM1 components (Pro EM, EM Gen3, 3EM in its monophase profile): the field case
# meter-shelly-gen2-em1, then more of its kind.


def test_field_case_shelly_gen2_em1_is_read() -> None:
    d = gen2(EP, em1_channels=[1])
    rpc = (EM1_CASE / "rpc_notifystatus_em1.json").read_bytes()
    # Before any full status of em1:1 the delta has nothing to merge onto: counted.
    assert reason_of(d, f"{EP}/events/rpc", rpc) == "no_base_status"
    r = d.decode(f"{EP}/status/em1:1", (EM1_CASE / "em1_1.json").read_bytes())
    assert r == MeterReading(power_w=6769.3, energy_import_wh=None, energy_export_wh=None,
                             voltage_v=221.4, current_a=30.665, power_factor=0.99,
                             frequency_hz=50.0)
    r = d.decode(f"{EP}/status/em1data:1", (EM1_CASE / "em1data_1.json").read_bytes())
    assert r is not None and r.power_w == 6769.3
    assert (r.energy_import_wh, r.energy_export_wh) == (9671.54, 2595.26)
    # The power moves; the field case's NotifyStatus brings it back to 6,769.3 W.
    r = d.decode(f"{EP}/events/rpc", notify("NotifyStatus", **{"em1:1": {
        "id": 1, "act_power": 7012.0, "current": 31.7}}))
    assert r is not None and (r.power_w, r.current_a, r.voltage_v) == (7012.0, 31.7, 221.4)
    r = d.decode(f"{EP}/events/rpc", rpc)
    assert r is not None and (r.power_w, r.current_a) == (6769.3, 30.665)
    assert r.energy_import_wh == 9671.54


def test_field_case_shelly_gen2_em1_on_a_meter_set_up_for_em0_is_an_error() -> None:
    d = gen2(EP)
    for topic, name in ((f"{EP}/events/rpc", "rpc_notifystatus_em1.json"),
                        (f"{EP}/status/em1:1", "em1_1.json"),
                        (f"{EP}/status/em1data:1", "em1data_1.json")):
        with pytest.raises(PayloadError) as e:
            d.decode(topic, (EM1_CASE / name).read_bytes())
        assert e.value.reason == "unsupported_component"
        assert "set em1_channels (e.g. [1])" in e.value.detail
    assert d.status == {}


def test_shelly_gen2_em1_channels_are_summed_once_each_is_known() -> None:
    d = gen2(EP, em1_channels=[0, 1])
    ch0 = {"id": 0, "current": 4.1, "voltage": 230.2, "act_power": 900.0, "aprt_power": 940.0,
           "pf": 0.96, "freq": 50.01}
    ch1 = {"id": 1, "current": 2.0, "voltage": 230.2, "act_power": -400.0,
           "aprt_power": 460.0, "pf": -0.87, "freq": 50.01}
    assert d.decode(f"{EP}/status/em1:0", js(ch0)) is None, "channel 1's power unknown"
    assert d.decode(f"{EP}/status/em1data:0", js({
        "id": 0, "total_act_energy": 1000.5, "total_act_ret_energy": 10.0})) is None
    r = d.decode(f"{EP}/status/em1:1", js(ch1))
    assert r is not None
    assert r.power_w == 500.0 and r.current_a == pytest.approx(6.1)
    assert r.power_factor == pytest.approx(500.0 / 1400.0)
    assert (r.voltage_v, r.frequency_hz) == (230.2, 50.01)
    assert r.energy_import_wh is None, "a partial sum of registers would understate"
    r = d.decode(f"{EP}/status/em1data:1", js({
        "id": 1, "total_act_energy": 20.0, "total_act_ret_energy": 3000.25}))
    assert r is not None
    assert (r.energy_import_wh, r.energy_export_wh) == (1020.5, 3010.25)


def test_shelly_gen2_em1_dead_channel_keeps_power_and_drops_its_noise() -> None:
    # A 3EM in its monophase profile with input C unwired.
    d = gen2(EP, em1_channels=[0, 1, 2])
    live = {"current": 10.0, "voltage": 229.8, "act_power": 2290.0, "aprt_power": 2298.0,
            "pf": 1.0, "freq": 49.99}
    full = {"em1:0": {"id": 0, **live}, "em1:1": {"id": 1, **live, "voltage": 230.6},
            "em1:2": {"id": 2, "current": 0.01, "voltage": 0.1, "act_power": 0.4,
                      "aprt_power": 0.0, "pf": 0.0, "freq": 136.83},
            "sys": {"uptime": 100}}
    r = d.decode(f"{EP}/events/rpc", notify("NotifyFullStatus", **full))
    assert r is not None
    assert r.power_w == pytest.approx(4580.4)
    assert r.voltage_v == pytest.approx(230.2) and r.frequency_hz == 49.99


def test_shelly_gen2_em1_channel_left_out_is_ignored() -> None:
    # A Pro EM whose channel 0 measures something else: the config reads channel 1 only.
    d = gen2(EP, em1_channels=[1])
    assert d.decode(f"{EP}/status/em1:0", js({"id": 0, "act_power": 5.0})) is None
    assert d.decode(f"{EP}/status/em1data:0", js({"id": 0, "total_act_energy": 5.0})) is None
    assert d.decode(f"{EP}/events/rpc", notify("NotifyStatus", **{"em1:0": {
        "id": 0, "act_power": 6.0}})) is None
    d.decode(f"{EP}/status/em1:1", (EM1_CASE / "em1_1.json").read_bytes())
    r = d.decode(f"{EP}/events/rpc", notify("NotifyStatus", **{
        "em1:0": {"id": 0, "act_power": 7.0}, "em1:1": {"id": 1, "act_power": 6000.0}}))
    assert r is not None and r.power_w == 6000.0
    assert set(d.status) == {"em1:1"}


def test_shelly_gen2_other_meter_components_are_errors_not_silence() -> None:
    # A 3EM back in its triphase profile while the config reads em1 channels.
    d = gen2(EP, em1_channels=[0])
    with pytest.raises(PayloadError, match=r"em:0: not read.*remove em1_channels") as e:
        d.decode(f"{EP}/status/em:0", SHELLY_EM0.read_bytes())
    assert e.value.reason == "unsupported_component"
    # A power meter component no meter type reads (Plus PM Mini), on either topic.
    pm1 = {"id": 0, "voltage": 230.1, "current": 1.2, "apower": 270.0, "freq": 50.0}
    assert reason_of(gen2(), f"{P}/events/rpc", notify("NotifyStatus", **{"pm1:0": pm1})) == (
        "unsupported_component")
    assert reason_of(gen2(), f"{P}/status/pm1:0", js(pm1)) == "unsupported_component"
    # A message holding the component the meter reads is read; the rest do not drop it.
    em = json.loads(SHELLY_EM0.read_bytes())
    r = gen2().decode(f"{P}/events/rpc", notify("NotifyFullStatus", **{"em:0": em,
                                                                       "pm1:0": pm1}))
    assert r is not None and r.power_w == 2581.781
    # Components that are not meters stay silent.
    assert gen2().decode(f"{P}/status/switch:0", b'{"id": 0, "output": true}') is None
    assert gen2().decode(f"{P}/status/sys", b"not even json") is None


@pytest.mark.parametrize(("topic", "raw", "reason"), [
    (f"{EP}/status/em1:1", b'{"id": 1, "voltage": 230}', "bad_schema"),
    (f"{EP}/status/em1:1", b'{"id": 1, "act_power": "6769"}', "wrong_type"),
    (f"{EP}/status/em1:1", b'{"id": 1, "act_power": 3e9}', "out_of_range"),
    (f"{EP}/status/em1data:1", b'{"id": 1, "total_act_ret_energy": 5}', "bad_schema"),
    (f"{EP}/events/rpc", b'{"method": "NotifyStatus", "params": {"em1:1": []}}', "wrong_type"),
])
def test_shelly_gen2_em1_malformed(topic: str, raw: bytes, reason: str) -> None:
    d = gen2(EP, em1_channels=[1])
    d.decode(f"{EP}/status/em1data:1", (EM1_CASE / "em1data_1.json").read_bytes())
    assert reason_of(d, topic, raw) == reason
    assert d.status["em1data:1"] == {"total_act_energy": 9671.54, "total_act_ret_energy": 2595.26}


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


def test_shelly_gen1_3em_dead_channel_keeps_power_and_voltage() -> None:
    # A 3EM with input 2 unwired: it still publishes its values, as noise.
    d = gen1()
    publish_3em(d, 0, power="1000.50", pf="0.95", current="4.60", voltage="229.10")
    publish_3em(d, 1, power="2000.00", pf="0.97", current="9.00", voltage="230.40")
    r = publish_3em(d, 2, power="0.30", pf="0.00", current="0.01", voltage="0.10")
    assert r is not None
    assert r.power_w == pytest.approx(3000.8)
    assert r.current_a == pytest.approx(13.61)
    assert r.voltage_v == pytest.approx((229.1 + 230.4) / 2), "the live channels only"
    # Every channel dead (the 3EM's voltage inputs lost): no voltage, power as reported.
    for channel in (0, 1):
        r = d.decode(f"{G1}/{channel}/voltage", b"0.2")
    assert r is not None and r.voltage_v is None and r.power_w == pytest.approx(3000.8)


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
                 "channels": [1, 0]},
                {"type": "shelly_gen2", "id": "pem", "prefix": EP, "em1_channels": [1, 0]}])
    kinds = [type(m) for m in cfg.meters]
    assert kinds[1:] == [TasmotaMeter, ShellyGen2Meter, ShellyGen1Meter, ShellyGen2Meter]
    assert cfg.meters[3].channels == [0, 1]  # type: ignore[union-attr]
    assert cfg.meters[2].em1_channels is None  # type: ignore[union-attr]
    assert cfg.meters[4].em1_channels == [0, 1]  # type: ignore[union-attr]


@pytest.mark.parametrize(("meters", "match"), [
    ([{"type": "tasmoto", "id": "x", "topic": "t"}], "tasmota"),
    ([{"type": "tasmota", "id": "x", "topic": "t", "prefix": "p"}], "Extra inputs"),
    ([{"type": "tasmota", "id": "x", "topic": "a/b"}], "pattern"),
    ([{"type": "tasmota", "id": "x", "topic": "t", "full_topic": "%topic%/"}], "%prefix%"),
    ([{"type": "shelly_gen2", "id": "x", "prefix": "a/+/b"}], "pattern"),
    ([{"type": "shelly_gen1", "id": "x", "device_id": "d", "channels": [0, 0]}], "twice"),
    ([{"type": "shelly_gen1", "id": "x", "device_id": "d", "channels": [3]}], "less than"),
    ([{"type": "shelly_gen2", "id": "x", "prefix": "p", "em1_channels": [1, 1]}], "twice"),
    ([{"type": "shelly_gen2", "id": "x", "prefix": "p", "em1_channels": [3]}], "less than"),
    ([{"type": "shelly_gen2", "id": "x", "prefix": "p", "em1_channels": []}], "at least 1"),
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
        "tele/pow/SENSOR", "stat/pow/STATUS8", "stat/pow/STATUS10", f"{P}/status/+",
        f"{P}/events/rpc", f"{G1}/+/+"]
    # Every status topic of the Shelly, so that a component it does not read is reported.
    for topic in ("tele/pow/SENSOR", f"{P}/events/rpc", f"{G1}/2/total", f"{P}/status/em:0",
                  f"{P}/status/em1:0", f"{P}/status/switch:0"):
        assert router.claims(topic)
    for topic in ("mineops/t/meter/poi/telemetry", "mineops/t/miner/a-0001/telemetry",
                  "tele/other/SENSOR", f"{P}/events/rpc2", "shellyother/status/em:0"):
        assert not router.claims(topic)
    routed = router.decode("tele/pow/SENSOR", TASMOTA_SENSOR.read_bytes())
    assert routed is not None and (routed.meter_id, routed.role) == ("pow", "aux")
    assert router.decode(f"{P}/status/switch:0", b'{"id": 0, "output": true}') is None
    with pytest.raises(PayloadError, match="em1:0: not read by this meter"):
        router.decode(f"{P}/status/em1:0", b'{"id": 0, "act_power": 5}')


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
    c.on_message("tele/pow/SENSOR", js({"ENERGY": {"Power": 900, "Frequency": 59.98,
                                                   "Voltage": 121.0}}))
    assert (c.fleet.site.meter_power_w, c.fleet.site.frequency_hz) == (900.0, 59.98)


def test_controller_field_case_60hz_dead_phase_sheds_nothing() -> None:
    cfg = make_site(_FakeAddress(), [("a", "s21", 2)], meters=[  # type: ignore[arg-type]
        {"type": "tasmota", "id": "pow", "topic": "pow"}])
    c = Controller(cfg)
    c.on_message("tele/pow/SENSOR",
                 (DEAD_PHASES / "sensor_60hz_split_phase_one_floating.json").read_bytes())
    assert c.fleet.site.meter_power_w == pytest.approx(15_841.7)
    assert 59.98 <= c.fleet.site.frequency_hz <= 59.99
    assert c.grid.frequency_event is None, "no under-frequency shed"
    assert not any(kind == "meter_telemetry" for kind, _ in c.ingest.invalid)


def test_controller_field_case_50hz_one_phase_keeps_the_power() -> None:
    cfg = make_site(_FakeAddress(), [("a", "s21", 2)], meters=[  # type: ignore[arg-type]
        {"type": "tasmota", "id": "pow", "topic": "pow"}],
        grid={"frequency": {"shed_below_hz": 49.7, "restore_above_hz": 49.9}})
    c = Controller(cfg)
    c.on_message("tele/pow/SENSOR",
                 (DEAD_PHASES / "sensor_50hz_one_phase_wired.json").read_bytes())
    assert c.fleet.site.meter_power_w == pytest.approx(-0.2)
    assert c.fleet.site.frequency_hz == 49.96
    assert c.grid.frequency_event is None
    assert not any(kind == "meter_telemetry" for kind, _ in c.ingest.invalid)


def test_controller_field_case_em1_read_or_counted() -> None:
    cfg = make_site(_FakeAddress(), [("a", "s21", 2)], meters=[  # type: ignore[arg-type]
        {"type": "shelly_gen2", "id": "pem", "prefix": EP, "em1_channels": [1]},
        {"type": "shelly_gen2", "id": "p3", "prefix": P}])
    c = Controller(cfg)
    rpc = (EM1_CASE / "rpc_notifystatus_em1.json").read_bytes()
    c.on_message(f"{EP}/status/em1:1", (EM1_CASE / "em1_1.json").read_bytes())
    c.on_message(f"{EP}/events/rpc", rpc)
    assert c.fleet.site.meter_power_w == 6769.3
    # The same notification reaching a meter set up for em:0 is counted, not silent.
    c.on_message(f"{P}/events/rpc", rpc)
    assert c.ingest.invalid[("meter_telemetry", "unsupported_component")] == 1
    assert c.fleet.site.meter_power_w == 6769.3


REVIEW_SPLIT_PHASE = {"Time": "2024-07-01T12:00:00", "ENERGY": {
    "Total": 1.0, "Power": [7930.5, 7911.2, 0.0], "Voltage": [121.4, 121.1, 0.1],
    "Frequency": [59.98, 58.9, 48.85], "Current": [66, 66, 0]}}
REVIEW_ONE_VOLTAGE = {"ENERGY": {"Total": 2, "Power": [7930.5, 0, 0], "Voltage": 240.2,
                                 "Frequency": [59.98, 136.83, 48.85], "Current": [33, 0, 0]}}
REVIEW_NEGATIVE_TOTAL = {"ENERGY": {"Total": -0.001, "Power": -250, "Voltage": 230,
                                    "Frequency": 50.0, "Current": 1.1}}


def unknown_count(c: Controller, meter: str, value: str, reason: str) -> float | None:
    return c.metrics.registry.get_sample_value(
        "mineops_meter_values_unknown_total", {"meter": meter, "value": value, "reason": reason})


def test_controller_review_cases_shed_nothing_and_keep_the_power() -> None:
    cfg = make_site(_FakeAddress(), [("a", "s21", 2)], meters=[  # type: ignore[arg-type]
        {"type": "tasmota", "id": "pow", "topic": "pow"}])
    c = Controller(cfg)
    assert cfg.grid.frequency.shed_below_hz == 59.7
    with capture_logs() as logs:
        # One Voltage beside a Frequency array: the loaded channel's 59.98 Hz, no shed.
        c.on_message("tele/pow/SENSOR", js(REVIEW_ONE_VOLTAGE))
        assert (c.fleet.site.meter_power_w, c.fleet.site.frequency_hz) == (7930.5, 59.98)
        # Two live legs disagreeing: the power applies, the frequency is not taken.
        c.on_message("tele/pow/SENSOR", js(REVIEW_SPLIT_PHASE))
        assert c.fleet.site.meter_power_w == pytest.approx(15_841.7)
        assert c.fleet.site.frequency_hz == 59.98, "the last known frequency, not 59.44"
        # A negative Total: the power applies, the import register is unknown (the
        # review's payload, on this 60 Hz site's frequency).
        c.on_message("tele/pow/SENSOR", js({"ENERGY": {**REVIEW_NEGATIVE_TOTAL["ENERGY"],
                                                       "Frequency": 60.01}}))
        assert c.fleet.site.meter_power_w == -250.0
    assert c.grid.frequency_event is None, "no under-frequency shed"
    assert not any(kind == "meter_telemetry" for kind, _ in c.ingest.invalid)
    router = c.ingest.meters
    assert router.unknown_values == {("pow", "frequency_hz", "channels_disagree"): 1,
                                     ("pow", "energy_import_wh", "out_of_range"): 1}
    assert unknown_count(c, "pow", "frequency_hz", "channels_disagree") == 1.0
    assert unknown_count(c, "pow", "energy_import_wh", "out_of_range") == 1.0
    warned = [e for e in logs if e["event"] == "meter_value_unknown"]
    assert [(e["meter"], e["value"], e["reason"]) for e in warned] == [
        ("pow", "frequency_hz", "channels_disagree"), ("pow", "energy_import_wh", "out_of_range")]
    assert "59.98, 58.9 Hz" in warned[0]["detail"]


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


def test_decode_cli_em1_field_case(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = decode_cli(
        capsys, "shelly_gen2", (f"{EP}/status/em1:1", EM1_CASE / "em1_1.json"),
        (f"{EP}/status/em1data:1", EM1_CASE / "em1data_1.json"),
        (f"{EP}/events/rpc", EM1_CASE / "rpc_notifystatus_em1.json"))
    assert code == 0
    assert [line["power_w"] for line in lines] == [6769.3, 6769.3, 6769.3]
    assert lines[0]["energy_import_wh"] is None
    assert (lines[2]["energy_import_wh"], lines[2]["energy_export_wh"]) == (9671.54, 2595.26)
    # The notification alone names no em1 topic: the meter reads em:0, and says so.
    code, lines, err = decode_cli(
        capsys, "shelly_gen2", (f"{EP}/events/rpc", EM1_CASE / "rpc_notifystatus_em1.json"))
    assert code == 2 and lines == []
    assert "unsupported_component: em1:1" in err and "em1_channels" in err


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


def test_decode_cli_review_repros(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = []
    for name, payload in (("t10b.json", REVIEW_ONE_VOLTAGE), ("t14b.json", REVIEW_NEGATIVE_TOTAL),
                          ("t18.json", REVIEW_SPLIT_PHASE)):
        (tmp_path / name).write_bytes(js(payload))
        pairs.append(("tele/pow/SENSOR", tmp_path / name))
    code, lines, err = decode_cli(capsys, "tasmota", *pairs)
    assert code == 0, "a value left unknown is no failure"
    assert lines[0]["frequency_hz"] == 59.98
    assert (lines[1]["power_w"], lines[1]["energy_import_wh"]) == (-250.0, None)
    assert (lines[2]["power_w"], lines[2]["frequency_hz"]) == (15841.7, None)
    said = err.splitlines()
    assert len(said) == 2
    assert said[0].startswith(f"mineops decode: {tmp_path / 't14b.json'} on tele/pow/SENSOR: "
                              "energy_import_wh unknown: out_of_range: ENERGY.Total: -0.001 kWh")
    assert "frequency_hz unknown: channels_disagree" in said[1]


def test_decode_cli_shelly_switch_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "switch.json"
    f.write_bytes(js(SWITCH))
    code, lines, err = decode_cli(capsys, "shelly_gen2", (f"{P}/status/switch:0", f))
    assert code == 2 and lines == []
    assert "unsupported_component: switch:0: not read by this meter" in err

"""Values from pyasic, checked before the bridge publishes them.

Built with pyasic 0.79's own data classes (`MinerData`, `HashBoard`, `Fan`, its hashrate
unit types), as its backends fill them in, and with unmodified pyasic reading the
simulated LuxOS API. The field case `bridge-pyasic-partial-data` (stock Antminers pyasic
supports only in part: pyasic issues 316 and 45) is in
tests/fixtures/field-cases/bridge-pyasic-partial-data/.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pyasic.data import Fan, HashBoard, MinerData
from pyasic.data.device import DeviceInfo
from pyasic.device.algorithm.base import GenericAlgo
from pyasic.device.algorithm.hashrate.base import GenericHashrate
from pyasic.device.algorithm.hashrate.sha256 import SHA256HashRate
from pyasic.device.algorithm.hashrate.unit.base import GenericUnit
from pyasic.device.algorithm.hashrate.unit.sha256 import SHA256Unit
from pyasic.device.firmware import MinerFirmware
from pyasic.device.makes import MinerMake
from pyasic.miners.antminer.luxos.X21.S21 import LUXMinerS21
from pyasic.miners.factory import MINER_CLASSES, MinerTypes
from structlog.testing import capture_logs

from controller.catalogue import MinerModel, load_catalogue
from controller.config import SiteConfig
from controller.daemon.loop import Controller
from controller.protocol.payloads import GroupMinerReading, decode_group_telemetry
from drivers.firmware.bridge import MinerBridge, telemetry_payload
from drivers.firmware.config import BridgeEndpoint
from drivers.firmware.pyasic_miner import (
    FirmwareError,
    FirmwareMiner,
    FirmwareReading,
    hashrate_to_ths,
    pyasic_class,
    reading_from_data,
)
from simulators.fleet import SimulatedFleet
from simulators.luxos_api import LuxosApiServer
from tests.conftest import bridge_of, make_site
from tests.test_luxos_pyasic import free_loopback_base

FIELD_CASE = (Path(__file__).parent / "fixtures" / "field-cases" / "bridge-pyasic-partial-data"
              / "miner_data.json")
CATALOGUE = load_catalogue()
S19J_PRO = CATALOGUE.get("s19j_pro")
S21 = CATALOGUE.get("s21")


# -- building pyasic's data as its backends do ---------------------------------------------

def pyasic_hashrate(algo: str, rate: float, unit: str) -> Any:
    """A pyasic hashrate: GenericAlgo (a model pyasic does not know) or SHA-256."""
    if algo == "Generic":
        return GenericHashrate(rate=rate, unit=GenericUnit[unit])
    assert algo == "SHA256", algo
    return SHA256HashRate(rate=rate, unit=SHA256Unit[unit])


def field_case() -> tuple[MinerData, MinerModel]:
    raw = json.loads(FIELD_CASE.read_text())
    info = raw["device_info"]
    assert info["algo"] == "Generic" and info["model"] is None
    data = MinerData(
        ip="10.0.0.7",
        device_info=DeviceInfo(make=MinerMake(info["make"]), model=None,
                               firmware=MinerFirmware(info["firmware"]), algo=GenericAlgo),
        wattage=raw["wattage"],
        uptime=raw["uptime"],
        fans=[Fan(**f) for f in raw["fans"]],
        hashboards=[HashBoard(slot=b["slot"], temp=b["temp"], missing=False,
                              hashrate=pyasic_hashrate(**b["hashrate"]))
                    for b in raw["hashboards"]],
    )
    data.wattage_limit = raw["wattage_limit"]
    return data, CATALOGUE.get(raw["site_model"])


def healthy(**changes: Any) -> MinerData:
    """An S19j Pro at stock as pyasic's LuxOS class reports it (SHA-256 boards in TH/s)."""
    boards = [HashBoard(slot=i, hashrate=SHA256HashRate(rate=34.67, unit=SHA256Unit.TH),
                        temp=t, chip_temp=t + 8, chips=126, missing=False)
              for i, t in enumerate((60.0, 62.0, 61.0))]
    data = MinerData(ip="10.0.0.8", wattage=3068, uptime=3600, hashboards=boards,
                     fans=[Fan(speed=s) for s in (5400, 5500, 5600, 5500)])
    data.wattage_limit = 3068
    for key, value in changes.items():
        setattr(data, key, value)  # as pyasic's get_data fills MinerData: no validation
    return data


def board(rate_ths: float | None = 34.67, temp: float | None = 60.0) -> HashBoard:
    hashrate = None if rate_ths is None else SHA256HashRate(rate=rate_ths, unit=SHA256Unit.TH)
    return HashBoard(slot=0, hashrate=hashrate, temp=temp, missing=False)


# -- the field case ------------------------------------------------------------------------

def test_field_case_power_is_unknown_and_hashrate_in_ths() -> None:
    data, model = field_case()
    assert float(data.hashrate) == pytest.approx(6.816972e13)  # pyasic's sum, in H/s
    r = reading_from_data(data, model)
    assert r.power_w is None, "no wattage is unknown power, not 0 W"
    assert r.hashrate_ths == pytest.approx(68.16972)
    assert round(r.hashrate_ths, 2) == 68.17
    assert r.temp_c == 30.0
    assert r.hashboards == 3
    assert r.fan_rpm is None and r.target_w is None and r.uptime_s is None
    assert r.problems == (("power_w", "missing"),)


def site(groups: list[tuple[str, str, int]], firmware: str = "luxos",
         first_host: str = "10.20.1.10") -> SiteConfig:
    """A site file with these racks bridged; no broker is reached (nothing connects)."""
    fake_broker: Any = SimpleNamespace(host="127.0.0.1", port=1)
    start, ranges = int(ipaddress.IPv4Address(first_host)), []
    for name, _, count in groups:  # consecutive addresses, racks one after the other
        ranges.append({"group": name, "first_host": str(ipaddress.IPv4Address(start)),
                       "firmware": firmware})
        start += count
    return make_site(fake_broker, groups, bridge={"miners": ranges})


def publish_into(controller: Controller, bridge: MinerBridge, group: str) -> bytes:
    """What the bridge would publish for the group, given to the controller as MQTT would."""
    raw = telemetry_payload(time.time(), bridge.telemetry(group))
    controller.on_message(controller.topics.group(group, "telemetry"), raw)
    return raw


def test_field_case_rack_mates_are_published_and_accepted() -> None:
    cfg = site([("r", "s19j_pro", 3)], firmware="antminer")
    bridge = bridge_of(cfg)
    data, _ = field_case()
    for d, reading in zip(bridge.groups["r"], [data, healthy(), healthy()], strict=True):
        d.online = True
        d.reading = reading_from_data(reading, d.model)
    controller = Controller(cfg)
    raw = publish_into(controller, bridge, "r")

    cols = decode_group_telemetry(raw)
    assert cols.ids == ["r-0001", "r-0002", "r-0003"]
    message = json.loads(raw)
    assert message["v"] == 2 and message["power_w"][0] is None, "unknown: null, never 0"
    assert message["hashrate_ths"][0] == 68.17 and message["state"][0] == "running"
    assert message["temp_c"][0] == 30.0 and message["hashboards"][0] == 3
    assert cols.power_w[1] == 3068.0 and cols.hashrate_ths[1] == 104.01
    # The controller took all three: nothing rejected, every miner fresh.
    assert not controller.ingest.invalid
    fleet = controller.fleet
    assert np.isfinite(fleet.last_seen).all()
    assert math.isnan(fleet.power_w[0]), "unknown power stays unknown in the controller"
    assert fleet.power_w[1] == 3068.0 and fleet.power_w[2] == 3068.0
    assert fleet.hashrate_ths[0] == pytest.approx(68.17)


# -- hashrates through pyasic's own unit types ------------------------------------------

@pytest.mark.parametrize("value", [
    SHA256HashRate(rate=68.16972, unit=SHA256Unit.TH),
    SHA256HashRate(rate=68_169.72, unit=SHA256Unit.GH),
    SHA256HashRate(rate=0.06816972, unit=SHA256Unit.PH),
    GenericHashrate(rate=68_169_720_000_000, unit=GenericUnit.H),
    GenericHashrate(rate=68_169_720, unit=GenericUnit.MH),
    GenericHashrate(rate=68.16972, unit=GenericUnit.TH),
], ids=repr)
def test_hashrate_converted_with_pyasics_unit_types(value: Any) -> None:
    assert hashrate_to_ths(value) == pytest.approx(68.16972)


def test_boards_in_mixed_units_sum_in_ths() -> None:
    data = healthy(hashboards=[
        HashBoard(slot=0, hashrate=SHA256HashRate(rate=23.08974, unit=SHA256Unit.TH)),
        HashBoard(slot=1, hashrate=GenericHashrate(rate=23_309_650_000_000, unit=GenericUnit.H)),
        HashBoard(slot=2, hashrate=SHA256HashRate(rate=21_770.33, unit=SHA256Unit.GH)),
    ])
    r = reading_from_data(data, S19J_PRO)
    assert r.hashrate_ths == pytest.approx(68.16972)
    assert r.hashboards == 3


def test_a_bare_number_is_not_given_a_unit() -> None:
    with pytest.raises(TypeError, match="no pyasic unit"):
        hashrate_to_ths(68.17)
    data = healthy(hashboards=[])
    data.hashrate = 68.17  # a backend that set a float: TH/s? GH/s? not assumed
    r = reading_from_data(data, S19J_PRO)
    assert r.hashrate_ths is None
    assert ("hashrate_ths", "no_unit") in r.problems
    assert r.power_w == 3068.0


# -- None in each field the bridge reads ----------------------------------------------------

def test_healthy_reading_has_no_problems() -> None:
    r = reading_from_data(healthy(), S19J_PRO)
    assert r == FirmwareReading(power_w=3068.0, hashrate_ths=pytest.approx(104.01),
                                target_w=3068.0, temp_c=62.0, fan_rpm=5500, hashboards=3,
                                uptime_s=3600, problems=())


NONE_CASES: list[tuple[str, dict[str, Any], dict[str, Any], set[tuple[str, str]]]] = [
    ("wattage", {"wattage": None}, {"power_w": None}, {("power_w", "missing")}),
    ("wattage_limit", {"wattage_limit": None}, {"target_w": None}, set()),
    ("hashrate: no boards, no total", {"hashboards": [], "hashrate": None},
     {"hashrate_ths": None, "hashboards": None, "temp_c": None},
     {("hashrate_ths", "missing"), ("temp_c", "missing")}),
    ("hashboards [] with the firmware's total",
     {"hashboards": [], "hashrate": SHA256HashRate(rate=104.0, unit=SHA256Unit.TH)},
     {"hashrate_ths": 104.0, "hashboards": None, "temp_c": None}, {("temp_c", "missing")}),
    ("hashboards[].hashrate on every board",
     {"hashboards": [board(None, 60.0), board(None, 61.0), board(None, 62.0)]},
     {"hashrate_ths": None, "hashboards": None, "temp_c": 62.0}, {("hashrate_ths", "missing")}),
    ("hashboards[].hashrate on one board",
     {"hashboards": [board(34.67), board(None), board(34.67)]},
     {"hashrate_ths": pytest.approx(69.34), "hashboards": 2, "temp_c": 60.0}, set()),
    ("hashboards[].temp on every board",
     {"hashboards": [board(temp=None), board(temp=None), board(temp=None)]},
     {"temp_c": None, "hashrate_ths": pytest.approx(104.01)}, {("temp_c", "missing")}),
    ("hashboards[].temp on one board",
     {"hashboards": [board(temp=None), board(temp=58.0), board(temp=57.0)]},
     {"temp_c": 58.0}, set()),
    ("fans []", {"fans": []}, {"fan_rpm": None}, set()),
    ("fans[].speed", {"fans": [Fan(speed=None), Fan(speed=None)]}, {"fan_rpm": None}, set()),
    ("fans[].speed on one fan", {"fans": [Fan(speed=None), Fan(speed=5000)]},
     {"fan_rpm": 5000}, set()),
    ("uptime", {"uptime": None}, {"uptime_s": None}, set()),
    # pyasic sets fields without validation; a list that is not one is nothing read.
    ("hashboards None", {"hashboards": None},
     {"hashrate_ths": None, "hashboards": None, "temp_c": None},
     {("hashrate_ths", "unreadable"), ("temp_c", "missing")}),
    ("fans None", {"fans": None}, {"fan_rpm": None}, set()),
    ("device_info (model None)", {"device_info": DeviceInfo(make=MinerMake.ANTMINER)}, {}, set()),
]


@pytest.mark.parametrize(("changes", "expected", "problems"),
                         [c[1:] for c in NONE_CASES], ids=[c[0] for c in NONE_CASES])
def test_none_in_a_field_stays_unknown(changes: dict[str, Any], expected: dict[str, Any],
                                       problems: set[tuple[str, str]]) -> None:
    r = reading_from_data(healthy(**changes), S19J_PRO)
    base = reading_from_data(healthy(), S19J_PRO)
    for name in ("power_w", "hashrate_ths", "target_w", "temp_c", "fan_rpm", "hashboards",
                 "uptime_s"):
        want = expected.get(name, getattr(base, name))
        assert getattr(r, name) == want, name
    assert set(r.problems) == problems


# -- absurd values: unknown, with the reason ------------------------------------------------

ABSURD: list[tuple[str, MinerModel, dict[str, Any], dict[str, Any], tuple[str, str]]] = [
    ("65535 W from a PSU read fault", S21, {"wattage": 65535}, {"power_w": None},
     ("power_w", "out_of_range")),
    ("negative power", S19J_PRO, {"wattage": -20}, {"power_w": None},
     ("power_w", "out_of_range")),
    ("0 W while the boards hash", S19J_PRO, {"wattage": 0}, {"power_w": None},
     ("power_w", "zero_while_hashing")),
    ("GH/s labelled TH/s", S19J_PRO,
     {"hashboards": [board(34_670.0), board(34_670.0), board(34_670.0)]},
     {"hashrate_ths": None, "hashboards": None}, ("hashrate_ths", "out_of_range")),
    ("NaN hashrate", S19J_PRO, {"hashboards": [board(math.nan)] * 3},
     {"hashrate_ths": None}, ("hashrate_ths", "out_of_range")),
    ("a 255 degC sensor", S19J_PRO,
     {"hashboards": [board(temp=255.0), board(temp=61.0), board(temp=63.0)]},
     {"temp_c": 63.0}, ("temp_c", "out_of_range")),
    ("every sensor -64 degC", S19J_PRO, {"hashboards": [board(temp=-64.0)] * 3},
     {"temp_c": None}, ("temp_c", "out_of_range")),
    ("a 65535 rpm fan", S19J_PRO, {"fans": [Fan(speed=65535), Fan(speed=5000)]},
     {"fan_rpm": 5000}, ("fan_rpm", "out_of_range")),
    ("a 1 MW power limit", S19J_PRO, {"wattage_limit": 1_000_000}, {"target_w": None},
     ("target_w", "out_of_range")),
    ("negative uptime", S19J_PRO, {"uptime": -5}, {"uptime_s": None},
     ("uptime_s", "out_of_range")),
]


@pytest.mark.parametrize(("model", "changes", "expected", "problem"),
                         [c[1:] for c in ABSURD], ids=[c[0] for c in ABSURD])
def test_absurd_value_becomes_unknown_with_a_reason(
        model: MinerModel, changes: dict[str, Any], expected: dict[str, Any],
        problem: tuple[str, str]) -> None:
    r = reading_from_data(healthy(**changes), model)
    for name, want in expected.items():
        assert getattr(r, name) == want, name
    assert problem in r.problems
    assert r.power_w is not None or "wattage" in changes, "the other values are kept"


def test_zero_watts_asleep_is_a_reading() -> None:
    asleep = healthy(wattage=0, hashboards=[board(0.0), board(0.0), board(0.0)])
    r = reading_from_data(asleep, S19J_PRO)
    assert r.power_w == 0.0 and r.hashrate_ths == 0.0 and r.problems == ()


def test_overclocked_values_are_kept() -> None:
    """Inside twice the catalogue's maximum: a real, if unusual, reading."""
    r = reading_from_data(healthy(wattage=4200, hashboards=[board(45.0)] * 3), S19J_PRO)
    assert r.power_w == 4200.0 and r.hashrate_ths == pytest.approx(135.0) and not r.problems


# -- the bridge: state, reasons, one bad miner alone ------------------------------------

def reading(**kw: Any) -> FirmwareReading:
    base: dict[str, Any] = {"power_w": 3500.0, "hashrate_ths": 200.0, "target_w": 3500.0,
                            "temp_c": 60.0, "fan_rpm": 5000, "hashboards": 3,
                            "uptime_s": 100}
    return FirmwareReading(**{**base, **kw})


@pytest.fixture
def rack() -> MinerBridge:
    bridge = bridge_of(site([("a", "s21", 4)]))
    for d in bridge.devices.values():
        d.online = True
        d.reading = reading()
    return bridge


def states(bridge: MinerBridge, group: str = "a") -> dict[str, GroupMinerReading]:
    return {m.id: m for m in bridge.telemetry(group)}


@pytest.mark.parametrize(("kw", "last_action", "state", "reason"), [
    ({"hashrate_ths": None}, "wake", "error", "hashrate unknown"),  # not "waking at 0 TH/s"
    ({"hashrate_ths": None, "power_w": 12.0}, "wake", "sleeping", None),
    ({"hashrate_ths": None, "power_w": None}, "wake", "error", "power and hashrate unknown"),
    ({"power_w": None}, "wake", "running", None),
    ({"power_w": None, "hashrate_ths": 0.0}, "wake", "waking", None),
    ({"power_w": None, "hashrate_ths": 0.0}, "sleep", "sleeping", None),
    ({"power_w": 3500.0, "hashrate_ths": 0.0}, "sleep", "stopping", None),
])
def test_state_with_unknown_values(rack: MinerBridge, kw: dict[str, Any], last_action: str,
                                   state: str, reason: str | None) -> None:
    d = rack.devices["a-0002"]
    d.reading = reading(**kw)
    d.last_action = last_action
    got = states(rack)["a-0002"]
    assert got.state == state
    assert got.reason == reason


def test_unknown_values_in_one_miner_leave_the_rest_alone(rack: MinerBridge) -> None:
    rack.devices["a-0002"].reading = reading(power_w=None)
    rack.devices["a-0003"].reading = reading(hashrate_ths=None, temp_c=None)
    got = states(rack)
    assert len(got) == 4
    assert got["a-0002"].power_w is None and got["a-0002"].state == "running"
    assert got["a-0003"].hashrate_ths is None and got["a-0003"].state == "error"
    for ok in ("a-0001", "a-0004"):
        assert got[ok].power_w == 3500.0 and got[ok].hashrate_ths == 200.0
        assert got[ok].state == "running" and got[ok].reason is None


def test_a_value_past_the_payload_bounds_is_dropped_alone(rack: MinerBridge) -> None:
    """The backstop behind reading_from_data: the case of the field report, unconverted."""
    rack.devices["a-0002"].reading = reading(hashrate_ths=6.8e13, fan_rpm=99_999)
    with capture_logs() as logs:
        got = states(rack)
    assert len(got) == 4
    assert got["a-0002"].hashrate_ths is None and got["a-0002"].fan_rpm is None
    assert got["a-0002"].state == "error", "hashrate unknown at full power"
    assert got["a-0002"].power_w == 3500.0
    assert rack.unknown_values == {"hashrate_ths:out_of_range": 1, "fan_rpm:out_of_range": 1}
    assert {e["field"] for e in logs if e["event"] == "bridge_value_rejected"} == {
        "hashrate_ths", "fan_rpm"}
    assert got["a-0001"].hashrate_ths == 200.0


def test_a_miner_whose_reading_still_fails_is_left_out_alone(rack: MinerBridge) -> None:
    rack.devices["a-0003"].ack_seq = -1  # not a value of the reading: it cannot be dropped
    with capture_logs() as logs:
        got = states(rack)
    assert set(got) == {"a-0001", "a-0002", "a-0004"}
    assert rack.invalid_readings == 1
    assert [e["miner"] for e in logs if e["event"] == "bridge_reading_invalid"] == ["a-0003"]


# -- model/firmware pairs pyasic has no class for ------------------------------------------

def test_pyasic_classes_by_catalogue_name() -> None:
    assert pyasic_class("luxos", S21) is LUXMinerS21
    assert pyasic_class("luxos", CATALOGUE.get("s21_xp")) is None  # pyasic 0.79
    assert pyasic_class("antminer", CATALOGUE.get("s21_xp")) is not None
    # pyasic spells hydro models "HYD." in its tables.
    s21_hydro = S21.model_copy(update={"name": "Antminer S21 Hydro"})
    assert pyasic_class("braiins", s21_hydro) is (
        MINER_CLASSES[MinerTypes.BRAIINS_OS]["ANTMINER S21 HYD."])


def test_unsupported_pairs_are_announced_at_start_up() -> None:
    bridge = bridge_of(site([("xp", "s21_xp", 3), ("a", "s21", 2)]))
    assert bridge.unsupported == {("luxos", "Antminer S21 XP"): ["xp-0001", "xp-0002",
                                                                 "xp-0003"]}
    with capture_logs() as logs:
        bridge.announce_unsupported()
    [event] = [e for e in logs if e["event"] == "bridge_pyasic_unsupported"]
    assert event["log_level"] == "warning"
    assert event["firmware"] == "luxos" and event["model"] == "Antminer S21 XP"
    assert event["ids"] == ["xp-0001", "xp-0002", "xp-0003"] and event["miners"] == 3


# -- unmodified pyasic reading the simulated LuxOS API, through FirmwareMiner --------------

KEYS = ["s21", "s21_xp", "s21"]


@pytest.fixture
async def luxos() -> AsyncIterator[tuple[SimulatedFleet, LuxosApiServer]]:
    models = [CATALOGUE.get(k) for k in KEYS]
    fleet = SimulatedFleet([f"m{i}" for i in range(len(KEYS))], models, speed=100.0,
                           start_now=time.monotonic())
    fleet.step(time.monotonic())
    api = LuxosApiServer(fleet, models, first_address=free_loopback_base())
    await api.start()
    try:
        yield fleet, api
    finally:
        await api.close()


def client(api: LuxosApiServer, miner_id: str, key: str, firmware: Any = "luxos") -> FirmwareMiner:
    ep = BridgeEndpoint(miner_id, api.addresses[miner_id], api.port, "g", key, firmware)
    return FirmwareMiner(ep, CATALOGUE.get(key), timeout_s=2.0)


async def test_luxos_without_power_reads_power_unknown(
        luxos: tuple[SimulatedFleet, LuxosApiServer]) -> None:
    fleet, api = luxos
    api.set_faults(["m0"], failing=["power"])
    c = client(api, "m0", "s21")
    await c.connect()
    r = await c.read()
    assert r.power_w is None and ("power_w", "missing") in r.problems
    assert r.hashrate_ths == pytest.approx(float(fleet.hashrate_ths()[0]), rel=1e-3)
    assert c.unsupported is None


async def test_luxos_with_a_sentinel_power_reads_power_unknown(
        luxos: tuple[SimulatedFleet, LuxosApiServer]) -> None:
    _, api = luxos
    api.set_faults(["m0"], watts=65535)
    c = client(api, "m0", "s21")
    await c.connect()
    r = await c.read()
    assert r.power_w is None and ("power_w", "out_of_range") in r.problems
    api.set_faults(["m0"])
    assert (await c.read()).power_w == pytest.approx(S21.nominal_w, abs=1)


async def test_luxos_with_nothing_readable_is_a_failed_poll(
        luxos: tuple[SimulatedFleet, LuxosApiServer]) -> None:
    _, api = luxos
    api.set_faults(["m0"], failing=["power", "stats"])
    c = client(api, "m0", "s21")
    await c.connect()
    with pytest.raises(FirmwareError, match="no power or hashrate"):
        await c.read()


@pytest.mark.parametrize("firmware", ["luxos", "auto"])
async def test_luxos_on_a_model_pyasic_lacks_reads_hashrate_unknown(
        luxos: tuple[SimulatedFleet, LuxosApiServer], firmware: str) -> None:
    fleet, api = luxos
    c = client(api, "m1", "s21_xp", firmware)
    await c.connect()
    assert c.unsupported == "no pyasic class: LuxOS on Antminer S21 XP"
    r = await c.read()
    assert r.hashrate_ths is None, "pyasic 0.79's generic LuxOS class reads no hashboards"
    assert r.power_w == pytest.approx(float(fleet.power_w[1]), abs=1)
    assert ("hashrate_ths", "missing") in r.problems


async def test_bridge_poll_counts_and_logs_unknown_values_once(
        luxos: tuple[SimulatedFleet, LuxosApiServer]) -> None:
    fleet, api = luxos
    cfg = site([("a", "s21", 1), ("xp", "s21_xp", 1), ("b", "s21", 1)],
               first_host=api.addresses["m0"])
    bridge = bridge_of(cfg)
    api.set_faults(["m2"], failing=["power"])
    with capture_logs() as logs:
        await bridge.poll_once()
        await bridge.poll_once()
    assert bridge.unknown_values["power_w:missing"] == 2  # b-0001, both polls
    assert bridge.unknown_values["hashrate_ths:missing"] == 2  # xp-0001
    unknown = [e for e in logs if e["event"] == "bridge_values_unknown"]
    assert sorted((tuple(e["ids"]), tuple(e["values"])) for e in unknown) == [
        (("b-0001",), ("power_w:missing",)),
        (("xp-0001",), ("hashrate_ths:missing", "temp_c:missing"))], "once per change"
    [per_miner] = [e for e in logs if e["event"] == "bridge_miner_unsupported"]
    assert per_miner["miner"] == "xp-0001"
    assert per_miner["log_level"] == "info", "its pair was a warning at start-up already"

    xp = states(bridge, "xp")["xp-0001"]
    assert xp.state == "error" and xp.reason == "no pyasic class: LuxOS on Antminer S21 XP"
    assert xp.hashrate_ths is None and xp.power_w == pytest.approx(fleet.power_w[1], abs=1)
    assert states(bridge, "b")["b-0001"].power_w is None
    assert states(bridge, "a")["a-0001"].state == "running"

    api.set_faults(["m2"])
    with capture_logs() as logs:
        await bridge.poll_once()
    assert [e["ids"] for e in logs if e["event"] == "bridge_values_known_again"] == [["b-0001"]]



class _BuggyRead(FirmwareMiner):
    """The real client, whose read then fails as a bug would (not a firmware error)."""

    async def read(self) -> FirmwareReading:
        await super().read()
        raise RuntimeError("a bug in reading")


async def test_a_bug_reading_one_miner_does_not_stop_the_poll(
        luxos: tuple[SimulatedFleet, LuxosApiServer]) -> None:
    _, api = luxos
    cfg = site([("a", "s21", 1), ("xp", "s21_xp", 1), ("b", "s21", 1)],
               first_host=api.addresses["m0"])

    def factory(ep: BridgeEndpoint, model: MinerModel, timeout_s: float) -> FirmwareMiner:
        cls = _BuggyRead if ep.id == "b-0001" else FirmwareMiner
        return cls(ep, model, timeout_s)

    bridge = bridge_of(cfg, client_factory=factory)
    with capture_logs() as logs:
        await bridge.poll_once()
    assert bridge.devices["b-0001"].failures == 1 and bridge.devices["b-0001"].client is None
    assert [e["miner"] for e in logs if e["event"] == "bridge_poll_failed"] == ["b-0001"]
    assert states(bridge, "a")["a-0001"].state == "running"
    assert states(bridge, "b") == {}

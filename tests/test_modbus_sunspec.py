"""The SunSpec driver against a real Modbus TCP server (pymodbus' own) on loopback.

Register maps are built from the SunSpec model definitions (drivers/modbus/sunspec.py
encode_model) except in `test_hand_built_meter_map`, which lays a model 203 out register
by register from the official definition (github.com/sunspec/models json/model_203.json;
offsets from the model's ID register: Hz 16, Hz_SF 17, W 18, W_SF 22, TotWhExp 38,
TotWhImp 46, TotWh_SF 54, Evt 105-106), so the
decoding is not only checked against its own encoder. Every test stops the servers it
starts (`async with`).
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus import ModbusDeviceConfig, SunSpecPoller
from drivers.modbus.poller import CampusRole
from drivers.modbus.sunspec import (
    ModelChain,
    decode_block,
    discover,
    encode_model,
    measurement,
    model_length,
    register_map,
    unimplemented,
)
from simulators.campus_modbus import SimulatedSunSpecDevice, SunSpecModbusServer

pytestmark = pytest.mark.timeout(60)

COMMON = encode_model(1, {"Mn": "TestCo", "Md": "T-1", "SN": "0001"})


def meter_203(w: float | None = -1234.5, *, w_sf: int = -1, hz: float | None = 59.98,
              hz_sf: int | None = -2, imp_wh: float | None = 123_456_000.0,
              exp_wh: float | None = 7_000.0, tot_sf: int = 3, model_id: int = 203) -> list[int]:
    values: dict[str, Any] = {"PhV": 277.3, "Hz": hz, "W": w, "TotWhImp": imp_wh,
                              "TotWhExp": exp_wh}
    sfs = {"V_SF": -1, "W_SF": w_sf, "TotWh_SF": tot_sf, "A_SF": 0}
    if hz_sf is not None:
        sfs["Hz_SF"] = hz_sf
    elif hz is not None:
        # Hz given raw, its scale factor left at the not-implemented sentinel.
        values["Hz"] = None
        regs = encode_model(model_id, values, sfs)
        regs[16] = round(hz)
        return regs
    return encode_model(model_id, values, sfs)


def config(port: int, **kw: Any) -> ModbusDeviceConfig:
    # Generous for answers that come (a loaded CI machine), short only where tests wait for
    # a silent device.
    data: dict[str, Any] = {"id": "dev", "host": "127.0.0.1", "port": port, "unit_id": 1,
                            "timeout_s": 2.0, "poll_interval_s": 0.2}
    data.update(kw)
    return ModbusDeviceConfig(**data)


async def read_once(models: Sequence[Sequence[int]], role: CampusRole, *, base: int = 40000,
                    end_marker: bool = True, **cfg: Any) -> tuple[Any, SunSpecPoller]:
    device = SimulatedSunSpecDevice(1, register_map(models, end_marker=end_marker),
                                    base_address=base)
    async with SunSpecModbusServer([device]) as server:
        poller = SunSpecPoller(config(server.port, **cfg), role)
        try:
            return await poller.poll(), poller
        finally:
            await poller.close()


# -- discovery --------------------------------------------------------------------------


async def test_discovery_walks_the_chain_from_the_marker() -> None:
    device = SimulatedSunSpecDevice(
        1, register_map([COMMON, meter_203(), encode_model(802, {"SoC": 50.0},
                                                           {"SoC_SF": 0})]))
    async with SunSpecModbusServer([device]) as server:
        poller = SunSpecPoller(config(server.port), "poi")
        reading = await poller.poll()
        await poller.close()
    assert reading is not None and reading.available
    chain = poller.chain
    assert isinstance(chain, ModelChain)
    assert chain.base_address == 40000 and chain.complete
    assert chain.ids() == [1, 203, 802]
    # 40002: model 1 (66 registers + id and length), then 203 (105 + 2), then 802.
    assert [m.address for m in chain.models] == [40002, 40002 + 68, 40002 + 68 + 107]


@pytest.mark.parametrize("base", [40001, 50000, 0])
async def test_discovery_tries_the_other_base_addresses(base: int) -> None:
    reading, poller = await read_once([COMMON, meter_203()], "poi", base=base)
    assert poller.chain is not None and poller.chain.base_address == base
    assert reading is not None and reading.power_w == pytest.approx(-1234.5)


async def test_configured_base_address_is_the_only_one_tried() -> None:
    reading, poller = await read_once([COMMON, meter_203()], "poi", base=50000,
                                      base_address=40000)
    assert reading is None
    assert poller.failures == {"no_sunspec": 1}


async def test_no_marker_is_no_sunspec() -> None:
    device = SimulatedSunSpecDevice(1, [0] * 200)
    async with SunSpecModbusServer([device]) as server:
        poller = SunSpecPoller(config(server.port), "firm_load")
        assert await poller.poll() is None
        await poller.close()
    assert poller.failures == {"no_sunspec": 1}


async def test_truncated_chain_keeps_the_models_before_the_end() -> None:
    # The registers stop after the meter: no end marker, the next header is refused.
    reading, poller = await read_once([COMMON, meter_203()], "firm_load", end_marker=False)
    assert poller.chain is not None
    assert not poller.chain.complete and poller.chain.ids() == [1, 203]
    assert reading is not None and reading.power_w == pytest.approx(-1234.5)


async def test_model_longer_than_the_registers_is_a_failed_poll() -> None:
    meter = meter_203()
    cut = register_map([COMMON, meter], end_marker=False)[: 2 + len(COMMON) + 50]
    device = SimulatedSunSpecDevice(1, cut)
    async with SunSpecModbusServer([device]) as server:
        poller = SunSpecPoller(config(server.port, unavailable_after_polls=2), "firm_load")
        assert await poller.poll() is None
        second = await poller.poll()
        await poller.close()
    assert poller.failures == {"truncated_model": 2}
    assert second is not None and not second.available and second.power_w is None


async def test_missing_model_is_named() -> None:
    reading, poller = await read_once([COMMON, meter_203()], "generator", model=701)
    assert reading is None and poller.failures == {"model_missing": 1}
    reading, poller = await read_once([COMMON], "generator")
    assert reading is None and poller.failures == {"model_missing": 1}


async def test_a_moved_model_is_found_again() -> None:
    soc = encode_model(802, {"SoC": 40.0}, {"SoC_SF": 0})
    device = SimulatedSunSpecDevice(1, register_map([COMMON, meter_203(), soc]))
    async with SunSpecModbusServer([device]) as server:
        poller = SunSpecPoller(config(server.port), "firm_load")
        first = await poller.poll()
        # A firmware update puts the battery model first: the meter is elsewhere now.
        device.update(register_map([COMMON, soc, meter_203(w=-500.0)]))
        assert await poller.poll() is None
        third = await poller.poll()
        await poller.close()
    assert first is not None and first.power_w == pytest.approx(-1234.5)
    assert poller.failures == {"layout_changed": 1}
    assert third is not None and third.power_w == pytest.approx(-500.0)


# -- decoding ---------------------------------------------------------------------------


async def test_hand_built_meter_map() -> None:
    regs = [0x8000] * 107
    regs[0], regs[1] = 203, 105
    regs[16], regs[17] = 5998, 0xFFFE  # Hz 5998 x 10^-2
    regs[18], regs[22] = struct.unpack(">H", struct.pack(">h", -4321))[0], 1  # W
    regs[38:40] = [0, 0]  # TotWhExp: acc32 0, not accumulated
    regs[46:48] = [0x0001, 0x86A0]  # TotWhImp 100000
    regs[54] = 2  # TotWh_SF
    regs[105:107] = [0, 0]  # Evt
    reading, _ = await read_once([COMMON, regs], "firm_load")
    assert reading is not None
    assert reading.power_w == pytest.approx(-43210.0)
    assert reading.frequency_hz == pytest.approx(59.98)
    assert reading.energy_wh == pytest.approx(10_000_000.0)
    assert reading.energy_reverse_wh is None


@pytest.mark.parametrize("model_id", [201, 202, 203, 204])
async def test_meter_models_with_their_scale_factors(model_id: int) -> None:
    regs = meter_203(w=2_500_000.0, w_sf=2, imp_wh=9_876_000.0, exp_wh=12_000.0, tot_sf=3,
                     model_id=model_id)
    reading, _ = await read_once([COMMON, regs], "poi")
    assert reading is not None and reading.model_id == model_id
    assert reading.power_w == pytest.approx(2_500_000.0)  # meter: import positive
    assert reading.frequency_hz == pytest.approx(59.98)
    assert reading.voltage_v == pytest.approx(277.3)
    assert reading.energy_wh == pytest.approx(9_876_000.0)
    assert reading.energy_reverse_wh == pytest.approx(12_000.0)


async def test_a_meter_on_a_generator_reads_generation_positive() -> None:
    # The genset's output flows out of the feeder the meter measures: the meter reads it
    # as negative (export); as a generator it is positive, with the export register.
    reading, _ = await read_once([COMMON, meter_203(w=-800_000.0, w_sf=2, imp_wh=None,
                                                    exp_wh=5_000_000.0)], "generator")
    assert reading is not None
    assert reading.power_w == pytest.approx(800_000.0)
    assert reading.energy_wh == pytest.approx(5_000_000.0)
    assert reading.energy_reverse_wh is None


async def test_invert_power_flips_power_and_energy_registers() -> None:
    reading, _ = await read_once([COMMON, meter_203(w=-1000.0, w_sf=0)], "firm_load",
                                 invert_power=True)
    assert reading is not None
    assert reading.power_w == pytest.approx(1000.0)
    assert reading.energy_wh == pytest.approx(7_000.0)  # TotWhExp: the CT is reversed
    assert reading.energy_reverse_wh == pytest.approx(123_456_000.0)


@pytest.mark.parametrize(("model_id", "state"), [(101, "MPPT"), (102, "THROTTLED"),
                                                   (103, "FAULT")])
async def test_inverter_models(model_id: int, state: str) -> None:
    st = {"MPPT": 4, "THROTTLED": 5, "FAULT": 7}[state]
    regs = encode_model(model_id, {"W": 15_000_000.0, "Hz": 60.02, "WH": 2_000_000_000.0,
                                   "PhVphA": 480.5, "St": st},
                        {"W_SF": 3, "Hz_SF": -2, "WH_SF": 3, "V_SF": -1, "A_SF": 0,
                         "Tmp_SF": 0})
    reading, _ = await read_once([COMMON, regs], "generator")
    assert reading is not None and reading.model_id == model_id
    assert reading.power_w == pytest.approx(15_000_000.0)
    assert reading.frequency_hz == pytest.approx(60.02)
    assert reading.energy_wh == pytest.approx(2_000_000_000.0)
    assert reading.voltage_v == pytest.approx(480.5)
    assert reading.state == state


async def test_der_measurement_701_read_in_chunks() -> None:
    # 701 is 155 registers long: more than one Modbus read may carry (125).
    regs = encode_model(701, {"ACType": 2, "InvSt": 3, "W": -2_000_000.0, "Hz": 49.987,
                              "LNV": 230.1, "TotWhInj": 3.5e12, "TotWhAbs": 1_234_567.0,
                              "MnAlrmInfo": "none"},
                        {"W_SF": 2, "Hz_SF": -3, "V_SF": -1, "TotWh_SF": 0})
    assert len(regs) > 125
    reading, _ = await read_once([COMMON, regs], "battery")
    assert reading is not None and reading.model_id == 701
    assert reading.power_w == pytest.approx(-2_000_000.0)  # charging
    assert reading.frequency_hz == pytest.approx(49.987)
    assert reading.voltage_v == pytest.approx(230.1)
    assert reading.energy_wh == pytest.approx(3.5e12)  # discharged (injected)
    assert reading.energy_reverse_wh == pytest.approx(1_234_567.0)
    assert reading.state == "RUNNING"


async def test_battery_802_and_124() -> None:
    m802 = encode_model(802, {"SoC": 65.4, "W": 1_500_000.0, "WHRtg": 8_000_000.0,
                              "WChaRteMax": 4_000_000.0, "WDisChaRteMax": 3_000_000.0,
                              "ChaSt": 3},
                        {"SoC_SF": -1, "W_SF": 2, "WHRtg_SF": 3, "WChaDisChaMax_SF": 3})
    reading, _ = await read_once([COMMON, m802], "battery")
    assert reading is not None and reading.model_id == 802
    assert reading.soc_fraction == pytest.approx(0.654)
    assert reading.power_w == pytest.approx(1_500_000.0)  # discharging
    assert reading.capacity_wh == pytest.approx(8_000_000.0)
    assert reading.max_charge_w == pytest.approx(4_000_000.0)
    assert reading.max_discharge_w == pytest.approx(3_000_000.0)
    assert reading.state == "DISCHARGING"

    m124 = encode_model(124, {"ChaState": 12.5, "WChaMax": 2_000_000.0, "ChaSt": 4},
                        {"ChaState_SF": -1, "WChaMax_SF": 3})
    reading, _ = await read_once([COMMON, m124], "battery")
    assert reading is not None
    assert reading.soc_fraction == pytest.approx(0.125)
    assert reading.max_charge_w == pytest.approx(2_000_000.0)
    assert reading.power_w is None and reading.model_id is None  # 124 measures no power
    assert reading.state == "CHARGING"


async def test_battery_power_from_its_inverter_and_soc_from_802() -> None:
    m103 = encode_model(103, {"W": -900_000.0, "Hz": 60.0, "St": 4},
                        {"W_SF": 2, "Hz_SF": -2, "A_SF": 0, "V_SF": 0, "WH_SF": 0,
                         "Tmp_SF": 0})
    m802 = encode_model(802, {"SoC": 80.0, "W": -880_000.0}, {"SoC_SF": 0, "W_SF": 3})
    reading, _ = await read_once([COMMON, m802, m103], "battery")
    assert reading is not None and reading.model_id == 103
    assert reading.power_w == pytest.approx(-900_000.0)  # AC side, not the 802's DC
    assert reading.soc_fraction == pytest.approx(0.80)


# -- not implemented is unknown ---------------------------------------------------------


async def test_not_implemented_points_are_unknown_never_zero() -> None:
    # W (int16) 0x8000, TotWhImp and TotWhExp (acc32) 0, Hz given with Hz_SF 0x8000.
    regs = meter_203(w=None, imp_wh=None, exp_wh=None, hz=6000.0, hz_sf=None)
    assert regs[18] == 0x8000 and regs[17] == 0x8000
    assert regs[46:48] == [0, 0]
    reading, poller = await read_once([COMMON, regs], "poi")
    assert reading is not None and reading.available
    assert reading.power_w is None
    assert reading.frequency_hz is None  # a raw 6000 without its scale factor means nothing
    assert reading.energy_wh is None and reading.energy_reverse_wh is None
    assert poller.value_problems == {"203 Hz": 1}


async def test_uint_sentinels_are_unknown() -> None:
    m103 = encode_model(103, {"W": 1000.0, "Hz": None, "St": None},
                        {"W_SF": 0, "Hz_SF": -2, "A_SF": 0, "V_SF": 0, "WH_SF": 0,
                         "Tmp_SF": 0})
    assert m103[16] == 0xFFFF and m103[38] == 0xFFFF  # Hz uint16, St enum16
    m701 = encode_model(701, {"W": 1000.0, "Hz": None, "TotWhInj": None},
                        {"W_SF": 0, "Hz_SF": -3, "TotWh_SF": 0})
    assert m701[17:19] == [0xFFFF, 0xFFFF]  # Hz uint32
    m802 = encode_model(802, {"SoC": None}, {"SoC_SF": 0})
    assert m802[11] == 0xFFFF
    for model, role in ((m103, "generator"), (m701, "generator")):
        reading, _ = await read_once([COMMON, model], role)  # type: ignore[arg-type]
        assert reading is not None
        assert reading.power_w == pytest.approx(1000.0)
        assert reading.frequency_hz is None and reading.energy_wh is None
        assert reading.state is None  # St (enum16 0xFFFF) / InvSt not implemented
    reading, _ = await read_once([COMMON, m802], "battery")
    assert reading is not None and reading.soc_fraction is None


def test_sentinels_match_the_sunspec_types() -> None:
    assert unimplemented("int16") == 0x8000
    assert unimplemented("uint16") == 0xFFFF
    assert unimplemented("sunssf") == 0x8000
    assert unimplemented("enum16") == 0xFFFF
    assert unimplemented("acc16") == 0


async def test_scale_factor_outside_range_is_unknown() -> None:
    regs = meter_203(w=1000.0, w_sf=0)
    regs[22] = 11  # W_SF 11: outside -10..10
    reading, poller = await read_once([COMMON, regs], "poi")
    assert reading is not None and reading.power_w is None
    assert reading.frequency_hz == pytest.approx(59.98)
    assert poller.value_problems == {"203 W": 1}


@pytest.mark.parametrize(("hz", "hz_sf"), [(0.0, 0), (136.83, -2), (44.0, 0)])
async def test_implausible_frequency_is_unknown(hz: float, hz_sf: int) -> None:
    # A meter that cannot measure frequency reads 0; an unwired input reads noise.
    regs = encode_model(203, {"Hz": hz, "W": 10.0},
                        {"Hz_SF": hz_sf, "W_SF": 0, "A_SF": 0, "V_SF": 0, "TotWh_SF": 0})
    reading, poller = await read_once([COMMON, regs], "poi")
    assert reading is not None and reading.frequency_hz is None
    assert reading.power_w == pytest.approx(10.0)  # the rest of the reading stands
    assert poller.value_problems == {"203 frequency_hz": 1}


async def test_soc_above_100_percent_is_unknown() -> None:
    m802 = encode_model(802, {"SoC": 150.0, "W": 0.0}, {"SoC_SF": 0, "W_SF": 0})
    reading, poller = await read_once([COMMON, m802], "battery")
    assert reading is not None and reading.soc_fraction is None
    assert poller.value_problems == {"802 soc_fraction": 1}


def test_short_model_revision_leaves_later_points_unknown() -> None:
    regs = meter_203(w=100.0, w_sf=0)
    short = [203, 30, *regs[2:32]]  # an older, shorter 203: W within, energies beyond
    block = decode_block(203, short)
    m = measurement(block)
    assert m.power_out_w == pytest.approx(-100.0)
    assert m.energy_in_wh is None and m.energy_out_wh is None
    assert [p for p, _ in block.problems] == ["L"]


async def test_discover_stops_at_end_marker_only() -> None:
    regs = register_map([COMMON, meter_203()])

    async def read(address: int, count: int) -> list[int] | None:
        offset = address - 40000
        if offset < 0 or offset + count > len(regs):
            return None
        return regs[offset: offset + count]

    chain = await discover(read)
    assert chain.complete and chain.ids() == [1, 203]


# -- failures ---------------------------------------------------------------------------


async def test_device_that_stops_answering_is_unavailable_after_n_polls() -> None:
    device = SimulatedSunSpecDevice(1, register_map([COMMON, meter_203()]))
    async with SunSpecModbusServer([device]) as server:
        poller = SunSpecPoller(config(server.port, timeout_s=0.5, unavailable_after_polls=3),
                               "firm_load")
        first = await poller.poll()
        assert first is not None and first.available and poller.available is True
        device.set_silent(True)
        assert await poller.poll() is None
        assert await poller.poll() is None
        assert poller.available is True  # two failures of three: not yet
        third = await poller.poll()
        assert third is not None and not third.available
        assert third.power_w is None and third.frequency_hz is None
        assert poller.available is False
        fourth = await poller.poll()  # every further failure says so again
        assert fourth is not None and not fourth.available
        assert poller.failures == {"timeout": 4}
        device.set_silent(False)
        back = await poller.poll()
        await poller.close()
    assert back is not None and back.available and back.power_w == pytest.approx(-1234.5)
    assert poller.available is True and poller.failed_in_row == 0


async def test_server_gone_is_a_connect_failure() -> None:
    device = SimulatedSunSpecDevice(1, register_map([COMMON, meter_203()]))
    server = SunSpecModbusServer([device])
    await server.start()
    port = server.port
    poller = SunSpecPoller(config(port, unavailable_after_polls=2), "firm_load")
    try:
        assert (await poller.poll()) is not None
    finally:
        await server.stop()
    results = [await poller.poll() for _ in range(3)]
    await poller.close()
    assert results[0] is None
    assert results[1] is not None and not results[1].available
    assert set(poller.failures) <= {"connect", "connection", "timeout"}
    assert sum(poller.failures.values()) == 3


async def test_wrong_unit_id_is_a_counted_failure_not_a_crash() -> None:
    device = SimulatedSunSpecDevice(1, register_map([COMMON, meter_203()]))
    async with SunSpecModbusServer([device]) as server:
        poller = SunSpecPoller(config(server.port, unit_id=7, unavailable_after_polls=2), "poi")
        first = await poller.poll()
        second = await poller.poll()
        await poller.close()
    assert first is None
    assert second is not None and not second.available
    assert poller.failures == {"exception_gateway_no_response": 2}


async def test_readings_poll_at_the_interval_and_close() -> None:
    device = SimulatedSunSpecDevice(1, register_map([COMMON, meter_203()]))
    async with SunSpecModbusServer([device]) as server:
        poller = SunSpecPoller(config(server.port, poll_interval_s=0.1, timeout_s=1.0),
                               "firm_load")
        got = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        stream = poller.readings()
        async for reading in stream:
            got.append(reading)
            if len(got) == 4:
                break
        await stream.aclose()
        spent = loop.time() - started
    assert [r.power_w for r in got] == [pytest.approx(-1234.5)] * 4
    assert spent >= 0.3  # three intervals between four polls
    assert got[0].at_unix_s < got[-1].at_unix_s
    assert device.reads >= 4


@pytest.mark.parametrize("model_id", [101, 102, 103, 124, 201, 202, 203, 204, 701, 802])
@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_any_register_contents_decode_to_unknown_or_plausible(model_id: int,
                                                              data: st.DataObject) -> None:
    # Garbage from a device (a wrong map, a gateway's stale buffer, bytes that are not
    # UTF-8 in a string point) is unknown or a plausible number, never an exception.
    length = data.draw(st.integers(0, model_length(model_id) + 4), label="L")
    body = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=length, max_size=length))
    m = measurement(decode_block(model_id, [model_id, length, *body]))
    for name in ("power_out_w", "frequency_hz", "voltage_v", "energy_in_wh", "energy_out_wh",
                 "soc_fraction", "capacity_wh", "max_charge_w", "max_discharge_w"):
        value = getattr(m, name)
        assert value is None or math.isfinite(value), name
    assert m.frequency_hz is None or 45.0 <= m.frequency_hz <= 65.0
    assert m.soc_fraction is None or 0.0 <= m.soc_fraction <= 1.0
    assert m.power_out_w is None or abs(m.power_out_w) <= 2e9

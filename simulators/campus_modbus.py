"""The simulated campus on Modbus TCP: each device a SunSpec register map, served by pymodbus.

`SunSpecModbusServer` is pymodbus' own asynchronous Modbus TCP server on 127.0.0.1 (a
free port unless one is given), serving any number of `SimulatedSunSpecDevice`s by unit
id, as a Modbus TCP gateway would: a request for a unit id it does not serve is answered
with exception 0x0B (gateway target failed to respond). A device's registers change with
`SimulatedSunSpecDevice.update`; a device can be made to stop answering (`silent`).

`campus_devices` builds the campus's SunSpec devices (drivers/modbus/sunspec.py encodes
them from the SunSpec model definitions) and `CampusModbus.update(state)` refreshes them
from a `CampusState`; `CampusModbus.run` steps a `CampusSimulation` on the site
simulator's clock and keeps the registers current.

| unit | device              | models                  |
|------|---------------------|-------------------------|
| 1    | POI revenue meter   | 1, 203                  |
| 2    | GPU hall meter      | 1, 203                  |
| 3    | solar inverter      | 1, 103, 701             |
| 4    | genset meter        | 1, 203 (power into the genset's feeder: its output is negative) |
| 5    | battery system      | 1, 701, 124, 802        |
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus.sunspec import encode_model, register_map, scale_factor_for
from simulators.campus import CampusSimulation, CampusState

_GATEWAY_UNIT = 0  # pymodbus serves unknown unit ids from device 0: the "gateway" answer


@dataclass(eq=False)
class SimulatedSunSpecDevice:
    """One device's registers from `base_address` on, served under `unit_id`.

    `silent`: the device stops answering (requests wait until it speaks again, or the
    server stops, so a client sees a timeout).
    """

    unit_id: int
    registers: list[int]
    base_address: int = 40000
    silent: bool = False
    reads: int = 0  # read requests answered
    _awake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.unit_id <= 247:
            raise ValueError("unit_id must be 1-247 (0 is the gateway's own answer)")
        if self.base_address + len(self.registers) > 0x10000:
            raise ValueError("the registers run past address 65535")
        self._check(self.registers)

    def update(self, registers: Sequence[int]) -> None:
        """New register values (the same length: a map's layout does not change live)."""
        if len(registers) != len(self.registers):
            raise ValueError(f"{len(registers)} registers for a map of {len(self.registers)}")
        self._check(registers)
        self.registers = list(registers)

    def set_silent(self, silent: bool) -> None:
        """Stop answering requests (a device gone quiet), or answer again, held ones too."""
        self.silent = silent
        if not silent:
            self._awake.set()

    @staticmethod
    def _check(registers: Sequence[int]) -> None:
        if any(not 0 <= r <= 0xFFFF for r in registers):
            raise ValueError("a register value outside 0-65535")


class SunSpecModbusServer:
    """A pymodbus Modbus TCP server for some simulated SunSpec devices.

    An async context manager: started on enter, stopped on exit.

    Args:
        devices: The devices, one per unit id.
        host: The address to listen on.
        port: The port; 0: a free one (`port` then holds it once started).

    Raises:
        ValueError: two devices with one unit id.
    """

    def __init__(self, devices: Sequence[SimulatedSunSpecDevice], *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        ids = [d.unit_id for d in devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a unit id is used twice: {ids}")
        self.devices = {d.unit_id: d for d in devices}
        self.host = host
        self._port = port
        sim = [SimDevice(id=d.unit_id, simdata=[SimData(address=d.base_address,
                                                        values=list(d.registers),
                                                        datatype=DataType.REGISTERS)],
                         action=partial(self._serve, d))
               for d in devices]
        # Every address, so that pymodbus hands every request to the action.
        sim.append(SimDevice(id=_GATEWAY_UNIT, simdata=[SimData(address=0, count=0xFFFF, values=0,
                                                                datatype=DataType.REGISTERS)],
                             action=self._no_such_unit))
        self._server = ModbusTcpServer(sim, address=(host, port))
        self._started = False

    @property
    def port(self) -> int:
        """The port served (the one the system chose, if 0 was asked)."""
        if not self._started:
            raise RuntimeError("the server is not started")
        transport = self._server.transport
        return int(transport.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def start(self) -> None:
        """Listen and serve in the background; returns once listening."""
        await self._server.serve_forever(background=True)
        self._started = True

    async def stop(self) -> None:
        """Stop serving; requests held by silent devices are released."""
        for d in self.devices.values():
            d._awake.set()
        await self._server.shutdown()  # type: ignore[no-untyped-call]
        self._started = False

    async def __aenter__(self) -> SunSpecModbusServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _serve(self, device: SimulatedSunSpecDevice, function_code: int,  # noqa: PLR0917 (pymodbus' action signature)
                     start_address: int, address: int, count: int,
                     current_registers: list[int], set_values: list[int] | list[bool] | None
                     ) -> ExcCodes | None:
        if set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION  # the simulated devices are read-only
        if device.silent:
            device._awake.clear()
            await device._awake.wait()
            if device.silent:  # released by stop(): the answer goes nowhere
                return ExcCodes.GATEWAY_NO_RESPONSE
        # pymodbus answers from its own copy of the registers: refresh it from the device.
        offset = device.base_address - start_address
        current_registers[offset:offset + len(device.registers)] = device.registers
        device.reads += 1
        return None

    async def _no_such_unit(self, *_: object) -> ExcCodes | None:
        return ExcCodes.GATEWAY_NO_RESPONSE


# -- the campus as SunSpec devices ----------------------------------------------------------

POI_UNIT, GPU_UNIT, SOLAR_UNIT, GENSET_UNIT, BATTERY_UNIT = 1, 2, 3, 4, 5


def common_model(model: str, serial: str) -> list[int]:
    """SunSpec model 1 (common) naming a simulated device."""
    return encode_model(1, {"Mn": "mineops-sim", "Md": model, "SN": serial, "Vr": "1"})


def meter_model(kw: float | None, *, rating_kw: float, hz: float, import_kwh: float | None,
                export_kwh: float | None, volts: float = 277.0) -> list[int]:
    """Model 203 (three-phase wye meter): `kw` flows into the metered circuit."""
    w_sf = scale_factor_for(rating_kw * 1000.0 * 1.5)
    watts = None if kw is None else kw * 1000.0
    phase = None if watts is None else watts / 3.0
    return encode_model(203, {
        "A": None if watts is None else abs(watts) / volts / 1.0,
        "AphA": None if watts is None else abs(watts) / 3 / volts,
        "AphB": None if watts is None else abs(watts) / 3 / volts,
        "AphC": None if watts is None else abs(watts) / 3 / volts,
        "PhV": volts, "PhVphA": volts, "PhVphB": volts, "PhVphC": volts,
        "PPV": volts * 3 ** 0.5, "PhVphAB": volts * 3 ** 0.5, "PhVphBC": volts * 3 ** 0.5,
        "PhVphCA": volts * 3 ** 0.5,
        "Hz": hz, "W": watts, "WphA": phase, "WphB": phase, "WphC": phase,
        "TotWhImp": None if import_kwh is None else import_kwh * 1000.0,
        "TotWhExp": None if export_kwh is None else export_kwh * 1000.0,
        "Evt": 0,
    }, {"A_SF": scale_factor_for(rating_kw * 1000.0 * 1.5 / volts), "V_SF": -1, "Hz_SF": -2,
        "W_SF": w_sf, "TotWh_SF": 3})


def inverter_models(kw: float | None, *, rating_kw: float, hz: float, kwh: float,
                    state: str) -> tuple[list[int], list[int]]:
    """Models 103 (three-phase inverter) and 701 (DER AC measurement) for one inverter."""
    w_sf = scale_factor_for(rating_kw * 1000.0 * 1.2)
    watts = None if kw is None else kw * 1000.0
    st103 = {"OFF": 1, "SLEEPING": 2, "MPPT": 4, "THROTTLED": 5, "FAULT": 7}[state]
    st701 = {"OFF": 0, "SLEEPING": 1, "MPPT": 3, "THROTTLED": 4, "FAULT": 6}[state]
    m103 = encode_model(103, {
        "PhVphA": 480.0, "PhVphB": 480.0, "PhVphC": 480.0, "W": watts, "Hz": hz,
        "WH": kwh * 1000.0, "TmpCab": 35.0, "St": st103, "Evt1": 0, "Evt2": 0,
    }, {"A_SF": 0, "V_SF": -1, "W_SF": w_sf, "Hz_SF": -2, "WH_SF": 3, "Tmp_SF": -1})
    m701 = encode_model(701, {
        "ACType": 2, "St": 0 if state == "OFF" else 1, "InvSt": st701, "ConnSt": 1,
        "W": watts, "LNV": 480.0, "Hz": hz, "TotWhInj": kwh * 1000.0, "TotWhAbs": None,
    }, {"W_SF": w_sf, "V_SF": -1, "Hz_SF": -3, "TotWh_SF": 0})
    return m103, m701


def battery_models(kw: float, soc_fraction: float, *, capacity_kwh: float, max_charge_kw: float,
                   max_discharge_kw: float, hz: float, charged_kwh: float, discharged_kwh: float
                   ) -> tuple[list[int], list[int], list[int]]:
    """Models 701 (AC side), 124 (storage) and 802 (battery) for one battery system.

    `kw` is its power, discharge positive.
    """
    limit_w = max(max_charge_kw, max_discharge_kw, capacity_kwh) * 1000.0
    w_sf = scale_factor_for(limit_w * 1.2)
    status = 4 if kw < 0 else 3 if kw > 0 else 6  # CHARGING, DISCHARGING, HOLDING
    m701 = encode_model(701, {
        "ACType": 2, "St": 1, "InvSt": 3, "ConnSt": 1, "W": kw * 1000.0, "LNV": 480.0,
        "Hz": hz, "TotWhInj": discharged_kwh * 1000.0, "TotWhAbs": charged_kwh * 1000.0,
    }, {"W_SF": w_sf, "V_SF": -1, "Hz_SF": -3, "TotWh_SF": 0})
    m124 = encode_model(124, {
        "WChaMax": max_charge_kw * 1000.0, "WChaGra": 100.0, "WDisChaGra": 100.0,
        "StorCtl_Mod": 0, "ChaState": soc_fraction * 100.0, "ChaSt": status,
    }, {"WChaMax_SF": w_sf, "WChaDisChaGra_SF": 0, "ChaState_SF": -1})
    m802 = encode_model(802, {
        "AHRtg": capacity_kwh * 1000.0 / 800.0, "WHRtg": capacity_kwh * 1000.0,
        "WChaRteMax": max_charge_kw * 1000.0, "WDisChaRteMax": max_discharge_kw * 1000.0,
        "SoC": soc_fraction * 100.0, "ChaSt": status, "LocRemCtl": 0, "AlmRst": 0, "Typ": 4,
        "State": 3, "Evt1": 0, "Evt2": 0, "EvtVnd1": 0, "EvtVnd2": 0, "V": 800.0,
        "A": kw * 1000.0 / 800.0, "W": kw * 1000.0, "SetOp": 1, "SetInvState": 3,
    }, {"AHRtg_SF": scale_factor_for(capacity_kwh * 1000.0 / 800.0, signed=False),
        "WHRtg_SF": scale_factor_for(capacity_kwh * 1000.0, signed=False),
        "WChaDisChaMax_SF": scale_factor_for(limit_w, signed=False), "SoC_SF": -1,
        "V_SF": -1, "CellV_SF": -3, "A_SF": scale_factor_for(limit_w / 800.0),
        "AMax_SF": 0, "W_SF": w_sf})
    return m701, m124, m802


class CampusModbus:
    """The campus's devices on a `SunSpecModbusServer`; see the module docstring.

    Args:
        sim: The simulation whose devices it serves.
        poi_rating_kw: The POI meter's rating, kW (sets its scale factors).
    """

    def __init__(self, sim: CampusSimulation, *, poi_rating_kw: float) -> None:
        self.sim = sim
        self.poi_rating_kw = poi_rating_kw
        state = sim.step(0.0)
        self.devices = {unit: SimulatedSunSpecDevice(unit, regs)
                        for unit, regs in self._maps(state).items()}
        self.server = SunSpecModbusServer(list(self.devices.values()))

    def update(self, state: CampusState) -> None:
        """The registers of every device from `state`."""
        for unit, regs in self._maps(state).items():
            self.devices[unit].update(regs)

    def _maps(self, s: CampusState) -> dict[int, list[int]]:
        sim, e = self.sim, s.energy_kwh
        maps = {POI_UNIT: register_map([
            common_model("poi-meter", "SIM-POI"),
            meter_model(s.poi_kw, rating_kw=self.poi_rating_kw, hz=s.grid_hz,
                        import_kwh=e["poi_import"], export_kwh=e["poi_export"]),
        ])}
        if sim.gpu is not None:
            maps[GPU_UNIT] = register_map([
                common_model("gpu-hall-meter", "SIM-GPU"),
                meter_model(s.gpu_kw, rating_kw=sim.gpu.spec.capacity_kw, hz=s.grid_hz,
                            import_kwh=e["gpu"], export_kwh=None)])
        if sim.solar is not None:
            kw = s.solar_kw or 0.0
            m103, m701 = inverter_models(kw, rating_kw=sim.solar.spec.capacity_kw, hz=s.grid_hz,
                                         kwh=e["solar"], state="MPPT" if kw > 0 else "SLEEPING")
            maps[SOLAR_UNIT] = register_map([common_model("solar-inverter", "SIM-PV"),
                                             m103, m701])
        if sim.genset is not None:
            maps[GENSET_UNIT] = register_map([
                common_model("genset-meter", "SIM-GEN"),
                # The meter counts power into the genset's feeder: its output is export.
                meter_model(None if s.genset_kw is None else -s.genset_kw,
                            rating_kw=sim.genset.spec.rating_kw,
                            hz=s.genset_hz or sim.genset.spec.nominal_hz,
                            import_kwh=None, export_kwh=e["genset"])])
        if sim.battery is not None:
            b = sim.battery.spec
            maps[BATTERY_UNIT] = register_map([
                common_model("battery", "SIM-BESS"),
                *battery_models(s.battery_kw or 0.0, s.battery_soc_fraction or 0.0,
                                capacity_kwh=b.capacity_kwh, max_charge_kw=b.max_charge_kw,
                                max_discharge_kw=b.max_discharge_kw, hz=s.grid_hz,
                                charged_kwh=e.get("battery_charge", 0.0),
                                discharged_kwh=e.get("battery_discharge", 0.0))])
        return maps

    async def run(self, *, speed: float = 1.0, interval_s: float = 0.5,
                  miners_kw: Callable[[], float] = lambda: 0.0) -> None:
        """Serve until cancelled, stepping the simulation every `interval_s` of wall time.

        Simulation time is wall time since the start times `speed`, the site simulator's
        clock.
        """
        start = time.monotonic()
        async with self.server:
            while True:
                t_s = (time.monotonic() - start) * speed
                self.update(self.sim.step(t_s, miners_kw=miners_kw()))
                await asyncio.sleep(interval_s)

"""One SunSpec device polled over Modbus TCP (pymodbus), as readings in its campus role's terms.

`SunSpecPoller.poll()` reads the device once: it connects if needed, discovers the model
chain (again after any connection failure, or when a model moved), reads the model(s) its
role needs and returns a `DeviceReading`. It never raises for what the device or the
network does: a failed poll is counted by reason in `failures`, logged when the device's
state changes, and after `unavailable_after_polls` failures in a row the poll returns an
unavailable reading (every value unknown), as it does for each further failure, so that
a consumer counts the role at its worst case. `readings()` polls every
`poll_interval_s` and yields what the polls return.

Sign convention of `DeviceReading.power_w` (docs/campus.md):

- role "poi" and "firm_load": import positive: power into the site (at the point of
  interconnection) or into the load;
- role "generator" and "battery": generation positive: power out of the generator, out
  of the battery (discharge); a battery charging reads negative.

Each model's own convention is turned into the role's: a meter (201-204) counts power
into the circuit it meters as positive, an inverter (101-103, 701) counts its output as
positive, a battery (802) its discharge. `invert_power` flips a device that signs the
other way (a current transformer mounted backwards), energy registers included.

Failure reasons: connect, timeout, connection (lost mid-request), exception_<code> (a
Modbus exception response, e.g. exception_gateway_no_response for a unit id a gateway
cannot reach), no_sunspec, bad_chain, model_missing, truncated_model, layout_changed,
unexpected (a bug: logged with its traceback).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

import structlog
from pymodbus import ModbusException
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusIOException

from drivers.modbus.config import ModbusDeviceConfig
from drivers.modbus.sunspec import (
    BASE_ADDRESSES,
    METER_MODELS,
    Measurement,
    ModelBlock,
    ModelChain,
    ModelLocation,
    RegisterReader,
    SunSpecError,
    decode_block,
    discover,
    measurement,
    read_chunked,
)

log = structlog.get_logger("mineops.modbus")

CampusRole = Literal["poi", "firm_load", "generator", "battery"]
CAMPUS_ROLES: tuple[CampusRole, ...] = ("poi", "firm_load", "generator", "battery")

# The models a role reads power from when the device config names none, best first:
# the newer DER model before the 1xx inverters; a generator or battery metered by a
# plain AC meter last; 802's power is DC, so only when nothing else measures it.
POWER_MODELS: dict[CampusRole, tuple[int, ...]] = {
    "poi": METER_MODELS,
    "firm_load": METER_MODELS,
    "generator": (701, 103, 102, 101, *METER_MODELS),
    "battery": (701, 103, 102, 101, *METER_MODELS, 802),
}
SOC_MODELS = (802, 124)
_GENERATION_POSITIVE = frozenset({"generator", "battery"})
_MAX_PROBLEMS_LOGGED = 100  # distinct value problems logged per device (each only once)


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """One poll of a campus device, in its role's terms; None where unknown.

    Attributes:
        device_id: The `[[campus.modbus]]` id.
        role: What the device measures for the campus.
        at_unix_s: When the poll completed (the poller's clock), s since the epoch.
        available: False after `unavailable_after_polls` failed polls in a row: every
            value is then unknown and the role counts at its worst case.
        power_w: Active power, W: import positive for "poi" and "firm_load", generation
            (discharge) positive for "generator" and "battery".
        frequency_hz: AC frequency, Hz.
        voltage_v: AC voltage, V.
        energy_wh: The role's forward energy register, Wh: imported (poi, firm load),
            generated or discharged (generator, battery).
        energy_reverse_wh: The other direction's register, Wh (export at the POI, ...).
        soc_fraction: Battery state of charge, 0..1.
        capacity_wh: Battery nameplate energy, Wh.
        max_charge_w, max_discharge_w: Battery power limits the device reports, W.
        state: The device's operating state, as its SunSpec model names it.
        model_id: The SunSpec model power came from (None: none read).
    """

    device_id: str
    role: CampusRole
    at_unix_s: float
    available: bool = True
    power_w: float | None = None
    frequency_hz: float | None = None
    voltage_v: float | None = None
    energy_wh: float | None = None
    energy_reverse_wh: float | None = None
    soc_fraction: float | None = None
    capacity_wh: float | None = None
    max_charge_w: float | None = None
    max_discharge_w: float | None = None
    state: str | None = None
    model_id: int | None = None

    def age_s(self, now_unix_s: float) -> float:
        """How old this reading is at `now_unix_s`, s."""
        return now_unix_s - self.at_unix_s


class PollFailure(Exception):
    """One failed poll.

    Args:
        reason: A fixed label for metrics (listed in the module docstring).
        detail: What went wrong, for the log.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SunSpecPoller:
    """Polls one SunSpec device for one campus role; see the module docstring.

    Attributes:
        polls: Polls made.
        failures: Failed polls by reason.
        failed_in_row: Failed polls since the last good one.
        available: None until the first good poll or the device is declared unavailable;
            then whether it answers.
        value_problems: Values read as unknown because they were implausible or their
            scale factor was not implemented, by model point (e.g. "203 Hz").
        chain: The model chain of the last discovery (None before, and after a failure
            that calls for a new one).

    Args:
        config: The device's `[[campus.modbus]]` entry.
        role: The campus role it measures (CAMPUS_ROLES): sets the sign of its power and
            the models read.
        clock: Unix time source for the readings' timestamps (tests pass their own).

    Raises:
        ValueError: an unknown role, or soc_model on a device that is not a battery.
    """

    def __init__(self, config: ModbusDeviceConfig, role: CampusRole, *,
                 clock: Callable[[], float] = time.time) -> None:
        if role not in CAMPUS_ROLES:
            raise ValueError(f"unknown campus role {role!r}; roles: {', '.join(CAMPUS_ROLES)}")
        if config.soc_model is not None and role != "battery":
            raise ValueError(f"device {config.id!r}: soc_model is for a battery, not a {role}")
        self.config = config
        self.role: CampusRole = role
        self._clock = clock
        self._client: AsyncModbusTcpClient | None = None
        self.chain: ModelChain | None = None
        self._power: ModelLocation | None = None
        self._soc: ModelLocation | None = None
        self.polls = 0
        self.failures: Counter[str] = Counter()
        self.failed_in_row = 0
        self.available: bool | None = None
        self.value_problems: Counter[str] = Counter()
        self._logged_problems: set[str] = set()

    # -- polling ----------------------------------------------------------------------------

    async def poll(self) -> DeviceReading | None:
        """Read the device once.

        Returns:
            A reading; or, when this failure is the `unavailable_after_polls`-th in a row
            or a later one, an unavailable reading; or None for a failure before that.
            Never raises (except CancelledError).
        """
        self.polls += 1
        try:
            reading = await self._poll()
        except asyncio.CancelledError:
            raise
        except PollFailure as e:
            return self._failed(e.reason, e.detail)
        except Exception as e:  # a bug must not end the caller's loop
            log.exception("modbus_poll_failed", device=self.config.id)
            self._drop_connection()
            return self._failed("unexpected", f"{type(e).__name__}: {e}")
        if self.available is not True:
            (log.info if self.available is None else log.warning)(
                "modbus_device_available", device=self.config.id, role=self.role,
                host=self.config.host, unit_id=self.config.unit_id, model=reading.model_id,
                after_failed_polls=self.failed_in_row)
        self.available = True
        self.failed_in_row = 0
        return reading

    async def readings(self) -> AsyncIterator[DeviceReading]:
        """Poll every `poll_interval_s` forever, yielding what each poll returns.

        The period runs from the start of one poll to the next; the connection is closed
        when the iteration ends.
        """
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                reading = await self.poll()
                if reading is not None:
                    yield reading
                spent = loop.time() - started
                await asyncio.sleep(max(0.0, self.config.poll_interval_s - spent))
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the connection (a later poll opens a new one)."""
        self._drop_connection()

    # -- one poll ---------------------------------------------------------------------------

    async def _poll(self) -> DeviceReading:
        client = await self._connected()
        if self.chain is None:
            self._locate(await self._discover(client))
        assert self.chain is not None
        blocks: dict[int, ModelBlock] = {}
        for loc in {loc for loc in (self._power, self._soc) if loc is not None}:
            regs = await read_chunked(self._reader(client), loc.address, loc.registers)
            if regs is None:
                self.chain = None  # the map may have changed: look again next poll
                raise PollFailure("truncated_model", f"model {loc.model_id} at {loc.address} "
                                  f"claims {loc.length} registers; the device refuses them")
            try:
                blocks[loc.model_id] = decode_block(loc.model_id, regs)
            except SunSpecError as e:
                self.chain = None
                raise PollFailure(e.reason, e.detail) from None
        return self._reading(blocks)

    async def _connected(self) -> AsyncModbusTcpClient:
        if self._client is not None and self._client.connected:
            return self._client
        self._drop_connection()
        cfg = self.config
        # pymodbus' own reconnecting and retrying are off: a poll is one attempt, and the
        # poller counts and paces them itself.
        client = AsyncModbusTcpClient(cfg.host, port=cfg.port, timeout=cfg.timeout_s, retries=0,
                                      reconnect_delay=0, name=f"mineops-{cfg.id}")
        try:
            async with asyncio.timeout(cfg.timeout_s * 2):
                ok = await client.connect()
        except (TimeoutError, OSError, ModbusException) as e:
            ok = False
            why = f"{type(e).__name__}: {e}"
        else:
            why = "connection refused or timed out"
        if not ok:
            client.close()
            raise PollFailure("connect", f"{cfg.host}:{cfg.port}: {why}")
        self._client = client
        self.chain = None  # a device that reconnects may have restarted with a new map
        return client

    def _drop_connection(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _reader(self, client: AsyncModbusTcpClient) -> RegisterReader:
        async def read(address: int, count: int) -> list[int] | None:
            cfg = self.config
            try:
                # pymodbus times out on its own; this bounds a request whatever it does.
                async with asyncio.timeout(cfg.timeout_s * 2):
                    rr = await client.read_holding_registers(address, count=count,
                                                             device_id=cfg.unit_id)
            except TimeoutError:
                self._drop_connection()
                raise PollFailure("timeout", f"no answer within {cfg.timeout_s:g} s "
                                  f"(read {count} at {address}, unit {cfg.unit_id})") from None
            except ModbusIOException as e:
                self._drop_connection()
                raise PollFailure("timeout", f"{e} (read {count} at {address}, "
                                  f"unit {cfg.unit_id})") from None
            except (ConnectionException, OSError) as e:
                self._drop_connection()
                raise PollFailure("connection", str(e)) from None
            if rr.isError():
                code = getattr(rr, "exception_code", None)
                if code == ExcCodes.ILLEGAL_ADDRESS:
                    return None
                name = _exception_name(code)
                raise PollFailure(f"exception_{name}", f"the device answered exception {code} "
                                  f"({name}) to a read of {count} at {address}, unit "
                                  f"{cfg.unit_id}")
            regs = list(rr.registers)
            if len(regs) != count:
                raise PollFailure("connection", f"asked {count} registers at {address}, "
                                  f"got {len(regs)}")
            return regs
        return read

    async def _discover(self, client: AsyncModbusTcpClient) -> ModelChain:
        cfg = self.config
        bases = BASE_ADDRESSES if cfg.base_address is None else (cfg.base_address,)
        try:
            chain = await discover(self._reader(client), bases)
        except SunSpecError as e:
            raise PollFailure(e.reason, e.detail) from None
        if not chain.complete:
            log.warning("modbus_chain_truncated", device=self.config.id, models=chain.ids(),
                        base=chain.base_address,
                        detail="the registers end before the end marker (0xFFFF): the "
                        "models before are read")
        else:
            log.debug("modbus_chain", device=self.config.id, models=chain.ids(),
                      base=chain.base_address)
        return chain

    def _locate(self, chain: ModelChain) -> None:
        """Pick the power and state-of-charge models from `chain` (sets self.chain)."""
        cfg = self.config
        wanted = (cfg.model,) if cfg.model is not None else POWER_MODELS[self.role]
        power = next((loc for m in wanted if (loc := chain.find(m)) is not None), None)
        if power is None and cfg.model is not None:
            raise PollFailure("model_missing", f"the device has models {chain.ids()}, not "
                              f"{cfg.model} (the `model` configured)")
        soc = None
        if self.role == "battery":
            soc_wanted = (cfg.soc_model,) if cfg.soc_model is not None else SOC_MODELS
            soc = next((loc for m in soc_wanted if (loc := chain.find(m)) is not None), None)
            if soc is None and cfg.soc_model is not None:
                raise PollFailure("model_missing", f"the device has models {chain.ids()}, "
                                  f"not {cfg.soc_model} (the `soc_model` configured)")
        if power is None and soc is None:
            raise PollFailure("model_missing", f"the device has models {chain.ids()}, none "
                              f"that a {self.role} reads ({', '.join(map(str, wanted))})")
        self.chain, self._power, self._soc = chain, power, soc

    def _reading(self, blocks: dict[int, ModelBlock]) -> DeviceReading:
        power = soc = None
        if self._power is not None:
            power = measurement(blocks[self._power.model_id])
            self._note_problems(blocks[self._power.model_id])
        if self._soc is not None:
            if self._power is not None and self._soc.model_id == self._power.model_id:
                soc = power
            else:
                soc = measurement(blocks[self._soc.model_id])
                self._note_problems(blocks[self._soc.model_id])
        generation = self.role in _GENERATION_POSITIVE
        sign = (1.0 if generation else -1.0) * (-1.0 if self.config.invert_power else 1.0)
        forward_out = generation != self.config.invert_power
        p = power
        return DeviceReading(
            device_id=self.config.id, role=self.role, at_unix_s=self._clock(),
            power_w=None if p is None or p.power_out_w is None else p.power_out_w * sign,
            frequency_hz=None if p is None else p.frequency_hz,
            voltage_v=None if p is None else p.voltage_v,
            energy_wh=None if p is None else (p.energy_out_wh if forward_out else p.energy_in_wh),
            energy_reverse_wh=None if p is None else (
                p.energy_in_wh if forward_out else p.energy_out_wh),
            soc_fraction=None if soc is None else soc.soc_fraction,
            capacity_wh=_first(soc, p, "capacity_wh"),
            max_charge_w=_first(soc, p, "max_charge_w"),
            max_discharge_w=_first(soc, p, "max_discharge_w"),
            state=(p.state if p is not None and p.state is not None
                   else None if soc is None else soc.state),
            model_id=None if p is None else p.model_id,
        )

    def _note_problems(self, block: ModelBlock) -> None:
        for point, why in block.problems:
            key = f"{block.model_id} {point}"
            self.value_problems[key] += 1
            if key not in self._logged_problems and \
                    len(self._logged_problems) < _MAX_PROBLEMS_LOGGED:
                self._logged_problems.add(key)
                log.warning("modbus_value_unknown", device=self.config.id, model=block.model_id,
                            point=point, why=why)

    def _failed(self, reason: str, detail: str) -> DeviceReading | None:
        self.failures[reason] += 1
        self.failed_in_row += 1
        cfg = self.config
        if self.failed_in_row == 1 and self.available is not False:
            log.warning("modbus_poll_failed", device=cfg.id, role=self.role, reason=reason,
                        detail=detail, host=cfg.host, port=cfg.port, unit_id=cfg.unit_id)
        if self.failed_in_row < cfg.unavailable_after_polls:
            return None
        if self.available is not False:
            self.available = False
            log.error("modbus_device_unavailable", device=cfg.id, role=self.role,
                      failed_polls=self.failed_in_row, reason=reason, detail=detail,
                      host=cfg.host, port=cfg.port, unit_id=cfg.unit_id)
        return DeviceReading(device_id=cfg.id, role=self.role, at_unix_s=self._clock(),
                             available=False)


def _first(a: Measurement | None, b: Measurement | None, name: str) -> float | None:
    """A quantity from `a`, else from `b` (a battery's limits: its storage model first)."""
    for m in (a, b):
        v = getattr(m, name) if m is not None else None
        if v is not None:
            return float(v)
    return None


def _exception_name(code: int | None) -> str:
    try:
        return ExcCodes(code).name.lower() if code is not None else "unknown"
    except ValueError:
        return f"code_{code}"


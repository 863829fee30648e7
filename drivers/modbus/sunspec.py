"""SunSpec over Modbus: finding a device's models, and turning their registers into numbers.

Format (SunSpec Information Model Specification; the model definitions are the SunSpec
Alliance's own, github.com/sunspec/models, as shipped in its pysunspec2 package):

- A SunSpec device holds the marker "SunS" (registers 0x5375 0x6E53) at a base address,
  40000 by convention (register "40001" counted from 1), else 50000 or 0; some devices
  are off by one and use 40001.
- The models follow one another from base + 2: each starts with its id and its length L
  (the registers after those two), and the chain ends with id 0xFFFF (length 0).
- A point is int16/uint16/enum16/bitfield16/acc16/sunssf (1 register), int32/uint32/
  acc32/enum32/bitfield32/float32 (2), int64/uint64/acc64 (4), or a string; a scaled
  point's value is its integer times 10^SF, SF read from the sunssf point the definition
  names (-10..10).
- A point the device does not implement holds a sentinel: 0x8000 (int16, sunssf),
  0xFFFF (uint16, enum16, bitfield16), 0x80000000 (int32), 0xFFFFFFFF (uint32, enum32),
  0 (acc16, acc32, acc64: an accumulator that reads 0 has not accumulated), NaN
  (float32), 0x8000000000000000 / 0xFFFFFFFFFFFFFFFF (int64/uint64), NULs (string).

Here a not-implemented point, or a point whose scale factor is not implemented, is
unknown (None), never zero. pysunspec2 does the per-type work (offsets, widths,
sentinels); its own Modbus client is blocking, so the I/O is pymodbus's (poller.py).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import sunspec2.device as ss_device
import sunspec2.mb as ss_mb

SUNS_MARKER = (0x5375, 0x6E53)  # "SunS"
BASE_ADDRESSES = (40000, 40001, 50000, 0)
END_MODEL_ID = 0xFFFF
COMMON_MODEL_ID = 1
MAX_READ_REGISTERS = 125  # Modbus: read holding registers carries at most 125
MAX_MODELS = 100  # a longer chain is a device reading garbage, not a real map
SCALE_FACTOR_RANGE = (-10, 10)

# The same physical bounds as a meter reading (drivers/meters/base.py).
POWER_LIMIT_W = 2e9
GRID_BAND_HZ = (45.0, 65.0)

METER_MODELS = (201, 202, 203, 204)
INVERTER_MODELS = (101, 102, 103, 701)
STORAGE_MODELS = (124, 802)
SUPPORTED_MODELS = frozenset(METER_MODELS + INVERTER_MODELS + STORAGE_MODELS)


class SunSpecError(Exception):
    """A device whose SunSpec map cannot be used.

    Args:
        reason: A fixed label for metrics (below).
        detail: What was found, for the log.

    Reasons: no_sunspec (no marker at any base address), model_missing (the chain lacks
    the model to read), truncated_model (a model's registers end before its length),
    bad_chain (a chain that loops, overflows the address space or never ends),
    layout_changed (a model is no longer where discovery found it).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Reads `count` holding registers at `address`: the registers, or None when the device
# answers that the address does not exist (Modbus exception 2). Any other failure raises.
RegisterReader = Callable[[int, int], Awaitable[list[int] | None]]


@dataclass(frozen=True, slots=True)
class ModelLocation:
    """One model of a device's chain: its id, the address of its id register, its length L."""

    model_id: int
    address: int
    length: int

    @property
    def registers(self) -> int:
        """Registers the model occupies, id and length included."""
        return self.length + 2


@dataclass(frozen=True, slots=True)
class ModelChain:
    """A device's SunSpec map as discovery found it.

    Attributes:
        base_address: Where "SunS" is.
        models: The models in chain order.
        complete: Whether the chain ended with the end marker (0xFFFF); False when the
            registers ran out first (the models before that are still read).
    """

    base_address: int
    models: tuple[ModelLocation, ...]
    complete: bool

    def find(self, model_id: int) -> ModelLocation | None:
        """The first model with this id, or None."""
        return next((m for m in self.models if m.model_id == model_id), None)

    def ids(self) -> list[int]:
        """The model ids in chain order (a device may repeat one)."""
        return [m.model_id for m in self.models]


async def read_chunked(read: RegisterReader, address: int, count: int) -> list[int] | None:
    """`count` registers from `address`, in requests of at most 125; None if any is refused."""
    out: list[int] = []
    while len(out) < count:
        n = min(MAX_READ_REGISTERS, count - len(out))
        regs = await read(address + len(out), n)
        if regs is None:
            return None
        out.extend(regs)
    return out


async def discover(read: RegisterReader, base_addresses: Sequence[int] = BASE_ADDRESSES
                   ) -> ModelChain:
    """Find the "SunS" marker and walk the model chain.

    Raises:
        SunSpecError: no_sunspec when no base address holds the marker; bad_chain for a
            chain without end (more than MAX_MODELS models, or past register 65535).
        Whatever `read` raises for I/O failures (a timeout is not "no marker here").
    """
    base = None
    for candidate in base_addresses:
        regs = await read(candidate, 2)
        if regs is not None and tuple(regs) == SUNS_MARKER:
            base = candidate
            break
    if base is None:
        where = ", ".join(str(a) for a in base_addresses)
        raise SunSpecError("no_sunspec", f"no 'SunS' marker at {where}: not a SunSpec device, "
                           "or the wrong unit id or base address")
    models: list[ModelLocation] = []
    address = base + 2
    while len(models) < MAX_MODELS:
        if address > 0xFFFF - 1:
            raise SunSpecError("bad_chain", f"the chain runs past register 65535 after "
                               f"models {[m.model_id for m in models]}")
        header = await read(address, 2)
        if header is None or header[0] == 0:
            # The registers end (or read as zeros) where the next header should be: a
            # map without its end marker. The models before are whole, so they are kept.
            return ModelChain(base, tuple(models), complete=False)
        model_id, length = header
        if model_id == END_MODEL_ID:
            return ModelChain(base, tuple(models), complete=True)
        models.append(ModelLocation(model_id, address, length))
        address += 2 + length
    raise SunSpecError("bad_chain", f"more than {MAX_MODELS} models: the chain never ends")


@cache
def _scale_factor_names(model_id: int) -> Mapping[str, str | int]:
    """Each scaled point's scale factor: a sunssf point's name, or a fixed power of ten."""
    mdef = ss_device.get_model_def(model_id)
    out: dict[str, str | int] = {}
    for p in mdef["group"].get("points", []):
        sf = p.get("sf")
        if sf is None:
            continue
        try:
            out[p["name"]] = int(sf)
        except ValueError:
            out[p["name"]] = str(sf)
    return out


@cache
def _symbols(model_id: int) -> Mapping[str, Mapping[int, str]]:
    """Each enum point's {value: symbol name}, from the model definition."""
    mdef = ss_device.get_model_def(model_id)
    return {p["name"]: {int(s["value"]): str(s["name"]) for s in p["symbols"]}
            for p in mdef["group"].get("points", []) if p.get("symbols")}


@cache
def model_length(model_id: int) -> int:
    """L of a model as its definition has it (registers after id and length)."""
    return int(ss_device.Model(model_id=model_id).len) - 2


@dataclass(frozen=True, slots=True)
class ModelBlock:
    """One model's registers, decoded by its definition.

    `raw` holds each fixed point's integer (or string) value as the device sent it, None
    where the device does not implement the point or its block ended before it.
    `problems` collects (point, why) for each value read as unknown although the device
    sent one (a scale factor missing or out of range, an implausible value).
    """

    model_id: int
    raw: Mapping[str, Any]
    problems: list[tuple[str, str]] = field(default_factory=list)

    def value(self, name: str) -> float | None:
        """A point's value in its unit, its scale factor applied.

        None if it, or its scale factor, is not implemented, or the scale factor is
        outside -10..10.
        """
        v = self.raw.get(name)
        if v is None or isinstance(v, str):
            return None
        sf_ref = _scale_factor_names(self.model_id).get(name)
        if sf_ref is None:
            return float(v)
        sf = sf_ref if isinstance(sf_ref, int) else self.raw.get(sf_ref)
        if sf is None:
            self.problems.append((name, f"scale factor {sf_ref} not implemented"))
            return None
        if not SCALE_FACTOR_RANGE[0] <= sf <= SCALE_FACTOR_RANGE[1]:
            self.problems.append((name, f"scale factor {sf_ref} = {sf} outside -10..10"))
            return None
        return float(v) * 10.0 ** sf

    def symbol(self, name: str) -> str | None:
        """An enum point's symbol (e.g. "MPPT"), its number if the model names none, or None."""
        v = self.raw.get(name)
        if v is None or isinstance(v, str):
            return None
        return _symbols(self.model_id).get(name, {}).get(int(v), str(v))


def decode_block(model_id: int, registers: Sequence[int]) -> ModelBlock:
    """A model's registers (its id and length first) decoded by the model's definition.

    A block shorter than the definition (an older revision of the model) leaves the
    points past its end unknown; one longer has its extra registers ignored.

    Raises:
        SunSpecError: layout_changed if the block does not start with `model_id`.
    """
    if len(registers) < 2 or registers[0] != model_id:
        got = registers[0] if registers else "nothing"
        raise SunSpecError("layout_changed", f"expected model {model_id} here, found {got}")
    data = struct.pack(f">{len(registers)}H", *registers)
    model = ss_device.Model(model_id=model_id, model_len=registers[1], data=data)
    raw = {name: p.value for name, p in model.points.items() if name not in ("ID", "L")}
    problems = []
    if model.error_info and registers[1] < model_length(model_id):
        problems.append(("L", f"{registers[1]} registers long, the definition "
                         f"{model_length(model_id)}: the points past the end are unknown"))
    return ModelBlock(model_id, raw, problems)


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one model says of its equipment, in the model's own terms.

    Attributes:
        model_id: The SunSpec model read.
        power_out_w: Active power out of the measured equipment, W (generation positive):
            an inverter's or a battery's output; minus what a meter sees flow into the
            circuit it meters. None when unknown.
        frequency_hz: AC frequency, Hz (None for DC models or outside 45-65 Hz).
        voltage_v: AC line-to-neutral voltage, V (line-to-line where only that is given).
        energy_in_wh: Energy into the equipment, Wh (a meter's import register, a DER's
            absorbed energy).
        energy_out_wh: Energy out of the equipment, Wh (a meter's export register, an
            inverter's lifetime production).
        soc_fraction: State of charge, 0..1.
        capacity_wh: Nameplate energy capacity, Wh (802).
        max_charge_w, max_discharge_w: Charge and discharge power limits, W.
        state: The model's operating state as its symbol (e.g. "MPPT", "FAULT", "CHARGING").
    """

    model_id: int
    power_out_w: float | None = None
    frequency_hz: float | None = None
    voltage_v: float | None = None
    energy_in_wh: float | None = None
    energy_out_wh: float | None = None
    soc_fraction: float | None = None
    capacity_wh: float | None = None
    max_charge_w: float | None = None
    max_discharge_w: float | None = None
    state: str | None = None


def measurement(block: ModelBlock) -> Measurement:
    """The quantities mineops uses from one decoded model.

    Implausible values become unknown, with a line in `block.problems`.
    """
    b, mid = block, block.model_id
    if mid in METER_MODELS:
        into = b.value("W")
        # 201 (single phase) may give only phase A's voltage; PhV is the mean of the phases.
        volts = b.value("PhV")
        if volts is None:
            volts = b.value("PhVphA")
        m = Measurement(
            mid, power_out_w=None if into is None else -into, frequency_hz=b.value("Hz"),
            voltage_v=volts, energy_in_wh=b.value("TotWhImp"), energy_out_wh=b.value("TotWhExp"))
    elif mid in (101, 102, 103):
        m = Measurement(
            mid, power_out_w=b.value("W"), frequency_hz=b.value("Hz"),
            voltage_v=b.value("PhVphA"), energy_out_wh=b.value("WH"), state=b.symbol("St"))
    elif mid == 701:
        volts = b.value("LNV")
        m = Measurement(
            mid, power_out_w=b.value("W"), frequency_hz=b.value("Hz"),
            voltage_v=volts if volts is not None else b.value("LLV"),
            energy_in_wh=b.value("TotWhAbs"), energy_out_wh=b.value("TotWhInj"),
            state=b.symbol("InvSt") or b.symbol("St"))
    elif mid == 124:
        m = Measurement(
            mid, soc_fraction=_percent(b, "ChaState"), max_charge_w=b.value("WChaMax"),
            state=b.symbol("ChaSt"))
    elif mid == 802:
        m = Measurement(
            mid, power_out_w=b.value("W"), soc_fraction=_percent(b, "SoC"),
            capacity_wh=b.value("WHRtg"), max_charge_w=b.value("WChaRteMax"),
            max_discharge_w=b.value("WDisChaRteMax"),
            state=b.symbol("ChaSt") or b.symbol("State"))
    else:
        raise ValueError(f"model {mid} is not one mineops reads")
    return _plausible(m, block.problems)


def _percent(block: ModelBlock, name: str) -> float | None:
    v = block.value(name)
    return None if v is None else v / 100.0


def _plausible(m: Measurement, problems: list[tuple[str, str]]) -> Measurement:
    """`m` with each value outside physical bounds replaced by None (and said in `problems`)."""
    changes: dict[str, Any] = {}

    def reject(name: str, value: float, why: str) -> None:
        problems.append((name, f"{value:g}: {why}"))
        changes[name] = None

    for name in ("power_out_w", "max_charge_w", "max_discharge_w"):
        v = getattr(m, name)
        if v is not None and not abs(v) <= POWER_LIMIT_W:
            reject(name, v, f"beyond {POWER_LIMIT_W:g} W")
    for name in ("energy_in_wh", "energy_out_wh", "capacity_wh"):
        v = getattr(m, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            reject(name, v, "not a non-negative number")
    if m.frequency_hz is not None and not GRID_BAND_HZ[0] <= m.frequency_hz <= GRID_BAND_HZ[1]:
        low, high = GRID_BAND_HZ
        reject("frequency_hz", m.frequency_hz, f"outside {low:g}-{high:g} Hz")
    if m.voltage_v is not None and not 0 <= m.voltage_v <= 1e6:
        reject("voltage_v", m.voltage_v, "outside 0-1 MV")
    if m.soc_fraction is not None and not 0.0 <= m.soc_fraction <= 1.0:
        reject("soc_fraction", m.soc_fraction * 100, "% outside 0-100 %")
    return dataclasses.replace(m, **changes) if changes else m


# -- encoding (the simulator's Modbus server, tests) ----------------------------------------

def unimplemented(point_type: str) -> int:
    """The sentinel of a one-register point type, e.g. 0x8000 for int16."""
    return int(struct.unpack(">H", ss_mb.create_unimpl_value(point_type, len=2)[:2])[0])


def scale_factor_for(max_abs_value: float, signed: bool = True) -> int:
    """The smallest scale factor at which `max_abs_value` fits a 16-bit register."""
    limit = 32767 if signed else 65534
    sf = -3
    while max_abs_value / 10.0 ** sf > limit and sf < SCALE_FACTOR_RANGE[1]:
        sf += 1
    return sf


def encode_model(model_id: int, values: Mapping[str, float | str | None],
                 scale_factors: Mapping[str, int] | None = None) -> list[int]:
    """A model's registers (id and length first) holding `values` in their units.

    Each scale factor point (e.g. "W_SF") takes its value from `scale_factors`; a point
    left out, or given as None, holds its not-implemented sentinel.

    Raises:
        ValueError: an unknown point name, or a value that does not fit its type at its
            scale factor.
    """
    model = ss_device.Model(model_id=model_id)
    sf_names = _scale_factor_names(model_id)
    for name, sf in (scale_factors or {}).items():
        if name not in model.points:
            raise ValueError(f"model {model_id} has no point {name}")
        model.points[name].set_value(sf)
    for name, value in values.items():
        if name not in model.points:
            raise ValueError(f"model {model_id} has no point {name}")
        if value is None or isinstance(value, str):
            model.points[name].set_value(value)
            continue
        sf_ref = sf_names.get(name)
        sf = 0
        if isinstance(sf_ref, int):
            sf = sf_ref
        elif sf_ref is not None:
            got = (scale_factors or {}).get(sf_ref)
            if got is None:
                raise ValueError(f"model {model_id} {name}: give its scale factor {sf_ref}")
            sf = got
        model.points[name].set_value(round(value / 10.0 ** sf))
    try:
        data = model.get_mb()
    except ss_device.ModelError as e:
        raise ValueError(f"model {model_id}: {e}") from None
    return list(struct.unpack(f">{len(data) // 2}H", data))


def register_map(models: Sequence[Sequence[int]], *, end_marker: bool = True) -> list[int]:
    """A device's SunSpec registers from its base address: "SunS", the models, the end."""
    out = list(SUNS_MARKER)
    for regs in models:
        out.extend(regs)
    if end_marker:
        out.extend((END_MODEL_ID, 0))
    return out

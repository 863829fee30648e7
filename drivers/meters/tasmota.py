"""Tasmota energy monitors: the ENERGY block of tele/<topic>/SENSOR and stat/<topic>/STATUS8.

Tasmota's units: Total, Today, Yesterday, ImportActive and ExportActive in kWh; Power
in W; ApparentPower in VA; ReactivePower in var; Voltage in V; Current in A; Factor
unitless; Frequency in Hz. Multi-channel devices (three-phase meters, two-channel
relays) send arrays, one value per channel, all of one length (arrays of different
lengths are bad_value: which channel a value belongs to is then unknown); a single
value beside arrays is common to every channel. Power, currents and energies are
summed over every channel; voltage and frequency come from the live channels only
(drivers.meters.base.grid_voltage_frequency), so an unwired phase (~0.1 V, a noise
frequency) neither poisons them nor drops the reading. With one `Voltage` for several
channels, a channel's own `Current` or `Power` shows whether its frequency is the grid's.

Registers: `ImportActive` (a meter's own import register, e.g. an SDM630 over Modbus)
is the import register when present. `Total` is Tasmota's own count: it adds the
energy of every interval with its sign (xdrv_03_energy.ino), so on a device that
measures export (one that sends `ExportActive`) it is net of export, and on some Modbus
meters it is import plus export; it is read as the import register only when the
device reports neither `ImportActive` nor `ExportActive`, and not when it is negative
(then the device measures export after all: import unknown, noted out_of_range; the
power stands). `ExportActive` is the export register. STATUS8 (and its newer name
STATUS10) wrap the same block in `StatusSNS`. Every message is complete, so the driver
keeps no state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator
from typing_extensions import override

from controller.config_types import TOPIC_LEVEL_PATTERN, MeterBase
from controller.protocol.payloads import PayloadError
from drivers.meters.base import (
    MeterDriver,
    MeterReading,
    UnknownValue,
    as_number,
    combined_power_factor,
    grid_voltage_frequency,
    load_json,
    register_sum,
)

MAX_BYTES = 16 * 1024  # SENSOR also carries any other sensors on the device
MAX_CHANNELS = 16
STATUS_LEAVES = ("STATUS8", "STATUS10")
# The ENERGY fields the reading uses besides Power, and the reading's key each gives.
FIELD_OF = {"ImportActive": "energy_import_wh", "ExportActive": "energy_export_wh",
            "Total": "energy_import_wh", "Voltage": "voltage_v", "Current": "current_a",
            "Frequency": "frequency_hz", "ApparentPower": "power_factor",
            "Factor": "power_factor"}
# Arrays among them must have one length.
READ_FIELDS = ("Power", *FIELD_OF)
_TOTAL_HINT = (": Total is net of export on a device that measures export, so it is no "
               "import register")


class TasmotaMeter(MeterBase):
    """A Tasmota energy monitor: the ENERGY block on tele/<topic>/SENSOR, stat/<topic>/STATUS8."""

    type: Literal["tasmota"]
    topic: str = Field(pattern=TOPIC_LEVEL_PATTERN,
                       description="The device's %topic% (Tasmota `Topic`)")
    full_topic: str = Field(
        default="%prefix%/%topic%/", max_length=128,
        description="The device's FullTopic (Tasmota `FullTopic`); %prefix% and %topic% are "
        "filled in",
    )

    @field_validator("full_topic")
    @classmethod
    def _check_full_topic(cls, value: str) -> str:
        if "%prefix%" not in value:
            raise ValueError("full_topic must contain %prefix% (tele/stat tell readings apart)")
        if any(c in value for c in "#+ ") or value.startswith("/"):
            raise ValueError("full_topic must not hold wildcards, spaces or a leading /")
        return value

    def device_topic(self, prefix: str, leaf: str) -> str:
        """A topic of this device: `prefix` (tele, stat, cmnd) and `leaf` in its FullTopic.

        For example ("tele", "SENSOR") gives tele/<topic>/SENSOR with the default FullTopic.
        """
        full = self.full_topic.replace("%prefix%", prefix).replace("%topic%", self.topic)
        return f"{full.rstrip('/')}/{leaf}"

    @property
    @override
    def source(self) -> str:
        return self.device_topic("tele", "SENSOR")


class TasmotaDriver(MeterDriver[TasmotaMeter]):
    """One Tasmota device.

    Args:
        config: Its `[[meters]]` table.
    """

    name = "tasmota"

    def __init__(self, config: TasmotaMeter) -> None:
        super().__init__(config)
        self.sensor_topic = config.device_topic("tele", "SENSOR")
        self.status_topics = tuple(config.device_topic("stat", leaf) for leaf in STATUS_LEAVES)

    @override
    def subscriptions(self) -> list[str]:
        return [self.sensor_topic, *self.status_topics]

    @override
    def exact_topics(self) -> list[str]:
        return self.subscriptions()

    @override
    def decode(self, topic: str, raw: bytes) -> MeterReading | None:
        data = load_json(raw, MAX_BYTES)
        if topic == self.sensor_topic:
            body: Any = data
        elif topic in self.status_topics:
            body = data.get("StatusSNS")
            if not isinstance(body, dict):
                raise PayloadError("bad_schema", "StatusSNS: missing or not an object")
        else:
            raise PayloadError("unknown_topic", f"not a topic of Tasmota {self.config.id}")
        energy = body.get("ENERGY")
        if not isinstance(energy, dict):
            raise PayloadError("bad_schema", "ENERGY: missing or not an object")
        _same_lengths(energy)
        power = _channels(energy, "Power")
        if power is None:
            raise PayloadError("bad_schema", "ENERGY.Power: missing")
        # Total is the import register only on a device that sends neither register (even
        # a bad ImportActive is not replaced by it: Total counts something else there).
        import_key = ("Total" if energy.get("ImportActive") is None
                      and energy.get("ExportActive") is None else "ImportActive")
        notes: list[UnknownValue] = []
        values = {key: _optional(energy, key, notes) for key in FIELD_OF
                  if key not in ("Total", "ImportActive") or key == import_key}
        export = _register(values, "ExportActive", notes)
        imported = _register(values, import_key, notes,
                             _TOTAL_HINT if import_key == "Total" else "")
        current = values["Current"]
        currents = _every(current)
        grid = grid_voltage_frequency(
            values["Voltage"] or [], values["Frequency"] or [], currents_a=current or [],
            powers_w=power)
        return MeterReading(
            power_w=sum(power),
            energy_import_wh=imported,
            energy_export_wh=export,
            voltage_v=grid.voltage_v,
            current_a=None if currents is None else sum(currents),
            power_factor=combined_power_factor(
                power, _every(values["ApparentPower"]), _every(values["Factor"])),
            frequency_hz=grid.frequency_hz,
            unknown=(*notes, *grid.unknown),
        ).checked()

    @classmethod
    @override
    def config_from_topics(cls, topics: Sequence[str]) -> TasmotaMeter:
        names = set()
        for topic in topics:
            parts = topic.split("/")
            shape = (parts[0], parts[-1]) if len(parts) == 3 else None
            if shape not in {("tele", "SENSOR"), *(("stat", leaf) for leaf in STATUS_LEAVES)}:
                raise PayloadError("unknown_topic", f"{topic}: Tasmota topics are "
                                   "tele/<topic>/SENSOR or stat/<topic>/STATUS8")
            names.add(parts[1])
        if len(names) != 1:
            raise PayloadError("unknown_topic", "topics of more than one Tasmota device")
        return TasmotaMeter(type="tasmota", id="tasmota", topic=names.pop())


def _channels(energy: dict[str, Any], key: str) -> list[float] | None:
    """A value as a list of channels: a number is one channel, an array one per channel.

    Raises:
        PayloadError: not a number or an array of numbers (wrong_type, null included),
            an array of no or too many channels (bad_value), a number too large.
    """
    value = energy.get(key)
    if value is None:
        return None
    out = _channel_values(value, key)
    if any(v is None for v in out):
        raise PayloadError("wrong_type", f"ENERGY.{key}: null in a channel array")
    return [v for v in out if v is not None]


def _channel_values(value: Any, key: str) -> list[float | None]:
    if isinstance(value, list):
        if not 1 <= len(value) <= MAX_CHANNELS:
            raise PayloadError("bad_value", f"ENERGY.{key}: {len(value)} channels")
        return [as_number(v, f"ENERGY.{key}[{i}]") for i, v in enumerate(value)]
    return [as_number(value, f"ENERGY.{key}")]


def _optional(energy: dict[str, Any], key: str,
              notes: list[UnknownValue]) -> list[float | None] | None:
    """A field other than Power per channel (None: that channel's is null); None if absent.

    A malformed one (a string, an empty array) is unknown, noted with its reason: it
    costs only itself, never the power.
    """
    value = energy.get(key)
    if value is None:
        return None
    try:
        return _channel_values(value, key)
    except PayloadError as e:
        notes.append(UnknownValue(FIELD_OF[key], e.reason, e.detail))
        return None


def _every(values: list[float | None] | None) -> list[float] | None:
    """The values when every channel's is known, else None (a partial sum would understate)."""
    if values is None or any(v is None for v in values):
        return None
    return [v for v in values if v is not None]


def _same_lengths(energy: dict[str, Any]) -> None:
    """PayloadError("bad_value") when the arrays the reading uses differ in length."""
    lengths = {key: len(energy[key]) for key in READ_FIELDS if isinstance(energy.get(key), list)}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{key} {n}" for key, n in lengths.items())
        raise PayloadError("bad_value", f"ENERGY arrays of unequal length ({shown}): one "
                           "entry per channel, so which channel a value is for is unknown")


def _register(values: dict[str, list[float | None] | None], key: str,
              notes: list[UnknownValue], hint: str = "") -> float | None:
    """A register summed over the channels, Wh; None (and a note) if a channel's is negative."""
    channels = _every(values[key])
    if channels is None:
        return None
    named = [(f"ENERGY.{key}" + (f"[{i}]" if len(channels) > 1 else ""), v)
             for i, v in enumerate(channels)]
    total, note = register_sum(FIELD_OF[key], named, unit="kWh", scale=1000.0, hint=hint)
    if note is not None:
        notes.append(note)
    return total

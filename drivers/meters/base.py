"""What every meter driver provides: one normalised reading, fixed error reasons, safe parsing.

A driver owns one meter's I/O state (the last full status a delta merges onto, the
per-topic values of a Gen1 Shelly), bounded to a fixed set of fields. It turns the
vendor's payloads into a `MeterReading` or raises `PayloadError` with a fixed reason
(a metric label), never anything else for bad input.

Reasons: oversized, bad_json, bad_schema, wrong_type, bad_value, out_of_range,
no_base_status (a delta before any full status), unknown_topic, unsupported_component
(a meter component of the device that this meter's config does not read).

Multi-channel meters (three-phase, split-phase, two-channel): power, current and
energy are summed over every channel, dead or not; voltage and frequency come from
the live channels only (`is_live`, `grid_voltage_frequency`).
"""

from __future__ import annotations

import json
import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Generic, TypeVar

from controller.config_types import MeterBase
from controller.protocol.payloads import MeterTelemetry, PayloadError

# The same physical bounds as the project's own MeterTelemetry.
POWER_LIMIT_W = 2e9
VOLTAGE_LIMIT_V = 1e6
FREQUENCY_RANGE_HZ = (40.0, 70.0)

# A live channel is wired to an energised conductor. An unwired input of a metering
# chip reads noise: about 0.1 V, and a "frequency" anywhere (48.85 Hz, 136.83 Hz seen
# on a Shelly 3EM, Tasmota issue 17178). 50 V is under half of the lowest nominal
# phase voltage in use (100 V in Japan, 120 V in North America) and far above noise;
# 45-65 Hz holds every 50 and 60 Hz grid with room for any real excursion (load is
# shed automatically below about 47.5 Hz or 57 Hz).
LIVE_VOLTAGE_MIN_V = 50.0
GRID_BAND_HZ = (45.0, 65.0)


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One normalised reading; None where the device does not report the quantity.

    Attributes:
        power_w: Total active power, W; import positive, export negative; every channel.
        energy_import_wh: Imported active energy register, Wh.
        energy_export_wh: Exported active energy register, Wh.
        voltage_v: Mean of the live channels' voltages, V; None without a live channel.
        current_a: Sum of the phase (channel) currents, A.
        power_factor: Total active over total apparent power (a single channel: as reported).
        frequency_hz: Grid frequency, Hz: median over the live channels that report one;
            None without one.
    """

    power_w: float
    energy_import_wh: float | None = None
    energy_export_wh: float | None = None
    voltage_v: float | None = None
    current_a: float | None = None
    power_factor: float | None = None
    frequency_hz: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def checked(self) -> MeterReading:
        """This reading, or PayloadError("out_of_range") if a value is not physical."""
        _within("power_w", self.power_w, -POWER_LIMIT_W, POWER_LIMIT_W)
        _within("energy_import_wh", self.energy_import_wh, 0.0, math.inf)
        _within("energy_export_wh", self.energy_export_wh, 0.0, math.inf)
        _within("voltage_v", self.voltage_v, 0.0, VOLTAGE_LIMIT_V)
        _within("current_a", self.current_a, 0.0, math.inf)
        _within("power_factor", self.power_factor, -1.0, 1.0)
        _within("frequency_hz", self.frequency_hz, *FREQUENCY_RANGE_HZ)
        return self

    def telemetry(self, ts: float) -> MeterTelemetry:
        """As the project's own meter message (what the controller applies)."""
        return MeterTelemetry(
            ts=ts, power_w=self.power_w, energy_import_wh=self.energy_import_wh,
            energy_export_wh=self.energy_export_wh, voltage_v=self.voltage_v,
            frequency_hz=self.frequency_hz,
        )


def _within(name: str, value: float | None, low: float, high: float) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise PayloadError("out_of_range", f"{name}: not a finite number")
    if not low <= value <= high:
        raise PayloadError("out_of_range", f"{name}: {value:g} outside [{low:g}, {high:g}]")


C = TypeVar("C", bound=MeterBase)


class MeterDriver(ABC, Generic[C]):
    """One meter's driver: which topics it reads, and how a payload becomes a reading.

    `C` is the driver's own config table (defined beside it, e.g. `TasmotaMeter`).
    """

    name: ClassVar[str]

    def __init__(self, config: C) -> None:
        self.config = config

    @abstractmethod
    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe to (may hold wildcards)."""

    @abstractmethod
    def exact_topics(self) -> list[str]:
        """Topics this meter publishes on that are matched exactly."""

    def topic_prefixes(self) -> list[str]:
        """Topic prefixes this meter owns (for formats with a topic per value)."""
        return []

    @abstractmethod
    def decode(self, topic: str, raw: bytes) -> MeterReading | None:
        """The meter's reading after this message, or None when it carries none yet.

        Raises:
            PayloadError: the payload is malformed; state is left as it was.
        """

    @classmethod
    @abstractmethod
    def config_from_topics(cls, topics: Sequence[str]) -> C:
        """A config for the device that publishes on `topics` (for `mineops decode`).

        Raises:
            PayloadError: reason unknown_topic, naming the topic shapes this driver reads.
        """


def load_json(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """A JSON object from raw bytes, or PayloadError (oversized, bad_json, wrong_type)."""
    if len(raw) > max_bytes:
        raise PayloadError("oversized", f"{len(raw)} bytes > {max_bytes}")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise PayloadError("bad_json", str(e)[:200]) from None
    if not isinstance(data, dict):
        raise PayloadError("wrong_type", f"expected a JSON object, got {type(data).__name__}")
    return data


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def as_number(value: Any, where: str) -> float | None:
    """A JSON number as float; null is None; anything else is PayloadError("wrong_type")."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError("wrong_type", f"{where}: expected a number, got {value!r:.40}")
    try:
        out = float(value)
    except OverflowError:
        raise PayloadError("out_of_range", f"{where}: number too large") from None
    if not math.isfinite(out):
        raise PayloadError("out_of_range", f"{where}: number too large")
    return out


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def is_live(voltage_v: float | None, frequency_hz: float | None) -> bool:
    """Whether a channel measures an energised grid conductor.

    Live: its voltage is above LIVE_VOLTAGE_MIN_V (50 V) and its frequency, when it
    reports one, is within GRID_BAND_HZ (45-65 Hz). A channel without a voltage is
    not known to be live: frequency is measured on the voltage, so none is trusted.
    """
    if voltage_v is None or not voltage_v > LIVE_VOLTAGE_MIN_V:
        return False
    return frequency_hz is None or GRID_BAND_HZ[0] <= frequency_hz <= GRID_BAND_HZ[1]


def grid_voltage_frequency(
    voltages_v: Sequence[float | None], frequencies_hz: Sequence[float | None],
) -> tuple[float | None, float | None]:
    """(voltage V, frequency Hz) of the grid from the live channels of one meter.

    `voltages_v[i]` and `frequencies_hz[i]` belong to channel i; a sequence of one value
    is common to every channel (a device that measures one voltage or frequency for
    all), and a channel missing from a shorter sequence has no value. Voltage is the
    mean of the live channels' voltages; frequency the median of their frequencies,
    so one odd phase of three cannot pull it. Either is None when no live channel gives
    one: a dead channel's noise never reaches the reading.
    """
    n = max(len(voltages_v), len(frequencies_hz))
    live_v: list[float] = []
    live_hz: list[float] = []
    for i in range(n):
        v, hz = _channel(voltages_v, i), _channel(frequencies_hz, i)
        if v is not None and is_live(v, hz):
            live_v.append(v)
            if hz is not None:
                live_hz.append(hz)
    return mean(live_v), statistics.median(live_hz) if live_hz else None


def _channel(values: Sequence[float | None], i: int) -> float | None:
    if len(values) == 1:
        return values[0]
    return values[i] if i < len(values) else None


def combined_power_factor(
    power_w: Sequence[float],
    apparent_va: Sequence[float] | None,
    reported: Sequence[float] | None,
) -> float | None:
    """Power factor of several channels taken together.

    One channel: the device's own figure when it reports one. Several: total active
    over total apparent power when every channel's apparent power is known (a mean of
    per-phase factors would weigh an idle phase like a loaded one), else the mean of
    the reported factors.
    """
    if reported is not None and len(reported) == 1 and len(power_w) == 1:
        return reported[0]
    if apparent_va is not None and len(apparent_va) == len(power_w):
        total_va = sum(apparent_va)
        if total_va > 0:
            return max(-1.0, min(1.0, sum(power_w) / total_va))
    if reported:
        return mean(reported)
    return None

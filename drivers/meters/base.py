"""What every meter driver provides: one normalised reading, fixed error reasons, safe parsing.

A driver owns one meter's I/O state (the last full status a delta merges onto, the
per-topic values of a Gen1 Shelly), bounded to a fixed set of fields. It turns the
vendor's payloads into a `MeterReading` or raises `PayloadError` with a fixed reason
(a metric label), never anything else for bad input.

Reasons a message is dropped: oversized, bad_json, bad_schema, wrong_type, bad_value,
out_of_range (power only), no_base_status (a delta before any full status),
unknown_topic, unsupported_component (a meter component of the device that this
meter's config does not read).

One bad value never costs the good ones: a value other than power that is not physical
(a negative register, a power factor of 1.7) or malformed (a string where a number
belongs) is left unknown (None) in the reading and noted in `MeterReading.unknown` with
its reason (out_of_range, channels_disagree, wrong_type, bad_value), which the
controller counts and logs; the power still applies. Power itself malformed or out of
bounds drops the message: without it there is no reading.

Multi-channel meters (three-phase, split-phase, two-channel): power, current and
energy are summed over every channel, dead or not; voltage comes from the channels
above LIVE_VOLTAGE_MIN_V and frequency from the energised channels that agree
(`grid_voltage_frequency`, docs/meters.md "Live and dead channels").
"""

from __future__ import annotations

import json
import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Generic, TypeVar

from controller.config_types import MeterBase
from controller.protocol.payloads import MeterTelemetry, PayloadError

# The same physical bounds as the project's own MeterTelemetry.
POWER_LIMIT_W = 2e9
VOLTAGE_LIMIT_V = 1e6
FREQUENCY_RANGE_HZ = (40.0, 70.0)
# No meter counts more than the largest site's power for a century: a register beyond
# this is a misread number, not energy.
ENERGY_LIMIT_WH = POWER_LIMIT_W * 100 * 8766.0

# A live channel is wired to an energised conductor. An unwired input of a metering
# chip reads noise: about 0.1 V, and a "frequency" anywhere (48.85 Hz, 136.83 Hz seen
# on a Shelly 3EM, Tasmota issue 17178). 50 V is under half of the lowest nominal
# phase voltage in use (100 V in Japan, 120 V in North America) and far above noise;
# 45-65 Hz holds every 50 and 60 Hz grid with room for any real excursion (load is
# shed automatically below about 47.5 Hz or 57 Hz).
LIVE_VOLTAGE_MIN_V = 50.0
GRID_BAND_HZ = (45.0, 65.0)
# Every phase of a site is on one synchronous grid, so live channels measure one
# frequency. Their readings differ only by the meter's resolution (0.01 Hz on Tasmota
# and Shelly) and by how far the frequency moves between the channels' measurements,
# which one metering chip takes together: even a fast fall of 1 Hz/s moves it by
# hundredths in the tens of milliseconds between them. Channels further apart than
# this are not all measuring the grid.
FREQUENCY_AGREEMENT_HZ = 0.05
# With one voltage for several channels (Tasmota's common voltage), a channel shows it
# is energised only by what flows through it. An open input reads about 0.014 A and
# under a watt (Tasmota issue 17178); 0.1 A and 10 W are well above that noise and
# still a small load.
LOAD_MIN_A = 0.1
LOAD_MIN_W = 10.0


@dataclass(frozen=True, slots=True)
class UnknownValue:
    """A value the device sent that the reading could not use, and why.

    The reading's key it feeds is then None, or made from the device's other values
    where they suffice (a Shelly's phase currents for a malformed total current).

    Attributes:
        field: the reading's key the value feeds, e.g. "energy_import_wh".
        reason: out_of_range (not a physical value: a negative register, a power factor
            beyond 1, a grid frequency outside 45-65 Hz on an energised channel),
            channels_disagree (energised channels whose frequencies differ by more
            than FREQUENCY_AGREEMENT_HZ, with no majority agreeing), wrong_type or
            bad_value (a malformed field other than power: a string, an empty array).
        detail: what the device sent, for the log.
    """

    field: str
    reason: str
    detail: str


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
        frequency_hz: Grid frequency, Hz: what the energised channels agree on (see
            grid_voltage_frequency); None without one, or when they disagree.
        unknown: Values the device sent that this reading could not use, with the reason.
    """

    power_w: float
    energy_import_wh: float | None = None
    energy_export_wh: float | None = None
    voltage_v: float | None = None
    current_a: float | None = None
    power_factor: float | None = None
    frequency_hz: float | None = None
    unknown: tuple[UnknownValue, ...] = ()

    def as_dict(self) -> dict[str, float | None]:
        """The reading's values by key (READING_KEYS), without the notes."""
        return {key: getattr(self, key) for key in READING_KEYS}

    def checked(self) -> MeterReading:
        """This reading with every value within physical bounds.

        Power outside +-POWER_LIMIT_W (or not finite) raises PayloadError("out_of_range"):
        without it there is no reading. Any other value outside its bounds (registers
        0..ENERGY_LIMIT_WH, voltage 0..1 MV, current >= 0, power factor -1..1, frequency
        40-70 Hz) becomes None and is noted in `unknown` (reason out_of_range).
        """
        problem = _outside("power_w", self.power_w, -POWER_LIMIT_W, POWER_LIMIT_W)
        if problem is not None:
            raise PayloadError("out_of_range", problem)
        cleared: dict[str, None] = {}
        notes = list(self.unknown)
        for key, (low, high) in _BOUNDS.items():
            problem = _outside(key, getattr(self, key), low, high)
            if problem is not None:
                cleared[key] = None
                notes.append(UnknownValue(key, "out_of_range", problem))
        if not cleared:
            return self
        # power_w, the one field that is not optional, is never among the cleared.
        return replace(self, **cleared, unknown=tuple(notes))  # type: ignore[arg-type]

    def telemetry(self, ts: float) -> MeterTelemetry:
        """As the project's own meter message (what the controller applies)."""
        return MeterTelemetry(
            ts=ts, power_w=self.power_w, energy_import_wh=self.energy_import_wh,
            energy_export_wh=self.energy_export_wh, voltage_v=self.voltage_v,
            frequency_hz=self.frequency_hz,
        )


READING_KEYS = ("power_w", "energy_import_wh", "energy_export_wh", "voltage_v", "current_a",
                "power_factor", "frequency_hz")
_BOUNDS: dict[str, tuple[float, float]] = {
    "energy_import_wh": (0.0, ENERGY_LIMIT_WH),
    "energy_export_wh": (0.0, ENERGY_LIMIT_WH),
    "voltage_v": (0.0, VOLTAGE_LIMIT_V),
    "current_a": (0.0, math.inf),
    "power_factor": (-1.0, 1.0),
    "frequency_hz": FREQUENCY_RANGE_HZ,
}


def _outside(name: str, value: float | None, low: float, high: float) -> str | None:
    """Why `value` is not within [low, high], or None when it is (or is unknown)."""
    if value is None:
        return None
    if not math.isfinite(value):
        return f"{name}: not a finite number"
    if not low <= value <= high:
        return f"{name}: {value:g} outside [{low:g}, {high:g}]"
    return None


C = TypeVar("C", bound=MeterBase)


class MeterDriver(ABC, Generic[C]):
    """One meter's driver: which topics it reads, and how a payload becomes a reading.

    `C` is the driver's own config table (defined beside it, e.g. `TasmotaMeter`).

    Args:
        config: The meter's `[[meters]]` table.
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


def distinct_channels(channels: list[int]) -> list[int]:
    """A table's channel numbers, sorted (a pydantic validator's body).

    Raises:
        ValueError: a channel is listed twice.
    """
    if len(set(channels)) != len(channels):
        raise ValueError("a channel is listed twice")
    return sorted(channels)


def mean(values: Sequence[float]) -> float | None:
    """The arithmetic mean; None for no values (unknown, not zero)."""
    return sum(values) / len(values) if values else None


def register_sum(field: str, values: Sequence[tuple[str, float]], unit: str = "Wh",
                 scale: float = 1.0, hint: str = "") -> tuple[float | None, UnknownValue | None]:
    """The sum of a register over channels, in Wh; None and a note if a channel's is negative.

    `values` are (where, value) per channel in the device's `unit`, `scale` Wh per unit.
    A register counts up from zero, so a negative one is not that register (Tasmota's
    `Total` on a device that measures export, a misread number); a sum would hide it
    among the other channels'. `hint` says what it more likely is, for the log.
    """
    for where, value in values:
        if value < 0:
            return None, UnknownValue(field, "out_of_range",
                                      f"{where}: {value:g} {unit} is negative{hint}")
    return sum(v for _, v in values) * scale, None


@dataclass(frozen=True, slots=True)
class GridMeasure:
    """The grid's voltage and frequency as one meter's channels show them.

    Attributes:
        voltage_v: Mean of the live channels' voltages, V; None without one.
        frequency_hz: The energised channels' agreed frequency, Hz; None without one.
        unknown: Why a frequency the device sent was left unknown (out_of_range,
            channels_disagree); empty when none was.
    """

    voltage_v: float | None
    frequency_hz: float | None
    unknown: tuple[UnknownValue, ...] = ()


def grid_voltage_frequency(
    voltages_v: Sequence[float | None], frequencies_hz: Sequence[float | None], *,
    currents_a: Sequence[float | None] = (), powers_w: Sequence[float | None] = (),
) -> GridMeasure:
    """The grid's voltage and frequency from the channels of one meter (docs/meters.md).

    Each sequence holds one value per channel (None: that channel's is not reported), or
    a single value common to all of a multi-channel device's channels (Tasmota's common
    voltage or frequency), or nothing (not reported). The channel count is the longest
    sequence's.

    - Voltage: the mean of the voltages above LIVE_VOLTAGE_MIN_V (50 V); a dead input's
      ~0.1 V is left out. It does not depend on the frequency (0 Hz from a device that
      cannot measure it leaves the voltage known).
    - Energised channels: with a voltage per channel, those above 50 V. With one voltage
      for all, that voltage above 50 V proves only that some channel is energised; a
      channel shows it is by its own current (LOAD_MIN_A) or power (LOAD_MIN_W). Without
      a voltage none is known to be: frequency is measured on the voltage.
    - Frequency: one value common to the device counts when some channel is energised.
      Per-channel frequencies count from energised channels within GRID_BAND_HZ: one such
      channel gives its own; several give the median of the largest group agreeing within
      FREQUENCY_AGREEMENT_HZ, when it holds at least two and more than half of them.
      Otherwise (they disagree, with no majority agreeing) the frequency is None and
      noted channels_disagree: of two live phases at 59.98 and 58.90 Hz the meter cannot
      say which is the grid's, and a mean would be neither. An energised channel's
      frequency outside the band (never 0, which devices send when they do not measure)
      with nothing else to go by is noted out_of_range.
    """
    n = max(len(voltages_v), len(frequencies_hz), len(currents_a), len(powers_w), 1)
    live_v = [v for v in voltages_v if v is not None and _above_floor(v)]
    voltage_v = mean(live_v)
    if len(voltages_v) == 1 and n > 1:
        energised = [bool(live_v) and _carries_load(currents_a, powers_w, i, n)
                     for i in range(n)]
    else:
        energised = [_above_floor(_at(voltages_v, i)) for i in range(n)]
    if len(frequencies_hz) == 1 and n > 1:
        reported = [frequencies_hz[0]] if live_v else []
    else:
        reported = [_at(frequencies_hz, i) for i in range(n) if energised[i]]
    heard = [f for f in reported if f is not None and f != 0.0]
    in_band = [f for f in heard if GRID_BAND_HZ[0] <= f <= GRID_BAND_HZ[1]]
    if not in_band:
        note = () if not heard else (UnknownValue(
            "frequency_hz", "out_of_range",
            f"energised channels at {_hz(heard)}, outside the grid band "
            f"{GRID_BAND_HZ[0]:g}-{GRID_BAND_HZ[1]:g} Hz"),)
        return GridMeasure(voltage_v, None, note)
    if len(in_band) == 1:
        return GridMeasure(voltage_v, in_band[0])
    group = _agreeing(in_band)
    if group is None:
        return GridMeasure(voltage_v, None, (UnknownValue(
            "frequency_hz", "channels_disagree",
            f"energised channels at {_hz(in_band)}: no majority within "
            f"{FREQUENCY_AGREEMENT_HZ:g} Hz of each other"),))
    return GridMeasure(voltage_v, statistics.median(group))


def _at(values: Sequence[float | None], i: int) -> float | None:
    return values[i] if i < len(values) else None


def _above_floor(voltage_v: float | None) -> bool:
    return voltage_v is not None and voltage_v > LIVE_VOLTAGE_MIN_V


def _carries_load(currents_a: Sequence[float | None], powers_w: Sequence[float | None],
                  i: int, n: int) -> bool:
    """Whether channel i's own current or power shows something flowing through it.

    Only per-channel values say so: a total common to the device names no channel.
    """
    current = _at(currents_a, i) if len(currents_a) == n else None
    power = _at(powers_w, i) if len(powers_w) == n else None
    return ((current is not None and abs(current) >= LOAD_MIN_A)
            or (power is not None and abs(power) >= LOAD_MIN_W))


def _agreeing(values: Sequence[float]) -> list[float] | None:
    """The largest group of values within FREQUENCY_AGREEMENT_HZ, if a strict majority.

    Groups of the largest size that overlap (50.00, 50.04, 50.08) are one group: their
    union. None when no two agree or the largest group is not more than half.
    """
    ordered = sorted(values)
    tolerance = FREQUENCY_AGREEMENT_HZ + 1e-9  # 59.99 - 59.94 is 0.0500000004 in floats
    windows = [range(i, i + sum(1 for v in ordered[i:] if v - low <= tolerance))
               for i, low in enumerate(ordered)]
    size = max(len(w) for w in windows)
    if size < 2 or 2 * size <= len(ordered):
        return None
    # Two groups of more than half share a value, so the largest ones overlap.
    members = sorted({i for w in windows if len(w) == size for i in w})
    return [ordered[i] for i in members]


def _hz(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values) + " Hz"


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

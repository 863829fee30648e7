"""What every meter driver provides: one normalised reading, fixed error reasons, safe parsing.

A driver owns one meter's I/O state (the last full status a delta merges onto, the
per-topic values of a Gen1 Shelly), bounded to a fixed set of fields. It turns the
vendor's payloads into a `MeterReading` or raises `PayloadError` with a fixed reason
(a metric label), never anything else for bad input.

Reasons: oversized, bad_json, bad_schema, wrong_type, bad_value, out_of_range,
no_base_status (a delta before any full status), unknown_topic.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from controller.config import MeterConfig
from controller.protocol.payloads import MeterTelemetry, PayloadError

# The same physical bounds as the project's own MeterTelemetry.
POWER_LIMIT_W = 2e9
VOLTAGE_LIMIT_V = 1e6
FREQUENCY_RANGE_HZ = (40.0, 70.0)


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One normalised reading; None where the device does not report the quantity.

    Attributes:
        power_w: Total active power, W; import positive, export negative.
        energy_import_wh: Imported active energy register, Wh.
        energy_export_wh: Exported active energy register, Wh.
        voltage_v: Mean of the phase (channel) voltages, V.
        current_a: Sum of the phase (channel) currents, A.
        power_factor: Total active over total apparent power (a single channel: as reported).
        frequency_hz: Grid frequency, Hz (mean over phases that report it).
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


class MeterDriver(ABC):
    """One meter's driver: which topics it reads, and how a payload becomes a reading."""

    name: ClassVar[str]

    def __init__(self, config: MeterConfig) -> None:
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
    def config_from_topics(cls, topics: Sequence[str]) -> MeterConfig:
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

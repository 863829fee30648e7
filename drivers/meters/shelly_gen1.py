"""Shelly Gen1 EM and 3EM over MQTT: one plain-text number per topic.

`shellies/<device_id>/emeter/<i>/<quantity>`, channel i = 0..2 (3EM) or 0..1 (EM):
power (W, negative when returning), reactive_power (var, EM), pf (3EM), voltage (V),
current (A, 3EM), total (Wh consumed) and total_returned (Wh returned). The device
publishes them one after another every update period. `energy` and
`returned_energy` (counters since the last report, in watt-minutes) are skipped: the
totals carry the same information without loss.

The driver keeps the last value of each quantity per configured channel (a fixed
table, so it cannot grow) and reports a reading once every configured channel has
sent its power; each later value gives the reading with that value merged in.
Other channels are ignored, so one channel of an EM can be the site meter. Power,
current and energies are summed over the configured channels; the voltage is the mean
of the live ones (above 50 V, drivers.meters.base.grid_voltage_frequency), so an
unwired 3EM input (~0.1 V) does not pull it down. Gen1 does not publish the grid
frequency over MQTT. A value out of range is dropped with its message (its topic
carries nothing else), and the quantity keeps its last good value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, field_validator
from typing_extensions import override

from controller.config_types import TOPIC_LEVEL_PATTERN, MeterBase
from controller.protocol.payloads import PayloadError
from drivers.meters.base import (
    MeterDriver,
    MeterReading,
    combined_power_factor,
    distinct_channels,
    grid_voltage_frequency,
)

# Quantity -> allowed range of one channel's value.
QUANTITIES: dict[str, tuple[float, float]] = {
    "power": (-1e9, 1e9),
    "reactive_power": (-1e9, 1e9),
    "pf": (-1.0, 1.0),
    "voltage": (0.0, 1e6),
    "current": (0.0, 1e6),
    "total": (0.0, math.inf),
    "total_returned": (0.0, math.inf),
}
MAX_BYTES = 32
MAX_CHANNEL = 2


class ShellyGen1Meter(MeterBase):
    """A Shelly Gen1 EM or 3EM: one value per topic, shellies/<device_id>/emeter/<i>/<quantity>."""

    type: Literal["shelly_gen1"]
    device_id: str = Field(
        pattern=TOPIC_LEVEL_PATTERN, description="The device's MQTT id, e.g. shellyem3-ECFABCC7F0F0"
    )
    channels: list[Annotated[int, Field(ge=0, le=2)]] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1, max_length=3,
        description="Channels summed into the reading: 0-2 on a 3EM, 0 and/or 1 on an EM",
    )

    @field_validator("channels")
    @classmethod
    def _distinct_channels(cls, value: list[int]) -> list[int]:
        return distinct_channels(value)

    @property
    @override
    def source(self) -> str:
        return f"shellies/{self.device_id}"


class ShellyGen1Driver(MeterDriver[ShellyGen1Meter]):
    """One Shelly Gen1 EM/3EM; merges the per-topic values of its configured channels.

    Args:
        config: Its `[[meters]]` table.
    """

    name = "shelly_gen1"

    def __init__(self, config: ShellyGen1Meter) -> None:
        super().__init__(config)
        self.prefix = f"shellies/{config.device_id}/emeter/"
        self.channels: tuple[int, ...] = tuple(config.channels)
        self.values: dict[int, dict[str, float]] = {c: {} for c in self.channels}

    @override
    def subscriptions(self) -> list[str]:
        return [f"{self.prefix}+/+"]

    @override
    def exact_topics(self) -> list[str]:
        return []

    @override
    def topic_prefixes(self) -> list[str]:
        return [self.prefix]

    @override
    def decode(self, topic: str, raw: bytes) -> MeterReading | None:
        if not topic.startswith(self.prefix):
            raise PayloadError("unknown_topic", f"not a topic of Shelly {self.config.id}")
        parts = topic[len(self.prefix):].split("/")
        if len(parts) != 2 or not parts[0].isdigit():
            raise PayloadError("unknown_topic", "expected emeter/<channel>/<quantity>")
        channel, quantity = int(parts[0]), parts[1]
        if channel not in self.values or quantity not in QUANTITIES:
            return None  # another channel, or a quantity the reading does not use
        value = _number(raw, quantity)
        merged = {**self.values[channel], quantity: value}
        reading = self._reading({**self.values, channel: merged})
        if reading is not None:
            reading = reading.checked()
        self.values[channel] = merged  # only once the value is known good
        return reading

    def _reading(self, values: dict[int, dict[str, float]]) -> MeterReading | None:
        chans = [values[c] for c in self.channels]
        if any("power" not in v for v in chans):
            return None  # a channel's power is still unknown: a partial sum would understate

        def every(quantity: str) -> list[float] | None:
            got = [v[quantity] for v in chans if quantity in v]
            return got if len(got) == len(chans) else None

        power = [v["power"] for v in chans]
        total, returned, current = every("total"), every("total_returned"), every("current")
        # Gen1 sends no frequency: a channel is live by its voltage alone.
        grid = grid_voltage_frequency([v.get("voltage") for v in chans], [])
        return MeterReading(
            power_w=sum(power),
            energy_import_wh=None if total is None else sum(total),
            energy_export_wh=None if returned is None else sum(returned),
            voltage_v=grid.voltage_v,
            current_a=None if current is None else sum(current),
            power_factor=combined_power_factor(power, _apparent(chans), every("pf")),
        )

    @classmethod
    @override
    def config_from_topics(cls, topics: Sequence[str]) -> ShellyGen1Meter:
        devices, channels = set(), set()
        for topic in topics:
            parts = topic.split("/")
            if (len(parts) != 5 or parts[0] != "shellies" or parts[2] != "emeter"
                    or not parts[3].isdigit() or int(parts[3]) > MAX_CHANNEL):
                raise PayloadError("unknown_topic", f"{topic}: Shelly Gen1 meter topics are "
                                   "shellies/<device_id>/emeter/<0-2>/<quantity>")
            devices.add(parts[1])
            channels.add(int(parts[3]))
        if len(devices) != 1:
            raise PayloadError("unknown_topic", "topics of more than one Shelly device")
        # Every channel the topics mention: the reading waits for each one's power.
        return ShellyGen1Meter(type="shelly_gen1", id="shelly", device_id=devices.pop(),
                               channels=sorted(channels))


def _number(raw: bytes, quantity: str) -> float:
    if len(raw) > MAX_BYTES:
        raise PayloadError("oversized", f"{len(raw)} bytes > {MAX_BYTES}")
    text = raw.decode("ascii", errors="replace").strip()
    try:
        value = float(text)
    except ValueError:
        raise PayloadError("bad_value", f"{quantity}: not a number: {text!r:.40}") from None
    low, high = QUANTITIES[quantity]
    if not math.isfinite(value) or not low <= value <= high:
        raise PayloadError("out_of_range", f"{quantity}: {text!r:.40} outside [{low:g}, {high:g}]")
    return value


def _apparent(chans: list[dict[str, float]]) -> list[float] | None:
    """Each channel's apparent power, VA: V x I (3EM) or from P and Q (EM); None if unknown."""
    out = []
    for v in chans:
        if "voltage" in v and "current" in v:
            out.append(v["voltage"] * v["current"])
        elif "reactive_power" in v:
            out.append(math.hypot(v["power"], v["reactive_power"]))
        else:
            return None
    return out

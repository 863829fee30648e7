"""The project's own meter format: MeterTelemetry JSON on mineops/<site>/meter/<id>/telemetry.

The controller reads these on its own topic (controller/daemon/loop.py), so this driver
subscribes to nothing; it is here so that `mineops decode` and the registry treat
every meter type alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from typing_extensions import override

from controller.config_types import MeterBase
from controller.protocol.payloads import MeterTelemetry, PayloadError, decode
from controller.protocol.topics import ROOT
from drivers.meters.base import MeterDriver, MeterReading


class MineopsMeter(MeterBase):
    """A meter publishing the project's own JSON on mineops/<site>/meter/<id>/telemetry."""

    type: Literal["mineops"] = "mineops"


class MineopsDriver(MeterDriver[MineopsMeter]):
    """A meter that already speaks the project's format."""

    name = "mineops"

    @override
    def subscriptions(self) -> list[str]:
        return []

    @override
    def exact_topics(self) -> list[str]:
        return []

    @override
    def decode(self, topic: str, raw: bytes) -> MeterReading | None:
        msg = decode(MeterTelemetry, raw)
        return MeterReading(
            power_w=msg.power_w, energy_import_wh=msg.energy_import_wh,
            energy_export_wh=msg.energy_export_wh, voltage_v=msg.voltage_v,
            frequency_hz=msg.frequency_hz,
        )

    @classmethod
    @override
    def config_from_topics(cls, topics: Sequence[str]) -> MineopsMeter:
        ids = set()
        for topic in topics:
            parts = topic.split("/")
            if len(parts) != 5 or parts[0] != ROOT or parts[2] != "meter" or (
                    parts[4] != "telemetry"):
                raise PayloadError("unknown_topic", f"{topic}: the project's meter topic is "
                                   f"{ROOT}/<site>/meter/<id>/telemetry")
            ids.add(parts[3])
        if len(ids) != 1:
            raise PayloadError("unknown_topic", "topics of more than one meter")
        return MineopsMeter(id=ids.pop())

"""The controller's side of vendor meters: which topics to read, and whose driver decodes each.

A reading that leaves a value the device sent unknown (`MeterReading.unknown`: a
negative register, live channels whose frequencies disagree) is applied with the rest,
and each such value is counted in `MeterRouter.unknown_values` and logged
(`meter_value_unknown`, once a minute per meter, value and reason).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from controller.logs import LogLimiter
from controller.protocol.payloads import PayloadError
from drivers.meters.base import MeterDriver, MeterReading
from drivers.meters.mineops import MineopsMeter
from drivers.meters.registry import MeterConfig, build

log = structlog.get_logger("mineops.meters")


@dataclass(frozen=True, slots=True)
class RoutedReading:
    """A reading and the configured meter it came from."""

    meter_id: str
    role: str
    reading: MeterReading


class MeterRouter:
    """Routes messages on the vendor topics of the configured meters to their drivers.

    Meters of type `mineops` are left out: the controller reads those on its own
    topic. `claims` runs on every message the controller gets, so it is one dict
    lookup and, for per-value formats (Shelly Gen1), one `str.startswith`.

    Args:
        meters: The site file's `[[meters]]`.
    """

    def __init__(self, meters: Sequence[MeterConfig]) -> None:
        self.drivers: list[MeterDriver[Any]] = [build(m) for m in meters
                                           if not isinstance(m, MineopsMeter)]
        self._exact: dict[str, MeterDriver[Any]] = {}
        self._prefixed: list[tuple[str, MeterDriver[Any]]] = []
        for d in self.drivers:
            for topic in d.exact_topics():
                self._check_free(topic, d, prefix=False)
                self._exact[topic] = d
            for prefix in d.topic_prefixes():
                self._check_free(prefix, d, prefix=True)
                self._prefixed.append((prefix, d))
        self._prefixes = tuple(p for p, _ in self._prefixed)
        # (meter id, reading key, reason) -> values left unknown in applied readings.
        self.unknown_values: Counter[tuple[str, str, str]] = Counter()
        self._quiet = LogLimiter(60.0)

    def _check_free(self, topic: str, driver: MeterDriver[Any], *, prefix: bool) -> None:
        """Two meters reading the same topics is a configuration mistake, not a tie to break."""
        owner = next((d for t, d in self._exact.items()
                      if t == topic or (prefix and t.startswith(topic))), None)
        owner = owner or next((d for p, d in self._prefixed
                               if topic.startswith(p) or (prefix and p.startswith(topic))), None)
        if owner is not None:
            raise ValueError(f"meters {owner.config.id!r} and {driver.config.id!r} both read "
                             f"{topic}")

    def subscriptions(self) -> list[str]:
        """Topic filters for every vendor meter."""
        return [s for d in self.drivers for s in d.subscriptions()]

    def claims(self, topic: str) -> bool:
        """Whether a topic belongs to a configured vendor meter."""
        return topic in self._exact or (bool(self._prefixes) and topic.startswith(self._prefixes))

    def decode(self, topic: str, raw: bytes) -> RoutedReading | None:
        """Decode with the owning meter's driver; None when the message carries no reading.

        Raises:
            PayloadError: malformed payload (the driver's state is unchanged), or a
                topic no meter owns (unknown_topic).
        """
        driver = self._exact.get(topic) or next(
            (d for p, d in self._prefixed if topic.startswith(p)), None)
        if driver is None:
            raise PayloadError("unknown_topic", "no configured meter reads this topic")
        reading = driver.decode(topic, raw)
        if reading is None:
            return None
        meter_id = driver.config.id
        for value in reading.unknown:
            self.unknown_values[(meter_id, value.field, value.reason)] += 1
            suppressed = self._quiet.allow(meter_id, value.field, value.reason)
            if suppressed is not None:
                log.warning("meter_value_unknown", meter=meter_id, topic=topic,
                            value=value.field, reason=value.reason, detail=value.detail[:200],
                            suppressed_since_last=suppressed)
        return RoutedReading(meter_id, driver.config.role, reading)

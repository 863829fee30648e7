"""The controller's side of vendor meters: which topics to read, and whose driver decodes each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from controller.protocol.payloads import PayloadError
from drivers.meters.base import MeterDriver, MeterReading
from drivers.meters.mineops import MineopsMeter
from drivers.meters.registry import MeterConfig, build


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
        return RoutedReading(driver.config.id, driver.config.role, reading)

"""The meter drivers by config `type`: one explicit table, no registration by import.

Each driver's config table lives beside it; `MeterConfig` is their discriminated union,
the type of the site file's `[[meters]]` entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from drivers.meters.base import MeterDriver
from drivers.meters.mineops import MineopsDriver, MineopsMeter
from drivers.meters.shelly_gen1 import ShellyGen1Driver, ShellyGen1Meter
from drivers.meters.shelly_gen2 import ShellyGen2Driver, ShellyGen2Meter
from drivers.meters.tasmota import TasmotaDriver, TasmotaMeter

DRIVERS: Mapping[str, type[MeterDriver[Any]]] = {
    d.name: d for d in (MineopsDriver, TasmotaDriver, ShellyGen2Driver, ShellyGen1Driver)
}


# evcc-style: `type` picks the driver (DRIVERS above), one table per device type.
MeterConfig = Annotated[
    MineopsMeter | TasmotaMeter | ShellyGen2Meter | ShellyGen1Meter, Field(discriminator="type")
]


def _distinct_meters(meters: list[MeterConfig]) -> list[MeterConfig]:
    ids: set[str] = set()
    sources: dict[str, str] = {}
    for m in meters:
        if m.id in ids:
            raise ValueError(f"meter id {m.id!r} appears twice")
        ids.add(m.id)
        source = m.source
        if source in sources:
            raise ValueError(f"meters {sources[source]!r} and {m.id!r} read the same device "
                             f"({source})")
        sources[source] = m.id
    return meters


MeterList = Annotated[list[MeterConfig], AfterValidator(_distinct_meters)]


class UnknownDriverError(ValueError):
    """A driver name the registry does not know; the message lists the known ones."""


def driver_type(name: str) -> type[MeterDriver[Any]]:
    """The driver class registered under `name`.

    Raises:
        UnknownDriverError: no such driver; the message lists the valid names.
    """
    try:
        return DRIVERS[name]
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        raise UnknownDriverError(f"unknown meter driver {name!r}; known drivers: {known}") from None


def build(config: MeterConfig) -> MeterDriver[Any]:
    """A fresh driver (with its own state) for one configured meter."""
    return driver_type(config.type)(config)

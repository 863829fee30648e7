"""The meter drivers by config `type`: one explicit table, no registration by import."""

from __future__ import annotations

from collections.abc import Mapping

from controller.config import MeterConfig
from drivers.meters.base import MeterDriver
from drivers.meters.mineops import MineopsDriver
from drivers.meters.shelly_gen1 import ShellyGen1Driver
from drivers.meters.shelly_gen2 import ShellyGen2Driver
from drivers.meters.tasmota import TasmotaDriver

DRIVERS: Mapping[str, type[MeterDriver]] = {
    d.name: d for d in (MineopsDriver, TasmotaDriver, ShellyGen2Driver, ShellyGen1Driver)
}


class UnknownDriverError(ValueError):
    """A driver name the registry does not know; the message lists the known ones."""


def driver_type(name: str) -> type[MeterDriver]:
    """The driver class registered under `name`.

    Raises:
        UnknownDriverError: no such driver; the message lists the valid names.
    """
    try:
        return DRIVERS[name]
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        raise UnknownDriverError(f"unknown meter driver {name!r}; known drivers: {known}") from None


def build(config: MeterConfig) -> MeterDriver:
    """A fresh driver (with its own state) for one configured meter."""
    return driver_type(config.type)(config)

"""Energy-meter drivers: vendor formats (Tasmota, Shelly Gen1/Gen2) to one normalised reading.

Chosen per meter by `type` in the site config (`MeterConfig`, the union of the tables
that live beside their drivers);
see docs/meters.md for the formats and what each driver makes of them.
"""

from drivers.meters.base import MeterDriver, MeterReading
from drivers.meters.registry import (
    DRIVERS,
    MeterConfig,
    MeterList,
    UnknownDriverError,
    build,
    driver_type,
)
from drivers.meters.router import MeterRouter, RoutedReading

__all__ = [
    "DRIVERS",
    "MeterConfig",
    "MeterDriver",
    "MeterList",
    "MeterReading",
    "MeterRouter",
    "RoutedReading",
    "UnknownDriverError",
    "build",
    "driver_type",
]

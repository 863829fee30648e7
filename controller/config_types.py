"""Building blocks of the site file, shared by its tables and the device configs beside drivers.

The site file's tables live in `controller/config.py`; each device type's table lives
beside its driver (`drivers/meters/tasmota.py` holds `TasmotaMeter`, evcc-style), and
both build on what is here: the strict model base, the id and topic patterns, and the
check that a miner model is in the catalogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

from controller.catalogue import load_catalogue

# Ids of sites, groups, miners and meters: they become MQTT topic levels and label values.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# One MQTT topic level (no wildcards, no slash), and a topic prefix of such levels.
TOPIC_LEVEL_PATTERN = r"^[^/#+\s]{1,64}$"
TOPIC_PREFIX_PATTERN = r"^[^/#+\s]+(/[^/#+\s]+)*$"


def _known_model(key: str) -> str:
    models = load_catalogue().models
    if key not in models:
        raise ValueError(f"unknown miner model {key!r}; known models: {', '.join(sorted(models))}")
    return key


# A power typed in the wrong unit is off by a factor of 1000 from the one meant, and what
# a site is built for lies within a few times its reference (the fleet's stock draw, the
# interconnect): a value more than 100 times its reference, or under 1/100 of it, is a
# unit typo.
UNIT_SLIP_RATIO = 100.0


def format_kw(value: float) -> str:
    """A power in kW for messages: whole kW from 100 up, three figures below."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def unit_slip(field: str, value_kw: float, reference: str, reference_kw: float, *,
              below: bool = True) -> str | None:
    """The error for a power that looks typed in W or MW where kW was meant, else None.

    Args:
        field: The key the value is in, e.g. "power_cap_kw"; the message starts with it.
        value_kw: The value as typed, kW.
        reference: What it is compared with, in words, e.g. "the fleet's stock draw
            (3600 kW incl. 5 % aux)".
        reference_kw: That reference, kW (above 0).
        below: Also report a value under 1/UNIT_SLIP_RATIO of the reference (MW typed as
            kW); False where a small value is plausible.

    Returns:
        "<field>: <value> kW is <n> times <reference>: looks like W typed as kW (<value> W
        = <value / 1000> kW)", its MW counterpart, or None for a plausible value.
    """
    if value_kw <= 0 or reference_kw <= 0:
        return None  # not a unit question: the value's own check says why
    ratio = value_kw / reference_kw
    got, v = f"{field}: {format_kw(value_kw)} kW", format_kw(value_kw)
    if ratio > UNIT_SLIP_RATIO:
        return (f"{got} is {ratio:.0f} times {reference}: looks like W typed as kW "
                f"({v} W = {format_kw(value_kw / 1000)} kW)")
    if below and ratio < 1 / UNIT_SLIP_RATIO:
        return (f"{got} is 1/{1 / ratio:.0f} of {reference}: looks like MW typed as kW "
                f"({v} MW = {format_kw(value_kw * 1000)} kW)")
    return None


def above(lower: str, unit: str, why: str) -> AfterValidator:
    """A field's check that it is above the field `lower` of its table, listed before it.

    Use as `Annotated[float, above("shed_below_hz", "Hz", "...")]`. When `lower` failed
    its own check it is absent, and this one says nothing (that error is reported).

    Args:
        lower: The other field's name; pydantic validates fields in order, so it must
            come first in the table.
        unit: Its unit, for the message, e.g. "Hz".
        why: Why the order matters, in the operator's terms: the message's end.

    Returns:
        The validator; it raises ValueError "must be above <lower> (<value> <unit>): <why>".
    """
    def check(value: float, info: ValidationInfo) -> float:
        low = info.data.get(lower)
        if low is not None and value <= low:
            raise ValueError(f"must be above {lower} ({low:g} {unit}): {why}")
        return value

    return AfterValidator(check)


# A key of the miner-model catalogue (`mineops models` lists them).
ModelKey = Annotated[str, AfterValidator(_known_model)]


class StrictModel(BaseModel):
    """A table of the site file: unknown keys are errors, values are frozen and finite."""

    # nan and inf are never meant in a site file; the one field where inf means "no limit"
    # says so itself (policy.ramp_kw_per_min).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MinerEntry(StrictModel):
    """One miner: an entry of [fleet] miners, and the inventory's record of every miner.

    Listed by itself in [fleet] for odd machines outside any uniform rack; the inventory
    (`SiteConfig.inventory`) holds one for every miner once groups are expanded.
    """

    id: str = Field(pattern=ID_PATTERN, description="Miner id, used in topics and metrics")
    model: ModelKey = Field(description="Catalogue key, e.g. 's21' (see `mineops models`)")
    group: str = Field(pattern=ID_PATTERN, description="The group (rack) it belongs to")
    never_curtail: bool = Field(default=False, description="Keep it at full power always")
    priority: int = Field(default=0, ge=0, le=9,
                          description="Higher sheds later when the cap binds")


# A device read by polling (a miner's firmware API, a Modbus device): how often, s, and
# how many failed polls in a row before it counts as gone (its worst case then holds).
PollIntervalS = Annotated[float, Field(ge=0.1, le=3600)]
FailedPolls = Annotated[int, Field(ge=1, le=1000)]

MeterRole = Literal["site", "aux"]


class MeterBase(StrictModel):
    """What every meter's table has: its id and what it measures."""

    id: str = Field(pattern=ID_PATTERN, description="Meter id, used in logs and metrics")
    role: MeterRole = Field(
        default="site",
        description="site: the power the controller plans against; aux: decoded only")

    @property
    def source(self) -> str:
        """The device this entry reads, so that two entries cannot read one (the registry).

        The id by default (the project's own meters: their topic holds it); a device
        format's table names the device's topic.
        """
        return self.id


@dataclass(frozen=True, slots=True)
class PolicyKnobs:
    """The policy's operator-tunable rules, with their defaults (controller/core/policy.py).

    The site file's [policy] table takes its defaults from here (`PolicyConfig.knobs()`
    builds these); the backtest and the benchmarks build them directly.
    """

    min_run_s: float = 300.0  # a miner switched on stays on at least this long
    min_sleep_s: float = 300.0  # a miner put to sleep stays asleep at least this long
    hysteresis_usd_per_mwh: float = 5.0  # price band within which levels are kept
    wake_latency_factor: float = 1.0  # cheap spell needed before waking, x wake_s
    default_wake_s: float = 180.0  # wake time when MinerInputs.wake_s is not given
    ramp_kw_per_min: float = math.inf  # site ramp limit for economic moves
    derate_start_c: float = 80.0  # above this, the max power target falls linearly
    critical_c: float = 95.0  # at or above this, the miner sleeps
    aux_in_energy_cost: bool = True  # cooling energy is paid at the same price

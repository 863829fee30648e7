"""The `[campus]` table of the site file: the site as an energy campus.

The interconnect, firm loads, generation, a battery, and the meters that measure each.

Miners are the only load that moves in seconds, so they fill whatever headroom the firm
loads (GPU halls, offices: metered, never curtailed by mineops) and the on-site
generation leave at the point of interconnection (POI), and give it back at once. What
each part contributes is measured by a meter named by id: an MQTT meter of `[[meters]]`
(Tasmota, Shelly, the project's own) or a SunSpec device of `[[campus.modbus]]`.

A meter's campus role comes from the campus entry that names it, not from its own
`role`: the POI must name the `[[meters]]` meter with role "site" when it names an MQTT
meter (the one the controller plans against), and a firm load, generator or battery must
not name that meter (it measures the whole site). docs/campus.md has the worked model.

`CampusConfig` checks each entry and what holds within the table (ids, references to
its own devices, a genset's fields); `campus_review` checks the whole picture against
the rest of the site (meter ids, the power cap) and catches unit mistakes, returning
errors and warnings as `SiteConfig.cap_review` does.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal, Protocol

from pydantic import AfterValidator, Field, model_validator

from controller.config_types import (
    ID_PATTERN,
    UNIT_SLIP_RATIO,
    StrictModel,
    format_kw,
    unit_slip,
)
from drivers.modbus.config import ModbusDeviceConfig

# The parts of a campus are built for its interconnect, so a part UNIT_SLIP_RATIO times the
# interconnect is a unit typo (controller/config_types.py, unit_slip).
# The interconnect's limits are bounded like the site's power cap (10 GW); a part may be
# typed up to 1 TW so that the review, not a bare bound, says which unit was meant.
PART_LIMIT_KW = 1e9
# A generator rated this many times the interconnect is unusual (a stranded wind farm with
# miners behind a small connection can be), worth a second look.
GENERATION_FAR_ABOVE_RATIO = 10.0
# A battery that empties in under 3 minutes or lasts over 100 hours at full power: kWh
# and MWh (or kW and MW) mixed up, very likely.
BATTERY_HOURS = (0.05, 100.0)


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("give a time zone (e.g. 2025-06-01T08:00:00Z or -05:00): a local "
                         "time without one is ambiguous")
    return value


AwareDatetime = Annotated[datetime, AfterValidator(_aware)]


class PoiConfig(StrictModel):
    """The point of interconnection: the limits of the site's connection to the grid."""

    import_limit_kw: float = Field(
        gt=0, le=10_000_000, description="Most the site may draw from the grid, kW")
    export_limit_kw: float = Field(
        default=0.0, ge=0, le=10_000_000,
        description="Most the site may feed into the grid, kW (0: no export allowed)")
    meter: str = Field(pattern=ID_PATTERN,
                       description="The revenue meter at the POI: a [[meters]] id (the one "
                       "with role 'site') or a [[campus.modbus]] id")
    islanded: bool = Field(
        default=False,
        description="No grid: the gensets carry every load (an off-grid site, or the POI "
        "breaker open); the miners stay within the gensets' rating less reserve and rise "
        "only by their load steps")


class ScheduledDraw(StrictModel):
    """A firm load's announced draw over a window (e.g. a training run booked ahead)."""

    start: AwareDatetime = Field(description="Window start, with its time zone")
    end: AwareDatetime = Field(description="Window end, with its time zone")
    kw: float = Field(ge=0, le=PART_LIMIT_KW, description="Draw announced for the window, kW")

    @model_validator(mode="after")
    def _ordered(self) -> ScheduledDraw:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end.isoformat()}) must be after start "
                             f"({self.start.isoformat()})")
        return self


class FirmLoad(StrictModel):
    """A load that shares the interconnect and that mineops never curtails (a GPU hall)."""

    id: str = Field(pattern=ID_PATTERN, description="Firm-load id, used in logs and metrics")
    meter: str = Field(pattern=ID_PATTERN,
                       description="The meter measuring this load: a [[meters]] or "
                       "[[campus.modbus]] id")
    max_kw: float = Field(
        gt=0, le=PART_LIMIT_KW,
        description="The most it can draw, kW: counted when its reading is stale or missing")
    schedule: list[ScheduledDraw] = Field(
        default_factory=list, max_length=10_000,
        description="Announced draw by window (optional); windows must not overlap")

    @model_validator(mode="after")
    def _check_schedule(self) -> FirmLoad:
        windows = sorted(self.schedule, key=lambda w: w.start)
        for a, b in itertools.pairwise(windows):
            if b.start < a.end:
                raise ValueError(f"schedule windows overlap: {a.start.isoformat()}.."
                                 f"{a.end.isoformat()} and {b.start.isoformat()}..")
        for w in windows:
            if w.kw > self.max_kw:
                raise ValueError(f"schedule window at {w.start.isoformat()} announces "
                                 f"{w.kw:g} kW, above max_kw ({self.max_kw:g} kW)")
        return self


GeneratorKind = Literal["solar", "wind", "genset"]


class Generator(StrictModel):
    """On-site generation: solar, wind, or a genset (on flare or stranded gas, diesel)."""

    id: str = Field(pattern=ID_PATTERN, description="Generator id, used in logs and metrics")
    kind: GeneratorKind = Field(description="solar, wind or genset")
    meter: str = Field(pattern=ID_PATTERN,
                       description="The meter or inverter measuring its output: a [[meters]] "
                       "or [[campus.modbus]] id")
    rating_kw: float = Field(gt=0, le=PART_LIMIT_KW, description="Nameplate AC output, kW")
    marginal_cost_usd_per_mwh: float = Field(
        default=0.0, ge=-1000, le=10_000,
        description="Cost of one more MWh from it, $/MWh: 0 for renewables that would "
        "otherwise be curtailed (negative with a production credit), the fuel cost for a "
        "genset")
    reserve_kw: float | None = Field(
        default=None, ge=0, le=PART_LIMIT_KW,
        description="Genset only: headroom kept below rating_kw (spinning reserve), kW")
    max_load_step_kw: float | None = Field(
        default=None, gt=0, le=PART_LIMIT_KW,
        description="Genset only: the largest load step it picks up without tripping or "
        "a deep frequency dip (the maker's load-acceptance figure), kW")

    @model_validator(mode="after")
    def _check_kind(self) -> Generator:
        if self.kind != "genset":
            extra = [n for n in ("reserve_kw", "max_load_step_kw") if getattr(self, n) is not None]
            if extra:
                raise ValueError(f"{' and '.join(extra)}: only a genset has these "
                                 f"(this generator is {self.kind})")
            return self
        missing = [n for n in ("reserve_kw", "max_load_step_kw") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"a genset needs {' and '.join(missing)}: the controller must "
                             "know what it may load onto it and in what steps")
        assert self.reserve_kw is not None and self.max_load_step_kw is not None
        if self.reserve_kw >= self.rating_kw:
            raise ValueError(f"reserve_kw ({self.reserve_kw:g} kW) must be below rating_kw "
                             f"({self.rating_kw:g} kW)")
        if self.max_load_step_kw > self.rating_kw:
            raise ValueError(f"max_load_step_kw ({self.max_load_step_kw:g} kW) is above "
                             f"rating_kw ({self.rating_kw:g} kW)")
        return self

    @property
    def firm_kw(self) -> float:
        """What it can be counted on for when running, kW.

        A genset's rating less its reserve; 0 for solar and wind (the sun sets and the
        wind drops).
        """
        if self.kind == "genset" and self.reserve_kw is not None:
            return self.rating_kw - self.reserve_kw
        return 0.0


class BatteryConfig(StrictModel):
    """An on-site battery; its state of charge is read from its meter."""

    capacity_kwh: float = Field(gt=0, le=PART_LIMIT_KW * 100, description="Usable energy, kWh")
    max_charge_kw: float = Field(gt=0, le=PART_LIMIT_KW, description="Charge power limit, kW")
    max_discharge_kw: float = Field(gt=0, le=PART_LIMIT_KW,
                                    description="Discharge power limit, kW")
    meter: str = Field(pattern=ID_PATTERN,
                       description="The device giving its power and state of charge: a "
                       "[[campus.modbus]] id (SunSpec 802 or 124), or a [[meters]] id for "
                       "power only")
    min_soc_fraction: float = Field(default=0.0, ge=0, le=1,
                                    description="Do not discharge below this, 0..1")
    max_soc_fraction: float = Field(default=1.0, ge=0, le=1,
                                    description="Do not charge above this, 0..1")

    @model_validator(mode="after")
    def _soc_window(self) -> BatteryConfig:
        if self.min_soc_fraction >= self.max_soc_fraction:
            raise ValueError(f"min_soc_fraction ({self.min_soc_fraction:g}) must be below "
                             f"max_soc_fraction ({self.max_soc_fraction:g})")
        return self


class CampusConfig(StrictModel):
    """`[campus]`: the point of interconnection, what shares it, and the devices measuring it."""

    poi: PoiConfig = Field(description="The point of interconnection")
    firm_loads: list[FirmLoad] = Field(default_factory=list, max_length=1000,
                                       description="Loads mineops never curtails")
    generators: list[Generator] = Field(default_factory=list, max_length=1000,
                                        description="On-site generation")
    battery: BatteryConfig | None = Field(default=None, description="An on-site battery")
    modbus: list[ModbusDeviceConfig] = Field(
        default_factory=list, max_length=1000,
        description="SunSpec devices on Modbus TCP that campus entries name as `meter`")

    @model_validator(mode="after")
    def _check_ids(self) -> CampusConfig:
        problems: list[str] = []
        parts = [("firm_loads", f.id) for f in self.firm_loads] + \
            [("generators", g.id) for g in self.generators]
        seen: dict[str, str] = {}
        for table, part_id in parts:
            if part_id in seen:
                problems.append(f"campus.{table}: id {part_id!r} is also used in "
                                f"campus.{seen[part_id]}")
            seen.setdefault(part_id, table)
        devices: dict[str, ModbusDeviceConfig] = {}
        addresses: dict[tuple[str, int, int], str] = {}
        for d in self.modbus:
            if d.id in devices:
                problems.append(f"campus.modbus: id {d.id!r} appears twice")
            devices[d.id] = d
            key = (d.host, d.port, d.unit_id)
            if key in addresses:
                problems.append(f"campus.modbus: {addresses[key]!r} and {d.id!r} are the same "
                                f"device ({d.host}:{d.port} unit {d.unit_id})")
            addresses.setdefault(key, d.id)
        users: dict[str, str] = {}
        for where, meter in self.meter_uses():
            if meter in users:
                problems.append(f"{where}: meter {meter!r} is already {users[meter]}'s: one "
                                "meter measures one part of the campus")
            users.setdefault(meter, where)
            device = devices.get(meter)
            if device is not None and device.soc_model is not None and \
                    not where.startswith("campus.battery"):
                problems.append(f"{where}: modbus device {meter!r} sets soc_model, which only "
                                "a battery reads")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def meter_uses(self) -> list[tuple[str, str]]:
        """(field path, meter id) for every meter the campus names, POI first."""
        out = [("campus.poi.meter", self.poi.meter)]
        out += [(f"campus.firm_loads[{f.id}].meter", f.meter) for f in self.firm_loads]
        out += [(f"campus.generators[{g.id}].meter", g.meter) for g in self.generators]
        if self.battery is not None:
            out.append(("campus.battery.meter", self.battery.meter))
        return out

    def role_of(self, meter: str) -> str | None:
        """The campus role a meter plays (poi, firm_load, generator, battery), or None."""
        for where, m in self.meter_uses():
            if m == meter:
                return where.split(".")[1].split("[")[0].removesuffix("s")
        return None

    @property
    def firm_max_kw(self) -> float:
        """Every firm load at its max_kw, kW: the stale-reading worst case."""
        return sum(f.max_kw for f in self.firm_loads)


class MqttMeter(Protocol):
    """What the review needs of a `[[meters]]` entry (controller/config.py MeterConfig)."""

    @property
    def id(self) -> str:
        """The meter's id, as campus entries name it."""
        ...

    @property
    def role(self) -> str:
        """Its role: "site" (the meter the controller plans against) or "aux"."""
        ...


@dataclass(slots=True)
class CampusReview:
    """The campus against the rest of the site (see campus_review).

    `errors` make the config unusable (check-config exits 2); `warnings` deserve a look.
    Each line starts with the field it is about.
    """

    firm_max_kw: float
    generation_rating_kw: float
    genset_firm_kw: float
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def campus_review(campus: CampusConfig, meters: Sequence[MqttMeter] = (),
                  power_cap_kw: float | None = None) -> CampusReview:
    """The whole picture: meters that exist and play one role, and sizes that agree.

    Args:
        campus: The `[campus]` table.
        meters: The site's `[[meters]]` (MQTT meters), for the ids the campus names.
        power_cap_kw: The site's `power_cap_kw`, compared with the import limit.
    """
    gensets = [g for g in campus.generators if g.kind == "genset"]
    review = CampusReview(
        firm_max_kw=campus.firm_max_kw,
        generation_rating_kw=sum(g.rating_kw for g in campus.generators),
        genset_firm_kw=sum(g.firm_kw for g in gensets),
    )
    _review_meters(campus, meters, review)
    _review_poi(campus, review)
    _review_firm_loads(campus, review)
    for g in campus.generators:
        _review_generator(g, campus.poi, review)
    if campus.battery is not None:
        _review_battery(campus.battery, campus.poi, review)
    if power_cap_kw is not None:
        _review_power_cap(power_cap_kw, campus.poi, review)
    return review


def _import_limit(poi: PoiConfig) -> str:
    return f"the import limit (campus.poi.import_limit_kw {format_kw(poi.import_limit_kw)} kW)"


def _review_poi(campus: CampusConfig, review: CampusReview) -> None:
    poi = campus.poi
    slip = unit_slip("campus.poi.export_limit_kw", poi.export_limit_kw, _import_limit(poi),
                     poi.import_limit_kw, below=False)
    if slip:
        review.errors.append(slip)
    if poi.islanded and not any(g.kind == "genset" for g in campus.generators):
        review.errors.append("campus.poi.islanded: no genset (campus.generators with kind "
                             "'genset') to carry the load without the grid")
    if poi.export_limit_kw > 0 and not campus.generators and campus.battery is None:
        review.warnings.append(
            f"campus.poi.export_limit_kw: {format_kw(poi.export_limit_kw)} kW, but nothing "
            "on the campus generates: the site can never export")


def _review_firm_loads(campus: CampusConfig, review: CampusReview) -> None:
    poi, limit = campus.poi, _import_limit(campus.poi)
    for f in campus.firm_loads:
        slip = unit_slip(f"campus.firm_loads[{f.id}].max_kw", f.max_kw, limit,
                         poi.import_limit_kw, below=False)
        if slip:
            review.errors.append(slip)
    firm = review.firm_max_kw
    if firm > poi.import_limit_kw + review.genset_firm_kw:
        genset = (f" plus the gensets' {format_kw(review.genset_firm_kw)} kW (rating less "
                  "reserve)" if review.genset_firm_kw > 0 else "")
        review.errors.append(
            f"campus.firm_loads: together up to {format_kw(firm)} kW (max_kw), above {limit}"
            f"{genset}: the firm loads alone could overload the interconnect, with every "
            "miner asleep")
    elif firm > poi.import_limit_kw:
        review.warnings.append(
            f"campus.firm_loads: together up to {format_kw(firm)} kW (max_kw), above {limit}: "
            "held only while the gensets run")


def _review_generator(g: Generator, poi: PoiConfig, review: CampusReview) -> None:
    where = f"campus.generators[{g.id}]"
    connection = max(poi.import_limit_kw, poi.export_limit_kw)
    interconnect = f"the interconnect ({format_kw(connection)} kW)"
    ratio = g.rating_kw / connection
    slip = unit_slip(f"{where}.rating_kw", g.rating_kw, interconnect, connection, below=False)
    if slip:
        review.errors.append(slip)
    elif ratio > GENERATION_FAR_ABOVE_RATIO:
        review.warnings.append(
            f"{where}.rating_kw: {format_kw(g.rating_kw)} kW is {ratio:.0f} times "
            f"{interconnect}: right for generation behind a small connection, a unit slip "
            "otherwise")
    elif ratio < 1 / (UNIT_SLIP_RATIO * 10):
        # Only a warning, and only far below: a small solar roof on a large site is real.
        review.warnings.append(
            f"{where}.rating_kw: {format_kw(g.rating_kw)} kW is 1/{1 / ratio:.0f} of "
            f"{interconnect}: is it in MW? ({format_kw(g.rating_kw)} MW = "
            f"{format_kw(g.rating_kw * 1000)} kW)")
    if g.kind == "genset" and g.marginal_cost_usd_per_mwh <= 0:
        review.warnings.append(
            f"{where}.marginal_cost_usd_per_mwh: {g.marginal_cost_usd_per_mwh:g} $/MWh for a "
            "genset: its fuel is free? (flare gas may be; pipeline gas and diesel are not)")
    if g.max_load_step_kw is not None and g.max_load_step_kw < g.rating_kw / 1000:
        review.warnings.append(
            f"{where}.max_load_step_kw: {format_kw(g.max_load_step_kw)} kW is under 0.1 % of "
            f"its rating ({format_kw(g.rating_kw)} kW): is it in MW?")


def _review_battery(b: BatteryConfig, poi: PoiConfig, review: CampusReview) -> None:
    for name, value in (("max_charge_kw", b.max_charge_kw),
                        ("max_discharge_kw", b.max_discharge_kw)):
        slip = unit_slip(f"campus.battery.{name}", value, _import_limit(poi),
                         poi.import_limit_kw, below=False)
        if slip:
            review.errors.append(slip)
    hours = b.capacity_kwh / b.max_discharge_kw
    if not BATTERY_HOURS[0] <= hours <= BATTERY_HOURS[1]:
        review.errors.append(
            f"campus.battery.capacity_kwh: {format_kw(b.capacity_kwh)} kWh empties in "
            f"{hours:.3g} h at max_discharge_kw ({format_kw(b.max_discharge_kw)} kW): "
            f"batteries run {BATTERY_HOURS[0] * 60:.0f} min to {BATTERY_HOURS[1]:.0f} h; kWh "
            "and MWh (or kW and MW) mixed up?")


def _review_power_cap(power_cap_kw: float, poi: PoiConfig, review: CampusReview) -> None:
    # Either may be the one in the wrong unit, so the message does not guess which.
    limit = _import_limit(poi)
    ratio = power_cap_kw / poi.import_limit_kw
    got = f"power_cap_kw: {format_kw(power_cap_kw)} kW"
    if ratio > UNIT_SLIP_RATIO:
        review.errors.append(f"{got} is {ratio:.0f} times {limit}: one of them is in the "
                             "wrong unit")
    elif ratio < 1 / UNIT_SLIP_RATIO:
        review.errors.append(f"{got} is 1/{1 / ratio:.0f} of {limit}: one of them is in the "
                             "wrong unit")
    elif power_cap_kw > poi.import_limit_kw:
        review.warnings.append(f"{got} is above {limit}: the interconnect binds before the "
                               "cap does")


def _review_meters(campus: CampusConfig, meters: Sequence[MqttMeter],
                   review: CampusReview) -> None:
    mqtt = {m.id: m for m in meters}
    modbus = {d.id for d in campus.modbus}
    site_meters = [m.id for m in meters if m.role == "site"]
    known = sorted(set(mqtt) | modbus)
    for where, meter in campus.meter_uses():
        in_mqtt, in_modbus = meter in mqtt, meter in modbus
        if in_mqtt and in_modbus:
            review.errors.append(f"{where}: {meter!r} is both a [[meters]] and a "
                                 "[[campus.modbus]] id: rename one")
        elif not in_mqtt and not in_modbus:
            close = difflib.get_close_matches(meter, known, n=1, cutoff=0.6)
            hint = (f"; did you mean {close[0]!r}?" if close else
                    f" (known: {', '.join(known)})" if known else
                    ": no meter is configured ([[meters]] or [[campus.modbus]])")
            review.errors.append(f"{where}: no meter {meter!r}{hint}")
        elif in_mqtt:
            role = mqtt[meter].role
            if where == "campus.poi.meter" and role != "site":
                review.errors.append(
                    f"{where}: meter {meter!r} has role {role!r}; the POI's meter is the one "
                    "the controller plans against: give it role 'site'"
                    + (f" (today that is {', '.join(map(repr, site_meters))})"
                       if site_meters else ""))
            elif where != "campus.poi.meter" and role == "site":
                review.errors.append(
                    f"{where}: meter {meter!r} has role 'site': it measures the whole site at "
                    "the POI, not this part; give this part its own meter (role 'aux')")
    unused = sorted(modbus - {m for _, m in campus.meter_uses()})
    for device in unused:
        review.warnings.append(f"campus.modbus: device {device!r} is not any campus entry's "
                               "meter: it is not read")
    if campus.poi.meter in modbus and site_meters:
        review.warnings.append(
            f"campus.poi.meter: {campus.poi.meter!r} is a Modbus device, and "
            f"[[meters]] {', '.join(map(repr, site_meters))} has role 'site': two meters "
            "for the POI; the campus reads the Modbus one")

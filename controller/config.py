"""Site configuration: one TOML file, validated by pydantic, overridable by MINEOPS_* variables.

Environment overrides use `__` between levels, e.g. MINEOPS_BROKER__PORT=1884 or
MINEOPS_POWER_CAP_KW=2500. Unknown keys and unknown MINEOPS_* variables are errors, so a
typo never goes unnoticed; so are non-finite numbers (nan, inf) and inverted pairs.

The tables of device types (meters, the bridge, the VEN) live beside their drivers and
are gathered here; `controller/site_file.py` reads a file into this model and reports
every problem at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from controller.campus_config import CampusConfig, campus_review
from controller.catalogue import load_catalogue
from controller.config_types import (
    ID_PATTERN,
    MinerEntry,
    ModelKey,
    PolicyKnobs,
    StrictModel,
    above,
    format_kw,
    unit_slip,
)
from drivers.firmware.config import BridgeConfig
from drivers.meters import MeterList
from drivers.openadr.config import OpenAdrConfig


class BrokerConfig(StrictModel):
    """Where the MQTT broker is and how to log in."""

    host: str = Field(default="127.0.0.1", description="Broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker TCP port")
    tls: bool = Field(default=False, description="Connect with TLS")
    ca_file: Path | None = Field(default=None, description="CA bundle for TLS (system if unset)")
    username: str | None = Field(default=None, description="MQTT user name")
    password: SecretStr | None = Field(default=None, description="MQTT password")
    keepalive_s: int = Field(default=15, ge=5, le=600, description="MQTT keepalive, s")
    reconnect_max_s: float = Field(
        default=10.0, gt=0, le=300, description="Longest wait between reconnect attempts, s"
    )


class MinerGroup(StrictModel):
    """A rack (or row, or container) of identical miners, described by a count."""

    name: str = Field(pattern=ID_PATTERN, description="Group id, used in topics and metrics")
    model: ModelKey = Field(description="Catalogue key, e.g. 's21' (see `mineops models`)")
    count: int = Field(ge=1, le=100_000, description="Number of miners in the group")
    id_prefix: str | None = Field(
        default=None, pattern=ID_PATTERN,
        description="Miner ids are <prefix>-<nnnn>; default: group name"
    )
    never_curtail: bool = Field(default=False, description="Keep these at full power always")
    priority: int = Field(
        default=0, ge=0, le=9, description="Higher sheds later when the cap binds"
    )


class FleetConfig(StrictModel):
    """The miners on site."""

    groups: list[MinerGroup] = Field(default_factory=list)
    miners: list[MinerEntry] = Field(default_factory=list)


class EnergyConfig(StrictModel):
    """How energy is paid for."""

    adders_usd_per_mwh: float = Field(
        default=0.0, ge=-1000, le=10_000, description="Added to the market price (fees, TDSP)"
    )
    aux_fraction: float = Field(
        default=0.05, ge=0, le=1, description="Cooling/auxiliary load as a fraction of IT load"
    )
    default_price_usd_per_mwh: float = Field(
        default=1000.0, ge=-1000, le=100_000,
        description="Price assumed before any price arrives (high: run nothing risky)",
    )
    # The market's own rules bound its prices (ERCOT: offer cap $5,000/MWh, floor
    # -$250/MWh), but settled prices have gone beyond them ($9,000 in February 2021): a
    # price outside is planned with at the bound (controller.core.prices.PriceBounds).
    price_floor_usd_per_mwh: float = Field(
        default=-250.0, ge=-100_000, le=0,
        description="A lower market price is planned with at this floor")
    price_cap_usd_per_mwh: float = Field(
        default=5000.0, gt=0, le=100_000,
        description="A higher market price is planned with at this cap (the fleet sleeps)")


# The policy's own defaults (PolicyKnobs) are the site file's defaults.
_KNOB: dict[str, float] = {f.name: f.default for f in dataclasses.fields(PolicyKnobs)
                           if isinstance(f.default, float)}


class PolicyConfig(StrictModel):
    """Control-loop and policy knobs."""

    decision_interval_s: float = Field(default=5.0, gt=0, le=3600, description="Tick, s")
    telemetry_stale_s: float = Field(
        default=30.0, gt=0, description="Telemetry older than this counts at max power, s"
    )
    min_run_s: float = Field(default=_KNOB["min_run_s"], ge=0,
                             description="Minimum time on after waking, s")
    min_sleep_s: float = Field(default=_KNOB["min_sleep_s"], ge=0,
                               description="Minimum time asleep, s")
    hysteresis_usd_per_mwh: float = Field(
        default=_KNOB["hysteresis_usd_per_mwh"], ge=0,
        description="Keep a miner's level while the price moves less than this"
    )
    wake_latency_factor: float = Field(
        default=_KNOB["wake_latency_factor"], ge=0,
        description="Wake a sleeping miner only after the price has been low this many times "
        "its wake time (0: at once)",
    )
    ramp_kw_per_min: float = Field(
        # The one float where infinity means something: no limit (TOML `inf`, or leave it out).
        default=_KNOB["ramp_kw_per_min"], gt=0, allow_inf_nan=True,
        description="Site ramp limit for economic moves, kW/min (cap and grid cuts ignore it); "
        "inf (the default): no limit",
    )
    derate_start_c: float = Field(default=_KNOB["derate_start_c"], ge=0, le=150,
                                  description="Above this, lower the max target, deg C")
    critical_c: Annotated[float, above(
        "derate_start_c", "C", "the derating ramp runs from derate_start_c up to critical_c",
    )] = Field(default=_KNOB["critical_c"], ge=0, le=150,
               description="At or above this, the miner sleeps, deg C")
    cap_headroom_fraction: float = Field(
        default=0.01, ge=0, le=0.5,
        description="Plan this far below the cap, so meter noise and settling stay under it",
    )
    clock_skew_s: float = Field(
        default=60.0, ge=0, le=3600,
        description="A payload's timestamp may be this far ahead of the controller's clock; "
        "further ahead it is rejected (bad_timestamp), s")
    signal_max_age_s: float = Field(
        default=7 * 86_400.0, gt=0,
        description="A price, price schedule or hashprice whose timestamp is older than this "
        "is rejected (bad_timestamp), s")

    def knobs(self, **overrides: Any) -> PolicyKnobs:
        """The policy's knobs as this table sets them (`overrides` win: the backtest's --knob)."""
        mine = {name: getattr(self, name) for name in _KNOB if name in type(self).model_fields}
        return PolicyKnobs(**{**mine, **overrides})


class FrequencyConfig(StrictModel):
    """Under-frequency response: shed at once, restore after the grid recovers."""

    shed_below_hz: float = Field(default=59.7, ge=40, le=70,
                                 description="Shed when the meter reads below this")
    restore_above_hz: Annotated[float, above(
        "shed_below_hz", "Hz", "at or below it the site would restore while the grid is "
        "still low enough to shed",
    )] = Field(default=59.9, ge=40, le=70, description="Restore after this long above this")
    restore_hold_s: float = Field(default=30.0, ge=0, description="Hold time before restoring, s")
    shed_groups: list[str] = Field(
        default_factory=list, description="Groups slept at once (empty: every group)"
    )


class GridConfig(StrictModel):
    """Grid obligations: demand-response events and frequency response."""

    journal_path: Path = Field(
        default=Path("mineops-grid.sqlite3"),
        description="SQLite journal of grid events (survives restarts; settlement records)",
    )
    prepare_s: float = Field(
        default=30.0, ge=0, description="The event target is in force this long before its deadline"
    )
    recovery_kw_per_min: float | None = Field(
        default=None, gt=0,
        description="Ramp back up after an event, kW/min (default: policy.ramp_kw_per_min, or "
        "10 % of the site cap per minute)",
    )
    record_interval_s: float = Field(default=5.0, gt=0,
                                     description="Compliance sample interval, s")
    keep_alive_groups: list[str] = Field(
        default_factory=list, description="Groups that keep running through an emergency event"
    )
    peak_hold_kw: float | None = Field(
        default=None, ge=0,
        description="Site level held through a peak alert (4CP) that names no level, kW",
    )
    frequency: FrequencyConfig = Field(default_factory=FrequencyConfig)


class MetricsConfig(StrictModel):
    """Prometheus endpoint."""

    host: str = Field(default="127.0.0.1", description="Listen address")
    port: int = Field(default=9108, ge=0, le=65535, description="Listen port (0: any free)")
    per_miner: bool = Field(default=False, description="Also export per-miner series")
    per_group: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Per-group series: auto exports them up to 10,000 groups (~100,000 "
        "series), always and never regardless of the fleet")


class SiteConfig(BaseSettings):
    """A mine site: identity, broker, fleet, limits and economics."""

    model_config = SettingsConfigDict(
        env_prefix="MINEOPS_", env_nested_delimiter="__", extra="forbid", frozen=True,
        allow_inf_nan=False,
    )

    site_id: str = Field(pattern=ID_PATTERN, description="Site id, the second level of every topic")
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    fleet: FleetConfig
    meters: MeterList = Field(default_factory=list,
                              description="Energy meters, each read by its `type`'s driver")
    power_cap_kw: float = Field(gt=0, le=10_000_000, description="Site import limit incl. aux, kW")
    hashprice_usd_per_ph_day: float = Field(
        gt=0, le=10_000, description="Revenue per PH/s per day, $ (feed may override)"
    )
    energy: EnergyConfig = Field(default_factory=EnergyConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    openadr: OpenAdrConfig | None = Field(
        default=None, description="OpenADR 2.0b VEN for `mineops ven` (none: no VEN)"
    )
    bridge: BridgeConfig | None = Field(
        default=None, description="Real miners for `mineops bridge` (none: no bridge)"
    )
    campus: CampusConfig | None = Field(
        default=None, description="The energy campus: interconnect, firm loads, generation, "
        "battery (none: miners only; docs/campus.md)"
    )

    @model_validator(mode="after")
    def _check_fleet(self) -> SiteConfig:
        ids = [m.id for m in self.inventory]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"miner id {dup!r} appears twice in the fleet")
        if not ids:
            raise ValueError("the fleet has no miners")
        groups = {m.group for m in self.inventory}
        for name in [*self.grid.keep_alive_groups, *self.grid.frequency.shed_groups]:
            if name not in groups:
                raise ValueError(f"grid: unknown group {name!r} (not in the fleet)")
        return self

    @model_validator(mode="after")
    def _check_never_curtail(self) -> SiteConfig:
        # Unlike the unit checks of cap_review (see load_config), this holds for any config,
        # however built: no plan can keep these miners at full power under such a cap. The
        # review's other errors go with it: a unit typo is the likely cause.
        review = self.cap_review()
        if review.cannot_hold:
            raise ValueError("\n".join(review.errors))
        return self

    @model_validator(mode="after")
    def _check_campus(self) -> SiteConfig:
        if self.campus is not None:
            review = campus_review(self.campus, self.meters, self.power_cap_kw)
            if review.errors:
                raise ValueError("\n".join(review.errors))
        return self

    @model_validator(mode="after")
    def _check_bridge(self) -> SiteConfig:
        if self.bridge is not None:
            self.bridge.endpoints(self.inventory)
        return self

    @cached_property
    def inventory(self) -> list[MinerEntry]:
        """Every miner, groups expanded, in a stable order (the fleet arrays' index)."""
        out: list[MinerEntry] = []
        for g in self.fleet.groups:
            prefix = g.id_prefix or g.name
            # The group's longest id is validated (ids differ only in their number, so
            # the others are valid too); the rest are built without validating each and
            # share one set of field names. At 300,000 miners a validated entry each
            # cost ~1.1 KB and ~1 s; these cost ~0.4 KB.
            last = MinerEntry(id=f"{prefix}-{g.count:04d}", model=g.model, group=g.name,
                              never_curtail=g.never_curtail, priority=g.priority)
            names = last.__pydantic_fields_set__
            out.extend(MinerEntry.model_construct(
                names, id=f"{prefix}-{i:04d}", model=g.model, group=g.name,
                never_curtail=g.never_curtail, priority=g.priority) for i in range(1, g.count))
            out.append(last)
        return out + list(self.fleet.miners)

    def cap_review(self) -> CapReview:
        """The cap against the fleet's draw: unit typos (errors) and doubtful caps (warnings)."""
        catalogue = load_catalogue()
        aux1 = 1.0 + self.energy.aux_fraction
        counts: dict[tuple[str, bool], int] = {}
        for g in self.fleet.groups:
            key = (g.model, g.never_curtail)
            counts[key] = counts.get(key, 0) + g.count
        for m in self.fleet.miners:
            key = (m.model, m.never_curtail)
            counts[key] = counts.get(key, 0) + 1
        stock_w = sum(catalogue.get(model).nominal_w * n for (model, _), n in counts.items())
        never_w = sum(catalogue.get(model).max_w * n for (model, nc), n in counts.items() if nc)
        smallest = min((catalogue.get(model) for model, _ in counts),
                       key=lambda m: m.nominal_w, default=None)
        cap = self.power_cap_kw
        fleet_kw = stock_w * aux1 / 1000.0
        review = CapReview(
            cap_kw=cap, fleet_stock_kw=fleet_kw, never_curtail_max_kw=never_w * aux1 / 1000.0,
            planning_cap_kw=cap * (1.0 - self.policy.cap_headroom_fraction),
        )
        if fleet_kw <= 0 or smallest is None:
            return review  # no fleet: _check_fleet says so
        aux = _pct(aux1 - 1)
        fleet = f"the fleet's stock draw ({format_kw(fleet_kw)} kW incl. {aux} aux)"
        got = f"power_cap_kw: {format_kw(cap)} kW"
        ratio = cap / fleet_kw
        slip = unit_slip("power_cap_kw", cap, fleet, fleet_kw)
        if slip:
            review.errors.append(slip)
        elif ratio > CAP_FAR_ABOVE_RATIO:
            review.warnings.append(f"{got} is {ratio:.1f} times {fleet}: the cap never binds; "
                                   "is it the site's import limit in kW?")
        smallest_kw = smallest.nominal_w * aux1 / 1000.0
        review.smallest_miner_kw, review.smallest_model = smallest_kw, smallest.name
        if not review.errors and cap < smallest_kw:
            review.warnings.append(
                f"{got} is below the smallest miner's stock draw ({format_kw(smallest_kw)} kW "
                f"incl. aux, {smallest.name}): no miner can run at stock")
        if review.never_curtail_max_kw > review.planning_cap_kw:
            review.cannot_hold = True
            groups = ", ".join(sorted({m.group for m in self.inventory if m.never_curtail}))
            headroom = _pct(self.policy.cap_headroom_fraction)
            review.errors.append(
                f"{got} ({format_kw(review.planning_cap_kw)} kW after the {headroom} headroom) "
                f"is below the never-curtail miners' maximum draw of "
                f"{format_kw(review.never_curtail_max_kw)} kW incl. {aux} aux (groups {groups}): "
                "the cap could not be held with them at full power")
        return review

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Where values come from, first wins: MINEOPS_* variables, then the file's."""
        # The TOML file is passed per load (see load_config); the environment wins over it.
        return (env_settings, init_settings)


# A cap more than UNIT_SLIP_RATIO times the fleet's stock draw, or under 1/UNIT_SLIP_RATIO
# of it, is a unit typo (config_types.unit_slip); one more than 3 times the fleet never
# binds, which deserves a second look.
CAP_FAR_ABOVE_RATIO = 3.0


@dataclass(slots=True)
class CapReview:
    """The power cap against the fleet it feeds (see SiteConfig.cap_review)."""

    cap_kw: float
    fleet_stock_kw: float  # every miner at its stock power, plus aux
    never_curtail_max_kw: float  # never-curtail miners at their highest target, plus aux
    planning_cap_kw: float  # the cap less policy.cap_headroom_fraction
    errors: list[str] = field(default_factory=list)  # "power_cap_kw: why"
    warnings: list[str] = field(default_factory=list)
    cannot_hold: bool = False  # never-curtail load above the cap: the model refuses it
    smallest_miner_kw: float = 0.0  # the smallest model's stock draw, plus aux
    smallest_model: str = ""  # its name


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.3g} %"

"""Site configuration: one TOML file, validated by pydantic, overridable by MINEOPS_* variables.

Environment overrides use `__` between levels, e.g. MINEOPS_BROKER__PORT=1884 or
MINEOPS_POWER_CAP_KW=2500. Unknown keys and unknown MINEOPS_* variables are errors, so a
typo never goes unnoticed; so are non-finite numbers (nan, inf) and inverted pairs.

`load_config` is the door for files people write: on top of the model's own checks it
compares the power cap with the fleet (a cap off by orders of magnitude is a unit typo),
checks the environment for unknown variables and, when asked, the grid journal's path. It
reports every problem at once, one line each.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from controller.catalogue import load_catalogue

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def _known_model(key: str) -> str:
    if key not in load_catalogue().models:
        known = ", ".join(sorted(load_catalogue().models))
        raise ValueError(f"unknown miner model {key!r}; known models: {known}")
    return key


ModelKey = Annotated[str, AfterValidator(_known_model)]


class _Strict(BaseModel):
    # nan and inf are never meant in a site file; the one field where inf means "no limit"
    # says so itself (policy.ramp_kw_per_min).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BrokerConfig(_Strict):
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


class MinerGroup(_Strict):
    """A rack (or row, or container) of identical miners, described by a count."""

    name: str = Field(pattern=_ID, description="Group id, used in topics and metrics")
    model: ModelKey = Field(description="Catalogue key, e.g. 's21' (see `mineops models`)")
    count: int = Field(ge=1, le=100_000, description="Number of miners in the group")
    id_prefix: str | None = Field(
        default=None, pattern=_ID, description="Miner ids are <prefix>-<nnnn>; default: group name"
    )
    never_curtail: bool = Field(default=False, description="Keep these at full power always")
    priority: int = Field(
        default=0, ge=0, le=9, description="Higher sheds later when the cap binds"
    )


class MinerEntry(_Strict):
    """One miner listed by itself (for odd machines outside any uniform rack)."""

    id: str = Field(pattern=_ID)
    model: ModelKey
    group: str = Field(pattern=_ID)
    never_curtail: bool = False
    priority: int = Field(default=0, ge=0, le=9)


class FleetConfig(_Strict):
    """The miners on site."""

    groups: list[MinerGroup] = Field(default_factory=list)
    miners: list[MinerEntry] = Field(default_factory=list)


class MineopsMeter(_Strict):
    """A meter publishing the project's own JSON on mineops/<site>/meter/<id>/telemetry."""

    type: Literal["mineops"] = "mineops"
    id: str = Field(pattern=_ID)
    role: Literal["site", "aux"] = Field(default="site", description="What the meter measures")


# One MQTT topic level (no wildcards, no slash), and a topic prefix of such levels.
_TOPIC_LEVEL = r"^[^/#+\s]{1,64}$"
_TOPIC_PREFIX = r"^[^/#+\s]+(/[^/#+\s]+)*$"


class TasmotaMeter(_Strict):
    """A Tasmota energy monitor: the ENERGY block on tele/<topic>/SENSOR, stat/<topic>/STATUS8."""

    type: Literal["tasmota"]
    id: str = Field(pattern=_ID, description="Meter id, used in logs and metrics")
    role: Literal["site", "aux"] = Field(default="site", description="What the meter measures")
    topic: str = Field(pattern=_TOPIC_LEVEL, description="The device's %topic% (Tasmota `Topic`)")
    full_topic: str = Field(
        default="%prefix%/%topic%/", max_length=128,
        description="The device's FullTopic (Tasmota `FullTopic`); %prefix% and %topic% are "
        "filled in",
    )

    @field_validator("full_topic")
    @classmethod
    def _check_full_topic(cls, value: str) -> str:
        if "%prefix%" not in value:
            raise ValueError("full_topic must contain %prefix% (tele/stat tell readings apart)")
        if any(c in value for c in "#+ ") or value.startswith("/"):
            raise ValueError("full_topic must not hold wildcards, spaces or a leading /")
        return value

    def device_topic(self, prefix: str, leaf: str) -> str:
        """A topic of this device, e.g. device_topic("tele", "SENSOR")."""
        full = self.full_topic.replace("%prefix%", prefix).replace("%topic%", self.topic)
        return f"{full.rstrip('/')}/{leaf}"

    @property
    def source(self) -> str:
        return self.device_topic("tele", "SENSOR")


class ShellyGen2Meter(_Strict):
    """A Shelly Gen2/Gen3 meter: em:0 (Pro 3EM, 3EM Gen3 triphase) or em1:N (Pro EM, EM Gen3,
    3EM monophase)."""

    type: Literal["shelly_gen2"]
    id: str = Field(pattern=_ID, description="Meter id, used in logs and metrics")
    role: Literal["site", "aux"] = Field(default="site", description="What the meter measures")
    prefix: str = Field(
        pattern=_TOPIC_PREFIX, max_length=128,
        description="The device's MQTT topic prefix (default on the device: its id, e.g. "
        "shellypro3em-0cb815fcaff4)",
    )
    em1_channels: list[Annotated[int, Field(ge=0, le=2)]] | None = Field(
        default=None, min_length=1, max_length=3,
        description="EM1 channels (em1:N) summed into the reading, for devices without em:0 "
        "(Pro EM, EM Gen3, 3EM in its monophase profile); unset: the device's em:0",
    )

    @field_validator("em1_channels")
    @classmethod
    def _distinct_em1_channels(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a channel is listed twice")
        return None if value is None else sorted(value)

    @property
    def source(self) -> str:
        return f"shelly {self.prefix}"


class ShellyGen1Meter(_Strict):
    """A Shelly Gen1 EM or 3EM: one value per topic, shellies/<device_id>/emeter/<i>/<quantity>."""

    type: Literal["shelly_gen1"]
    id: str = Field(pattern=_ID, description="Meter id, used in logs and metrics")
    role: Literal["site", "aux"] = Field(default="site", description="What the meter measures")
    device_id: str = Field(
        pattern=_TOPIC_LEVEL, description="The device's MQTT id, e.g. shellyem3-ECFABCC7F0F0"
    )
    channels: list[Annotated[int, Field(ge=0, le=2)]] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1, max_length=3,
        description="Channels summed into the reading: 0-2 on a 3EM, 0 and/or 1 on an EM",
    )

    @field_validator("channels")
    @classmethod
    def _distinct_channels(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("a channel is listed twice")
        return sorted(value)

    @property
    def source(self) -> str:
        return f"shellies/{self.device_id}"


# evcc-style: `type` picks the driver (drivers/meters/registry.py), one model per device type.
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
        source = m.id if isinstance(m, MineopsMeter) else m.source
        if source in sources:
            raise ValueError(f"meters {sources[source]!r} and {m.id!r} read the same device "
                             f"({source})")
        sources[source] = m.id
    return meters


MeterList = Annotated[list[MeterConfig], AfterValidator(_distinct_meters)]


class EnergyConfig(_Strict):
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


class PolicyConfig(_Strict):
    """Control-loop and policy knobs."""

    decision_interval_s: float = Field(default=5.0, gt=0, le=3600, description="Tick, s")
    telemetry_stale_s: float = Field(
        default=30.0, gt=0, description="Telemetry older than this counts at max power, s"
    )
    min_run_s: float = Field(default=300.0, ge=0, description="Minimum time on after waking, s")
    min_sleep_s: float = Field(default=300.0, ge=0, description="Minimum time asleep, s")
    hysteresis_usd_per_mwh: float = Field(
        default=5.0, ge=0, description="Keep a miner's level while the price moves less than this"
    )
    wake_latency_factor: float = Field(
        default=1.0, ge=0,
        description="Wake a sleeping miner only after the price has been low this many times "
        "its wake time (0: at once)",
    )
    ramp_kw_per_min: float = Field(
        # The one float where infinity means something: no limit (TOML `inf`, or leave it out).
        default=float("inf"), gt=0, allow_inf_nan=True,
        description="Site ramp limit for economic moves, kW/min (cap and grid cuts ignore it); "
        "inf (the default): no limit",
    )
    derate_start_c: float = Field(default=80.0, ge=0, le=150,
                                  description="Above this, lower the max target, deg C")
    critical_c: float = Field(default=95.0, ge=0, le=150,
                              description="At or above this, the miner sleeps, deg C")
    cap_headroom_fraction: float = Field(
        default=0.01, ge=0, le=0.5,
        description="Plan this far below the cap, so meter noise and settling stay under it",
    )

    @field_validator("critical_c")
    @classmethod
    def _critical_above_derate(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("derate_start_c")  # absent when it failed its own check
        if start is not None and value <= start:
            raise ValueError(f"must be above derate_start_c ({start:g} C): the derating "
                             "ramp runs from derate_start_c up to critical_c")
        return value


class FrequencyConfig(_Strict):
    """Under-frequency response: shed at once, restore after the grid recovers."""

    shed_below_hz: float = Field(default=59.7, ge=40, le=70,
                                 description="Shed when the meter reads below this")
    restore_above_hz: float = Field(default=59.9, ge=40, le=70,
                                    description="Restore after this long above this")
    restore_hold_s: float = Field(default=30.0, ge=0, description="Hold time before restoring, s")
    shed_groups: list[str] = Field(
        default_factory=list, description="Groups slept at once (empty: every group)"
    )

    @field_validator("restore_above_hz")
    @classmethod
    def _restore_above_shed(cls, value: float, info: ValidationInfo) -> float:
        shed = info.data.get("shed_below_hz")  # absent when it failed its own check
        if shed is not None and value <= shed:
            raise ValueError(f"must be above shed_below_hz ({shed:g} Hz): at or below it the "
                             "site would restore while the grid is still low enough to shed")
        return value


class GridConfig(_Strict):
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


class MetricsConfig(_Strict):
    """Prometheus endpoint."""

    host: str = Field(default="127.0.0.1", description="Listen address")
    port: int = Field(default=9108, ge=0, le=65535, description="Listen port (0: any free)")
    per_miner: bool = Field(default=False, description="Also export per-miner series")


class OpenAdrConfig(_Strict):
    """The site's OpenADR 2.0b VEN (`mineops ven`): the VTN to poll and how its events map to kW."""

    vtn_url: str = Field(
        pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=512,
        description="The VTN's OpenADR endpoint, e.g. https://vtn.example.com/OpenADR2/Simple/2.0b",
    )
    ven_name: str = Field(min_length=1, max_length=128,
                          description="This VEN's name, as registered with the utility")
    ven_id: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="This VEN's id if the utility assigned one (default: the VTN assigns it)",
    )
    poll_interval_s: float | None = Field(
        default=None, ge=1, le=86_400,
        description="Poll the VTN this often, s (default: as often as the VTN asks)",
    )
    report_interval_s: float = Field(
        default=60.0, ge=1, le=3600,
        description="Shortest site-power report interval offered to the VTN, s",
    )
    report_stale_s: float = Field(
        default=60.0, gt=0, description="Meter readings older than this are not reported, s"
    )
    level_1_kw: float | None = Field(
        default=None, ge=0, le=10_000_000,
        description="Site target for SIMPLE level 1 (moderate), kW; unset: level 1 not honoured",
    )
    level_2_kw: float | None = Field(
        default=None, ge=0, le=10_000_000,
        description="Site target for SIMPLE level 2 (high), kW; unset: level 2 not honoured",
    )
    level_3_kw: float | None = Field(
        default=None, ge=0, le=10_000_000,
        description="Site target for SIMPLE level 3 (special), kW; unset: level 3 not honoured",
    )
    opt_in: Literal["when_mapped", "always", "never"] = Field(
        default="when_mapped",
        description="when_mapped: opt in when every interval maps to a target the site can hold; "
        "always: opt in and forward what maps; never: opt out, forward nothing",
    )
    min_target_kw: float = Field(
        default=0.0, ge=0, le=10_000_000,
        description="Lowest site power the site can hold (never-curtail miners, cooling), kW; "
        "a lower target is not honoured under when_mapped",
    )
    deadline_from_ramp_up: bool = Field(
        # OpenADR's ramp-up is time *before* the start: the safe reading for the grid is to
        # be at the target by the start, so the lenient one is opt-in.
        default=False,
        description="Deadline = start + the event's ramp-up period (x-eiRampUp); false: the start",
    )
    republish_s: float = Field(
        default=60.0, ge=1, le=3600,
        description="Re-publish open events this often, s (a controller started later gets them)",
    )
    cert_file: Path | None = Field(default=None, description="VEN client certificate (PEM)")
    key_file: Path | None = Field(default=None, description="VEN private key (PEM)")
    key_passphrase: SecretStr | None = Field(default=None, description="Private key passphrase")
    ca_file: Path | None = Field(default=None, description="CA bundle the VTN's certificate "
                                 "is checked against")
    vtn_fingerprint: str | None = Field(
        default=None, max_length=128,
        description="The VTN certificate's fingerprint; messages are signature-checked when set",
    )

    @model_validator(mode="after")
    def _check(self) -> OpenAdrConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        levels = [x for x in (self.level_1_kw, self.level_2_kw, self.level_3_kw) if x is not None]
        if levels != sorted(levels, reverse=True):
            raise ValueError("a higher SIMPLE level must not have a higher target (level_N_kw)")
        return self


Firmware = Literal["auto", "luxos", "braiins", "antminer", "whatsminer", "vnish"]


class BridgeMiner(_Strict):
    """One real miner the bridge reaches at its own address; group and model come from [fleet]."""

    id: str = Field(pattern=_ID, description="Miner id; must be a miner of [fleet]")
    host: IPvAnyAddress = Field(description="The miner's IP address (its firmware API)")
    port: int = Field(default=4028, ge=1, le=65535,
                      description="Firmware API port (4028 for cgminer-style APIs)")
    group: str | None = Field(default=None, pattern=_ID,
                              description="Checked against [fleet] when given")
    model: ModelKey | None = Field(default=None, description="Checked against [fleet] when given")
    firmware: Firmware = Field(
        default="auto", description="auto: identify by probing (needs port 4028); or name it")


class BridgeRange(_Strict):
    """A fleet group's miners on consecutive addresses, in the group's id order."""

    group: str = Field(pattern=_ID, description="A group of [fleet]")
    first_host: IPv4Address = Field(description="Address of the group's first miner")
    count: int | None = Field(default=None, ge=1, le=100_000,
                              description="Only the first `count` miners (default: all)")
    port: int = Field(default=4028, ge=1, le=65535, description="Firmware API port")
    firmware: Firmware = Field(default="auto", description="As for a single miner")


@dataclass(frozen=True, slots=True)
class BridgeEndpoint:
    """One bridged miner, ranges expanded: where it is and what it is."""

    id: str
    host: str
    port: int
    group: str
    model: str
    firmware: Firmware


class BridgeConfig(_Strict):
    """`mineops bridge`: real miners polled over their firmware APIs (via pyasic)."""

    miners: list[BridgeMiner | BridgeRange] = Field(
        min_length=1, description="Miners by address ({id, host}) or by group range "
        "({group, first_host})")
    poll_interval_s: float = Field(default=10.0, ge=0.1, le=3600,
                                   description="Every miner is read this often, s")
    concurrency: int = Field(default=256, ge=1, le=10_000,
                             description="Most firmware requests in flight at once")
    timeout_s: float = Field(default=5.0, gt=0, le=120,
                             description="A read or command taking longer has failed, s")
    offline_after_polls: int = Field(
        default=3, ge=1, le=1000,
        description="Failed polls in a row before a miner is announced offline (the "
        "controller then counts it at its maximum power)")
    command_retries: int = Field(default=2, ge=0, le=10,
                                 description="Retries of a failed command within one poll")

    def endpoints(self, inventory: list[MinerEntry]) -> list[BridgeEndpoint]:
        """Every bridged miner, checked against the fleet; ValueError names the first problem."""
        by_id = {m.id: m for m in inventory}
        by_group: dict[str, list[MinerEntry]] = {}
        for m in inventory:
            by_group.setdefault(m.group, []).append(m)
        out: list[BridgeEndpoint] = []
        for item in self.miners:
            if isinstance(item, BridgeMiner):
                entry = by_id.get(item.id)
                if entry is None:
                    raise ValueError(f"bridge: miner {item.id!r} is not in the fleet")
                if item.group not in (None, entry.group) or item.model not in (None, entry.model):
                    raise ValueError(f"bridge: miner {item.id!r} is {entry.model} in group "
                                     f"{entry.group!r} in the fleet")
                out.append(BridgeEndpoint(entry.id, str(item.host), item.port, entry.group,
                                          entry.model, item.firmware))
                continue
            members = by_group.get(item.group)
            if members is None:
                raise ValueError(f"bridge: unknown group {item.group!r} (not in the fleet)")
            if item.count is not None and item.count > len(members):
                raise ValueError(f"bridge: group {item.group!r} has {len(members)} miners, "
                                 f"not {item.count}")
            start = int(item.first_host)
            for k, entry in enumerate(members[: item.count]):
                host = IPv4Address(start + k)
                out.append(BridgeEndpoint(entry.id, str(host), item.port, entry.group,
                                          entry.model, item.firmware))
        seen_ids: set[str] = set()
        seen_addr: dict[tuple[str, int], str] = {}
        for e in out:
            if e.id in seen_ids:
                raise ValueError(f"bridge: miner {e.id!r} is listed twice")
            seen_ids.add(e.id)
            if (e.host, e.port) in seen_addr:
                raise ValueError(f"bridge: miners {seen_addr[e.host, e.port]!r} and {e.id!r} "
                                 f"share {e.host}:{e.port}")
            seen_addr[e.host, e.port] = e.id
            if e.firmware == "auto" and e.port != 4028:
                raise ValueError(f"bridge: miner {e.id!r} on port {e.port}: firmware 'auto' "
                                 "identifies on port 4028 only; name the firmware")
        return out


class SiteConfig(BaseSettings):
    """A mine site: identity, broker, fleet, limits and economics."""

    model_config = SettingsConfigDict(
        env_prefix="MINEOPS_", env_nested_delimiter="__", extra="forbid", frozen=True,
        allow_inf_nan=False,
    )

    site_id: str = Field(pattern=_ID, description="Site id, the second level of every topic")
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
    def _check_bridge(self) -> SiteConfig:
        if self.bridge is not None:
            self.bridge.endpoints(self.inventory)
        return self

    @cached_property
    def inventory(self) -> list[MinerEntry]:
        """Every miner, groups expanded, in a stable order (the fleet arrays' index)."""
        out = [
            MinerEntry(
                id=f"{g.id_prefix or g.name}-{i:04d}",
                model=g.model,
                group=g.name,
                never_curtail=g.never_curtail,
                priority=g.priority,
            )
            for g in self.fleet.groups
            for i in range(1, g.count + 1)
        ]
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
        if ratio > CAP_UNIT_RATIO:
            review.errors.append(f"{got} is {ratio:.0f} times {fleet}: looks like W typed as kW "
                                 f"({format_kw(cap)} W = {format_kw(cap / 1000)} kW)")
        elif ratio < 1 / CAP_UNIT_RATIO:
            review.errors.append(f"{got} is 1/{1 / ratio:.0f} of {fleet}: looks like MW typed as "
                                 f"kW ({format_kw(cap)} MW = {format_kw(cap * 1000)} kW)")
        elif ratio > CAP_FAR_ABOVE_RATIO:
            review.warnings.append(f"{got} is {ratio:.1f} times {fleet}: the cap never binds; "
                                   "is it the site's import limit in kW?")
        smallest_kw = smallest.nominal_w * aux1 / 1000.0
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
        # The TOML file is passed per load (see load_config); the environment wins over it.
        return (env_settings, init_settings)


# A cap typed in the wrong unit is off by a factor of 1000 from the one meant, and the cap
# meant lies within a few times the fleet's stock draw (a site is built for its
# connection). So a cap more than 100 times the fleet, or below 1/100 of it, is a unit
# typo; and one more than 3 times the fleet never binds, which deserves a second look.
CAP_UNIT_RATIO = 100.0
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


def format_kw(value: float) -> str:
    """A power in kW for messages: whole kW from 100 up, three figures below."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.3g} %"


# MINEOPS_* variables the project reads that are not site-file keys (the tests and CI set
# them); every other MINEOPS_* variable must name a key of SiteConfig.
NOT_CONFIG_VARIABLES: frozenset[str] = frozenset({
    "MINEOPS_REQUIRE_MOSQUITTO",  # tests/CI: a missing mosquitto fails instead of falling back
    "MINEOPS_REQUIRE_SERVERS",  # tests/CI: missing prometheus/promtool/openssl fail, not skip
    "MINEOPS_TEST_BROKER",  # tests: which broker the integration tests start
})
ENV_PREFIX = "MINEOPS_"


class ConfigError(Exception):
    """A site file that cannot be used: one line per problem, each naming the field and why."""


def load_config(path: Path | str, *, check_journal: bool = False, **overrides: Any
                ) -> SiteConfig:
    """Read and validate a site file (and MINEOPS_* variables); ConfigError lists every problem.

    check_journal: also check that grid.journal_path can be opened for writing (for the
    commands that write it: `run`, and `check-config`, which vouches for `run`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = TomlConfigSettingsSource(SiteConfig, toml_file=path)()
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    data.update(overrides)
    env_problems = unknown_environment_variables(os.environ)
    try:
        cfg = SiteConfig(**data)
    except ValidationError as e:
        # An unknown nested variable (a misspelt MINEOPS_BROKER__PORT, say) also reaches
        # pydantic as an unknown key; the line naming the variable says more, so keep that.
        from_env = {tuple(name[len(ENV_PREFIX):].lower().split("__"))
                    for name, _ in env_problems}
        problems = [why for _, why in env_problems]
        problems += [validation_problem(err) for err in e.errors()
                     if not (err["type"] == "extra_forbidden" and not _in_file(data, err["loc"])
                             and _env_key(err["loc"]) in from_env)]
        raise ConfigError(_lines(path, problems)) from None
    problems = [why for _, why in env_problems] + cfg.cap_review().errors
    if check_journal:
        why = journal_path_problem(cfg.grid.journal_path)
        if why is not None:
            problems.append(f"grid.journal_path: {why}")
    if problems:
        raise ConfigError(_lines(path, problems))
    return cfg


def _lines(path: Path, problems: list[str]) -> str:
    """One line per problem, each starting with the file (a problem may hold several)."""
    return "\n".join(f"{path}: {line}" for p in problems for line in p.splitlines())


def describe_validation_error(e: ValidationError) -> str:
    """Every error of `e`, one 'field.path: why (got value)' per line."""
    return "\n".join(validation_problem(err) for err in e.errors())


def validation_problem(err: Any) -> str:
    """One pydantic error as 'field.path: why (got value)'; unknown keys get a suggestion."""
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc)
    msg = re.sub(r"^Value error, ", "", err["msg"])
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(str(loc[-1]), _known_keys(loc[:-1]))
    got = err.get("input")
    secret = any(w in str(loc[-1]) for w in ("password", "passphrase")) if loc else False
    if isinstance(got, dict | list) or got is None or secret:
        shown = ""
    else:
        text = repr(got)
        shown = f" (got {text if len(text) <= 80 else text[:77] + '...'})"
    # Checks across fields (e.g. the cap against the fleet) name their field themselves.
    return f"{where}: {msg}{shown}" if where else f"{msg}{shown}"


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]}?"
    return " (see deploy/site.example.toml for the keys)"


def _members(tp: Any) -> list[Any]:
    """The types a field annotation can hold: Annotated, Optional and unions unwrapped."""
    if get_origin(tp) is Annotated:
        return _members(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return [m for arg in get_args(tp) for m in _members(arg)]
    return [] if tp is type(None) else [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys valid at a pydantic error location (for 'did you mean')."""
    current: list[Any] = [SiteConfig]
    for part in loc:
        following: list[Any] = []
        for tp in (m for t in current for m in _members(t)):
            if isinstance(part, int):
                if get_origin(tp) is list:
                    following.append(get_args(tp)[0])
            elif _is_model(tp):
                if part in tp.model_fields:
                    following.append(tp.model_fields[part].annotation)
                # A union's member appears in the location by its tag or class name.
                elif part == tp.__name__ or part in get_args(_type_tag(tp)):
                    following.append(tp)
        current = following
    return sorted({k for t in current for m in _members(t) if _is_model(m)
                   for k in m.model_fields})


def _type_tag(model: type[BaseModel]) -> Any:
    field_info = model.model_fields.get("type")
    return field_info.annotation if field_info is not None else None


def _env_key(loc: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(p).lower() for p in loc)


def _in_file(data: Any, loc: tuple[Any, ...]) -> bool:
    """Whether the site file's own data holds the key at `loc` (tables only)."""
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def environment_names(model: type[BaseModel] | None = None, prefix: str = ENV_PREFIX
                      ) -> set[str]:
    """Every MINEOPS_* variable that sets a key: a field, or a field of a table, with `__`."""
    names: set[str] = set()
    for name, info in (model or SiteConfig).model_fields.items():
        env = f"{prefix}{name}".upper()
        names.add(env)
        for member in _members(info.annotation):
            if _is_model(member):  # a table; lists of tables are set whole, as JSON
                names |= environment_names(member, env + "__")
    return names


def unknown_environment_variables(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, problem) for each MINEOPS_* variable that names no key and is not ours.

    pydantic-settings would ignore a misspelt top-level one silently, so a typo in an
    override of a password or of the cap would go unnoticed. The value is never shown:
    it may be a secret.
    """
    known = environment_names()
    out = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings matches names case-insensitively
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in NOT_CONFIG_VARIABLES:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        hint = (f"; did you mean {close[0]}?" if close else
                " (MINEOPS_<KEY>, with __ between levels, sets a key of the site file)")
        out.append((name, f"environment variable {name}: unknown{hint}"))
    return out


def journal_path_problem(path: Path) -> str | None:
    """Why the grid journal at `path` cannot be opened for writing, or None if it can.

    The daemon creates missing directories, and SQLite in WAL mode writes `-wal` and `-shm`
    files beside the journal, so the directory must be writable as well as the file.
    Nothing is created here: check-config must not change the machine it checks.
    """
    try:
        if path.is_dir():
            return f"{path} is a directory, not a file"
        if path.exists():
            if not path.is_file():
                return f"{path} is not a regular file"
            if not os.access(path, os.R_OK | os.W_OK):
                return f"{path} exists but is not readable and writable by uid {os.getuid()}"
        # The first directory up the path that exists: the daemon creates the rest.
        existing = path.absolute().parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            return f"{path} cannot be created: {existing} is not a directory"
        if not os.access(existing, os.W_OK | os.X_OK):
            read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
            why = "is on a read-only file system" if read_only else \
                f"is not writable by uid {os.getuid()}"
            return f"{path} cannot be written: {existing} {why}"
    except OSError as e:  # e.g. a parent directory that cannot be searched
        return f"{path} cannot be checked: {e.strerror or e}"
    return None

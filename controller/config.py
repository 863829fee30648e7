"""Site configuration: one TOML file, validated by pydantic, overridable by MINEOPS_* variables.

Environment overrides use `__` between levels, e.g. MINEOPS_BROKER__PORT=1884 or
MINEOPS_POWER_CAP_KW=2500. Unknown keys are errors, so a typo never goes unnoticed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from controller.catalogue import MinerModel, load_catalogue

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def _known_model(key: str) -> str:
    if key not in load_catalogue().models:
        known = ", ".join(sorted(load_catalogue().models))
        raise ValueError(f"unknown miner model {key!r}; known models: {known}")
    return key


ModelKey = Annotated[str, AfterValidator(_known_model)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        default=1000.0,
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
        default=float("inf"), gt=0,
        description="Site ramp limit for economic moves, kW/min (cap and grid cuts ignore it)",
    )
    derate_start_c: float = Field(default=80.0, description="Above this, lower the max target")
    critical_c: float = Field(default=95.0, description="At or above this, the miner sleeps")
    cap_headroom_fraction: float = Field(
        default=0.01, ge=0, le=0.5,
        description="Plan this far below the cap, so meter noise and settling stay under it",
    )


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
        env_prefix="MINEOPS_", env_nested_delimiter="__", extra="forbid", frozen=True
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

    def model_of(self, entry: MinerEntry) -> MinerModel:
        return load_catalogue().get(entry.model)

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


class ConfigError(Exception):
    """A site file that cannot be used, with one message naming the field and why."""


def load_config(path: Path | str, **overrides: Any) -> SiteConfig:
    """Read and validate a site file; raise ConfigError with a clear one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = TomlConfigSettingsSource(SiteConfig, toml_file=path)()
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    data.update(overrides)
    try:
        return SiteConfig(**data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {describe_validation_error(e)}") from None


def describe_validation_error(e: ValidationError) -> str:
    """First error as 'field.path: why (got value)', plus how many more there are."""
    errors = e.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling against deploy/site.example.toml)"
    got = first.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    msg = re.sub(r"^Value error, ", "", msg)
    more = f"; and {len(errors) - 1} more error(s)" if len(errors) > 1 else ""
    return f"{where}: {msg}{shown}{more}"

"""The `[bridge]` table: real miners polled over their firmware APIs (`mineops bridge`)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Literal

from pydantic import Field, IPvAnyAddress

from controller.config_types import (
    ID_PATTERN,
    FailedPolls,
    MinerEntry,
    ModelKey,
    PollIntervalS,
    StrictModel,
)

Firmware = Literal["auto", "luxos", "braiins", "antminer", "whatsminer", "vnish"]


class BridgeMiner(StrictModel):
    """One real miner the bridge reaches at its own address; group and model come from [fleet]."""

    id: str = Field(pattern=ID_PATTERN, description="Miner id; must be a miner of [fleet]")
    host: IPvAnyAddress = Field(description="The miner's IP address (its firmware API)")
    port: int = Field(default=4028, ge=1, le=65535,
                      description="Firmware API port (4028 for cgminer-style APIs)")
    group: str | None = Field(default=None, pattern=ID_PATTERN,
                              description="Checked against [fleet] when given")
    model: ModelKey | None = Field(default=None, description="Checked against [fleet] when given")
    firmware: Firmware = Field(
        default="auto", description="auto: identify by probing (needs port 4028); or name it")


class BridgeRange(StrictModel):
    """A fleet group's miners on consecutive addresses, in the group's id order."""

    group: str = Field(pattern=ID_PATTERN, description="A group of [fleet]")
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


class BridgeConfig(StrictModel):
    """`mineops bridge`: real miners polled over their firmware APIs (via pyasic)."""

    miners: list[BridgeMiner | BridgeRange] = Field(
        min_length=1, description="Miners by address ({id, host}) or by group range "
        "({group, first_host})")
    poll_interval_s: PollIntervalS = Field(default=10.0,
                                           description="Every miner is read this often, s")
    concurrency: int = Field(default=256, ge=1, le=10_000,
                             description="Most firmware requests in flight at once")
    timeout_s: float = Field(default=5.0, gt=0, le=120,
                             description="A read or command taking longer has failed, s")
    offline_after_polls: FailedPolls = Field(
        default=3,
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

"""The firmware bridge: real miners polled over their own APIs, spoken for on MQTT.

To the controller a bridged miner looks like a simulated one: a rack's readings in one
`group/<g>/telemetry` message per poll, `miner/<id>/availability` when a miner stops or
starts answering, commands from `miner/<id>/cmd`, `group/<g>/cmd` and `fleet/cmd`
acknowledged through `ack_seq`. Firmware I/O goes through pyasic (drivers/bridge_firmware.py)
with at most `concurrency` requests in flight. A miner that fails `offline_after_polls`
polls in a row is announced offline (the controller counts it at its maximum power) and
its firmware session is dropped; when it answers again it is identified afresh (a
restarted LuxOS has a new session) and announced online.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from controller.catalogue import MinerModel, load_catalogue
from controller.config import BridgeConfig, BridgeEndpoint, SiteConfig
from controller.payloads import (
    FleetCommand,
    GroupCapabilities,
    GroupCommand,
    GroupMinerReading,
    GroupTelemetry,
    MinerCommand,
    MinerState,
    PayloadError,
    PowerControlSet,
    Setpoint,
    decode,
)
from controller.topics import OFFLINE, ONLINE, Kind, SiteTopics
from controller.transport import Transport
from drivers.bridge_firmware import Capabilities, FirmwareError, FirmwareMiner, FirmwareReading

log = structlog.get_logger("mineops.bridge")

_TELEMETRY_CHUNK = 2000  # GroupTelemetry's per-message limit
ClientFactory = Callable[[BridgeEndpoint, MinerModel, float], FirmwareMiner]


@dataclass(slots=True)
class _Device:
    """What the bridge knows of one miner between polls."""

    endpoint: BridgeEndpoint
    model: MinerModel
    client: FirmwareMiner | None = None
    failures: int = 0
    online: bool | None = None  # None until first announced
    reading: FirmwareReading | None = None
    ack_seq: int | None = None
    last_action: str = "wake"
    pending: tuple[Setpoint, int] | None = None
    commanding: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def id(self) -> str:
        return self.endpoint.id

    def state(self) -> MinerState:
        """LuxOS says `is_mining` even asleep: tell sleep from hashrate 0 and low power."""
        r = self.reading
        if r is None:
            return "error"
        if r.hashrate_ths > 0:
            return "running"
        if r.power_w <= max(3 * self.model.sleep_w, 0.05 * self.model.min_w):
            return "sleeping"
        return "stopping" if self.last_action == "sleep" else "waking"


class MinerBridge:
    """Polls the configured miners and speaks for them on the site's broker."""

    def __init__(
        self,
        cfg: SiteConfig,
        *,
        groups: set[str] | None = None,
        client_factory: ClientFactory = FirmwareMiner,
    ) -> None:
        if cfg.bridge is None:
            raise ValueError("the site file has no [bridge] table")
        self.cfg = cfg
        self.bcfg: BridgeConfig = cfg.bridge
        self.topics = SiteTopics(cfg.site_id)
        catalogue = load_catalogue()
        endpoints = [e for e in self.bcfg.endpoints(cfg.inventory)
                     if groups is None or e.group in groups]
        self.devices = {e.id: _Device(e, catalogue.get(e.model)) for e in endpoints}
        self.groups: dict[str, list[_Device]] = {}
        for d in self.devices.values():
            self.groups.setdefault(d.endpoint.group, []).append(d)
        self._client_factory = client_factory
        self._io = asyncio.Semaphore(self.bcfg.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._published_caps: dict[str, GroupCapabilities] = {}
        self.rejected: Counter[str] = Counter()
        self.commands_applied = 0
        self.commands_failed = 0
        self.polls = 0
        self.last_cycle_s = 0.0
        self.transport = Transport(
            cfg.broker,
            client_id=f"mineops-bridge-{cfg.site_id}-{'-'.join(sorted(self.groups))[:40]}",
            subscriptions=self.topics.simulator_subscriptions(),
            on_connect=self._announce,
            on_close=self._goodbye,
        )

    # -- MQTT ---------------------------------------------------------------------------

    async def _announce(self) -> None:
        """(Re)connected: racks online, then the miners known to be offline, then capabilities."""
        for g in self.groups:
            await self.transport.publish(self.topics.group(g, "availability"), ONLINE, qos=1,
                                         retain=True)
        for d in self.devices.values():
            if d.online is False:
                await self.transport.publish(self.topics.miner(d.id, "availability"), OFFLINE,
                                             qos=1, retain=True)
        self._published_caps.clear()
        await self._publish_capabilities()

    async def _goodbye(self) -> None:
        await asyncio.gather(*(
            self.transport.publish(self.topics.group(g, "availability"), OFFLINE, qos=1,
                                   retain=True)
            for g in self.groups
        ))

    def on_message(self, topic: str, raw: bytes) -> None:
        parsed = self.topics.parse(topic)
        try:
            if parsed.kind is Kind.MINER_CMD:
                cmd = decode(MinerCommand, raw)
                if parsed.device in self.devices:  # another bridge's miner is not an error
                    self._queue(self.devices[parsed.device], Setpoint(
                        action=cmd.action, power_w=cmd.power_w), cmd.seq)
            elif parsed.kind is Kind.GROUP_CMD:
                gcmd = decode(GroupCommand, raw)
                self._queue_group(parsed.device, gcmd.all, gcmd.targets, gcmd.seq)
            elif parsed.kind is Kind.FLEET_CMD:
                fcmd = decode(FleetCommand, raw)
                if fcmd.all is not None:
                    for g in (self.groups if fcmd.groups is None else fcmd.groups):
                        self._queue_group(g, fcmd.all, None, fcmd.seq)
                self._queue_group(None, None, fcmd.targets, fcmd.seq)
        except PayloadError as e:
            self.rejected[e.reason] += 1
            log.warning("bridge_command_rejected", topic=topic, reason=e.reason, detail=e.detail)

    def _queue_group(self, group: str | None, all_: Setpoint | None,
                     targets: dict[str, Setpoint] | None, seq: int) -> None:
        if all_ is not None and group is not None:
            for d in self.groups.get(group, []):
                self._queue(d, all_, seq)
        for miner_id, setpoint in (targets or {}).items():
            device = self.devices.get(miner_id)
            if device is not None:
                self._queue(device, setpoint, seq)

    def _queue(self, d: _Device, setpoint: Setpoint, seq: int) -> None:
        """The latest command wins; one worker per miner applies it."""
        d.pending = (setpoint, seq)
        if not d.commanding:
            d.commanding = True
            task = asyncio.create_task(self._command(d), name=f"bridge-cmd-{d.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- firmware I/O ---------------------------------------------------------------------

    async def _command(self, d: _Device) -> None:
        try:
            while d.pending is not None:
                setpoint, seq = d.pending
                d.pending = None
                for attempt in range(self.bcfg.command_retries + 1):
                    try:
                        async with d.lock, self._io:
                            await self._apply(d, setpoint)
                    except FirmwareError as e:
                        # A stale session (the miner restarted) fails privileged commands:
                        # the next attempt identifies it afresh and logs on again.
                        d.client = None
                        if attempt == self.bcfg.command_retries or d.pending is not None:
                            self.commands_failed += 1
                            log.warning("bridge_command_failed", miner=d.id,
                                        action=setpoint.action, error=str(e))
                            break
                    else:
                        d.ack_seq = seq if d.ack_seq is None else max(d.ack_seq, seq)
                        self.commands_applied += 1
                        break
        finally:
            d.commanding = False

    async def _client(self, d: _Device) -> FirmwareMiner:
        if d.client is None:
            client = self._client_factory(d.endpoint, d.model, self.bcfg.timeout_s)
            await client.connect()
            d.client = client
        return d.client

    async def _apply(self, d: _Device, setpoint: Setpoint) -> None:
        client = await self._client(d)
        state = d.state() if d.reading is not None else "running"
        if setpoint.action == "sleep":
            await client.sleep()
            d.last_action = "sleep"
            return
        if setpoint.action == "set_power" and setpoint.power_w is not None:
            current = d.reading.target_w if d.reading is not None else None
            target = await client.set_power(setpoint.power_w, current)
            if d.reading is not None:
                d.reading = _with_target(d.reading, target)
        if setpoint.action == "wake" or state in ("sleeping", "stopping") \
                or d.last_action == "sleep":
            await client.wake()
        d.last_action = "wake"

    async def _poll(self, d: _Device) -> None:
        try:
            async with d.lock, self._io:
                client = await self._client(d)
                reading = await client.read()
        except FirmwareError as e:
            d.failures += 1
            if d.failures >= self.bcfg.offline_after_polls and d.online is not False:
                d.online = False
                d.client = None  # its session dies with it; identify afresh when it answers
                log.warning("bridge_miner_offline", miner=d.id, host=d.endpoint.host,
                            failures=d.failures, error=str(e))
                await self.transport.publish(self.topics.miner(d.id, "availability"), OFFLINE,
                                             qos=1, retain=True)
            return
        restarted = (d.reading is not None and reading.uptime_s is not None
                     and d.reading.uptime_s is not None and reading.uptime_s < d.reading.uptime_s)
        if restarted and d.client is not None:
            log.info("bridge_miner_restarted", miner=d.id, uptime_s=reading.uptime_s)
            d.client = None  # a restarted firmware has forgotten our session
        d.failures = 0
        d.reading = reading
        if d.online is not True:
            if d.online is False:
                log.info("bridge_miner_online", miner=d.id, host=d.endpoint.host)
            d.online = True
            await self.transport.publish(self.topics.miner(d.id, "availability"), ONLINE,
                                         qos=1, retain=True)

    async def poll_once(self) -> None:
        """Read every miner once (bounded concurrency), then publish what was learned."""
        start = time.monotonic()
        await asyncio.gather(*(self._poll(d) for d in self.devices.values()))
        self.polls += 1
        self.last_cycle_s = time.monotonic() - start
        await self._publish_telemetry()
        await self._publish_capabilities()

    async def _publish_telemetry(self) -> None:
        ts = time.time()
        for g, members in self.groups.items():
            readings = [_reading(d) for d in members if d.online and d.reading is not None]
            for k in range(0, len(readings), _TELEMETRY_CHUNK):
                payload = GroupTelemetry.model_construct(
                    v=1, ts=ts, miners=readings[k:k + _TELEMETRY_CHUNK])
                await self.transport.publish(self.topics.group(g, "telemetry"), payload.encode())

    def capabilities(self, group: str) -> GroupCapabilities:
        """The group's power controls as far as they are known (identified miners only)."""
        sets: dict[Capabilities, list[str]] = {}
        for d in self.groups[group]:
            caps = d.client.capabilities if d.client is not None else None
            if caps is not None:
                sets.setdefault(caps, []).append(d.id)
        return GroupCapabilities(ts=time.time(), sets=[
            PowerControlSet(
                firmware=c.firmware, control=c.control,
                presets_w=list(c.presets_w) if c.control == "presets" else None,
                presets_ths=list(c.presets_ths) if c.control == "presets" and c.presets_ths
                else None,
                miners=ids)
            for c, ids in sets.items()])

    async def _publish_capabilities(self) -> None:
        for g in self.groups:
            caps = self.capabilities(g)
            old = self._published_caps.get(g)
            if not caps.sets or (old is not None and old.sets == caps.sets):
                continue
            if await self.transport.publish(self.topics.group(g, "capabilities"),
                                            caps.encode(), qos=1, retain=True):
                self._published_caps[g] = caps

    # -- loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll and serve until cancelled; on a clean stop the racks are announced offline."""
        log.info("bridge_started", miners=len(self.devices), groups=len(self.groups),
                 poll_interval_s=self.bcfg.poll_interval_s, concurrency=self.bcfg.concurrency)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.transport.run(self.on_message), name="bridge-mqtt")
                tg.create_task(self._poll_loop(), name="bridge-poll")
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            # gather, not `suppress(CancelledError)` around each await: that would also
            # swallow a second cancellation of this task while the workers finish.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll_loop(self) -> None:
        interval = self.bcfg.poll_interval_s
        while True:
            start = time.monotonic()
            await self.poll_once()
            spent = time.monotonic() - start
            if spent > interval:
                log.warning("bridge_poll_overrun", cycle_s=round(spent, 2), interval_s=interval,
                            miners=len(self.devices))
            await asyncio.sleep(max(0.0, interval - spent))


def _with_target(r: FirmwareReading, target_w: float) -> FirmwareReading:
    return FirmwareReading(r.power_w, r.hashrate_ths, target_w, r.temp_c, r.fan_rpm,
                           r.hashboards, r.uptime_s)


def _reading(d: _Device) -> GroupMinerReading:
    r = d.reading
    assert r is not None
    return GroupMinerReading.model_construct(
        id=d.id, state=d.state(), power_w=round(r.power_w, 1),
        hashrate_ths=round(r.hashrate_ths, 2), target_w=r.target_w,
        temp_c=None if r.temp_c is None else round(r.temp_c, 1), fan_rpm=r.fan_rpm,
        hashboards=r.hashboards, ack_seq=d.ack_seq)

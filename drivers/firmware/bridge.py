"""The firmware bridge: real miners polled over their own APIs, spoken for on MQTT.

To the controller a bridged miner looks like a simulated one: a rack's readings in one
`group/<g>/telemetry` message per poll (v2 columns, stamped with the poll's start),
`miner/<id>/availability` when a miner stops or starts answering, commands from
`miner/<id>/cmd`, `group/<g>/cmd` and `fleet/cmd` acknowledged through `ack_seq`.
Firmware I/O goes through pyasic (drivers/firmware/pyasic_miner.py) with at most
`concurrency` requests in flight. A miner that fails `offline_after_polls` polls in a row
is announced offline (the controller counts it at its maximum power) and its firmware
session is dropped; when it answers again it is identified afresh (a
restarted LuxOS has a new session) and announced online.

Readings are checked per miner before they are published (pyasic_miner.reading_from_data,
then the payload's own bounds): an unknown or absurd value is published as absent with a
counted, logged reason, and a miner whose reading still fails is left out alone, so one
miner's nonsense never costs its rack-mates their telemetry. A miner pyasic has no class
for (model and firmware as the site names them) is announced at start-up, and when that
leaves its hashrate unknown it is reported in state `error` with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import ValidationError

from controller.catalogue import MinerModel, load_catalogue
from controller.config import BrokerConfig
from controller.config_types import MinerEntry
from controller.protocol.payloads import (
    MAX_GROUP_READINGS,
    FleetCommand,
    GroupCapabilities,
    GroupCommand,
    GroupMinerReading,
    MinerCommand,
    MinerState,
    PayloadError,
    PowerControlSet,
    Setpoint,
    decode,
    encode_group_telemetry,
)
from controller.protocol.topics import OFFLINE, ONLINE, Kind, SiteTopics
from controller.protocol.transport import Transport
from drivers.firmware.config import BridgeConfig, BridgeEndpoint
from drivers.firmware.pyasic_miner import (
    PYASIC_VERSION,
    Capabilities,
    FirmwareError,
    FirmwareMiner,
    FirmwareReading,
    pyasic_class,
    sleep_threshold_w,
)

log = structlog.get_logger("mineops.bridge")

_TELEMETRY_CHUNK = MAX_GROUP_READINGS  # per message (GroupTelemetryV2's limit)
# Values of a firmware reading that the payload carries, and may leave absent (unknown).
_READING_FIELDS = frozenset(f.name for f in dataclasses.fields(FirmwareReading)) & frozenset(
    GroupMinerReading.model_fields)
_LOG_IDS = 10  # miner ids named in one log line; the count says how many there were
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
    unsupported: str | None = None  # pyasic has no class for its model on its firmware
    reported: tuple[tuple[str, str], ...] = ()  # the problems last logged for it

    @property
    def id(self) -> str:
        return self.endpoint.id

    def state(self) -> MinerState:
        """LuxOS says `is_mining` even asleep: tell sleep from hashrate 0 and low power.

        Unknown hashrate with power above sleep level is `error`, never `waking`: the
        miner may well be hashing, the bridge just cannot read it. Unknown power with no
        hashrate follows the last command (asleep if it was told to sleep).
        """
        r = self.reading
        if r is None:
            return "error"
        asleep_w = sleep_threshold_w(self.model)
        if r.hashrate_ths is None:
            if r.power_w is not None and r.power_w <= asleep_w:
                return "sleeping"
            return "error"
        if r.hashrate_ths > 0:
            return "running"
        if r.power_w is None:
            return "sleeping" if self.last_action == "sleep" else "waking"
        if r.power_w <= asleep_w:
            return "sleeping"
        return "stopping" if self.last_action == "sleep" else "waking"

    def error_reason(self) -> str:
        """Why `state()` is `error` (at most 64 characters: it travels in every message)."""
        r = self.reading
        if r is None:
            return "no reading"
        if self.unsupported:
            return self.unsupported[:64]
        return "power and hashrate unknown" if r.power_w is None else "hashrate unknown"


class MinerBridge:
    """Polls the configured miners and speaks for them on the site's broker."""

    def __init__(
        self,
        bridge: BridgeConfig,
        *,
        site_id: str,
        broker: BrokerConfig,
        inventory: Sequence[MinerEntry],
        groups: set[str] | None = None,
        client_factory: ClientFactory = FirmwareMiner,
    ) -> None:
        """The bridge for the `[bridge]` table `bridge` of site `site_id`.

        Args:
            bridge: The miners to poll and how.
            site_id: The site's id (its topics).
            broker: The site's broker.
            inventory: Every miner of the site (ids, groups, models) to check against.
            groups: Bridge only these groups (None: all).
            client_factory: Builds a firmware client per miner (tests pass their own).
        """
        self.bcfg = bridge
        self.topics = SiteTopics(site_id)
        catalogue = load_catalogue()
        endpoints = [e for e in bridge.endpoints(list(inventory))
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
        # Values published as unknown, by "field:reason", one count per miner per poll.
        self.unknown_values: Counter[str] = Counter()
        # Miners left out of telemetry because their reading failed the payload's checks.
        self.invalid_readings = 0
        self.unsupported = self.unsupported_pairs()
        self._announced = {i for ids in self.unsupported.values() for i in ids}
        self.commands_applied = 0
        self.commands_failed = 0
        self.polls = 0
        self.last_cycle_s = 0.0
        # Called with the miners polled so far during the first poll (a large site's
        # start-up takes a while: `mineops bridge` shows it as a progress bar).
        self.first_poll_progress: Callable[[int], None] | None = None
        self.transport = Transport(
            broker,
            client_id=f"mineops-bridge-{site_id}-{'-'.join(sorted(self.groups))[:40]}",
            subscriptions=self.topics.simulator_subscriptions(),
            on_connect=self._announce,
            on_close=self._goodbye,
            # Commands (QoS 1) published while the bridge reconnects wait for it.
            persistent_session=True,
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
        """Queue a command for the bridged miner or group it names (the transport's handler).

        A malformed command is counted and logged, never raised: the bridge keeps running.
        """
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
                members = {g: [d.id for d in ds] for g, ds in self.groups.items()}
                self._queue_group(None, None, fcmd.setpoints_for(members), fcmd.seq)
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
            if client.unsupported != d.unsupported:
                d.unsupported = client.unsupported
                if client.unsupported is not None:
                    # A warning unless the start-up warning already named it (firmware "auto"
                    # is only known now): a thousand identical warnings help nobody.
                    announced = d.id in self._announced
                    (log.info if announced else log.warning)(
                        "bridge_miner_unsupported", miner=d.id, host=d.endpoint.host,
                        model=d.model.name, firmware=client.firmware, pyasic=PYASIC_VERSION,
                        reason=client.unsupported,
                        effect="values pyasic cannot read are published as unknown")
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
        except Exception as e:
            if not isinstance(e, FirmwareError):
                # A reply shaped as nobody expected: this miner's poll failed, not the bridge.
                log.exception("bridge_poll_failed", miner=d.id)
                d.client = None
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
        report = self.first_poll_progress if self.polls == 0 else None
        done = 0

        async def poll(d: _Device) -> None:
            nonlocal done
            await self._poll(d)
            done += 1
            if report is not None:
                report(done)

        started_unix = time.time()
        await asyncio.gather(*(poll(d) for d in self.devices.values()))
        self.polls += 1
        self.last_cycle_s = time.monotonic() - start
        self._count_problems()
        await self._publish_telemetry(started_unix)
        await self._publish_capabilities()

    def unsupported_pairs(self) -> dict[tuple[str, str], list[str]]:
        """Miners pyasic has no class for (named firmware, model): (firmware, model name) -> ids.

        Miners with `firmware = "auto"` are checked when pyasic has identified them.
        """
        pairs: dict[tuple[str, str], list[str]] = {}
        for d in self.devices.values():
            fw = d.endpoint.firmware
            if fw != "auto" and pyasic_class(fw, d.model) is None:
                pairs.setdefault((fw, d.model.name), []).append(d.id)
        return pairs

    def announce_unsupported(self) -> None:
        """Warn, once per (firmware, model) pair, about the miners pyasic has no class for."""
        for (fw, model), ids in self.unsupported.items():
            log.warning("bridge_pyasic_unsupported", firmware=fw, model=model,
                        pyasic=PYASIC_VERSION, miners=len(ids), ids=_ids(ids),
                        effect="pyasic's generic class reads them: values it cannot read "
                        "are unknown; no hashrate is reported as state 'error', not as "
                        "waking at 0 TH/s")

    def _count_problems(self) -> None:
        """Count this poll's unknown values; log a miner's when they change, grouped."""
        changed: dict[tuple[tuple[str, str], ...], list[str]] = {}
        for d in self.devices.values():
            if not d.online or d.reading is None:
                continue
            problems = d.reading.problems
            for fld, reason in problems:
                self.unknown_values[f"{fld}:{reason}"] += 1
            if problems != d.reported:
                d.reported = problems
                changed.setdefault(problems, []).append(d.id)
        for problems, ids in changed.items():
            if problems:
                log.warning("bridge_values_unknown", miners=len(ids), ids=_ids(ids),
                            values=[f"{f}:{r}" for f, r in problems])
            else:
                log.info("bridge_values_known_again", miners=len(ids), ids=_ids(ids))

    def telemetry(self, group: str) -> list[GroupMinerReading]:
        """The group's readings as published: each checked alone, so one bad miner stays alone."""
        out = []
        for d in self.groups[group]:
            if not d.online or d.reading is None:
                continue
            reading = self._validated(d)
            if reading is not None:
                out.append(reading)
        return out

    def _validated(self, d: _Device) -> GroupMinerReading | None:
        """The payload's own checks on one miner; a value failing them becomes unknown.

        A backstop behind reading_from_data's tighter bounds: what fails here is a bug or
        a case those bounds missed, so it is logged every time.
        """
        for _ in range(2):
            fields = _fields(d)
            try:
                return GroupMinerReading.model_validate(fields)
            except ValidationError as e:
                bad = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
                if not bad or not bad <= _READING_FIELDS or d.reading is None:
                    break
                for name in sorted(bad):
                    self.unknown_values[f"{name}:out_of_range"] += 1
                    log.warning("bridge_value_rejected", miner=d.id, field=name,
                                value=fields.get(name))
                # The reading itself loses the value, so state() and commands see it too.
                unknown: dict[str, Any] = dict.fromkeys(bad)
                d.reading = dataclasses.replace(d.reading, **unknown)
        self.invalid_readings += 1
        log.warning("bridge_reading_invalid", miner=d.id, reading=_fields(d))
        return None

    async def _publish_telemetry(self, ts: float) -> None:
        """Publish each group's readings as v2 columns, in chunks of _TELEMETRY_CHUNK.

        `ts` is when the poll began (the oldest any reading can be: the controller judges
        staleness by it).
        """
        for g in self.groups:
            readings = self.telemetry(g)
            for k in range(0, len(readings), _TELEMETRY_CHUNK):
                chunk = readings[k:k + _TELEMETRY_CHUNK]
                await self.transport.publish(self.topics.group(g, "telemetry"),
                                             telemetry_payload(ts, chunk))

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
        self.announce_unsupported()
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


def telemetry_payload(ts: float, readings: Sequence[GroupMinerReading]) -> bytes:
    """Validated readings as one `GroupTelemetryV2` message (absent values: null)."""
    columns: dict[str, list[Any]] = {
        name: [getattr(r, name) for r in readings]
        for name in ("power_w", "hashrate_ths", "target_w", "temp_c", "fan_rpm", "hashboards",
                     "ack_seq", "reason")}
    return encode_group_telemetry(
        ts, [r.id for r in readings], [r.state for r in readings],
        # A column nobody knows is left out: the same unknown, fewer bytes.
        **{k: v for k, v in columns.items() if any(x is not None for x in v)})


def _with_target(r: FirmwareReading, target_w: float) -> FirmwareReading:
    return dataclasses.replace(r, target_w=target_w)


def _ids(ids: list[str]) -> list[str]:
    return ids if len(ids) <= _LOG_IDS else [*ids[:_LOG_IDS], "..."]


def _round(x: float | None, ndigits: int) -> float | None:
    return None if x is None else round(x, ndigits)


def _fields(d: _Device) -> dict[str, Any]:
    r = d.reading
    assert r is not None
    state = d.state()
    return {"id": d.id, "state": state, "power_w": _round(r.power_w, 1),
            "hashrate_ths": _round(r.hashrate_ths, 2), "target_w": r.target_w,
            "temp_c": _round(r.temp_c, 1), "fan_rpm": r.fan_rpm, "hashboards": r.hashboards,
            "ack_seq": d.ack_seq,
            "reason": d.error_reason() if state == "error" else None}

"""A simulated mine site on MQTT: the fleet, a site meter and a price replay, one connection.

Telemetry goes out a rack per message (`group/<g>/telemetry`, v2 columns), so thousands
of miners cost tens of messages a second, not thousands, at a fixed period;
`telemetry_format` also plays the older rows (v1) or a message per miner
(`miner/<id>/telemetry`, as devices that publish alone do). Commands arrive per miner,
per group or site-wide, and are applied with array operations. The meter sees the
fleet's power plus auxiliary (cooling) load, with noise, and reports grid frequency.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import structlog

from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.protocol.payloads import (
    FleetCommand,
    GroupCommand,
    GroupTelemetry,
    MeterTelemetry,
    MinerCommand,
    MinerReading,
    MinerTelemetry,
    PayloadError,
    PriceSignal,
    Setpoint,
    decode,
    encode_group_telemetry,
)
from controller.protocol.topics import OFFLINE, ONLINE, Kind, SiteTopics
from controller.protocol.transport import Transport
from drivers.prices import PriceSeries
from simulators.fleet import SimulatedFleet

log = structlog.get_logger("mineops.simulator")

# "group": a rack per message, v2 columns (what the bridge sends); "group-v1": a rack per
# message as rows (older bridges); "miner": a message per miner (devices on their own).
TelemetryFormat = Literal["group", "group-v1", "miner"]
# Telemetry messages queued per one awaited until written (see publish_telemetry).
TELEMETRY_AWAIT_EVERY = 64


class FixedPeriod:
    """Start times of a job that keeps its period whatever each run takes.

    A run that ends after the next start was due is an overrun: the next run starts at
    once and the schedule continues from there (missed starts are not made up).

    Args:
        period_s: Time between starts, s.
        start_s: When the first run starts, s (on the caller's clock).
    """

    def __init__(self, period_s: float, start_s: float) -> None:
        self.period_s = period_s
        self.due_s = start_s
        self.overruns = 0

    def wait_s(self, now_s: float) -> float:
        """A run has ended at `now_s`: how long to wait before the next, s."""
        self.due_s += self.period_s
        if self.due_s < now_s:
            self.overruns += 1
            self.due_s = now_s
        return self.due_s - now_s


@dataclass(frozen=True, slots=True)
class AppliedCommand:
    """One command message the simulated miners applied (for latency measurements)."""

    kind: str  # the topic's kind: miner_cmd, group_cmd, fleet_cmd
    seq: int
    miners: int  # miners it set
    received_s: float  # monotonic time its handling began
    applied_s: float  # monotonic time every miner of it had applied it


class SimulatedSite:
    """Everything a real site would put on the broker, simulated.

    Args:
        cfg: The site file: fleet, meters, broker.
        speed: Simulated seconds per real second.
        prices: A price trace to replay on the price topic; None: no prices.
        telemetry_interval_s: Real time between telemetry rounds, s.
        telemetry_format: "group" (a message per rack, v2 columns), "group-v1" (rows)
            or "miner" (a message per miner).
        meter_interval_s: Real time between site-meter readings, s.
        seed: Seeds the site meter's 0.2 % noise (the fleet's physics is deterministic).
        miner_mqtt: Whether the miners speak MQTT; False when they speak only another
            API (LuxOS for the bridge): then the site publishes the meter and prices only.
    """

    def __init__(
        self,
        cfg: SiteConfig,
        *,
        speed: float = 1.0,
        prices: PriceSeries | None = None,
        telemetry_interval_s: float = 1.0,
        telemetry_format: TelemetryFormat = "group",
        meter_interval_s: float = 1.0,
        seed: int = 0,
        miner_mqtt: bool = True,
    ) -> None:
        self.cfg = cfg
        # False when the miners speak only through another API (e.g. LuxOS for the bridge):
        # then the site publishes the meter and prices, and no miner telemetry or commands.
        self.miner_mqtt = miner_mqtt
        self.topics = SiteTopics(cfg.site_id)
        catalogue = load_catalogue()
        inventory = cfg.inventory
        self.fleet = SimulatedFleet(
            [m.id for m in inventory],
            [catalogue.get(m.model) for m in inventory],
            speed=speed,
            start_now=time.monotonic(),
        )
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(inventory):
            groups.setdefault(m.group, []).append(i)
        self.groups = {g: np.array(ix, dtype=np.intp) for g, ix in groups.items()}
        self._group_names = list(self.groups)
        self._group_index = {g: i for i, g in enumerate(self._group_names)}
        self._group_of = np.empty(len(inventory), dtype=np.intp)
        for gi, ix in enumerate(self.groups.values()):
            self._group_of[ix] = gi
        # Called after each command message is applied (`mineops simulate --apply-log`).
        self.on_applied: Callable[[AppliedCommand], None] | None = None
        self.speed = speed
        self.prices = prices
        self.telemetry_interval_s = telemetry_interval_s
        self.telemetry_format = telemetry_format
        self.telemetry_rounds = 0
        self.telemetry_overruns = 0  # rounds that took longer than the period
        self.telemetry_round_s = 0.0  # how long the last round took to publish
        self.meter_interval_s = meter_interval_s
        # The simulator speaks the project's meter format: it plays the first such site
        # meter (vendor-format meters are real devices, or `mineops decode` fixtures).
        self.meter_id = next(
            (m.id for m in cfg.meters if m.role == "site" and m.type == "mineops"), "site")
        self.frequency_hz = 60.0
        self.rejected: Counter[str] = Counter()
        self.commands_applied = 0
        # (trace time of the price last replayed, monotonic time it went out): the site clock.
        self._replayed: tuple[float, float] | None = None
        self._rng = np.random.default_rng(seed + 1)
        self.transport = Transport(
            cfg.broker,
            client_id=f"mineops-sim-{cfg.site_id}",
            subscriptions=self.topics.simulator_subscriptions() if miner_mqtt else [],
            on_connect=self._announce,
            on_close=self._goodbye,
            # Commands (QoS 1) published while the site reconnects wait for it at the broker.
            persistent_session=True,
        )

    # -- MQTT -------------------------------------------------------------------

    async def _announce(self) -> None:
        if not self.miner_mqtt:
            return
        for g in self.groups:
            await self.transport.publish(self.topics.group(g, "availability"), ONLINE, qos=1,
                                         retain=True)

    def on_message(self, topic: str, raw: bytes) -> None:
        """Apply one command message (miner, rack or fleet topic); a bad one is counted."""
        received = time.monotonic()
        parsed = self.topics.parse(topic)
        try:
            if parsed.kind is Kind.MINER_CMD:
                cmd = decode(MinerCommand, raw)
                i = self.fleet.index.get(parsed.device)
                if i is None:
                    raise PayloadError("unknown_miner", parsed.device)
                seq = cmd.seq
                applied = self.fleet.apply(np.array([i], dtype=np.intp), cmd, seq, received)
            elif parsed.kind is Kind.GROUP_CMD:
                gcmd = decode(GroupCommand, raw)
                seq, applied = gcmd.seq, self._apply_group(parsed.device, gcmd, received)
            elif parsed.kind is Kind.FLEET_CMD:
                fcmd = decode(FleetCommand, raw)
                seq, applied = fcmd.seq, self._apply_fleet(fcmd, received)
            else:
                return
        except PayloadError as e:
            self.rejected[e.reason] += 1
            log.warning("sim_command_rejected", topic=topic, reason=e.reason, detail=e.detail)
            return
        self.commands_applied += applied
        if self.on_applied is not None:
            self.on_applied(AppliedCommand(kind=parsed.kind.value, seq=seq, miners=applied,
                                           received_s=received, applied_s=time.monotonic()))

    def _apply_fleet(self, cmd: FleetCommand, now: float) -> int:
        """Apply a fleet command with array operations; the number of miners it set.

        Same result as `FleetCommand.setpoints_for` (tested), without a Python object
        per miner: a setpoint-table index per miner, then one `apply` per setpoint.
        """
        code = np.full(len(self.fleet.ids), -1, dtype=np.intp)  # -1: not set
        table: dict[Setpoint, int] = {}
        if cmd.all is not None:
            names = self.groups if cmd.groups is None else cmd.groups
            racks = [i for i in (self._group_index.get(g) for g in names) if i is not None]
            on = np.zeros(len(self._group_names), dtype=bool)
            on[racks] = True
            code[on[self._group_of]] = table.setdefault(cmd.all, len(table))
        listed = [table.setdefault(sp, len(table)) for sp in cmd.setpoints or ()]
        if cmd.group_setpoints:
            rack_code = np.full(len(self._group_names), -1, dtype=np.intp)
            for g, k in cmd.group_setpoints.items():
                gi = self._group_index.get(g)
                if gi is not None:  # another process's rack is not an error
                    rack_code[gi] = listed[k]
            by_rack = rack_code[self._group_of]
            if cmd.except_miners:
                by_rack[self._rows(cmd.except_miners)[0]] = -1
            code = np.where(by_rack >= 0, by_rack, code)
        if cmd.miner_setpoints:
            rows, known = self._rows(cmd.miner_setpoints)
            given = np.fromiter(cmd.miner_setpoints.values(), dtype=np.intp)
            code[rows] = np.asarray(listed, dtype=np.intp)[given[known]]
        if cmd.targets:
            rows, known = self._rows(cmd.targets)
            given = np.fromiter((table.setdefault(sp, len(table)) for sp in cmd.targets.values()),
                                dtype=np.intp)
            code[rows] = given[known]
        return self._apply_codes(code, list(table), cmd.seq, now)

    def _apply_codes(self, code: npt.NDArray[np.intp], table: list[Setpoint], seq: int,
                     now: float) -> int:
        """Apply table[code[i]] to every miner i with a code; the number of miners set."""
        applied = 0
        for k, setpoint in enumerate(table):
            idx = np.flatnonzero(code == k)
            if idx.size:
                applied += self.fleet.apply(idx, setpoint, seq, now)
        return applied

    def _rows(self, ids: Iterable[str]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """Rows of the miners of `ids` this process simulates, and which of `ids` those are.

        Another process's miner is not an error: it is left out.
        """
        index = self.fleet.index
        found = np.fromiter((index.get(m, -1) for m in ids), dtype=np.intp)
        known = found >= 0
        return found[known], known

    def _apply_group(self, group: str, cmd: GroupCommand, now: float) -> int:
        members = self.groups.get(group)
        if members is None:
            raise PayloadError("unknown_group", group)
        code = np.full(len(self.fleet.ids), -1, dtype=np.intp)
        table: dict[Setpoint, int] = {}
        if cmd.all is not None:
            code[members] = table.setdefault(cmd.all, 0)
        for miner_id, setpoint in (cmd.targets or {}).items():
            i = self.fleet.index.get(miner_id)
            if i is None:  # the rest of the batch is still good
                self.rejected["unknown_miner"] += 1
                continue
            code[i] = table.setdefault(setpoint, len(table))
        return self._apply_codes(code, list(table), cmd.seq, now)

    # -- loops --------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled; on a clean stop the racks are announced offline."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.transport.run(self.on_message), name="sim-mqtt")
            tg.create_task(self._physics(), name="sim-physics")
            if self.miner_mqtt:
                tg.create_task(self._telemetry(), name="sim-telemetry")
            tg.create_task(self._meter(), name="sim-meter")
            if self.prices is not None:
                tg.create_task(self._price_replay(self.prices), name="sim-prices")

    async def _goodbye(self) -> None:
        if not self.miner_mqtt:
            return
        await asyncio.gather(*(
            self.transport.publish(self.topics.group(g, "availability"), OFFLINE, qos=1,
                                   retain=True)
            for g in self.groups
        ))

    async def _physics(self) -> None:
        while True:
            self.fleet.step(time.monotonic())
            await asyncio.sleep(0.1)

    async def _telemetry(self) -> None:
        """A telemetry round every `telemetry_interval_s`, on a fixed schedule.

        The time a round takes to publish is not added to the period; a round that
        overruns its period is counted (`telemetry_overruns`) and the next starts at once.
        Within a round the loop is given back after every message or few, so commands
        are applied while a large fleet reports.
        """
        schedule = FixedPeriod(self.telemetry_interval_s, time.monotonic())
        while True:
            await self.transport.connected.wait()
            started = time.monotonic()
            await self.publish_telemetry()
            self.telemetry_rounds += 1
            self.telemetry_round_s = time.monotonic() - started
            await asyncio.sleep(schedule.wait_s(time.monotonic()))
            self.telemetry_overruns = schedule.overruns

    async def publish_telemetry(self) -> None:
        """Every reachable miner's reading now, in `telemetry_format`.

        Messages are queued without awaiting each write (awaiting costs several event-loop
        turns a message: 100,000 per-miner messages took ~16 s); every
        TELEMETRY_AWAIT_EVERY-th is awaited, so the client's queue stays short (a stop
        is not stuck behind a round) and the broker sets the pace. The loop is given
        back after every rack, so commands apply while a large fleet reports.
        """
        hashrate, fans = self.fleet.hashrate_ths(), self.fleet.fan_rpm()
        queued = 0

        async def send(topic: str, payload: bytes) -> None:
            nonlocal queued
            queued += 1
            if queued % TELEMETRY_AWAIT_EVERY and self.transport.publish_nowait(topic, payload):
                return
            await self.transport.publish(topic, payload)

        for g, idx in self.groups.items():
            ts = time.time()  # each rack (or miner) stamps its own message as it sends it
            if self.telemetry_format == "group":
                cols = self.fleet.columns(idx, hashrate, fans)
                if cols["ids"]:
                    await send(self.topics.group(g, "telemetry"),
                               encode_group_telemetry(ts, **cols))
                await asyncio.sleep(0)
                continue
            readings = self.fleet.readings(idx, hashrate, fans)
            if self.telemetry_format == "group-v1":
                if readings:
                    payload = GroupTelemetry.model_construct(v=1, ts=ts, miners=readings)
                    await send(self.topics.group(g, "telemetry"), payload.encode())
            else:
                for r in readings:
                    fields = {k: getattr(r, k) for k in MinerReading.model_fields}
                    one = MinerTelemetry.model_construct(v=1, ts=ts, **fields)
                    await send(self.topics.miner(r.id, "telemetry"), one.encode())
            await asyncio.sleep(0)

    def site_power_w(self) -> float:
        """What the site meter sees: miners plus aux load, with 0.2 % noise."""
        it = self.fleet.total_power_w()
        total = it * (1.0 + self.cfg.energy.aux_fraction)
        return float(total * (1.0 + self._rng.normal(0.0, 0.002)))

    async def _meter(self) -> None:
        energy_wh = 0.0
        last = time.monotonic()
        while True:
            now = time.monotonic()
            power = self.site_power_w()
            energy_wh += power * (now - last) * self.speed / 3600.0
            last = now
            reading = MeterTelemetry(
                ts=time.time(),
                power_w=round(power, 1),
                energy_import_wh=round(energy_wh, 1),
                frequency_hz=round(self.frequency_hz + float(self._rng.normal(0, 0.003)), 3),
            )
            await self.transport.publish(self.topics.meter(self.meter_id), reading.encode())
            await asyncio.sleep(self.meter_interval_s)

    def site_time_s(self, now: float | None = None) -> float | None:
        """The simulated site clock, Unix s on the price trace's timeline; None before a price.

        The start of the interval last replayed plus the (monotonic) time since, at `speed`.
        """
        if self._replayed is None:
            return None
        trace_s, at = self._replayed
        return trace_s + ((time.monotonic() if now is None else now) - at) * self.speed

    async def _price_replay(self, prices: PriceSeries) -> None:
        """Publish one interval's price every interval_s / speed seconds, looping at the end."""
        i = 0
        while True:
            await self.transport.connected.wait()
            signal = PriceSignal(
                ts=time.time(),
                price_usd_per_mwh=float(prices.price_usd_per_mwh[i % len(prices)]),
                interval_s=prices.interval_s,
                source=prices.column,
            )
            await self.transport.publish(self.topics.price, signal.encode(), qos=1, retain=True)
            self._replayed = (float(prices.start_s[i % len(prices)]), time.monotonic())
            i += 1
            await asyncio.sleep(prices.interval_s / self.speed)

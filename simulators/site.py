"""A simulated mine site on MQTT: the fleet, a site meter and a price replay, one connection.

Telemetry goes out a rack per message (`group/<g>/telemetry`, v2 columns), so thousands
of miners cost tens of messages a second, not thousands; `telemetry_format` also plays
the older rows (v1) or a message per miner (`miner/<id>/telemetry`, as devices that
publish alone do). Commands arrive per miner or per group. The meter sees the fleet's
power plus auxiliary (cooling) load, with noise, and reports grid frequency.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Literal

import numpy as np
import structlog

from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.protocol.payloads import (
    FleetCommand,
    GroupCommand,
    GroupTelemetry,
    MeterTelemetry,
    MinerCommand,
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


class SimulatedSite:
    """Everything a real site would put on the broker, simulated."""

    def __init__(
        self,
        cfg: SiteConfig,
        *,
        speed: float = 1.0,
        prices: PriceSeries | None = None,
        telemetry_interval_s: float = 1.0,
        meter_interval_s: float = 1.0,
        seed: int = 0,
        miner_mqtt: bool = True,
        telemetry_format: TelemetryFormat = "group",
    ) -> None:
        self.cfg = cfg
        self.telemetry_format = telemetry_format
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
            seed=seed,
        )
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(inventory):
            groups.setdefault(m.group, []).append(i)
        self.groups = {g: np.array(ix, dtype=np.intp) for g, ix in groups.items()}
        self.speed = speed
        self.prices = prices
        self.telemetry_interval_s = telemetry_interval_s
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
        parsed = self.topics.parse(topic)
        now = time.monotonic()
        try:
            if parsed.kind is Kind.MINER_CMD:
                cmd = decode(MinerCommand, raw)
                i = self.fleet.index.get(parsed.device)
                if i is None:
                    raise PayloadError("unknown_miner", parsed.device)
                self.fleet.apply(np.array([i], dtype=np.intp), cmd, cmd.seq, now)
                self.commands_applied += 1
            elif parsed.kind is Kind.GROUP_CMD:
                self._apply_group(parsed.device, decode(GroupCommand, raw), now)
            elif parsed.kind is Kind.FLEET_CMD:
                self._apply_fleet(decode(FleetCommand, raw), now)
        except PayloadError as e:
            self.rejected[e.reason] += 1
            log.warning("sim_command_rejected", topic=topic, reason=e.reason, detail=e.detail)

    def _apply_fleet(self, cmd: FleetCommand, now: float) -> None:
        if cmd.all is not None:
            names = self.groups if cmd.groups is None else cmd.groups
            members = [self.groups[g] for g in names if g in self.groups]
            if members:
                idx = np.concatenate(members)
                self.fleet.apply(idx, cmd.all, cmd.seq, now)
                self.commands_applied += len(idx)
        if cmd.targets:
            # Other processes' miners are in the same message: not ours is not an error.
            by_setpoint: dict[Setpoint, list[int]] = {}
            for miner_id, setpoint in cmd.targets.items():
                i = self.fleet.index.get(miner_id)
                if i is not None:
                    by_setpoint.setdefault(setpoint, []).append(i)
            for setpoint, ix in by_setpoint.items():
                self.fleet.apply(np.array(ix, dtype=np.intp), setpoint, cmd.seq, now)
                self.commands_applied += len(ix)

    def _apply_group(self, group: str, cmd: GroupCommand, now: float) -> None:
        members = self.groups.get(group)
        if members is None:
            raise PayloadError("unknown_group", group)
        if cmd.all is not None:
            self.fleet.apply(members, cmd.all, cmd.seq, now)
            self.commands_applied += len(members)
        for miner_id, setpoint in (cmd.targets or {}).items():
            i = self.fleet.index.get(miner_id)
            if i is None:  # the rest of the batch is still good
                self.rejected["unknown_miner"] += 1
                continue
            self.fleet.apply(np.array([i], dtype=np.intp), setpoint, cmd.seq, now)
            self.commands_applied += 1

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
        while True:
            await self.transport.connected.wait()
            await self.publish_telemetry()
            await asyncio.sleep(self.telemetry_interval_s)

    async def publish_telemetry(self) -> None:
        """Every reachable miner's reading now, in `telemetry_format`."""
        hashrate, fans = self.fleet.hashrate_ths(), self.fleet.fan_rpm()
        ts = time.time()
        for g, idx in self.groups.items():
            if self.telemetry_format == "group":
                cols = self.fleet.columns(idx, hashrate, fans)
                if cols["ids"]:
                    await self.transport.publish(self.topics.group(g, "telemetry"),
                                                 encode_group_telemetry(ts, **cols))
                continue
            readings = self.fleet.readings(idx, hashrate, fans)
            if self.telemetry_format == "group-v1":
                if readings:
                    payload = GroupTelemetry.model_construct(v=1, ts=ts, miners=readings)
                    await self.transport.publish(self.topics.group(g, "telemetry"),
                                                 payload.encode())
                continue
            for r in readings:
                one = MinerTelemetry.model_construct(
                    v=1, ts=ts, **r.model_dump(exclude={"id"}, exclude_none=True))
                await self.transport.publish(self.topics.miner(r.id, "telemetry"), one.encode())

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

"""The fault matrix's site, and tests that its judge and fault tools are not vacuous.

A fault test runs about a hundred simulated miners at SPEED times real time against a
real mosquitto, with the controller in-process (or as `mineops run`), and judges by
the simulator's true power (`simulators.faults.PowerJudge`): seconds over the cap in
force after the settling time, events lost, and what the journal recorded. The other
`test_faults_*.py` files import their site from here.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import GridEvent, PriceSignal
from simulators.faults import PowerJudge, TcpProxy, restart_at_stock, true_site_power_w
from simulators.site import SimulatedSite
from tests.conftest import Peer, make_site, wait_for

SPEED = 50.0  # a miner sleeps in 0.2 s and wakes in 3.6-4.8 s
# Five racks of twenty: the fault matrix's "~100 miners".
RACKS = [("a", "s21", 20), ("b", "s21", 20), ("c", "s19j_pro", 20), ("d", "s19j_pro", 20),
         ("e", "m60s", 20)]
AUX = 0.05
# The site: stock draw 7.2 % over its cap.
CAP_FRACTION = 1 / 1.072
SETTLE_S = 2.0  # after a fault is over, the site must be under the cap within this


def stock_kw(racks: list[tuple[str, str, int]] = RACKS, aux: float = AUX) -> float:
    """The fleet's draw at stock, incl. aux, kW."""
    catalogue = load_catalogue()
    return sum(catalogue.get(m).nominal_w * n for _, m, n in racks) * (1 + aux) / 1000.0


def fault_cfg(broker: LocalBroker | Any, **overrides: Any) -> SiteConfig:
    """The fault site: a cap 7.2 % under the stock draw, so at a low price the cap binds."""
    base: dict[str, Any] = {"power_cap_kw": round(CAP_FRACTION * stock_kw(), 1)}
    return make_site(broker, RACKS, **{**base, **overrides})


def with_port(cfg: SiteConfig, port: int) -> SiteConfig:
    """The same site reaching the broker on another port (through a `TcpProxy`)."""
    return cfg.model_copy(update={"broker": cfg.broker.model_copy(update={"port": port})})


def price(p: float) -> bytes:
    return PriceSignal(ts=time.time(), price_usd_per_mwh=p).encode()


@dataclass
class FaultSite:
    """A running site under test: controller, simulator, a peer to publish, the judge."""

    cfg: SiteConfig
    controller: Controller
    sim: SimulatedSite
    peer: Peer
    judge: PowerJudge
    tasks: Any
    controller_task: asyncio.Task[None]
    sim_task: asyncio.Task[None]
    # (deadline, end, target W) of each event the judge holds the site to.
    targets: list[tuple[float, float, float]] = field(default_factory=list)
    site_cap_w: float = 0.0

    def cap_at(self, ts: float) -> float:
        """The cap in force at `ts` as the grid sees it: the site's, or a target after its deadline.

        After an event's end the cap stays at its target for the recovery ramp's first
        step, so the judge never asks for less than the site promised.
        """
        cap = self.site_cap_w
        for deadline, end, target in self.targets:
            if deadline <= ts < end:
                cap = min(cap, target)
        return cap

    def hold(self, ev: GridEvent) -> None:
        """Judge the site against `ev`'s target from its deadline to its end."""
        assert ev.value_kw is not None
        self.targets.append((ev.met_by_ts, ev.end_ts, ev.value_kw * 1000.0))

    async def restart_controller(self, **kwargs: Any) -> None:
        """Stop the controller (cleanly) and start a new one over the same journal."""
        await stop(self.controller_task)
        self.controller = Controller(self.cfg, **kwargs)
        self.controller_task = self.tasks(self.controller.run(), "controller")
        await wait_for(self.controller.transport.connected.is_set, what="controller back")

    async def restart_sim(self, *, at_stock: bool = False) -> None:
        """Stop the site's MQTT (a bridge restart); the miners keep drawing power."""
        await stop(self.sim_task)
        if at_stock:
            restart_at_stock(self.sim.fleet, np.arange(self.sim.fleet.power_w.size),
                             time.monotonic())
        self.sim_task = self.tasks(self.sim.run(), "sim")

    async def publish_event(self, ev: GridEvent) -> None:
        await self.peer.publish(self.controller.topics.grid, ev.encode(), qos=1, retain=True)


async def stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def start_fault_site(broker: LocalBroker, tasks: Any, cfg: SiteConfig | None = None, *,
                           sim_cfg: SiteConfig | None = None, price_usd_per_mwh: float = 5.0,
                           controller_kwargs: dict[str, Any] | None = None,
                           settle: bool = True) -> FaultSite:
    """Start simulator, controller, peer and judge; wait until the site has settled."""
    cfg = cfg or fault_cfg(broker)
    sim = SimulatedSite(sim_cfg or cfg, speed=SPEED, telemetry_interval_s=0.2,
                        meter_interval_s=0.1)
    controller = Controller(cfg, **(controller_kwargs or {}))
    peer = Peer(cfg)
    sim_task = tasks(sim.run(), "sim")
    controller_task = tasks(controller.run(), "controller")
    tasks(peer.run(), "peer")
    site = FaultSite(cfg=cfg, controller=controller, sim=sim, peer=peer,
                     judge=PowerJudge(sim, lambda ts: math.nan), tasks=tasks,
                     controller_task=controller_task, sim_task=sim_task,
                     site_cap_w=cfg.power_cap_kw * 1000.0)
    site.judge.cap_w = site.cap_at
    tasks(site.judge.run(), "judge")
    await wait_for(lambda: controller.transport.connected.is_set()
                   and sim.transport.connected.is_set() and peer.transport.connected.is_set(),
                   what="controller, simulator and peer connected")
    await peer.publish(controller.topics.price, price(price_usd_per_mwh), qos=1, retain=True)
    if settle:
        await settled(site)
    return site


async def settled(site: FaultSite, timeout_s: float = 30.0) -> None:
    """Every miner commanded and acknowledged, none waking or stopping, true power at the plan."""
    c, sim = site.controller, site.sim

    def planned() -> float:
        return math.nan if c.snapshot is None else c.snapshot.planned_site_power_w

    await wait_for(lambda: bool((c.actuator.level >= 0).all()), timeout_s, "all commanded")
    await wait_for(lambda: bool((c.fleet.ack_seq >= c.actuator.seq).all()), timeout_s,
                   "commands acknowledged")
    await wait_for(lambda: bool(np.isin(sim.fleet.mode, (0, 1)).all()), timeout_s,
                   "no miner still waking or stopping")
    await wait_for(lambda: abs(true_site_power_w(sim) - planned()) < 0.01 * planned(),
                   timeout_s, "true power at the plan")


async def wait_until(ts: float) -> None:
    """Sleep until Unix time `ts` (real wall clock)."""
    await asyncio.sleep(max(0.0, ts - time.time()))


# -- the tools themselves ----------------------------------------------------------------


@pytest.mark.integration
async def test_the_judge_sees_a_site_over_its_cap(broker: LocalBroker, tasks: Any) -> None:
    """Not vacuous: miners restarted at stock are over the cap until told otherwise."""
    site = await start_fault_site(broker, tasks)
    await stop(site.controller_task)  # nobody to correct them
    t0 = time.time()
    restart_at_stock(site.sim.fleet, np.arange(100), time.monotonic())
    await asyncio.sleep(1.0)
    assert site.judge.over_s(t0) >= 0.9, site.judge.verdict(t0)
    assert true_site_power_w(site.sim) == pytest.approx(stock_kw() * 1000, rel=1e-6)
    assert true_site_power_w(site.sim) > site.site_cap_w * 1.07


@pytest.mark.integration
async def test_the_proxy_partitions_a_client(broker: LocalBroker, tasks: Any) -> None:
    proxy = await TcpProxy(broker.host, broker.port).start()
    try:
        cfg = make_site(broker, [("a", "s21", 2)])
        peer = Peer(with_port(cfg, proxy.port))
        tasks(peer.run(), "peer")
        await wait_for(peer.transport.connected.is_set, what="connected through the proxy")
        proxy.cut()
        await wait_for(lambda: not peer.transport.connected.is_set(), what="partitioned")
        await asyncio.sleep(1.0)
        assert not peer.transport.connected.is_set(), "no way through while cut"
        proxy.restore()
        await wait_for(peer.transport.connected.is_set, what="reconnected after restore")
    finally:
        await proxy.close()


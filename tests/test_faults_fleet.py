"""Fault matrix, the fleet: miners that restart, forget, ignore commands or draw more than planned.

Whatever the miners acknowledge, the measured site power is held under the cap in force:
the controller re-sends to a device whose sequence restarted or that came back online,
and sheds more while the meter stays over the cap. The judge is the simulator's true
power, sampled every 50 ms, from SETTLE_S after the fault on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from controller.protocol.broker import LocalBroker
from simulators.faults import deafen, reboot, restart_at_stock, silenced, true_site_power_w
from tests.conftest import wait_for
from tests.test_faults_site import (
    AUX,
    SETTLE_S,
    fault_cfg,
    start_fault_site,
    stop,
)

pytestmark = pytest.mark.integration

WATCH_S = 6.0  # how long after settling the site is judged


@pytest.mark.parametrize("fault", ["restart_at_stock", "reboot"])
async def test_miners_restarted_at_stock_are_commanded_again(broker: LocalBroker, tasks: Any,
                                                             fault: str) -> None:
    """The issue's first row: the fleet restarts at stock with `ack_seq` 0."""
    site = await start_fault_site(broker, tasks)
    everyone = np.arange(site.sim.fleet.power_w.size)
    t0 = time.time()
    (restart_at_stock if fault == "restart_at_stock" else reboot)(
        site.sim.fleet, everyone, time.monotonic())
    await asyncio.sleep(SETTLE_S + WATCH_S)
    j = site.judge
    assert j.sampled_s(t0 + SETTLE_S) >= WATCH_S * 0.9
    assert j.over_s(t0 + SETTLE_S) == 0, j.verdict(t0 + SETTLE_S)


async def test_restart_that_keeps_the_sequence_is_caught_by_the_meter(broker: LocalBroker,
                                                                     tasks: Any) -> None:
    """Miners back at stock while still reporting the last sequence: only the meter tells."""
    site = await start_fault_site(broker, tasks)
    fleet = site.sim.fleet
    acks = fleet.ack_seq.copy()
    t0 = time.time()
    restart_at_stock(fleet, np.arange(fleet.power_w.size), time.monotonic())
    fleet.ack_seq[:] = acks
    await asyncio.sleep(SETTLE_S + WATCH_S)
    j = site.judge
    assert j.over_s(t0 + SETTLE_S) == 0, j.verdict(t0 + SETTLE_S)


async def test_bridge_restart_brings_its_racks_back_online_and_they_are_commanded(
        broker: LocalBroker, tasks: Any) -> None:
    """The bridge (the site's MQTT client) restarts and its miners come back at stock."""
    site = await start_fault_site(broker, tasks)
    connects = site.controller.transport.connects
    t0 = time.time()
    await site.restart_sim(at_stock=True)
    await wait_for(site.sim.transport.connected.is_set, what="bridge back")
    await asyncio.sleep(SETTLE_S + WATCH_S)
    assert site.controller.transport.connects == connects, "the controller stayed connected"
    j = site.judge
    assert j.over_s(t0 + SETTLE_S) == 0, j.verdict(t0 + SETTLE_S)


async def test_deaf_firmware_is_shed_around_by_the_meter(broker: LocalBroker,
                                                         tasks: Any) -> None:
    """A fifth of the miners acknowledge every command and stay at stock: the rest make room."""
    site = await start_fault_site(broker, tasks)
    fleet = site.sim.fleet
    deaf = np.arange(0, fleet.power_w.size, 5)
    t0 = time.time()
    restart_at_stock(fleet, deaf, time.monotonic())
    deafen(fleet, deaf)
    await asyncio.sleep(SETTLE_S + WATCH_S)
    j = site.judge
    assert j.over_s(t0 + SETTLE_S + 1.0) == 0, j.verdict(t0 + SETTLE_S + 1.0)
    assert (fleet.power_w[deaf] > 0.99 * fleet.nominal_w[deaf]).all(), "still deaf at stock"
    # ... and the cap is used, not abandoned: the others run up to it.
    assert true_site_power_w(site.sim) > 0.95 * site.site_cap_w
    snap = site.controller.snapshot
    assert snap is not None and snap.cap.planning_w < 0.98 * snap.cap.in_force_w


async def test_cooling_load_above_the_configured_aux_is_shed_around(broker: LocalBroker,
                                                                   tasks: Any) -> None:
    """The site draws 9 % for cooling where the config says 5 %: the meter shows it."""
    cfg = fault_cfg(broker)
    hot = cfg.model_copy(update={"energy": cfg.energy.model_copy(
        update={"aux_fraction": AUX + 0.04})})
    site = await start_fault_site(broker, tasks, cfg, sim_cfg=hot, settle=False)
    t0 = time.time()
    await asyncio.sleep(3.0 + SETTLE_S + WATCH_S)
    j = site.judge
    assert j.over_s(t0 + 3.0 + SETTLE_S) == 0, j.verdict(t0 + 3.0 + SETTLE_S)
    assert true_site_power_w(site.sim) > 0.95 * site.site_cap_w


async def test_silent_meter_plans_the_worst_case_and_says_so(broker: LocalBroker,
                                                            tasks: Any) -> None:
    """No meter: the plan is today's (worst case), a metric and a warning say so."""
    site = await start_fault_site(broker, tasks)
    with silenced(site.sim, "/meter/"):
        await wait_for(lambda: site.controller.loop_status is not None
                       and site.controller.loop_status.meter == "stale", timeout_s=15,
                       what="the meter seen stale")
        t0 = time.time()
        restart_at_stock(site.sim.fleet, np.arange(100), time.monotonic())
        await asyncio.sleep(SETTLE_S + WATCH_S)
    j = site.judge
    assert j.over_s(t0 + SETTLE_S) == 0, j.verdict(t0 + SETTLE_S)
    await stop(site.controller_task)

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


class _Address:
    host = "127.0.0.1"
    port = 1


@pytest.mark.parametrize("meter", [True, False], ids=["meter", "no-meter"])
async def test_unknown_power_counts_at_the_model_maximum_and_sums_stay_finite(
        tmp_path: Any, meter: bool) -> None:
    """A bridge reports a miner without power (pyasic gave None): never zero, never NaN."""
    from prometheus_client import generate_latest  # noqa: PLC0415

    from controller.catalogue import load_catalogue  # noqa: PLC0415
    from controller.daemon.loop import Controller  # noqa: PLC0415
    from controller.protocol.payloads import (  # noqa: PLC0415
        GroupMinerReading,
        GroupTelemetry,
        MeterTelemetry,
        PriceSignal,
    )
    from tests.conftest import make_site  # noqa: PLC0415

    cfg = make_site(_Address(), [("a", "s21", 4)], power_cap_kw=50,  # type: ignore[arg-type]
                    grid={"journal_path": str(tmp_path / "grid.db")})
    c = Controller(cfg)
    now = time.time()
    readings = [
        GroupMinerReading(id="a-0001", state="running", power_w=3000.0, hashrate_ths=180.0,
                          temp_c=70.0),
        GroupMinerReading(id="a-0002", state="running", power_w=3100.0, hashrate_ths=185.0),
        GroupMinerReading(id="a-0003", state="running", temp_c=71.0),
        GroupMinerReading(id="a-0004", state="running", hashrate_ths=190.0, temp_c=72.0),
    ]
    c.on_message(c.topics.group("a", "telemetry"),
                 GroupTelemetry(ts=now, miners=readings).encode())
    c.on_message(c.topics.price, PriceSignal(ts=now, price_usd_per_mwh=20.0).encode())
    if meter:
        c.on_message(c.topics.meter("poi"), MeterTelemetry(ts=now, power_w=13_000.0).encode())
    snap = await c.decide_and_act("test")
    assert snap.fleet_power_w == 6100.0, "what is known, not NaN and not zero for the rest"
    assert snap.fleet_hashrate_ths == pytest.approx(555.0)
    status = c.loop_status
    assert status is not None
    max_w = load_catalogue().get("s21").max_w
    assert status.telemetry.power_unknown == 2 and status.telemetry.temperature_unknown == 1
    assert status.telemetry.most_w == pytest.approx((6100.0 + 2 * max_w) * 1.05)
    assert status.meter == ("fresh" if meter else "absent")
    assert status.site_w == pytest.approx(13_000.0 if meter else (6100.0 + 2 * max_w) * 1.05)
    text = generate_latest(c.metrics.registry).decode()
    assert "mineops_miners_power_unknown 2.0" in text
    assert "mineops_miners_temperature_unknown 1.0" in text
    assert f"mineops_site_meter_fresh {1.0 if meter else 0.0}" in text

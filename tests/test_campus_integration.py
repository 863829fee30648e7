"""The campus end to end: a simulated campus on mosquitto and on pymodbus' Modbus TCP server,
the controller reading it, measured on the simulator's true power at the POI.

Scaled to what a test runs quickly: 40 miners (about 160 kW with cooling) behind a
150 kW interconnect with a GPU hall of tens of kW; the campus runs in real seconds
(GPU jobs ramp in 2 s, meters report every 0.25 s) while the miners stop and wake 100
times faster than real ones (a real miner takes seconds to stop; what is measured here
is the controller's reaction, not the firmware's).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import PriceSignal
from simulators.campus import CampusSimulation, GensetSpec, GpuHallSpec, Job, SolarSpec
from simulators.campus_modbus import GENSET_UNIT, GPU_UNIT, POI_UNIT, SOLAR_UNIT, CampusModbus
from simulators.campus_site import SimulatedCampus
from simulators.fleet import Mode
from tests.conftest import Peer, make_site, wait_for
from tests.test_site_integration import metric, scrape

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SPEED = 100.0  # the miners: stop in 0.1 s, wake in 1.8 s
METER_S = 0.25  # every campus meter's period (Modbus polls and MQTT meters)
MINERS = [("r1", "s21", 20), ("r2", "s21", 20)]
IMPORT_KW = 150.0
AUX = 0.05


def gpu_hall(idle_kw: float) -> GpuHallSpec:
    """A GPU hall whose jobs the test starts (none arrive by themselves)."""
    return GpuHallSpec(capacity_kw=200.0, idle_kw=idle_kw, job_kw=(10.0, 150.0), ramp_s=2.0,
                       mean_gap_s=1e12, job_duration_s=(3600.0, 3600.0))


def no_clouds(capacity_kw: float) -> SolarSpec:
    return SolarSpec(capacity_kw=capacity_kw, cloud_mean_gap_s=1e12)


def device(id_: str, unit: int, port: int, **kw: Any) -> dict[str, Any]:
    return {"id": id_, "host": "127.0.0.1", "port": port, "unit_id": unit,
            "poll_interval_s": METER_S, "timeout_s": 0.2, **kw}


def price(p: float) -> bytes:
    return PriceSignal(ts=time.time(), price_usd_per_mwh=p).encode()


class Run:
    """A campus, its controller and a peer on the test broker."""

    def __init__(self, controller: Controller, sim: SimulatedCampus, peer: Peer,
                 modbus: CampusModbus) -> None:
        self.controller, self.sim, self.peer, self.modbus = controller, sim, peer, modbus

    @property
    def planned_w(self) -> float:
        snap = self.controller.snapshot
        return math.nan if snap is None else snap.planned_site_power_w

    async def settled(self, what: str = "miners at the plan", timeout_s: float = 30.0) -> None:
        c, sim = self.controller, self.sim
        await wait_for(lambda: bool((c.fleet.ack_seq >= c.actuator.seq).all())
                       and bool(np.isin(sim.fleet.mode, (Mode.RUNNING, Mode.SLEEPING)).all())
                       and abs(sim.miners_site_kw() * 1000 - self.planned_w)
                       < 0.01 * max(self.planned_w, 1000.0), timeout_s, what)


@contextlib.asynccontextmanager
async def campus_run(broker: LocalBroker, tasks: Callable[..., asyncio.Task[Any]],
                     sim: CampusSimulation, campus: Callable[[int], dict[str, Any]], *,
                     meters: list[dict[str, Any]], market_usd_per_mwh: float,
                     asleep: bool = False, **site: Any) -> AsyncIterator[Run]:
    """Serve `sim` on Modbus TCP, start the campus site, its controller and a peer."""
    modbus = CampusModbus(sim, poi_rating_kw=400.0)
    async with modbus.server:
        cfg = make_site(broker, MINERS, meters=meters, campus=campus(modbus.server.port),
                        energy={"aux_fraction": AUX}, **site)
        simulated = SimulatedCampus(cfg, sim, modbus=modbus, campus_speed=1.0, speed=SPEED,
                                    telemetry_interval_s=0.2, meter_interval_s=METER_S)
        if asleep:  # a site that starts dark (an islanded genset cannot take them all)
            simulated.fleet.mode[:] = Mode.SLEEPING
            simulated.fleet.power_w[:] = simulated.fleet.sleep_w
        controller = Controller(cfg)
        peer = Peer(cfg)
        tasks(simulated.run(), "campus-sim")
        tasks(controller.run(), "controller")
        tasks(peer.run(), "peer")
        await wait_for(lambda: controller.transport.connected.is_set()
                       and simulated.transport.connected.is_set()
                       and peer.transport.connected.is_set(), what="all connected")
        await peer.publish(controller.topics.price, price(market_usd_per_mwh), retain=True)
        yield Run(controller, simulated, peer, modbus)


class PoiRecorder:
    """Samples the simulator's true net import every 5 ms."""

    def __init__(self, sim: SimulatedCampus) -> None:
        self.sim = sim
        self.samples: list[tuple[float, float]] = []

    async def run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), self.sim.true_poi_w()))
            await asyncio.sleep(0.005)

    def excursions(self, limit_w: float) -> list[tuple[float, float]]:
        """(start, seconds) of each stretch above `limit_w`."""
        out: list[tuple[float, float]] = []
        start: float | None = None
        for t, w in self.samples:
            if w > limit_w and start is None:
                start = t
            elif w <= limit_w and start is not None:
                out.append((start, t - start))
                start = None
        if start is not None:
            out.append((start, self.samples[-1][0] - start))
        return out


async def test_firm_load_step_is_absorbed_within_one_meter_period(
        broker: LocalBroker, tasks: Any) -> None:
    # 40 kW of GPU idle on a 150 kW interconnect; the miners fill the rest. A training job
    # of +60 kW ramps in over 2 s (the issue's +20 MW in 2 s on 50 MW, scaled); the GPU
    # hall's meter is a SunSpec meter polled every 0.25 s, the POI a Modbus meter too.
    sim = CampusSimulation(seed=1, gpu=gpu_hall(idle_kw=40.0))

    def campus(port: int) -> dict[str, Any]:
        return {"poi": {"import_limit_kw": IMPORT_KW, "meter": "poi-meter"},
                "firm_loads": [{"id": "gpu-hall", "meter": "gpu-meter", "max_kw": 140.0}],
                "modbus": [device("poi-meter", POI_UNIT, port),
                           device("gpu-meter", GPU_UNIT, port)]}

    async with campus_run(broker, tasks, sim, campus, meters=[], market_usd_per_mwh=20.0) as run:
        limit_w = IMPORT_KW * 1000.0
        await wait_for(lambda: run.controller.snapshot is not None
                       and run.controller.snapshot.cap.source == "campus", what="campus cap")
        await run.settled()
        before_w = run.planned_w
        # Filled: the miners take the headroom (150 - 40 kW, less the 1 % margin), one
        # firmware step short at most, and the POI sits just under its limit.
        assert 150_000 - 40_000 - 1500 - 4000 * (1 + AUX) <= before_w <= 108_500
        assert limit_w - 6000 < run.sim.true_poi_w() <= limit_w
        recorder = PoiRecorder(run.sim)
        tasks(recorder.run(), "poi-recorder")
        await asyncio.sleep(0.3)
        step_at = time.monotonic()
        t = run.sim.campus_time_s(step_at)
        assert run.sim.campus.gpu is not None
        run.sim.campus.gpu.jobs.append(Job(t, t + 3600.0, 60.0))
        await asyncio.sleep(4.0)
        await run.settled("miners shed for the job")
        # The firm load went 40 -> 100 kW; the miners gave it back ...
        assert run.planned_w <= 150_000 - 100_000 - 1500
        assert before_w - run.planned_w >= 60_000 - 4000 * (1 + AUX)
        # ... and the net import was never above the limit for longer than a meter period.
        during = [(s, d) for s, d in recorder.excursions(limit_w) if s >= step_at]
        longest = max((d for _, d in during), default=0.0)
        assert longest <= METER_S, f"above the limit for {longest:.3f} s: {during}"
        # Before its first reading shows the job, the load rises unseen for up to one
        # meter period (30 kW/s here): that much, less the margin, is the worst overshoot.
        peak = max(w for t_, w in recorder.samples if t_ >= step_at)
        assert peak <= limit_w + 60_000 / 2.0 * METER_S
        snap = run.controller.snapshot
        assert snap is not None and snap.campus is not None
        assert snap.campus.firm_load_w == pytest.approx(100_000, rel=0.03)
        assert snap.campus.stale == ()


async def test_surplus_solar_is_used_before_grid_power(broker: LocalBroker, tasks: Any) -> None:
    # Noon: about 68 kW of solar (a SunSpec inverter), a 10 kW GPU hall idle (an MQTT
    # meter), no export. Grid power at $300/MWh does not pay for an S21 (break-even about
    # $100 at this hashprice); surplus that would be curtailed costs nothing. The miners
    # take the surplus and no more; on $20 grid power they take the grid too.
    sim = CampusSimulation(seed=2, gpu=gpu_hall(idle_kw=10.0), solar=no_clouds(70.0),
                           start_hour=12.0)

    def campus(port: int) -> dict[str, Any]:
        return {"poi": {"import_limit_kw": IMPORT_KW, "meter": "poi"},
                "firm_loads": [{"id": "gpu-hall", "meter": "gpu-meter", "max_kw": 140.0}],
                "generators": [{"id": "solar", "kind": "solar", "meter": "pv",
                                "rating_kw": 70.0}],
                "modbus": [device("pv", SOLAR_UNIT, port)]}

    meters = [{"type": "mineops", "id": "poi"},
              {"type": "mineops", "id": "gpu-meter", "role": "aux"}]
    async with campus_run(broker, tasks, sim, campus, meters=meters,
                          market_usd_per_mwh=300.0) as run:
        await wait_for(lambda: (s := run.controller.snapshot) is not None
                       and s.campus is not None and not s.campus.stale
                       and s.campus.curve.on_site_w > 50_000, what="the campus read")
        await run.settled()
        snap = run.controller.snapshot
        assert snap is not None and snap.campus is not None
        surplus_w = snap.campus.generation_w - snap.campus.firm_load_w
        assert 55_000 < surplus_w < 60_000
        # The miners take the surplus, within one miner's power, and not the grid.
        assert surplus_w - 4000 * (1 + AUX) <= run.planned_w <= surplus_w
        assert -4000 * (1 + AUX) - 1000 <= run.sim.true_poi_w() <= 1000
        # The campus sets the limit in force, but the price held them, not the limit.
        assert snap.cap.source == "campus"
        assert run.planned_w < snap.cap.planning_w - 50_000
        assert set(snap.miners_by_reason) == {"profit"}
        # The campus's series, from a decision that saw the POI meter read the miners.
        await wait_for(lambda: (s := run.controller.snapshot) is not None
                       and s.campus is not None and s.campus.net_import_w is not None
                       and abs(s.campus.net_import_w) < 6000, what="the POI meter settled")
        snap = run.controller.snapshot
        assert snap is not None and snap.campus is not None
        text = scrape(run.controller)
        assert metric(text, "mineops_campus_headroom_watts") == pytest.approx(
            snap.campus.cap_w, rel=0.02)
        assert metric(text, "mineops_campus_import_limit_watts") == IMPORT_KW * 1000
        assert metric(text, "mineops_campus_firm_load_watts", 'part="gpu-hall"') == \
            pytest.approx(10_000, rel=0.02)
        assert metric(text, "mineops_campus_generation_watts",
                      'kind="solar",part="solar"') == pytest.approx(surplus_w + 10_000, rel=0.02)
        assert metric(text, "mineops_campus_on_site_supply_watts") == pytest.approx(
            surplus_w, rel=0.02)
        assert metric(text, "mineops_campus_marginal_price_usd_per_mwh") == 0.0  # surplus
        assert metric(text, "mineops_campus_net_import_watts") == pytest.approx(0, abs=6000)
        assert metric(text, "mineops_campus_part_stale", 'part="solar"') == 0
        assert metric(text, "mineops_campus_islanded") == 0
        assert metric(text, "mineops_campus_readings_total", 'meter="pv"') > 3
        assert metric(text, "mineops_campus_readings_total", 'meter="gpu-meter"') > 3
        assert "mineops_campus_modbus_poll_failures_total{" not in text
        # Cheap grid power: now the grid pays too; every miner runs at full power.
        await run.peer.publish(run.controller.topics.price, price(20.0), retain=True)
        await wait_for(lambda: run.planned_w > surplus_w + 50_000, what="grid taken")
        await run.settled()
        assert run.planned_w == pytest.approx(40 * 3800 * (1 + AUX))
        assert run.sim.true_poi_w() == pytest.approx(run.planned_w - surplus_w, rel=0.05)
        # The miners' last watt now comes from the grid, at market + adders ($20 + $0).
        await wait_for(lambda: metric(scrape(run.controller),
                                      "mineops_campus_marginal_price_usd_per_mwh") == 20.0,
                       timeout_s=5.0, what="the last watt priced at the grid's")


async def test_stale_firm_load_and_generation_count_on_the_safe_side(
        broker: LocalBroker, tasks: Any) -> None:
    # 20 kW GPU idle (max 90 kW) and 40 kW of solar on 150 kW: the miners run into about
    # 170 kW of headroom. The GPU meter goes silent: it counts at its 90 kW max; then the
    # solar inverter too: it counts at 0. The miners shed each time although nothing
    # changed on site, and the true net import stays under the limit throughout.
    sim = CampusSimulation(seed=3, gpu=gpu_hall(idle_kw=20.0), solar=no_clouds(42.0),
                           start_hour=12.0)

    def campus(port: int) -> dict[str, Any]:
        return {"poi": {"import_limit_kw": IMPORT_KW, "meter": "poi-meter"},
                "firm_loads": [{"id": "gpu-hall", "meter": "gpu-meter", "max_kw": 90.0}],
                "generators": [{"id": "solar", "kind": "solar", "meter": "pv",
                                "rating_kw": 42.0}],
                "modbus": [device("poi-meter", POI_UNIT, port),
                           device("gpu-meter", GPU_UNIT, port),
                           device("pv", SOLAR_UNIT, port)]}

    async with campus_run(broker, tasks, sim, campus, meters=[], market_usd_per_mwh=20.0,
                          power_cap_kw=400.0) as run:
        limit_w = IMPORT_KW * 1000.0
        await wait_for(lambda: (s := run.controller.snapshot) is not None
                       and s.campus is not None and not s.campus.stale
                       and s.campus.generation_w > 35_000, what="the campus read")
        await run.settled()
        # Every miner runs: 40 x 3.8 kW x 1.05 = 160 kW fits under ~168 kW of headroom.
        assert run.planned_w == pytest.approx(40 * 3800 * (1 + AUX))
        recorder = PoiRecorder(run.sim)
        tasks(recorder.run(), "poi-recorder")
        run.modbus.devices[GPU_UNIT].set_silent(True)
        await wait_for(lambda: (s := run.controller.snapshot) is not None
                       and s.campus is not None and s.campus.stale == ("gpu-hall",),
                       timeout_s=5.0, what="the GPU meter counted stale")
        await run.settled("shed for the GPU hall's max_kw")
        snap = run.controller.snapshot
        assert snap is not None and snap.campus is not None
        assert snap.campus.firm_load_w == 90_000
        solar_w = snap.campus.generation_w
        assert run.planned_w <= limit_w + solar_w - 90_000 - 1500
        assert run.planned_w >= limit_w + solar_w - 90_000 - 1500 - 4000 * (1 + AUX)
        run.modbus.devices[SOLAR_UNIT].set_silent(True)
        await wait_for(lambda: (s := run.controller.snapshot) is not None
                       and s.campus is not None
                       and s.campus.stale == ("gpu-hall", "solar"),
                       timeout_s=5.0, what="the inverter counted stale")
        await run.settled("shed for no solar")
        assert run.planned_w <= limit_w - 90_000 - 1500
        assert max(w for _, w in recorder.samples) <= limit_w
        # Back: the readings count again and the miners return.
        run.modbus.devices[GPU_UNIT].set_silent(False)
        run.modbus.devices[SOLAR_UNIT].set_silent(False)
        await wait_for(lambda: (s := run.controller.snapshot) is not None
                       and s.campus is not None and not s.campus.stale, timeout_s=10.0,
                       what="the devices back")
        await wait_for(lambda: run.planned_w > limit_w - 60_000, timeout_s=10.0,
                       what="the miners back")


# A genset's frequency dips by up to 1 % on a load step it picks up (59.4 Hz): an islanded
# site sheds below that, not at the grid's 59.7 Hz.
GENSET_FREQUENCY = {"frequency": {"shed_below_hz": 59.0, "restore_above_hz": 59.5,
                                  "restore_hold_s": 1.0}}


def islanded_campus(port: int) -> dict[str, Any]:
    return {"poi": {"import_limit_kw": IMPORT_KW, "meter": "poi-meter", "islanded": True},
            "firm_loads": [{"id": "gpu-hall", "meter": "gpu-meter", "max_kw": 120.0}],
            "generators": [{"id": "genset", "kind": "genset", "meter": "genset-meter",
                            "rating_kw": 150.0, "marginal_cost_usd_per_mwh": 30.0,
                            "reserve_kw": 15.0, "max_load_step_kw": 30.0}],
            "modbus": [device("poi-meter", POI_UNIT, port), device("gpu-meter", GPU_UNIT, port),
                       device("genset-meter", GENSET_UNIT, port)]}


async def test_islanded_limits_hold(broker: LocalBroker, tasks: Any) -> None:
    # No grid: a 150 kW genset (15 kW reserve, 30 kW load step) carries a 20 kW GPU hall
    # and the miners, which start dark. They come up in steps of at most 30 kW on the
    # genset's measured load, up to 150 - 15 - 20 kW less the margin, never more.
    sim = CampusSimulation(seed=4, gpu=gpu_hall(idle_kw=20.0),
                           genset=GensetSpec(rating_kw=150.0, max_load_step_kw=30.0),
                           islanded=True)
    async with campus_run(broker, tasks, sim, islanded_campus, meters=[],
                          market_usd_per_mwh=20.0, asleep=True, grid=GENSET_FREQUENCY) as run:
        genset: list[tuple[float, float, float]] = []

        async def record() -> None:
            while True:
                s = run.sim.advance()
                assert s.genset_kw is not None and s.genset_hz is not None
                genset.append((time.monotonic(), s.genset_kw, s.genset_hz))
                await asyncio.sleep(0.005)

        tasks(record(), "genset-recorder")

        firm_kw = 150.0 - 15.0
        ceiling_w = (firm_kw - 20.0) * 1000.0 - 0.01 * firm_kw * 1000.0
        await wait_for(lambda: run.planned_w > ceiling_w - 4000 * (1 + AUX), timeout_s=40.0,
                       what="the miners up to the genset's limit")
        await run.settled()
        snap = run.controller.snapshot
        assert snap is not None and snap.campus is not None
        assert snap.cap.source == "islanded" and snap.campus.islanded
        assert run.planned_w <= ceiling_w
        loads = np.array([kw for _, kw, _ in genset])
        times = np.array([t for t, _, _ in genset])
        # The genset never carried more than its rating less reserve ...
        assert loads.max() <= firm_kw
        assert loads.max() > firm_kw - 10.0  # ... and the miners did fill it
        # ... never took on more than its 30 kW load step at once (a wake-up lands within
        # a fraction of a second here), nor a next step before it recovered, ...
        rises = [loads[i] - loads[(times >= t - 0.5) & (times <= t)].min()
                 for i, t in enumerate(times)]
        assert max(rises) <= 30.0 * 1.05
        assert max(rises) > 15.0  # (the steps were real ones)
        # ... so its frequency never dipped by more than a step's 1 % and a quarter.
        assert min(hz for _, _, hz in genset) >= 60.0 * (1 - 0.0125)


async def test_islanded_genset_under_frequency_sheds_at_once(
        broker: LocalBroker, tasks: Any) -> None:
    # A 70 kW load step on a genset that picks up 30 kW: its frequency dips far below
    # 59.7 Hz. Its meter is the grid's frequency now: the miners are shed at once.
    sim = CampusSimulation(seed=5, gpu=gpu_hall(idle_kw=20.0),
                           genset=GensetSpec(rating_kw=150.0, max_load_step_kw=30.0,
                                             recovery_s=5.0),
                           islanded=True)
    async with campus_run(broker, tasks, sim, islanded_campus, meters=[],
                          market_usd_per_mwh=20.0, asleep=True, grid=GENSET_FREQUENCY) as run:
        await wait_for(lambda: run.planned_w > 30_000, timeout_s=20.0, what="miners up")
        await run.settled()
        assert run.controller.grid.frequency_event is None
        t = run.sim.campus_time_s()
        assert run.sim.campus.gpu is not None
        run.sim.campus.gpu.jobs.append(Job(t - 1.99, t + 3600.0, 70.0))
        stepped = time.monotonic()
        s = run.sim.advance()
        assert s.genset_hz is not None and s.genset_hz < 59.0
        await wait_for(lambda: run.controller.grid.frequency_event is not None,
                       timeout_s=2 * METER_S + 0.5, what="under-frequency seen")
        seen_s = time.monotonic() - stepped
        await wait_for(lambda: bool(np.isin(run.sim.fleet.mode,
                                            (Mode.STOPPING, Mode.SLEEPING)).all()),
                       timeout_s=1.0, what="every miner stopping")
        assert seen_s <= METER_S + 0.2
        snap = run.controller.snapshot
        assert snap is not None
        assert snap.cap.source == "frequency"

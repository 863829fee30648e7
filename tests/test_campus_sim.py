"""The simulated campus: GPU job steps, solar shape and clouds, genset dips, battery SoC, and
the campus served as SunSpec devices on Modbus TCP and read back by the driver."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus import ModbusDeviceConfig, SunSpecPoller
from drivers.modbus.poller import CampusRole
from simulators.campus import (
    Battery,
    BatterySpec,
    CampusSimulation,
    Genset,
    GensetSpec,
    GpuHall,
    GpuHallSpec,
    SolarField,
    SolarSpec,
    TimeWentBackwardsError,
)
from simulators.campus_modbus import (
    BATTERY_UNIT,
    GENSET_UNIT,
    GPU_UNIT,
    POI_UNIT,
    SOLAR_UNIT,
    CampusModbus,
)

pytestmark = pytest.mark.timeout(120)


# -- GPU hall ---------------------------------------------------------------------------


def test_gpu_jobs_step_by_megawatts_within_two_seconds() -> None:
    spec = GpuHallSpec(capacity_kw=45_000, idle_kw=2_000, job_kw=(18_000, 20_000),
                       mean_gap_s=300, job_duration_s=(600, 1200))
    hall = GpuHall(spec, seed=3)
    hall.power_kw(4 * 3600.0)  # admit the jobs of four hours
    starts = list(hall.jobs)
    assert len(starts) >= 3
    probe = GpuHall(spec, seed=3)
    checked = 0
    for job in starts:
        # Only a step no other job's ramp overlaps is one job's.
        if any(o is not job and (abs(o.start_s - job.start_s) < 5 or abs(o.end_s - job.start_s) < 5)
               for o in starts):
            continue
        before = probe.power_kw(job.start_s - 0.01)
        after = probe.power_kw(job.start_s + spec.ramp_s)
        assert after - before == pytest.approx(job.kw, rel=1e-6)
        assert 18_000 <= after - before <= 20_000  # +18-20 MW within 2 s
        checked += 1
    assert checked >= 2


def test_gpu_hall_stays_within_idle_and_capacity() -> None:
    spec = GpuHallSpec()
    hall = GpuHall(spec, seed=11)
    power = [hall.power_kw(t) for t in np.arange(0.0, 12 * 3600.0, 5.0)]
    assert min(power) >= spec.idle_kw - 1e-9
    assert max(power) <= spec.capacity_kw + 1e-9
    assert max(power) > spec.idle_kw + spec.job_kw[0]  # jobs did run
    assert len(hall.jobs) > 10


def test_gpu_hall_is_deterministic_for_its_seed() -> None:
    times = np.arange(0.0, 6 * 3600.0, 7.0)
    a = _series(GpuHall(seed=5), times)
    assert a == _series(GpuHall(seed=5), times)
    assert a != _series(GpuHall(seed=6), times)
    # The same jobs whatever the sampling: seed, not query times, decides them.
    coarse, fine = GpuHall(seed=5), GpuHall(seed=5)
    coarse.power_kw(6 * 3600.0)
    _series(fine, times)
    fine.power_kw(6 * 3600.0)
    assert coarse.jobs == fine.jobs


def _series(hall: GpuHall, times: np.ndarray) -> list[float]:
    return [hall.power_kw(float(t)) for t in times]


def test_time_going_backwards_is_refused() -> None:
    hall = GpuHall()
    hall.power_kw(100.0)
    with pytest.raises(TimeWentBackwardsError):
        hall.power_kw(99.0)
    battery = Battery()
    battery.advance(10.0)
    with pytest.raises(TimeWentBackwardsError):
        battery.advance(5.0)


# -- solar ------------------------------------------------------------------------------


def test_solar_bell_peaks_at_noon_and_is_zero_at_night() -> None:
    spec = SolarSpec(capacity_kw=20_000, sunrise_h=6, sunset_h=18, cloud_mean_gap_s=1e12)
    field = SolarField(spec, seed=0, start_hour=0.0)
    assert field.power_kw(3 * 3600.0) == 0.0  # 03:00
    assert field.power_kw(12 * 3600.0) == pytest.approx(20_000)  # solar noon, clear
    morning = field.clear_sky_kw(9 * 3600.0)
    afternoon = field.clear_sky_kw(15 * 3600.0)
    assert morning == pytest.approx(afternoon)
    assert 0 < morning < 20_000
    assert field.power_kw(23 * 3600.0) == 0.0


def test_clouds_cut_60_to_80_percent_within_seconds() -> None:
    spec = SolarSpec(capacity_kw=20_000, sunrise_h=0.01, sunset_h=23.99,
                     cloud_mean_gap_s=300)
    field = SolarField(spec, seed=2, start_hour=6.0)
    field.power_kw(4 * 3600.0)
    clouds = [c for c in field.clouds if c.end_s < 4 * 3600.0]
    assert len(clouds) >= 5
    probe = SolarField(spec, seed=2, start_hour=6.0)
    for c in clouds:
        before = probe.power_kw(c.start_s)
        clear = probe.clear_sky_kw(c.start_s + c.edge_s)
        under = probe.power_kw(c.start_s + c.edge_s)
        drop = 1.0 - under / clear
        # Another cloud may still be passing; a new one takes at least its own depth.
        assert drop >= c.depth - 1e-9
        assert 0.6 <= c.depth <= 0.8 and 3.0 <= c.edge_s <= 10.0
        if before == pytest.approx(probe.clear_sky_kw(c.start_s)):
            assert drop == pytest.approx(c.depth)


def test_solar_is_deterministic_for_its_seed() -> None:
    times = np.arange(0.0, 3 * 3600.0, 3.0)
    f1, f2, f3 = SolarField(seed=4), SolarField(seed=4), SolarField(seed=9)
    s1 = [f1.power_kw(float(t)) for t in times]
    assert s1 == [f2.power_kw(float(t)) for t in times]
    assert s1 != [f3.power_kw(float(t)) for t in times]
    assert f1.clouds == f2.clouds and f1.clouds != f3.clouds


# -- genset -----------------------------------------------------------------------------


def test_genset_step_within_pickup_dips_at_most_one_percent() -> None:
    g = Genset(GensetSpec(rating_kw=5_000, max_load_step_kw=1_500, nominal_hz=60.0))
    g.set_load_kw(0.0, 1_000)
    g.set_load_kw(30.0, 2_500)  # +1.5 MW: exactly its pick-up capability
    assert g.frequency_hz(30.0) == pytest.approx(60.0 * 0.99)
    assert g.frequency_hz(30.0 + 5.0) > 60.0 - 0.6 * 0.02 - 1e-9  # recovered to 2 %


def test_genset_step_beyond_pickup_dips_deep_and_recovers() -> None:
    spec = GensetSpec(rating_kw=5_000, max_load_step_kw=1_000, nominal_hz=50.0)
    g = Genset(spec)
    delivered = g.set_load_kw(10.0, 3_000)  # +3 MW from idle, 2 MW beyond its pick-up
    assert delivered == 3_000
    dip = 50.0 - g.frequency_hz(10.0)
    assert dip == pytest.approx(50.0 * (0.01 + 0.05 * 2.0))  # 5.5 Hz
    assert g.frequency_hz(10.0 + spec.recovery_s) == pytest.approx(50.0 - dip * 0.02)
    assert g.frequency_hz(12.0) < g.frequency_hz(13.0) < 50.0  # recovering, not there yet


def test_genset_is_capped_at_its_rating() -> None:
    g = Genset(GensetSpec(rating_kw=5_000, max_load_step_kw=5_000))
    assert g.set_load_kw(0.0, 9_000) == 5_000
    assert g.frequency_hz(0.0) >= 60.0 * (1 - GensetSpec().max_dip_fraction)


# -- battery ----------------------------------------------------------------------------


def test_battery_soc_integrates_power_with_losses() -> None:
    spec = BatterySpec(capacity_kwh=8_000, max_charge_kw=4_000, max_discharge_kw=4_000,
                       charge_efficiency=0.95, min_soc_fraction=0.0, max_soc_fraction=1.0)
    b = Battery(spec, soc_fraction=0.5)
    b.command_kw(-1_000)  # charge 1 MW for an hour: 950 kWh stored
    b.advance(3600.0)
    assert b.soc_fraction == pytest.approx(0.5 + 950 / 8_000)
    assert b.power_kw == pytest.approx(-1_000)
    b.command_kw(950)  # deliver 950 kWh: 1000 kWh leave the cells
    b.advance(7200.0)
    assert b.soc_fraction == pytest.approx(0.5 + 950 / 8_000 - 1_000 / 8_000)
    assert b.charged_kwh == pytest.approx(1_000) and b.discharged_kwh == pytest.approx(950)


def test_battery_stops_at_its_bounds() -> None:
    spec = BatterySpec(capacity_kwh=1_000, max_charge_kw=2_000, max_discharge_kw=2_000,
                       charge_efficiency=1.0, min_soc_fraction=0.1, max_soc_fraction=0.9)
    b = Battery(spec, soc_fraction=0.2)
    b.command_kw(5_000)  # clipped to 2 MW
    assert b.command == 2_000
    b.advance(3600.0)  # 100 kWh were there to give: empty after 3 min
    assert b.soc_fraction == pytest.approx(0.1)
    assert b.power_kw == pytest.approx(100.0)  # the hour's mean
    b.advance(7200.0)
    assert b.power_kw == 0.0 and b.soc_fraction == pytest.approx(0.1)


@given(st.lists(st.tuples(st.floats(-6_000, 6_000), st.floats(0.1, 3_600)), max_size=40))
def test_battery_soc_never_leaves_its_window(steps: list[tuple[float, float]]) -> None:
    spec = BatterySpec(min_soc_fraction=0.05, max_soc_fraction=0.95)
    b = Battery(spec, soc_fraction=0.5)
    t = 0.0
    for kw, dt in steps:
        b.command_kw(kw)
        t += dt
        b.advance(t)
        assert spec.min_soc_fraction - 1e-12 <= b.soc_fraction <= spec.max_soc_fraction + 1e-12
        assert -spec.max_charge_kw - 1e-6 <= b.power_kw <= spec.max_discharge_kw + 1e-6


# -- the campus ---------------------------------------------------------------------------


def test_campus_balance_and_energy() -> None:
    sim = CampusSimulation(seed=1, gpu=GpuHallSpec(), solar=SolarSpec(), genset=GensetSpec(),
                           battery=BatterySpec())
    assert sim.battery is not None
    sim.battery.command_kw(1_000)
    for t in np.arange(0.0, 600.0, 1.0):
        s = sim.step(float(t), miners_kw=10_000)
        parts = s.miners_kw + (s.gpu_kw or 0) - (s.solar_kw or 0) - (s.genset_kw or 0) \
            - (s.battery_kw or 0)
        assert s.poi_kw == pytest.approx(parts)
    # 10 minutes of ~1 MW discharge.
    assert s.energy_kwh["battery_discharge"] == pytest.approx(1_000 * 599 / 3600, rel=1e-6)
    assert s.energy_kwh["gpu"] > 0 and s.energy_kwh["solar"] > 0


async def test_campus_served_as_sunspec_and_read_by_role() -> None:
    sim = CampusSimulation(seed=7, gpu=GpuHallSpec(), solar=SolarSpec(), genset=GensetSpec(),
                           battery=BatterySpec())
    campus = CampusModbus(sim, poi_rating_kw=80_000)
    assert sim.battery is not None and sim.gpu is not None
    sim.battery.command_kw(-2_000)
    roles: list[tuple[int, CampusRole]] = [
        (POI_UNIT, "poi"), (GPU_UNIT, "firm_load"), (SOLAR_UNIT, "generator"),
        (GENSET_UNIT, "generator"), (BATTERY_UNIT, "battery")]
    async with campus.server as server:
        pollers = {unit: SunSpecPoller(ModbusDeviceConfig(
            id=f"unit-{unit}", host="127.0.0.1", port=server.port, unit_id=unit,
            timeout_s=2.0), role) for unit, role in roles}
        # The first GPU job, from a hall of the same seed: the campus sees the same jobs.
        probe = GpuHall(sim.gpu.spec, seed=7)
        probe.power_kw(86_400.0)
        job = probe.jobs[0]
        before_state = sim.step(job.start_s - 0.5, miners_kw=20_000)
        campus.update(before_state)
        before = {u: await p.poll() for u, p in pollers.items()}
        after_state = sim.step(job.start_s + 2.5, miners_kw=20_000)
        campus.update(after_state)
        after = {u: await p.poll() for u, p in pollers.items()}
        for p in pollers.values():
            await p.close()
    for readings in (before, after):
        assert all(r is not None and r.available for r in readings.values())
    resolution_w = 10_000.0  # W_SF 4 on the MW-scale meters: 10 kW steps
    for state, readings in ((before_state, before), (after_state, after)):
        assert readings[POI_UNIT].power_w == pytest.approx(state.poi_kw * 1000, abs=resolution_w)
        assert readings[GPU_UNIT].power_w == pytest.approx(state.gpu_kw * 1000,
                                                           abs=resolution_w)
        assert readings[SOLAR_UNIT].power_w == pytest.approx(state.solar_kw * 1000,
                                                             abs=resolution_w)
        assert readings[SOLAR_UNIT].model_id == 701  # the DER model before the 103
        assert readings[GENSET_UNIT].power_w == pytest.approx(state.genset_kw * 1000,
                                                              abs=resolution_w)
        assert readings[GENSET_UNIT].frequency_hz == pytest.approx(state.genset_hz, abs=0.01)
        assert readings[BATTERY_UNIT].power_w == pytest.approx(state.battery_kw * 1000,
                                                               abs=resolution_w)
        assert readings[BATTERY_UNIT].soc_fraction == pytest.approx(
            state.battery_soc_fraction, abs=0.001)
    # The job's step reaches the GPU meter's reading in full.
    step_w = after[GPU_UNIT].power_w - before[GPU_UNIT].power_w
    assert step_w == pytest.approx(job.kw * 1000, abs=2 * resolution_w)
    assert math.isclose(after[BATTERY_UNIT].capacity_wh or 0, 8_000_000.0)

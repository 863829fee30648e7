"""Simulated campus devices: a GPU hall, a solar field, a genset and a battery.

Pure models: each is deterministic for its seed, takes the simulation time in seconds
(the site simulator's clock: wall time since start times `speed`) and does no I/O.
Time must not go backwards for a model. `CampusSimulation` puts them behind one point of
interconnection and keeps the energy registers a meter would; simulators/campus_modbus.py
serves its state as SunSpec devices on Modbus TCP.

What each model reproduces, and why it matters to the controller:

- **GPU hall** (firm load): idle draw plus training jobs of a few MW that start and stop
  at random (Poisson arrivals); each job's power ramps in `ramp_s` (2 s by default), so
  the hall steps up by up to `job_kw[1]` (20 MW) in 2 s. The miners must give that back
  at once.
- **Solar field**: a clear-sky bell between sunrise and sunset, and passing clouds that
  cut the output by 60-80 % within seconds (edges of 3-10 s) for one to ten minutes.
- **Genset**: follows the load it is given up to its rating; a load step within its
  pick-up capability (`max_load_step_kw`) dips the frequency by at most 1 %, a larger one
  by far more (ISO 8528-5 treats load acceptance in steps for this reason), recovering in
  a few seconds.
- **Battery**: state of charge integrates its power (charge losses included) and stays
  within its bounds: a command that would take it past empty or full stops there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class TimeWentBackwardsError(ValueError):
    """A model was asked for a time before one it had already reached."""


@dataclass(frozen=True, slots=True)
class Job:
    """One GPU job: its start and end (simulation s) and its power above idle (kW)."""

    start_s: float
    end_s: float
    kw: float


@dataclass(frozen=True, slots=True)
class GpuHallSpec:
    """A GPU hall's draw.

    Attributes:
        capacity_kw: Most the hall draws (idle plus jobs), kW: its firm-load `max_kw`.
        idle_kw: Draw with no job running (storage, network, cooling), kW.
        job_kw: (smallest, largest) job, kW above idle.
        ramp_s: A job's power ramps from 0 to its full draw (and back) in this time, s.
        mean_gap_s: Mean time between job arrivals, s (exponential gaps).
        job_duration_s: (shortest, longest) job, s (uniform).
    """

    capacity_kw: float = 40_000.0
    idle_kw: float = 2_000.0
    job_kw: tuple[float, float] = (4_000.0, 20_000.0)
    ramp_s: float = 2.0
    mean_gap_s: float = 600.0
    job_duration_s: tuple[float, float] = (600.0, 7_200.0)

    def __post_init__(self) -> None:
        if not 0 <= self.idle_kw < self.capacity_kw:
            raise ValueError("idle_kw must be within [0, capacity_kw)")
        if not 0 < self.job_kw[0] <= self.job_kw[1] <= self.capacity_kw - self.idle_kw:
            raise ValueError("job_kw must be 0 < smallest <= largest <= capacity_kw - idle_kw")
        if self.ramp_s <= 0 or self.mean_gap_s <= 0:
            raise ValueError("ramp_s and mean_gap_s must be positive")
        if not 0 < self.job_duration_s[0] <= self.job_duration_s[1]:
            raise ValueError("job_duration_s must be 0 < shortest <= longest")


class GpuHall:
    """A GPU hall: `power_kw(t_s)` is its draw at simulation time t_s, kW.

    Args:
        spec: Its size and job pattern; None: GpuHallSpec's defaults.
        seed: Seeds the job arrivals, so that a run can be repeated.
    """

    def __init__(self, spec: GpuHallSpec | None = None, *, seed: int = 0) -> None:
        self.spec = spec or GpuHallSpec()
        self._rng = np.random.default_rng([seed, 0x6D1])
        self._next_arrival_s = float(self._rng.exponential(self.spec.mean_gap_s))
        self.jobs: list[Job] = []  # every job started so far, in order
        self._t_s = 0.0

    def _admit_until(self, t_s: float) -> None:
        s = self.spec
        while self._next_arrival_s <= t_s:
            start = self._next_arrival_s
            kw = float(self._rng.uniform(*s.job_kw))
            duration = float(self._rng.uniform(*s.job_duration_s))
            running = sum(j.kw for j in self.jobs if j.start_s <= start < j.end_s + s.ramp_s)
            # The scheduler only starts a job that fits the hall's electrical capacity.
            if s.idle_kw + running + kw <= s.capacity_kw:
                self.jobs.append(Job(start, start + duration, kw))
            self._next_arrival_s = start + float(self._rng.exponential(s.mean_gap_s))

    def power_kw(self, t_s: float) -> float:
        """The hall's draw at `t_s`, kW.

        Raises:
            TimeWentBackwardsError: `t_s` is before a time already asked for.
        """
        _forward(self._t_s, t_s)
        self._t_s = t_s
        self._admit_until(t_s)
        ramp = self.spec.ramp_s
        jobs_kw = sum(j.kw * _ramp((t_s - j.start_s) / ramp) * (1.0 - _ramp((t_s - j.end_s) / ramp))
                      for j in self.jobs if j.start_s <= t_s < j.end_s + ramp)
        return self.spec.idle_kw + jobs_kw


@dataclass(frozen=True, slots=True)
class Cloud:
    """One passing cloud over the solar field.

    When it starts and ends covering the field (simulation s), how much it takes away at
    its thickest (a fraction of the clear-sky output) and how long its edges are, s.
    """

    start_s: float
    end_s: float
    depth: float
    edge_s: float


@dataclass(frozen=True, slots=True)
class SolarSpec:
    """A solar field's output.

    Attributes:
        capacity_kw: AC output at solar noon under a clear sky, kW.
        sunrise_h, sunset_h: Local solar time of sunrise and sunset, h.
        shape_exponent: The clear-sky bell is sin(pi x)^exponent over the day (x 0..1).
        cloud_mean_gap_s: Mean time between clouds, s (exponential gaps).
        cloud_duration_s: (shortest, longest) cloud, s.
        cloud_depth: (least, most) output lost under a cloud, as a fraction.
        cloud_edge_s: (shortest, longest) cloud edge, s: the output falls over this time.
    """

    capacity_kw: float = 20_000.0
    sunrise_h: float = 6.0
    sunset_h: float = 20.0
    shape_exponent: float = 1.2
    cloud_mean_gap_s: float = 900.0
    cloud_duration_s: tuple[float, float] = (60.0, 600.0)
    cloud_depth: tuple[float, float] = (0.6, 0.8)
    cloud_edge_s: tuple[float, float] = (3.0, 10.0)

    def __post_init__(self) -> None:
        if self.capacity_kw <= 0 or not 0 <= self.sunrise_h < self.sunset_h <= 24:
            raise ValueError("capacity_kw > 0 and 0 <= sunrise_h < sunset_h <= 24")
        if not 0 <= self.cloud_depth[0] <= self.cloud_depth[1] <= 1:
            raise ValueError("cloud_depth must be fractions, least first")
        if not 0 < self.cloud_edge_s[0] <= self.cloud_edge_s[1]:
            raise ValueError("cloud_edge_s must be positive, shortest first")
        if not 0 < self.cloud_duration_s[0] <= self.cloud_duration_s[1]:
            raise ValueError("cloud_duration_s must be positive, shortest first")


class SolarField:
    """A solar field: `power_kw(t_s)`; t_s = 0 is `start_hour` local solar time.

    Args:
        spec: Its rating, day and clouds; None: SolarSpec's defaults.
        seed: Seeds the clouds, so that a run can be repeated.
        start_hour: Local solar time at simulation time 0, h (0..24).
    """

    def __init__(self, spec: SolarSpec | None = None, *, seed: int = 0,
                 start_hour: float = 12.0) -> None:
        self.spec = spec or SolarSpec()
        self.start_hour = start_hour
        self._rng = np.random.default_rng([seed, 0x501A])
        self._next_cloud_s = float(self._rng.exponential(self.spec.cloud_mean_gap_s))
        self.clouds: list[Cloud] = []
        self._t_s = 0.0

    def hour_of_day(self, t_s: float) -> float:
        """Local solar time at `t_s`, h (0..24)."""
        return (self.start_hour + t_s / 3600.0) % 24.0

    def clear_sky_kw(self, t_s: float) -> float:
        """Output under a clear sky at `t_s`, kW (0 at night)."""
        s = self.spec
        x = (self.hour_of_day(t_s) - s.sunrise_h) / (s.sunset_h - s.sunrise_h)
        if not 0.0 < x < 1.0:
            return 0.0
        return s.capacity_kw * float(math.sin(math.pi * x) ** s.shape_exponent)

    def _clouds_until(self, t_s: float) -> None:
        s = self.spec
        while self._next_cloud_s <= t_s:
            start = self._next_cloud_s
            duration = float(self._rng.uniform(*s.cloud_duration_s))
            self.clouds.append(Cloud(start, start + duration,
                                     float(self._rng.uniform(*s.cloud_depth)),
                                     float(self._rng.uniform(*s.cloud_edge_s))))
            self._next_cloud_s = start + duration + float(
                self._rng.exponential(s.cloud_mean_gap_s))

    def shade(self, t_s: float) -> float:
        """Fraction of the clear-sky output the clouds take away at `t_s` (0..1)."""
        self._clouds_until(t_s)
        out = 0.0
        for c in self.clouds:
            if c.start_s <= t_s < c.end_s + c.edge_s:
                cover = _ramp((t_s - c.start_s) / c.edge_s) * (
                    1.0 - _ramp((t_s - c.end_s) / c.edge_s))
                out = max(out, c.depth * cover)
        return out

    def power_kw(self, t_s: float) -> float:
        """The field's AC output at `t_s`, kW.

        Raises:
            TimeWentBackwardsError: `t_s` is before a time already asked for.
        """
        _forward(self._t_s, t_s)
        self._t_s = t_s
        return self.clear_sky_kw(t_s) * (1.0 - self.shade(t_s))


@dataclass(frozen=True, slots=True)
class GensetSpec:
    """A generating set.

    Attributes:
        rating_kw: Most it delivers, kW.
        max_load_step_kw: Largest load step it picks up within 1 % of frequency, kW.
        nominal_hz: Its rated frequency, Hz.
        recovery_s: A frequency dip has recovered (to within 2 %) after this long, s.
        dip_per_excess: Extra dip, as a fraction of nominal frequency, per `max_load_step_kw`
            of step beyond the pick-up capability.
        max_dip_fraction: The deepest dip modelled (an under-frequency trip lies beyond).
    """

    rating_kw: float = 5_000.0
    max_load_step_kw: float = 1_500.0
    nominal_hz: float = 60.0
    recovery_s: float = 5.0
    dip_per_excess: float = 0.05
    max_dip_fraction: float = 0.15

    def __post_init__(self) -> None:
        if not 0 < self.max_load_step_kw <= self.rating_kw:
            raise ValueError("max_load_step_kw must be within (0, rating_kw]")
        if self.nominal_hz not in (50.0, 60.0):
            raise ValueError("nominal_hz must be 50 or 60")


class Genset:
    """A genset following the load it is given; `frequency_hz(t_s)` shows its load steps.

    Args:
        spec: Its rating and load-step response; None: GensetSpec's defaults.
    """

    def __init__(self, spec: GensetSpec | None = None) -> None:
        self.spec = spec or GensetSpec()
        self.output_kw = 0.0
        self._dip_hz = 0.0  # depth of the last dip, Hz
        self._dip_at_s = -math.inf
        self._t_s = 0.0

    def set_load_kw(self, t_s: float, load_kw: float) -> float:
        """Give the genset `load_kw` at `t_s`; returns what it delivers (capped at its rating).

        A step up in output beyond `max_load_step_kw` dips the frequency deeply; a step
        within it, by at most 1 %. Steps down do not dip (they overshoot a little, not
        modelled).
        """
        _forward(self._t_s, t_s)
        self._t_s = t_s
        s = self.spec
        new = min(max(load_kw, 0.0), s.rating_kw)
        step = new - self.output_kw
        if step > 0:
            fraction = 0.01 * min(step, s.max_load_step_kw) / s.max_load_step_kw
            excess = max(0.0, step - s.max_load_step_kw)
            fraction += s.dip_per_excess * excess / s.max_load_step_kw
            dip = s.nominal_hz * min(fraction, s.max_dip_fraction)
            # A new step lands on what is left of the last dip.
            self._dip_hz = self._remaining_dip_hz(t_s) + dip
            self._dip_hz = min(self._dip_hz, s.nominal_hz * s.max_dip_fraction)
            self._dip_at_s = t_s
        self.output_kw = new
        return new

    def _remaining_dip_hz(self, t_s: float) -> float:
        # Recovered to 2 % of the dip after recovery_s: exp(-recovery_s / tau) = 0.02.
        tau = self.spec.recovery_s / math.log(50.0)
        return self._dip_hz * math.exp(-(t_s - self._dip_at_s) / tau)

    def frequency_hz(self, t_s: float) -> float:
        """The genset's terminal frequency at `t_s`, Hz."""
        return self.spec.nominal_hz - self._remaining_dip_hz(t_s)


@dataclass(frozen=True, slots=True)
class BatterySpec:
    """A battery system.

    Attributes:
        capacity_kwh: Usable energy between empty and full, kWh.
        max_charge_kw, max_discharge_kw: Power limits at its AC terminals, kW.
        charge_efficiency: Energy stored per energy drawn while charging (the round trip
            is this squared, discharging losing as much).
        min_soc_fraction, max_soc_fraction: The state-of-charge window the BMS allows.
    """

    capacity_kwh: float = 8_000.0
    max_charge_kw: float = 4_000.0
    max_discharge_kw: float = 4_000.0
    charge_efficiency: float = 0.95
    min_soc_fraction: float = 0.05
    max_soc_fraction: float = 0.95

    def __post_init__(self) -> None:
        if min(self.capacity_kwh, self.max_charge_kw, self.max_discharge_kw) <= 0:
            raise ValueError("capacity and power limits must be positive")
        if not 0 < self.charge_efficiency <= 1:
            raise ValueError("charge_efficiency must be within (0, 1]")
        if not 0 <= self.min_soc_fraction < self.max_soc_fraction <= 1:
            raise ValueError("0 <= min_soc_fraction < max_soc_fraction <= 1")


class Battery:
    """A battery: `command_kw` sets its power (discharge positive), `advance` integrates it.

    Args:
        spec: Its capacity, limits and efficiency; None: BatterySpec's defaults.
        soc_fraction: Its state of charge at the start, 0..1.
    """

    def __init__(self, spec: BatterySpec | None = None, *, soc_fraction: float = 0.5) -> None:
        self.spec = spec or BatterySpec()
        s = self.spec
        if not s.min_soc_fraction <= soc_fraction <= s.max_soc_fraction:
            raise ValueError(f"soc_fraction {soc_fraction} outside the battery's window")
        self.soc_fraction = soc_fraction
        self.command = 0.0  # kW asked, discharge positive
        self.power_kw = 0.0  # kW delivered at the terminals, discharge positive
        self.charged_kwh = 0.0  # energy drawn at the terminals, kWh
        self.discharged_kwh = 0.0  # energy delivered at the terminals, kWh
        self._t_s = 0.0

    def command_kw(self, kw: float) -> None:
        """Ask for `kw` (discharge positive, charge negative), clipped to the power limits."""
        self.command = min(max(kw, -self.spec.max_charge_kw), self.spec.max_discharge_kw)

    def advance(self, t_s: float) -> None:
        """Run the commanded power from the last time to `t_s`; at a bound the power stops.

        Raises:
            TimeWentBackwardsError: `t_s` is before the last time.
        """
        _forward(self._t_s, t_s)
        dt_h = (t_s - self._t_s) / 3600.0
        self._t_s = t_s
        s, p = self.spec, self.command
        if p > 0:  # discharging: stored energy leaves at 1/efficiency per kWh delivered
            room_kwh = (self.soc_fraction - s.min_soc_fraction) * s.capacity_kwh
            delivered = min(p * dt_h, room_kwh * s.charge_efficiency)
            self.soc_fraction -= delivered / s.charge_efficiency / s.capacity_kwh
            self.discharged_kwh += delivered
        elif p < 0:
            room_kwh = (s.max_soc_fraction - self.soc_fraction) * s.capacity_kwh
            drawn = min(-p * dt_h, room_kwh / s.charge_efficiency)
            self.soc_fraction += drawn * s.charge_efficiency / s.capacity_kwh
            self.charged_kwh += drawn
            delivered = -drawn
        else:
            delivered = 0.0
        self.soc_fraction = min(max(self.soc_fraction, s.min_soc_fraction), s.max_soc_fraction)
        # The mean power over the step: a bound reached midway shows as less than asked.
        self.power_kw = delivered / dt_h if dt_h > 0 else (
            p if s.min_soc_fraction < self.soc_fraction < s.max_soc_fraction else 0.0)


@dataclass(slots=True)
class CampusState:
    """The campus at one time: powers in kW (each in its own role's sign), energies in kWh.

    `poi_kw` is the import at the point of interconnection (negative: export):
    miners + GPU hall - solar - genset - battery discharge.
    """

    t_s: float
    miners_kw: float
    gpu_kw: float | None
    solar_kw: float | None
    genset_kw: float | None
    genset_hz: float | None
    battery_kw: float | None
    battery_soc_fraction: float | None
    poi_kw: float
    grid_hz: float
    energy_kwh: dict[str, float] = field(default_factory=dict)


class CampusSimulation:
    """The campus devices behind one point of interconnection.

    The genset, when there is one, carries `genset_share` of the GPU hall's draw (a
    campus running its genset for its firm load), so GPU job steps reach it as load
    steps. `islanded`: there is no grid; the genset carries every load (miners and GPU
    hall less solar and battery), the POI reads 0 and the site's frequency is the
    genset's. The battery does what `battery.command_kw` last asked.

    Args:
        seed: Seeds the GPU jobs and the clouds.
        gpu: The GPU hall, or None for none; likewise `solar`, `genset`, `battery`.
        solar: The solar field.
        genset: The genset.
        battery: The battery.
        start_hour: Local solar time at simulation time 0, h.
        genset_share: The fraction of the GPU hall's draw the genset carries (grid-tied).
        grid_hz: The grid's frequency while grid-tied, Hz.
        islanded: No grid: the genset carries every load.

    Raises:
        ValueError: islanded without a genset.
    """

    def __init__(self, *, seed: int = 0, gpu: GpuHallSpec | None = None,
                 solar: SolarSpec | None = None, genset: GensetSpec | None = None,
                 battery: BatterySpec | None = None, start_hour: float = 12.0,
                 genset_share: float = 0.25, grid_hz: float = 60.0,
                 islanded: bool = False) -> None:
        self.gpu = GpuHall(gpu, seed=seed) if gpu is not None else None
        self.solar = SolarField(solar, seed=seed, start_hour=start_hour) \
            if solar is not None else None
        self.genset = Genset(genset) if genset is not None else None
        self.battery = Battery(battery) if battery is not None else None
        self.genset_share = genset_share
        self.grid_hz = grid_hz
        self.islanded = islanded
        if islanded and self.genset is None:
            raise ValueError("an islanded campus needs a genset")
        # Energy registers, kWh: what each device's meter would have counted.
        self.energy_kwh: dict[str, float] = {
            "poi_import": 0.0, "poi_export": 0.0, "gpu": 0.0, "solar": 0.0, "genset": 0.0}
        self._last: CampusState | None = None

    def step(self, t_s: float, miners_kw: float = 0.0) -> CampusState:
        """The campus at `t_s` with the miners drawing `miners_kw`.

        Raises:
            TimeWentBackwardsError: `t_s` is before the last step's.
        """
        gpu = self.gpu.power_kw(t_s) if self.gpu is not None else None
        solar = self.solar.power_kw(t_s) if self.solar is not None else None
        battery = soc = None
        if self.battery is not None:
            self.battery.advance(t_s)
            battery, soc = self.battery.power_kw, self.battery.soc_fraction
        genset = genset_hz = None
        if self.genset is not None:
            load = (miners_kw + (gpu or 0.0) - (solar or 0.0) - (battery or 0.0)
                    if self.islanded else self.genset_share * (gpu or 0.0))
            genset = self.genset.set_load_kw(t_s, load)
            genset_hz = self.genset.frequency_hz(t_s)
        poi = 0.0 if self.islanded else (
            miners_kw + (gpu or 0.0) - (solar or 0.0) - (genset or 0.0) - (battery or 0.0))
        hz = genset_hz if self.islanded and genset_hz is not None else self.grid_hz
        state = CampusState(t_s, miners_kw, gpu, solar, genset, genset_hz, battery, soc, poi,
                            hz)
        if self._last is not None:
            self._integrate(self._last, state)
        state.energy_kwh = dict(self.energy_kwh)
        if self.battery is not None:
            state.energy_kwh["battery_charge"] = self.battery.charged_kwh
            state.energy_kwh["battery_discharge"] = self.battery.discharged_kwh
        self._last = state
        return state

    def _integrate(self, a: CampusState, b: CampusState) -> None:
        dt_h = (b.t_s - a.t_s) / 3600.0
        e = self.energy_kwh
        mean_poi = (a.poi_kw + b.poi_kw) / 2.0
        e["poi_import" if mean_poi >= 0 else "poi_export"] += abs(mean_poi) * dt_h
        for key, x, y in (("gpu", a.gpu_kw, b.gpu_kw), ("solar", a.solar_kw, b.solar_kw),
                          ("genset", a.genset_kw, b.genset_kw)):
            if x is not None and y is not None:
                e[key] += (x + y) / 2.0 * dt_h


def _ramp(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def _forward(last_s: float, t_s: float) -> None:
    if t_s < last_s:
        raise TimeWentBackwardsError(f"time went backwards: {t_s:g} s after {last_s:g} s")

"""A simulated site on an energy campus (simulators/campus.py).

The miners share one point of interconnection with a GPU hall, solar, a genset and a
battery.

`SimulatedCampus` is a `SimulatedSite` whose site meter sees the whole campus at the POI:
miners (with their aux load) + GPU hall - solar - genset - battery discharge, i.e. the
site's net import; islanded, the POI reads 0 and the genset carries everything. Every
`step_interval_s` it steps the `CampusSimulation` with the fleet's power and refreshes
the SunSpec registers of a `CampusModbus` (if given; its server is started by whoever
made it, since the site file names its port), and every `meter_interval_s` it publishes
the campus meters that the site file names as `mineops` MQTT meters:

- the POI, when `campus.poi.meter` is the site meter (import positive);
- a firm load (the GPU hall), a generator (solar, the genset) or the battery, on its
  own `role = "aux"` meter, counted as a meter counts: power into the circuit positive,
  so a generator's output and a battery's discharge read negative.

The first firm load is the GPU hall, generators are matched by kind (solar, wind or
genset: the simulation's solar field, the genset), the battery is the battery.

The campus runs on its own clock, `campus_speed` times wall time (default: the fleet's
`speed`): a test can keep GPU ramps and meter periods in real seconds while miners sleep
and wake `speed` times faster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from controller.config import SiteConfig
from controller.protocol.payloads import MeterTelemetry
from simulators.campus import CampusSimulation, CampusState
from simulators.campus_modbus import CampusModbus
from simulators.site import SimulatedSite


class SimulatedCampus(SimulatedSite):
    """A `SimulatedSite` on an energy campus; see the module docstring.

    Args:
        cfg: The site file; it must have a [campus] table.
        campus: The campus simulation.
        modbus: The SunSpec devices serving `campus`, refreshed every step; None: none.
        campus_speed: The campus clock's speed against wall time; None: the fleet's.
        step_interval_s: Wall time between campus steps, s.
        meter_noise: Relative noise on the MQTT meters' readings (0.002: 0.2 %).
        **site: SimulatedSite's keyword arguments.

    Raises:
        ValueError: no [campus] table, or `modbus` serves another simulation.
    """

    def __init__(self, cfg: SiteConfig, campus: CampusSimulation, *,
                 modbus: CampusModbus | None = None, campus_speed: float | None = None,
                 step_interval_s: float = 0.05, meter_noise: float = 0.002,
                 **site: Any) -> None:
        super().__init__(cfg, **site)
        if cfg.campus is None:
            raise ValueError("the site file has no [campus] table")
        if modbus is not None and modbus.sim is not campus:
            raise ValueError("the CampusModbus serves another simulation")
        self.campus = campus
        self.modbus = modbus
        self.campus_speed = self.speed if campus_speed is None else campus_speed
        self.step_interval_s = step_interval_s
        self.meter_noise = meter_noise
        self._t0 = time.monotonic()
        self.state = campus.step(0.0) if campus._last is None else campus._last
        self.mqtt_parts = self._mqtt_parts(cfg)

    def _mqtt_parts(self, cfg: SiteConfig) -> dict[str, Callable[[CampusState], float | None]]:
        """Meter id -> the reading a `mineops` MQTT meter on that part shows, W."""
        assert cfg.campus is not None
        ours = {m.id for m in cfg.meters if m.type == "mineops"}
        site = {m.id for m in cfg.meters if m.role == "site"}
        out: dict[str, Callable[[CampusState], float | None]] = {}

        def kw(get: Callable[[CampusState], float | None], sign: float
               ) -> Callable[[CampusState], float | None]:
            def reading(s: CampusState) -> float | None:
                v = get(s)
                return None if v is None else sign * v * 1000.0
            return reading

        c = cfg.campus
        if c.poi.meter in ours and c.poi.meter in site:
            out[c.poi.meter] = kw(lambda s: s.poi_kw, 1.0)
        if c.firm_loads and c.firm_loads[0].meter in ours:
            out[c.firm_loads[0].meter] = kw(lambda s: s.gpu_kw, 1.0)
        for g in c.generators:
            if g.meter in ours:
                get = (lambda s: s.genset_kw) if g.kind == "genset" else (lambda s: s.solar_kw)
                out[g.meter] = kw(get, -1.0)
        if c.battery is not None and c.battery.meter in ours:
            out[c.battery.meter] = kw(lambda s: s.battery_kw, -1.0)
        return out

    # -- the campus -------------------------------------------------------------------

    def campus_time_s(self, now: float | None = None) -> float:
        """The campus's clock, s since start."""
        return ((time.monotonic() if now is None else now) - self._t0) * self.campus_speed

    def miners_site_kw(self) -> float:
        """What the miners draw now with their aux (cooling) load, kW."""
        return self.fleet.total_power_w() * (1.0 + self.cfg.energy.aux_fraction) / 1000.0

    def advance(self, now: float | None = None) -> CampusState:
        """Step the fleet and the campus to `now` (monotonic s); the campus's state then."""
        now = time.monotonic() if now is None else now
        self.fleet.step(now)
        t = max(self.campus_time_s(now), self.state.t_s)
        self.state = self.campus.step(t, miners_kw=self.miners_site_kw())
        if self.modbus is not None:
            self.modbus.update(self.state)
        return self.state

    def true_poi_w(self) -> float:
        """The site's net import now, without meter noise, W (islanded: 0)."""
        return self.advance().poi_kw * 1000.0

    def site_power_w(self) -> float:
        """What the POI meter sees: the campus's net import, with its noise, W."""
        return self.true_poi_w() * (1.0 + float(self._rng.normal(0.0, self.meter_noise)))

    # -- loops ------------------------------------------------------------------------

    async def run(self) -> None:
        """The site (fleet, prices) and the campus, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(super().run(), name="sim-site")
            tg.create_task(self._campus(), name="sim-campus")

    async def _campus(self) -> None:
        while True:
            self.advance()
            await asyncio.sleep(self.step_interval_s)

    async def _meter(self) -> None:
        """The campus's `mineops` MQTT meters (the POI among them, when it is the site meter)."""
        energy_wh = dict.fromkeys(self.mqtt_parts, 0.0)
        last = time.monotonic()
        while True:
            now = time.monotonic()
            s = self.advance(now)
            dt_h = (now - last) * self.campus_speed / 3600.0
            last = now
            for meter_id, get in self.mqtt_parts.items():
                w = get(s)
                if w is None:
                    continue
                w *= 1.0 + float(self._rng.normal(0.0, self.meter_noise))
                energy_wh[meter_id] += max(w, 0.0) * dt_h
                reading = MeterTelemetry(
                    ts=time.time(), power_w=round(w, 1),
                    energy_import_wh=round(energy_wh[meter_id], 1),
                    frequency_hz=round(s.grid_hz + float(self._rng.normal(0, 0.003)), 3))
                await self.transport.publish(self.topics.meter(meter_id), reading.encode())
            await asyncio.sleep(self.meter_interval_s)

"""The energy campus's I/O for the controller: its meters, its Modbus devices, its triggers.

`CampusLink` keeps the latest reading of every meter a `[campus]` entry names, with its
time, in the role's sign (docs/campus.md):

- MQTT meters (`[[meters]]`, any type) arrive through the ingest's meter handler, which
  offers every reading by meter id to `on_meter` (a meter counts power into its circuit
  as positive, so a generator's or the battery's reading is turned: output positive);
- SunSpec devices (`[[campus.modbus]]`) are polled by `SunSpecPoller`s, one task each,
  run by `run()` beside the controller's other tasks: a poll never blocks the event loop
  (pymodbus is asyncio) and a device that stops answering becomes unavailable, which
  counts its part at its worst case (controller/core/campus.py).

A Modbus POI meter is the site meter: its readings go to `on_site_meter`, as the MQTT
site meter's do, so grid events and frequency see the site's net import.

**A decision at once when the campus moves.** Every reading recomputes the miners'
headroom on the last decision's inputs: when the plan no longer fits under it (a GPU
job starting, a cloud over the solar field, a device going silent) or it opened by more
than the margin, `on_change("campus")` asks for a decision now rather than at the next
tick. So a firm-load step is answered one meter reading after it shows.

**Islanded**, a genset's meter is the grid's frequency: its readings go to
`on_frequency`, the controller's under-frequency shed (the same one the site meter
feeds when grid-connected), so a genset overloaded by a load step sheds miners at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from controller.campus_config import CampusConfig
from controller.core.campus import CampusPicture, PartReading, campus_picture
from controller.core.prices import PriceInForce
from controller.daemon.snapshot import CapInForce, CapSource
from controller.grid.obligations import Obligation
from controller.protocol.payloads import MeterTelemetry
from drivers.modbus import CampusRole, DeviceReading, SunSpecPoller

log = structlog.get_logger("mineops.campus")

# Roles whose MQTT meter counts the part's output as negative (power out of the circuit).
_OUTPUT_ROLES = frozenset({"generator", "battery"})


@dataclass(frozen=True, slots=True)
class _Basis:
    """The last decision's inputs to the headroom, and what it planned."""

    market_usd_per_mwh: float
    adders_usd_per_mwh: float
    poi_limit_w: float | None
    planned_w: float
    cap_w: float
    margin_w: float


class CampusLink:
    """A site's campus readings and devices; see the module docstring.

    Args:
        campus: The `[campus]` table.
        stale_s: A reading older than this counts at its part's worst case, s.
        margin_fraction: Kept free below the POI limit (policy.cap_headroom_fraction).
        on_change: Asks for a decision now; called with "campus".
        on_site_meter: Takes a reading of a Modbus POI meter as the site meter's.
        on_frequency: Takes a genset's frequency, Hz, while islanded.
        clock: Unix time, s (the readings' clock).

    Attributes:
        readings: The latest reading of each campus meter, by meter id.
        received: Readings taken, by meter id.
        dropped: Readings dropped, by (meter id, reason): `site_meter_invalid` (a POI
            reading the site meter's checks refuse), `failed` (a bug, logged).
        pollers: The SunSpec pollers, by device id.
    """

    def __init__(self, campus: CampusConfig, *, stale_s: float, margin_fraction: float,
                 on_change: Callable[[str], None],
                 on_site_meter: Callable[[MeterTelemetry], None],
                 on_frequency: Callable[[float], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.campus = campus
        self.stale_s = stale_s
        self.margin_fraction = margin_fraction
        self.on_change = on_change
        self.on_site_meter = on_site_meter
        self.on_frequency = on_frequency
        self._clock = clock
        self.roles: dict[str, CampusRole] = {}
        for meter in {m for _, m in campus.meter_uses()}:
            role = campus.role_of(meter)
            if role is not None:
                self.roles[meter] = role  # type: ignore[assignment]
        self.genset_meters = {g.meter for g in campus.generators if g.kind == "genset"}
        self.pollers = {d.id: SunSpecPoller(d, self.roles[d.id], clock=clock)
                        for d in campus.modbus if d.id in self.roles}
        self.readings: dict[str, PartReading] = {}
        self.received: Counter[str] = Counter()
        self.dropped: Counter[tuple[str, str]] = Counter()
        self._basis: _Basis | None = None

    # -- readings -----------------------------------------------------------------------

    def on_meter(self, meter_id: str, reading: MeterTelemetry) -> bool:
        """An MQTT meter's reading, by id; True if a campus part reads that meter."""
        role = self.roles.get(meter_id)
        if role is None:
            return False
        sign = -1.0 if role in _OUTPUT_ROLES else 1.0
        self._store(meter_id, PartReading(reading.power_w * sign, self._clock(),
                                          frequency_hz=reading.frequency_hz))
        return True

    def on_device(self, reading: DeviceReading) -> None:
        """A SunSpec device's poll (already in its role's sign)."""
        part = PartReading(reading.power_w, reading.at_unix_s, available=reading.available,
                           frequency_hz=reading.frequency_hz,
                           soc_fraction=reading.soc_fraction)
        if reading.role == "poi" and reading.available and reading.power_w is not None:
            self._site_meter(reading)
        self._store(reading.device_id, part)

    def _site_meter(self, reading: DeviceReading) -> None:
        islanded = self.campus.poi.islanded
        if reading.power_w is None:  # unknown: the site meter stays as it was (stale in time)
            return
        try:
            telemetry = MeterTelemetry(
                ts=reading.at_unix_s, power_w=reading.power_w,
                energy_import_wh=reading.energy_wh, energy_export_wh=reading.energy_reverse_wh,
                voltage_v=reading.voltage_v,
                # Islanded, the POI sees no grid: the gensets' meters give the frequency.
                frequency_hz=None if islanded else reading.frequency_hz)
        except ValidationError as e:
            self.dropped[(reading.device_id, "site_meter_invalid")] += 1
            log.warning("campus_poi_reading_dropped", device=reading.device_id,
                        detail=str(e)[:200])
            return
        self.on_site_meter(telemetry)

    def _store(self, meter_id: str, reading: PartReading) -> None:
        before = self.readings.get(meter_id)
        if before is not None and reading.power_w is not None:
            was = before.fresh_w(reading.at_unix_s, self.stale_s)
            if was is not None:
                reading = dataclasses.replace(reading, change_w=reading.power_w - was)
        self.readings[meter_id] = reading
        self.received[meter_id] += 1
        hz = reading.frequency_hz
        if self.campus.poi.islanded and meter_id in self.genset_meters and hz is not None \
                and reading.available:
            self.on_frequency(hz)
        self._maybe_trigger()

    def _maybe_trigger(self) -> None:
        basis = self._basis
        if basis is None:
            return
        now = self.picture(market_usd_per_mwh=basis.market_usd_per_mwh,
                           adders_usd_per_mwh=basis.adders_usd_per_mwh,
                           poi_limit_w=basis.poi_limit_w, miners_planned_w=basis.planned_w)
        if now.cap_w < basis.planned_w or now.cap_w > basis.cap_w + max(basis.margin_w, 1.0):
            # Once per change: the decision this asks for sets a new basis.
            self._basis = None
            self.on_change("campus")

    # -- the decision's view ------------------------------------------------------------

    def picture(self, *, market_usd_per_mwh: float, adders_usd_per_mwh: float,
                poi_limit_w: float | None = None,
                miners_planned_w: float | None = None) -> CampusPicture:
        """The campus now (controller/core/campus.py)."""
        return campus_picture(
            self.campus, self.readings, now_unix_s=self._clock(), stale_s=self.stale_s,
            margin_fraction=self.margin_fraction, market_usd_per_mwh=market_usd_per_mwh,
            adders_usd_per_mwh=adders_usd_per_mwh, poi_limit_w=poi_limit_w,
            miners_planned_w=miners_planned_w)

    def decided(self, picture: CampusPicture, *, market_usd_per_mwh: float,
                adders_usd_per_mwh: float, poi_limit_w: float | None,
                planned_w: float) -> None:
        """Remember a decision's inputs and plan, to weigh the readings that follow against.

        A reading after which the plan no longer fits asks for a decision at once.
        """
        self._basis = _Basis(market_usd_per_mwh, adders_usd_per_mwh, poi_limit_w, planned_w,
                             picture.cap_w, picture.margin_w)

    def cap_in_force(self, base: CapInForce, ob: Obligation, price: PriceInForce,
                     planned_w: float | None) -> tuple[CapInForce, CampusPicture]:
        """The decision's cap with the campus as one more limit, and the campus picture.

        A grid obligation's cap applies to the site's net import (the POI limit).
        `planned_w`: the last plan's site W (None before the first).
        """
        import_w = self.campus.poi.import_limit_kw * 1000.0
        picture = self.picture(market_usd_per_mwh=price.market_usd_per_mwh,
                               adders_usd_per_mwh=price.adders_usd_per_mwh,
                               poi_limit_w=min(import_w, ob.cap_w), miners_planned_w=planned_w)
        cap = campus_cap(base, picture, headroom_fraction=self.margin_fraction,
                         poi_source=_poi_source(ob, import_w))
        return cap, picture

    def decided_at(self, picture: CampusPicture, price: PriceInForce, ob: Obligation,
                   planned_w: float) -> None:
        """`decided` with the inputs `cap_in_force` took."""
        self.decided(picture, market_usd_per_mwh=price.market_usd_per_mwh,
                     adders_usd_per_mwh=price.adders_usd_per_mwh,
                     poi_limit_w=min(self.campus.poi.import_limit_kw * 1000.0, ob.cap_w),
                     planned_w=planned_w)

    # -- devices ------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll every SunSpec device until cancelled (nothing to do without one)."""
        if not self.pollers:
            return
        async with asyncio.TaskGroup() as tg:
            for device_id, poller in self.pollers.items():
                tg.create_task(self._poll(poller), name=f"campus-modbus-{device_id}")

    async def _poll(self, poller: SunSpecPoller) -> None:
        async for reading in poller.readings():
            try:
                self.on_device(reading)
            except Exception:
                # A bug in handling one reading must not stop the polls (nor the controller,
                # whose task group this runs in): the part then ages into its worst case.
                self.dropped[(reading.device_id, "failed")] += 1
                log.exception("campus_reading_failed", device=reading.device_id)


def campus_cap(base: CapInForce, picture: CampusPicture, *, headroom_fraction: float,
               poi_source: CapSource) -> CapInForce:
    """The cap in force with the campus as one more limit.

    `base` is the controller's own (site cap, grid obligation); with a campus a grid
    target is a limit on the site's net import, so it is in `picture` already (its POI
    limit) and the miners' limit is the tighter of the site cap and the campus's.
    `poi_source`: what set the POI limit ("site": the interconnect; else the grid
    obligation's kind or "recovery").
    """
    site_w = base.site_w
    own = site_w * (1.0 - headroom_fraction)
    ramp = math.inf if picture.ramp_limit_w is None else picture.ramp_limit_w
    in_force = max(min(site_w, picture.limit_w, ramp), 0.0)
    planning = max(min(own, picture.cap_w), 0.0)
    source: CapSource
    if base.source == "frequency":
        source = "frequency"
    elif planning >= own:
        source = "site"
    elif poi_source != "site" and not picture.islanded:
        source = poi_source
    else:
        source = "islanded" if picture.islanded else "campus"
    return CapInForce(site_w=site_w, in_force_w=in_force, planning_w=planning, source=source)


def _poi_source(ob: Obligation, import_w: float) -> CapSource:
    """What sets the POI limit: the interconnect ("site"), or a grid obligation."""
    if ob.cap_w >= import_w:
        return "site"
    event = ob.event
    if event is not None and event.target_w is not None and ob.cap_w == event.target_w \
            and event.kind in ("target_kw", "shed_kw", "emergency", "peak"):
        return event.kind  # type: ignore[return-value]
    return "recovery"

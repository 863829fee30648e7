"""The energy campus as a decision sees it: the miners' headroom and the price of their power.

Pure: the `[campus]` table, the latest reading of each part with its time, and the
market price in; the miners' limit, its parts and a stepped cost curve out. No I/O, no
clock (`now_unix_s` is passed in, on the readings' clock). docs/campus.md has the model
and a worked example.

**Headroom.** Grid-connected, the miners may draw (site W, incl. their aux load)::

    limit    = POI limit + generation + battery discharge - firm load
    headroom = limit - margin          margin = margin_fraction x POI limit

where the POI limit is `campus.poi.import_limit_kw`, or a grid event's target on the
site's net import when that is lower. **A reading that is missing, unavailable or older
than `stale_s` counts on the safe side**: a firm load at its `max_kw`, a generator at 0,
the battery charging at `max_charge_kw`. A firm load also counts at least what its
schedule announces for now (a booked training run is kept free before it starts). A
firm load that rose since its reading before counts that rise once more, and generation
that fell counts its fall once more (`PartReading.change_w`): a GPU job ramping in, or a
cloud's edge, is met where it will be at the next reading rather than one reading late.

**Islanded** (`campus.poi.islanded`: no grid, gensets only) the gensets carry every
load, so the limit is their rating less reserve (`Generator.firm_kw`) plus renewables
and battery less firm load, the margin is taken of the gensets' capacity, and the
miners' power may rise in one step only by what the gensets pick up at once
(`max_load_step_kw`, summed) above what the miners draw now (the gensets' measured
output plus renewables and battery less firm load); a next step only once the last has
landed (the miners draw the last plan) and the gensets' frequency has recovered to
within 0.25 % of nominal. Until then, and with a genset reading unknown, the miners may
not rise above the last plan.

**Cost curve.** The miners' power costs, from their first watt up to the headroom, by
steps (:class:`CostCurve`, given to the optimizer as `CostSteps`):

1. on-site surplus (generation and battery discharge left after the firm loads, which
   take the cheapest first): a watt the miners do not take would be exported, up to
   `export_limit_kw` (the cheapest surplus first), earning the export price, here the
   market price; or curtailed, saving the generator's `marginal_cost_usd_per_mwh`. So
   each surplus watt costs what it would otherwise have earned or saved: ``max(marginal
   cost, export price)`` within the export limit, the marginal cost beyond it; battery
   discharge costs the market price (its energy is worth that to the site). The
   surplus steps are in ascending price: the site exports and curtails the best way
   for what the miners leave.
2. grid import at market price plus adders, up to the POI limit;
3. islanded, the gensets' capacity at their marginal costs instead of the grid.

The margin comes off the top of the curve. Surplus steps come before the grid because
that is where the power flows: a step later on may be cheaper (a genset dearer than
night-time grid power), which the optimizer decides exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import numpy as np

from controller.campus_config import CampusConfig, FirmLoad
from controller.core.optimizer import CostSteps

PartRole = Literal["firm_load", "generator", "battery"]
SegmentSource = Literal["curtailed", "export", "battery", "grid", "genset"]
_Supply = tuple[float, float, SegmentSource, str]  # ($/MWh, W, source, part)
_LEAST_W = 1e-3  # a step narrower than this is rounding, not power
# Islanded: the miners draw their last plan within this fraction (of it, or half of it of
# the gensets' capacity, for noise on small plans): that step has landed.
_LANDED_FRACTION = 0.02
# A genset's frequency within this fraction of nominal has recovered from a load step (the
# tightest of ISO 8528-5's steady-state bands, G3); a step within pick-up dips about 1 %,
# so a next one never lands on more than a quarter of that.
_RECOVERED_FRACTION = 0.0025


@dataclass(frozen=True, slots=True)
class PartReading:
    """The latest reading of one campus meter, in its role's sign (docs/campus.md).

    Attributes:
        power_w: Active power, W: drawn for a firm load and the POI (import), generated
            for a generator, discharged for the battery (charging negative); None:
            unknown.
        at_unix_s: When it was taken (or received), Unix s.
        available: False when the device is known unreachable (a Modbus device after
            its failed polls): every value is then unknown.
        frequency_hz: AC frequency, Hz (a genset's shows its load steps).
        soc_fraction: Battery state of charge, 0..1.
        change_w: Power since the reading before it (when that one was fresh), W: a
            load still ramping up, or generation still falling, is counted where it
            will be by the next reading if it keeps moving.
    """

    power_w: float | None
    at_unix_s: float
    available: bool = True
    frequency_hz: float | None = None
    soc_fraction: float | None = None
    change_w: float = 0.0

    def fresh_w(self, now_unix_s: float, stale_s: float) -> float | None:
        """Its power if known and at most `stale_s` old, else None."""
        if not self.available or self.power_w is None or not math.isfinite(self.power_w):
            return None
        return self.power_w if now_unix_s - self.at_unix_s <= stale_s else None


@dataclass(frozen=True, slots=True)
class PartCount:
    """What one part counts for in the headroom, W, and whether that is its worst case."""

    id: str
    role: PartRole
    kind: str  # firm_load, solar, wind, genset, battery
    counted_w: float  # in the role's sign
    measured_w: float | None  # a fresh reading, else None
    stale: bool  # counted at its worst case: no fresh reading


@dataclass(frozen=True, slots=True)
class CostSegment:
    """One step of the miners' cost curve: `width_w` site W at `price_usd_per_mwh`.

    `source`: curtailed (surplus otherwise curtailed: the generator's marginal cost),
    export (surplus otherwise exported: the export price), battery (discharge: the
    market price), grid (import: market plus adders), genset (islanded: its fuel).
    `part` is the generator's id, "battery" or "grid".
    """

    width_w: float
    price_usd_per_mwh: float
    source: SegmentSource
    part: str


@dataclass(frozen=True, slots=True)
class CostCurve:
    """The miners' power by steps, from their first watt up to the headroom."""

    segments: tuple[CostSegment, ...]

    @property
    def width_w(self) -> float:
        """Site W the curve covers: the headroom."""
        return sum(s.width_w for s in self.segments)

    @property
    def on_site_w(self) -> float:
        """Site W of it that on-site generation or the battery supplies (not the grid)."""
        return sum(s.width_w for s in self.segments if s.source != "grid")

    def steps(self) -> CostSteps | None:
        """The optimizer's form (None: no headroom at all)."""
        upper: list[float] = []
        price: list[float] = []
        edge = 0.0
        for s in self.segments:
            edge += s.width_w
            if price and price[-1] == s.price_usd_per_mwh:
                upper[-1] = edge  # one price, one step (exported and curtailed alike)
            elif not upper or edge > upper[-1]:
                upper.append(edge)
                price.append(s.price_usd_per_mwh)
        if not upper:
            return None
        return CostSteps(np.array(upper), np.array(price))

    def price_at(self, site_w: float) -> float | None:
        """$/MWh of the miners' watt at `site_w` (None past the curve's end)."""
        edge = 0.0
        for s in self.segments:
            edge += s.width_w
            if site_w < edge:
                return s.price_usd_per_mwh
        return None


@dataclass(frozen=True, slots=True)
class CampusPicture:
    """The campus at one decision: the miners' limit, what it is made of, and its price.

    Powers are site W (the miners' incl. their aux load). `limit_w` is the miners' share
    of the POI limit (or of the gensets, islanded); `headroom_w` that less the margin, at
    least 0: the cap the miners plan under; `ramp_limit_w` (islanded only) the most the
    miners may draw after this decision. `stale` names the parts counted at their worst
    case.
    """

    islanded: bool
    poi_limit_w: float | None  # the import limit, or a lower grid target (None: islanded)
    import_limit_w: float  # campus.poi.import_limit_kw (the interconnect), W
    limit_w: float
    margin_w: float
    headroom_w: float
    firm_load_w: float  # counted, all firm loads
    generation_w: float  # counted against the limit, all generators
    battery_w: float  # counted, discharge positive
    net_import_w: float | None  # a fresh POI reading
    soc_fraction: float | None
    ramp_limit_w: float | None
    parts: tuple[PartCount, ...]
    curve: CostCurve

    @property
    def others_measured_w(self) -> float:
        """What the campus's other parts draw from the POI by their fresh readings, W.

        Firm loads add, generation and battery discharge subtract; a part without a fresh
        reading adds nothing. The POI reading less this is the miners' measured share,
        what the meter guard holds against the miners' cap.
        """
        total = 0.0
        for p in self.parts:
            if p.measured_w is None:
                continue
            total += p.measured_w if p.role == "firm_load" else -p.measured_w
        return total

    @property
    def stale(self) -> tuple[str, ...]:
        """Ids of the parts counted at their worst case."""
        return tuple(p.id for p in self.parts if p.stale)

    def net_import_w_at(self, miners_w: float) -> float | None:
        """The net import the site would draw with the miners at `miners_w` (None islanded)."""
        if self.poi_limit_w is None:
            return None
        return miners_w - (self.limit_w - self.poi_limit_w)

    @property
    def cap_w(self) -> float:
        """What the miners may plan under: the headroom, or the ramp limit if lower."""
        if self.ramp_limit_w is None:
            return self.headroom_w
        return max(min(self.headroom_w, self.ramp_limit_w), 0.0)


def scheduled_w(load: FirmLoad, now_unix_s: float) -> float:
    """The draw a firm load's schedule announces at `now_unix_s`, W (0 outside windows)."""
    now = datetime.fromtimestamp(now_unix_s, UTC)
    for w in load.schedule:
        if w.start <= now < w.end:
            return w.kw * 1000.0
    return 0.0


def campus_picture(
    campus: CampusConfig,
    readings: Mapping[str, PartReading],
    *,
    now_unix_s: float,
    stale_s: float,
    margin_fraction: float,
    market_usd_per_mwh: float,
    adders_usd_per_mwh: float,
    poi_limit_w: float | None = None,
    miners_planned_w: float | None = None,
) -> CampusPicture:
    """The miners' headroom and cost curve from the campus's readings (module docstring).

    Args:
        campus: The `[campus]` table.
        readings: The latest reading of each campus meter, by meter id (missing: unknown).
        now_unix_s: Now, on the readings' clock, Unix s.
        stale_s: A reading older than this counts on the safe side, s.
        margin_fraction: Kept free below the limit for meter noise and settling (the
            policy's cap_headroom_fraction).
        market_usd_per_mwh: The market price in force (the export price too), $/MWh.
        adders_usd_per_mwh: Added to the market price for grid import, $/MWh.
        poi_limit_w: A lower limit on net import in force (a grid event's target), W.
        miners_planned_w: The last plan's site W (islanded: the ceiling when a genset's
            output is unknown).
    """
    parts = _firm_load_counts(campus, readings, now_unix_s, stale_s)
    gens, genset_out = _generator_counts(campus, readings, now_unix_s, stale_s, parts)
    battery_w, soc = _battery_count(campus, readings, now_unix_s, stale_s, parts)
    firm = sum(p.counted_w for p in parts if p.role == "firm_load")
    import_w = campus.poi.import_limit_kw * 1000.0
    if campus.poi.islanded:
        hz = [r.frequency_hz for g in campus.generators if g.kind == "genset"
              and (r := readings.get(g.meter)) is not None and r.fresh_w(now_unix_s, stale_s)
              is not None and r.frequency_hz is not None]
        return _islanded(campus, parts, gens, genset_out, firm=firm, battery_w=battery_w,
                         soc=soc, margin_fraction=margin_fraction, import_w=import_w,
                         market=market_usd_per_mwh, miners_planned_w=miners_planned_w,
                         recovered=all(_recovered(f) for f in hz))
    limit_poi = import_w if poi_limit_w is None else max(min(import_w, poi_limit_w), 0.0)
    supply: list[_Supply] = [(c, w, "curtailed", gid) for c, w, gid, _ in gens]
    if battery_w > 0:
        supply.append((market_usd_per_mwh, battery_w, "battery", "battery"))
    net_firm = firm - min(battery_w, 0.0)  # a charging battery is one more load
    surplus, deficit = _after_firm(supply, net_firm)
    export_w = campus.poi.export_limit_kw * 1000.0
    segments = _priced_surplus(surplus, export_w, market_usd_per_mwh)
    grid_w = limit_poi - deficit
    if grid_w > 0:
        segments.append(CostSegment(grid_w, market_usd_per_mwh + adders_usd_per_mwh, "grid",
                                    "grid"))
    generation = sum(w for _, w, _, _ in gens)
    limit = limit_poi + generation + battery_w - firm
    margin = margin_fraction * limit_poi
    headroom = max(limit - margin, 0.0)
    return CampusPicture(
        islanded=False, poi_limit_w=limit_poi, import_limit_w=import_w, limit_w=limit,
        margin_w=margin, headroom_w=headroom, firm_load_w=firm, generation_w=generation,
        battery_w=battery_w, soc_fraction=soc, ramp_limit_w=None, parts=tuple(parts),
        net_import_w=_reading(readings, campus.poi.meter, now_unix_s, stale_s),
        curve=CostCurve(tuple(_trim(segments, headroom))))


def _firm_load_counts(campus: CampusConfig, readings: Mapping[str, PartReading],
                      now_unix_s: float, stale_s: float) -> list[PartCount]:
    """Each firm load at what the headroom must leave it, W; max_kw when unknown.

    That is the most of its reading, the reading plus its rise (capped at max_kw) and its
    schedule.
    """
    parts: list[PartCount] = []
    for f in campus.firm_loads:
        measured = _reading(readings, f.meter, now_unix_s, stale_s)
        announced = scheduled_w(f, now_unix_s)
        if measured is None:
            counted = f.max_kw * 1000.0
        else:
            ahead = min(measured + _rising(readings, f.meter), f.max_kw * 1000.0)
            counted = max(measured, ahead, announced, 0.0)
        parts.append(PartCount(f.id, "firm_load", "firm_load", counted, measured,
                               measured is None))
    return parts


def _generator_counts(campus: CampusConfig, readings: Mapping[str, PartReading],
                      now_unix_s: float, stale_s: float, parts: list[PartCount],
                      ) -> tuple[list[tuple[float, float, str, str]], list[float | None]]:
    """Each generator at what it can be counted on for, W (appended to `parts`).

    Its reading less its fall, within 0..rating; 0 when unknown. Returns (marginal cost,
    W counted, id, kind) per generator, and each genset's output (None: unknown).
    """
    gens: list[tuple[float, float, str, str]] = []
    genset_out: list[float | None] = []
    for g in campus.generators:
        measured = _reading(readings, g.meter, now_unix_s, stale_s)
        counted = 0.0 if measured is None else min(
            max(measured - _falling(readings, g.meter), 0.0), g.rating_kw * 1000.0)
        parts.append(PartCount(g.id, "generator", g.kind, counted, measured, measured is None))
        if g.kind == "genset":
            genset_out.append(counted if measured is not None else None)
        gens.append((g.marginal_cost_usd_per_mwh, counted, g.id, g.kind))
    return gens, genset_out


def _battery_count(campus: CampusConfig, readings: Mapping[str, PartReading],
                   now_unix_s: float, stale_s: float,
                   parts: list[PartCount]) -> tuple[float, float | None]:
    """The battery's power, W, discharge positive (appended to `parts`), and its SoC.

    Unknown power counts as charging at full power (one more load); (0, None) without
    a battery.
    """
    b = campus.battery
    if b is None:
        return 0.0, None
    r = readings.get(b.meter)
    measured = _reading(readings, b.meter, now_unix_s, stale_s)
    battery_w = (-b.max_charge_kw * 1000.0 if measured is None else
                 min(max(measured, -b.max_charge_kw * 1000.0), b.max_discharge_kw * 1000.0))
    soc = None
    if measured is not None and r is not None and r.soc_fraction is not None:
        soc = r.soc_fraction
    parts.append(PartCount("battery", "battery", "battery", battery_w, measured,
                           measured is None))
    return battery_w, soc


def _islanded(campus: CampusConfig, parts: list[PartCount],
              gens: list[tuple[float, float, str, str]], genset_out: list[float | None], *,
              firm: float, battery_w: float, soc: float | None, margin_fraction: float,
              import_w: float, market: float, miners_planned_w: float | None,
              recovered: bool) -> CampusPicture:
    gensets = [g for g in campus.generators if g.kind == "genset"]
    capacity = sum(g.firm_kw for g in gensets) * 1000.0
    renewables: list[_Supply] = [(c, w, "curtailed", gid) for c, w, gid, kind in gens
                                 if kind != "genset"]
    supply: list[_Supply] = list(renewables)
    supply += [(g.marginal_cost_usd_per_mwh, g.firm_kw * 1000.0, "genset", g.id)
               for g in gensets]
    if battery_w > 0:
        # Discharge displaces the cheapest genset's fuel.
        fuel = min((g.marginal_cost_usd_per_mwh for g in gensets), default=market)
        supply.append((fuel, battery_w, "battery", "battery"))
    surplus, _ = _after_firm(supply, firm - min(battery_w, 0.0))
    renewable_w = sum(w for _, w, _, _ in renewables)
    limit = capacity + renewable_w + battery_w - firm
    margin = margin_fraction * capacity
    headroom = max(limit - margin, 0.0)
    segments = [CostSegment(w, c, src, part) for c, w, src, part in sorted(surplus)]
    hold = miners_planned_w if miners_planned_w is not None else 0.0
    ramp = hold  # what the gensets carry now unknown: no step beyond the last plan
    if genset_out and all(x is not None for x in genset_out):
        carried = sum(x for x in genset_out if x is not None)
        miners_now = max(carried + renewable_w + battery_w - firm, 0.0)
        # A new step only once the last has landed (the miners draw what was planned:
        # wake-ups take minutes, a target change seconds) and the gensets' frequency has
        # recovered from it; else steps would pile up on a genset still recovering.
        tolerance = max(_LANDED_FRACTION * hold, _LANDED_FRACTION / 2 * capacity)
        landed = miners_planned_w is None or miners_now >= miners_planned_w - tolerance
        if landed and recovered:
            ramp = miners_now + sum(g.max_load_step_kw or 0.0 for g in gensets) * 1000.0
    return CampusPicture(
        islanded=True, poi_limit_w=None, import_limit_w=import_w, limit_w=limit,
        margin_w=margin, headroom_w=headroom, firm_load_w=firm,
        generation_w=renewable_w + sum(w for _, w, _, kind in gens if kind == "genset"),
        battery_w=battery_w, net_import_w=None, soc_fraction=soc, ramp_limit_w=ramp,
        parts=tuple(parts), curve=CostCurve(tuple(_trim(segments, headroom))))


def _reading(readings: Mapping[str, PartReading], meter: str, now_unix_s: float,
             stale_s: float) -> float | None:
    r = readings.get(meter)
    return None if r is None else r.fresh_w(now_unix_s, stale_s)


def _recovered(hz: float) -> bool:
    """A genset's frequency back within its steady-state band of its nominal 50 or 60 Hz."""
    nominal = 50.0 if hz < 55.0 else 60.0
    return abs(hz - nominal) <= _RECOVERED_FRACTION * nominal


def _rising(readings: Mapping[str, PartReading], meter: str) -> float:
    r = readings.get(meter)
    return 0.0 if r is None or not math.isfinite(r.change_w) else max(r.change_w, 0.0)


def _falling(readings: Mapping[str, PartReading], meter: str) -> float:
    r = readings.get(meter)
    return 0.0 if r is None or not math.isfinite(r.change_w) else max(-r.change_w, 0.0)


def _after_firm(supply: list[_Supply], firm_w: float
                ) -> tuple[list[_Supply], float]:
    """What supply is left after the firm loads took the cheapest, and what they lack, W."""
    left = max(firm_w, 0.0)
    out = []
    for price, w, source, part in sorted(supply, key=lambda x: x[0]):
        used = min(w, left)
        left -= used
        if w - used > 0:
            out.append((price, w - used, source, part))
    return out, left


def _priced_surplus(surplus: list[_Supply], export_w: float,
                    export_price: float) -> list[CostSegment]:
    """Surplus steps at what each watt would otherwise earn (exported) or save (curtailed)."""
    segments: list[CostSegment] = []
    room = export_w
    for price, w, source, part in sorted(surplus, key=lambda x: x[0]):
        exported = min(w, room) if export_price > price else 0.0
        room -= exported
        if exported > 0:
            segments.append(CostSegment(exported, export_price, "export", part))
        if w - exported > 0:
            segments.append(CostSegment(w - exported, price, source, part))
    segments.sort(key=lambda s: s.price_usd_per_mwh)
    return segments


def _trim(segments: list[CostSegment], width_w: float) -> list[CostSegment]:
    """The first `width_w` W of the steps (the margin comes off the top)."""
    out = []
    left = width_w
    for s in segments:
        if left <= 0:
            break
        w = min(s.width_w, left)
        left -= w
        if w >= _LEAST_W:  # a sliver (rounding) would be a step of no width
            out.append(CostSegment(w, s.price_usd_per_mwh, s.source, s.part))
    return out

"""The site view: one decision summary as a panel (terminal) or a line (pipe).

Shows what an operator asks first: the site clock; site power against the cap in force
(on an energy campus like with like: the miners' measured share against the miners' cap,
the POI's net import against the import limit) and why the cap is where it is (the
site's own cap, a grid event with its target and deadline, an under-frequency shed, the
recovery ramp after an event); the price in force and its parts (the market's own price,
where it came from, the bound it was planned at when beyond the site's `[energy]`
bounds, adders); hashrate; and the miners by state, each state with the reasons the
decision gave (how many sleep for price, how many the grid holds). Units are written
next to every figure: MW for site power, PH/s for hashrate, $/MWh for energy, $/PH/day
for hashprice. A value the controller did not know is shown as "unknown", never as zero.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from controller.catalogue import MinerModel, breakeven_label
from controller.core.fleet_state import VIEW_STATES
from controller.protocol.payloads import DecisionSummary, PayloadError, decode
from controller.view.clock import SiteClock

PRICE_SOURCES = {"real_time": "real-time", "day_ahead": "day-ahead schedule",
                 "default": "cautious default, no price feed"}
GRID_KINDS = {"target_kw": "power target", "shed_kw": "shed below baseline",
              "emergency": "emergency, keep-alive load only", "peak": "peak alert"}
# A decision this old means the controller is not deciding (it decides every few seconds
# at most); the view says so rather than showing old figures as current.
STALE_AFTER_S = 30.0


def read_summary(raw: bytes) -> tuple[DecisionSummary, list[str]]:
    """Decode a decision summary, ignoring fields this version does not know.

    A newer controller may publish fields an older `mineops top` lacks: they are left out
    (and listed) rather than making the whole summary unreadable.

    Returns:
        The summary and the names of the fields left out.

    Raises:
        PayloadError: not JSON, not an object, or a known field is invalid.
    """
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise PayloadError("bad_json", str(e)) from None
    if not isinstance(data, dict):
        raise PayloadError("bad_schema", "not a JSON object")
    known = DecisionSummary.model_fields
    unknown = sorted(k for k in data if k not in known)
    kept = {k: v for k, v in data.items() if k in known}
    return decode(DecisionSummary, json.dumps(kept).encode()), unknown


def event_terms(kind: str, value_w: float | None) -> str:
    """A grid event's terms in words: "target 2.15 MW", "shed 0.50 MW below the baseline"."""
    if kind == "target_kw" and value_w is not None:
        return f"target {format_mw(value_w)}"
    if kind == "shed_kw" and value_w is not None:
        return f"shed {format_mw(value_w)} below the baseline"
    if kind == "peak":
        return "peak alert" + ("" if value_w is None else f", hold {format_mw(value_w)}")
    return GRID_KINDS.get(kind, kind)


def format_mw(w: float | None) -> str:
    """A power in W as MW for the view, e.g. "3.54 MW"; None: "unknown"."""
    return "unknown" if w is None else f"{w / 1e6:,.2f} MW"


def format_price(usd_per_mwh: float | None) -> str:
    """A price in $/MWh for the view, e.g. "-$12.50/MWh"; None: "unknown"."""
    if usd_per_mwh is None:
        return "unknown"
    sign = "-" if usd_per_mwh < 0 else ""
    return f"{sign}${abs(usd_per_mwh):,.2f}/MWh"


def format_bound(usd_per_mwh: float) -> str:
    """A price bound in whole $/MWh as the site file writes it: "$5,000", "-$250"."""
    sign = "-" if usd_per_mwh < 0 else ""
    return f"{sign}${abs(usd_per_mwh):,.0f}"


def format_ago(seconds: float) -> str:
    """A duration for "... ago": seconds under 90 s, minutes under 90 min, else hours."""
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _time(t: datetime, ref: datetime) -> str:
    """A time of day, with the date when it is not `ref`'s day."""
    fmt = "%H:%M %Z" if t.date() == ref.date() else "%Y-%m-%d %H:%M %Z"
    return t.strftime(fmt)


def _over(power_w: float | None, limit_w: float | None) -> bool:
    """Beyond the limit by more than the meter's noise (0.5 %); unknown is not shown over."""
    return power_w is not None and limit_w is not None and power_w > limit_w * 1.005


@dataclass(frozen=True)
class SiteView:
    """What the view shows: a site's latest decision summary and how to read its times.

    Attributes:
        site_id: the site, as in its topics.
        summary: the latest decision summary; None before the first one.
        clock: maps the summary's Unix times to the site's clock.
        now_wall_s: wall-clock Unix time of the rendering (ages, "in 5 min").
        models: catalogue models of the fleet, by key, for break-even prices; empty when
            not known (`mineops top` without a site file).
        controller_online: the controller's retained availability; None when not known.
        source: where the summary comes from, e.g. "broker 10.0.0.5:1883".
        aux_fraction: the site's `[energy] aux_fraction`, counted in the break-even prices
            as the controller counts it (0 when not known).
        link: why the viewer cannot reach the broker, while it cannot (None: reached, or
            not known yet); said in place of "waiting for the first decision".
    """

    site_id: str
    summary: DecisionSummary | None
    clock: SiteClock
    now_wall_s: float
    models: Mapping[str, MinerModel] = field(default_factory=dict)
    controller_online: bool | None = None
    source: str = ""
    aux_fraction: float = 0.0
    link: str | None = None

    # -- pieces, shared by the panel and the line ---------------------------------------

    def site_time(self) -> str:
        """The decision's time on the site clock, e.g. "2024-08-20 18:05:00 CDT"."""
        if self.summary is None:
            return "no decision yet"
        return self.clock.at(self.summary.ts).strftime("%Y-%m-%d %H:%M:%S %Z")

    def age_s(self) -> float | None:
        """Real seconds since the decision (None before the first)."""
        return None if self.summary is None else self.now_wall_s - self.summary.ts

    def cap_in_force_w(self) -> float:
        """The cap in force, W (the site cap where the summary has no other)."""
        s = self.summary
        assert s is not None
        return s.cap_in_force_w if s.cap_in_force_w is not None else s.cap_w

    def cap_why(self) -> str:
        """Why the cap in force is what it is, in the operator's words."""
        s = self.summary
        assert s is not None
        source = s.cap_source or "site"
        site_cap = f"site cap {format_mw(s.cap_site_w)}" if s.cap_site_w is not None else ""
        if source == "site":
            why = "the site cap"
            if s.grid_event_id is not None:
                why += (f"; grid event {s.grid_event_id} in force, its target "
                        f"{format_mw(s.grid_event_target_w)} is not tighter")
            return why
        if source == "frequency":
            return f"under-frequency shed ({site_cap})" if site_cap else "under-frequency shed"
        if source == "recovery":
            return ("recovery ramp after a grid obligation ended, rising to the "
                    + (site_cap or "site cap"))
        if source == "campus":
            return "the campus's headroom at the interconnect" + (
                f" ({site_cap})" if site_cap else "")
        if source == "islanded":
            return "islanded: the gensets' rating less reserve, rising by their load step" + (
                f" ({site_cap})" if site_cap else "")
        return self.grid_event_text() + (f" ({site_cap})" if site_cap else "")

    def grid_event_text(self) -> str:
        """The grid event in force: id, kind, target, deadline, end, on track."""
        s = self.summary
        assert s is not None
        kind = s.grid_event_kind or s.cap_source or "event"
        parts = [f"grid event {s.grid_event_id or '?'}: {GRID_KINDS.get(kind, kind)}"]
        decided = self.clock.at(s.ts)
        if s.grid_event_target_w is not None:
            target = f"target {format_mw(s.grid_event_target_w)}"
            if s.grid_event_deadline_ts is not None:
                target += f" by {_time(self.clock.at(s.grid_event_deadline_ts), decided)}"
            parts.append(target)
        if s.grid_event_end_ts is not None:
            parts.append(f"until {_time(self.clock.at(s.grid_event_end_ts), decided)}")
        if s.grid_event_on_track is not None:
            parts.append("on track" if s.grid_event_on_track else "NOT on track")
        return ", ".join(parts)

    def campus_text(self) -> str | None:
        """The campus's part of the decision (None on a site without one)."""
        s = self.summary
        if s is None or s.campus_headroom_w is None:
            return None
        limit = ("islanded, no grid" if s.campus_islanded else
                 f"import limit {format_mw(s.campus_poi_limit_w)}")
        text = (f"headroom {format_mw(s.campus_headroom_w)} for the miners: {limit}, "
                f"generation {format_mw(s.campus_generation_w)}, firm load "
                f"{format_mw(s.campus_firm_load_w)}; {format_mw(s.campus_on_site_w)} of it "
                "on-site supply")
        if s.campus_stale:
            text += f"; at worst case (no fresh reading): {', '.join(s.campus_stale)}"
        return text

    def price_text(self) -> str:
        """The price in force and its parts: "$101.00/MWh = market $93.00 (real-time) + ...".

        A market price beyond the site's `[energy]` bounds is shown as the market set it,
        with the bound the decision planned at: "$9,008.00/MWh = market $9,000.00/MWh
        (real-time; planned at the $5,000 cap) + adders $8.00/MWh".
        """
        s = self.summary
        assert s is not None
        if s.market_price_usd_per_mwh is None:
            return format_price(s.price_usd_per_mwh)
        src = PRICE_SOURCES.get(s.price_source or "", s.price_source or "source unknown")
        adders = (s.adders_usd_per_mwh if s.adders_usd_per_mwh is not None
                  else s.price_usd_per_mwh - s.market_price_usd_per_mwh)
        market = (s.real_market_price_usd_per_mwh if s.real_market_price_usd_per_mwh is not None
                  else s.market_price_usd_per_mwh)
        if s.price_bound is not None:
            src += (f"; planned at the {format_bound(s.market_price_usd_per_mwh)} "
                    f"{s.price_bound}")
        return (f"{format_price(market + adders)} = market {format_price(market)} ({src}) "
                f"+ adders {format_price(adders)}")

    def miners_power_text(self) -> str:
        """Site power against the cap, like with like.

        On a plain site: the site meter against the cap in force. On a campus the site
        meter is the POI's, its net import: the miners' measured share (the POI reading
        less the campus's other parts) against the miners' cap, then the net import
        against the import limit. "2.09 MW / cap 2.09 MW (...)".
        """
        s = self.summary
        assert s is not None
        if s.campus_headroom_w is None:
            return (f"site {format_mw(s.measured_site_power_w)} / cap "
                    f"{format_mw(self.cap_in_force_w())} ({self.cap_why()})")
        return (f"miners {format_mw(s.campus_miners_measured_w)} / miners' cap "
                f"{format_mw(self.cap_in_force_w())} ({self.cap_why()}) | POI net import "
                f"{format_mw(s.measured_site_power_w)} / {self.import_limit_text()}")

    def import_limit_text(self) -> str:
        """The POI's limit in force: "import limit 2.34 MW", or islanded."""
        s = self.summary
        assert s is not None
        if s.campus_islanded:
            return "islanded, no grid"
        return f"import limit {format_mw(s.campus_poi_limit_w)}"

    def hashrate_text(self) -> str:
        """The fleet's hashrate and who reports it, e.g. "12.3 PH/s from 980 reporting ..."."""
        s = self.summary
        assert s is not None
        if s.fleet_hashrate_ths is None:
            return "unknown"
        reporting = sum(n for state, n in s.miners_by_state.items() if state != "offline")
        return (f"{s.fleet_hashrate_ths / 1000:,.1f} PH/s from {reporting:,} reporting miners "
                f"(their power {format_mw(s.fleet_power_w)}, excl. aux)")

    def reasons(self, state: str) -> str:
        """Why the miners in `state` are there: "price 300, grid 160" (most first)."""
        s = self.summary
        assert s is not None
        by = (s.miners_by_state_reason or {}).get(state, {})
        return ", ".join(f"{r} {n:,}" for r, n in sorted(by.items(), key=lambda kv: -kv[1]))

    def breakevens(self) -> str:
        """Each model's break-even all-in price at the decision's hashprice.

        The hashprice is the site's, or its feed's; each figure is named as every view
        names it (`catalogue.breakeven_label`).
        """
        s = self.summary
        if s is None or not self.models:
            return ""
        hp, aux = s.hashprice_usd_per_ph_day, self.aux_fraction
        items = sorted(((k, m.breakeven_usd_per_mwh(hp, aux_fraction=aux))
                        for k, m in self.models.items()), key=lambda kv: kv[1])
        return (f"{breakeven_label(hp, aux)}: "
                + "  ".join(f"{k} ${be:,.0f}/MWh" for k, be in items))

    def warnings(self) -> list[str]:
        """What needs the operator's attention now."""
        out: list[str] = []
        if self.link is not None:
            out.append(f"{self.link}: figures are old")
        if self.controller_online is False:
            out.append("controller OFFLINE (its last will, or a clean stop): figures are old")
        age = self.age_s()
        if age is not None and age > STALE_AFTER_S:
            out.append(f"last decision {format_ago(age)} ago: the controller is not deciding")
        s = self.summary
        if s is not None and s.infeasible:
            out.append("cap cannot be met: miners the controller cannot move exceed it")
        if s is not None and s.grid_event_on_track is False:
            out.append("grid event NOT on track")
        if s is not None and s.measured_site_power_w is None:
            out.append("no fresh site-meter reading: site power unknown")
        return out

    # -- the panel ------------------------------------------------------------------------

    def render(self) -> RenderableType:
        """The view as a rich renderable (a panel), for a terminal or a recorded console."""
        title = f"mineops · site {self.site_id}"
        if self.summary is None:
            body = Text(self.link, style="bold red") if self.link is not None else Text(
                "waiting for the first decision" + (
                    f" on {self.source}" if self.source else "") + " ...")
            return Panel(body, title=title, box=box.ROUNDED)
        s = self.summary
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        clock = self.site_time()
        if self.clock.describe():
            clock += f" ({self.clock.describe()})"
        grid.add_row("site time", clock)
        self._power_rows(grid)
        cap_style = "" if (s.cap_source or "site") == "site" else "bold yellow"
        cap = Text(format_mw(self.cap_in_force_w()), style=cap_style)
        cap.append(f" in force: {self.cap_why()}")
        grid.add_row("cap", cap)
        campus = self.campus_text()
        if campus is not None:
            grid.add_row("campus", campus)
        grid.add_row("price", self.price_text())
        grid.add_row("hashprice", f"${s.hashprice_usd_per_ph_day:,.2f}/PH/day")
        grid.add_row("hashrate", self.hashrate_text())
        if s.frequency_hz is not None:
            grid.add_row("grid", f"{s.frequency_hz:.3f} Hz")

        miners = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        miners.add_column("miners", no_wrap=True)
        miners.add_column("count", justify="right")
        miners.add_column("why: the last decision's reasons (miners)")
        total = sum(s.miners_by_state.values())
        for state in VIEW_STATES:
            n = s.miners_by_state.get(state, 0)
            style = "red" if state in ("error", "offline") and n else ""
            miners.add_row(Text(state, style=style), f"{n:,}", self.reasons(state))
        miners.add_row(Text("total", style="dim"), Text(f"{total:,}", style="dim"), "")

        parts: list[RenderableType] = [grid, Text(""), miners]
        if self.breakevens():
            parts.append(Text(self.breakevens(), style="dim"))
        for w in self.warnings():
            parts.append(Text(f"! {w}", style="bold red"))
        sub = [f"decision #{s.seq}" if s.seq is not None else "decision"]
        if s.trigger:
            sub[0] += f" ({s.trigger})"
        age = self.age_s()
        if age is not None:
            sub.append(f"{format_ago(age)} ago")
        sub.append(f"{s.commands_sent:,} setpoints sent")
        if self.source:
            sub.append(self.source)
        return Panel(Group(*parts), title=title, subtitle=" · ".join(sub),
                     box=box.ROUNDED, expand=False)

    def _power_rows(self, grid: Table) -> None:
        """Site power against its cap; on a campus the miners' and the POI's apart.

        The site meter of a campus is the POI's: the miners' measured share is held
        against the miners' cap, the net import against the import limit.
        """
        s = self.summary
        assert s is not None
        campus = s.campus_headroom_w is not None
        miners_w = s.campus_miners_measured_w if campus else s.measured_site_power_w
        power = Text(f"{format_mw(miners_w)} measured" + (
            " (the POI reading less the campus's other parts)" if campus else ""),
            style="bold red" if _over(miners_w, self.cap_in_force_w()) else "")
        power.append(f", plan {format_mw(s.planned_site_power_w)}, "
                     f"planning under {format_mw(s.cap_w)} (incl. aux)")
        grid.add_row("miners' power" if campus else "site power", power)
        if campus:
            poi = Text(f"{format_mw(s.measured_site_power_w)} net import",
                       style="bold red" if _over(s.measured_site_power_w,
                                                 s.campus_poi_limit_w) else "")
            poi.append(f", {self.import_limit_text()}")
            grid.add_row("POI", poi)

    # -- the line (pipes, logs) ----------------------------------------------------------

    def line(self) -> str:
        """The view in one line, for output that is not a terminal."""
        if self.summary is None:
            return f"{self.site_id}: {self.link or 'waiting for the first decision'}"
        s = self.summary
        states = ", ".join(
            f"{state} {s.miners_by_state.get(state, 0):,}"
            + (f" ({self.reasons(state)})" if self.reasons(state) else "")
            for state in VIEW_STATES)
        hashrate = ("unknown" if s.fleet_hashrate_ths is None
                    else f"{s.fleet_hashrate_ths / 1000:,.1f} PH/s")
        text = (f"{self.site_time()} | {self.miners_power_text()} | price "
                f"{self.price_text()} | {hashrate} | {states}")
        campus = self.campus_text()
        if campus is not None:
            text += f" | campus {campus}"
        warnings = self.warnings()
        if warnings:
            text += " | " + "; ".join(warnings)
        return text

    def change_key(self) -> tuple[object, ...]:
        """What a printed line is judged by: a new line only when this changes.

        Leaves out what moves every decision without meaning a change (the clock, the
        meter's noise, hashrate) and keeps the cap, the price, the grid event, the miners'
        states and reasons, and the warnings.
        """
        s = self.summary
        if s is None:
            return (None, self.link)
        return (round(self.cap_in_force_w()), s.cap_source, s.grid_event_id,
                s.grid_event_on_track, round(s.price_usd_per_mwh, 2), s.price_source,
                s.real_market_price_usd_per_mwh,
                tuple(sorted(s.miners_by_state.items())),
                json.dumps(s.miners_by_state_reason, sort_keys=True),
                tuple(w for w in self.warnings() if not w.startswith("last decision")),
                (self.age_s() or 0.0) > STALE_AFTER_S)

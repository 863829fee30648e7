"""The decision snapshot: one frozen record per decision cycle.

Everything an observer reads of a decision comes from here: the Prometheus collector,
the retained decision topic (`DecisionSummary`) and the live views. Nothing reads the
controller's working state, so what is shown is always one consistent decision.
Arrays are indexed like the fleet (miners) or like `FleetState.groups` (groups) and
must not be written to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from controller.core.campus import CampusPicture
from controller.core.fleet_state import VIEW_STATES, view_counts
from controller.core.prices import PriceInForce
from controller.protocol.payloads import DecisionSummary
from controller.protocol.reasons import REASON_NAMES, Reason

# What set the cap in force: the site's own limit, or a grid obligation of this kind
# ("recovery" is the ramp back up after an obligation ended), or an energy campus's
# headroom at the point of interconnection ("campus"; "islanded": the gensets').
CapSource = Literal["site", "target_kw", "shed_kw", "emergency", "peak", "frequency", "recovery",
                    "campus", "islanded"]


@dataclass(frozen=True, slots=True)
class CapInForce:
    """The site power limit of a decision, incl. auxiliary load, W."""

    site_w: float  # the configured site cap
    in_force_w: float  # the tighter of the site cap and the grid's
    planning_w: float  # what the plan aims under: in force less the noise headroom
    source: CapSource


@dataclass(frozen=True, slots=True)
class GridEventStatus:
    """The grid event in force (one with a power target), as the decision saw it."""

    id: str
    kind: str
    target_w: float  # site power the event asks for, incl. aux
    deadline_unix_s: float  # by when the site must be at or below the target
    on_track: bool  # the plan reaches the target by the deadline
    end_unix_s: float | None = None  # when the event ends (None: not known)


@dataclass(frozen=True, slots=True)
class DecisionSnapshot:
    """One decision and what it saw; see the module docstring."""

    seq: int  # decisions made since start, this one included
    trigger: str  # what asked for it: tick, price, grid, connect, ...
    at_unix_s: float
    duration_s: float  # time to decide and send the commands
    price: PriceInForce
    hashprice_usd_per_ph_day: float
    cap: CapInForce
    grid_event: GridEventStatus | None
    planned_site_power_w: float  # incl. aux
    planned_power_w: npt.NDArray[np.float64]  # (miners,) excl. aux
    reason: npt.NDArray[np.uint8]  # (miners,) Reason code
    view_state: npt.NDArray[np.int8]  # (miners,) index into VIEW_STATES
    measured_site_power_w: float | None  # a fresh site-meter reading, else unknown
    meter_reading_unix_s: float | None  # when that reading was taken
    frequency_hz: float | None
    fleet_power_w: float  # what miners with fresh telemetry report, excl. aux
    fleet_hashrate_ths: float
    group_power_w: npt.NDArray[np.float64]  # (groups,) reported, fresh telemetry only
    group_hashrate_ths: npt.NDArray[np.float64]  # (groups,)
    commands_sent: int
    infeasible: bool  # even the miners the controller cannot move exceed the cap
    campus: CampusPicture | None = None  # the energy campus as the decision saw it

    @property
    def miners_by_state(self) -> dict[str, int]:
        """Miners per operator state (`fleet_state.VIEW_STATES`), every state present."""
        return view_counts(self.view_state)

    @property
    def reason_counts(self) -> npt.NDArray[np.int64]:
        """Miners per Reason code (index = code)."""
        counts: npt.NDArray[np.int64] = np.bincount(self.reason, minlength=len(Reason))
        return counts[: len(Reason)]

    @property
    def miners_by_reason(self) -> dict[str, int]:
        """Miners per reason name, only reasons that some miner has."""
        return {REASON_NAMES[r]: int(c) for r, c in enumerate(self.reason_counts) if c}

    @property
    def miners_by_state_reason(self) -> dict[str, dict[str, int]]:
        """Miners per operator state, then per reason name; only non-zero counts.

        Says why miners are where they are: "sleeping 160: grid 160" during a recovery ramp.
        """
        n_reasons = len(Reason)
        cells = np.bincount(self.view_state.astype(np.intp) * n_reasons + self.reason,
                            minlength=len(VIEW_STATES) * n_reasons)
        out: dict[str, dict[str, int]] = {}
        for s, state in enumerate(VIEW_STATES):
            row = cells[s * n_reasons:(s + 1) * n_reasons]
            if row.any():
                out[state] = {REASON_NAMES[r]: int(c) for r, c in enumerate(row) if c}
        return out

    def summary(self) -> DecisionSummary:
        """The retained decision topic's payload."""
        event = self.grid_event
        return DecisionSummary(
            ts=self.at_unix_s,
            price_usd_per_mwh=self.price.total_usd_per_mwh,
            market_price_usd_per_mwh=self.price.market_usd_per_mwh,
            price_source=self.price.source,
            hashprice_usd_per_ph_day=self.hashprice_usd_per_ph_day,
            cap_w=self.cap.planning_w,
            cap_in_force_w=self.cap.in_force_w,
            cap_source=self.cap.source,
            grid_event_id=None if self.grid_event is None else self.grid_event.id,
            planned_site_power_w=round(self.planned_site_power_w, 1),
            measured_site_power_w=self.measured_site_power_w,
            miners_by_state=self.miners_by_state,
            miners_by_reason=self.miners_by_reason,
            commands_sent=self.commands_sent,
            duration_s=round(self.duration_s, 6),
            seq=self.seq,
            trigger=self.trigger[:32],
            adders_usd_per_mwh=self.price.adders_usd_per_mwh,
            cap_site_w=self.cap.site_w,
            grid_event_kind=None if event is None else event.kind,
            grid_event_target_w=None if event is None else event.target_w,
            grid_event_deadline_ts=None if event is None else event.deadline_unix_s,
            grid_event_end_ts=None if event is None else event.end_unix_s,
            grid_event_on_track=None if event is None else event.on_track,
            fleet_power_w=round(self.fleet_power_w, 1),
            fleet_hashrate_ths=round(self.fleet_hashrate_ths, 3),
            frequency_hz=self.frequency_hz,
            infeasible=self.infeasible,
            miners_by_state_reason=self.miners_by_state_reason,
            price_bound=self.price.bound,
            real_market_price_usd_per_mwh=self.price.real_market_usd_per_mwh,
            **self._campus_summary(),
        )

    def _campus_summary(self) -> dict[str, Any]:
        c = self.campus
        if c is None:
            return {}
        return {"campus_headroom_w": round(c.cap_w, 1), "campus_poi_limit_w": c.poi_limit_w,
                "campus_firm_load_w": round(c.firm_load_w, 1),
                "campus_generation_w": round(c.generation_w, 1),
                "campus_on_site_w": round(c.curve.on_site_w, 1), "campus_islanded": c.islanded,
                "campus_stale": [s[:64] for s in c.stale[:100]],  # the payload's bounds
                "campus_miners_measured_w": self.campus_miners_measured_w}

    @property
    def campus_miners_measured_w(self) -> float | None:
        """On a campus, the miners' measured share of the POI reading, incl. aux, W.

        The POI reading less what the campus's other parts read (`CampusPicture.
        others_measured_w`): what holds against the miners' cap. None without a campus
        or a fresh POI reading.
        """
        if self.campus is None or self.measured_site_power_w is None:
            return None
        return round(self.measured_site_power_w - self.campus.others_measured_w, 1)


"""Fault matrix, time: the controller's wall clock is stepped by an hour mid-event.

Durations run on the monotonic clock. A wall-clock step is detected (logged, counted)
and an event in force stays in force: while a step is unresolved an event is in force
when either the wall clock or the wall clock carried on from before the step (along
the monotonic clock) says so, and it ends when both say so. The controller reads the
wall clock it is given (`Controller(wall_clock=...)`), so the machine's clock is left
alone; the judge keeps real time.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.grid.journal import GridJournal
from controller.grid.obligations import GridObligations, GridRules
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import GridEvent
from simulators.faults import SteppedClock
from tests.test_faults_site import start_fault_site, wait_until

HOUR_S = 3600.0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("step_s", [-HOUR_S, HOUR_S], ids=["back", "forward"])
async def test_an_event_in_force_stays_in_force_across_a_clock_step(
        broker: LocalBroker, tasks: Any, step_s: float) -> None:
    clock = SteppedClock()
    site = await start_fault_site(broker, tasks, controller_kwargs={"wall_clock": clock})
    c = site.controller
    now = time.time()
    ev = GridEvent(id="dr-clock", kind="target_kw",
                   value_kw=round(0.55 * site.site_cap_w / 1000.0, 1),
                   start_ts=now + 4.0, end_ts=now + 16.0, version=1)
    site.hold(ev)
    await site.publish_event(ev)
    await wait_until(ev.met_by_ts + 2.0)
    clock.step(step_s)
    await wait_until(ev.end_ts - 0.5)
    j = site.judge
    assert j.sampled_s(ev.met_by_ts, ev.end_ts) > 10.0
    assert j.over_s(ev.met_by_ts, ev.end_ts) == 0, j.verdict(ev.met_by_ts)
    assert c.grid.clock.steps == 1
    snap = c.snapshot
    assert snap is not None and snap.cap.source == "target_kw"


def obligations(tmp_path: Path, rules: GridRules) -> GridObligations:
    keep = np.zeros(4, dtype=bool)
    return GridObligations(GridJournal(tmp_path / "grid.db"), rules, keep_alive=keep,
                           frequency_shed=~keep, keep_alive_w=0.0)


def test_durations_run_on_the_monotonic_clock(tmp_path: Path) -> None:
    """Energy curtailed and the recovery ramp do not jump with the wall clock."""
    g = obligations(tmp_path, GridRules(prepare_s=0.0, recovery_w_per_s=100.0,
                                        record_interval_s=1.0))
    ev = GridEvent(id="e", kind="target_kw", value_kw=50.0, start_ts=1000.0, end_ts=1100.0)
    g.accept(ev, 900.0, now_mono=0.0)
    g.obligation(1000.0, 80_000.0, 1e6, now_mono=100.0)
    g.obligation(1010.0, 50_000.0, 1e6, now_mono=110.0)
    # The wall clock steps back an hour; ten real seconds pass.
    g.obligation(1020.0 - HOUR_S, 50_000.0, 1e6, now_mono=120.0)
    row = g.rows["e"]
    # 30 kW curtailed for 20 s, not an hour's worth.
    assert row.curtailed_wh == pytest.approx(30_000 * 20 / 3600, rel=1e-6)
    # Real time (the wall clock carried on from before the step) ends it 80 s later ...
    assert g.obligation(1100.0 - HOUR_S, 50_000.0, 1e6, now_mono=199.0).cap_w == 50_000.0
    # ... and the cap comes back at the recovery ramp, on real seconds.
    assert g.obligation(1101.0 - HOUR_S, 50_000.0, 1e6, now_mono=201.0).cap_w == \
        pytest.approx(50_000.0)
    assert g.obligation(1111.0 - HOUR_S, 50_000.0, 1e6, now_mono=211.0).cap_w == \
        pytest.approx(51_000.0)
    # The stepped wall clock may be the right one: when it reaches the event, it is in
    # force again, and only when both clocks are past its end is it over.
    assert g.obligation(1050.0, 50_000.0, 1e6, now_mono=3750.0).cap_w == 50_000.0
    assert g.rows["e"].status == "active"
    g.obligation(1100.0, 50_000.0, 1e6, now_mono=3800.0)
    assert "e" not in g.rows
    assert [r.status for r in g.journal.rows()] == ["completed"]

def test_a_forward_step_does_not_end_an_event_early(tmp_path: Path) -> None:
    g = obligations(tmp_path, GridRules(prepare_s=0.0, recovery_w_per_s=100.0))
    ev = GridEvent(id="e", kind="target_kw", value_kw=50.0, start_ts=1000.0, end_ts=1100.0)
    g.accept(ev, 900.0, now_mono=0.0)
    assert g.obligation(1000.0, 80_000.0, 1e6, now_mono=100.0).cap_w == 50_000.0
    assert g.obligation(1010.0 + HOUR_S, 50_000.0, 1e6, now_mono=110.0).cap_w == 50_000.0
    assert g.clock.steps == 1
    assert g.rows["e"].status == "active"


def test_after_a_step_events_are_in_force_by_either_clock_until_they_agree(
        tmp_path: Path) -> None:
    """Nothing in force at the step: a later event is still never missed by either clock."""
    g = obligations(tmp_path, GridRules(prepare_s=10.0, recovery_w_per_s=1e9))
    t0 = 1_724_191_200.0
    g.obligation(t0, 80_000.0, 1e6, now_mono=0.0)
    g.obligation(t0 + HOUR_S + 1, 80_000.0, 1e6, now_mono=1.0)  # an hour forward
    assert g.clock.steps == 1 and g.clock.offset_s == pytest.approx(HOUR_S)
    # Sent for real time t0 + 60 (the clock before the step carried on is right) ...
    ev = GridEvent(id="e", kind="target_kw", value_kw=50.0, start_ts=t0 + 60, end_ts=t0 + 120)
    g.accept(ev, t0 + HOUR_S + 2, now_mono=2.0)
    assert g.rows["e"].status == "scheduled", "not over by the clock before the step"
    assert math.isinf(g.obligation(t0 + HOUR_S + 3, 80_000.0, 1e6, now_mono=3.0).cap_w)
    assert g.obligation(t0 + HOUR_S + 51, 80_000.0, 1e6, now_mono=51.0).cap_w == 50_000.0
    g.obligation(t0 + HOUR_S + 121, 80_000.0, 1e6, now_mono=121.0)
    assert "e" not in g.rows
    # The clock is put right: the two agree, the step is over.
    g.obligation(t0 + 122, 80_000.0, 1e6, now_mono=122.0)
    assert g.clock.offset_s == 0.0 and g.clock.steps == 2

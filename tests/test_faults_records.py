"""Fault matrix, the rules underneath: versions, the obey-first journal, truthful records.

Unit tests of `GridObligations` and `GridJournal` on a real SQLite file, with times
passed in: an older, unversioned or conflicting copy of an event is refused and counted,
a cancelled event stays cancelled, what the disk refuses is held and written later in
order, and every number in a record comes from a meter reading.
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.daemon.loop import Controller
from controller.grid.journal import GridJournal, JournalError, journal_problem
from controller.grid.obligations import GridObligations, GridRules
from controller.protocol.payloads import GridEvent, PayloadError
from simulators.faults import refuse_writes
from tests.conftest import make_site

RULES = GridRules(prepare_s=10.0, recovery_w_per_s=100.0, record_interval_s=1.0)


def obligations(path: Path, rules: GridRules = RULES) -> GridObligations:
    keep = np.zeros(4, dtype=bool)
    return GridObligations(GridJournal(path), rules, keep_alive=keep, frequency_shed=~keep,
                           keep_alive_w=0.0)


def event(**kw: Any) -> GridEvent:
    base: dict[str, Any] = {"id": "dr", "kind": "target_kw", "value_kw": 50.0,
                            "start_ts": 1000.0, "end_ts": 2000.0}
    return GridEvent(**{**base, **kw})


def refused(g: GridObligations, ev: GridEvent, now_ts: float = 950.0) -> str:
    with pytest.raises(PayloadError) as e:
        g.accept(ev, now_ts)
    return e.value.reason


# -- versions ------------------------------------------------------------------------------


def test_an_older_version_never_replaces_a_newer_one(tmp_path: Path) -> None:
    g = obligations(tmp_path / "grid.db")
    assert g.accept(event(version=1), 900.0)
    assert g.accept(event(version=3, value_kw=30.0), 910.0)
    assert refused(g, event(version=2, value_kw=40.0)) == "stale_version"
    assert refused(g, event(version=1)) == "stale_version"
    assert g.rows["dr"].payload["value_kw"] == 30.0
    assert not g.accept(event(version=3, value_kw=30.0), 920.0), "the same copy again"
    assert refused(g, event(version=3, value_kw=99.0)) == "conflicting_version"
    assert refused(g, event(value_kw=10.0)) == "unversioned_after_versioned"
    assert g.obligation(995.0, 80_000.0, 1e6).cap_w == 30_000.0


def test_versions_are_durable_across_a_restart(tmp_path: Path) -> None:
    g = obligations(tmp_path / "grid.db")
    g.accept(event(version=5, value_kw=20.0), 900.0)
    g.journal.close()
    again = obligations(tmp_path / "grid.db")
    assert again.rows["dr"].version == 5
    assert refused(again, event(version=4, value_kw=60.0)) == "stale_version"
    assert again.obligation(995.0, 80_000.0, 1e6).cap_w == 20_000.0


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
def test_a_cancelled_event_stays_cancelled(tmp_path: Path, versioned: bool) -> None:
    v = (lambda n: n) if versioned else (lambda n: None)
    g = obligations(tmp_path / "grid.db")
    g.accept(event(version=v(1)), 900.0)
    g.accept(event(version=v(2), cancelled=True), 910.0)
    assert refused(g, event(version=v(1))) in ("event_cancelled", "stale_version")
    assert refused(g, event(version=v(2), value_kw=10.0)) in ("event_cancelled",
                                                             "conflicting_version")
    assert "dr" not in g.rows and g.journal.rows()[0].status == "cancelled"
    if versioned:  # only a newer version reinstates it
        assert g.accept(event(version=3, value_kw=45.0), 920.0)
        assert g.obligation(995.0, 80_000.0, 1e6).cap_w == 45_000.0
    else:
        assert refused(g, event(value_kw=45.0)) == "event_cancelled"
        assert math.isinf(g.obligation(995.0, 80_000.0, 1e6).cap_w)


def test_a_versioned_copy_supersedes_an_unversioned_event(tmp_path: Path) -> None:
    g = obligations(tmp_path / "grid.db")
    g.accept(event(), 900.0)
    assert g.accept(event(value_kw=40.0), 905.0), "unversioned updates as before"
    assert g.accept(event(version=1, value_kw=35.0), 910.0)
    assert g.rows["dr"].payload["value_kw"] == 35.0


def test_refused_copies_are_counted_by_the_controller(tmp_path: Path) -> None:
    cfg = make_site(_Address(), [("a", "s21", 4)],  # type: ignore[arg-type]
                    grid={"journal_path": str(tmp_path / "grid.db")})
    c = Controller(cfg)
    now = time.time()
    ev = event(start_ts=now + 60, end_ts=now + 600)
    c.on_message(c.topics.grid, ev.model_copy(update={"version": 7}).encode())
    c.on_message(c.topics.grid, ev.model_copy(update={"version": 6, "value_kw": 80.0}).encode())
    assert c.ingest.invalid[("grid", "stale_version")] == 1
    assert c.grid.rows["dr"].payload["value_kw"] == 50.0


class _Address:
    host = "127.0.0.1"
    port = 1


# -- the journal: obey first, record after --------------------------------------------------


def test_what_the_disk_refuses_is_obeyed_held_and_written_in_order(tmp_path: Path) -> None:
    path = tmp_path / "grid.db"
    g = obligations(path)
    refuse_writes(g.journal._db)
    assert g.accept(event(version=1), 900.0)
    assert g.accept(event(id="other", version=1, value_kw=70.0), 901.0)
    assert g.obligation(995.0, 80_000.0, 1e6).cap_w == 50_000.0, "obeyed from memory"
    g.obligation(1000.0, 49_000.0, 1e6)
    g.obligation(1001.0, 48_000.0, 1e6)
    assert g.journal.pending >= 4 and g.journal.write_errors > 0
    assert g.journal.last_error is not None and "readonly" in g.journal.last_error
    outside = sqlite3.connect(path)
    assert outside.execute("SELECT count(*) FROM events").fetchone() == (0,)
    assert {r.id for r in g.journal.rows()} == {"dr", "other"}, "readers see what is held"
    refuse_writes(g.journal._db, refuse=False)
    g.obligation(1002.0, 48_000.0, 1e6)
    assert g.journal.pending == 0 and g.journal.last_error is None
    rows = dict(outside.execute("SELECT id, status FROM events").fetchall())
    assert rows == {"dr": "active", "other": "active"}
    samples = outside.execute("SELECT ts, meter_w FROM samples WHERE event_id = 'dr' "
                              "ORDER BY rowid").fetchall()
    assert [ts for ts, _ in samples] == sorted(ts for ts, _ in samples)
    assert [m for _, m in samples] == [80_000.0, 49_000.0, 48_000.0, 48_000.0]


def test_an_old_journal_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE events (id TEXT PRIMARY KEY, kind TEXT NOT NULL, payload TEXT NOT NULL,
            received_ts REAL NOT NULL, status TEXT NOT NULL, baseline_w REAL, target_w REAL,
            reached_ts REAL, curtailed_wh REAL NOT NULL DEFAULT 0,
            violations INTEGER NOT NULL DEFAULT 0,
            samples_after_deadline INTEGER NOT NULL DEFAULT 0, updated_ts REAL NOT NULL);
        INSERT INTO events VALUES ('old', 'target_kw',
            '{"end_ts": 2000, "id": "old", "kind": "target_kw", "start_ts": 1000,
              "value_kw": 5}', 900, 'completed', 1000, 5000, NULL, 1.5, 0, 3, 2000);
    """)
    db.commit()
    db.close()
    (row,) = GridJournal(path).rows()
    assert (row.id, row.version, row.samples_without_meter, row.complied) == ("old", None, 0,
                                                                             True)


def test_journal_problems_are_found_without_changing_anything(tmp_path: Path) -> None:
    assert journal_problem(tmp_path / "missing.db") is None
    assert not (tmp_path / "missing.db").exists()
    good = tmp_path / "good.db"
    GridJournal(good).close()
    assert journal_problem(good) is None
    junk = tmp_path / "junk.db"
    junk.write_text("site_id = 'x'\n" * 100)
    why = journal_problem(junk)
    assert why is not None and "not a database" in why and str(junk) in why
    other = tmp_path / "other.db"
    sqlite3.connect(other).executescript("CREATE TABLE prices (ts REAL); INSERT INTO prices "
                                         "VALUES (1);")
    why = journal_problem(other)
    assert why is not None and "not a grid journal" in why
    with pytest.raises(JournalError, match="not a database"):
        GridJournal(junk)


# -- truthful records ------------------------------------------------------------------------


def test_records_come_from_meter_readings_only(tmp_path: Path) -> None:
    g = obligations(tmp_path / "grid.db", GridRules(prepare_s=10.0, record_interval_s=1.0))
    g.accept(event(kind="shed_kw", value_kw=30.0), 900.0)
    # Takes effect without a reading: no baseline; the target from the least the site
    # could draw (here 60 kW), the worst case for the grid, never the site cap.
    ob = g.obligation(990.0, None, 1e6, least_w=60_000.0)
    row = g.rows["dr"]
    assert row.baseline_w is None and row.target_basis_w == 60_000.0
    assert ob.cap_w == 30_000.0
    g.obligation(1000.0, None, 1e6)
    g.obligation(1001.0, None, 1e6)
    assert row.samples_without_meter == 2 and row.samples_after_deadline == 0
    assert row.reached_ts is None and row.complied is None
    # A reading taken at 1001.5 and seen at 1002: reached then, sampled once, at its time.
    g.obligation(1002.0, 29_000.0, 1e6, now_mono=1002.0, meter_at=1001.5)
    g.obligation(1003.5, 29_000.0, 1e6, now_mono=1003.5, meter_at=1001.5)
    assert row.reached_ts == 1001.5
    assert row.samples_after_deadline == 1 and row.violations == 0
    g.obligation(1004.0, 35_000.0, 1e6, now_mono=1004.0, meter_at=1004.0)
    assert row.samples_after_deadline == 2 and row.violations == 1
    samples = g.journal.samples("dr")
    assert [(ts, m) for ts, m, _, _ in samples][-4:] == [
        (1000.0, None), (1001.0, None), (1001.5, 29_000.0), (1004.0, 35_000.0)]
    assert row.curtailed_wh == 0.0, "no baseline was measured: nothing curtailed is claimed"


# -- the closed loop's rules ---------------------------------------------------------------


def view(*, most_w: float = 0.0, over_plan_w: float = 0.0) -> Any:
    from controller.daemon.closed_loop import TelemetryView  # noqa: PLC0415

    return TelemetryView(most_w=most_w, least_w=0.0, over_plan_w=over_plan_w, power_unknown=0,
                         temperature_unknown=0)


def test_the_guard_resends_at_once_but_sheds_more_only_once_settled() -> None:
    from controller.daemon.closed_loop import MeterGuard  # noqa: PLC0415

    g = MeterGuard(confirm_s=1.0, settle_s=10.0, noise_fraction=0.005, release_w_per_s=100.0)
    cap, planning = 100_000.0, 99_000.0
    # The miners report 95 kW and the meter agrees with the plan: nothing to trim.
    s = g.observe(0.0, meter_w=99_000.0, meter_seen=True, telemetry=view(most_w=99_000.0),
                  cap_in_force_w=cap, planning_w=planning)
    assert s.trim_w == 0.0 and not s.resend
    # The cap drops to 60 kW: the site is over it while miners stop. Re-sent after 1 s,
    # but nothing more is shed inside the 10 s the fleet takes to settle.
    for t in (1.0, 1.5, 2.0, 3.0):
        s = g.observe(t, meter_w=99_000.0, meter_seen=True, telemetry=view(most_w=99_000.0),
                      cap_in_force_w=60_000.0, planning_w=59_400.0)
    assert s.over_cap and g.resends == 2 and s.trim_w == 0.0
    # Still 20 kW over when settled (firmware that ignores): shed the excess.
    s = g.observe(12.0, meter_w=80_000.0, meter_seen=True, telemetry=view(most_w=80_000.0),
                  cap_in_force_w=60_000.0, planning_w=59_400.0)
    s = g.observe(13.0, meter_w=80_000.0, meter_seen=True, telemetry=view(most_w=80_000.0),
                  cap_in_force_w=60_000.0, planning_w=59_400.0)
    assert s.resend and s.trim_w == pytest.approx(20_600.0)
    # Under the cap again: that part decays at the release rate (100 W/s) ...
    s = g.observe(23.0, meter_w=59_000.0, meter_seen=True, telemetry=view(most_w=59_000.0),
                  cap_in_force_w=60_000.0, planning_w=59_400.0)
    assert s.trim_w == pytest.approx(20_600.0 - 1000.0)
    # ... never below what the telemetry shows the plan missing (miners above their plan).
    for t in range(24, 400):
        s = g.observe(float(t), meter_w=59_000.0, meter_seen=True,
                      telemetry=view(most_w=59_000.0, over_plan_w=15_000.0),
                      cap_in_force_w=60_000.0, planning_w=59_400.0)
    assert s.trim_w == pytest.approx(15_000.0)


def test_the_guard_trims_load_beyond_the_miners_and_without_a_meter_keeps_the_worst_case(
        ) -> None:
    from controller.daemon.closed_loop import MeterGuard  # noqa: PLC0415

    g = MeterGuard(confirm_s=1.0, settle_s=10.0, noise_fraction=0.005, release_w_per_s=100.0)
    # Cooling draws 4 kW more than aux_fraction says: the meter shows it, steadily.
    for t in (0.0, 0.5, 1.0, 1.5):
        s = g.observe(t, meter_w=94_000.0, meter_seen=True, telemetry=view(most_w=90_000.0),
                      cap_in_force_w=100_000.0, planning_w=99_000.0)
    assert s.trim_w == pytest.approx(4_000.0)
    # A transient (miners waking between two telemetry messages) shorter than confirm_s
    # does not count: the trim is the least over the window.
    s = g.observe(2.0, meter_w=99_000.0, meter_seen=True, telemetry=view(most_w=90_000.0),
                  cap_in_force_w=100_000.0, planning_w=99_000.0)
    assert s.trim_w == pytest.approx(4_000.0)
    # The meter goes silent: its last view of the extra load is kept; the site power is
    # the telemetry's worst case (unknown at maximum).
    s = g.observe(3.0, meter_w=None, meter_seen=True, telemetry=view(most_w=101_000.0),
                  cap_in_force_w=100_000.0, planning_w=99_000.0)
    assert s.meter == "stale" and s.site_w == 101_000.0 and s.over_cap
    assert s.trim_w == pytest.approx(4_000.0)

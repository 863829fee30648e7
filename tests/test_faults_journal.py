"""Fault matrix, the journal: obey first, record after.

A grid event is obeyed even when its journal cannot be written: it is held in memory,
retried, and counted (`mineops_grid_journal_pending_records`) until it is durable.
Journal I/O never fails a decision. A journal that cannot be used at start is a
one-line start-up error (exit 2) and a `check-config` error, not a traceback.
The disk faults are real SQLite limits on the controller's own connection: writes
refused (a disk remounted read-only, or one without a block for the write-ahead log),
or a database that may not grow by a page (a full disk); nothing in the controller is
patched.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controller.grid.journal import GridJournal
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import GridEvent
from simulators.faults import fill_disk, refuse_writes
from tests.conftest import make_site, wait_for
from tests.test_faults_site import FaultSite, fault_cfg, start_fault_site, wait_until
from tests.test_grid import toml_of

ROOT = Path(__file__).resolve().parents[1]


def event(site: FaultSite, event_id: str, *, start_in_s: float = 5.0,
          duration_s: float = 15.0) -> GridEvent:
    now = time.time()
    return GridEvent(id=event_id, kind="target_kw",
                     value_kw=round(0.55 * site.site_cap_w / 1000.0, 1),
                     start_ts=now + start_in_s, end_ts=now + start_in_s + duration_s,
                     version=1)


def on_disk(site: FaultSite) -> dict[str, Any]:
    """What another process finds in the journal file now."""
    db = sqlite3.connect(site.cfg.grid.journal_path)
    try:
        return {r[0]: r[1:] for r in db.execute("SELECT id, status, payload FROM events")}
    finally:
        db.close()


def connection(site: FaultSite) -> sqlite3.Connection:
    """The controller's own connection to its journal (its disk is what fills)."""
    db: sqlite3.Connection = site.controller.grid.journal._db
    return db


@pytest.mark.integration
async def test_an_event_is_obeyed_while_the_disk_is_full_and_recorded_once_it_frees(
        broker: LocalBroker, tasks: Any) -> None:
    site = await start_fault_site(broker, tasks)
    c = site.controller
    refuse_writes(connection(site))
    ev = event(site, "dr-full")
    site.hold(ev)
    await site.publish_event(ev)
    await wait_for(lambda: "dr-full" in c.grid.rows, what="the event taken in")
    assert "dr-full" not in on_disk(site), "the disk is full: nothing can be on it yet"
    assert c.grid.journal.pending > 0
    await wait_until(ev.met_by_ts + 4.0)
    j = site.judge
    assert j.over_s(ev.met_by_ts, ev.met_by_ts + 4.0) == 0, j.verdict(ev.met_by_ts)
    refuse_writes(connection(site), refuse=False)
    await wait_for(lambda: c.grid.journal.pending == 0, timeout_s=10, what="durable again")
    status, _ = on_disk(site)["dr-full"]
    assert status == "active"
    assert c.ingest.invalid[("grid", "internal_error")] == 0


@pytest.mark.integration
@pytest.mark.slow
async def test_a_disk_filling_during_an_event_fails_no_decision(broker: LocalBroker,
                                                                 tasks: Any) -> None:
    # Ten decisions a second, a sample at each: the full disk is reached within seconds.
    site = await start_fault_site(broker, tasks, fault_cfg(
        broker, policy={"decision_interval_s": 0.1},
        grid={"record_interval_s": 0.05, "prepare_s": 2.0}))
    c = site.controller
    ev = event(site, "dr-fill", start_in_s=3.0, duration_s=90.0)
    site.hold(ev)
    await site.publish_event(ev)
    await wait_until(ev.met_by_ts)
    assert "dr-fill" in on_disk(site)
    fill_disk(connection(site))
    # Samples (every 0.2 s) soon need a page the disk no longer has.
    await wait_for(lambda: c.grid.journal.write_errors > 0, timeout_s=60,
                   what="the first write the full disk refuses")
    assert c.snapshot is not None
    seq = c.snapshot.seq
    await asyncio.sleep(5.0)
    # A decision every 0.1 s (and on triggers): none of them may fail on the journal.
    assert c.snapshot.seq >= seq + 25, "decisions stopped while the journal could not be written"
    assert c.decision_failures == 0
    j = site.judge
    assert j.over_s(ev.met_by_ts, ev.met_by_ts + 5.0) == 0, j.verdict(ev.met_by_ts)
    assert c.grid.journal.pending > 0
    fill_disk(connection(site), full=False)
    await wait_for(lambda: c.grid.journal.pending == 0, timeout_s=10, what="durable again")


# -- at start ----------------------------------------------------------------------------


class _Address:
    host = "127.0.0.1"
    port = 1


def site_with_journal(tmp_path: Path, journal: Path) -> Path:
    cfg = make_site(_Address(), [("a", "s21", 4)], power_cap_kw=50,  # type: ignore[arg-type]
                    grid={"journal_path": str(journal)})
    path = tmp_path / "site.toml"
    path.write_text(toml_of(cfg.model_dump(mode="json", exclude_none=True)))
    return path


def mineops(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, check=False, timeout=60)


def not_a_database(path: Path) -> None:
    path.write_text("[grid]\njournal_path = 'oops, the site file'\n")


def truncated(path: Path) -> None:
    journal = GridJournal(path)
    journal.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] + b"\0" * 100)


def immutable(path: Path) -> None:
    journal = GridJournal(path)
    journal.close()
    if os.geteuid() != 0:
        path.chmod(0o444)
        return
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"chattr +i not possible here: {made.stderr.decode().strip()}")


@pytest.mark.parametrize("spoil", [not_a_database, truncated, immutable],
                         ids=["not-a-database", "truncated", "read-only"])
def test_an_unusable_journal_is_a_clear_start_error_and_a_check_config_error(
        tmp_path: Path, spoil: Any) -> None:
    journal = tmp_path / "grid.db"
    spoil(journal)
    try:
        site = site_with_journal(tmp_path, journal)
        checked = mineops("check-config", str(site))
        assert checked.returncode == 2, checked.stdout + checked.stderr
        assert "grid.journal_path" in checked.stderr and "Traceback" not in checked.stderr
        started = time.monotonic()
        ran = mineops("run", "--config", str(site))
        assert ran.returncode == 2, ran.stderr[-2000:]
        assert "Traceback" not in ran.stderr, ran.stderr[-2000:]
        lines = [line for line in ran.stderr.splitlines() if line.startswith("mineops:")]
        assert lines and "grid.journal_path" in lines[0], ran.stderr[-2000:]
        assert time.monotonic() - started < 30
    finally:
        if spoil is immutable and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(journal)], check=False)

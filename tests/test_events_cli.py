"""`mineops events`: standing of each event, ISO 8601 times, the empty journal, send's notice.

Journals are written by the controller's own GridObligations (a real SQLite journal), then
read by the CLI as an operator would run it.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.cli.main import main
from controller.grid.journal import GridJournal
from controller.grid.obligations import GridObligations, GridRules
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import GridEvent
from controller.protocol.topics import SiteTopics
from tests.conftest import Peer, make_site, wait_for
from tests.test_grid import toml_of

ROOT = Path(__file__).resolve().parents[1]
# 2024-08-20 22:00 UTC = 17:00 CDT
T0 = 1_724_191_200.0
RULES = GridRules(prepare_s=10.0, recovery_w_per_s=1e9, record_interval_s=0.0)
CAP_W = 100_000.0


class _Address:
    host = "127.0.0.1"
    port = 1


def site_file(tmp_path: Path, journal: Path) -> Path:
    cfg = make_site(_Address(), [("a", "s21", 4)], power_cap_kw=50,  # type: ignore[arg-type]
                    grid={"journal_path": str(journal)})
    path = tmp_path / "site.toml"
    path.write_text(toml_of(cfg.model_dump(mode="json", exclude_none=True)))
    return path


def obligations(journal: Path) -> GridObligations:
    keep = np.zeros(4, dtype=bool)
    return GridObligations(GridJournal(journal), RULES, keep_alive=keep, frequency_shed=~keep,
                           keep_alive_w=0.0)


def run_event(g: GridObligations, ev: GridEvent, *, received: float, meter_w: float,
              until: float, step: float = 10.0) -> None:
    """Journal `ev` at `received`, then decide every `step` s until `until` at `meter_w`."""
    g.accept(ev, received)
    t = received
    while t <= until:
        g.obligation(t, meter_w, CAP_W)
        t += step


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["events", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def export_csv(capsys: pytest.CaptureFixture[str], site: Path, *extra: str
               ) -> dict[str, dict[str, str]]:
    code, out, err = cli(capsys, "export", "--config", str(site), *extra)
    assert code == 0, err
    return {r["id"]: r for r in csv.DictReader(io.StringIO(out))}


def event(event_id: str, start: float, end: float, value_kw: float = 50.0) -> GridEvent:
    return GridEvent(id=event_id, kind="target_kw", value_kw=value_kw, start_ts=start,
                     end_ts=end)


def test_export_and_list_before_the_first_event(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "state" / "grid.db"
    site = site_file(tmp_path, journal)
    code, out, err = cli(capsys, "export", "--config", str(site))
    assert (code, err) == (0, "")
    assert out.splitlines() == [",".join(
        ["id", "kind", "status", "compliance", "source", "received", "start", "end", "deadline",
         "notice_s", "value_kw", "baseline_kw", "target_kw", "reached", "time_to_target_s",
         "curtailed_kwh", "samples_after_deadline", "violations", "complied"])]
    code, out, _ = cli(capsys, "export", "--config", str(site), "--format", "json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = cli(capsys, "list", "--config", str(site))
    assert code == 0 and out == "no grid events\n"
    assert not journal.exists(), "reading must not create the controller's journal"


def test_standing_of_each_event(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "grid.db"
    g = obligations(journal)
    # Met: 30 minutes' notice, meter under the 50 kW target throughout.
    run_event(g, event("met", T0 + 1800, T0 + 3600), received=T0, meter_w=40_000.0,
              until=T0 + 3700)
    # Violated: meter over the target after the deadline.
    run_event(g, event("missed", T0 + 5400, T0 + 7200), received=T0 + 3700,
              meter_w=60_000.0, until=T0 + 7300)
    # Sent "starting now": it reached the controller 30 s after its own deadline.
    run_event(g, event("late", T0 + 8000, T0 + 9000), received=T0 + 8030, meter_w=60_000.0,
              until=T0 + 9100)
    cancelled = event("called-off", T0 + 10_000, T0 + 11_000)
    g.accept(cancelled, T0 + 9200)
    g.accept(cancelled.model_copy(update={"cancelled": True}), T0 + 9300)
    g.journal.close()
    rows = export_csv(capsys, site_file(tmp_path, journal))
    assert rows["met"]["compliance"] == "complied" and rows["met"]["complied"] == "True"
    assert rows["met"]["notice_s"] == "1800.0"
    assert rows["missed"]["complied"] == "False"
    assert rows["missed"]["compliance"].startswith("violated: ")
    assert rows["missed"]["compliance"].endswith(" samples over the target")
    late = rows["late"]
    assert late["compliance"] == "deadline past at arrival by 30 s: not judged"
    assert late["complied"] == "", "not a violation of the site"
    assert late["notice_s"] == "-30.0"
    assert int(late["violations"]) > 0, "the raw tallies stay in the record"
    assert rows["called-off"]["compliance"] == "cancelled"
    assert rows["called-off"]["complied"] == ""


def test_running_event_is_in_progress_not_failed(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "grid.db"
    g = obligations(journal)
    now = time.time()
    # Still above the target after the deadline: judged at the end, not while it runs.
    run_event(g, event("running", now - 300, now + 3600), received=now - 900,
              meter_w=60_000.0, until=now)
    run_event(g, event("later", now + 3600, now + 7200), received=now - 10, meter_w=40_000.0,
              until=now)
    g.journal.close()
    site = site_file(tmp_path, journal)
    rows = export_csv(capsys, site)
    assert rows["running"]["status"] == "active"
    assert rows["running"]["compliance"] == "in progress"
    assert rows["running"]["complied"] == ""
    assert int(rows["running"]["violations"]) > 0
    assert rows["later"]["compliance"] == "scheduled"
    code, out, _ = cli(capsys, "list", "--config", str(site))
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["running"].endswith(": in progress")
    assert "complied False" not in out
    assert "target 50 kW" in lines["running"]


def test_times_are_iso_8601_with_their_offset(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "grid.db"
    g = obligations(journal)
    run_event(g, event("dr-1", T0 + 1800, T0 + 3600), received=T0, meter_w=40_000.0,
              until=T0 + 3700)
    g.journal.close()
    site = site_file(tmp_path, journal)
    utc = export_csv(capsys, site)["dr-1"]
    assert utc["received"] == "2024-08-20T22:00:00+00:00"
    assert utc["start"] == "2024-08-20T22:30:00+00:00"
    assert utc["deadline"] == utc["start"]
    assert utc["end"] == "2024-08-20T23:00:00+00:00"
    assert datetime.fromisoformat(utc["reached"]).timestamp() == pytest.approx(T0 + 1800 - 10)
    local = export_csv(capsys, site, "--timezone", "America/Chicago")["dr-1"]
    assert local["start"] == "2024-08-20T17:30:00-05:00"
    for field in ("received", "start", "end", "deadline", "reached"):
        parsed = datetime.fromisoformat(local[field])
        assert parsed.tzinfo is not None, f"{field} has no zone"
        assert parsed == datetime.fromisoformat(utc[field])
    code, out, _ = cli(capsys, "export", "--config", str(site), "--format", "json",
                       "--samples")
    (rec,) = json.loads(out)
    assert rec["start"] == "2024-08-20T22:30:00+00:00"
    first = rec["samples"][0]
    assert set(first) == {"time", "meter_kw", "target_kw"}
    assert datetime.fromisoformat(first["time"]).tzinfo == UTC
    assert first["meter_kw"] == 40.0 and first["target_kw"] == 50.0
    code, _, err = cli(capsys, "export", "--config", str(site), "--timezone", "Mars/Olympus")
    assert code == 2 and "unknown time zone 'Mars/Olympus'" in err


def test_export_progress_on_stderr_only_when_asked(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "grid.db"
    g = obligations(journal)
    for i in range(3):
        run_event(g, event(f"e{i}", T0 + 1800 * (i + 1), T0 + 1800 * (i + 1) + 600),
                  received=T0, meter_w=40_000.0, until=T0 + 1800 * (i + 1) + 700, step=60.0)
    g.journal.close()
    site = site_file(tmp_path, journal)
    code, out, err = cli(capsys, "export", "--config", str(site), "--progress", "on")
    assert code == 0 and "3/3" in err and "export" in err
    assert len(list(csv.DictReader(io.StringIO(out)))) == 3, "the bar is not in the export"
    code, out, err = cli(capsys, "export", "--config", str(site))
    assert code == 0 and err == "", "no bar when stderr is not a terminal"


@pytest.mark.integration
async def test_send_gives_notice_by_default(broker: LocalBroker, tasks: Any,
                                            tmp_path: Path) -> None:
    cfg = make_site(broker, [("a", "s21", 4)], power_cap_kw=50,
                    grid={"journal_path": str(tmp_path / "grid.db"), "prepare_s": 30.0})
    site = tmp_path / "site.toml"
    site.write_text(toml_of(cfg.model_dump(mode="json", exclude_none=True)))
    peer = Peer(cfg, [SiteTopics(cfg.site_id).grid])
    tasks(peer.run())
    await wait_for(peer.transport.connected.is_set, what="peer up")

    def send(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "controller.cli", "events", "send",
                               "--config", str(site), "--value-kw", "5", *args],
                              capture_output=True, text=True, cwd=ROOT, check=False,
                              timeout=60)

    before = time.time()
    r = await asyncio.to_thread(send, "--id", "drill-1")
    assert r.returncode == 0, r.stderr
    sent = GridEvent.model_validate_json(r.stdout)
    # Five minutes' notice: the deadline (the start) is not already past on arrival.
    assert 300.0 <= sent.start_ts - before <= 300.0 + 30.0
    assert sent.end_ts - sent.start_ts == pytest.approx(3600.0)
    assert "sent drill-1" in r.stderr and "+00:00" in r.stderr
    await wait_for(lambda: any(GridEvent.model_validate_json(raw).id == "drill-1"
                               for _, raw in peer.received), what="event on the grid topic")
    r = await asyncio.to_thread(send, "--id", "now", "--start-in", "0")
    assert r.returncode == 0
    assert "deadline is already past when the event arrives" in r.stderr
    r = await asyncio.to_thread(send, "--id", "short", "--start-in", "10")
    assert "less than grid.prepare_s (30 s)" in r.stderr

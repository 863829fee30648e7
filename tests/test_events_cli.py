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

from controller.cli.events import iso
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
         "curtailed_kwh", "samples_after_deadline", "samples_without_meter", "violations",
         "complied"])]
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
    # The standing is said once: not "scheduled ... : scheduled".
    assert lines["later"].split()[2] == "scheduled" and lines["later"].count("scheduled") == 1
    assert lines["later"].endswith(f"to {iso(now + 7200)}")


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
    await wait_for(lambda: any(GridEvent.model_validate_json(raw).id == "drill-1"
                               for _, raw in peer.received), what="event on the grid topic")
    sent = GridEvent.model_validate_json(peer.received[-1][1])
    # Five minutes' notice: the deadline (the start) is not already past on arrival.
    assert 300.0 <= sent.start_ts - before <= 300.0 + 30.0
    assert sent.end_ts - sent.start_ts == pytest.approx(3600.0)
    # One readable line: the terms in kW and MW, ISO times, no raw JSON.
    (line,) = r.stdout.splitlines()
    assert line == (f"sent drill-1: power target 5 kW (0.005 MW) from {iso(sent.start_ts)} to "
                    f"{iso(sent.end_ts)} (on mineops/test/signal/grid, version {sent.version})")
    r = await asyncio.to_thread(send, "--id", "now", "--start-in", "0")
    assert r.returncode == 0
    assert "deadline is already past when the event arrives" in r.stderr
    r = await asyncio.to_thread(send, "--id", "short", "--start-in", "10")
    assert "less than grid.prepare_s (30 s)" in r.stderr


# -- send: the value checked against the site, like check-config's cap -----------------------


@pytest.mark.parametrize(("args", "why"), [
    # The reviewer's: 2 MW typed as kW on a 50 kW site would sleep everything for an hour.
    (["--value-kw", "0.2"], "--value-kw: 0.2 kW is 1/250 of the site cap (50 kW): looks like "
                            "MW typed as kW (0.2 MW = 200 kW)"),
    (["--value-kw", "20000"], "--value-kw: 20000 kW is 400 times the site cap (50 kW): looks "
                              "like W typed as kW (20000 W = 20 kW)"),
    (["--value-kw", "2000000", "--kind", "shed_kw"], "--value-kw: 2000000 kW is 40000 times "
                                                     "the site cap"),
    (["--value-kw", "2"], "--value-kw: 2 kW is below the smallest miner's stock draw (3.67 kW "
                          "incl. aux, Antminer S21): no miner could change for it; MW typed as "
                          "kW? (2 MW = 2000 kW); to stop everything but the keep-alive groups: "
                          "--kind emergency"),
    (["--value-kw", "-5"], "--value-kw: -5 kW is negative (the site's power target, in kW)"),
    ([], "--kind target_kw needs --value-kw KW (the site's power target, in kW)"),
    (["--kind", "shed_kw"], "--kind shed_kw needs --value-kw KW (the power to shed below the "
                            "baseline, in kW)"),
    (["--value-kw", "10", "--id", "bad id!"], "not a valid event: --id: String should match "
                                              "pattern"),
    (["--value-kw", "10", "--duration", "0"], "not a valid event: end_ts must be after start_ts"),
])
def test_send_refuses_values_that_cannot_be_meant(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  args: list[str], why: str) -> None:
    """Refused before anything is published (the site file's broker is unreachable)."""
    site = site_file(tmp_path, tmp_path / "grid.db")
    code, out, err = cli(capsys, "send", "--config", str(site), *args)
    assert code == 2 and out == ""
    assert err.startswith(f"mineops: {why}"), err
    assert len(err.splitlines()) == 1 and "pydantic" not in err, "one line, no raw dump"


def test_send_warns_about_targets_it_cannot_meet(tmp_path: Path) -> None:
    from controller.cli.events import check_value  # noqa: PLC0415

    cfg = make_site(_Address(), [("a", "s21", 4), ("b", "s19j_pro", 4)],  # type: ignore[arg-type]
                    power_cap_kw=40)
    cfg = cfg.model_validate({**cfg.model_dump(), "fleet": {"groups": [
        {"name": "a", "model": "s21", "count": 4, "never_curtail": True},
        {"name": "b", "model": "s19j_pro", "count": 4}]}})
    errors, warnings = check_value(cfg, "target_kw", 10.0)
    assert errors == []
    assert warnings == ["--value-kw: 10 kW is below the never-curtail miners' draw (up to "
                        "16 kW incl. aux): everything else sleeps and the target is still "
                        "not met"]
    assert check_value(cfg, "target_kw", 60.0) == ([], [
        "--value-kw: 60 kW is above the site cap (40 kW): the event does not lower it"])
    assert check_value(cfg, "shed_kw", 45.0) == ([], [
        "--value-kw: 45 kW is the whole site cap (40 kW) or more: every miner sleeps, "
        "never-curtail ones too (the grid comes first)"])
    assert check_value(cfg, "target_kw", 20.0) == ([], [])
    assert check_value(cfg, "peak", None) == ([], [])
    assert check_value(cfg, "emergency", 5.0)[1] == [
        "--value-kw is not used by an emergency (the keep-alive groups run, everything else "
        "sleeps)"]


# -- cancel: the journaled event, only its status changed ------------------------------------


def test_cancel_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "grid.db"
    site = site_file(tmp_path, journal)
    code, _, err = cli(capsys, "cancel", "--config", str(site), "--id", "t-em")
    assert code == 2
    assert err == (f"mineops: events cancel reads the event's terms from the site's grid "
                   f"journal, and there is none at {journal} ([grid] journal_path): run it "
                   "where the controller keeps its journal\n")
    g = obligations(journal)
    run_event(g, event("ev-a", T0 + 100, T0 + 400), received=T0, meter_w=40_000.0,
              until=T0 + 500)
    g.accept(event("ev-b", time.time() + 600, time.time() + 1200), time.time())
    g.journal.close()
    capsys.readouterr()  # the obligations' own logs
    code, _, err = cli(capsys, "cancel", "--config", str(site), "--id", "t-em")
    assert code == 2
    assert err == (f"mineops: --id t-em: no such event in {journal} (latest: ev-b, ev-a; "
                   "`mineops events list` shows all)\n")
    code, _, err = cli(capsys, "cancel", "--config", str(site), "--id", "ev-a")
    assert code == 2 and err.startswith("mineops: --id ev-a: ended at ")
    assert err.endswith("; nothing to cancel\n")
    code, _, err = cli(capsys, "cancel", "--config", str(site))
    assert code == 2 and "events cancel needs --id" in err


@pytest.mark.integration
async def test_cancel_resends_the_journaled_event_and_keeps_its_record(
        broker: LocalBroker, tasks: Any, tmp_path: Path) -> None:
    """The reviewer's: a cancel with its own default times rewrote the settlement record."""
    journal = tmp_path / "grid.db"
    cfg = make_site(broker, [("a", "s21", 4)], power_cap_kw=50,
                    grid={"journal_path": str(journal), "prepare_s": 1.0})
    site = tmp_path / "site.toml"
    site.write_text(toml_of(cfg.model_dump(mode="json", exclude_none=True)))
    peer = Peer(cfg, [SiteTopics(cfg.site_id).grid])
    tasks(peer.run())
    await wait_for(peer.transport.connected.is_set, what="peer up")
    now = time.time()
    original = GridEvent(id="c-1", kind="shed_kw", value_kw=12.5, start_ts=now + 60,
                         end_ts=now + 3660, deadline_ts=now + 90, source="utility-x",
                         version=7)
    g = obligations(journal)
    g.accept(original, now)
    g.journal.flush()

    def cancel(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "controller.cli", "events", "cancel",
                               "--config", str(site), *args], capture_output=True, text=True,
                              cwd=ROOT, check=False, timeout=60)

    r = await asyncio.to_thread(cancel, "--id", "c-1")
    assert r.returncode == 0, r.stderr
    await wait_for(lambda: bool(peer.received), what="the cancel on the grid topic")
    sent = GridEvent.model_validate_json(peer.received[-1][1])
    assert sent.cancelled and sent.version is not None and sent.version > 7
    assert sent.model_dump(exclude={"cancelled", "version"}) == original.model_dump(
        exclude={"cancelled", "version"}), "the event's own terms, not the CLI's defaults"
    assert r.stdout == (f"cancelled c-1: shed 12.5 kW (0.0125 MW) below the baseline from "
                        f"{iso(original.start_ts)} to {iso(original.end_ts)}, met by "
                        f"{iso(original.deadline_ts)} (on mineops/test/signal/grid, version "
                        f"{sent.version})\n")
    # The controller takes it: the record keeps its times, only the status changes.
    assert g.accept(sent, time.time())
    g.journal.close()
    row = next(r for r in GridJournal(journal).rows() if r.id == "c-1")
    assert row.status == "cancelled"
    assert (row.payload["start_ts"], row.payload["end_ts"], row.payload["value_kw"]) == (
        original.start_ts, original.end_ts, 12.5)
    assert row.received_ts == now
    # Cancelling again sends nothing; --kind/--value-kw are not needed, and are ignored.
    r = await asyncio.to_thread(cancel, "--id", "c-1", "--value-kw", "1")
    assert r.returncode == 0
    assert r.stdout == "c-1 is already cancelled; nothing sent\n"
    assert "--kind and --value-kw are not used by cancel" in r.stderr


def run_event_unmetered(g: GridObligations, ev: GridEvent, *, received: float,
                        until: float, step: float = 10.0) -> None:
    g.accept(ev, received)
    t = received
    while t <= until:
        g.obligation(t, None, CAP_W)
        t += step


def test_export_counts_the_samples_without_a_meter_reading(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "grid.db"
    g = obligations(journal)
    run_event_unmetered(g, event("dark", T0 + 600, T0 + 1200), received=T0, until=T0 + 1300)
    run_event(g, event("lit", T0 + 2000, T0 + 2600), received=T0 + 1300, meter_w=40_000.0,
              until=T0 + 2700)
    g.journal.close()
    site = site_file(tmp_path, journal)
    rows = export_csv(capsys, site)
    dark, lit = rows["dark"], rows["lit"]
    assert int(dark["samples_without_meter"]) > 0
    assert dark["samples_after_deadline"] == "0"
    assert dark["compliance"] == "not judged: no meter samples after the deadline"
    assert lit["samples_without_meter"] == "0" and int(lit["samples_after_deadline"]) > 0
    code, out, _ = cli(capsys, "export", "--config", str(site), "--format", "json")
    assert code == 0
    recs = {r["id"]: r for r in json.loads(out)}
    assert recs["dark"]["samples_without_meter"] == int(dark["samples_without_meter"])

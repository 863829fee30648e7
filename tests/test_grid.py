"""Grid obligations: lifecycle and journal (unit), and shedding on time over MQTT."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.daemon.loop import Controller
from controller.grid.journal import GridJournal
from controller.grid.obligations import GridObligations, GridRules
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import GridEvent, PriceSignal
from simulators.site import SimulatedSite
from tests.conftest import Peer, make_site, wait_for

ROOT = Path(__file__).resolve().parents[1]
N = 10
RULES = GridRules(prepare_s=10.0, recovery_w_per_s=100.0, record_interval_s=1.0)


def obligations(tmp_path: Path, rules: GridRules = RULES) -> GridObligations:
    keep = np.zeros(N, dtype=bool)
    keep[:2] = True
    return GridObligations(GridJournal(tmp_path / "grid.db"), rules, keep_alive=keep,
                           frequency_shed=~keep, keep_alive_w=7000.0)


def event(**kw: Any) -> GridEvent:
    base: dict[str, Any] = {"id": "dr-1", "kind": "target_kw", "value_kw": 50.0,
                            "start_ts": 1000.0, "end_ts": 2000.0}
    return GridEvent(**{**base, **kw})


def test_lifecycle_prepare_hold_recover(tmp_path: Path) -> None:
    g = obligations(tmp_path)
    assert g.accept(event(), now_ts=900.0)
    assert g.obligation(980.0, 80_000.0, 100_000.0).cap_w == np.inf, "not yet: scheduled"
    ob = g.obligation(991.0, 80_000.0, 100_000.0)
    assert ob.cap_w == 50_000.0, "in force prepare_s before the deadline"
    assert g.rows["dr-1"].status == "active" and g.rows["dr-1"].baseline_w == 80_000.0
    assert g.obligation(1500.0, 49_000.0, 100_000.0).cap_w == 50_000.0
    # After the end the cap climbs back at the recovery ramp, not at once.
    assert g.obligation(2000.0, 49_000.0, 100_000.0).cap_w == pytest.approx(50_000.0)
    assert g.obligation(2100.0, 55_000.0, 100_000.0).cap_w == pytest.approx(60_000.0)
    assert g.obligation(2600.0, 99_000.0, 100_000.0).cap_w == np.inf
    (row,) = g.journal.rows()
    assert row.status == "completed" and row.complied is True
    assert row.reached_ts is not None and row.curtailed_wh > 0


def test_overlapping_events_the_tightest_wins_and_cancel(tmp_path: Path) -> None:
    g = obligations(tmp_path)
    g.accept(event(id="a", value_kw=60.0), 900.0)
    g.accept(event(id="b", value_kw=40.0, start_ts=1200.0, end_ts=1500.0), 900.0)
    assert g.obligation(1100.0, 70_000.0, 1e6).cap_w == 60_000.0
    assert g.obligation(1195.0, 60_000.0, 1e6).cap_w == 40_000.0
    g.accept(event(id="b", value_kw=40.0, start_ts=1200.0, end_ts=1500.0, cancelled=True),
             1250.0)
    assert g.obligation(1251.0, 40_000.0, 1e6).cap_w == pytest.approx(40_100.0), "ramp back"
    assert {r.id: r.status for r in g.journal.rows()} == {"a": "active", "b": "cancelled"}


def test_shed_kw_uses_the_baseline_and_emergency_sleeps_all_but_keep_alive(
        tmp_path: Path) -> None:
    g = obligations(tmp_path)
    g.accept(event(id="shed", kind="shed_kw", value_kw=30.0), 900.0)
    assert g.obligation(995.0, 90_000.0, 1e6).cap_w == 60_000.0
    g.accept(event(id="em", kind="emergency", value_kw=None, start_ts=1100.0, end_ts=1200.0),
             1000.0)
    ob = g.obligation(1100.0, 60_000.0, 1e6)
    assert ob.cap_w == 7000.0 and ob.force_sleep is not None
    assert ob.force_sleep.tolist() == [False, False] + [True] * (N - 2)


def test_restart_resumes_from_the_journal_without_double_apply(tmp_path: Path) -> None:
    g = obligations(tmp_path)
    g.accept(event(), 900.0)
    g.obligation(995.0, 80_000.0, 1e6)
    g.journal.close()
    again = obligations(tmp_path)  # a new process over the same file
    assert again.rows["dr-1"].status == "active" and again.rows["dr-1"].baseline_w == 80_000.0
    assert not again.accept(event(), 1001.0), "the retained copy is recognised"
    assert again.obligation(1001.0, 50_000.0, 1e6).cap_w == 50_000.0
    assert len(again.journal.rows()) == 1


def test_frequency_sheds_at_once_and_restores_after_hold(tmp_path: Path) -> None:
    g = obligations(tmp_path, GridRules(restore_hold_s=30.0, recovery_w_per_s=1000.0))
    assert g.frequency(60.0, 0.0) is None
    assert g.frequency(59.6, 1.0) == "shed", "a dip starts a shed"
    assert g.frequency(59.5, 1.5) is None, "only once"
    ob = g.obligation(2.0, 20_000.0, 1e6)
    assert ob.force_sleep is not None and ob.force_sleep.sum() == N - 2
    g.frequency(59.95, 10.0)
    g.frequency(59.95, 39.0)
    assert g.obligation(39.0, 20_000.0, 1e6).force_sleep is not None, "still holding"
    assert g.frequency(59.95, 41.0) == "restored"
    ob = g.obligation(41.0, 20_000.0, 1e6)
    assert ob.force_sleep is None and ob.cap_w == pytest.approx(20_000.0), "ramps back"
    assert [r.kind for r in g.journal.rows()] == ["frequency"]


# -- over MQTT -------------------------------------------------------------------

SPEED = 50.0


def price(p: float) -> bytes:
    return PriceSignal(ts=time.time(), price_usd_per_mwh=p).encode()


async def running_site(broker: LocalBroker, tasks: Any, **overrides: Any
                       ) -> tuple[Controller, SimulatedSite, Peer]:
    cfg = make_site(broker, [("a", "s21", 20), ("b", "s19j_pro", 20)], **overrides)
    sim = SimulatedSite(cfg, speed=SPEED, telemetry_interval_s=0.2, meter_interval_s=0.1)
    controller = Controller(cfg)
    peer = Peer(cfg)
    for coro in (sim.run(), controller.run(), peer.run()):
        tasks(coro)
    await wait_for(peer.transport.connected.is_set, what="peer connected")
    await peer.publish(controller.topics.price, price(5.0), qos=1, retain=True)
    await wait_for(lambda: bool((sim.fleet.mode == 0).all())
                   and controller.fleet.site.meter_power_w > 0.95 * sim.site_power_w(),
                   what="full power at a low price")
    return controller, sim, peer


@pytest.mark.integration
async def test_event_met_by_deadline_held_and_recovered_at_ramp(broker: LocalBroker,
                                                               tasks: Any) -> None:
    controller, _, peer = await running_site(
        broker, tasks, grid={"prepare_s": 2.0, "recovery_kw_per_min": 600.0})
    full_w = controller.fleet.site.meter_power_w
    target_kw = round(0.5 * full_w / 1000, 1)
    start = time.time() + 3.0
    ev = GridEvent(id="dr-it", kind="target_kw", value_kw=target_kw, start_ts=start,
                   end_ts=start + 5.0)
    await peer.publish(controller.topics.grid, ev.encode(), qos=1, retain=True)
    await asyncio.sleep(max(0.0, start - time.time()))
    over = []
    while time.time() < ev.end_ts:
        if controller.fleet.site.meter_power_w > target_kw * 1000:
            over.append(controller.fleet.site.meter_power_w)
        await asyncio.sleep(0.05)
    assert not over, f"meter over the {target_kw} kW target after the deadline: {over[:5]}"
    # Recovery: 600 kW/min = 10 kW/s, so the cap climbs over several seconds, not at once.
    await asyncio.sleep(1.0)
    snap = controller.snapshot
    assert snap is not None
    assert snap.planned_site_power_w < target_kw * 1000 + 15_000 + 5_000
    await wait_for(lambda: controller.fleet.site.meter_power_w > 0.9 * full_w, timeout_s=30,
                   what="full recovery")
    (row,) = [r for r in controller.grid.journal.rows() if r.id == "dr-it"]
    assert row.status == "completed" and row.complied is True
    assert row.reached_ts is not None and row.reached_ts <= start
    assert row.curtailed_wh > 0


@pytest.mark.integration
async def test_frequency_dip_sheds_within_one_telemetry_interval(broker: LocalBroker,
                                                                 tasks: Any) -> None:
    controller, sim, _ = await running_site(broker, tasks)
    applied: list[float] = []
    original = sim.fleet.apply

    def record(idx: Any, cmd: Any, seq: int, now: float) -> None:
        if cmd.action == "sleep":
            applied.append(time.monotonic())
        original(idx, cmd, seq, now)

    sim.fleet.apply = record  # type: ignore[method-assign]
    dip_at = time.monotonic()
    sim.frequency_hz = 59.5  # the next meter reading (within 0.1 s) carries the dip
    await wait_for(lambda: bool(np.isin(sim.fleet.mode, (1, 3)).all()), timeout_s=5,
                   what="every miner stopping or asleep")
    # One site-wide broadcast, not a command per miner, applied well inside one
    # telemetry interval (1 s on a real site) of the reading.
    assert len(applied) == 1
    assert applied[0] - dip_at < 1.0
    assert [r.kind for r in controller.grid.journal.rows()] == ["frequency"]


@pytest.mark.integration
def test_killed_controller_resumes_the_event(broker: LocalBroker, tmp_path: Path) -> None:
    """SIGKILL during an active event; after a restart the meter stays under the target."""
    cfg = make_site(broker, [("a", "s21", 20), ("b", "s19j_pro", 20)],
                    grid={"journal_path": str(tmp_path / "grid.db"), "prepare_s": 1.0})
    site = tmp_path / "site.toml"
    site.write_text(toml_of(cfg.model_dump(mode="json", exclude_none=True)))
    result: dict[str, Any] = {}

    async def scenario() -> None:
        sim = SimulatedSite(cfg, speed=SPEED, telemetry_interval_s=0.2, meter_interval_s=0.1)
        peer = Peer(cfg)
        sim_task = asyncio.create_task(sim.run())
        peer_task = asyncio.create_task(peer.run())
        proc = start_daemon(site)
        try:
            await peer.publish(cfg_topics(cfg).price, price(5.0), qos=1, retain=True)
            await wait_for(lambda: bool((sim.fleet.mode == 0).all()), timeout_s=30,
                           what="full power")
            await asyncio.sleep(1.0)
            target_kw = round(0.5 * sim.site_power_w() / 1000, 1)
            start = time.time() + 1.5
            ev = GridEvent(id="dr-kill", kind="target_kw", value_kw=target_kw, start_ts=start,
                           end_ts=start + 60)
            await peer.publish(cfg_topics(cfg).grid, ev.encode(), qos=1, retain=True)
            await asyncio.sleep(start - time.time() + 1.0)
            assert sim.site_power_w() <= target_kw * 1000 * 1.01
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            over = []
            proc = start_daemon(site)
            until = time.time() + 8.0
            while time.time() < until:
                if sim.fleet.total_power_w() * 1.05 > target_kw * 1000:
                    over.append(sim.fleet.total_power_w())
                await asyncio.sleep(0.05)
            result["over"] = over
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
            sim_task.cancel()
            peer_task.cancel()
            await asyncio.gather(sim_task, peer_task, return_exceptions=True)

    asyncio.run(scenario())
    assert not result["over"], "power rose above the target after the restart"
    db = sqlite3.connect(tmp_path / "grid.db")
    assert db.execute("SELECT count(*) FROM events WHERE id = 'dr-kill'").fetchone() == (1,)
    assert db.execute("SELECT status FROM events WHERE id = 'dr-kill'").fetchone() == ("active",)
    export = subprocess.run([sys.executable, "-m", "controller.cli", "events", "export",
                             "--config", str(site), "--format", "json"], capture_output=True,
                            text=True, cwd=ROOT, check=True)
    (rec,) = json.loads(export.stdout)
    assert rec["id"] == "dr-kill" and rec["baseline_kw"] > rec["target_kw"]


def start_daemon(site: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config",
                             str(site)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ})


def cfg_topics(cfg: Any) -> Any:
    from controller.protocol.topics import SiteTopics  # noqa: PLC0415

    return SiteTopics(cfg.site_id)


def toml_of(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for test configs (tables, arrays of tables, scalars, lists)."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        tabular = isinstance(value, list) and value and isinstance(value[0], dict)
        if isinstance(value, dict) or tabular:
            tables.append((key, value))
        elif value == float("inf"):
            lines.append(f"{key} = inf")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in tables:
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines.append(f"\n[{name}]")
            lines.append(toml_of(value, f"{name}."))
        else:
            for item in value:
                lines.append(f"\n[[{name}]]")
                lines.append(toml_of(item, f"{name}."))
    return "\n".join(lines)


def test_peak_alert_holds_the_configured_level(tmp_path: Path) -> None:
    g = obligations(tmp_path, GridRules(prepare_s=10.0, peak_hold_w=20_000.0))
    g.accept(event(id="4cp", kind="peak", value_kw=None), 900.0)
    g.accept(event(id="4cp-b", kind="peak", value_kw=30.0, start_ts=1500.0), 900.0)
    assert g.obligation(995.0, 80_000.0, 1e6).cap_w == 20_000.0
    assert g.rows["4cp-b"].status == "scheduled"


def test_controller_reads_grid_and_schedule_messages_without_a_broker(tmp_path: Path) -> None:
    """Ingest is a pure function of messages: no broker needed to check routing."""
    from controller.protocol.payloads import PriceSchedule, ScheduledPrice  # noqa: PLC0415

    cfg = make_site(_FakeAddress(), [("a", "s21", 4)])  # type: ignore[arg-type]
    c = Controller(cfg)
    now = time.time()
    sched = PriceSchedule(ts=now, interval_s=3600, prices=[
        ScheduledPrice(start_ts=now - 60, price_usd_per_mwh=42.0)])
    c.on_message(c.topics.price_schedule, sched.encode())
    assert c.price().total_usd_per_mwh == 42.0, "day-ahead price when no real-time price came"
    c.on_message(c.topics.price, price(10.0))
    assert c.price().total_usd_per_mwh == 10.0, "real-time wins"
    c.on_message(c.topics.grid, event(id="x", start_ts=now + 5, end_ts=now + 60).encode())
    assert "x" in c.grid.rows
    c.on_message(c.topics.grid, b'{"v":1,"id":"bad","kind":"target_kw","start_ts":5,'
                                b'"end_ts":9}')
    assert c.ingest.invalid[("grid", "bad_value")] == 1
    assert "bad" not in c.grid.rows


class _FakeAddress:
    """Only host/port are read from the broker by make_site; nothing connects here."""

    host = "127.0.0.1"
    port = 1


@pytest.mark.integration
async def test_operator_sends_and_cancels_an_event_from_the_cli(broker: LocalBroker, tasks: Any,
                                                                tmp_path: Path) -> None:
    # A cap the CLI accepts for 4 miners (make_site's 10 MW looks like W typed as kW).
    cfg = make_site(broker, [("a", "s21", 4)], power_cap_kw=50)
    site = tmp_path / "site.toml"
    site.write_text(toml_of(cfg.model_dump(mode="json", exclude_none=True)))
    controller = Controller(cfg)
    tasks(controller.run())
    await wait_for(controller.transport.connected.is_set, what="controller up")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "controller.cli", "events", *args,
                               "--config", str(site)], capture_output=True, text=True,
                              cwd=ROOT, check=False, timeout=60)

    sent = await asyncio.to_thread(cli, "send", "--id", "op-1", "--value-kw", "5",
                                   "--start-in", "60", "--duration", "600")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.startswith("sent op-1: power target 5 kW (0.005 MW) from ")
    await wait_for(lambda: "op-1" in controller.grid.rows, what="event accepted")
    bad = await asyncio.to_thread(cli, "send", "--kind", "shed_kw")
    assert bad.returncode == 2 and "--kind shed_kw needs --value-kw KW" in bad.stderr
    cancel = await asyncio.to_thread(cli, "cancel", "--id", "op-1")
    assert cancel.returncode == 0, cancel.stderr
    await wait_for(lambda: "op-1" not in controller.grid.rows, what="event cancelled")
    (row,) = controller.grid.journal.rows()
    assert row.status == "cancelled" and row.payload["value_kw"] == 5.0


async def test_preset_only_firmware_plans_over_its_presets(tmp_path: Path) -> None:
    """A bridge's retained capabilities replace the catalogue's range with the presets."""
    from controller.protocol.payloads import GroupCapabilities, PowerControlSet  # noqa: PLC0415

    cfg = make_site(_FakeAddress(), [("a", "s21", 4), ("b", "s19j_pro", 2)])  # type: ignore[arg-type]
    c = Controller(cfg)
    presets = [2000.0, 2800.0, 3500.0]
    caps = GroupCapabilities(ts=time.time(), sets=[
        PowerControlSet(firmware="LuxOS", control="presets", presets_w=presets,
                        miners=["a-0001", "a-0002", "a-0003"]),
        PowerControlSet(firmware="stock", control="none", miners=["a-0004"])])
    c.on_message(c.topics.group("a", "capabilities"), caps.encode())
    row = c.fleet.points_w[0]
    assert row[:4].tolist() == [15.0, *presets] and set(row[4:]) == {3500.0}
    assert set(c.fleet.points_w[3]) == {15.0, 3500.0}, "stock firmware: stock or asleep"
    assert c.fleet.points_w[4, 1] == 1600.0, "other groups keep the catalogue's range"
    c.on_message(c.topics.price, price(60.0))
    for i in range(6):  # every miner reports, so none is stale
        c.fleet.last_seen[i] = time.monotonic()
    planned = (await c.decide_and_act("test")).planned_power_w
    assert set(planned[:3]) <= {15.0, *presets}
    assert planned[3] in (15.0, 3500.0)


def test_a_cancel_keeps_the_event_s_terms_in_the_record(tmp_path: Path) -> None:
    """A cancel carrying other terms (times, target: e.g. a sender's defaults) ends the
    event; the journal keeps the terms that were agreed, for settlement."""
    g = obligations(tmp_path)
    g.accept(event(id="c", value_kw=40.0, start_ts=1200.0, end_ts=1500.0, version=1), 900.0)
    assert g.accept(event(id="c", value_kw=1.0, start_ts=5000.0, end_ts=9000.0, version=2,
                          cancelled=True), 1000.0)
    (row,) = g.journal.rows()
    assert row.status == "cancelled" and row.version == 2
    assert (row.payload["value_kw"], row.payload["start_ts"], row.payload["end_ts"]) == (
        40.0, 1200.0, 1500.0)
    assert g.obligation(1300.0, 50_000.0, 1e6).cap_w == np.inf, "cancelled: not in force"

"""Fault matrix, grid events: none lost while the controller is away, none reverted by the broker.

The controller keeps a persistent MQTT session (client id fixed, clean session off,
QoS 1 subscriptions), so the broker queues every event published while it is down,
not only the last retained one. Events carry a version (OpenADR's modificationNumber,
or the send time in ms from `mineops events send`); an older version never replaces a
newer one, and a cancelled event never comes back from an older copy. The broker here
keeps retained messages across a restart (mosquitto persistence) and is killed before
it saved the newest ones, as the shipped `autosave_interval` allows.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.daemon.loop import Controller
from controller.grid.journal import GridJournal
from controller.protocol.broker import LocalBroker, find_mosquitto
from controller.protocol.payloads import GridEvent
from tests.conftest import REQUIRE_MOSQUITTO, Peer, wait_for
from tests.test_faults_site import (
    SETTLE_S,
    FaultSite,
    fault_cfg,
    start_fault_site,
    stop,
    wait_until,
)
from tests.test_grid import toml_of

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


@pytest.fixture
def persistent_broker() -> Iterator[LocalBroker]:
    """mosquitto with persistence that saves only when told (`save()`), never on a timer."""
    if find_mosquitto() is None:
        if REQUIRE_MOSQUITTO:
            pytest.fail("mosquitto is required (MINEOPS_REQUIRE_MOSQUITTO=1)")
        pytest.skip("needs mosquitto (persistence)")
    with LocalBroker(prefer="mosquitto", persistence=True) as b:
        yield b


def target_event(site: FaultSite, event_id: str, fraction: float, *, start_in_s: float,
                 duration_s: float = 20.0, **kw: Any) -> GridEvent:
    """A target_kw event at `fraction` of the site cap."""
    now = time.time()
    return GridEvent(id=event_id, kind="target_kw",
                     value_kw=round(fraction * site.site_cap_w / 1000.0, 1),
                     start_ts=now + start_in_s, end_ts=now + start_in_s + duration_s, **kw)


def journal_rows(site: FaultSite) -> dict[str, Any]:
    """The journal as another process reads it (what `mineops events export` would show)."""
    journal = GridJournal(site.cfg.grid.journal_path)
    try:
        return {r.id: r for r in journal.rows()}
    finally:
        journal.close()


@pytest.mark.slow
async def test_events_published_while_the_controller_is_down_are_all_obeyed(
        broker: LocalBroker, tasks: Any) -> None:
    """Two events on the retained grid topic while the controller is away for 4 s."""
    site = await start_fault_site(broker, tasks)
    await stop(site.controller_task)
    tight = target_event(site, "dr-tight", 0.55, start_in_s=8.0, duration_s=8.0, version=1)
    loose = target_event(site, "dr-loose", 0.85, start_in_s=8.0, duration_s=8.0, version=1)
    await site.publish_event(tight)
    await site.publish_event(loose)  # the retained copy is now this one alone
    await asyncio.sleep(4.0)
    site.controller = Controller(site.cfg)
    site.controller_task = site.tasks(site.controller.run(), "controller")
    site.hold(tight)
    site.hold(loose)
    await wait_until(tight.end_ts)
    assert {"dr-tight", "dr-loose"} <= set(journal_rows(site)), "an event was lost"
    j = site.judge
    assert j.sampled_s(tight.met_by_ts, tight.end_ts) > 0.9 * (tight.end_ts - tight.met_by_ts)
    assert j.over_s(tight.met_by_ts, tight.end_ts) == 0, j.verdict(tight.met_by_ts)


@pytest.mark.slow
async def test_events_sent_while_the_controller_is_killed_are_all_obeyed(
        broker: LocalBroker, tasks: Any, tmp_path: Path) -> None:
    """The same with the daemon SIGKILLed: no goodbye, the broker keeps its session."""
    site = await start_fault_site(broker, tasks, fault_cfg(
        broker, grid={"journal_path": str(tmp_path / "grid.db"), "prepare_s": 2.0,
                      "record_interval_s": 0.2}))
    await stop(site.controller_task)  # the daemon below replaces the in-process one
    config = tmp_path / "site.toml"
    config.write_text(toml_of(site.cfg.model_dump(mode="json", exclude_none=True)))
    watcher = Peer(site.cfg, [site.controller.topics.controller_availability])
    tasks(watcher.run(), "watcher")
    await wait_for(lambda: watcher.received[-1:] == [
        (site.controller.topics.controller_availability, b"offline")], what="stopped")
    proc = daemon(config)
    try:
        await wait_for(lambda: watcher.received[-1][1] == b"online", timeout_s=30,
                       what="the daemon online")
        proc.kill()
        proc.wait(timeout=10)
        events = [target_event(site, f"dr-{i}", 0.9 - 0.1 * i, start_in_s=12.0, duration_s=8.0,
                               version=1)
                  for i in range(3)]
        for ev in events:
            await site.publish_event(ev)
        await asyncio.sleep(3.0)
        proc = daemon(config)
        for ev in events:
            site.hold(ev)
        await wait_until(events[-1].end_ts)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert {e.id for e in events} <= set(journal_rows(site)), "an event was lost"
    ev = events[-1]
    j = site.judge
    assert j.over_s(ev.met_by_ts, ev.end_ts) == 0, j.verdict(ev.met_by_ts)


def daemon(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config",
                             str(config)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ})


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
async def test_a_cancelled_event_does_not_come_back_from_an_older_copy(
        persistent_broker: LocalBroker, tasks: Any, versioned: bool) -> None:
    site = await start_fault_site(persistent_broker, tasks)
    ev = target_event(site, "dr-c", 0.5, start_in_s=8.0, version=1 if versioned else None)
    await site.publish_event(ev)
    await wait_for(lambda: "dr-c" in site.controller.grid.rows, what="event accepted")
    persistent_broker.save()
    cancel = ev.model_copy(update={"cancelled": True, "version": 2 if versioned else None})
    await site.publish_event(cancel)
    await wait_for(lambda: "dr-c" not in site.controller.grid.rows, what="event cancelled")
    connects = site.controller.transport.connects
    persistent_broker.kill()  # before it saved the cancel: it restores the event's copy
    persistent_broker.start()
    await wait_for(lambda: site.controller.transport.connects > connects, what="reconnected")
    await asyncio.sleep(2.0)
    assert "dr-c" not in site.controller.grid.rows, "the cancelled event came back"
    assert journal_rows(site)["dr-c"].status == "cancelled"
    await wait_until(ev.met_by_ts + 1.0)
    snap = site.controller.snapshot
    assert snap is not None and snap.cap.source == "site"


@pytest.mark.slow
async def test_an_older_copy_never_replaces_a_tightened_event(persistent_broker: LocalBroker,
                                                              tasks: Any) -> None:
    """2,000 -> 1,200 kW in the issue; the broker restores the 2,000 kW copy."""
    site = await start_fault_site(persistent_broker, tasks)
    loose = target_event(site, "dr-t", 0.8, start_in_s=12.0, version=1)
    await site.publish_event(loose)
    await wait_for(lambda: "dr-t" in site.controller.grid.rows, what="event accepted")
    persistent_broker.save()
    tight = loose.model_copy(update={"value_kw": round(0.48 * site.site_cap_w / 1000, 1),
                                     "version": 2})
    await site.publish_event(tight)
    await wait_for(lambda: site.controller.grid.rows["dr-t"].payload["value_kw"]
                   == tight.value_kw, what="the tightened event accepted")
    clients = site.controller.transport, site.sim.transport
    connects = [t.connects for t in clients]
    persistent_broker.kill()
    persistent_broker.start()
    await wait_for(lambda: all(t.connects > n for t, n in zip(clients, connects, strict=True)),
                   what="controller and simulator reconnected")
    judged_from = max(tight.met_by_ts, time.time() + SETTLE_S)
    site.hold(tight)
    await wait_until(judged_from + 3.0)
    assert site.controller.grid.rows["dr-t"].payload["value_kw"] == tight.value_kw
    assert journal_rows(site)["dr-t"].payload["version"] == 2
    j = site.judge
    assert j.sampled_s(judged_from, judged_from + 3.0) > 2.5
    assert j.over_s(judged_from, judged_from + 3.0) == 0, j.verdict(judged_from)
    invalid = site.controller.ingest.invalid
    assert invalid[("grid", "stale_version")] >= 1, dict(invalid)


async def test_events_send_and_cancel_carry_increasing_versions(broker: LocalBroker, tasks: Any,
                                                                 tmp_path: Path) -> None:
    cfg = fault_cfg(broker, power_cap_kw=400)
    config = tmp_path / "site.toml"
    config.write_text(toml_of(cfg.model_dump(mode="json", exclude_none=True)))
    peer = Peer(cfg, [f"mineops/{cfg.site_id}/signal/grid"])
    tasks(peer.run(), "peer")
    await wait_for(peer.transport.connected.is_set, what="peer")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "controller.cli", "events", *args,
                               "--config", str(config)], capture_output=True, text=True,
                              cwd=ROOT, check=False, timeout=60)

    # The controller journals the event: cancel reads its terms from that journal.
    controller = Controller(cfg)
    tasks(controller.run(), "controller")
    before_ms = time.time() * 1000
    sent = await asyncio.to_thread(cli, "send", "--id", "op-v", "--value-kw", "100")
    assert sent.returncode == 0, sent.stderr
    await wait_for(lambda: "op-v" in controller.grid.known, what="the event journaled")
    cancelled = await asyncio.to_thread(cli, "cancel", "--id", "op-v")
    assert cancelled.returncode == 0, cancelled.stderr
    v_sent = int(sent.stdout.rsplit("version ", 1)[1].rstrip(")\n"))
    v_cancel = int(cancelled.stdout.rsplit("version ", 1)[1].rstrip(")\n"))
    assert before_ms <= v_sent < v_cancel <= time.time() * 1000
    await wait_for(lambda: len(peer.received) >= 2, what="both on the grid topic")
    versions = [json.loads(raw)["version"] for _, raw in peer.received[-2:]]
    assert versions == [v_sent, v_cancel]
    await wait_for(lambda: controller.grid.known["op-v"].status == "cancelled",
                   what="the cancel taken")

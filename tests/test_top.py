"""`mineops top` against a real broker and a real controller driving a simulated site."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import GridEvent, PriceSignal
from controller.protocol.topics import SiteTopics
from simulators.site import SimulatedSite
from tests.conftest import Peer, make_site, wait_for
from tests.test_grid import toml_of

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def top(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller.cli", "top", *args],
                          capture_output=True, text=True, cwd=ROOT, check=False,
                          timeout=timeout, env={**os.environ, "TZ": "UTC"})


async def start_site(broker: LocalBroker, tasks: Any, tmp_path: Path
                     ) -> tuple[Any, Controller, Peer]:
    cfg = make_site(broker, [("a", "s21", 20), ("b", "s19j_pro", 20)], power_cap_kw=150,
                    energy={"adders_usd_per_mwh": 8.0, "aux_fraction": 0.05},
                    grid={"journal_path": str(tmp_path / "grid.db"), "prepare_s": 1.0})
    sim = SimulatedSite(cfg, speed=30.0, telemetry_interval_s=0.2, meter_interval_s=0.2)
    controller = Controller(cfg)
    peer = Peer(cfg)
    tasks(sim.run(), "sim")
    tasks(peer.run(), "peer")
    controller_task = tasks(controller.run(), "controller")
    await peer.publish(SiteTopics(cfg.site_id).price,
                       PriceSignal(ts=time.time(), price_usd_per_mwh=70.0).encode(), qos=1,
                       retain=True)
    await wait_for(lambda: controller.snapshot is not None
                   and controller.snapshot.miners_by_state["offline"] == 0,
                   what="a decision with every miner reporting")
    return cfg, controller, (peer, controller_task)


async def test_once_shows_the_running_controllers_decision(broker: LocalBroker, tasks: Any,
                                                           tmp_path: Path) -> None:
    cfg, controller, (peer, controller_task) = await start_site(broker, tasks, tmp_path)
    site = tmp_path / "site.toml"
    site.write_text(toml_of(cfg.model_dump(mode="json", exclude_none=True)))
    target = f"{broker.host}:{broker.port}"
    r = await asyncio.to_thread(top, "--broker", target, "--site", "test", "--once")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    assert line.startswith(time.strftime("%Y-%m-%d ", time.gmtime())) and " UTC | " in line
    assert "cap 0.15 MW (the site cap)" in line
    assert "price $78.00/MWh = market $70.00/MWh (real-time) + adders $8.00/MWh" in line
    assert "offline 0" in line
    # The counts add up to the fleet, with the controller's reasons per state.
    assert "running" in line and "(profit " in line

    # A grid event: top says the cap is the event's, and why.
    ev = GridEvent(id="ev-top", kind="target_kw", value_kw=20.0, start_ts=time.time() + 1.5,
                   end_ts=time.time() + 120)
    await peer.publish(SiteTopics(cfg.site_id).grid, ev.encode(), qos=1, retain=True)
    await wait_for(lambda: controller.snapshot is not None
                   and controller.snapshot.cap.source == "target_kw", what="event in force")
    r = await asyncio.to_thread(top, "--config", str(site), "--once", "--timezone",
                                "America/Chicago")
    assert r.returncode == 0, r.stderr
    assert "cap 0.02 MW (grid event ev-top: power target, target 0.02 MW by " in r.stdout
    assert " CDT" in r.stdout or " CST" in r.stdout
    assert "(site cap 0.15 MW))" in r.stdout
    assert "grid " in r.stdout.split("| running", 1)[1], "miners held by the grid say so"

    # The controller stops: its retained availability says so, and top shows it.
    controller_task.cancel()
    await asyncio.gather(controller_task, return_exceptions=True)
    r = await asyncio.to_thread(top, "--broker", target, "--site", "test", "--once")
    assert r.returncode == 1, "a monitor's check must not pass on an OFFLINE controller"
    assert "controller OFFLINE" in r.stdout
    assert r.stderr.endswith("mineops: the controller is OFFLINE (its last will, or a clean "
                             "stop): figures are old\n")


async def test_follows_decisions_prints_changes_and_stops_on_ctrl_c(
        broker: LocalBroker, tasks: Any, tmp_path: Path) -> None:
    cfg, controller, (peer, _) = await start_site(broker, tasks, tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.cli", "top", "--broker",
        f"{broker.host}:{broker.port}", "--site", "test", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TZ": "UTC"})
    try:
        await asyncio.sleep(3.0)
        await peer.publish(SiteTopics(cfg.site_id).price,
                           PriceSignal(ts=time.time(), price_usd_per_mwh=500.0).encode(),
                           qos=1, retain=True)
        await wait_for(lambda: controller.snapshot is not None
                       and controller.snapshot.price.market_usd_per_mwh == 500.0,
                       what="the new price decided on")
        await asyncio.sleep(2.0)
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            raw_out, raw_err = await proc.communicate()
    out, err = raw_out.decode(), raw_err.decode()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    views = [line for line in lines if " UTC | site " in line]
    assert any("market $70.00/MWh" in line for line in views), out
    assert any("market $500.00/MWh" in line for line in views), out
    assert len(views) < 15, "a line per change, not per decision (ten a second here)"
    assert "== mineops top: site test, stopped ==" in lines
    assert lines[-1].startswith(time.strftime("%Y-%m-%d ", time.gmtime()))
    assert "Traceback" not in err


async def test_unreadable_summaries_are_counted_not_fatal(broker: LocalBroker, tasks: Any
                                                         ) -> None:
    cfg = make_site(broker, [("a", "s21", 4)])
    peer = Peer(cfg)
    tasks(peer.run())
    await peer.publish(SiteTopics(cfg.site_id).decision, b'{"ts": "yesterday"}', qos=1,
                       retain=True)
    r = await asyncio.to_thread(top, "--broker", f"{broker.host}:{broker.port}", "--site",
                                "test", "--once", "--wait", "2")
    assert r.returncode == 1
    assert "no decision on mineops/test/controller/decision within 2 s" in r.stderr
    assert "decision_summary_unreadable" in r.stderr


def test_usage_errors() -> None:
    r = top("--broker", "localhost")
    assert r.returncode == 2 and "give --config FILE, or --broker HOST:PORT and --site ID" \
        in r.stderr
    r = top("--broker", "localhost", "--site", "x")
    assert r.returncode == 2 and "expected HOST:PORT" in r.stderr
    r = top("--broker", "127.0.0.1:1883", "--site", "x", "--timezone", "Nowhere/Town")
    assert r.returncode == 2 and "unknown time zone 'Nowhere/Town'" in r.stderr


async def test_top_of_a_demo_shows_its_site_clock_and_the_demo_clears_up(broker: LocalBroker
                                                                         ) -> None:
    """The reviewer's: the demo showed 2024-08-20 18:08 CDT, `top` of it 2026-11-29 22:23
    UTC. Both now read the site clock the demo's controller puts in its summary."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.cli", "demo", "--broker",
        f"{broker.host}:{broker.port}", "--duration", "30", "--miners", "80",
        "--metrics-port", "0", "--event-at", "1", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "TZ": "UTC"})
    try:
        deadline = time.monotonic() + 40
        r = None
        while time.monotonic() < deadline:
            r = await asyncio.to_thread(top, "--broker", f"{broker.host}:{broker.port}",
                                        "--site", "demo", "--once", "--wait", "3")
            if "grid event demo-drill" in r.stdout:
                break
            await asyncio.sleep(1.0)
    finally:
        async with asyncio.timeout(60):
            raw_out, raw_err = await proc.communicate()
    assert r is not None and "grid event demo-drill" in r.stdout, (r and r.stdout + r.stderr)
    # The demo cleared what it retained on a broker it does not own: a later demo or
    # `top` finds no racks, price or decision of a site that is gone.
    cfg = make_site(broker, [("a", "s21", 1)])
    peer = Peer(cfg, ["mineops/demo/#"])
    task = asyncio.create_task(peer.run())
    try:
        await wait_for(peer.transport.connected.is_set, what="peer up")
        await asyncio.sleep(1.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [t for t, raw in peer.received if raw] == [], "retained messages left behind"
    demo_views = [line for line in raw_out.decode().splitlines()
                  if line.startswith("2024-08-20 ")]
    assert proc.returncode == 0, raw_err.decode()[-2000:]
    (line,) = r.stdout.splitlines()
    # The demo's clock and zone, not this machine's wall clock in UTC.
    assert line.startswith("2024-08-20 1") and " CDT | site " in line, line
    shown = line[:19]
    assert demo_views[0][:19] <= shown <= demo_views[-1][:19], (shown, demo_views)
    when = line.split("target ", 1)[1]
    assert " CDT, until " in when and when.split(" by ", 1)[1][:2] in ("17", "18")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("once", [True, False])
def test_an_unreachable_broker_is_said_to_be_one(once: bool) -> None:
    """Not "is the controller running, is the site id right?", nor "waiting for the first
    decision" forever: the broker refuses connections, and the view says so."""
    port = closed_port()
    if once:
        r = top("--broker", f"127.0.0.1:{port}", "--site", "x", "--once", "--wait", "2")
        assert r.returncode == 1
        assert r.stderr.endswith(f"mineops: cannot reach the broker: 127.0.0.1:{port}: "
                                 "connection refused (no decision read in 2 s)\n"), r.stderr
        assert r.stdout == ""
        return
    proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "top", "--broker",
                             f"127.0.0.1:{port}", "--site", "x"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(5.0)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    said = f"x: cannot reach the broker: 127.0.0.1:{port}: connection refused; retrying"
    assert lines[0] == said, out
    assert lines.count(said) == 2, "once when it changed, once in the final view"
    assert "waiting for the first decision" not in out

"""sd_notify against a real AF_UNIX datagram socket; the controller says READY=1 on connect."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from controller.daemon.loop import Controller
from controller.daemon.systemd import Notifier, supervise, watchdog_interval_s
from controller.protocol.broker import LocalBroker
from tests.conftest import make_site, wait_for
from tests.test_deploy_support import (  # noqa: F401 - default_logging is a fixture
    DEPLOY,
    default_logging,
    need,
    run,
)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's; yields ($NOTIFY_SOCKET, the socket)."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield str(path), sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_notifier_sends_one_datagram_per_call(notify_socket: tuple[str, socket.socket]) -> None:
    address, sock = notify_socket
    n = Notifier(address)
    assert n.send("READY=1", "STATUS=hello")
    assert received(sock) == ["READY=1\nSTATUS=hello"]
    n.close()


def test_abstract_socket_address() -> None:
    name = f"mineops-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier("@" + name).send("WATCHDOG=1")
        assert sock.recv(100) == b"WATCHDOG=1"


def test_send_failure_is_reported_not_raised(tmp_path: Path) -> None:
    assert Notifier(str(tmp_path / "nobody-listens")).send("READY=1") is False


def test_watchdog_interval_from_env() -> None:
    pid = str(os.getpid())
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None


async def test_without_notify_socket_nothing_happens() -> None:
    async with asyncio.timeout(1.0):
        await supervise(asyncio.Event(), env={})


async def test_ready_after_connect_then_watchdog_pings(
        notify_socket: tuple[str, socket.socket]) -> None:
    address, sock = notify_socket
    connected = asyncio.Event()
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"}  # ping every 50 ms
    task = asyncio.create_task(supervise(connected, env=env))
    await asyncio.sleep(0.2)
    before = received(sock)
    assert before and set(before) == {"WATCHDOG=1"}, "pings start before READY, READY waits"
    connected.set()
    await asyncio.sleep(0.2)
    after = received(sock)
    assert after[0].startswith("READY=1\n")
    assert after.count("WATCHDOG=1") >= 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert received(sock) == ["STOPPING=1"]


async def test_a_blocked_event_loop_stops_the_pings(
        notify_socket: tuple[str, socket.socket]) -> None:
    address, sock = notify_socket
    connected = asyncio.Event()
    connected.set()
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"}
    task = asyncio.create_task(supervise(connected, env=env))
    await asyncio.sleep(0.1)
    received(sock)
    # The loop is stuck in a blocking call: no task runs, so systemd would see no ping.
    time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point
    assert received(sock) == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.integration
@pytest.mark.usefixtures("default_logging")
async def test_controller_says_ready_after_first_connect(
        broker: LocalBroker, tasks: Any, notify_socket: tuple[str, socket.socket],
        monkeypatch: pytest.MonkeyPatch) -> None:
    address, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    controller = Controller(make_site(broker, [("a", "s21", 2)]))
    tasks(controller.run(), "controller")
    messages: list[str] = []

    def ready() -> bool:
        messages.extend(received(sock))
        return any(m.startswith("READY=1") for m in messages)

    await wait_for(ready, timeout_s=10, what="READY=1 from the controller")
    assert controller.transport.connected.is_set()
    await asyncio.sleep(0.3)
    messages.extend(received(sock))
    assert messages.count("WATCHDOG=1") >= 2


def test_unit_file_verifies(tmp_path: Path) -> None:
    """deploy/systemd/mineops.service passes systemd-analyze with the real mineops binary."""
    analyze = need("systemd-analyze")
    unit = (DEPLOY / "systemd" / "mineops.service").read_text()
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NotifyAccess=main"):
        assert f"\n{key}" in unit, key
    mineops = Path(sys.executable).with_name("mineops")
    copy = tmp_path / "mineops.service"
    copy.write_text(unit.replace("/opt/mineops/bin/mineops", str(mineops)))
    run([analyze, "verify", str(copy)])
    # The ExecStart command line parses (global options before the subcommand).
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").split()[1:]
    from controller.cli.main import parser  # noqa: PLC0415

    args = parser().parse_args(argv)
    assert args.command == "run" and args.log_format == "json"


def unit_directives(unit: str) -> dict[str, list[str]]:
    """Each `Key=value` of a unit's text, by key, in order (comments and sections left out)."""
    out: dict[str, list[str]] = {}
    for raw in unit.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_grants_write_access_to_the_example_journal() -> None:
    """ProtectSystem=strict makes /var read-only: the example's journal directory is granted.

    systemd makes StateDirectory= entries (under /var/lib) and ReadWritePaths= writable.
    """
    unit = unit_directives((DEPLOY / "systemd" / "mineops.service").read_text())
    assert unit["ProtectSystem"] == ["strict"]
    site = tomllib.loads((DEPLOY / "site.example.toml").read_text())
    journal = PurePosixPath(site["grid"]["journal_path"])
    assert journal.is_absolute()
    writable = [PurePosixPath("/var/lib") / d for v in unit.get("StateDirectory", [])
                for d in v.split()]
    writable += [PurePosixPath(p.lstrip("-+")) for v in unit.get("ReadWritePaths", [])
                 for p in v.split()]
    assert any(journal.parent == w or w in journal.parents for w in writable), (
        f"{journal.parent} (grid.journal_path's directory, and its .lock) is read-only "
        f"under the unit; writable: {writable}")
    assert PurePosixPath("/var/lib/mineops") in writable

"""One controller per grid journal: a second `mineops run` refuses to start, naming the first.

The reviewer's case: two `mineops run --config site.toml` for one site both took the
broker client id `mineops-controller-<site>`, knocked each other off every ~0.5 s and
wrote the same SQLite journal unlocked. Real processes, a real mosquitto, real flock.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from controller.cli import main
from controller.grid.journal import JournalError, JournalLocked, lock_journal, lock_path
from controller.protocol.broker import LocalBroker
from tests.conftest import make_site, wait_for
from tests.test_grid import toml_of
from tests.test_stop import ROOT, Daemon

HOLD_LOCK = """
import sys, time
from controller.grid.journal import lock_journal
lock = lock_journal(sys.argv[1], holder="the test's holder")
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_lock_is_refused_and_names_the_holder(tmp_path: Path) -> None:
    journal = tmp_path / "state" / "grid.sqlite3"
    first = lock_journal(journal, holder="mineops run --config /etc/mineops/site.toml")
    assert lock_path(journal) == tmp_path / "state" / "grid.sqlite3.lock"
    with pytest.raises(JournalLocked) as refused:
        lock_journal(journal)  # flock is per open file: a second open in one process too
    message = str(refused.value)
    assert message.startswith(f"{journal} is in use by another mineops controller (pid "
                              f"{os.getpid()} on {socket.gethostname()}, since ")
    assert "mineops run --config /etc/mineops/site.toml" in message
    assert len(message.splitlines()) == 1
    assert not journal.exists(), "locking must not create the journal itself"
    first.release()
    lock_journal(journal).release()


def test_the_lock_of_a_killed_process_is_free(tmp_path: Path) -> None:
    journal = tmp_path / "grid.sqlite3"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(journal)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(JournalLocked, match=f"pid {holder.pid} .*the test's holder"):
            lock_journal(journal)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    lock_journal(journal).release()  # the kernel dropped the dead process's lock


@pytest.mark.parametrize("make_bad", ["a file as the directory", "a directory as the journal"])
def test_a_lock_where_no_journal_can_be_is_a_journal_error(tmp_path: Path,
                                                           make_bad: str) -> None:
    if make_bad == "a file as the directory":
        (tmp_path / "blocker").write_text("x")
        journal = tmp_path / "blocker" / "grid.sqlite3"
    else:
        journal = tmp_path / "dir"
        journal.mkdir()
    with pytest.raises(JournalError) as e:
        lock_journal(journal)
    assert not isinstance(e.value, JournalLocked)
    assert not lock_path(journal).exists()


def test_run_refuses_a_locked_journal_before_opening_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_site_file(tmp_path, broker_port=1)
    journal = tmp_path / "grid.sqlite3"
    held = lock_journal(journal, holder="another run")
    try:
        assert main(["--log-format", "json", "run", "--config", str(cfg)]) == 2
    finally:
        held.release()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mineops: ")]
    assert lines == [f"mineops: grid.journal_path: {journal} is in use by another mineops "
                     f"controller (pid {os.getpid()} on {socket.gethostname()}, since "
                     + lines[0].split(", since ", 1)[1]]
    assert "another run; lock " in lines[0]
    assert not journal.exists() and "grid_events_resumed" not in err


def test_run_with_its_metrics_port_taken_opens_no_journal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_site_file(tmp_path, broker_port=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["--log-format", "json", "run", "--config", str(cfg), "--metrics-port",
                     str(port)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"metrics endpoint 127.0.0.1:{port}: address already in use" in err
    assert "grid_events_resumed" not in err
    assert not (tmp_path / "grid.sqlite3").exists(), "the journal was opened"
    lock_journal(tmp_path / "grid.sqlite3").release()  # and the lock went with the process


def make_site_file(tmp_path: Path, broker_port: int) -> Path:
    """A small site file with its journal at tmp_path/grid.sqlite3."""
    # make_site reads only the broker's host and port; these tests need no broker running.
    broker = cast(LocalBroker, SimpleNamespace(host="127.0.0.1", port=broker_port))
    cfg = make_site(broker, [("a", "s21", 2)],
                    grid={"journal_path": str(tmp_path / "grid.sqlite3")})
    path = tmp_path / "site.toml"
    path.write_text(toml_of(cfg.model_dump(mode="json", exclude_none=True)))
    return path


def connects(d: Daemon) -> int:
    return d.log.read_bytes().count(b'"mqtt_connected"')


@pytest.mark.integration
async def test_a_second_controller_for_a_site_exits_2_and_the_first_runs_on(
        broker: LocalBroker, tmp_path: Path) -> None:
    site = make_site_file(tmp_path, broker.port)
    run = ["run", "--config", str(site), "--metrics-port", "0"]
    first = Daemon(run, tmp_path / "first.log")
    started: list[Daemon] = [first]
    try:
        await wait_for(lambda: connects(first) >= 1, timeout_s=30, what="the first connected")
        second = Daemon(run, tmp_path / "second.log")
        started.append(second)
        code = await asyncio.to_thread(second.proc.wait, 20)
        out = second.log.read_text()
        assert code == 2, out
        errors = [line for line in out.splitlines() if line.startswith("mineops: ")]
        assert errors == [errors[0]] and errors[0].startswith(
            f"mineops: grid.journal_path: {tmp_path / 'grid.sqlite3'} is in use by another "
            f"mineops controller (pid {first.proc.pid} on {socket.gethostname()}, since ")
        assert f"mineops run --config {site}, site 'test'" in errors[0]
        assert b"mqtt_connected" not in second.log.read_bytes()
        assert b"grid_events_resumed" not in second.log.read_bytes()
        await asyncio.sleep(1.5)  # the old fight: a disconnect every ~0.5 s
        assert first.proc.poll() is None
        assert connects(first) == 1, "the first controller was knocked off the broker"
        # A controller killed without a chance to clean up never blocks its restart.
        first.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.proc.wait, 10)
        third = Daemon(run, tmp_path / "third.log")
        started.append(third)
        await wait_for(lambda: connects(third) >= 1, timeout_s=30,
                       what="the restarted controller connected")
        assert third.proc.poll() is None
        holder = lock_path(tmp_path / "grid.sqlite3").read_text()
        assert holder.startswith(f"pid {third.proc.pid} on ")
        assert "grid_journal_lock_holder_not_recorded" not in third.log.read_text()
    finally:
        for d in started:
            d.close()

"""Cancel and SIGTERM stop the daemons within 5 s, whatever the broker is doing.

The broker answers, floods, freezes (SIGSTOP) or is gone (SIGKILL). A controller that
did not stop was traced to Python 3.11's `asyncio.wait_for`: when a decision trigger
fired in the loop iteration that cancelled the controller, wait_for returned instead of
raising, and the decision loop ran on forever (controller/cancellation.py). Every stop
here is timed on the wall clock; the flood cycles also cancel in exactly that iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from controller.cancellation import propagate_lost_cancel
from controller.cli.common import EXIT_STUCK
from controller.config import BrokerConfig, SiteConfig
from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from controller.protocol.transport import DISCONNECT_TIMEOUT_S, GOODBYE_TIMEOUT_S, Transport
from tests import mqtt_flood
from tests.conftest import make_site, task_stacks, wait_for
from tests.test_grid import toml_of
from tests.test_luxos_pyasic import free_loopback_base

ROOT = Path(__file__).resolve().parents[1]
STOP_BOUND_S = 5.0  # what the daemons promise for cancel and SIGTERM
RACKS = [(f"r{i:02d}", 40) for i in range(10)]  # a 400-miner site
# Rack messages per second: about twice what a controller digests on a developer's
# machine, so its event loop is saturated and a backlog builds. Unpaced, the flood
# saturates mosquitto itself, and merely connecting then takes longer than the test.
FLOOD_RATE_PER_S = 8000
FLOOD_CYCLES = 30


# --- helpers -------------------------------------------------------------------------


def flood_site(broker: LocalBroker) -> SiteConfig:
    return make_site(broker, [(g, "s21", n) for g, n in RACKS])


@contextlib.contextmanager
def flooding(broker: LocalBroker) -> Iterator[None]:
    """Another process publishing every rack's telemetry, FLOOD_RATE_PER_S messages a second."""
    with mqtt_flood.flooding(broker.host, broker.port, "test", RACKS, FLOOD_RATE_PER_S):
        yield


@contextlib.contextmanager
def frozen(broker: LocalBroker) -> Iterator[None]:
    """The broker stops answering (SIGSTOP): its sockets stay open, nothing is read."""
    pid = broker.pid
    assert pid is not None, "the broker is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def kill(broker: LocalBroker) -> None:
    """The broker dies at once (SIGKILL): no orderly shutdown, nothing listens any more."""
    pid = broker.pid
    assert pid is not None, "the broker is not running"
    os.kill(pid, signal.SIGKILL)


async def start_controller(cfg: SiteConfig, name: str) -> tuple[Controller, asyncio.Task[None]]:
    """A controller that has heard from every miner (under a flood: at once)."""
    controller = Controller(cfg)
    task = asyncio.create_task(controller.run(), name=name)
    try:
        await wait_for(lambda: bool(np.isfinite(controller.fleet.last_seen).all()),
                       what="telemetry from every miner")
    except BaseException:
        task.cancel()
        raise
    return controller, task


async def cancel_and_time(task: asyncio.Task[None]) -> float:
    """Cancel, wait for the end; seconds taken. A task that does not end fails with stacks."""
    started = time.monotonic()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=3 * STOP_BOUND_S)
    took = time.monotonic() - started
    if not done:
        pytest.fail(f"{task.get_name()} still running {took:.0f} s after cancel:\n"
                    f"{task_stacks()}")
    assert task.cancelled(), f"{task.get_name()} ended with {task.exception()!r}, not a stop"
    return took


# --- in-process: a Controller task cancelled -------------------------------------------


async def test_a_lost_cancellation_is_raised_again() -> None:
    """What aiomqtt's 3.11 wait_for can do to a cancel, and what the transport does about it."""

    async def swallows() -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            return "went on"
        return "slept"

    async def guarded() -> str:
        with propagate_lost_cancel():
            return await swallows()

    for body, ends_cancelled in ((swallows, False), (guarded, True)):
        task = asyncio.create_task(body())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task}, timeout=1)
        assert task.cancelled() is ends_cancelled

    # A timeout inside the block takes back its own cancel: no false alarm.
    async def times_out() -> str:
        with propagate_lost_cancel():
            try:
                async with asyncio.timeout(0.01):
                    await asyncio.sleep(60)
            except TimeoutError:
                return "timed out"
        return "slept"

    assert await asyncio.create_task(times_out()) == "timed out"


async def test_goodbye_and_disconnect_are_bounded_and_never_raise() -> None:
    """A session's end runs with the stop in flight: it must neither hang nor replace it."""

    async def hangs(*_: object) -> None:
        await asyncio.sleep(60)

    async def fails(*_: object) -> None:
        raise OSError("the socket broke while closing")

    class Client:  # stands in for aiomqtt.Client, whose __aexit__ is the disconnect
        def __init__(self, aexit: object) -> None:
            self.__aexit__ = aexit

    for end in (hangs, fails):
        transport = Transport(BrokerConfig(), client_id="t", subscriptions=[], on_close=end)
        started = time.monotonic()
        await transport._say_goodbye()
        await transport._disconnect(Client(end))  # type: ignore[arg-type]
        assert time.monotonic() - started < GOODBYE_TIMEOUT_S + DISCONNECT_TIMEOUT_S + 0.5


@pytest.mark.integration
async def test_cancel_as_a_decision_trigger_fires(broker: LocalBroker) -> None:
    """The race that lost the stop, made certain: trigger and cancel in one loop iteration."""
    cfg = make_site(broker, [("a", "s21", 20)])

    async def cycle(name: str) -> float:
        controller = Controller(cfg)
        controller.fleet.site.market_price_usd_per_mwh = 30.0  # no wait for a retained price
        task = asyncio.create_task(controller.run(), name=name)
        await wait_for(lambda: controller.decisions >= 1, what="a first decision")
        controller.trigger("test")
        await asyncio.sleep(0)  # the trigger's waiter has run; the decision loop has not
        return await cancel_and_time(task)

    for i in range(3):
        assert await cycle(f"controller-{i}") <= STOP_BOUND_S


@pytest.mark.integration
@pytest.mark.slow
async def test_controller_stops_under_a_telemetry_flood(broker: LocalBroker) -> None:
    cfg = flood_site(broker)
    rng = random.Random(7)
    took: list[float] = []
    with flooding(broker):
        for cycle in range(FLOOD_CYCLES):
            controller, task = await start_controller(cfg, f"controller-{cycle}")
            await asyncio.sleep(rng.uniform(0.0, 0.4))
            if cycle % 2:
                controller.trigger("test")  # and cancel in the iteration it fires
                await asyncio.sleep(0)
            took.append(await cancel_and_time(task))
    print(f"\n{FLOOD_CYCLES} stops under a flood: max {max(took):.2f} s, "
          f"mean {sum(took) / len(took):.2f} s")
    assert max(took) <= STOP_BOUND_S


@pytest.mark.integration
@pytest.mark.slow
async def test_controller_stops_while_the_broker_is_frozen(broker: LocalBroker) -> None:
    cfg = flood_site(broker)
    took: list[float] = []
    with flooding(broker):
        # Connected, with acknowledgements pending for a moment or for longer.
        for cycle, frozen_s in enumerate((0.2, 1.0)):
            _, task = await start_controller(cfg, f"controller-{cycle}")
            with frozen(broker):
                await asyncio.sleep(frozen_s)
                took.append(await cancel_and_time(task))
        # Connecting: the kernel accepts the TCP connection, the CONNACK never comes.
        with frozen(broker):
            task = asyncio.create_task(Controller(cfg).run(), name="controller-connecting")
            await asyncio.sleep(1.0)
            took.append(await cancel_and_time(task))
    print(f"\nstops with a frozen broker: {', '.join(f'{t:.2f}' for t in took)} s")
    assert max(took) <= STOP_BOUND_S


@pytest.mark.integration
@pytest.mark.slow
async def test_controller_stops_when_the_broker_is_gone(broker: LocalBroker) -> None:
    cfg = flood_site(broker)
    took: list[float] = []
    with flooding(broker):
        # At once, while reconnecting, and between two attempts.
        for cycle, gone_s in enumerate((0.0, 0.3, 1.5)):
            _, task = await start_controller(cfg, f"controller-{cycle}")
            kill(broker)
            await asyncio.sleep(gone_s)
            took.append(await cancel_and_time(task))
            broker.stop()  # reaps it
            broker.start()
    print(f"\nstops with the broker gone: {', '.join(f'{t:.2f}' for t in took)} s")
    assert max(took) <= STOP_BOUND_S


# --- subprocesses: SIGTERM to `mineops ...` ------------------------------------------


class Daemon:
    """A `mineops` subprocess with its JSON log in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "--log-format", "json", *args],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)

    def logged(self, event: str) -> bool:
        return f'"{event}"'.encode() in self.log.read_bytes()

    def sigterm_and_time(self, start: float) -> float:
        """Seconds from `start` (when SIGTERM was sent) until the process exited."""
        deadline = start + 3 * STOP_BOUND_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return time.monotonic() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._out.close()


@contextlib.contextmanager
def daemons(tmp_path: Path, cfg: SiteConfig, *commands: list[str]) -> Iterator[list[Daemon]]:
    """Start `mineops <command> --config site.toml` for each; kill what is left at the end."""
    site = tmp_path / "site.toml"
    site.write_text(toml_of(cfg.model_dump(mode="json", exclude_none=True)))
    started: list[Daemon] = []
    try:
        for i, command in enumerate(commands):
            started.append(Daemon([*command, "--config", str(site)],
                                  tmp_path / f"{command[0]}-{i}.log"))
        yield started
    finally:
        for d in started:
            d.close()


def sigterm_all(procs: list[Daemon]) -> dict[str, tuple[float, int | None, str]]:
    """SIGTERM every daemon at once; per command: (seconds to exit, exit code, log tail)."""
    start = time.monotonic()
    for d in procs:
        d.proc.send_signal(signal.SIGTERM)
    took = {d.args[0]: d.sigterm_and_time(start) for d in procs}
    return {d.args[0]: (took[d.args[0]], d.proc.poll(), d.log.read_text(errors="replace")[-3000:])
            for d in procs}


def assert_stopped(results: dict[str, tuple[float, int | None, str]]) -> None:
    for command, (took, code, tail) in results.items():
        assert code == 0 and took <= STOP_BOUND_S, (
            f"mineops {command}: exit code {code} after {took:.2f} s (bound {STOP_BOUND_S} s)\n"
            f"{tail}")


async def wait_connected(procs: list[Daemon]) -> None:
    await wait_for(lambda: all(d.logged("mqtt_connected") for d in procs), timeout_s=30,
                   what="every daemon connected to the broker")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("broker_state", ["answering", "frozen", "gone"])
async def test_run_and_simulate_exit_on_sigterm(broker: LocalBroker, tmp_path: Path,
                                                broker_state: str) -> None:
    cfg = make_site(broker, [("a", "s21", 40), ("b", "s19j_pro", 40)])
    with daemons(tmp_path, cfg, ["run"], ["simulate", "--speed", "30",
                                          "--telemetry-interval", "0.2"]) as procs:
        await wait_connected(procs)
        await asyncio.sleep(1.0)  # telemetry, decisions and commands in flight
        with contextlib.ExitStack() as state:
            if broker_state == "frozen":
                state.enter_context(frozen(broker))
            elif broker_state == "gone":
                kill(broker)
            await asyncio.sleep(0.5)
            results = await asyncio.to_thread(sigterm_all, procs)
    print(f"\nbroker {broker_state}: " + ", ".join(
        f"mineops {c} exited in {t:.2f} s" for c, (t, _, _) in results.items()))
    assert_stopped(results)


@pytest.mark.integration
@pytest.mark.slow
async def test_bridge_and_ven_exit_on_sigterm_with_a_frozen_broker(
        broker: LocalBroker, tmp_path: Path) -> None:
    # No miner answers the bridge and no VTN the VEN: both keep trying, the MQTT side runs.
    cfg = make_site(
        broker, [("a", "s21", 20)],
        bridge={"miners": [{"group": "a", "first_host": free_loopback_base(),
                            "firmware": "luxos"}], "poll_interval_s": 0.5, "timeout_s": 2.0},
        openadr={"vtn_url": "http://127.0.0.1:1/OpenADR2/Simple/2.0b", "ven_name": "stop-test",
                 "level_1_kw": 100})
    with daemons(tmp_path, cfg, ["bridge"], ["ven"]) as procs:
        await wait_connected(procs)
        await asyncio.sleep(1.0)
        with frozen(broker):
            await asyncio.sleep(0.5)
            results = await asyncio.to_thread(sigterm_all, procs)
    print("\nbroker frozen: " + ", ".join(
        f"mineops {c} exited in {t:.2f} s" for c, (t, _, _) in results.items()))
    assert_stopped(results)


@contextlib.contextmanager
def port_that_drops_syns() -> Iterator[int]:
    """A port where a TCP connect hangs, as to a broker host that is switched off.

    A listener that never accepts, its accept queue full: Linux then drops new SYNs.
    """
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):  # a backlog of 0 still queues one; some kernels one more
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.1)
        with socket.socket() as probe, pytest.raises(TimeoutError):
            probe.settimeout(0.5)
            probe.connect(("127.0.0.1", port))
        yield port
    finally:
        for sock in (*fillers, listener):
            sock.close()


@pytest.mark.slow
async def test_run_exits_on_sigterm_while_connecting_to_a_host_that_drops_syns(
        tmp_path: Path) -> None:
    """aiomqtt connects in the default executor; the exit must not wait for that thread."""
    with port_that_drops_syns() as port:
        cfg = make_site(SimpleNamespace(host="127.0.0.1", port=port),  # type: ignore[arg-type]
                        [("a", "s21", 4)])
        with daemons(tmp_path, cfg, ["run"]) as procs:
            await wait_for(lambda: procs[0].logged("controller_starting"), timeout_s=30,
                           what="the controller starting")
            await asyncio.sleep(0.3)  # its connect is in flight: paho gives up after 5 s
            results = await asyncio.to_thread(sigterm_all, procs)
    print("\nconnect hanging: " + ", ".join(
        f"mineops {c} exited in {t:.2f} s" for c, (t, _, _) in results.items()))
    assert_stopped(results)


# --- the backstop: a stop that hangs all the same ------------------------------------

STUBBORN = """
import asyncio
from controller.cli.common import run_async

async def stubborn_task() -> int:
    print("started", flush=True)
    while True:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass  # the kind of bug the backstop is there for

raise SystemExit(run_async(stubborn_task()))
"""


@pytest.mark.slow
def test_a_stop_that_hangs_is_reported_and_the_process_exits() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], cwd=ROOT, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=3 * STOP_BOUND_S)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == EXIT_STUCK, err[-2000:]
    assert took <= STOP_BOUND_S
    # Where it hangs: the task's stack, with its pending cancel request.
    assert "still running" in err and "stubborn_task" in err and "cancel requests: 1" in err

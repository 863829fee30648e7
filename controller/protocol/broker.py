"""A local MQTT broker for the demo and the tests: mosquitto when installed, else amqtt.

Both run as a child process bound to 127.0.0.1 on a port of our choosing, so the
demo needs no system service and tests never touch the machine's own broker.
mosquitto is preferred: amqtt (pure Python) moves only a few thousand messages
a second, enough for the demo's per-rack telemetry but not for benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from controller.extras import MissingExtra, installed

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of a mosquitto binary, if this machine has one (Debian puts it in /usr/sbin)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, as the kernel picks one (another process may take it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Block until something accepts TCP connections on `host`:`port`.

    Raises:
        TimeoutError: nothing accepted within `timeout_s` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:g} s")


class LocalBroker:
    """A broker child process on 127.0.0.1:`port`; `stop()`/`start()` can be repeated.

    Args:
        port: The port to listen on; None: a free one (`free_port`).
        prefer: "auto" (mosquitto if installed, else amqtt), "mosquitto" or "amqtt".
        persistence: mosquitto only: keep retained messages and sessions across a clean
            stop or `save()`, as a site's broker does.

    Raises:
        ValueError: an unknown `prefer`.
        RuntimeError: "mosquitto" asked for and not installed.
        MissingExtra: no mosquitto and no amqtt (`mineops[embedded-broker]`).
    """

    def __init__(self, port: int | None = None, *, prefer: str = "auto",
                 persistence: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        if prefer not in ("auto", "mosquitto", "amqtt"):
            raise ValueError(f"unknown broker {prefer!r}: auto, mosquitto or amqtt")
        mosquitto = find_mosquitto() if prefer in ("auto", "mosquitto") else None
        if prefer == "mosquitto" and mosquitto is None:
            raise RuntimeError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        if mosquitto is None and not installed("embedded-broker"):
            raise MissingExtra("embedded-broker", "a local MQTT broker",
                               "or install mosquitto: apt-get install mosquitto")
        self.kind = "mosquitto" if mosquitto else "amqtt"
        self._mosquitto = mosquitto
        self._dir = tempfile.TemporaryDirectory(prefix="mineops-broker-")
        self._proc: subprocess.Popen[bytes] | None = None
        # mosquitto only: retained messages and sessions saved in its directory on a clean
        # stop or on save() (SIGUSR1), never on a timer, so a test decides what a kill loses.
        self.persistence = persistence

    def _command(self) -> list[str]:
        if self._mosquitto:
            conf = Path(self._dir.name) / "mosquitto.conf"
            # Started as root, mosquitto runs as the user `mosquitto` unless told to stay,
            # and that user cannot write the private directory it saves in.
            persistence = (f"persistence true\npersistence_location {self._dir.name}/\n"
                           "autosave_interval 0\nuser root\n" if self.persistence else
                           "persistence false\n")
            conf.write_text(
                f"listener {self.port} {self.host}\n"
                "allow_anonymous true\n"
                f"{persistence}"
                "max_queued_messages 100000\n"
                # Nagle's algorithm would hold small messages ~40 ms for a delayed ACK.
                "set_tcp_nodelay true\n"
                "log_dest stderr\n"
                "log_type error\n"
                "log_type warning\n"
            )
            return [self._mosquitto, "-c", str(conf)]
        return [sys.executable, "-m", "controller.protocol.broker", "--port", str(self.port)]

    def start(self) -> LocalBroker:
        """Start the broker unless it runs; return once it accepts connections.

        Raises:
            RuntimeError: it did not listen within 10 s (the message has its log's tail).
        """
        if self._proc is not None and self._proc.poll() is None:
            return self
        log = (Path(self._dir.name) / "broker.log").open("ab")
        # Its own session: Ctrl-C in the demo's terminal goes to the demo, which stops its
        # clients (their last words need the broker) and then the broker.
        self._proc = subprocess.Popen(
            self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.kind} did not start: {self.log_tail()}") from None
        return self

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (tests freeze it with SIGSTOP)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def save(self, timeout_s: float = 5.0) -> None:
        """Have mosquitto write its retained messages and sessions (SIGUSR1), and wait for it.

        Raises:
            RuntimeError: no persistence, or nothing written within `timeout_s`.
        """
        pid = self.pid
        if not self.persistence or pid is None:
            raise RuntimeError("save() needs a running mosquitto with persistence=True")
        db = Path(self._dir.name) / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else None
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        while not db.exists() or db.stat().st_mtime_ns == before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto wrote no {db} within {timeout_s:g} s")
            time.sleep(0.02)

    def kill(self) -> None:
        """Die at once (SIGKILL): nothing is saved; `start()` brings it back on the same port."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Stop the broker cleanly (SIGTERM, SIGKILL after 5 s); `start()` brings it back."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a frozen broker would not act on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self) -> str:
        """The last 2,000 characters of the broker's own log, for error messages."""
        path = Path(self._dir.name) / "broker.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def close(self) -> None:
        """Stop the broker and delete its directory (config, log, persistence)."""
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _serve_amqtt(port: int) -> None:
    from amqtt.broker import Broker  # noqa: PLC0415 - only the child process needs it

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def serve() -> None:
        broker = Broker(config)
        await broker.start()
        try:
            await asyncio.Event().wait()
        finally:
            await broker.shutdown()

    asyncio.run(serve())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the embedded amqtt broker on 127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    _serve_amqtt(parser.parse_args().port)

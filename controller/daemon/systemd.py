"""systemd service notifications (sd_notify) over $NOTIFY_SOCKET: ready, status and watchdog.

With `Type=notify` systemd waits for READY=1 before it counts the service as
started; with `WatchdogSec=` it restarts the service when WATCHDOG=1 pings stop.
The pings are sent by a task on the controller's event loop, so a loop that is
stuck (a blocking call, a runaway computation) stops them and systemd restarts
the daemon. Without $NOTIFY_SOCKET (not under systemd) nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("mineops.systemd")


class Notifier:
    """A datagram socket to systemd's notification socket; sending never raises.

    Args:
        address: $NOTIFY_SOCKET: a path, or "@name" for the abstract namespace (Linux).
    """

    def __init__(self, address: str) -> None:
        # A leading '@' names a socket in the abstract namespace (Linux).
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier | None:
        """A notifier for $NOTIFY_SOCKET, or None when not started by systemd."""
        address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
        return cls(address) if address else None

    def send(self, *assignments: str) -> bool:
        """Send 'KEY=value' lines in one datagram; False (logged once) if it did not go."""
        try:
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as e:
            if not self._warned:
                log.warning("sd_notify_failed", socket=self.address.lstrip("\0"), error=str(e))
                self._warned = True
            return False
        return True

    def close(self) -> None:
        """Close the notification socket."""
        self._sock.close()


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings: half of $WATCHDOG_USEC, or None if no watchdog is set for us."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


async def supervise(connected: asyncio.Event, env: Mapping[str, str] | None = None) -> None:
    """Tell systemd READY=1 once `connected` is first set; ping the watchdog until cancelled."""
    notifier = Notifier.from_env(env)
    if notifier is None:
        return
    interval = watchdog_interval_s(env)
    log.info("sd_notify_enabled", watchdog_interval_s=interval)
    ready = False
    try:
        while True:
            if not ready and connected.is_set():
                ready = True  # one attempt: a failure is logged by the notifier
                if notifier.send("READY=1", "STATUS=connected to the MQTT broker"):
                    log.info("sd_notify_ready")
            if interval is not None:
                notifier.send("WATCHDOG=1")
            if not ready:
                # Ping on time, but say READY as soon as the first connect happens.
                # asyncio.timeout: 3.11's wait_for can swallow the stop (cancellation.py).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await connected.wait()
            elif interval is not None:
                await asyncio.sleep(interval)
            else:
                await asyncio.Event().wait()  # no watchdog: only STOPPING=1 is left to say
    finally:
        if ready:
            notifier.send("STOPPING=1")
        notifier.close()

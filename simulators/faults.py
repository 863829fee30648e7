"""Faults of an operator's bad day, for the fault-matrix tests and the soak benchmark.

Each fault acts on a real part from outside the controller: the simulated miners
(rebooted at stock, deaf firmware, a silent meter), the network between a client and
the broker (`TcpProxy`), the broker process (`LocalBroker.kill`, `save`), the journal's
disk (`fill_disk`, `refuse_writes`) and the wall clock the controller reads
(`SteppedClock`). None of them changes how the controller decides. `PowerJudge`
samples the simulator's *true* site power (the miners' draw plus auxiliary load,
without meter noise) against the cap in force, so a test judges what the grid would
see, not what the controller believes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from simulators.fleet import Mode, SimulatedFleet
from simulators.site import SimulatedSite


def true_site_power_w(site: SimulatedSite) -> float:
    """What the site draws at the point of interconnection now, W (no meter noise)."""
    site.fleet.step(time.monotonic())
    return site.fleet.total_power_w() * (1.0 + site.cfg.energy.aux_fraction)


# -- miners -------------------------------------------------------------------------------


def reboot(fleet: SimulatedFleet, idx: npt.NDArray[np.intp], now: float) -> None:
    """The miners at `idx` restart (a power blip, a firmware or bridge restart).

    They boot (waking, `wake_s`) to stock power, whatever they were told before, and
    their acknowledged sequence starts again at 0.
    """
    fleet.step(now)
    fleet.mode[idx] = Mode.WAKING
    fleet.until[idx] = now + fleet.wake_s[idx] / fleet.speed
    fleet.target_w[idx] = fleet.nominal_w[idx]
    fleet.ack_seq[idx] = 0


def restart_at_stock(fleet: SimulatedFleet, idx: npt.NDArray[np.intp], now: float) -> None:
    """The miners at `idx` come back at once at stock power with `ack_seq` 0 (no boot time).

    What the controller sees after a bridge restart that re-applied the firmware's
    defaults: the worst case, since nothing is left to shed by waiting.
    """
    fleet.step(now)
    fleet.mode[idx] = Mode.RUNNING
    fleet.target_w[idx] = fleet.nominal_w[idx]
    fleet.power_w[idx] = fleet.nominal_w[idx]
    fleet.ack_seq[idx] = 0


def deafen(fleet: SimulatedFleet, idx: npt.NDArray[np.intp], deaf: bool = True) -> None:
    """Firmware at `idx` acknowledges every command and applies none (or again applies)."""
    fleet.deaf[idx] = deaf


@contextlib.contextmanager
def silenced(site: SimulatedSite, part: str) -> Iterator[None]:
    """Messages the site publishes on topics containing `part` are not sent while inside.

    `silenced(site, "/meter/")` is a meter that stops reporting while the miners go on.
    """
    transport = site.transport
    publish = transport.publish

    async def quiet(topic: str, payload: bytes | str, *, qos: int = 0,
                    retain: bool = False) -> bool:
        if part in topic:
            return True  # the device believes it sent it; nothing arrives
        return await publish(topic, payload, qos=qos, retain=retain)

    transport.publish = quiet  # type: ignore[method-assign]
    try:
        yield
    finally:
        transport.publish = publish  # type: ignore[method-assign]


# -- the network and the broker ------------------------------------------------------------


class TcpProxy:
    """A TCP relay between clients and the broker that a test can cut, to partition them.

    Point a client's broker port at `port`. `cut()` drops every connection through it
    and refuses new ones (the client sees the broker go away) until `restore()`.

    Args:
        host: The broker's address.
        port: The broker's port.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self.blocked = False
        self.host = "127.0.0.1"
        self.port = 0

    async def start(self) -> TcpProxy:
        """Listen on 127.0.0.1 at a free port (`port`)."""
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        """Drop every connection and stop listening."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every connection now and refuse new ones."""
        self.blocked = True
        for w in list(self._links):
            w.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        """Accept connections again."""
        self.blocked = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._links.update(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in pair:
                self._links.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()  # one side gone: the other must see it too


# -- the controller's surroundings ----------------------------------------------------------


class SteppedClock:
    """A wall clock (Unix s) that an operator or NTP can step; inject it as `wall_clock`."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        """The stepped wall clock now, Unix s."""
        return time.time() + self.offset_s

    def step(self, seconds: float) -> None:
        """Step the clock by `seconds` (negative: back), as NTP or an operator would."""
        self.offset_s += seconds


def fill_disk(db: sqlite3.Connection, full: bool = True) -> None:
    """The disk under an SQLite connection fills up: it cannot grow by a page (or can again).

    Writes that need a new page then fail as on a full disk ("database or disk is full");
    a small write into a page with room left still succeeds, as it can on a real disk.
    """
    pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    db.execute(f"PRAGMA max_page_count = {pages if full else 1_073_741_823}")


def refuse_writes(db: sqlite3.Connection, refuse: bool = True) -> None:
    """Every write through an SQLite connection fails (or works again).

    What a disk remounted read-only after an I/O error, or one with no block left for
    the write-ahead log, looks like to SQLite: each commit is refused ("attempt to write
    a readonly database"); reading goes on.
    """
    db.execute(f"PRAGMA query_only = {1 if refuse else 0}")


# -- the judge ------------------------------------------------------------------------------


@dataclass
class PowerJudge:
    """Samples the site's true power; the time over the cap in force is the verdict.

    The samples are taken on a thread of their own, so a busy event loop (a flood being
    handled) cannot thin them out: the judge sees the site, not the controller's pace.

    Args:
        site: The simulated site (its true power is the judge, not any message).
        cap_w: The cap in force at a Unix time (real wall clock), W; None: none. Asked
            when a verdict is asked for, so a test may name its caps at any time.
        interval_s: Sampling period, s.
    """

    site: SimulatedSite
    cap_w: Callable[[float], float | None]
    interval_s: float = 0.05
    samples: list[tuple[float, float]] = field(default_factory=list)

    async def run(self) -> None:
        """Sample until cancelled."""
        stop = threading.Event()
        thread = threading.Thread(target=self._sample, args=(stop,), name="power-judge",
                                  daemon=True)
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            stop.set()
            thread.join(timeout=1.0)

    def _sample(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            self.samples.append((time.time(), true_site_power_w(self.site)))

    def judged(self, since_ts: float, until_ts: float = float("inf")
               ) -> list[tuple[float, float, float]]:
        """Samples in [since_ts, until_ts) under a cap: (time, true W, cap W)."""
        out = []
        for t, w in self.samples:
            if since_ts <= t < until_ts:
                cap = self.cap_w(t)
                if cap is not None:
                    out.append((t, w, cap))
        return out

    def over(self, since_ts: float, until_ts: float = float("inf")
             ) -> list[tuple[float, float, float]]:
        """Samples in [since_ts, until_ts) over their cap: (time, true W, cap W)."""
        return [s for s in self.judged(since_ts, until_ts) if s[1] > s[2]]

    def over_s(self, since_ts: float, until_ts: float = float("inf")) -> float:
        """Seconds over the cap in [since_ts, until_ts) (samples over x the period)."""
        return len(self.over(since_ts, until_ts)) * self.interval_s

    def sampled_s(self, since_ts: float, until_ts: float = float("inf")) -> float:
        """Seconds judged in [since_ts, until_ts): a verdict over no samples proves nothing."""
        return len(self.judged(since_ts, until_ts)) * self.interval_s

    def power_at(self, ts: float) -> float:
        """True power of the sample nearest `ts`, W."""
        return min(self.samples, key=lambda s: abs(s[0] - ts))[1]

    def verdict(self, since_ts: float, until_ts: float = float("inf")) -> str:
        """One line for an assertion message: time over, the worst excess."""
        over = self.over(since_ts, until_ts)
        if not over:
            return "never over the cap"
        t, w, c = max(over, key=lambda s: s[1] - s[2])
        return (f"{len(over) * self.interval_s:.2f} s over the cap; worst {w / 1e3:.1f} kW "
                f"against {c / 1e3:.1f} kW ({(w / c - 1) * 100:+.1f} %) at "
                f"{t - since_ts:+.2f} s")

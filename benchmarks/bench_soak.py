"""Soak: hours of site time at high speed under random faults; over-cap seconds, events lost, RSS.

A simulated site (~100 miners, a cap 7.2 % under their stock draw, so it binds) runs
here at `--speed` times real time on a real mosquitto (with persistence), and the
controller runs as its own process, so it can be SIGKILLed and its memory read. Faults
come one at a time at random (seeded), each from outside the controller:

- broker: mosquitto SIGKILLed (after its last save, as the shipped autosave allows),
  down for a while, restarted on the same port;
- controller: SIGKILLed, restarted over the same journal;
- device: a random share of the miners restart at stock power with `ack_seq` 0;
- bridge: the site's MQTT client restarts and its miners come back at stock;
- flood: rack telemetry from another process at `--flood-rate` messages a second;
- clock: the controller's wall clock stepped an hour back or forward (a signal to it);
- journal: the controller's journal refuses every write for a while (a signal to it).

Grid events (target_kw at 50-85 % of the cap, with notice) are published all along,
some tightened or cancelled by a newer version later. The judge is the simulator's true
power (`simulators.faults.PowerJudge`) against the cap in force: the site's, or an
event's target from its deadline to its end. Time over it counts "after settling" except
while the broker or the controller is down and for `--settle` seconds after any fault
ends (no controller can act through a dead broker). An event is lost when the journal
does not end with its last version. Prints a table per fault kind and, last, one JSON line.

    python benchmarks/bench_soak.py [--site-hours 4] [--speed 60] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.grid.journal import GridJournal
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import GridEvent, PriceSignal
from controller.protocol.topics import SiteTopics
from controller.protocol.transport import Transport
from simulators.faults import PowerJudge, restart_at_stock
from simulators.site import SimulatedSite

ROOT = Path(__file__).resolve().parents[1]
RACKS = [("a", "s21", 20), ("b", "s21", 20), ("c", "s19j_pro", 20), ("d", "s19j_pro", 20),
         ("e", "m60s", 20)]
AUX = 0.05
KINDS = ("broker", "controller", "device", "bridge", "flood", "clock", "journal")


def site_config(port: int, journal: Path) -> SiteConfig:
    catalogue = load_catalogue()
    stock_kw = sum(catalogue.get(m).nominal_w * n for _, m, n in RACKS) * (1 + AUX) / 1000
    return SiteConfig.model_validate({
        "site_id": "soak",
        "broker": {"host": "127.0.0.1", "port": port, "reconnect_max_s": 0.5,
                   "keepalive_s": 5},
        "fleet": {"groups": [{"name": g, "model": m, "count": n} for g, m, n in RACKS]},
        "meters": [{"type": "mineops", "id": "poi"}],
        "power_cap_kw": round(stock_kw / 1.072, 1),
        "hashprice_usd_per_ph_day": 42.0,
        "energy": {"adders_usd_per_mwh": 0.0, "aux_fraction": AUX},
        "policy": {"decision_interval_s": 0.5, "telemetry_stale_s": 5.0, "min_run_s": 0.0,
                   "min_sleep_s": 0.0, "wake_latency_factor": 0.0},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "grid": {"journal_path": str(journal), "prepare_s": 3.0, "record_interval_s": 1.0},
    })


# -- the controller's own process ----------------------------------------------------------


def controller_main(config: Path) -> int:
    """`--controller FILE`: the daemon with a wall clock and a journal the bench can fault."""
    from controller.cli.common import run_async  # noqa: PLC0415
    from controller.daemon.loop import Controller  # noqa: PLC0415
    from simulators.faults import SteppedClock, refuse_writes  # noqa: PLC0415

    cfg = pickle.loads(config.read_bytes())
    clock = SteppedClock()

    async def main() -> int:
        c = Controller(cfg, wall_clock=clock)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, clock.step, -3600.0)
        loop.add_signal_handler(signal.SIGUSR2, clock.step, 3600.0)
        refusing = [False]

        def toggle() -> None:
            refusing[0] = not refusing[0]
            refuse_writes(c.grid.journal._db, refusing[0])

        loop.add_signal_handler(signal.SIGHUP, toggle)
        await c.run()
        return 0

    return run_async(main())


class ControllerProcess:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.max_rss_kib = 0

    def start(self) -> None:
        with (self.config.parent / "controller.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--controller", str(self.config)], cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=log)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def sample_rss(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError, ValueError):
                self.max_rss_kib = max(self.max_rss_kib, int(rss_mib(self.proc.pid) * 1024))


def flood(broker: LocalBroker, site_id: str, rate_per_s: int) -> subprocess.Popen[bytes]:
    """Rack telemetry from another process (tests/mqtt_flood.py), until killed."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.mqtt_flood", broker.host, str(broker.port), site_id,
         str(rate_per_s), *(f"{g}:{n}" for g, _, n in RACKS)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


# -- the soak ------------------------------------------------------------------------------


@dataclass
class Soak:
    args: argparse.Namespace
    broker: LocalBroker
    cfg: SiteConfig
    sim: SimulatedSite
    controller: ControllerProcess
    publisher: Transport
    rng: random.Random
    judge: PowerJudge = field(init=False)
    unsettled: list[tuple[float, float, str]] = field(default_factory=list)  # (from, to, kind)
    faults: Counter[str] = field(default_factory=Counter)
    fault_windows: list[tuple[float, float, str]] = field(default_factory=list)
    events: dict[str, GridEvent] = field(default_factory=dict)  # last version published
    targets: list[tuple[str, float, float, float]] = field(default_factory=list)
    cancelled_at: dict[str, float] = field(default_factory=dict)
    _sim_task: asyncio.Task[None] = field(init=False)

    def __post_init__(self) -> None:
        self.judge = PowerJudge(self.sim, self.cap_at, interval_s=0.05)

    def cap_at(self, ts: float) -> float:
        cap = self.cfg.power_cap_kw * 1000.0
        for event_id, deadline, end, target in self.targets:
            cancelled = self.cancelled_at.get(event_id, math.inf)
            if deadline <= ts < min(end, cancelled):
                cap = min(cap, target)
        return cap

    async def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> bool:
        """Publish once the broker is there (10 s at most); False if it did not take it."""
        try:
            async with asyncio.timeout(10):
                await self.publisher.connected.wait()
        except TimeoutError:
            return False
        return await self.publisher.publish(topic, payload, qos=1, retain=retain)

    # -- grid events and prices --

    async def grid_source(self) -> None:
        topics = SiteTopics(self.cfg.site_id)
        n = 0
        cap_kw = self.cfg.power_cap_kw
        while True:
            await asyncio.sleep(self.rng.uniform(6.0, 14.0))
            n += 1
            now = time.time()
            start = now + self.rng.uniform(6.0, 12.0)
            ev = GridEvent(id=f"soak-{n}", kind="target_kw",
                           value_kw=round(self.rng.uniform(0.5, 0.85) * cap_kw, 1),
                           start_ts=start, end_ts=start + self.rng.uniform(6.0, 20.0),
                           version=int(now * 1000), source="soak")
            if not await self.publish(topics.grid, ev.encode()):
                continue  # the broker is down: a real source retries; this one moves on
            self.events[ev.id] = ev
            self._hold(ev, ev.met_by_ts)
            change = self.rng.random()
            if change < 0.5:
                continue
            await asyncio.sleep(self.rng.uniform(0.5, 4.0))
            if change < 0.75:
                newer = ev.model_copy(update={
                    "value_kw": round(ev.value_kw * 0.8, 1),  # type: ignore[operator]
                    "version": int(time.time() * 1000)})
            else:
                newer = ev.model_copy(update={"cancelled": True,
                                              "version": int(time.time() * 1000)})
            if await self.publish(topics.grid, newer.encode()):
                self.events[ev.id] = newer
                if newer.cancelled:
                    self.cancelled_at[ev.id] = time.time() + self.args.settle
                else:  # a tighter target past the deadline: met once the site could
                    self._hold(newer, max(newer.met_by_ts, time.time() + self.args.settle))

    def _hold(self, ev: GridEvent, from_ts: float) -> None:
        assert ev.value_kw is not None
        self.targets.append((ev.id, from_ts, ev.end_ts, ev.value_kw * 1000.0))

    async def prices(self) -> None:
        topics = SiteTopics(self.cfg.site_id)
        while True:
            price = self.rng.choice([5.0, 5.0, 20.0, 40.0, 80.0])
            await self.publish(topics.price,
                               PriceSignal(ts=time.time(), price_usd_per_mwh=price).encode())
            await asyncio.sleep(self.rng.uniform(5.0, 15.0))

    # -- faults --

    async def faults_loop(self) -> None:
        kinds = [k for k in KINDS if k in self.args.faults]
        await asyncio.sleep(5.0)
        while True:
            await asyncio.sleep(self.rng.expovariate(1.0 / self.args.fault_every))
            kind = self.rng.choice(kinds)
            started = time.time()
            blind = await getattr(self, f"fault_{kind}")()
            ended = time.time()
            self.faults[kind] += 1
            self.fault_windows.append((started, ended, kind))
            if blind:
                self.unsettled.append((started, ended + self.args.settle, kind))
            else:
                self.unsettled.append((started, started + self.args.settle, kind))

    async def fault_broker(self) -> bool:
        self.broker.kill()
        await asyncio.sleep(self.rng.uniform(1.0, 6.0))
        self.broker.start()
        return True

    async def fault_controller(self) -> bool:
        self.controller.kill()
        await asyncio.sleep(self.rng.uniform(1.0, 4.0))
        self.controller.start()
        await asyncio.sleep(2.0)  # a process start: imports, connect
        return True

    async def fault_device(self) -> bool:
        n = self.sim.fleet.power_w.size
        idx = np.array(sorted(self.rng.sample(range(n), self.rng.randint(n // 10, n))))
        restart_at_stock(self.sim.fleet, idx, time.monotonic())
        return False

    async def fault_bridge(self) -> bool:
        self._sim_task.cancel()
        await asyncio.gather(self._sim_task, return_exceptions=True)
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))
        restart_at_stock(self.sim.fleet, np.arange(self.sim.fleet.power_w.size),
                         time.monotonic())
        self._sim_task = asyncio.create_task(self.sim.run())
        return True

    async def fault_flood(self) -> bool:
        proc = flood(self.broker, self.cfg.site_id, self.args.flood_rate)
        try:
            await asyncio.sleep(self.rng.uniform(3.0, 8.0))
        finally:
            proc.kill()
            proc.wait()
        return False

    async def fault_clock(self) -> bool:
        """An hour back or forward; NTP puts it right a while later."""
        back = self.rng.random() < 0.5
        self.controller.signal(signal.SIGUSR1 if back else signal.SIGUSR2)
        try:
            await asyncio.sleep(self.rng.uniform(2.0, 20.0))
        finally:
            self.controller.signal(signal.SIGUSR2 if back else signal.SIGUSR1)
        return False

    async def fault_journal(self) -> bool:
        self.controller.signal(signal.SIGHUP)
        try:
            await asyncio.sleep(self.rng.uniform(2.0, 10.0))
        finally:
            self.controller.signal(signal.SIGHUP)
        return False

    async def housekeeping(self) -> None:
        while True:
            self.controller.sample_rss()
            if self.rng.random() < 0.1:  # mosquitto's autosave, now and then
                with contextlib.suppress(RuntimeError):
                    self.broker.save()
            await asyncio.sleep(1.0)

    async def run(self, duration_s: float) -> None:
        self._sim_task = asyncio.create_task(self.sim.run())
        tasks = [asyncio.create_task(c) for c in (
            self.publisher.run(lambda *_: None), self.judge.run(), self.grid_source(),
            self.prices(), self.faults_loop(), self.housekeeping())]
        try:
            await asyncio.sleep(duration_s)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._sim_task.cancel()
            await asyncio.gather(self._sim_task, return_exceptions=True)

    # -- verdicts --

    def settled(self, ts: float) -> bool:
        return not any(a <= ts < b for a, b, _ in self.unsettled)

    def over_s(self, since: float) -> tuple[float, float, dict[str, float]]:
        """Seconds over the cap: raw, after settling, and raw by the fault in progress."""
        raw = after = 0.0
        by: dict[str, float] = {}
        for t, _, _ in self.judge.over(since):
            raw += self.judge.interval_s
            if self.settled(t):
                after += self.judge.interval_s
            kind = next((k for a, b, k in self.unsettled if a <= t < b), "none")
            by[kind] = by.get(kind, 0.0) + self.judge.interval_s
        return raw, after, by

    def lost(self) -> list[str]:
        journal = GridJournal(self.cfg.grid.journal_path)
        try:
            rows = {r.id: r for r in journal.rows()}
        finally:
            journal.close()
        out = []
        for event_id, ev in self.events.items():
            row = rows.get(event_id)
            if row is None or row.version != ev.version or (
                    row.status == "cancelled") != ev.cancelled:
                out.append(event_id)
        return out


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="mineops-soak-"))
    rng = random.Random(args.seed)
    with LocalBroker(prefer="mosquitto", persistence=True) as broker:
        cfg = site_config(broker.port, work / "grid.db")
        config = work / "site.pickle"
        config.write_bytes(pickle.dumps(cfg))
        sim = SimulatedSite(cfg, speed=args.speed, telemetry_interval_s=0.2,
                            meter_interval_s=0.1, seed=args.seed)
        controller = ControllerProcess(config)
        controller.start()
        publisher = Transport(cfg.broker, client_id="soak-grid-source", subscriptions=[],
                              persistent_session=True)
        s = Soak(args=args, broker=broker, cfg=cfg, sim=sim, controller=controller,
                 publisher=publisher, rng=rng)
        duration_s = args.site_hours * 3600.0 / args.speed
        started = time.time()
        settle_from = started + 15.0  # the site's first settling
        s.unsettled.append((started, settle_from, "start"))
        try:
            await s.run(duration_s)
        finally:
            controller.stop()
        raw, after, by = s.over_s(started)
        lost = s.lost()
        judged = s.judge.sampled_s(started)
        return {
            "site_hours": round(duration_s * args.speed / 3600.0, 2), "speed": args.speed,
            "real_s": round(time.time() - started, 1), "seed": args.seed,
            "miners": sum(n for _, _, n in RACKS), "faults": dict(s.faults),
            "judged_s": round(judged, 1), "over_cap_s_raw": round(raw, 2),
            "over_cap_s_after_settling": round(after, 2),
            "over_cap_s_by_fault": {k: round(v, 2) for k, v in sorted(by.items())},
            "events_published": len(s.events), "events_lost": len(lost), "lost": lost,
            "controller_max_rss_mib": round(controller.max_rss_kib / 1024, 1),
            "bench_rss_mib": round(rss_mib(), 1),
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site-hours", type=float, default=4.0)
    p.add_argument("--speed", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fault-every", type=float, default=12.0, metavar="S",
                   help="mean real seconds between faults")
    p.add_argument("--settle", type=float, default=3.0, metavar="S",
                   help="real seconds after a fault before over-cap time counts")
    p.add_argument("--flood-rate", type=int, default=5000, metavar="MSG_PER_S")
    p.add_argument("--faults", default=",".join(KINDS), help="comma-separated kinds")
    p.add_argument("--controller", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.controller is not None:
        return controller_main(args.controller)
    args.faults = set(args.faults.split(","))
    result = asyncio.run(soak(args))
    print(f"site time        {result['site_hours']} h at {result['speed']:g}x "
          f"({result['real_s']} s), {result['miners']} miners, seed {result['seed']}")
    print("faults           " + ", ".join(f"{k} {v}" for k, v in sorted(result["faults"].items())))
    print(f"over the cap     {result['over_cap_s_raw']} s raw, "
          f"{result['over_cap_s_after_settling']} s after settling "
          f"(of {result['judged_s']} s judged, real time)")
    for kind, seconds in result["over_cap_s_by_fault"].items():
        print(f"  during {kind:10} {seconds} s")
    print(f"grid events      {result['events_published']} published, "
          f"{result['events_lost']} lost {result['lost'] or ''}")
    print(f"memory           controller max RSS {result['controller_max_rss_mib']} MiB, "
          f"bench {result['bench_rss_mib']} MiB")
    print(json.dumps(result))
    return 0 if result["events_lost"] == 0 and result["over_cap_s_after_settling"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

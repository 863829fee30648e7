"""How fast does the site shed? Grid event / frequency dip -> every targeted miner commanded.

Runs, through a real mosquitto on 127.0.0.1: the simulator (`mineops simulate`) and the
controller (`mineops run`) as their own processes, and here a subscriber on the
group command topics, as the miners are. For each fleet size it measures, over
repeated trials, the time from publishing
- a grid event (`target_kw` at half the site's power, in force at once) until the
  last command message of the decision it causes has arrived, and
- a meter reading with an under-frequency value until the broadcast of the shed
  has arrived.
Large sheds go site-wide on the fleet command topic in a few large messages; a
message per rack (1,000 at 100k miners) would take about a second to publish.
Prints p50/p99 per size and, last, one JSON line. Target (ERCOT fast frequency
response acts within 15 cycles): p99 under 250 ms at 100k miners.

    python benchmarks/bench_shed_latency.py [--sizes 10000 100000] [--trials 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from controller.config import BrokerConfig
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import GridEvent, MeterTelemetry, PriceSignal
from controller.protocol.topics import SiteTopics
from controller.protocol.transport import Transport

ROOT = Path(__file__).resolve().parents[1]
RACK = 100
T = SiteTopics("bench")


def site_toml(n: int, port: int, state: Path, metrics_port: int) -> str:
    racks = []
    for r in range(n // RACK):
        model = "s19j_pro" if r % 2 else "s21"
        racks.append(f'[[fleet.groups]]\nname = "r{r:05d}"\nmodel = "{model}"\ncount = {RACK}\n')
    return f"""site_id = "bench"
power_cap_kw = {n * 10}
hashprice_usd_per_ph_day = 42.0
[broker]
port = {port}
keepalive_s = 30
[energy]
aux_fraction = 0.05
[policy]
decision_interval_s = 30
telemetry_stale_s = 600
min_run_s = 0
min_sleep_s = 0
wake_latency_factor = 0
hysteresis_usd_per_mwh = 0
[metrics]
port = {metrics_port}
[grid]
journal_path = "{state / 'grid.db'}"
prepare_s = 0
recovery_kw_per_min = 1e12
record_interval_s = 60
[grid.frequency]
restore_hold_s = 0.5
[[meters]]
type = "mineops"
id = "poi"
{chr(10).join(racks)}"""


class Listener:
    """Records (arrival time, seq, broadcast?) of every group command."""

    def __init__(self, port: int) -> None:
        self.arrivals: list[tuple[float, int, bool]] = []
        self.transport = Transport(BrokerConfig(port=port), client_id=f"bench-{os.getpid()}",
                                   subscriptions=[T.group("+", "cmd"), T.fleet_cmd])

    def on_message(self, topic: str, raw: bytes) -> None:
        now = time.perf_counter()
        head = raw[:80]
        seq = int(head.split(b'"seq":', 1)[1].split(b",", 1)[0])
        self.arrivals.append((now, seq, b'"all"' in raw))

    async def quiet(self, for_s: float, after: float = 0.0, timeout_s: float = 60.0) -> None:
        """Wait for a command after `after` (perf_counter), then until none came for `for_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            last = self.arrivals[-1][0] if self.arrivals else 0.0
            if last >= after and time.perf_counter() - last > for_s:
                return
            await asyncio.sleep(0.02)

    def completion(self, t0: float, broadcast: bool) -> tuple[float, int] | None:
        after = [a for a in self.arrivals if a[0] >= t0 and a[2] == broadcast]
        if not after:
            return None
        seq = after[0][1]
        mine = [a for a in after if a[1] == seq]
        return (max(a[0] for a in mine) - t0) * 1000.0, len(mine)


async def measure(n: int, trials: int) -> dict[str, float]:
    state = Path(tempfile.mkdtemp(prefix="mineops-bench-"))
    with LocalBroker(prefer="mosquitto") as broker:
        from controller.protocol.broker import free_port  # noqa: PLC0415

        site = state / "site.toml"
        site.write_text(site_toml(n, broker.port, state, free_port()))
        cmd = [sys.executable, "-m", "controller.cli", "--log-level", "warning"]
        procs = [
            subprocess.Popen([*cmd, "simulate", "--config", str(site), "--speed", "100",
                              "--no-prices", "--telemetry-interval", "5"], cwd=ROOT),
            subprocess.Popen([*cmd, "run", "--config", str(site)], cwd=ROOT),
        ]
        listener = Listener(broker.port)
        task = asyncio.create_task(listener.transport.run(listener.on_message))
        try:
            await listener.transport.connected.wait()
            pub = listener.transport
            await asyncio.sleep(3.0)
            # Everything reporting and commanded: the controller has sent its first plan.
            await pub.publish(T.price, PriceSignal(ts=time.time(), price_usd_per_mwh=5.0)
                              .encode(), qos=1, retain=True)
            await asyncio.sleep(12.0)
            await listener.quiet(2.0)
            site_w = n * 3300.0  # about full power of the s21/s19j mix at a $5 price
            event_ms, freq_ms = [], []
            for t in range(trials):
                ev = GridEvent(id=f"bench-{n}-{t}", kind="target_kw",
                               value_kw=round(site_w * 0.5 / 1000, 1), start_ts=time.time() - 1,
                               end_ts=time.time() + 3600, source="bench")
                t0 = time.perf_counter()
                await pub.publish(T.grid, ev.encode(), qos=1)
                await listener.quiet(0.5, after=t0)
                done = listener.completion(t0, broadcast=False)
                if done:
                    event_ms.append(done[0])
                cancel = ev.model_copy(update={"cancelled": True})
                t1 = time.perf_counter()
                await pub.publish(T.grid, cancel.encode(), qos=1)
                await listener.quiet(0.8, after=t1)

                dip = MeterTelemetry(ts=time.time(), power_w=site_w, frequency_hz=59.5)
                t0 = time.perf_counter()
                await pub.publish(T.meter("poi"), dip.encode())
                await listener.quiet(0.5, after=t0)
                done = listener.completion(t0, broadcast=True)
                if done:
                    freq_ms.append(done[0])
                # The simulator's own meter reads 60 Hz again: restore after the hold.
                t1 = time.perf_counter()
                await listener.quiet(0.8, after=t1)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) if xs else float("nan")

    return {"event_p50_ms": pct(event_ms, 50), "event_p99_ms": pct(event_ms, 99),
            "frequency_p50_ms": pct(freq_ms, 50), "frequency_p99_ms": pct(freq_ms, 99),
            "trials": float(min(len(event_ms), len(freq_ms)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--trials", type=int, default=15)
    args = ap.parse_args()
    results: dict[str, float] = {}
    print(f"{'miners':>8} {'event p50':>10} {'event p99':>10} {'freq p50':>9} {'freq p99':>9}"
          "  (ms, publish -> last command received)")
    for n in args.sizes:
        r = asyncio.run(measure(n, args.trials))
        print(f"{n:8,d} {r['event_p50_ms']:10.1f} {r['event_p99_ms']:10.1f} "
              f"{r['frequency_p50_ms']:9.1f} {r['frequency_p99_ms']:9.1f}  "
              f"({int(r['trials'])} trials)", flush=True)
        key = f"{n // 1000}k"
        for name, value in r.items():
            if name != "trials":
                results[f"{name.split('_')[0]}_{key}_{name.split('_', 1)[1]}"] = round(value, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

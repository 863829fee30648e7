"""A large site live on this machine: does `mineops run` keep up, and at what cost?

Runs a real mosquitto, `mineops simulate` (at speed 1, telemetry at a fixed period,
racked or per miner) and `mineops run` (decisions every 5 s) as their own processes,
and a price feed here that moves every 30 s (so decisions send commands, as prices do).
After every miner has reported, it measures for `--seconds`:

- lag: handling time minus each reading's timestamp (the simulator stamps each rack's
  or miner's message as it sends it), from the controller's
  `mineops_telemetry_lag_seconds` histogram (p50/p99 interpolated in its buckets, as
  Prometheus' histogram_quantile does), and the largest incoming queue seen;
- telemetry handled per second against the nominal rate (miners / period, or racks /
  period), and miners the decisions saw as offline (stale telemetry). The controller
  keeps up when no miner goes stale and the lag's p99 stays under the period; a rate
  below the nominal one with no lag is the simulator (on the same cores) falling short;
- decision latency: every decision's `duration_s` (decide, encode, send), p50/p99;
- CPU (% of one core) and RSS of each process, sampled every second; the controller's
  RSS per miner (target <= 2 KB).

Prints a table and, last, one JSON line.

    python benchmarks/bench_live_site.py [--scenarios racked:300000:5 per-miner:100000:10]
        [--seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from site_rig import ProcessSampler, Rig, percentiles, timed

from controller.config import BrokerConfig
from controller.protocol.payloads import DecisionSummary, PriceSignal, decode
from controller.protocol.topics import SiteTopics
from controller.protocol.transport import Transport

T = SiteTopics("bench")
TARGET_BYTES_PER_MINER = 2048


@dataclass
class Scenario:
    mode: str  # racked or per-miner
    miners: int
    period_s: float

    @classmethod
    def parse(cls, text: str) -> Scenario:
        mode, miners, period = text.split(":")
        if mode not in ("racked", "per-miner"):
            raise argparse.ArgumentTypeError(f"mode must be racked or per-miner: {text}")
        return cls(mode, int(miners), float(period))

    @property
    def name(self) -> str:
        return f"{self.mode}_{self.miners // 1000}k_{self.period_s:g}s"


@dataclass
class Client:
    port: int
    decisions: list[tuple[float, DecisionSummary]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.transport = Transport(BrokerConfig(port=self.port),
                                   client_id=f"bench-live-{os.getpid()}",
                                   subscriptions=[T.decision])

    def on_message(self, _topic: str, raw: bytes) -> None:
        self.decisions.append((time.monotonic(), decode(DecisionSummary, raw)))


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The controller's series by name, then by labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def bucket_quantile(q: float, buckets: dict[float, float]) -> float:
    """histogram_quantile over cumulative bucket counts {upper bound: count}."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if b == float("inf"):
                return lower
            return lower + (b - lower) * (rank - below) / max(buckets[b] - below, 1e-12)
        lower, below = b, buckets[b]
    return lower


def lag_buckets(series: dict[str, dict[tuple[tuple[str, str], ...], float]]
                ) -> dict[float, float]:
    rows = series.get("mineops_telemetry_lag_seconds_bucket", {})
    return {float(dict(labels)["le"]): v for labels, v in rows.items()}


def handled(series: dict[str, dict[tuple[tuple[str, str], ...], float]], kind: str) -> float:
    return series.get("mineops_mqtt_messages_total", {}).get((("kind", kind),), 0.0)


async def run(scenario: Scenario, seconds: float) -> dict[str, float]:
    n = scenario.miners
    rig = Rig(n, simulate=["--speed", "1", "--telemetry", scenario.mode,
                           "--telemetry-interval", str(scenario.period_s)],
              site={"decision_interval_s": 5.0, "grid": False,
                    "telemetry_stale_s": 3 * scenario.period_s})
    kind = "group_telemetry" if scenario.mode == "racked" else "miner_telemetry"
    per_round = n // 40 if scenario.mode == "racked" else n
    with rig:
        client = Client(rig.broker.port)
        tasks = [asyncio.create_task(client.transport.run(client.on_message))]
        sampler = ProcessSampler(rig.pids())
        try:
            await client.transport.connected.wait()
            pub = client.transport
            prices = [25.0, 60.0, 40.0, 75.0]  # between the models' break-evens: they move

            async def feed() -> None:
                i = 0
                while True:
                    await pub.publish(T.price, PriceSignal(
                        ts=time.time(), price_usd_per_mwh=prices[i % len(prices)]).encode(),
                        qos=1, retain=True)
                    i += 1
                    await asyncio.sleep(30.0)

            tasks.append(asyncio.create_task(feed()))
            with timed(f"{n:,} miners reporting ({scenario.mode}, every {scenario.period_s:g} s)"):
                deadline = time.monotonic() + 900
                while not any(d.miners_by_state.get("offline", n) == 0
                              for _, d in client.decisions[-2:]):
                    rig.check_alive()
                    if time.monotonic() > deadline:
                        raise TimeoutError("the site did not come up within 15 minutes")
                    await asyncio.sleep(1.0)
            tasks.append(asyncio.create_task(sampler.run()))
            t0 = time.monotonic()
            first = await asyncio.to_thread(scrape, rig.metrics_port)
            queue_max, offline_max = 0.0, 0
            while time.monotonic() - t0 < seconds:
                await asyncio.sleep(5.0)
                rig.check_alive()
                now = await asyncio.to_thread(scrape, rig.metrics_port)
                queue_max = max(queue_max, now["mineops_mqtt_incoming_queue_messages"][()])
                offline_max = max([offline_max] + [d.miners_by_state.get("offline", 0)
                                                   for at, d in client.decisions if at >= t0])
            last = now
            elapsed = time.monotonic() - t0
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    b0, b1 = lag_buckets(first), lag_buckets(last)
    window = {le: b1[le] - b0.get(le, 0.0) for le in b1}
    decisions = [d for at, d in client.decisions if at >= t0]
    procs = sampler.summary()
    rss_run = procs["run"]["rss_max_mb"] * 1e6
    return {
        "lag_p50_s": bucket_quantile(0.5, window), "lag_p99_s": bucket_quantile(0.99, window),
        "queue_max": queue_max,
        "handled_per_s": (handled(last, kind) - handled(first, kind)) / elapsed,
        "sent_per_s": per_round / scenario.period_s,
        "offline_max": float(offline_max),
        "decisions": float(len(decisions)),
        **{f"decision_{k}_ms": v * 1e3 for k, v in percentiles(
            [d.duration_s for d in decisions]).items()},
        "commands_sent": float(sum(d.commands_sent for d in decisions)),
        **{f"{p}_{k}": v for p, s in procs.items() for k, v in s.items()},
        "run_bytes_per_miner": rss_run / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", type=Scenario.parse, nargs="+",
                    default=[Scenario("racked", 300_000, 5.0),
                             Scenario("per-miner", 100_000, 10.0)],
                    help="MODE:MINERS:PERIOD_S (default racked:300000:5 per-miner:100000:10)")
    ap.add_argument("--seconds", type=float, default=120.0, help="measured (default 120)")
    args = ap.parse_args()
    results: dict[str, float] = {}
    rows = []
    for sc in args.scenarios:
        print(f"{sc.name}:", flush=True)
        r = asyncio.run(run(sc, args.seconds))
        rows.append((sc, r))
        for k, v in r.items():
            results[f"{sc.name}_{k}"] = round(v, 3 if k.endswith("_s") else 1)
    for sc, r in rows:
        # The controller keeps up when what arrives is handled at once and no miner goes
        # stale; the rate handled against the nominal one says whether the simulator (on
        # the same two cores) sent it all.
        keeps_up = r["offline_max"] == 0 and r["lag_p99_s"] < sc.period_s
        print(f"\n{sc.mode} telemetry, {sc.miners:,} miners every {sc.period_s:g} s: "
              f"controller {'keeps up' if keeps_up else 'does NOT keep up'}")
        print(f"  telemetry handled {r['handled_per_s']:,.0f}/s of a nominal "
              f"{r['sent_per_s']:,.0f}/s ({r['handled_per_s'] / r['sent_per_s']:.0%}); lag p50 "
              f"{r['lag_p50_s'] * 1e3:,.0f} ms, p99 {r['lag_p99_s'] * 1e3:,.0f} ms; "
              f"queue max {r['queue_max']:,.0f}; miners seen offline max {r['offline_max']:,.0f}")
        print(f"  decisions {r['decisions']:.0f}: p50 {r['decision_p50_ms']:.0f} ms, "
              f"p99 {r['decision_p99_ms']:.0f} ms; setpoints sent {r['commands_sent']:,.0f}")
        for p in ("run", "simulate", "mosquitto"):
            print(f"  {p:<10} CPU {r[f'{p}_cpu_mean_pct']:5.0f} % (p99 "
                  f"{r[f'{p}_cpu_p99_pct']:.0f} %), RSS {r[f'{p}_rss_max_mb']:,.0f} MB")
        per = r["run_bytes_per_miner"]
        print(f"  mineops run: {per:,.0f} B per miner (target <= {TARGET_BYTES_PER_MINER}: "
              f"{'met' if per <= TARGET_BYTES_PER_MINER else 'NOT met'})")
    print(json.dumps({k: (None if isinstance(v, float) and np.isnan(v) else v)
                      for k, v in results.items()}))


if __name__ == "__main__":
    main()

"""What does a Prometheus scrape cost the controller's event loop?

The controller's `/metrics` server runs in a thread, but rendering holds the GIL, so
the time a scrape takes from the event loop is what matters: while it renders, the
loop ingests and decides less. Here a controller of N miners (racks of 40, every
miner reporting) keeps its event loop saturated with real work, the way a large site
does: rack telemetry messages handled back to back (`Controller.on_message`, the same
code as from MQTT) and a decision every `--decide-every` seconds. A separate process
scrapes `/metrics` as Prometheus does (gzip) every `--scrape-every` seconds.

The loop's lost time per scrape = (work rate without scrapes - with) / rate without
x phase length / scrapes. Three phases per size: no scrapes (the baseline), scrapes
each right after a new decision (every scrape renders the decision's series afresh:
the worst case), and scrapes of an unchanged decision (served from the cache).
Prints a table and, last, one JSON line. Target (Scale issue): < 50 ms of the loop
per scrape at 300,000 miners.

    python benchmarks/bench_scrape.py [--sizes 100000 300000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from controller.config import SiteConfig
from controller.daemon.loop import Controller
from controller.protocol.payloads import GroupTelemetry

RACK = 40
SCRAPER = textwrap.dedent("""
    import json, sys, time, urllib.request
    url, every, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    out = []
    next_at = time.monotonic()
    for _ in range(count):
        next_at += every
        time.sleep(max(0.0, next_at - time.monotonic()))
        t0 = time.monotonic()
        req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=60) as r:
            size = len(r.read())
        out.append([t0, time.monotonic() - t0, size])
    print(json.dumps(out))
""")


def site(n: int, per_group: str) -> SiteConfig:
    return SiteConfig.model_validate({
        "site_id": "bench",
        "fleet": {"groups": [{"name": f"r{r:05d}", "model": "s19j_pro" if r % 2 else "s21",
                              "count": RACK} for r in range(n // RACK)]},
        "power_cap_kw": n * 10,
        "hashprice_usd_per_ph_day": 42.0,
        "policy": {"telemetry_stale_s": 600},
        "metrics": {"port": 0, "per_group": per_group},
        "grid": {"journal_path": str(Path(tempfile.mkdtemp(prefix="mineops-bench-")) / "g.db")},
    })


def rack_messages(c: Controller) -> list[tuple[str, bytes]]:
    """One round of rack telemetry for the whole fleet, encoded as a simulator would."""
    f, rng = c.fleet, np.random.default_rng(0)
    out = []
    for g, name in enumerate(f.groups):
        idx = np.flatnonzero(f.group_idx == g)
        miners = [{"id": f.ids[i], "state": "running", "power_w": round(float(p), 1),
                   "hashrate_ths": 150.0, "target_w": 3300.0, "temp_c": 65.0, "ack_seq": 1}
                  for i, p in zip(idx, rng.uniform(3000, 3500, idx.size), strict=True)]
        msg = GroupTelemetry.model_validate({"ts": time.time(), "miners": miners})
        out.append((c.topics.group(name, "telemetry"), msg.encode()))
    return out


async def phase(c: Controller, messages: list[tuple[str, bytes]], seconds: float,
                decide_every: float, scrape: tuple[str, float] | None) -> dict[str, float]:
    """Saturate the loop for `seconds`; the work done, and the scrapes if asked."""
    scraper = None
    if scrape is not None:
        url, every = scrape
        scraper = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SCRAPER, url, str(every), str(int(seconds / every) - 1),
            stdout=asyncio.subprocess.PIPE)
    start = time.monotonic()
    handled, next_decision, i = 0, start, 0
    busy_decide = 0.0
    while (now := time.monotonic()) - start < seconds:
        if now >= next_decision:
            t0 = time.perf_counter()
            await c.decide_and_act("tick")
            busy_decide += time.perf_counter() - t0
            next_decision += decide_every
        topic, raw = messages[i % len(messages)]
        c.on_message(topic, raw)
        i += 1
        handled += 1
        await asyncio.sleep(0)
    elapsed = time.monotonic() - start
    out = {"handled_per_s": handled / elapsed, "elapsed_s": elapsed, "decide_s": busy_decide}
    if scraper is not None:
        stdout, _ = await scraper.communicate()
        scrapes = json.loads(stdout)
        took = [s[1] * 1e3 for s in scrapes]
        out |= {"scrapes": len(scrapes), "scrape_p50_ms": float(np.percentile(took, 50)),
                "scrape_p99_ms": float(np.percentile(took, 99)),
                "scrape_bytes": float(np.median([s[2] for s in scrapes]))}
    return out


async def measure(n: int, seconds: float, per_group: str) -> dict[str, float]:
    c = Controller(site(n, per_group))
    messages = rack_messages(c)
    for topic, raw in messages:  # every miner reporting before the first decision
        c.on_message(topic, raw)
    await c.decide_and_act("tick")
    server = c.metrics.serve("127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        base = await phase(c, messages, seconds, 1.0, None)
        # Decisions every second and scrapes every second: each scrape renders afresh.
        fresh = await phase(c, messages, seconds, 1.0, (url, 1.0))
        # Scrapes every second of one decision: served from the cache.
        cached = await phase(c, messages, seconds, 3600.0, (url, 1.0))
        base_cached = await phase(c, messages, seconds, 3600.0, None)
    finally:
        server.close()

    def lost_ms(with_scrapes: dict[str, float], without: dict[str, float]) -> float:
        # Work time lost: the share of the loop's work rate the scrapes took, per scrape.
        share = 1.0 - with_scrapes["handled_per_s"] / without["handled_per_s"]
        return share * with_scrapes["elapsed_s"] / with_scrapes["scrapes"] * 1e3

    return {"groups": len(c.fleet.groups), "fresh_lost_ms": lost_ms(fresh, base),
            "cached_lost_ms": lost_ms(cached, base_cached),
            "fresh_scrape_p50_ms": fresh["scrape_p50_ms"],
            "fresh_scrape_p99_ms": fresh["scrape_p99_ms"],
            "cached_scrape_p50_ms": cached["scrape_p50_ms"],
            "scrape_kb": fresh["scrape_bytes"] / 1e3,
            "handled_per_s": base["handled_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--seconds", type=float, default=20.0, help="per phase (default 20)")
    ap.add_argument("--per-group", choices=("auto", "always", "never"), default="auto")
    args = ap.parse_args()
    results: dict[str, float] = {}
    print(f"{'miners':>8} {'groups':>7} {'loop lost/scrape':>17} {'cached':>7} "
          f"{'scrape p50':>11} {'p99':>7} {'gzip KB':>8}  (ms)")
    for n in args.sizes:
        r = asyncio.run(measure(n, args.seconds, args.per_group))
        print(f"{n:8,d} {int(r['groups']):7,d} {r['fresh_lost_ms']:17.1f} "
              f"{r['cached_lost_ms']:7.1f} {r['fresh_scrape_p50_ms']:11.1f} "
              f"{r['fresh_scrape_p99_ms']:7.1f} {r['scrape_kb']:8.0f}", flush=True)
        key = f"{n // 1000}k"
        for name in ("fresh_lost_ms", "cached_lost_ms", "fresh_scrape_p50_ms",
                     "fresh_scrape_p99_ms", "scrape_kb"):
            results[f"{name.replace('_ms', '').replace('_kb', '')}_{key}"
                    + ("_ms" if name.endswith("_ms") else "_kb")] = round(r[name], 1)
    print("(loop lost/scrape: each scrape right after a new decision renders its series; "
          "cached: an unchanged decision's)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

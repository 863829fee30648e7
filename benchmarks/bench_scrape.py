"""What does a Prometheus scrape cost the controller's event loop?

The controller's `/metrics` server runs in a thread, but rendering holds the GIL, so
the time a scrape takes from the event loop is what matters: while it renders, the
loop ingests and decides less. Here a controller of N miners (racks of 40, every
miner reporting) keeps its event loop saturated with real work, the way a large site
does: rack telemetry messages handled back to back (`Controller.on_message`, the same
code as from MQTT), with a decision at the start of every 2-second slot.

- The loop's stall: in every slot the loop handles a fixed batch of messages (about
  1 s of work) as fast as it can, then idles, as a busy controller between telemetry
  rounds; a separate process scrapes `/metrics` as Prometheus does (gzip) 0.3 s into
  every other slot. The stall is the loop's longest pause between two messages while
  a scrape ran, against the same window of the next slot (no scrape). With a decision
  at the start of every slot, each scrape renders a new decision's series (the worst
  case); a second run without decisions serves every scrape from the cache. (How much
  longer a whole batch takes with a scrape was tried too: on this shared 2-core
  machine its noise, tens of ms either way, is larger than the effect.)
- Render CPU: `Metrics.render_gzip()`, what a scrape runs, timed with the thread's own
  CPU clock in a thread of its own: after a new decision, and again (cached). The GIL
  is held for at most this (zlib releases it while compressing).

Prints a table and, last, one JSON line. Target (Scale issue): < 50 ms of the loop
per scrape at 300,000 miners.

    python benchmarks/bench_scrape.py [--sizes 100000 300000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from controller.config import SiteConfig
from controller.daemon.loop import Controller
from controller.logs import configure
from controller.protocol.payloads import GroupTelemetry

RACK = 40
SLOT_S = 2.0
SCRAPER = textwrap.dedent("""
    import json, sys, time, urllib.request
    url, start, slot, slots = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    out = []
    for k in range(0, slots, 2):
        time.sleep(max(0.0, start + k * slot + 0.3 - time.monotonic()))
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


async def slots(c: Controller, messages: list[tuple[str, bytes]], n_slots: int, *,
                decide: bool, url: str, batch: int) -> dict[str, float]:
    """n_slots slots of a fixed batch of work, scraping in the even ones; the loop's loss."""
    start = time.monotonic() + 0.5
    scraper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRAPER, url, str(start), str(SLOT_S), str(n_slots),
        stdout=asyncio.subprocess.PIPE)
    took = np.zeros(n_slots)
    batches: list[npt.NDArray[np.float64]] = []
    i = 0
    for k in range(n_slots):
        await asyncio.sleep(max(0.0, start + k * SLOT_S - time.monotonic()))
        if decide:
            await c.decide_and_act("tick")
        t0 = time.monotonic()
        steps = np.empty(batch)
        for j in range(batch):
            topic, raw = messages[i % len(messages)]
            c.on_message(topic, raw)
            i += 1
            steps[j] = time.monotonic()
            await asyncio.sleep(0)
        took[k] = time.monotonic() - t0
        batches.append(steps)
    stdout, _ = await scraper.communicate()
    scrapes = json.loads(stdout)
    def longest_pause(w0: float, w1: float) -> float:
        """The loop's longest pause between two messages of a batch inside [w0, w1]."""
        worst = 0.0
        for t in batches:
            gaps, ends = np.diff(t), t[1:]
            inside = (ends > w0) & (t[:-1] < w1)
            worst = max(worst, float(gaps[inside].max(initial=0.0)))
        return worst

    stall = [longest_pause(s0, s0 + d) for s0, d, _ in scrapes]
    quiet = [longest_pause(s0 + SLOT_S, s0 + SLOT_S + d) for s0, d, _ in scrapes]
    took_ms = [d * 1e3 for _, d, _ in scrapes]
    return {"stall_ms": float(np.median(stall)) * 1e3,
            "stall_p99_ms": float(np.percentile(stall, 99)) * 1e3,
            "quiet_stall_ms": float(np.median(quiet)) * 1e3,
            "scrape_p50_ms": float(np.percentile(took_ms, 50)),
            "scrape_kb": float(np.median([b for _, _, b in scrapes])) / 1e3}


def render_cpu_ms(c: Controller, fresh: bool) -> float:
    """Thread CPU time of one `render_gzip()` in a thread of its own, ms."""
    if fresh:
        asyncio.run(c.decide_and_act("tick"))
    took: list[float] = []

    def scrape() -> None:
        t0 = time.thread_time()
        c.metrics.render_gzip()
        took.append(time.thread_time() - t0)

    t = threading.Thread(target=scrape)
    t.start()
    t.join()
    return took[0] * 1e3


def measure(n: int, seconds: float, per_group: str) -> dict[str, float]:
    c = Controller(site(n, per_group))
    messages = rack_messages(c)
    for topic, raw in messages:  # every miner reporting before the first decision
        c.on_message(topic, raw)
    c.fleet.site.market_price_usd_per_mwh, c.fleet.site.price_at = 40.0, time.monotonic()
    fresh_cpu = [render_cpu_ms(c, fresh=True) for _ in range(5)]
    cached_cpu = [render_cpu_ms(c, fresh=False) for _ in range(5)]
    server = c.metrics.serve("127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}/metrics"
    n_slots = max(4, int(seconds / SLOT_S) // 2 * 2)
    # About 1 s of work per 2 s slot.
    t0, done = time.monotonic(), 0
    while time.monotonic() - t0 < 1.0:
        topic, raw = messages[done % len(messages)]
        c.on_message(topic, raw)
        done += 1
    try:
        fresh = asyncio.run(slots(c, messages, n_slots, decide=True, url=url, batch=done))
        cached = asyncio.run(slots(c, messages, n_slots, decide=False, url=url, batch=done))
    finally:
        server.close()
    return {"groups": len(c.fleet.groups),
            "render_fresh_ms": float(np.median(fresh_cpu)),
            "render_cached_ms": float(np.median(cached_cpu)),
            "fresh_stall_ms": fresh["stall_ms"], "fresh_stall_p99_ms": fresh["stall_p99_ms"],
            "cached_stall_ms": cached["stall_ms"], "quiet_stall_ms": fresh["quiet_stall_ms"],
            "fresh_scrape_p50_ms": fresh["scrape_p50_ms"], "scrape_kb": fresh["scrape_kb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--seconds", type=float, default=60.0, help="per run (default 60)")
    ap.add_argument("--per-group", choices=("auto", "always", "never"), default="auto")
    args = ap.parse_args()
    configure("warning")
    results: dict[str, float] = {}
    print(f"{'miners':>8} {'groups':>7} | {'render CPU':>10} {'cached':>7} | "
          f"{'loop stall':>10} {'p99':>6} {'cached':>7} {'none':>6} | {'scrape':>7} "
          f"{'gzip KB':>8}  (ms)")
    for n in args.sizes:
        r = measure(n, args.seconds, args.per_group)
        print(f"{n:8,d} {int(r['groups']):7,d} | {r['render_fresh_ms']:10.1f} "
              f"{r['render_cached_ms']:7.1f} | {r['fresh_stall_ms']:10.1f} "
              f"{r['fresh_stall_p99_ms']:6.1f} {r['cached_stall_ms']:7.1f} "
              f"{r['quiet_stall_ms']:6.1f} | {r['fresh_scrape_p50_ms']:7.0f} "
              f"{r['scrape_kb']:8.0f}", flush=True)
        key = f"{n // 1000}k"
        for name, v in r.items():
            if name != "groups":
                results[f"{name.removesuffix('_ms').removesuffix('_kb')}_{key}"
                        f"{'_kb' if name.endswith('_kb') else '_ms'}"] = round(v, 1)
    print("(render CPU: one render_gzip() in its own thread after a new decision, and cached; "
          "loop stall: the loop's longest pause during a scrape, p50 and p99, with a new "
          "decision before each scrape; cached; none: the same window without a scrape; "
          "scrape: wall time at the scraper, p50)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

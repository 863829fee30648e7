"""Ingest against a real mosquitto: priorities, the bound, a 25k msg/s flood, every format.

The flood is another process (`python -m tests.test_ingest_flood HOST PORT SITE RATE
SECONDS GROUP:COUNT ...`): a message per miner (`miner/<id>/telemetry`, freshly stamped)
at RATE messages a second over a plain socket (MQTT 3.1.1, QoS 0), for SECONDS, then it
stops by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import GridEvent, PriceSignal
from controller.protocol.topics import LANE_CONTROL, LANE_TELEMETRY, LANE_URGENT, incoming_lane
from controller.protocol.transport import MAX_QUEUED_MESSAGES, IncomingQueue
from tests.conftest import Peer, make_site, wait_for

ROOT = Path(__file__).resolve().parent.parent
FLOOD_RATE_PER_S = 25_000
FLOOD_S = 24.0
EVENT_AT_S = 12.0  # into the flood: the queue and memory have long reached steady state
RACKS = [(f"r{k:02d}", 40) for k in range(50)]  # 2,000 S21s, 12.5 messages each a second


# -- the queue alone ---------------------------------------------------------------------------

def _topic(kind: str, k: int = 0) -> str:
    return {"telemetry": f"mineops/s/miner/m-{k}/telemetry",
            "rack": f"mineops/s/group/r{k}/telemetry",
            "grid": "mineops/s/signal/grid", "price": "mineops/s/signal/price",
            "availability": f"mineops/s/miner/m-{k}/availability",
            "meter": "tele/meter-1/SENSOR"}[kind]


def test_lanes() -> None:
    assert incoming_lane(_topic("grid"))[0] == LANE_URGENT
    assert incoming_lane(_topic("meter"))[0] == LANE_URGENT, "vendor meters: under-frequency"
    assert incoming_lane("mineops/s/fleet/cmd")[0] == LANE_URGENT
    assert incoming_lane(_topic("price"))[0] == LANE_CONTROL
    assert incoming_lane(_topic("availability"))[0] == LANE_CONTROL
    assert incoming_lane("mineops/s/group/r1/capabilities")[0] == LANE_CONTROL
    assert incoming_lane(_topic("telemetry"))[0] == LANE_TELEMETRY
    assert incoming_lane(_topic("rack"))[0] == LANE_TELEMETRY


def test_queue_serves_urgent_first_and_drops_the_oldest_telemetry() -> None:
    q = IncomingQueue(5)
    for k in range(4):
        q.put_nowait((_topic("telemetry", k), b"x"))
    q.put_nowait((_topic("price"), b"p"))
    q.put_nowait((_topic("telemetry", 4), b"x"))  # full: telemetry 0 goes
    q.put_nowait((_topic("grid"), b"g"))  # full: telemetry 1 goes
    assert q.dropped == {("miner_telemetry", "queue_full"): 2}
    got = [q.get_nowait()[0] for _ in range(len(q))]
    assert got == [_topic("grid"), _topic("price"), *(_topic("telemetry", k) for k in (2, 3, 4))]
    assert q.qsize() == 0 and q.bytes == 0


def test_queue_never_drops_urgent_for_telemetry() -> None:
    q = IncomingQueue(3)
    for _ in range(3):
        q.put_nowait((_topic("grid"), b"g"))
    q.put_nowait((_topic("telemetry"), b"x"))  # the newcomer is the least urgent: it goes
    assert q.dropped == {("miner_telemetry", "queue_full"): 1}
    q.put_nowait((_topic("grid"), b"g2"))  # urgent only: the oldest urgent goes
    assert q.dropped[("grid", "queue_full")] == 1
    assert [q.get_nowait()[1] for _ in range(3)] == [b"g", b"g", b"g2"]


def test_queue_bounds_bytes_too() -> None:
    q = IncomingQueue(1000, max_bytes=10_000)
    for k in range(5):
        q.put_nowait((_topic("rack", k), b"x" * 3000))
    assert len(q) == 3 and q.bytes == 9000
    assert q.dropped == {("group_telemetry", "queue_full"): 2}


# -- a flood through mosquitto ------------------------------------------------------------------

def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish(topic: str, payload: bytes) -> bytes:
    raw = topic.encode()
    body = len(raw).to_bytes(2, "big") + raw + payload
    return b"\x30" + _length(len(body)) + body


def flood(host: str, port: int, site: str, *, rate: float, seconds: float,
          racks: list[tuple[str, int]]) -> None:
    """Per-miner telemetry at `rate` messages/s for `seconds`, in 20 bursts a second."""
    ids = [f"{g}-{i:04d}" for g, n in racks for i in range(1, n + 1)]
    per_burst = max(1, int(rate / 20))
    with socket.create_connection((host, port)) as sock:
        cid = f"flood-{os.getpid()}".encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
        sock.sendall(b"\x10" + _length(len(body)) + body)
        sock.recv(4)
        start = time.monotonic()
        k = 0
        while time.monotonic() - start < seconds:
            ts = time.time()
            burst = []
            for _ in range(per_burst):
                m = ids[k % len(ids)]
                k += 1
                burst.append(_publish(f"mineops/{site}/miner/{m}/telemetry", json.dumps(
                    {"v": 1, "ts": ts, "state": "running", "power_w": 3400.0,
                     "hashrate_ths": 195.0, "target_w": 3500.0, "temp_c": 66.0}).encode()))
            sock.sendall(b"".join(burst))
            due = start + k / rate
            if due > time.monotonic():
                time.sleep(due - time.monotonic())


def start_flood(broker: LocalBroker, site: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.test_ingest_flood", broker.host, str(broker.port),
         site, str(FLOOD_RATE_PER_S), str(FLOOD_S), *(f"{g}:{n}" for g, n in RACKS)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.integration
@pytest.mark.slow
async def test_a_grid_event_applies_within_a_second_of_a_25k_flood(broker: LocalBroker,
                                                                   tasks: Any) -> None:
    cfg = make_site(broker, [(g, "s21", n) for g, n in RACKS],
                    policy={"telemetry_stale_s": 30.0})
    controller = Controller(cfg)
    peer = Peer(cfg)
    tasks(controller.run(), "controller")
    tasks(peer.run(), "peer")
    await wait_for(lambda: controller.transport.connected.is_set()
                   and peer.transport.connected.is_set(), what="connected")
    await peer.publish(controller.topics.price, PriceSignal(
        ts=time.time(), price_usd_per_mwh=30.0).encode(), qos=1, retain=True)
    await wait_for(lambda: controller.snapshot is not None, what="a first decision")

    me = psutil.Process()
    rss_before = me.memory_info().rss
    handled = controller.metrics.messages.labels("miner_telemetry")
    handled_before = handled._value.get()
    proc = start_flood(broker, cfg.site_id)
    rss: list[float] = []
    queue_max = 0
    latency_s = None
    try:
        started = time.monotonic()
        while time.monotonic() - started < EVENT_AT_S:
            await asyncio.sleep(0.25)
            rss.append(me.memory_info().rss)
            queue_max = max(queue_max, controller.transport.status().incoming_queue_messages)
        target_kw = round(0.3 * cfg.power_cap_kw, 1)
        event = GridEvent(id="flood-1", kind="target_kw", value_kw=target_kw,
                          start_ts=time.time(), end_ts=time.time() + 600)
        sent = time.monotonic()
        await peer.publish(controller.topics.grid, event.encode(), qos=1)
        while True:
            snap = controller.snapshot
            if snap is not None and snap.cap.source == "target_kw":
                latency_s = time.monotonic() - sent
                break
            if time.monotonic() - sent > 10:
                break
            await asyncio.sleep(0.005)
        while proc.poll() is None and time.monotonic() - started < FLOOD_S + 5:
            await asyncio.sleep(0.25)
            rss.append(me.memory_info().rss)
            queue_max = max(queue_max, controller.transport.status().incoming_queue_messages)
        flood_s = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()
    status = controller.transport.status()
    messages = handled._value.get() - handled_before
    dropped = status.dropped.get(("miner_telemetry", "queue_full"), 0)
    rate = (messages + dropped) / flood_s
    print(f"\nflood: {rate:,.0f} msg/s received for {flood_s:.1f} s ({messages:,.0f} handled, "
          f"{dropped:,} dropped), grid event applied after "
          f"{'never' if latency_s is None else f'{latency_s * 1000:.0f} ms'}, "
          f"RSS {rss_before / 2**20:.0f} -> max {max(rss) / 2**20:.0f} MB, "
          f"queue max {queue_max:,}")
    assert rate >= 0.6 * FLOOD_RATE_PER_S, "the flood was not a flood: nothing was tested"
    assert latency_s is not None and latency_s < 1.0
    assert queue_max <= MAX_QUEUED_MESSAGES
    assert max(rss) - rss_before < 200 * 2**20, "memory stays bounded"
    # Memory is flat: the second half of the flood grows it no more than noise.
    half = len(rss) // 2
    assert max(rss[half:]) - max(rss[:half]) < 50 * 2**20
    assert not controller.ingest.invalid, "every flood message was valid"
    assert controller.snapshot is not None and controller.snapshot.cap.source == "target_kw"


if __name__ == "__main__":
    host, port, site, rate, seconds, *specs = sys.argv[1:]
    flood(host, int(port), site, rate=float(rate), seconds=float(seconds),
          racks=[(g, int(n)) for g, n in (s.split(":") for s in specs)])


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["group", "group-v1", "miner"])
async def test_every_simulator_format_reaches_the_fleet(broker: LocalBroker, tasks: Any,
                                                        fmt: str) -> None:
    from simulators.site import SimulatedSite  # noqa: PLC0415

    cfg = make_site(broker, [("a", "s21", 5), ("b", "s19j_pro", 3)])
    sim = SimulatedSite(cfg, telemetry_interval_s=0.2, telemetry_format=fmt)  # type: ignore[arg-type]
    controller = Controller(cfg)
    tasks(sim.run(), "sim")
    tasks(controller.run(), "controller")
    await wait_for(lambda: bool((controller.fleet.last_seen > -1e18).all()),
                   what=f"every miner's {fmt} telemetry")
    assert not controller.ingest.invalid and not controller.ingest.rejected_readings
    f = controller.fleet
    assert f.power_w == pytest.approx(sim.fleet.power_w, rel=0.05)
    assert (f.hashrate_ths > 0).all() and (f.state == 1).all()  # running, as they start

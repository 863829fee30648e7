"""A telemetry flood for the stop tests: rack telemetry published as fast as the broker reads.

Run as a separate process (`python -m tests.mqtt_flood HOST PORT SITE RATE GROUP:COUNT ...`)
so the flood does not share the event loop of the controller it loads. RATE is messages
per second, 0 for as fast as the broker reads. It speaks the little of MQTT 3.1.1 it needs
over a plain blocking socket (CONNECT, then QoS 0 PUBLISH packets back to back): TCP
backpressure bounds its memory, a frozen broker simply blocks it, and a broker that goes
away is reconnected to. The standard library only: it starts fast.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEPALIVE_S = 60  # a flood never goes quiet for that long, so no PINGREQ is needed


def _length(n: int) -> bytes:
    """MQTT's variable-length 'remaining length'."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str) -> bytes:
    body = _string("MQTT") + bytes([4, 0x02]) + KEEPALIVE_S.to_bytes(2, "big") + _string(client_id)
    return b"\x10" + _length(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, retain: bool = False) -> bytes:
    body = _string(topic) + payload  # QoS 0: no packet id
    return bytes([0x31 if retain else 0x30]) + _length(len(body)) + body


def rack_telemetry(site: str, group: str, count: int, ts: float) -> bytes:
    """A GroupTelemetry message for `count` running miners `<group>-0001`, ..."""
    miners = [{"id": f"{group}-{i:04d}", "state": "running", "power_w": 3500.0,
               "hashrate_ths": 200.0, "target_w": 3500.0, "temp_c": 65.0}
              for i in range(1, count + 1)]
    payload = json.dumps({"v": 1, "ts": ts, "miners": miners}).encode()
    return publish_packet(f"mineops/{site}/group/{group}/telemetry", payload)


def flood(host: str, port: int, site: str, racks: list[tuple[str, int]],
          rate_per_s: float) -> None:
    """Publish every rack's telemetry in a loop, forever; reconnect when the broker goes."""
    price = json.dumps({"v": 1, "ts": time.time(), "price_usd_per_mwh": 30.0}).encode()
    burst_every_s = len(racks) / rate_per_s if rate_per_s > 0 else 0.0
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(connect_packet(f"mineops-flood-{time.monotonic_ns()}"))
                if sock.recv(4)[:1] != b"\x20":  # CONNACK
                    raise ConnectionError("no CONNACK")
                sock.settimeout(None)  # block while the broker does not read: backpressure
                # Retained, so that the controller decides on a price at once.
                sock.sendall(publish_packet(f"mineops/{site}/signal/price", price, retain=True))
                due = time.monotonic()
                fresh_until = -1.0
                while True:
                    # Readings are judged by their own time: restamp them every second.
                    if time.monotonic() > fresh_until:
                        burst = b"".join(rack_telemetry(site, g, n, time.time()) for g, n in racks)
                        fresh_until = time.monotonic() + 1.0
                    sock.sendall(burst)
                    due += burst_every_s
                    # Behind (a slow broker): go on at once, but do not burst to catch up.
                    due = max(due, time.monotonic() - burst_every_s)
                    if due > time.monotonic():
                        time.sleep(due - time.monotonic())
        except OSError:
            time.sleep(0.1)


@contextlib.contextmanager
def flooding(host: str, port: int, site: str, racks: Sequence[tuple[str, int]],
             rate_per_s: float) -> Iterator[None]:
    """This flood in another process (python -m tests.mqtt_flood) while the block runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.mqtt_flood", host, str(port), site, str(rate_per_s),
         *(f"{g}:{n}" for g, n in racks)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    host, port, site, rate, *specs = sys.argv[1:]
    flood(host, int(port), site, [(g, int(n)) for g, n in (s.split(":") for s in specs)],
          float(rate))

"""Telemetry handled in batches gives exactly what handling it message by message gives.

The transport hands ingest the queued telemetry in batches (`Ingest.on_telemetry`); the
checks and the fleet write run once per batch. Each test feeds the same messages to two
controllers built from the same site file, one message at a time (`on_message`) and in
batches (`on_telemetry`), and compares the fleet arrays, the invalid-message and
rejected-reading counters and the metrics, besides the values each case must give.
The transport's part (`IncomingQueue.take_telemetry`, a real mosquitto) is at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import socket
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import (
    MAX_GROUP_READINGS,
    GroupDecoder,
    GroupMinerReading,
    GroupTelemetry,
    MinerTelemetry,
    PayloadError,
    PriceSignal,
    encode_group_telemetry,
)
from controller.protocol.topics import LANE_TELEMETRY
from controller.protocol.transport import IncomingQueue
from tests.conftest import Peer, make_site, wait_for
from tests.test_ingest import controller
from tests.test_ingest_flood import _length, _publish

GROUPS = [("a", "s21", 4), ("b", "s19j_pro", 2), ("c", "s21", 3)]
Message = tuple[str, bytes]


def _ids(group: str, n: int) -> list[str]:
    return [f"{group}-{k:04d}" for k in range(1, n + 1)]


def rack_msg(c: Controller, group: str, ids: list[str], *, age_s: float = 0.0,
             **columns: Any) -> Message:
    n = len(ids)
    cols: dict[str, Any] = {"power_w": [3400.0] * n, "hashrate_ths": [100.0] * n,
                            "target_w": [3500.0] * n, "temp_c": [66.0] * n}
    cols.update(columns)
    state = cols.pop("state", ["running"] * n)
    return (c.topics.group(group, "telemetry"),
            encode_group_telemetry(time.time() - age_s, ids, state, **cols))


def one_by_one(c: Controller, messages: list[Message]) -> None:
    for topic, raw in messages:
        c.on_message(topic, raw)


def in_batches(c: Controller, messages: list[Message], cuts: list[int] | None = None) -> None:
    edges = [0, *sorted(set(cuts or [])), len(messages)]
    for start, end in itertools.pairwise(edges):
        if end > start:
            c.on_telemetry(messages[start:end])


def _acks(c: Controller, sent: int) -> list[int | None]:
    """Acknowledgements relative to what was sent (the two controllers' sequences differ)."""
    return [None if a < 0 else int(a) - sent for a in c.fleet.ack_seq]


def _values(c: Controller) -> dict[str, Any]:
    f = c.fleet
    return {name: [None if isinstance(x, float) and math.isnan(x) else x
                   for x in getattr(f, name).tolist()]
            for name in ("state", "power_w", "hashrate_ths", "target_w", "temp_c",
                         "restarted", "announced_offline")}


def _metrics(c: Controller) -> dict[str, float]:
    """Every mineops counter and the telemetry lag histogram's count, by series."""
    out = {}
    for family in c.metrics.registry.collect():
        if family.name in ("mineops_mqtt_messages", "mineops_mqtt_messages_invalid",
                           "mineops_telemetry_readings_rejected",
                           "mineops_telemetry_lag_seconds"):
            for s in family.samples:
                if s.name.endswith(("_total", "_count")):
                    out[s.name + str(sorted(s.labels.items()))] = s.value
    return out


def assert_same(a: Controller, sent_a: int, b: Controller, sent_b: int) -> None:
    assert _values(b) == _values(a)
    assert _acks(b, sent_b) == _acks(a, sent_a)
    seen_a, seen_b = np.isfinite(a.fleet.last_seen), np.isfinite(b.fleet.last_seen)
    assert seen_b.tolist() == seen_a.tolist()
    # A reading's time is its own (ts) on the monotonic clock: the same in both runs.
    assert b.fleet.last_seen[seen_b] == pytest.approx(a.fleet.last_seen[seen_a], abs=0.05)
    assert b.ingest.invalid == a.ingest.invalid
    assert b.ingest.rejected_readings == a.ingest.rejected_readings
    assert _metrics(b) == _metrics(a)
    assert b.fleet.site.market_price_usd_per_mwh == a.fleet.site.market_price_usd_per_mwh


# -- a mixed batch ------------------------------------------------------------------------------

def mixed(c: Controller, sent: int) -> list[Message]:
    """Good racks, a bad one, an unknown group, a stale one, bad readings, the same rack
    twice, a per-miner message and a price between them."""
    stale_s = c.cfg.policy.telemetry_stale_s
    a, b, cc = _ids("a", 4), _ids("b", 2), _ids("c", 3)
    return [
        rack_msg(c, "a", a, power_w=[3401.0, 3402.0, None, 3404.0],
                 ack_seq=[sent, sent - 1, None, None]),
        (c.topics.group("b", "telemetry"), b'{"v":2,"ts":'),  # bad_json
        rack_msg(c, "zz", ["zz-0001"]),  # unknown_group
        rack_msg(c, "c", cc, age_s=stale_s + 1.0),  # stale
        rack_msg(c, "b", b, power_w=[3000.0, 1e6]),  # b-0002: out_of_range, alone
        (c.topics.miner("c-0001", "telemetry"), MinerTelemetry(
            ts=time.time(), state="waking", power_w=100.0).encode()),
        (c.topics.price, PriceSignal(ts=time.time(), price_usd_per_mwh=41.5).encode()),
        rack_msg(c, "c", cc[1:], power_w=[3302.0, 3303.0]),  # after c-0001's own message
        # a again, in the same batch: its later reading wins, a-0001's ack went back.
        rack_msg(c, "a", a[:2], power_w=[3501.0, 3502.0], state=["running", "sleeping"],
                 ack_seq=[sent - 3, None]),
        # no good reading: unknown, another group's, an unknown state: the message goes.
        rack_msg(c, "c", ["zz-0009", "a-0004", "c-0003"],
                 state=["running", "running", "dancing"]),
        rack_msg(c, "b", b[:1], ack_seq=[sent + 5]),  # bad_ack: the rest of it stands
        rack_msg(c, "a", a[3:], age_s=-120.0),  # 120 s ahead: bad_timestamp
        (c.topics.group("b", "telemetry"), GroupTelemetry(ts=time.time(), miners=[
            GroupMinerReading(id="b-0002", state="running", power_w=3010.0)]).encode()),
        rack_msg(c, "c", []),  # no reading: nothing to apply, nothing wrong
        (c.topics.group("c", "telemetry"), json.dumps(
            {"v": 2, "ts": time.time(), "ids": cc, "state": ["running"] * 3,
             "power_w": [1.0, 2.0]}).encode()),  # bad_schema
    ]


def test_a_mixed_batch_gives_exactly_the_per_message_result() -> None:
    a, b = controller(GROUPS), controller(GROUPS)
    sent_a = a.actuator.mark_sleep(np.arange(9), time.monotonic())
    sent_b = b.actuator.mark_sleep(np.arange(9), time.monotonic())
    one_by_one(a, mixed(a, sent_a))
    in_batches(b, mixed(b, sent_b))
    assert_same(a, sent_a, b, sent_b)
    # ... and what that is:
    f = b.fleet
    assert b.ingest.invalid == {
        ("group_telemetry", "bad_json"): 1, ("group_telemetry", "unknown_group"): 1,
        ("group_telemetry", "stale"): 1, ("group_telemetry", "unknown_miner"): 1,
        ("group_telemetry", "bad_timestamp"): 1, ("group_telemetry", "bad_schema"): 1}
    assert b.ingest.rejected_readings == {"out_of_range": 1, "unknown_miner": 1,
                                          "wrong_group": 1, "bad_value": 1, "bad_ack": 1}
    # a-0001..2 from a's second message; a-0003 (null) unknown; a-0004 from the first.
    assert _values(b)["power_w"][:4] == [3501.0, 3502.0, None, 3404.0]
    assert f.state[:2].tolist() == [1, 2]  # running, sleeping
    assert _acks(b, sent_b)[:4] == [-3, -1, None, None]
    assert f.restarted[:4].tolist() == [True, False, False, False], "a-0001's ack went back"
    # b-0001: its ack above what was sent ignored, its reading taken; b-0002 from the v1
    # rows (its 1 MW reading was dropped alone).
    assert _values(b)["power_w"][4:6] == [3400.0, 3010.0]
    assert _acks(b, sent_b)[4:6] == [None, None]
    # c-0001 from its own message; c-0002, c-0003 from the rack after it.
    assert _values(b)["power_w"][6:] == [100.0, 3302.0, 3303.0]
    assert f.state[6] == 3  # waking
    assert bool(np.isfinite(f.last_seen).all())
    assert f.site.market_price_usd_per_mwh == 41.5
    counted = _metrics(b)
    assert counted["mineops_mqtt_messages_total[('kind', 'group_telemetry')]"] == 13
    assert counted["mineops_mqtt_messages_total[('kind', 'miner_telemetry')]"] == 1
    # A lag for every rack message past its checks of time (8) and the miner's.
    assert counted["mineops_telemetry_lag_seconds_count[]"] == 9


def test_a_rack_that_comes_again_is_applied_in_order() -> None:
    """Readings of one rack in one batch: the later wins even when it is older (as one by
    one), and acknowledgements that go up and back are taken in order."""
    a, b = controller(GROUPS), controller(GROUPS)
    out = []
    for c in (a, b):
        sent = c.actuator.mark_sleep(np.arange(9), time.monotonic())
        ids = _ids("a", 4)
        msgs = [rack_msg(c, "a", ids, power_w=[1000.0 + k] * 4, age_s=3.0 - k,
                         ack_seq=[sent - 5 + k * (-1) ** k] * 4) for k in range(4)]
        out.append((c, sent, msgs))
    one_by_one(a, out[0][2])
    in_batches(b, out[1][2])
    assert_same(a, out[0][1], b, out[1][1])
    f = b.fleet
    assert f.power_w[:4].tolist() == [1003.0] * 4
    assert time.monotonic() - f.last_seen[0] == pytest.approx(0.0, abs=0.2)
    assert _acks(b, out[1][1])[:4] == [-8] * 4  # -5, -6, -3, -8: the last reported
    assert f.restarted[:4].all(), "an ack went back (-5 -> -6, -3 -> -8)"


def test_batches_of_one_rack_message_per_group_are_one_fleet_write() -> None:
    c = controller([(f"r{k}", "s21", 40) for k in range(6)])
    writes = []
    apply = c.fleet.apply

    def counting(idx: Any, **kw: Any) -> None:
        writes.append(len(idx))
        apply(idx, **kw)

    c.fleet.apply = counting  # type: ignore[method-assign]
    c.on_telemetry([rack_msg(c, f"r{k}", _ids(f"r{k}", 40)) for k in range(6)])
    assert writes == [240]
    c.on_telemetry([rack_msg(c, f"r{k % 2}", _ids(f"r{k % 2}", 40)) for k in range(4)])
    assert writes == [240, 80, 80], "a rack that comes again starts a new write"
    assert not c.ingest.invalid and bool(np.isfinite(c.fleet.last_seen).all())


def test_each_reading_keeps_its_own_messages_time() -> None:
    """Racks of one batch taken 3 s, 0 s and 1 s ago: each reading counts from its own
    message's time, so the first goes stale first."""
    c = controller(GROUPS)
    c.on_telemetry([rack_msg(c, "a", _ids("a", 4), age_s=3.0),
                    rack_msg(c, "b", _ids("b", 2), age_s=0.0),
                    rack_msg(c, "c", _ids("c", 3), age_s=1.0)])
    ages = time.monotonic() - c.fleet.last_seen
    assert ages.tolist() == pytest.approx([3.0] * 4 + [0.0] * 2 + [1.0] * 3, abs=0.2)
    stale_s = c.cfg.policy.telemetry_stale_s
    assert c.fleet.stale(time.monotonic() + stale_s - 2.5, stale_s).tolist() == (
        [True] * 4 + [False] * 5)


# -- any mix, any cut ---------------------------------------------------------------------------

_OWN = {"a": _ids("a", 4), "b": _ids("b", 2), "c": _ids("c", 3), "zz": ["zz-0001"]}
_ANY_ID = st.sampled_from([i for ids in _OWN.values() for i in ids])
_FIELDS = (
    st.sampled_from(["running", "running", "running", "sleeping", "waking", "dancing"]),
    st.sampled_from([None, 15.0, 2500.0, 3400.0, 3400.0, -1.0, 1e6]),
    st.sampled_from([None, None, "sent", "sent-1", "sent-4", "forged"]),
)
_AGE_S = st.sampled_from([0.0, 0.0, 1.0, 3.0, 60.0, -300.0])


@st.composite
def _rack_spec(draw: st.DrawFn) -> tuple[Any, ...]:
    group = draw(st.sampled_from(["a", "b", "c", "c", "zz"]))
    # Mostly the rack's own miners, now and then another's or an unknown one.
    own = st.sampled_from(_OWN[group])
    ids = draw(st.lists(st.one_of(own, own, own, _ANY_ID), max_size=6))
    readings = [(i, *draw(st.tuples(*_FIELDS))) for i in ids]
    return ("rack", group, readings, draw(_AGE_S),
            draw(st.sampled_from(["v2", "v2", "v2", "v1", "broken"])))


_MESSAGE = st.one_of(
    _rack_spec(), _rack_spec(), _rack_spec(),
    st.tuples(st.just("miner"), st.tuples(_ANY_ID, *_FIELDS), st.sampled_from([0.0, 60.0])),
    st.tuples(st.just("price"), st.sampled_from([30.0, 9999.0])),
)


def _ack(spec: str | None, sent: int) -> int | None:
    if spec is None:
        return None
    return {"sent": sent, "sent-1": sent - 1, "sent-4": sent - 4, "forged": sent + 9}[spec]


def _build(c: Controller, sent: int, spec: Any) -> Message:
    if spec[0] == "price":
        return c.topics.price, PriceSignal(ts=time.time(), price_usd_per_mwh=spec[1]).encode()
    if spec[0] == "miner":
        (miner, state, power, ack), age_s = spec[1], spec[2]
        body = {"v": 1, "ts": time.time() - age_s, "state": state, "power_w": power,
                "ack_seq": _ack(ack, sent)}
        return (c.topics.miner(miner, "telemetry"),
                json.dumps({k: v for k, v in body.items() if v is not None}).encode())
    _, group, readings, age_s, fmt = spec
    topic = c.topics.group(group, "telemetry")
    if fmt == "broken":
        return topic, b'{"v":2,"ts":1,"ids":["a-0001"],"state":[1]}'
    ids = [r[0] for r in readings]
    if fmt == "v1":
        rows = [{"id": i, "state": s, **({} if p is None else {"power_w": p}),
                 **({} if _ack(k, sent) is None else {"ack_seq": _ack(k, sent)})}
                for i, s, p, k in readings]
        return topic, json.dumps({"v": 1, "ts": time.time() - age_s, "miners": rows}).encode()
    return topic, encode_group_telemetry(
        time.time() - age_s, ids, [r[1] for r in readings], power_w=[r[2] for r in readings],
        ack_seq=[_ack(r[3], sent) for r in readings])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_MESSAGE, max_size=25), st.lists(st.integers(0, 25), max_size=6))
def test_any_mix_in_any_batches_gives_the_per_message_result(specs: list[Any],
                                                            cuts: list[int]) -> None:
    a, b = controller(GROUPS), controller(GROUPS)
    sent_a = a.actuator.mark_sleep(np.arange(9), time.monotonic())
    sent_b = b.actuator.mark_sleep(np.arange(9), time.monotonic())
    one_by_one(a, [_build(a, sent_a, s) for s in specs])
    in_batches(b, [_build(b, sent_b, s) for s in specs], cuts)
    assert_same(a, sent_a, b, sent_b)


# -- the decoder's lists ------------------------------------------------------------------------

def test_the_decoder_reuses_the_lists_it_has_seen_and_checks_new_ones() -> None:
    d = GroupDecoder(max_lists=2)
    first = d.decode(encode_group_telemetry(1.0, ["r-1", "r-2"], ["running", "sleeping"]))
    again = d.decode(encode_group_telemetry(2.0, ["r-1", "r-2"], ["running", "sleeping"]))
    assert again.ids is first.ids and again.state is first.state
    assert again.ts == 2.0
    other = d.decode(encode_group_telemetry(3.0, ["r-1", "r-3"], ["running", "sleeping"]))
    assert other.ids == ["r-1", "r-3"] and other.ids is not first.ids
    assert other.state is first.state
    # Never a cached list for JSON that differs, valid or not.
    for ids, reason in (('["r-1",""]', "out_of_range"), ('["r-1",2]', "wrong_type"),
                        (json.dumps(["r"] * (MAX_GROUP_READINGS + 1)), "out_of_range")):
        raw = f'{{"v":2,"ts":4.0,"ids":{ids},"state":["running","running"]}}'.encode()
        with pytest.raises(PayloadError) as e:
            d.decode(raw)
        assert e.value.reason == reason and "$.ids" in e.value.detail
    with pytest.raises(PayloadError) as e:
        d.decode(b'{"v":2,"ts":4.0,"ids":["r-1","r-2"],"state":["running",true]}')
    assert e.value.reason == "wrong_type" and "$.state" in e.value.detail
    with pytest.raises(PayloadError) as e:
        d.decode(b'{"v":2,"ts":4.0,"ids":["r-1","r-2"],"state":["running"]}')
    assert e.value.reason == "bad_schema" and e.value.detail.startswith("state: 1 entries")
    # Bounded: a third list of ids starts the cache again.
    d.decode(encode_group_telemetry(5.0, ["r-9"], ["running"]))
    assert d.decode(encode_group_telemetry(6.0, ["r-1", "r-2"], ["running", "sleeping"])
                    ).ids is not first.ids


# -- the transport's batches --------------------------------------------------------------------

def _q(*topics: str, size: int = 10) -> IncomingQueue:
    q = IncomingQueue(100)
    for t in topics:
        q.put_nowait((t, b"x" * size))
    return q


def test_telemetry_is_taken_in_batches_only_when_nothing_more_urgent_waits() -> None:
    rack = "mineops/s/group/r1/telemetry"
    miner = "mineops/s/miner/m-1/telemetry"
    q = _q(rack, miner, "mineops/s/signal/grid", rack, "mineops/s/signal/price", rack)
    assert q.take_telemetry() == [], "the grid event and the price go first"
    assert q.get_nowait()[0] == "mineops/s/signal/grid"
    assert q.take_telemetry() == []
    assert q.get_nowait()[0] == "mineops/s/signal/price"
    got = q.take_telemetry()
    assert [t for t, _ in got] == [rack, miner, rack, rack], "in the order received"
    assert len(q) == 0 and q.bytes == 0 and q.last_lane == LANE_TELEMETRY


def test_a_batch_is_bounded_in_messages_and_bytes() -> None:
    rack = "mineops/s/group/r1/telemetry"
    q = _q(*[rack] * 10, size=100)
    assert len(q.take_telemetry(max_messages=4)) == 4
    assert len(q) == 6 and q.bytes == 600
    assert len(q.take_telemetry(max_bytes=250)) == 2
    assert len(q.take_telemetry(max_bytes=50)) == 1, "one larger than the bound goes alone"
    assert len(q.take_telemetry()) == 3 and len(q) == 0 and q.bytes == 0


def _connect(broker: LocalBroker) -> socket.socket:
    """A raw MQTT 3.1.1 publisher: its sends reach mosquitto whatever the event loop does."""
    sock = socket.create_connection((broker.host, broker.port))
    cid = b"batch-test"
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    sock.sendall(b"\x10" + _length(len(body)) + body)
    assert sock.recv(4)[:1] == b"\x20", "CONNACK"
    return sock


@pytest.mark.integration
async def test_racks_through_mosquitto_are_handled_in_batches(broker: LocalBroker,
                                                             tasks: Any) -> None:
    """A backlog of rack messages (they arrive while the controller is busy) is taken in
    batches, and every reading lands as message by message."""
    groups = [(f"r{k:02d}", "s21", 40) for k in range(50)]
    cfg = make_site(broker, groups, policy={"telemetry_stale_s": 30.0})
    c = Controller(cfg)
    msgs = [rack_msg(c, g, _ids(g, 40), power_w=[3000.0 + k] * 40)
            for k, (g, _, _) in enumerate(groups)]
    sizes: list[int] = []
    inner = c.on_telemetry
    with _connect(broker) as pub:

        def recording(messages: list[Message]) -> None:
            if not sizes:  # busy with the first: the others reach the socket meanwhile
                pub.sendall(b"".join(_publish(t, raw) for t, raw in msgs[1:]))
                time.sleep(0.3)
            sizes.append(len(messages))
            inner(messages)

        c.on_telemetry = recording  # type: ignore[method-assign]
        tasks(c.run(), "controller")
        await wait_for(c.transport.connected.is_set, what="connected")
        await asyncio.sleep(0.2)  # subscribed (before connected is set) and settled
        pub.sendall(_publish(*msgs[0]))
        await wait_for(lambda: bool(np.isfinite(c.fleet.last_seen).all()),
                       what="every reading")
    assert sizes[0] == 1 and sum(sizes) == 50 and max(sizes[1:]) > 1, f"batches {sizes}"
    assert c.fleet.power_w.tolist() == [3000.0 + k for k in range(50) for _ in range(40)]
    assert not c.ingest.invalid and not c.ingest.rejected_readings


@pytest.mark.integration
async def test_packets_cut_by_reads_arrive_whole_and_in_order(broker: LocalBroker,
                                                              tasks: Any) -> None:
    """The transport cuts QoS 0 PUBLISH packets out of 64 KiB reads itself and completes
    the ones a read cut short with the next; QoS 1 and larger ones stay paho's. Sizes
    around the remaining-length steps and the read size, random bytes (headers inside
    payloads), QoS 1 between them: every message arrives whole, QoS 0 in order (MQTT
    orders only within a topic; mosquitto may let a QoS 1 message be passed)."""
    rng = random.Random(40)
    sizes = [0, 1, 2, 127, 128, 2400, 16383, 16384, 65_000, 65_536, 70_000, 300_000]
    sent: list[tuple[str, bytes, int]] = []
    for k in range(400):
        size = rng.choice(sizes) if k % 50 else 1_200_000  # beyond what the reader holds
        sent.append((f"t/{k}", rng.randbytes(size), 1 if k % 17 == 0 else 0))
    peer = Peer(make_site(broker, [("a", "s21", 1)]), subscriptions=["t/#"])
    tasks(peer.run(), "peer")
    await wait_for(peer.transport.connected.is_set, what="connected")  # subscribed first
    with _connect(broker) as pub:
        pub.sendall(b"".join(_publish_qos(t, raw, qos, k + 1)
                             for k, (t, raw, qos) in enumerate(sent)))
        await wait_for(lambda: len(peer.received) >= len(sent), what="every message")
    assert len(peer.received) == len(sent)
    got = dict(peer.received)
    assert all(got[t] == raw for t, raw, _ in sent), "every message whole"
    qos0 = [t for t, _, qos in sent if not qos]
    assert [t for t, _ in peer.received if t in set(qos0)] == qos0


def _publish_qos(topic: str, payload: bytes, qos: int, packet_id: int) -> bytes:
    if not qos:
        return _publish(topic, payload)
    raw = topic.encode()
    body = len(raw).to_bytes(2, "big") + raw + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + _length(len(body)) + body


# -- commands out at once -----------------------------------------------------------------------

def _subscribe(broker: LocalBroker, topic: str) -> socket.socket:
    """A raw MQTT 3.1.1 subscriber (QoS 0), read with blocking calls: no event loop."""
    sock = socket.create_connection((broker.host, broker.port), timeout=5)
    cid = b"batch-sub"
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    sock.sendall(b"\x10" + _length(len(body)) + body)
    assert sock.recv(4)[:1] == b"\x20", "CONNACK"
    raw = topic.encode()
    body = b"\x00\x01" + len(raw).to_bytes(2, "big") + raw + b"\x00"
    sock.sendall(b"\x82" + _length(len(body)) + body)
    assert sock.recv(5)[:1] == b"\x90", "SUBACK"
    return sock


@pytest.mark.integration
async def test_publish_now_is_written_before_the_loop_runs_again(broker: LocalBroker,
                                                                 tasks: Any) -> None:
    """A decision's commands leave with the decision, not turns of the event loop later
    (the tail of bench_shed_latency): the subscriber has the message while this loop is
    still blocked; the future then tells the broker acknowledged it."""
    peer = Peer(make_site(broker, [("a", "s21", 1)]))
    tasks(peer.run(), "peer")
    await wait_for(peer.transport.connected.is_set, what="connected")
    with _subscribe(broker, "cmd/#") as sub:
        acked = peer.transport.publish_now("cmd/1", b"shed", qos=1)
        got = sub.recv(64)  # blocking: the event loop does not run meanwhile
        assert got[:1] == b"\x30" and got.endswith(b"cmd/1shed"), got
        assert not acked.done(), "acknowledged only once the loop reads the PUBACK"
        async with asyncio.timeout(5):
            assert await acked is True
    assert peer.transport._client is not None
    assert not peer.transport._client._pending_publishes, "nothing left waiting"


async def test_publish_now_without_a_broker_is_false_at_once() -> None:
    from controller.config import BrokerConfig  # noqa: PLC0415
    from controller.protocol.transport import Transport  # noqa: PLC0415

    t = Transport(BrokerConfig(port=1), client_id="nobody", subscriptions=[])
    done = t.publish_now("cmd/1", b"x")
    assert done.done() and done.result() is False


@pytest.mark.integration
async def test_publish_now_leaves_no_writer_behind(broker: LocalBroker, tasks: Any) -> None:
    """Writing at once must not leave the event loop watching a writable socket with
    nothing to write: it would spin, a core busy while the controller idles."""
    peer = Peer(make_site(broker, [("a", "s21", 1)]))
    tasks(peer.run(), "peer")
    await wait_for(peer.transport.connected.is_set, what="connected")
    for k in range(3):
        acks = [peer.transport.publish_now(f"cmd/{k}/{j}", b"x" * 100) for j in range(3)]
        assert await asyncio.gather(*acks) == [True] * 3
    await asyncio.sleep(0.05)
    cpu_s = time.process_time()
    await asyncio.sleep(0.5)
    assert time.process_time() - cpu_s < 0.1, "the loop spun while idle"

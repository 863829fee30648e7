"""End to end over a real broker: simulated site + controller + metrics endpoint."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from typing import Any

import numpy as np
import pytest

from controller.catalogue import load_catalogue
from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import PriceSignal
from controller.protocol.topics import SiteTopics
from simulators.site import SimulatedSite
from tests.conftest import Peer, make_site, wait_for

pytestmark = pytest.mark.integration

SPEED = 100.0  # sleep in 0.1 s, wake in ~2 s


def price(p: float) -> bytes:
    return PriceSignal(ts=time.time(), price_usd_per_mwh=p).encode()


async def start_site(broker: LocalBroker, tasks: Any, groups: list[tuple[str, str, int]],
                     **overrides: Any) -> tuple[Controller, SimulatedSite, Peer]:
    cfg = make_site(broker, groups, **overrides)
    sim = SimulatedSite(cfg, speed=SPEED, telemetry_interval_s=0.2, meter_interval_s=0.1)
    controller = Controller(cfg)
    peer = Peer(cfg)
    tasks(sim.run(), "sim")
    tasks(controller.run(), "controller")
    tasks(peer.run(), "peer")
    await wait_for(lambda: controller.transport.connected.is_set()
                   and sim.transport.connected.is_set()
                   and peer.transport.connected.is_set(), what="all three connected")
    return controller, sim, peer


async def settled(controller: Controller, sim: SimulatedSite) -> None:
    """Wait until every miner was commanded, acknowledged, and finished waking or stopping."""
    await wait_for(lambda: bool((controller.actuator.level >= 0).all()), what="all commanded")
    await wait_for(lambda: bool((controller.fleet.ack_seq >= controller.actuator.seq).all()),
                   what="commands acknowledged")
    await wait_for(lambda: bool(np.isin(sim.fleet.mode, (0, 1)).all()),
                   what="no miner still waking or stopping")
    await wait_for(lambda: abs(sim.fleet.total_power_w() * 1.05 - planned_w(controller))
                   < 0.01 * planned_w(controller), what="site power at the plan")
    await wait_for(lambda: abs(controller.fleet.site.meter_power_w - planned_w(controller))
                   < 0.02 * planned_w(controller), what="the meter to see it")


def planned_w(controller: Controller) -> float:
    """Site power the latest decision planned (NaN before the first one)."""
    snap = controller.snapshot
    return math.nan if snap is None else snap.planned_site_power_w


def scrape(controller: Controller) -> str:
    server = controller.metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            return str(r.read().decode())
    finally:
        server.close()


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{key} not in scrape")


async def test_telemetry_reaches_fleet_state(broker: LocalBroker, tasks: Any) -> None:
    controller, sim, peer = await start_site(
        broker, tasks, [("a", "s19j_pro", 20), ("b", "s21", 20)])
    await peer.publish(controller.topics.price, price(20.0), qos=1, retain=True)
    await wait_for(lambda: bool(np.isfinite(controller.fleet.last_seen).all()),
                   what="telemetry from every miner")
    # Fleet state holds what the simulated miners report (once the commands have settled).
    await settled(controller, sim)
    await wait_for(lambda: bool(np.allclose(controller.fleet.power_w, sim.fleet.power_w,
                                            rtol=0.02, atol=20)),
                   what="fleet state power to match the simulated miners")
    assert controller.fleet.hashrate_ths.sum() > 0.9 * sim.fleet.hashrate_ths().sum()
    # The metrics show the last decision's snapshot: wait for one that saw the meter.
    await wait_for(lambda: controller.snapshot is not None
                   and controller.snapshot.measured_site_power_w is not None,
                   what="a decision that saw the meter")
    text = scrape(controller)
    assert metric(text, "mineops_fleet_hashrate_hashes_per_second") > 1e15
    assert metric(text, "mineops_site_power_watts") > 100_000
    assert metric(text, "mineops_miners", 'state="offline"') == 0


async def test_price_between_breakevens_sleeps_old_keeps_new(broker: LocalBroker,
                                                             tasks: Any) -> None:
    catalogue = load_catalogue()
    hp = 42.0
    old, new = catalogue.get("s19j_pro"), catalogue.get("s21")
    between = 0.5 * (old.breakeven_usd_per_mwh(hp) + new.breakeven_usd_per_mwh(hp)) + 10
    assert old.breakeven_usd_per_mwh(hp) < between < new.breakeven_usd_per_mwh(hp)

    controller, sim, peer = await start_site(
        broker, tasks, [("old", "s19j_pro", 30), ("new", "s21", 30)])
    await peer.publish(controller.topics.price, price(10.0), qos=1, retain=True)
    old_idx, new_idx = np.arange(30), np.arange(30, 60)
    await wait_for(lambda: bool(np.isfinite(controller.fleet.last_seen).all()), what="telemetry")
    await wait_for(lambda: bool((sim.fleet.mode == 0).all()), what="all running at a low price")
    await asyncio.sleep(1.0)
    before_w = controller.fleet.site.meter_power_w

    await peer.publish(controller.topics.price, price(between), qos=1, retain=True)
    await wait_for(
        lambda: bool(((sim.fleet.mode[old_idx] == 1) |
                      (sim.fleet.target_w[old_idx] < old.nominal_w)).all()),
        what="S19j Pros asleep or underclocked")
    assert (sim.fleet.mode[new_idx] == 0).all(), "S21s keep running"
    assert (sim.fleet.power_w[new_idx] > 0.5 * new.nominal_w).all()
    shed_w = sum(old.nominal_w - old.sleep_w for _ in old_idx) * 0.5
    await wait_for(lambda: controller.fleet.site.meter_power_w < before_w - shed_w,
                   what=f"the meter to drop by {shed_w / 1000:.0f} kW")


async def test_measured_power_never_exceeds_cap(broker: LocalBroker, tasks: Any) -> None:
    catalogue = load_catalogue()
    groups = [("a", "s19j_pro", 20), ("b", "s21", 20), ("c", "s21_xp_hydro", 10)]
    stock_w = sum(catalogue.get(m).nominal_w * n for _, m, n in groups) * 1.05
    cap_kw = 0.7 * stock_w / 1000
    controller, sim, peer = await start_site(broker, tasks, groups, power_cap_kw=cap_kw)
    await peer.publish(controller.topics.price, price(5.0), qos=1, retain=True)
    await wait_for(lambda: bool(np.isfinite(controller.fleet.last_seen).all()), what="telemetry")
    # Settled: every miner has acknowledged its last command and the power has converged.
    await settled(controller, sim)
    readings = []
    for _ in range(40):
        readings.append(controller.fleet.site.meter_power_w)
        await asyncio.sleep(0.1)
    assert max(readings) <= cap_kw * 1000, f"meter {max(readings):.0f} W over cap {cap_kw}"
    # ... and the cap is used, not just respected: mining at a $5 price is worth it.
    assert min(readings) > 0.9 * cap_kw * 1000


BAD_PAYLOADS: list[tuple[str, bytes, str]] = [
    ("group/a/telemetry", b"{not json", "bad_json"),
    ("group/a/telemetry", b'{"v":1,"ts":NOW,"miners":[{"id":"a-0001","state":"running",'
                          b'"power_w":"lots","hashrate_ths":1}]}', "wrong_type"),
    ("group/a/telemetry", b'{"v":1,"ts":NOW,"miners":[{"id":"nobody","state":"running",'
                          b'"power_w":3000,"hashrate_ths":100}]}', "unknown_miner"),
    ("group/a/telemetry", b'{"v":1,"ts":NOW,"miners":[{"id":"a-0001","state":"running",'
                          b'"power_w":3000000,"hashrate_ths":100}]}', "out_of_range"),
    ("group/a/telemetry", b'{"v":1,"ts":NOW,"miners":[' + b'{"id":"a-0001"},' * 60000 + b"]}",
     "oversized"),
    ("miner/a-0001/telemetry", b'{"v":1,"ts":NOW,"state":"running","power_w":-5,'
                               b'"hashrate_ths":1}', "out_of_range"),
    ("miner/ghost/telemetry", b'{"v":1,"ts":NOW,"state":"running","power_w":5,'
                              b'"hashrate_ths":1}', "unknown_miner"),
    ("miner/a-0001/telemetry", b'{"v":2,"ts":NOW,"state":"running","power_w":5,'
                               b'"hashrate_ths":1}', "bad_version"),
    ("miner/a-0001/availability", b"maybe", "bad_value"),
    ("group/zzz/availability", b"online", "unknown_group"),
    ("meter/poi/telemetry", b'{"v":1,"ts":NOW,"power_w":1e12}', "out_of_range"),
    ("meter/elsewhere/telemetry", b'{"v":1,"ts":NOW,"power_w":1000}', "unknown_meter"),
    ("meter/poi/telemetry", b"[1,2,3]", "wrong_type"),
    ("signal/price", b'{"v":1,"ts":NOW,"price_usd_per_mwh":"cheap"}', "wrong_type"),
    ("signal/price", b'{"v":1,"ts":NOW}', "bad_schema"),
    ("signal/price", b'{"v":1,"ts":NOW,"price_usd_per_mwh":NaN}', "out_of_range"),
    ("signal/hashprice", b'{"v":1,"ts":NOW,"hashprice_usd_per_ph_day":-1}', "out_of_range"),
    # Strict types, timestamps, a price no market has (one merely beyond the site's
    # [energy] cap or floor is planned with at that bound, tests/test_ingest.py), a
    # reading on another group's topic.
    ("signal/price", b'{"v":1,"ts":NOW,"price_usd_per_mwh":"12"}', "wrong_type"),
    ("signal/price", b'{"v":1,"ts":NOW,"price_usd_per_mwh":-600000}', "out_of_range"),
    ("signal/price", b'{"v":1,"ts":99999999999,"price_usd_per_mwh":30}', "bad_timestamp"),
    ("signal/hashprice", b'{"v":1,"ts":0,"hashprice_usd_per_ph_day":40}', "bad_timestamp"),
    ("meter/poi/telemetry", b'{"v":1,"ts":NOW,"power_w":-2e9}', "out_of_range"),
    ("meter/poi/telemetry", b'{"v":1,"ts":0,"power_w":1000}', "bad_timestamp"),
    ("miner/a-0001/telemetry", b'{"v":1,"ts":NOW,"state":"running","power_w":true}',
     "wrong_type"),
    ("miner/a-0001/telemetry", b'{"v":1,"ts":NOW,"state":"running","power_w":49999}',
     "out_of_range"),
    ("miner/a-0001/telemetry", b'{"v":1,"ts":99999999999,"state":"running"}',
     "bad_timestamp"),
    ("group/b/telemetry", b'{"v":2,"ts":NOW,"ids":["a-0001"],"state":["running"]}',
     "wrong_group"),
]


async def test_malformed_payloads_are_counted_and_dropped(broker: LocalBroker,
                                                          tasks: Any) -> None:
    controller, sim, peer = await start_site(broker, tasks, [("a", "s21", 10),
                                                             ("b", "s21", 1)])
    await peer.publish(controller.topics.price, price(20.0), qos=1, retain=True)
    await wait_for(lambda: bool(np.isfinite(controller.fleet.last_seen).all()), what="telemetry")
    good_power = controller.fleet.power_w.copy()
    base = SiteTopics("test").base
    for leaf, payload, _ in BAD_PAYLOADS:
        await peer.publish(f"{base}/{leaf}", payload.replace(b"NOW", b"%.3f" % time.time()),
                           qos=1)
    expected = {(SiteTopics("test").parse(f"{base}/{leaf}").kind.value, reason)
                for leaf, _, reason in BAD_PAYLOADS}
    await wait_for(lambda: expected <= set(controller.ingest.invalid), timeout_s=10,
                   what=f"invalid counters {sorted(expected - set(controller.ingest.invalid))}")
    # Nothing bad reached fleet state: no absurd power, no price of "cheap".
    assert controller.fleet.power_w.max() < 10_000
    assert controller.fleet.power_w == pytest.approx(good_power, rel=0.1, abs=50)
    assert controller.fleet.site.market_price_usd_per_mwh == 20.0
    decisions = controller.decisions
    await peer.publish(controller.topics.price, price(500.0), qos=1, retain=True)
    await wait_for(lambda: controller.decisions > decisions + 2, what="more decisions")
    await wait_for(lambda: bool((sim.fleet.mode == 1).all()),
                   what="the controller still acts: all asleep at $500/MWh")
    text = scrape(controller)
    for kind, reason in expected:
        assert metric(text, "mineops_mqtt_messages_invalid_total",
                      f'kind="{kind}",reason="{reason}"') >= 1


async def test_broker_restart_reconnects_and_resumes(broker: LocalBroker, tasks: Any) -> None:
    controller, sim, peer = await start_site(broker, tasks, [("old", "s19j_pro", 10),
                                                             ("new", "s21", 10)])
    await peer.publish(controller.topics.price, price(10.0), qos=1, retain=True)
    await wait_for(lambda: bool((sim.fleet.mode == 0).all()), what="all running")

    broker.stop()
    await wait_for(lambda: not controller.transport.connected.is_set(), what="disconnect seen")
    await asyncio.sleep(1.0)
    broker.start()  # same port; no retained messages survive (persistence off)
    await wait_for(lambda: controller.transport.connects >= 2 and sim.transport.connects >= 2
                   and peer.transport.connects >= 2, timeout_s=20, what="everyone reconnected")
    applied = sim.commands_applied
    await peer.publish(controller.topics.price, price(500.0), qos=1, retain=True)
    await wait_for(lambda: bool((sim.fleet.mode == 1).all()), what="all asleep after restart")
    assert sim.commands_applied > applied
    # Telemetry flows again: fleet state is fresh.
    seen_before = controller.fleet.last_seen.copy()
    await wait_for(lambda: bool((controller.fleet.last_seen > seen_before).all()),
                   what="fresh telemetry after the restart")


async def test_silent_miners_count_at_max_power_against_the_cap(broker: LocalBroker,
                                                               tasks: Any) -> None:
    """A miner whose network drops keeps drawing power: the others make room for it."""
    catalogue = load_catalogue()
    s21 = catalogue.get("s21")
    groups = [("a", "s21", 20), ("b", "s21", 20)]
    cap_kw = 30 * s21.nominal_w * 1.05 / 1000  # room for 30 of 40 at stock
    controller, sim, peer = await start_site(broker, tasks, groups, power_cap_kw=cap_kw)
    await peer.publish(controller.topics.price, price(5.0), qos=1, retain=True)
    await settled(controller, sim)
    # Ten miners go silent and are ordered (too late) to run at max: they never hear more.
    silent = np.arange(10)
    sim.fleet.target_w[silent] = s21.max_w
    sim.fleet.set_offline(silent)
    await wait_for(lambda: bool(controller.fleet.stale(time.monotonic(), 5.0)[silent].all()),
                   what="silent miners seen as stale")
    await asyncio.sleep(3.0)
    snap = controller.snapshot
    assert snap is not None
    assert snap.reason_counts[8] == 10  # Reason.STALE
    planned_others = snap.planned_site_power_w
    assert planned_others <= cap_kw * 1000
    readings = []
    for _ in range(20):
        readings.append(controller.fleet.site.meter_power_w)
        await asyncio.sleep(0.1)
    assert max(readings) <= cap_kw * 1000, "the cap holds although ten miners went silent"

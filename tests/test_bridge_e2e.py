"""End to end: simulated LuxOS miners, the bridge, a real broker and the controller.

The simulated site publishes only its meter: the miners' only voice is their LuxOS API,
which the bridge reads with pyasic and speaks for on MQTT.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import (
    GroupCapabilities,
    PriceSignal,
    decode,
    decode_group_telemetry,
)
from controller.protocol.topics import SiteTopics
from drivers.firmware.bridge import MinerBridge
from simulators.fleet import Mode
from simulators.luxos_api import LuxosApiServer, luxos_profiles
from simulators.site import SimulatedSite
from tests.conftest import Peer, bridge_of, make_site, wait_for
from tests.test_luxos_pyasic import free_loopback_base

pytestmark = pytest.mark.integration

SPEED = 100.0  # sleep in 0.1 s, wake in ~2 s


def price(p: float) -> bytes:
    return PriceSignal(ts=time.time(), price_usd_per_mwh=p).encode()


@dataclass
class Rig:
    cfg: SiteConfig
    site: SimulatedSite
    api: LuxosApiServer
    bridge: MinerBridge
    peer: Peer


def bridged_site(broker: LocalBroker, groups: list[tuple[str, str, int]],
                 **bridge: Any) -> SiteConfig:
    first = int(ipaddress.IPv4Address(free_loopback_base()))
    ranges, offset = [], 0
    for name, _, count in groups:
        ranges.append({"group": name, "first_host": str(ipaddress.IPv4Address(first + offset)),
                       "firmware": "luxos"})
        offset += count
    return make_site(broker, groups, bridge={
        "miners": ranges, "poll_interval_s": 0.5, "timeout_s": 2.0, "offline_after_polls": 2,
        **bridge})


@pytest.fixture
async def start_rig(broker: LocalBroker, tasks: Any) -> AsyncIterator[Callable[..., Any]]:
    servers: list[LuxosApiServer] = []

    async def start(groups: list[tuple[str, str, int]], **bridge: Any) -> Rig:
        cfg = bridged_site(broker, groups, **bridge)
        assert cfg.bridge is not None
        site = SimulatedSite(cfg, speed=SPEED, meter_interval_s=0.1, miner_mqtt=False)
        catalogue = load_catalogue()
        first = cfg.bridge.endpoints(cfg.inventory)[0].host
        api = LuxosApiServer(site.fleet, [catalogue.get(m.model) for m in cfg.inventory],
                             first_address=first)
        await api.start()
        servers.append(api)
        assert api.addresses == {e.id: e.host for e in cfg.bridge.endpoints(cfg.inventory)}
        bridge_ = bridge_of(cfg)
        peer = Peer(cfg, [f"{SiteTopics(cfg.site_id).base}/#"])
        tasks(site.run(), "sim")
        tasks(bridge_.run(), "bridge")
        tasks(peer.run(), "peer")
        await wait_for(lambda: site.transport.connected.is_set()
                       and bridge_.transport.connected.is_set()
                       and peer.transport.connected.is_set(), what="all connected")
        return Rig(cfg, site, api, bridge_, peer)

    yield start
    for api in servers:
        await api.close()


async def test_price_spike_sleeps_inefficient_miners_through_the_bridge(
        start_rig: Callable[..., Any], tasks: Any) -> None:
    catalogue = load_catalogue()
    old, new = catalogue.get("s19j_pro"), catalogue.get("s21")
    hp = 42.0
    # Above what the S19j Pro earns even at its most efficient target; below the S21's.
    best_old = max(old.hashrate_ths(w) / w for w in old.targets_w())
    spike = 0.5 * (hp / 1000 / 24 * best_old * 1e6 + new.breakeven_usd_per_mwh(hp))
    assert spike < new.breakeven_usd_per_mwh(hp)

    rig: Rig = await start_rig([("old", "s19j_pro", 30), ("new", "s21", 30)])
    fleet = rig.site.fleet
    old_idx, new_idx = np.arange(30), np.arange(30, 60)
    controller = Controller(rig.cfg)
    tasks(controller.run(), "controller")
    await rig.peer.publish(controller.topics.price, price(10.0), qos=1, retain=True)
    await wait_for(lambda: bool(np.isfinite(controller.fleet.last_seen).all()), timeout_s=15,
                   what="bridge telemetry for every miner")
    await wait_for(lambda: bool((fleet.mode == Mode.RUNNING).all()), what="all running")
    # The controller sees what the LuxOS API says, through the bridge.
    await wait_for(lambda: bool(np.allclose(controller.fleet.power_w, fleet.power_w,
                                            rtol=0.03, atol=30)), what="power as simulated")

    await rig.peer.publish(controller.topics.price, price(spike), qos=1, retain=True)
    await wait_for(lambda: bool((fleet.mode[old_idx] == Mode.SLEEPING).all()), timeout_s=20,
                   what="the S19j Pros asleep")
    assert (fleet.mode[new_idx] == Mode.RUNNING).all(), "the S21s keep running"
    assert (fleet.power_w[old_idx] < 50).all()
    # Through the bridge and LuxOS `curtail`, not the simulator's own MQTT commands.
    assert rig.site.commands_applied == 0
    assert rig.bridge.commands_applied >= 30
    assert all(rig.api.miners[fleet.ids[i]].session_id for i in old_idx), "logged on"
    await wait_for(lambda: bool((controller.fleet.ack_seq[old_idx]
                                 >= controller.actuator.seq[old_idx]).all()),
                   what="sleep acknowledged in bridge telemetry")
    await wait_for(lambda: (controller.fleet.counts_by_state(time.monotonic(), 5.0)
                            ["sleeping"] >= 30), what="the controller sees them asleep")

    await rig.peer.publish(controller.topics.price, price(10.0), qos=1, retain=True)
    await wait_for(lambda: bool((fleet.mode == Mode.RUNNING).all()), timeout_s=20,
                   what="the S19j Pros awake again")
    await wait_for(lambda: bool((fleet.power_w[old_idx] > 0.5 * old.nominal_w).all()),
                   what="and drawing power")
    assert rig.bridge.commands_failed == 0


async def test_silent_miner_goes_offline_and_comes_back_after_a_restart(
        start_rig: Callable[..., Any], tasks: Any) -> None:
    rig: Rig = await start_rig([("a", "s21", 6)])
    fleet, topics = rig.site.fleet, SiteTopics(rig.cfg.site_id)
    controller = Controller(rig.cfg)
    tasks(controller.run(), "controller")
    await rig.peer.publish(controller.topics.price, price(10.0), qos=1, retain=True)
    await wait_for(lambda: bool(np.isfinite(controller.fleet.last_seen).all()), what="telemetry")

    def availability(miner_id: str) -> str | None:
        topic = topics.miner(miner_id, "availability")
        seen = [raw.decode() for t, raw in rig.peer.received if t == topic]
        return seen[-1] if seen else None

    fleet.set_offline(np.array([1, 2]))
    await wait_for(lambda: availability("a-0002") == "offline"
                   and availability("a-0003") == "offline", timeout_s=10,
                   what="two miners announced offline")
    assert rig.bridge.devices["a-0002"].failures >= 2
    now = time.monotonic()
    assert controller.fleet.stale(now, rig.cfg.policy.telemetry_stale_s)[[1, 2]].all(), \
        "the controller counts them at maximum power"
    await wait_for(lambda: controller.fleet.counts_by_state(time.monotonic(), 5.0)["offline"]
                   == 2, what="two offline in the controller's view")

    # Their telemetry is left out while they are away.
    def last_reported() -> set[str]:
        last = [decode_group_telemetry(raw) for t, raw in rig.peer.received
                if t == topics.group("a", "telemetry")][-1]
        return set(last.ids)

    await wait_for(lambda: last_reported() == {"a-0001", "a-0004", "a-0005", "a-0006"},
                   what="telemetry without the silent two")

    # They reboot (new sessions) and answer again: picked up, and commandable.
    rig.api.restart(["a-0002", "a-0003"])
    fleet.set_offline(np.array([1, 2]), False)
    await wait_for(lambda: availability("a-0002") == "online"
                   and availability("a-0003") == "online", timeout_s=10, what="back online")
    await wait_for(lambda: controller.fleet.counts_by_state(time.monotonic(), 5.0)["offline"]
                   == 0, what="none offline")
    await rig.peer.publish(controller.topics.price, price(5000.0), qos=1, retain=True)
    await wait_for(lambda: bool((fleet.mode == Mode.SLEEPING).all()), timeout_s=15,
                   what="all asleep at $5000/MWh, the restarted ones too")
    assert rig.api.miners["a-0002"].session_id, "a new session after the restart"


async def test_capabilities_expose_presets(start_rig: Callable[..., Any]) -> None:
    rig: Rig = await start_rig([("a", "s21", 3), ("b", "s19j_pro", 2)])
    topics = SiteTopics(rig.cfg.site_id)

    def caps(group: str) -> GroupCapabilities | None:
        seen = [raw for t, raw in rig.peer.received if t == topics.group(group, "capabilities")]
        return decode(GroupCapabilities, seen[-1]) if seen else None

    await wait_for(lambda: caps("a") is not None and caps("b") is not None,
                   what="capabilities of both groups")
    catalogue = load_catalogue()
    for group, key, ids in (("a", "s21", ["a-0001", "a-0002", "a-0003"]),
                            ("b", "s19j_pro", ["b-0001", "b-0002"])):
        got = caps(group)
        assert got is not None and len(got.sets) == 1
        s = got.sets[0]
        assert s.control == "presets" and s.firmware == "LuxOS"
        assert s.miners == ids
        profiles = luxos_profiles(catalogue.get(key))
        assert s.presets_w == [round(p.watts) for p in profiles]
        assert s.presets_ths == pytest.approx([round(p.hashrate_ths) for p in profiles])
    # Retained: a controller that starts later still learns them.
    late = Peer(rig.cfg, [topics.group("a", "capabilities")])
    task = asyncio.create_task(late.run())
    try:
        await wait_for(lambda: bool(late.received), what="retained capabilities")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_set_power_snaps_to_a_preset(start_rig: Callable[..., Any]) -> None:
    rig: Rig = await start_rig([("a", "s21", 2)])
    topics = SiteTopics(rig.cfg.site_id)
    fleet = rig.site.fleet
    await wait_for(lambda: all(d.reading is not None for d in rig.bridge.devices.values()),
                   what="first poll")
    cmd = ('{"v":1,"seq":7,"ts":1,"targets":{"a-0001":{"action":"set_power","power_w":2450},'
           '"a-0002":{"action":"set_power","power_w":900}}}')
    await rig.peer.publish(topics.group("a", "cmd"), cmd, qos=1)
    await wait_for(lambda: fleet.target_w[0] == 2400 and fleet.target_w[1] == 1800,
                   what="highest preset at or below; the lowest when none is")
    await wait_for(lambda: all(d.ack_seq == 7 for d in rig.bridge.devices.values()),
                   what="acknowledged")


def last_telemetry(rig: Rig, group: str) -> dict[str, dict[str, Any]]:
    """The group's last published telemetry, per miner, the values its JSON carried (v2
    columns: a null or a column left out is a value the miner did not report)."""
    topic = SiteTopics(rig.cfg.site_id).group(group, "telemetry")
    seen = [raw for t, raw in rig.peer.received if t == topic]
    if not seen:
        return {}
    message = json.loads(seen[-1])
    assert message["v"] == 2
    columns = {k: v for k, v in message.items() if isinstance(v, list) and k != "ids"}
    return {miner_id: {k: column[i] for k, column in columns.items() if column[i] is not None}
            for i, miner_id in enumerate(message["ids"])}


async def test_bad_values_stay_with_their_miner(start_rig: Callable[..., Any],
                                                tasks: Any) -> None:
    """Field case bridge-pyasic-partial-data, end to end: one miner's power unknown (its
    LuxOS `power` fails, pyasic says None), another's absurd (65535 W): both are published
    without power, and the controller takes the whole rack."""
    rig: Rig = await start_rig([("a", "s21", 4)])
    rig.api.set_faults(["a-0002"], failing=["power"])
    rig.api.set_faults(["a-0003"], watts=65535)
    sim = rig.site.fleet
    controller = Controller(rig.cfg)
    tasks(controller.run(), "controller")
    await rig.peer.publish(controller.topics.price, price(10.0), qos=1, retain=True)
    await wait_for(lambda: bool((sim.mode == Mode.RUNNING).all()), what="all running")
    fleet = controller.fleet
    await wait_for(lambda: bool(np.isnan(fleet.power_w[[1, 2]]).all()
                                and np.allclose(fleet.power_w[[0, 3]], sim.power_w[[0, 3]],
                                                rtol=0.03, atol=30)),
                   what="power unknown for the two, measured for the rest")
    assert np.isfinite(fleet.last_seen).all(), "every miner of the rack is fresh"
    await wait_for(lambda: bool(np.allclose(fleet.hashrate_ths, sim.hashrate_ths(), rtol=0.03)),
                   what="hashrate of all four, the two without power too")
    assert not any(kind == "group_telemetry" for kind, _ in controller.ingest.invalid), \
        controller.ingest.invalid
    published = last_telemetry(rig, "a")
    assert set(published) == {"a-0001", "a-0002", "a-0003", "a-0004"}
    assert "power_w" not in published["a-0002"] and "power_w" not in published["a-0003"]
    assert published["a-0002"]["state"] == published["a-0003"]["state"] == "running"
    assert rig.bridge.unknown_values["power_w:missing"] >= 1
    assert rig.bridge.unknown_values["power_w:out_of_range"] >= 1


async def test_model_pyasic_lacks_is_error_not_waking_and_still_sleeps(
        start_rig: Callable[..., Any], tasks: Any) -> None:
    """LuxOS on S21 XP: pyasic 0.79 has only its generic LuxOS class (no hashboards)."""
    rig: Rig = await start_rig([("xp", "s21_xp", 3), ("a", "s21", 2)])
    assert rig.bridge.unsupported == {
        ("luxos", "Antminer S21 XP"): ["xp-0001", "xp-0002", "xp-0003"]}
    sim = rig.site.fleet
    controller = Controller(rig.cfg)
    tasks(controller.run(), "controller")
    await rig.peer.publish(controller.topics.price, price(10.0), qos=1, retain=True)
    await wait_for(lambda: bool((sim.mode == Mode.RUNNING).all()), what="all running")

    def counts() -> dict[str, int]:
        return controller.fleet.counts_by_state(time.monotonic(), 5.0)

    await wait_for(lambda: counts()["error"] == 3 and counts()["running"] == 2,
                   what="the S21 XPs in error, the S21s running")
    xp = last_telemetry(rig, "xp")
    for k, miner_id in enumerate(["xp-0001", "xp-0002", "xp-0003"]):
        m = xp[miner_id]
        assert m["state"] == "error", "never 'waking' at 0 TH/s"
        assert m["reason"] == "no pyasic class: LuxOS on Antminer S21 XP"
        assert "hashrate_ths" not in m
        assert m["power_w"] == pytest.approx(sim.power_w[k], rel=0.03, abs=30)
    assert all(m["state"] == "running" for m in last_telemetry(rig, "a").values())

    # Still commandable through pyasic's generic class: a price spike sleeps them all.
    await rig.peer.publish(controller.topics.price, price(5000.0), qos=1, retain=True)
    await wait_for(lambda: bool((sim.mode == Mode.SLEEPING).all()), timeout_s=15,
                   what="all asleep at $5000/MWh, the S21 XPs too")
    await wait_for(lambda: counts()["sleeping"] == 5, what="reported asleep, from their power")
    assert rig.bridge.commands_failed == 0


@pytest.mark.slow
async def test_a_thousand_miners_polled_within_ten_seconds(broker: LocalBroker) -> None:
    """One bridge process, 1,000 LuxOS miners (served by this same process), 10 s poll."""
    n, concurrency = 1000, 128
    cfg = bridged_site(broker, [("a", "s21", n // 2), ("b", "s19j_pro", n // 2)],
                       concurrency=concurrency, poll_interval_s=10.0)
    assert cfg.bridge is not None
    site = SimulatedSite(cfg, speed=1.0, miner_mqtt=False)
    catalogue = load_catalogue()
    endpoints = cfg.bridge.endpoints(cfg.inventory)
    api = LuxosApiServer(site.fleet, [catalogue.get(m.model) for m in cfg.inventory],
                         first_address=endpoints[0].host)
    async with api:
        bridge = bridge_of(cfg)
        await bridge.poll_once()  # identifies every miner and reads its presets
        assert all(d.online for d in bridge.devices.values())
        await bridge.poll_once()
        steady_s = bridge.last_cycle_s
        assert steady_s < 10.0, f"a poll of {n} miners took {steady_s:.1f} s"
        assert api.max_connections <= concurrency
        powers = np.array([bridge.devices[i].reading.power_w  # type: ignore[union-attr]
                           for i in site.fleet.ids])
        assert np.allclose(powers, site.fleet.power_w, atol=1.0)
    print(f"\n{n} miners: steady poll {steady_s:.2f} s, at most {api.max_connections} "
          "connections at once")

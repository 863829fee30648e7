"""The simulated site applies every command form exactly as `FleetCommand.setpoints_for` says.

The simulator decodes a compact fleet command into arrays (a setpoint-table index per
miner) rather than a dict per miner; here its result is compared, miner by miner, with
the reference semantics applied one miner at a time to an identical fleet.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.core.actuation import Actuator
from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from controller.protocol.payloads import FleetCommand, GroupCommand, Setpoint
from simulators.fleet import SimulatedFleet
from simulators.site import AppliedCommand, FixedPeriod, SimulatedSite
from tests.conftest import make_site, wait_for

SLEEP = Setpoint(action="sleep")


def site(racks: list[tuple[str, str, int]], extra_miners: int = 0) -> SiteConfig:
    return SiteConfig.model_validate({
        "site_id": "sim",
        "fleet": {"groups": [{"name": n, "model": m, "count": c} for n, m, c in racks],
                  "miners": [{"id": f"solo-{i}", "model": "s21", "group": "solo"}
                             for i in range(extra_miners)]},
        "power_cap_kw": 100_000,
        "hashprice_usd_per_ph_day": 42.0,
    })


def reference(sim: SimulatedSite, cmd: FleetCommand, now: float) -> SimulatedFleet:
    """A copy of the site's fleet with `cmd` applied miner by miner, by its documented rules."""
    catalogue = load_catalogue()
    ref = SimulatedFleet(sim.fleet.ids, [catalogue.get(m.model) for m in sim.cfg.inventory],
                         speed=sim.fleet.speed, start_now=now)
    ref.offline[:] = sim.fleet.offline
    members = {g: [sim.fleet.ids[i] for i in ix] for g, ix in sim.groups.items()}
    for miner, sp in cmd.setpoints_for(members).items():
        if miner in sim.fleet.index:  # ids of another process's miners are ignored
            ref.apply(np.array([sim.fleet.index[miner]]), sp, cmd.seq, now)
    return ref


def same(a: SimulatedFleet, b: SimulatedFleet) -> None:
    np.testing.assert_array_equal(a.mode, b.mode)
    np.testing.assert_array_equal(a.target_w, b.target_w)
    np.testing.assert_array_equal(a.ack_seq, b.ack_seq)
    np.testing.assert_array_equal(a.until, b.until)


@pytest.mark.parametrize("seed", range(4))
def test_compact_fleet_commands_match_the_reference(seed: int) -> None:
    cfg = site([(f"r{i}", "s21" if i % 3 else "s19j_pro", 7 + i % 5) for i in range(40)],
               extra_miners=3)
    rng = np.random.default_rng(seed)
    sim = SimulatedSite(cfg)
    sim.fleet.set_offline(np.flatnonzero(rng.random(len(sim.fleet.ids)) < 0.05))
    act = Actuator(len(sim.fleet.ids), sim._group_of, sim.fleet.ids, sim._group_names)
    n = len(sim.fleet.ids)
    # Mostly a level per rack, with some miners off their rack's level.
    by_rack = rng.integers(0, 3, len(sim.groups))[sim._group_of]
    level = np.where(rng.random(n) < 0.15, rng.integers(0, 3, n), by_rack)
    pw = np.array([0.0, 2500.0, 3300.0])[level]
    cmds, sent = act.plan(level, pw, rng.random(n) > 0.1, np.full(n, -1), 0.0)
    assert [g for g, _ in cmds] == [None]
    cmd = FleetCommand.model_validate_json(cmds[0][1])
    assert cmd.group_setpoints and cmd.miner_setpoints, "both forms exercised"
    seen: list[AppliedCommand] = []
    sim.on_applied = seen.append
    sim.on_message(sim.topics.fleet_cmd, cmds[0][1])
    same(sim.fleet, reference(sim, cmd, seen[0].received_s))
    heard = int(np.count_nonzero(~sim.fleet.offline[sent]))
    assert [(a.kind, a.seq, a.miners) for a in seen] == [("fleet_cmd", cmd.seq, heard)]
    assert seen[0].applied_s >= seen[0].received_s
    assert not sim.rejected


def test_broadcast_targets_and_other_processes_miners() -> None:
    cfg = site([("a", "s21", 4), ("b", "s21", 4)])
    sim = SimulatedSite(cfg)
    cmd = FleetCommand(seq=5, ts=0.0, all=SLEEP, groups=["a", "not-here"],
                       setpoints=[Setpoint(action="set_power", power_w=2500.0)],
                       group_setpoints={"b": 0, "elsewhere": 0}, except_miners=["b-0002"],
                       miner_setpoints={"a-0003": 0, "ghost": 0},
                       targets={"a-0004": Setpoint(action="set_power", power_w=3000.0)})
    seen: list[AppliedCommand] = []
    sim.on_applied = seen.append
    sim.on_message(sim.topics.fleet_cmd, cmd.encode())
    same(sim.fleet, reference(sim, cmd, seen[0].received_s))
    assert sim.fleet.ack_seq.tolist() == [5, 5, 5, 5, 5, 0, 5, 5]
    assert sim.commands_applied == 7 and not sim.rejected


def test_rack_commands_and_bad_ones_are_counted() -> None:
    cfg = site([("a", "s21", 3)])
    sim = SimulatedSite(cfg)
    cmd = GroupCommand(seq=2, ts=0.0, all=Setpoint(action="set_power", power_w=2600.0),
                       targets={"a-0002": SLEEP, "ghost": SLEEP})
    sim.on_message(sim.topics.group("a", "cmd"), cmd.encode())
    assert sim.fleet.target_w[[0, 2]].tolist() == [2600.0, 2600.0]
    assert sim.fleet.mode[1] == 3, "a-0002 is stopping"
    assert sim.rejected["unknown_miner"] == 1 and sim.commands_applied == 3
    sim.on_message(sim.topics.group("nope", "cmd"), cmd.encode())
    sim.on_message(sim.topics.fleet_cmd, b'{"v":1,"seq":1,"ts":0,"miner_setpoints":{"a":0}}')
    assert sim.rejected["unknown_group"] == 1 and sim.rejected["bad_value"] == 1
    assert sim.commands_applied == 3


def test_fixed_period_keeps_the_period_whatever_a_round_takes() -> None:
    schedule = FixedPeriod(1.0, start_s=10.0)
    starts = [10.0]
    for took in (0.3, 0.9, 0.05, 0.5):  # each round ends `took` after it started
        starts.append(starts[-1] + took + schedule.wait_s(starts[-1] + took))
    assert starts == [10.0, 11.0, 12.0, 13.0, 14.0] and schedule.overruns == 0
    # A 2.5 s round overruns: the next starts at once, then the period resumes from there.
    after = 14.0 + 2.5
    assert schedule.wait_s(after) == 0.0 and schedule.overruns == 1
    assert schedule.wait_s(after + 0.2) == pytest.approx(0.8)


async def test_per_miner_telemetry_reaches_the_controller(broker: LocalBroker,
                                                          tasks: Any) -> None:
    cfg = make_site(broker, [("a", "s21", 30), ("b", "s19j_pro", 20)])
    sim = SimulatedSite(cfg, telemetry_interval_s=0.2, telemetry_format="miner",
                        meter_interval_s=0.2)
    controller = Controller(cfg)
    tasks(sim.run(), "sim")
    tasks(controller.run(), "controller")
    await wait_for(lambda: bool(np.isfinite(controller.fleet.last_seen).all()),
                   what="telemetry from every miner")
    messages = controller.ingest.metrics.messages
    assert messages.labels("miner_telemetry")._value.get() >= 50
    assert messages.labels("group_telemetry")._value.get() == 0
    assert not controller.ingest.invalid, dict(controller.ingest.invalid)
    assert (controller.fleet.state > 0).all(), "every miner's reported state is known"
    await wait_for(lambda: sim.telemetry_rounds >= 5, what="five rounds")
    assert sim.telemetry_overruns == 0 and sim.telemetry_round_s < 0.2

"""Actuation sends only changes, batched per group, and re-sends what was not acknowledged."""

from __future__ import annotations

import numpy as np

from controller.core.actuation import FLEET_BATCH_MIN_GROUPS, Actuator
from controller.protocol.payloads import (
    FleetCommand,
    GroupCommand,
    Setpoint,
    decode,
    encode_targets,
)


def test_direct_encoding_matches_the_model() -> None:
    raw = encode_targets(7, 1234.5, ["a-1", "b.2"], [True, False], [15.0, 3400.0])
    model = GroupCommand(seq=7, ts=1234.5, targets={
        "a-1": Setpoint(action="sleep"), "b.2": Setpoint(action="set_power", power_w=3400.0)})
    assert decode(GroupCommand, raw) == model


def make() -> Actuator:
    return Actuator(4, np.array([0, 0, 1, 1]), ["a", "b", "c", "d"], ["r1", "r2"],
                    retry_after_s=10.0)


def test_only_changes_are_sent_one_message_per_group() -> None:
    act = make()
    level = np.array([3, 0, 3, 3])
    power = np.array([3000.0, 15.0, 3000.0, 3000.0])
    ok = np.ones(4, dtype=bool)
    cmds, sent = act.plan(level, power, ok, np.full(4, -1), now=0.0)
    assert [g for g, _ in cmds] == ["r1", "r2"] and sent.tolist() == [0, 1, 2, 3]
    r1 = decode(GroupCommand, cmds[0][1]).targets or {}
    assert r1["a"].action == "set_power" and r1["a"].power_w == 3000.0
    assert r1["b"].action == "sleep"
    acked = np.full(4, decode(GroupCommand, cmds[0][1]).seq)
    assert act.plan(level, power, ok, acked, now=1.0)[1].size == 0, "nothing changed"
    power2 = power.copy()
    power2[3] = 2500.0
    cmds, sent = act.plan(level, power2, ok, acked, now=2.0)
    assert sent.tolist() == [3] and [g for g, _ in cmds] == ["r2"]


def test_not_commandable_is_never_sent_and_unacked_is_retried() -> None:
    act = make()
    level = np.array([3, 3, 3, 3])
    power = np.full(4, 3000.0)
    ok = np.array([True, True, True, False])
    cmds, sent = act.plan(level, power, ok, np.full(4, -1), now=0.0)
    assert sent.tolist() == [0, 1, 2]
    seq = decode(GroupCommand, cmds[0][1]).seq
    acks = np.array([seq, seq, -1, -1])
    assert act.plan(level, power, ok, acks, now=5.0)[1].size == 0, "not yet time to retry"
    assert act.plan(level, power, ok, acks, now=11.0)[1].tolist() == [2]


def test_forget_resends_everything() -> None:
    act = make()
    level, power, ok = np.array([1, 1, 0, 0]), np.full(4, 2000.0), np.ones(4, dtype=bool)
    cmds, _ = act.plan(level, power, ok, np.full(4, -1), now=0.0)
    acks = np.full(4, decode(GroupCommand, cmds[0][1]).seq)
    act.forget()
    assert act.plan(level, power, ok, acks, now=1.0)[1].size == 4


def test_many_racks_at_once_go_site_wide_in_few_messages() -> None:
    racks = FLEET_BATCH_MIN_GROUPS * 4
    n = racks * 100
    act = Actuator(n, np.repeat(np.arange(racks), 100), [f"m{i}" for i in range(n)],
                   [f"r{g}" for g in range(racks)])
    level = np.zeros(n, dtype=np.intp)
    cmds, sent = act.plan(level, np.full(n, 15.0), np.ones(n, dtype=bool), np.full(n, -1), 0.0)
    assert sent.size == n
    assert [g for g, _ in cmds] == [None, None], "two fleet-topic chunks, not 128 rack messages"
    targets: dict[str, Setpoint] = {}
    for _, raw in cmds:
        targets.update(decode(FleetCommand, raw).targets or {})
    assert len(targets) == n and {t.action for t in targets.values()} == {"sleep"}

"""Actuation sends only changes, exactly and compactly, and re-sends what was not acknowledged.

Every plan here is checked the same way: the messages are decoded with the payload
models (which enforce their size limits) and expanded with the documented semantics
(`FleetCommand.setpoints_for`, a rack's `all` then its `targets`); the result must be
exactly the planned setpoint for each miner sent, and nothing for any other miner.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from controller.core.actuation import (
    FLEET_BATCH_BYTES,
    FLEET_BATCH_MIN_GROUPS,
    FLEET_BATCH_TARGETS,
    Actuator,
)
from controller.protocol.payloads import (
    GROUP_TARGETS_MAX,
    FleetCommand,
    GroupCommand,
    Setpoint,
    decode,
    encode_fleet,
    encode_group_all,
    encode_targets,
)

SLEEP = Setpoint(action="sleep")


def power(w: float) -> Setpoint:
    return Setpoint(action="set_power", power_w=w)


class Fleet:
    """An actuator over racks of the given sizes, and the reference reading of its output."""

    def __init__(self, sizes: list[int], *, shuffle: bool = False, seed: int = 0,
                 id_prefix: str = "m") -> None:
        group_idx = np.repeat(np.arange(len(sizes)), sizes)
        if shuffle:  # racks need not be contiguous in the inventory
            np.random.default_rng(seed).shuffle(group_idx)
        self.n = int(group_idx.size)
        self.group_idx = group_idx
        self.ids = [f"{id_prefix}{i}" for i in range(self.n)]
        self.groups = [f"r{g}" for g in range(len(sizes))]
        self.members = {g: [self.ids[i] for i in np.flatnonzero(group_idx == k)]
                        for k, g in enumerate(self.groups)}
        self.act = Actuator(self.n, group_idx, self.ids, self.groups, retry_after_s=10.0)

    def plan(self, level: npt.NDArray[np.intp], power_w: npt.NDArray[np.float64],
             commandable: npt.NDArray[np.bool_] | None = None, ack: int = -1,
             now: float = 0.0) -> tuple[list[tuple[str | None, bytes]], list[int],
                                        dict[str, Setpoint]]:
        ok = np.ones(self.n, dtype=bool) if commandable is None else commandable
        cmds, sent = self.act.plan(level, power_w, ok, np.full(self.n, ack), now)
        return cmds, sent.tolist(), self.expand(cmds)

    def expand(self, cmds: list[tuple[str | None, bytes]]) -> dict[str, Setpoint]:
        got: dict[str, Setpoint] = {}
        for group, raw in cmds:
            if group is None:
                got.update(decode(FleetCommand, raw).setpoints_for(self.members))
                continue
            cmd = decode(GroupCommand, raw)
            if cmd.all is not None:
                got.update(dict.fromkeys(self.members[group], cmd.all))
            for miner, sp in (cmd.targets or {}).items():
                assert miner in self.members[group], "a rack message names its own miners"
                got[miner] = sp
        return got

    def want(self, sent: list[int], level: npt.NDArray[np.intp],
             power_w: npt.NDArray[np.float64]) -> dict[str, Setpoint]:
        return {self.ids[i]: SLEEP if level[i] == 0 else power(float(power_w[i])) for i in sent}


def test_direct_encodings_match_the_models() -> None:
    raw = encode_targets(7, 1234.5, ["a-1", "b.2"], [True, False], [15.0, 3400.0])
    model = GroupCommand(seq=7, ts=1234.5, targets={"a-1": SLEEP, "b.2": power(3400.0)})
    assert decode(GroupCommand, raw) == model
    assert decode(GroupCommand, encode_group_all(8, 1.5, False, 2900.5)) == GroupCommand(
        seq=8, ts=1.5, all=power(2900.5))
    raw = encode_fleet(9, 2.25, table_sleep=[True, False], table_power_w=[-1.0, 3100.0],
                       group_names=["r1", "r2"], group_codes=[0, 1], except_ids=["m3"],
                       miner_ids=["m4"], miner_codes=[0])
    assert decode(FleetCommand, raw) == FleetCommand(
        seq=9, ts=2.25, setpoints=[SLEEP, power(3100.0)], group_setpoints={"r1": 0, "r2": 1},
        except_miners=["m3"], miner_setpoints={"m4": 0})
    empty = encode_fleet(9, 2.25, table_sleep=[], table_power_w=[], group_names=[],
                         group_codes=[], except_ids=[], miner_ids=[], miner_codes=[])
    assert decode(FleetCommand, empty) == FleetCommand(seq=9, ts=2.25)


def test_fleet_command_semantics_in_order_and_only_the_receivers_miners() -> None:
    cmd = FleetCommand(
        seq=1, ts=0.0, all=SLEEP, groups=["a", "zz"], setpoints=[power(3000.0), power(2500.0)],
        group_setpoints={"b": 0, "other-process": 1}, except_miners=["b2"],
        miner_setpoints={"b3": 1, "a1": 0, "elsewhere": 0}, targets={"a2": power(2000.0)})
    members = {"a": ["a1", "a2", "a3"], "b": ["b1", "b2", "b3"], "c": ["c1"]}
    got = cmd.setpoints_for(members)
    assert got == {"a1": power(3000.0), "a2": power(2000.0), "a3": SLEEP, "b1": power(3000.0),
                   "b3": power(2500.0), "elsewhere": power(3000.0)}
    assert "b2" not in got and "c1" not in got


@pytest.mark.parametrize(("bad", "why"), [
    ({"setpoints": [SLEEP], "group_setpoints": {"r": 1}}, "index 1 with 1 setpoints"),
    ({"miner_setpoints": {"m": 0}}, "index 0 with 0 setpoints"),
    ({"setpoints": [SLEEP], "miner_setpoints": {"m": 0}, "except_miners": ["x"]},
     "except_miners without group_setpoints"),
])
def test_fleet_command_rejects_dangling_indices(bad: dict[str, object], why: str) -> None:
    raw = FleetCommand.model_construct(seq=1, ts=0.0, **bad).model_dump_json(exclude_none=True)
    with pytest.raises(Exception, match=why):
        FleetCommand.model_validate_json(raw)


def test_only_changes_are_sent_one_message_per_rack() -> None:
    f = Fleet([2, 2])
    level = np.array([3, 0, 3, 3])
    pw = np.array([3000.0, 15.0, 3000.0, 3000.0])
    cmds, sent, got = f.plan(level, pw)
    assert [g for g, _ in cmds] == ["r0", "r1"] and sent == [0, 1, 2, 3]
    assert got == f.want(sent, level, pw)
    r0, r1 = (decode(GroupCommand, raw) for _, raw in cmds)
    assert r0.targets == {"m0": power(3000.0), "m1": SLEEP} and r0.all is None
    assert r1.all == power(3000.0) and r1.targets is None, "a uniform rack in one setpoint"
    acked = r0.seq
    assert f.plan(level, pw, ack=acked, now=1.0)[1] == [], "nothing changed"
    pw2 = pw.copy()
    pw2[3] = 2500.0
    cmds, sent, got = f.plan(level, pw2, ack=acked, now=2.0)
    assert sent == [3] and [g for g, _ in cmds] == ["r1"]
    assert decode(GroupCommand, cmds[0][1]).targets == {"m3": power(2500.0)}, (
        "half a rack changed: per miner, not the whole rack")


def test_not_commandable_is_never_sent_and_unacked_is_retried() -> None:
    f = Fleet([2, 2])
    level, pw = np.array([3, 3, 3, 3]), np.full(4, 3000.0)
    ok = np.array([True, True, True, False])
    cmds, sent, got = f.plan(level, pw, ok)
    assert sent == [0, 1, 2] and set(got) == {"m0", "m1", "m2"}
    seq = decode(GroupCommand, cmds[0][1]).seq
    acks = np.array([seq, seq, -1, -1])
    assert f.act.plan(level, pw, ok, acks, now=5.0)[1].size == 0, "not yet time to retry"
    assert f.act.plan(level, pw, ok, acks, now=11.0)[1].tolist() == [2]


def test_forget_resends_everything() -> None:
    f = Fleet([2, 2])
    level, pw = np.array([1, 1, 0, 0]), np.full(4, 2000.0)
    cmds, _, _ = f.plan(level, pw)
    seq = decode(GroupCommand, cmds[0][1]).seq
    f.act.forget()
    assert f.plan(level, pw, ack=seq, now=1.0)[1] == [0, 1, 2, 3]


def test_a_fleet_shed_is_one_compact_message_a_setpoint_per_rack() -> None:
    # 100,000 miners in 2,500 racks of 40: the optimizer sleeps the first 1,200 racks
    # and a part of the next (its cut), and underclocks the rest.
    f = Fleet([40] * 2500)
    level = np.where(np.arange(f.n) < 48_013, 0, 2)
    pw = np.where(level == 0, 15.0, 2800.0)
    cmds, sent, got = f.plan(level, pw)
    assert len(sent) == f.n and got == f.want(sent, level, pw)
    assert [g for g, _ in cmds] == [None], "one fleet-topic message, not 2,500 rack messages"
    raw = cmds[0][1]
    assert len(raw) < 50_000, len(raw)
    cmd = decode(FleetCommand, raw)
    assert cmd.setpoints == [SLEEP, power(2800.0)]
    assert cmd.group_setpoints is not None and len(cmd.group_setpoints) == 2500
    assert cmd.group_setpoints["r1200"] == 1 and cmd.group_setpoints["r1199"] == 0
    # The cut rack: 13 of its 40 sleep, and they are its only per-miner entries.
    assert cmd.miner_setpoints == {f"m{i}": 0 for i in range(48_000, 48_013)}
    assert cmd.except_miners is None and cmd.targets is None
    # Acknowledged, then a smaller move: only what changed goes out again.
    level2 = level.copy()
    level2[48_013:48_053] = 0  # rack 1200's rest and rack 1201's first 13
    pw2 = np.where(level2 == 0, 15.0, 2800.0)
    cmds, sent, got = f.plan(level2, pw2, ack=cmd.seq, now=1.0)
    assert sent == list(range(48_013, 48_053)) and got == f.want(sent, level2, pw2)


def test_many_racks_partly_changed_leave_the_others_alone() -> None:
    # Every rack touched, but only some members: rack entries with except_miners where
    # that is shorter, per-miner entries where not; never a setpoint to the others.
    f = Fleet([40] * 100)
    level, pw = np.full(f.n, 2), np.full(f.n, 3000.0)
    seq = decode(FleetCommand, f.plan(level, pw)[0][0][1]).seq
    level2 = level.copy()
    level2[np.arange(f.n) % 40 < 30] = 0  # 30 of 40 in every rack sleep
    level2[np.arange(f.n) % 400 == 0] = 1  # and one of those per 10 racks underclocks
    pw2 = np.where(level2 == 1, 2000.0, 3000.0)
    cmds, sent, got = f.plan(level2, pw2, ack=seq, now=1.0)
    assert got == f.want(sent, level2, pw2)
    assert len(sent) == 3000 and [g for g, _ in cmds] == [None]
    cmd = decode(FleetCommand, cmds[0][1])
    assert cmd.group_setpoints is not None and len(cmd.group_setpoints) == 100
    assert cmd.except_miners is not None and len(cmd.except_miners) == 1000


@pytest.mark.parametrize("seed", range(6))
def test_any_plan_is_carried_exactly_within_the_message_limits(seed: int) -> None:
    """Random racks (one larger than a message), mixed setpoints, stale miners, re-plans."""
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in rng.integers(1, 120, 60)]
    if seed % 2:
        sizes.append(FLEET_BATCH_TARGETS + 3000)  # a hall as one group
    f = Fleet(sizes, shuffle=seed % 3 == 0, seed=seed)
    ack = -1
    for step in range(4):
        choice = rng.integers(0, 4, f.n) if seed < 3 else np.repeat(
            rng.integers(0, 4, len(sizes)), sizes)[np.argsort(np.argsort(f.group_idx))]
        level = np.where(rng.random(f.n) < 0.1, rng.integers(0, 4, f.n), choice)
        pw = np.array([0.0, 2000.0, 2500.0, 3000.0])[level] + rng.integers(0, 3, f.n) * 100.0
        ok = rng.random(f.n) > 0.05
        cmds, sent, got = f.plan(level, pw, ok, ack=ack, now=float(step))
        assert got == f.want(sent, level, pw), step
        assert all(ok[i] for i in sent)
        for group, raw in cmds:  # decode() already enforced MAX_BYTES and field limits
            assert len(raw) <= FLEET_BATCH_BYTES + 2048, "under the brokers' packet limit"
            if group is None:
                cmd = decode(FleetCommand, raw)
                entries = len(cmd.miner_setpoints or {}) + len(cmd.except_miners or [])
                assert entries <= 2 * FLEET_BATCH_TARGETS
        if cmds:
            first = cmds[0][1]
            ack = (decode(FleetCommand, first) if cmds[0][0] is None
                   else decode(GroupCommand, first)).seq


def test_few_racks_with_more_miners_than_a_rack_message_holds_go_site_wide() -> None:
    f = Fleet([GROUP_TARGETS_MAX + 500, 10])
    level = np.where(np.arange(f.n) % 2 == 0, 0, 3)  # mixed: no single rack setpoint
    pw = np.where(level == 0, 15.0, 3000.0)
    cmds, sent, got = f.plan(level, pw)
    assert {g for g, _ in cmds} == {None}, "a rack message would exceed its target limit"
    assert got == f.want(sent, level, pw)


def test_few_racks_go_to_their_own_topics() -> None:
    f = Fleet([10] * (FLEET_BATCH_MIN_GROUPS + 5))
    level = np.zeros(f.n, dtype=np.intp)
    level[: 10 * (FLEET_BATCH_MIN_GROUPS - 1)] = 1
    pw = np.full(f.n, 2500.0)
    cmds, sent, got = f.plan(level, pw, ack=-1)
    assert None in {g for g, _ in cmds}, "every rack touched: the fleet topic"
    seq = decode(FleetCommand, cmds[0][1]).seq
    level2 = level.copy()
    level2[:10 * (FLEET_BATCH_MIN_GROUPS - 1)] = 0  # 31 racks change
    cmds, sent, got = f.plan(level2, pw, ack=seq, now=1.0)
    assert [g for g, _ in cmds] == [f"r{i}" for i in range(FLEET_BATCH_MIN_GROUPS - 1)]
    assert all(decode(GroupCommand, raw).all == SLEEP for _, raw in cmds)
    assert got == f.want(sent, level2, pw)


def test_long_ids_keep_every_message_under_the_packet_limit() -> None:
    # 63-character ids (the longest the id pattern allows is 64): a mixed plan of 60,000
    # miners is cut by bytes, not only by count, so no message exceeds the broker limit
    # (deploy/mosquitto: max_packet_size 600000).
    f = Fleet([30_000, 20_000, 10_000], id_prefix="x" * 58)
    rng = np.random.default_rng(3)
    level = rng.integers(0, 3, f.n)
    pw = np.array([0.0, 2000.0, 3000.0])[level]
    cmds, sent, got = f.plan(level, pw)
    assert got == f.want(sent, level, pw)
    assert len(cmds) > 12 and max(len(raw) for _, raw in cmds) <= FLEET_BATCH_BYTES + 2048
    # A few racks of long ids whose targets would not fit a rack message go site-wide too.
    g = Fleet([3000, 3000], id_prefix="y" * 58)
    level = np.where(np.arange(g.n) % 2 == 0, 0, 2)
    cmds, sent, got = g.plan(level, np.full(g.n, 3000.0))
    assert {name for name, _ in cmds} == {None} and got == g.want(sent, level,
                                                                     np.full(g.n, 3000.0))
    assert max(len(raw) for _, raw in cmds) <= FLEET_BATCH_BYTES + 2048

"""Simulated miners behave like real ones: timings, heat, faults."""

from __future__ import annotations

import numpy as np
import pytest

from controller.catalogue import load_catalogue
from controller.protocol.payloads import Setpoint
from simulators.fleet import Mode, SimulatedFleet

S21 = load_catalogue().get("s21")


def fleet(n: int = 4, speed: float = 1.0) -> SimulatedFleet:
    return SimulatedFleet([f"m{i}" for i in range(n)], [S21] * n, speed=speed, start_now=0.0)


def run(f: SimulatedFleet, until: float, dt: float = 0.5) -> None:
    t = f.last
    while t < until:
        t += dt
        f.step(t)


def test_power_target_settles_in_seconds() -> None:
    f = fleet()
    f.apply(np.array([0]), Setpoint(action="set_power", power_w=2450), seq=1, now=0.0)
    run(f, S21.settle_s)
    assert f.power_w[0] == pytest.approx(2450, rel=0.03)
    assert f.power_w[1] == pytest.approx(S21.nominal_w)
    assert f.hashrate_ths()[0] == pytest.approx(float(S21.hashrate_ths(2450)), rel=0.03)
    assert f.ack_seq[0] == 1 and f.ack_seq[1] == 0


def test_targets_snap_to_the_firmware_step_and_range() -> None:
    f = fleet()
    f.apply(np.array([0, 1]), Setpoint(action="set_power", power_w=2449), seq=1, now=0.0)
    f.apply(np.array([2]), Setpoint(action="set_power", power_w=9_999), seq=2, now=0.0)
    assert f.target_w[:3].tolist() == [2400.0, 2400.0, S21.max_w]


def test_sleep_takes_seconds_and_wake_takes_minutes() -> None:
    f = fleet()
    f.apply(np.array([0]), Setpoint(action="sleep"), seq=1, now=0.0)
    run(f, S21.sleep_s + 1)
    assert f.mode[0] == Mode.SLEEPING and f.power_w[0] < 50
    assert f.hashrate_ths()[0] == 0
    f.apply(np.array([0]), Setpoint(action="wake"), seq=2, now=f.last)
    woke_at = f.last
    run(f, woke_at + S21.wake_s * 0.9)
    assert f.mode[0] == Mode.WAKING and f.hashrate_ths()[0] == 0, "still booting"
    run(f, woke_at + S21.wake_s + S21.settle_s)
    assert f.mode[0] == Mode.RUNNING
    assert f.power_w[0] == pytest.approx(S21.nominal_w, rel=0.03)


def test_speed_scales_every_duration() -> None:
    f = fleet(speed=60.0)
    f.apply(np.array([0]), Setpoint(action="sleep"), seq=1, now=0.0)
    f.apply(np.array([0]), Setpoint(action="wake"), seq=2, now=S21.sleep_s / 60 + 0.1)
    run(f, (S21.sleep_s + S21.wake_s + S21.settle_s) / 60 + 0.5, dt=0.05)
    assert f.mode[0] == Mode.RUNNING


def test_temperature_follows_power() -> None:
    f = fleet()
    f.apply(np.array([0]), Setpoint(action="sleep"), seq=1, now=0.0)
    run(f, 600, dt=2.0)
    assert f.temp_c[0] < f.temp_c[1] - 20
    assert f.temp_c[0] == pytest.approx(f.ambient_c, abs=2)
    assert f.fan_rpm()[0] == 0 and f.fan_rpm()[1] > 1000


def test_faults_offline_keeps_drawing_and_lost_board_cuts_a_third() -> None:
    f = fleet()
    f.set_offline(np.array([0]))
    f.lose_hashboard(np.array([1]))
    f.apply(np.array([0, 1]), Setpoint(action="sleep"), seq=5, now=0.0)
    run(f, 30)
    assert f.mode[0] == Mode.RUNNING, "an unreachable miner never hears the command"
    assert f.power_w[0] == pytest.approx(S21.nominal_w, rel=0.01)
    h, fans = f.hashrate_ths(), f.fan_rpm()
    assert [r.id for r in f.readings(np.arange(4), h, fans)] == ["m1", "m2", "m3"]
    f2 = fleet()
    f2.lose_hashboard(np.array([0]))
    run(f2, 30)
    assert f2.power_w[0] == pytest.approx(S21.nominal_w * 2 / 3, rel=0.02)
    assert f2.hashrate_ths()[0] == pytest.approx(S21.nominal_ths * 2 / 3, rel=0.02)

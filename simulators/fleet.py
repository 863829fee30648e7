"""A simulated fleet of ASIC miners as numpy arrays: thousands in one process.

Behaviour follows the catalogue: a power-target change settles in seconds,
sleeping takes seconds, waking takes minutes; temperature follows power and
ambient, fans follow temperature. Faults can be injected: a miner that goes
offline stops reporting but keeps drawing power (as a real one whose network
drops does), a lost hashboard takes a third of its power and hashrate, and deaf
firmware acknowledges commands without applying them (`deaf`; see simulators/faults.py).
All durations are divided by `speed`, so a demo can run an hour in a minute.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.catalogue import MinerModel
from controller.protocol.payloads import GroupMinerReading, Setpoint

BOARDS = 3


class Mode(IntEnum):
    """A simulated miner's mode; `MODE_NAMES` are the telemetry states they report."""

    RUNNING = 0
    SLEEPING = 1
    WAKING = 2
    STOPPING = 3


MODE_NAMES = ("running", "sleeping", "waking", "stopping")


class SimulatedFleet:
    """Vectorised miner physics; `step(now)` advances everything to `now` (real seconds).

    Args:
        ids: The miners' ids, in the arrays' order.
        models: Each miner's catalogue model.
        speed: Simulated seconds per real second (wake and ramp times run this much faster).
        ambient_c: Intake air temperature, deg C.
        start_now: The monotonic time the simulation starts at, s.
    """

    def __init__(
        self,
        ids: Sequence[str],
        models: Sequence[MinerModel],
        *,
        speed: float = 1.0,
        ambient_c: float = 30.0,
        start_now: float = 0.0,
    ) -> None:
        n = len(ids)
        self.ids = list(ids)
        self.index = {m: i for i, m in enumerate(ids)}
        self.speed = speed
        self.ambient_c = ambient_c
        distinct = list({id(m): m for m in models}.values())
        self._models = distinct
        self.model_idx = np.array([distinct.index(m) for m in models], dtype=np.intp)

        def per(attr: str) -> npt.NDArray[np.float64]:
            return np.array([getattr(m, attr) for m in models], dtype=np.float64)

        self.min_w, self.max_w, self.step_w = per("min_w"), per("max_w"), per("step_w")
        self.nominal_w, self.sleep_w = per("nominal_w"), per("sleep_w")
        self.wake_s, self.sleep_s, self.settle_s = per("wake_s"), per("sleep_s"), per("settle_s")
        # Miners start running at stock, as a site does after a power-up.
        self.mode = np.full(n, Mode.RUNNING, dtype=np.int8)
        self.target_w = self.nominal_w.copy()
        self.power_w = self.nominal_w.copy()
        self.until = np.zeros(n)
        self.temp_c = np.full(n, ambient_c + 40.0)
        self.boards = np.full(n, BOARDS, dtype=np.int8)
        self.offline = np.zeros(n, dtype=bool)
        # Firmware that acknowledges a command without applying it (simulators/faults.py).
        self.deaf = np.zeros(n, dtype=bool)
        self.ack_seq = np.zeros(n, dtype=np.int64)
        self.last = start_now
        # A test's power judge samples on its own thread (simulators/faults.py): a step
        # or a command is one unit, never interleaved with another.
        self.lock = threading.RLock()

    # -- commands ---------------------------------------------------------------

    def apply(self, idx: npt.NDArray[np.intp], cmd: Setpoint, seq: int, now: float) -> int:
        """Apply one setpoint to the miners at `idx`; the number that applied it.

        Offline miners never hear it; deaf ones acknowledge it without applying it.
        """
        with self.lock:
            return self._apply(idx, cmd, seq, now)

    def _apply(self, idx: npt.NDArray[np.intp], cmd: Setpoint, seq: int, now: float) -> int:
        idx = idx[~self.offline[idx]]
        if idx.size == 0:
            return 0
        self.step(now)
        self.ack_seq[idx[self.deaf[idx]]] = seq  # acknowledged, never applied
        idx = idx[~self.deaf[idx]]
        if cmd.action == "sleep":
            going = idx[(self.mode[idx] == Mode.RUNNING) | (self.mode[idx] == Mode.WAKING)]
            self.mode[going] = Mode.STOPPING
            self.until[going] = now + self.sleep_s[going] / self.speed
        else:
            if cmd.power_w is not None:
                snapped = self.min_w[idx] + np.round(
                    (cmd.power_w - self.min_w[idx]) / self.step_w[idx]
                ) * self.step_w[idx]
                self.target_w[idx] = np.clip(snapped, self.min_w[idx], self.max_w[idx])
            waking = idx[(self.mode[idx] == Mode.SLEEPING) | (self.mode[idx] == Mode.STOPPING)]
            self.mode[waking] = Mode.WAKING
            self.until[waking] = now + self.wake_s[waking] / self.speed
        self.ack_seq[idx] = seq
        return int(idx.size)

    # -- faults -----------------------------------------------------------------

    def set_offline(self, idx: npt.NDArray[np.intp], offline: bool = True) -> None:
        """Take the miners off the network (no telemetry, no commands), or bring them back."""
        self.offline[idx] = offline

    def lose_hashboard(self, idx: npt.NDArray[np.intp]) -> None:
        """One hashboard of each of the miners fails (hashrate falls by its share)."""
        self.boards[idx] = np.maximum(self.boards[idx] - 1, 0)

    # -- physics ----------------------------------------------------------------

    def step(self, now: float) -> None:
        """Advance the physics to `now` (monotonic s)."""
        with self.lock:
            self._step(now)

    def _step(self, now: float) -> None:
        dt = max(0.0, now - self.last) * self.speed  # simulated seconds
        self.last = max(self.last, now)
        if dt == 0.0:
            return
        done = self.until <= now
        self.mode[done & (self.mode == Mode.STOPPING)] = Mode.SLEEPING
        self.mode[done & (self.mode == Mode.WAKING)] = Mode.RUNNING

        share = self.boards / BOARDS
        goal = np.select(
            [self.mode == Mode.RUNNING, self.mode == Mode.WAKING],
            # A waking miner boots and tunes at a fraction of its target before hashing.
            [self.target_w * share, np.maximum(self.sleep_w, 0.1 * self.target_w)],
            default=self.sleep_w,
        )
        tau = np.where(self.mode == Mode.STOPPING, self.sleep_s, self.settle_s) / 5.0
        self.power_w += (goal - self.power_w) * (1.0 - np.exp(-dt / tau))
        heat_goal = self.ambient_c + 45.0 * self.power_w / self.nominal_w
        self.temp_c += (heat_goal - self.temp_c) * (1.0 - np.exp(-dt / 60.0))

    def hashrate_ths(self) -> npt.NDArray[np.float64]:
        """Hashrate now: the model's curve at the power per remaining board."""
        out = np.zeros(len(self.ids))
        share = self.boards / BOARDS
        hashing = (self.mode == Mode.RUNNING) & (share > 0)
        for k, model in enumerate(self._models):
            sel = hashing & (self.model_idx == k)
            per_board_power = self.power_w[sel] / share[sel]
            out[sel] = model.hashrate_ths(per_board_power) * share[sel]
        return out

    def fan_rpm(self) -> npt.NDArray[np.int64]:
        """Each miner's fan speed, rpm, (n,): by temperature, 0 asleep."""
        duty = np.clip((self.temp_c - 35.0) / 40.0, 0.15, 1.0)
        return np.where(self.mode == Mode.SLEEPING, 0, 6000 * duty).astype(np.int64)

    def total_power_w(self) -> float:
        """The fleet's draw, W (without aux)."""
        return float(self.power_w.sum())

    def readings(
        self,
        idx: npt.NDArray[np.intp],
        hashrate_ths: npt.NDArray[np.float64],
        fan_rpm: npt.NDArray[np.int64],
    ) -> list[GroupMinerReading]:
        """Telemetry for the reachable miners among `idx` (fleet-wide arrays computed once)."""
        idx = idx[~self.offline[idx]]
        hashrate, fans = hashrate_ths[idx], fan_rpm[idx]
        return [
            GroupMinerReading.model_construct(
                id=self.ids[i],
                state=MODE_NAMES[self.mode[i]],  # type: ignore[arg-type]
                power_w=round(float(self.power_w[i]), 1),
                hashrate_ths=round(float(h), 2),
                target_w=float(self.target_w[i]),
                temp_c=round(float(self.temp_c[i]), 1),
                fan_rpm=int(f),
                hashboards=int(self.boards[i]),
                ack_seq=int(self.ack_seq[i]),
            )
            for i, h, f in zip(idx, hashrate, fans, strict=True)
        ]

    def columns(
        self,
        idx: npt.NDArray[np.intp],
        hashrate_ths: npt.NDArray[np.float64],
        fan_rpm: npt.NDArray[np.int64],
    ) -> dict[str, Any]:
        """Telemetry of the reachable miners among `idx` as v2 columns.

        The columns are encode_group_telemetry's keyword arguments with `ids` and
        `state`, built a column at a time.
        """
        idx = idx[~self.offline[idx]]
        return {
            "ids": [self.ids[i] for i in idx],
            "state": [MODE_NAMES[m] for m in self.mode[idx]],
            "power_w": np.round(self.power_w[idx], 1).tolist(),
            "hashrate_ths": np.round(hashrate_ths[idx], 2).tolist(),
            "target_w": self.target_w[idx].tolist(),
            "temp_c": np.round(self.temp_c[idx], 1).tolist(),
            "fan_rpm": fan_rpm[idx].tolist(),
            "hashboards": self.boards[idx].tolist(),
            "ack_seq": self.ack_seq[idx].tolist(),
        }

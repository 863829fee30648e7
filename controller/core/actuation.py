"""Actuation: turn a decision into the few group commands that change something.

Only setpoints that differ from what was last commanded are sent, batched one
message per group (a rack), since fan-out per miner is what makes a broker
slow. A command the miner has not acknowledged (telemetry `ack_seq`) within
`retry_after_s` is sent again; after a reconnect everything is re-sent, and so is
whatever the owner `forget`s (miners that restarted, a rack back online, a site the
meter shows over its cap).
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt

from controller.protocol.payloads import encode_targets

_UNKNOWN = -1
# Above this many racks touched, setpoints go site-wide on the fleet topic in a few large
# messages: a publish costs ~1 ms in the client, so 1,000 rack messages would take a second.
FLEET_BATCH_MIN_GROUPS = 32
FLEET_BATCH_TARGETS = 10_000


class Actuator:
    """Remembers what each miner was told; builds the commands for a new decision."""

    def __init__(self, n: int, group_idx: npt.NDArray[np.intp], ids: list[str],
                 groups: list[str], retry_after_s: float = 30.0) -> None:
        self._group_idx = group_idx
        self._ids = ids
        self._groups = groups
        self.level = np.full(n, _UNKNOWN, dtype=np.intp)
        self.power_w = np.full(n, np.nan)
        self.seq = np.full(n, -1, dtype=np.int64)
        self.sent_at = np.full(n, -np.inf)
        self.retry_after_s = retry_after_s
        # Sequence numbers grow across restarts too: start from the wall clock in ms.
        self._next_seq = int(time.time() * 1000)

    def forget(self, idx: npt.NDArray[np.intp] | None = None) -> None:
        """Nothing (or nothing at `idx`) is known to have arrived: re-send at the next plan."""
        if idx is None:
            self.level[:] = _UNKNOWN
        else:
            self.level[idx] = _UNKNOWN

    def acked(self, ack_seq: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Miners whose last command is acknowledged (and that were sent one)."""
        out: npt.NDArray[np.bool_] = (self.seq >= 0) & (ack_seq >= self.seq)
        return out

    def mark_sleep(self, idx: npt.NDArray[np.intp], now: float) -> int:
        """Record a broadcast sleep to `idx` (sent by the caller); returns its sequence number."""
        seq = self._next_seq
        self._next_seq += 1
        self.level[idx] = 0
        self.seq[idx] = seq
        self.sent_at[idx] = now
        return seq

    def plan(
        self,
        level: npt.NDArray[np.intp],
        power_w: npt.NDArray[np.float64],
        commandable: npt.NDArray[np.bool_],
        ack_seq: npt.NDArray[np.int64],
        now: float,
    ) -> tuple[list[tuple[str | None, bytes]], npt.NDArray[np.intp]]:
        """Encoded group commands for the miners whose setpoint changed (or went unacknowledged).

        Each is (group, GroupCommand) for a few racks, or (None, FleetCommand) chunks for
        the fleet topic when many racks change at once. A fleet-wide shed builds tens of
        thousands of setpoints, so they are encoded directly rather than as models.
        """
        changed = (level != self.level) | ((level > 0) & (power_w != self.power_w))
        unacked = (ack_seq < self.seq) & (now - self.sent_at > self.retry_after_s)
        send = np.flatnonzero(commandable & (changed | unacked))
        if send.size == 0:
            return [], send
        seq = self._next_seq
        self._next_seq += 1
        ts = time.time()
        commands: list[tuple[str | None, bytes]] = []
        order = send[np.argsort(self._group_idx[send], kind="stable")]
        groups = self._group_idx[order]
        bounds = np.flatnonzero(np.diff(groups)) + 1
        if bounds.size + 1 >= FLEET_BATCH_MIN_GROUPS:
            chunks = [order[i:i + FLEET_BATCH_TARGETS]
                      for i in range(0, order.size, FLEET_BATCH_TARGETS)]
            names: list[str | None] = [None] * len(chunks)
        else:
            chunks = np.split(order, bounds)
            names = [self._groups[self._group_idx[c[0]]] for c in chunks]
        for name, chunk in zip(names, chunks, strict=True):
            payload = encode_targets(
                seq, ts, [self._ids[i] for i in chunk], level[chunk] == 0, power_w[chunk])
            commands.append((name, payload))
        self.level[send] = level[send]
        self.power_w[send] = power_w[send]
        self.seq[send] = seq
        self.sent_at[send] = now
        return commands, send

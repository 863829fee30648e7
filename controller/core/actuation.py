"""Actuation: turn a decision into the few command messages that change something.

Only setpoints that differ from what was last commanded are sent (or that went
unacknowledged: telemetry `ack_seq` older than the command after `retry_after_s`);
after a reconnect everything is re-sent, and so is whatever the owner `forget`s
(miners that restarted, a rack back online, a site the meter shows over its cap).

What goes out depends on how much changed:

- a few racks: a message per rack on its own topic, `all` when the whole rack gets one
  setpoint, else per-miner targets;
- many racks (a fleet-wide shed, a price swing): compact messages on the fleet topic,
  a setpoint per rack (`group_setpoints`), with the rack members the decision leaves
  alone listed in `except_miners` and the members that differ from their rack in
  `miner_setpoints`. A rack is written per miner instead when that is shorter. A shed
  of 100,000 miners in uniform racks is one ~40 KB message rather than ten 435 KB
  ones, and a receiver applies it with array operations, not a dict per miner.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.protocol.payloads import (
    GROUP_TARGETS_MAX,
    encode_fleet,
    encode_group_all,
    encode_targets,
)

_UNKNOWN = -1
# Above this many racks touched, setpoints go site-wide on the fleet topic: a publish
# costs ~1 ms in the client, so 1,000 rack messages would take a second.
FLEET_BATCH_MIN_GROUPS = 32
# Per fleet message: per-miner entries (except_miners + miner_setpoints), rack entries and
# bytes. They keep a message under the brokers' packet limit (deploy/mosquitto sets
# max_packet_size 600000), within FleetCommand's limits, and a receiver's decode to ms.
FLEET_BATCH_TARGETS = 10_000
FLEET_BATCH_GROUPS = 10_000
FLEET_BATCH_BYTES = 256 * 1024
# A per-miner or rack entry's bytes besides its id: quotes, colon, a table index, comma.
_ENTRY_BYTES = 8
# A rack message's per-miner target besides its id: {"action":"set_power","power_w":...}.
_TARGET_BYTES = 64
# A setpoint key: the power target in W, or this for sleep (targets are never negative).
_SLEEP_KEY = -1.0


@dataclass(frozen=True, slots=True)
class _Racks:
    """Per touched rack of one plan: how its changes are best written."""

    group: npt.NDArray[np.intp]  # (r,) rack index, ascending
    sent: npt.NDArray[np.int64]  # (r,) miners of the rack that are sent a setpoint
    key: npt.NDArray[np.float64]  # (r,) the rack's most common setpoint key among them
    matching: npt.NDArray[np.int64]  # (r,) sent miners whose key is `key`
    compact: npt.NDArray[np.bool_]  # (r,) written as one rack entry plus exceptions


@dataclass(frozen=True, slots=True)
class _FleetForm:
    """Per rack and per miner of one plan: what the fleet-topic messages carry."""

    compact_rack: npt.NDArray[np.bool_]  # (racks,) written as one rack entry
    rack_key: npt.NDArray[np.float64]  # (racks,) that entry's setpoint key
    alone: npt.NDArray[np.bool_]  # (n,) in a compact rack, left alone: except_miners
    own: npt.NDArray[np.bool_]  # (n,) sent its own entry: miner_setpoints
    key: npt.NDArray[np.float64]  # (n,) each miner's setpoint key


class Actuator:
    """Remembers what each miner was told; builds the commands for a new decision.

    Args:
        n: Miners in the fleet.
        group_idx: (n,) each miner's group (rack) index into `groups`.
        ids: (n,) miner ids, as in topics and commands.
        groups: Group names.
        retry_after_s: A setpoint not acknowledged within this is sent again, s.
    """

    def __init__(self, n: int, group_idx: npt.NDArray[np.intp], ids: list[str],
                 groups: list[str], retry_after_s: float = 30.0) -> None:
        self._group_idx = group_idx
        self._ids = ids
        self._groups = groups
        # Miners in rack order, and where each rack starts in it: per-rack sums of a plan
        # are then reductions over contiguous slices.
        order = np.argsort(group_idx, kind="stable")
        self._rack_of_sorted = group_idx[order]
        self._by_rack = None if bool((np.diff(group_idx) >= 0).all()) else order
        self._rack_size = np.bincount(group_idx, minlength=len(groups))
        # What a miner's and a rack's entry costs in a message, bytes.
        self._id_bytes = np.array([len(i) for i in ids], dtype=np.int64)
        self._rack_bytes = np.array([len(g) + _ENTRY_BYTES for g in groups], dtype=np.int64)
        # A rack entry's exceptions travel in its message: at most this many.
        self._max_exceptions = min(
            FLEET_BATCH_TARGETS,
            FLEET_BATCH_BYTES // (int(self._id_bytes.max(initial=0)) + _ENTRY_BYTES) // 2)
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
        """Encoded commands for the miners whose setpoint changed (or went unacknowledged).

        Args:
            level: (n,) planned level per miner, 0 = sleep.
            power_w: (n,) planned power target per miner, W (used where level > 0).
            commandable: (n,) False for miners that must not be commanded (stale, offline).
            ack_seq: (n,) the last command sequence each miner acknowledged.
            now: Monotonic time, s.

        Returns:
            ([(group, GroupCommand JSON) or (None, FleetCommand JSON)], indices sent).
        """
        changed = (level != self.level) | ((level > 0) & (power_w != self.power_w))
        unacked = (ack_seq < self.seq) & (now - self.sent_at > self.retry_after_s)
        send_mask = commandable & (changed | unacked)
        send = np.flatnonzero(send_mask)
        if send.size == 0:
            return [], send
        seq = self._next_seq
        self._next_seq += 1
        ts = time.time()
        key = np.where(level == 0, _SLEEP_KEY, power_w)
        racks = self._racks(send_mask, key)
        if self._fits_rack_messages(racks, send):
            commands = self._rack_messages(seq, ts, racks, send, key)
        else:
            commands = [(None, p) for p in self._fleet_messages(seq, ts, racks, send_mask, key)]
        # Masked copies: at 300,000 miners much cheaper than fancy indexing by `send`.
        np.copyto(self.level, level, where=send_mask)
        np.copyto(self.power_w, power_w, where=send_mask)
        np.copyto(self.seq, seq, where=send_mask)
        np.copyto(self.sent_at, now, where=send_mask)
        return commands, send

    def _fits_rack_messages(self, racks: _Racks, send: npt.NDArray[np.intp]) -> bool:
        """A message per rack: few racks, each within a rack message's limits."""
        if racks.group.size >= FLEET_BATCH_MIN_GROUPS or int(racks.sent.max()) > GROUP_TARGETS_MAX:
            return False
        size = np.bincount(self._group_idx[send], weights=self._id_bytes[send] + _TARGET_BYTES,
                           minlength=len(self._groups))
        return float(size.max()) <= FLEET_BATCH_BYTES

    # -- how each rack is written ----------------------------------------------------

    def _racks(self, send_mask: npt.NDArray[np.bool_], key: npt.NDArray[np.float64]) -> _Racks:
        """Per touched rack: miners sent, its most common setpoint, and the cheaper form.

        The "most common" setpoint is the better of the rack's first and last sent
        miner's: a cut of the optimizer's order falls inside at most a rack or two, so
        a rack is uniform or split in two runs. Anything else is still exact, written
        with more exceptions.
        """
        if self._by_rack is None:  # racks are contiguous in the inventory (the usual case)
            pos = np.flatnonzero(send_mask)  # sent miners, in rack order
            k = key[pos]
        else:
            pos = np.flatnonzero(send_mask[self._by_rack])
            k = key[self._by_rack[pos]]
        rack = self._rack_of_sorted[pos]
        starts = np.flatnonzero(np.concatenate(([True], rack[1:] != rack[:-1])))
        ends = np.append(starts[1:], pos.size)
        first, last = k[starts], k[ends - 1]
        member = np.repeat(np.arange(starts.size), ends - starts)
        n_first = np.add.reduceat((k == first[member]).astype(np.int64), starts)
        n_last = np.add.reduceat((k == last[member]).astype(np.int64), starts)
        use_last = n_last > n_first
        group = rack[starts]
        sent = (ends - starts).astype(np.int64)
        matching = np.where(use_last, n_last, n_first)
        # A rack entry costs one entry plus the members left alone plus those that differ;
        # its exceptions travel in its message, so they must fit in one.
        exceptions = (self._rack_size[group] - sent) + (sent - matching)
        compact = (1 + exceptions < sent) & (exceptions <= self._max_exceptions)
        return _Racks(group=group, sent=sent, key=np.where(use_last, last, first),
                      matching=matching, compact=compact)

    def _rack_messages(self, seq: int, ts: float, racks: _Racks, send: npt.NDArray[np.intp],
                       key: npt.NDArray[np.float64]) -> list[tuple[str | None, bytes]]:
        """A message per touched rack on its own topic."""
        out: list[tuple[str | None, bytes]] = []
        order = send[np.argsort(self._group_idx[send], kind="stable")]
        bounds = np.flatnonzero(np.diff(self._group_idx[order])) + 1
        for r, chunk in enumerate(np.split(order, bounds)):
            g = int(racks.group[r])
            name = self._groups[g]
            whole = racks.sent[r] == self._rack_size[g] and racks.matching[r] == racks.sent[r]
            if whole:
                k = float(racks.key[r])
                out.append((name, encode_group_all(seq, ts, k == _SLEEP_KEY, k)))
            else:
                kc = key[chunk]
                out.append((name, encode_targets(seq, ts, [self._ids[i] for i in chunk],
                                                 kc == _SLEEP_KEY, kc)))
        return out

    def _fleet_messages(self, seq: int, ts: float, racks: _Racks,
                        send_mask: npt.NDArray[np.bool_],
                        key: npt.NDArray[np.float64]) -> list[bytes]:
        """Compact fleet-topic messages, whole racks per message, within the batch limits."""
        n_racks = len(self._groups)
        rack_key = np.full(n_racks, np.nan)
        compact_rack = np.zeros(n_racks, dtype=bool)
        compact_rack[racks.group[racks.compact]] = True
        rack_key[racks.group] = racks.key
        in_compact = compact_rack[self._group_idx]
        # Per miner: left alone inside a compact rack, or its own entry (differs from its
        # compact rack's setpoint, or its rack is written per miner).
        alone = in_compact & ~send_mask
        own = send_mask & ~(in_compact & (key == rack_key[self._group_idx]))
        listed = np.flatnonzero(alone | own)  # few, unless racks are mixed
        listed_rack = self._group_idx[listed]
        entries = np.bincount(listed_rack, minlength=n_racks)
        size = np.bincount(listed_rack, weights=self._id_bytes[listed] + _ENTRY_BYTES,
                           minlength=n_racks) + np.where(compact_rack, self._rack_bytes, 0)
        form = _FleetForm(compact_rack=compact_rack, rack_key=rack_key, alone=alone, own=own,
                          key=key)
        # Racks in order, cut greedily into messages within the batch limits. A rack over
        # a limit by itself (only one written per miner can be) has its miners split.
        touched = racks.group
        limits = ((np.cumsum(entries[touched]), FLEET_BATCH_TARGETS),
                  (np.cumsum(compact_rack[touched]), FLEET_BATCH_GROUPS),
                  (np.cumsum(size[touched]), FLEET_BATCH_BYTES))
        messages: list[bytes] = []
        start = 0
        while start < touched.size:
            stop = min(int(np.searchsorted(total, (total[start - 1] if start else 0) + limit,
                                           "right")) for total, limit in limits)
            stop = max(stop, start + 1)
            messages.extend(self._encode_fleet(seq, ts, touched[start:stop], form))
            start = stop
        return messages

    def _encode_fleet(self, seq: int, ts: float, chunk: npt.NDArray[np.intp],
                      form: _FleetForm) -> list[bytes]:
        """The message(s) for these racks; one unless a lone rack has too many miner entries."""
        compact_rack, rack_key, key = form.compact_rack, form.rack_key, form.key
        in_chunk = np.zeros(len(self._groups), dtype=bool)
        in_chunk[chunk] = True
        member = in_chunk[self._group_idx]
        g_entries = chunk[compact_rack[chunk]]
        except_idx = np.flatnonzero(form.alone & member)
        miner_idx = np.flatnonzero(form.own & member)
        table, codes = np.unique(np.concatenate([rack_key[g_entries], key[miner_idx]]),
                                 return_inverse=True)
        g_codes, m_codes = codes[:g_entries.size], codes[g_entries.size:]
        # Where the miner entries are cut: the racks and their exceptions go in the first
        # message; only a rack written per miner can need more than one.
        cost = np.cumsum(self._id_bytes[miner_idx] + _ENTRY_BYTES)
        used_bytes = int(self._rack_bytes[g_entries].sum()
                         + (self._id_bytes[except_idx] + _ENTRY_BYTES).sum())
        used_entries = except_idx.size
        cuts = [0]
        while cuts[-1] < miner_idx.size:
            lo = cuts[-1]
            base = int(cost[lo - 1]) if lo else 0
            hi = min(int(np.searchsorted(cost, base + FLEET_BATCH_BYTES - used_bytes, "right")),
                     lo + FLEET_BATCH_TARGETS - used_entries)
            cuts.append(max(hi, lo + 1))
            used_bytes = used_entries = 0
        ids = self._ids
        out = []
        bounds = cuts if len(cuts) > 1 else [0, 0]  # no miner entries: one message still
        for part, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            first = part == 0
            m_idx, m_code = miner_idx[lo:hi], m_codes[lo:hi]
            g_code = g_codes if first else g_codes[:0]
            used = np.unique(np.concatenate([g_code, m_code]))
            remap = np.zeros(table.size, dtype=np.intp)
            remap[used] = np.arange(used.size)
            t = table[used]
            out.append(encode_fleet(
                seq, ts, table_sleep=(t == _SLEEP_KEY).tolist(), table_power_w=t.tolist(),
                group_names=[self._groups[g] for g in g_entries] if first else [],
                group_codes=remap[g_code].tolist(),
                except_ids=[ids[i] for i in except_idx] if first else [],
                miner_ids=[ids[i] for i in m_idx], miner_codes=remap[m_code].tolist()))
        return out

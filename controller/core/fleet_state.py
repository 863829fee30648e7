"""Fleet state: what the controller knows of every miner, as numpy arrays indexed by miner.

Telemetry lands here through `apply` (a batch: one array write per field) or `apply_one`
(a miner's own message). `last_seen` is when a miner's latest reading was *taken*, on the
controller's monotonic clock: ingest gives the older of the reading's own time and its
arrival, so a reading that waited in a queue or a broker counts as old as it is, and
staleness (`stale`) is judged by it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, get_args

import numpy as np
import numpy.typing as npt

from controller.catalogue import load_catalogue, operating_points
from controller.config_types import MinerEntry
from controller.protocol.payloads import MinerState, PriceSchedule

# Reported states (the payload's), as small ints; "unknown" until the first telemetry.
STATES: tuple[str, ...] = ("unknown", *get_args(MinerState))
_STATE_CODE = {s: i for i, s in enumerate(STATES)}
# A payload's state name -> its code (telemetry decoding); "unknown" is not reportable.
STATE_CODE: Final[dict[str, int]] = {s: i for s, i in _STATE_CODE.items() if s != "unknown"}
# The operator's view of a miner (metrics' `state` label, the decision topic, the demo):
# reported states folded, with "offline" for miners whose telemetry is stale or missing.
VIEW_STATES = ("running", "underclocked", "sleeping", "waking", "error", "offline")
_VIEW = {s: i for i, s in enumerate(VIEW_STATES)}


@dataclass(slots=True)
class SiteReadings:
    """Site-level inputs: the meter and the markets."""

    meter_power_w: float = math.nan
    meter_at: float = -math.inf
    frequency_hz: float = math.nan
    market_price_usd_per_mwh: float | None = None  # real-time, without adders
    price_at: float = -math.inf
    price_schedule: PriceSchedule | None = None  # day-ahead, for when real-time is missing
    hashprice_usd_per_ph_day: float | None = None


class FleetState:
    """Per-miner arrays; `index` maps miner id to row.

    Args:
        inventory: Every miner, in the order of the arrays (`SiteConfig.inventory`).

    Raises:
        KeyError: a miner of a model not in the catalogue.
    """

    def __init__(self, inventory: list[MinerEntry]) -> None:
        catalogue = load_catalogue()
        n = len(inventory)
        self.ids = [m.id for m in inventory]
        self.index = {m: i for i, m in enumerate(self.ids)}
        self.groups = sorted({m.group for m in inventory})
        gidx = {g: i for i, g in enumerate(self.groups)}
        self.group_idx = np.array([gidx[m.group] for m in inventory], dtype=np.intp)
        self.model_keys = sorted({m.model for m in inventory})
        kidx = {k: i for i, k in enumerate(self.model_keys)}
        self.model_idx = np.array([kidx[m.model] for m in inventory], dtype=np.intp)
        models = [catalogue.get(k) for k in self.model_keys]
        self.models = models
        power, hashrate = operating_points(models)
        self.points_w = power[self.model_idx]
        self.points_ths = hashrate[self.model_idx]
        self.nominal_w = np.array([m.nominal_w for m in models])[self.model_idx]
        self.wake_s = np.array([m.wake_s for m in models])[self.model_idx]
        self.max_w = self.points_w[:, -1].copy()
        self.never_curtail = np.array([m.never_curtail for m in inventory], dtype=bool)
        self.priority = np.array([m.priority for m in inventory], dtype=np.int8)

        self.state = np.zeros(n, dtype=np.int8)
        self.power_w = np.full(n, np.nan)  # unknown until reported, never zero
        self.hashrate_ths = np.full(n, np.nan)
        self.target_w = np.full(n, np.nan)
        self.temp_c = np.full(n, np.nan)
        self.ack_seq = np.full(n, -1, dtype=np.int64)
        # Reported an acknowledgement lower than the one before: the miner (or its bridge)
        # restarted and forgot its setpoint. Cleared by `take_restarted`.
        self.restarted = np.zeros(n, dtype=bool)
        self.last_seen = np.full(n, -np.inf)
        self.announced_offline = np.zeros(n, dtype=bool)
        self.site = SiteReadings()

    def set_points(self, idx: Sequence[int], power_w: Sequence[float],
                   hashrate_ths: Sequence[float] | None) -> bool:
        """Give miners `idx` these operating points (a firmware's presets); True if changed.

        Column 0 stays sleep; hashrate defaults to the model's curve at those powers.
        Rows are padded by repeating their last point, and the arrays widen if needed.
        """
        ix = np.asarray(idx, dtype=np.intp)
        if ix.size == 0:
            return False
        model = self.models[int(self.model_idx[ix[0]])]
        p = np.asarray(power_w, dtype=np.float64)
        h = (model.hashrate_ths(p) if hashrate_ths is None
             else np.asarray(hashrate_ths, dtype=np.float64))
        row_w = np.concatenate([[model.sleep_w], p])
        row_h = np.concatenate([[0.0], h])
        k = self.points_w.shape[1]
        if row_w.size > k:  # widen every row by repeating its last point
            extra = row_w.size - k
            self.points_w = np.hstack([self.points_w, np.repeat(self.points_w[:, -1:], extra, 1)])
            self.points_ths = np.hstack(
                [self.points_ths, np.repeat(self.points_ths[:, -1:], extra, 1)])
            k = row_w.size
        pad_w = np.concatenate([row_w, np.repeat(row_w[-1], k - row_w.size)])
        pad_h = np.concatenate([row_h, np.repeat(row_h[-1], k - row_h.size)])
        if (np.array_equal(self.points_w[ix], np.broadcast_to(pad_w, (ix.size, k)))
                and np.array_equal(self.points_ths[ix], np.broadcast_to(pad_h, (ix.size, k)))):
            return False
        self.points_w[ix] = pad_w
        self.points_ths[ix] = pad_h
        self.max_w[ix] = pad_w[-1]
        return True

    @property
    def n(self) -> int:
        """How many miners (the length of every per-miner array)."""
        return len(self.ids)

    def members(self, group: str) -> npt.NDArray[np.intp]:
        """Indices of the group's miners, ascending.

        Raises:
            ValueError: no such group.
        """
        return np.flatnonzero(self.group_idx == self.groups.index(group))

    def apply(self, idx: npt.NDArray[np.intp], *, state: npt.NDArray[np.int8],
              power_w: npt.NDArray[np.float64], hashrate_ths: npt.NDArray[np.float64],
              target_w: npt.NDArray[np.float64], temp_c: npt.NDArray[np.float64],
              ack_seq: npt.NDArray[np.int64],
              taken_at: float | npt.NDArray[np.float64]) -> None:
        """Apply validated readings (racks' messages) with one array write per field.

        Args:
            idx: Rows, (m,); each at most once (a later duplicate would win).
            state: STATE_CODE values, (m,).
            power_w: Draw, W, NaN unknown, (m,).
            hashrate_ths: TH/s, NaN unknown, (m,).
            target_w: Power target in force, W, NaN unknown, (m,).
            temp_c: Deg C, NaN unknown, (m,).
            ack_seq: Last command applied, -1 unknown, (m,); the latest reported is kept,
                and one that went back flags the miner `restarted` (commanded again).
            taken_at: When the readings were taken, on the monotonic clock, s: one
                time for all, or (m,) (readings of several messages, each its own).
        """
        self.state[idx] = state
        self.power_w[idx] = power_w
        self.hashrate_ths[idx] = hashrate_ths
        self.target_w[idx] = target_w
        self.temp_c[idx] = temp_c
        # The latest acknowledgement reported, not the highest: one that went back is a
        # restarted miner or bridge, to be commanded again.
        prev = self.ack_seq[idx]
        self.restarted[idx[(ack_seq >= 0) & (ack_seq < prev)]] = True
        self.ack_seq[idx] = np.where(ack_seq >= 0, ack_seq, prev)
        self.last_seen[idx] = taken_at
        self.announced_offline[idx] = False

    def apply_one(self, i: int, *, state: int, power_w: float, hashrate_ths: float,
                  target_w: float, temp_c: float, ack_seq: int, taken_at: float) -> None:
        """`apply` for one miner (its own message), without building arrays."""
        self.state[i] = state
        self.power_w[i] = power_w
        self.hashrate_ths[i] = hashrate_ths
        self.target_w[i] = target_w
        self.temp_c[i] = temp_c
        prev = int(self.ack_seq[i])
        if 0 <= ack_seq < prev:
            self.restarted[i] = True
        if ack_seq >= 0:
            self.ack_seq[i] = ack_seq
        self.last_seen[i] = taken_at
        self.announced_offline[i] = False

    def take_restarted(self) -> npt.NDArray[np.intp]:
        """Miners seen to restart since the last call (their acknowledgement went back)."""
        idx = np.flatnonzero(self.restarted)
        self.restarted[idx] = False
        return idx

    def set_available(self, idx: npt.NDArray[np.intp] | int, online: bool) -> None:
        """Record the miners' announced availability (offline counts them as stale)."""
        self.announced_offline[idx] = not online

    def stale(self, now: float, stale_after_s: float) -> npt.NDArray[np.bool_]:
        """Miners whose actual draw is unknown: last reading taken too long ago, or offline."""
        return self.announced_offline | (now - self.last_seen > stale_after_s)

    def view_states(self, now: float, stale_after_s: float) -> npt.NDArray[np.int8]:
        """Each miner's operator state as an index into VIEW_STATES (stale wins over reports)."""
        code = np.full(self.n, _VIEW["offline"], dtype=np.int8)
        state = self.state
        running = state == _STATE_CODE["running"]
        code[running] = _VIEW["running"]
        code[running & (self.target_w < self.nominal_w - 1.0)] = _VIEW["underclocked"]
        code[(state == _STATE_CODE["sleeping"]) | (state == _STATE_CODE["stopping"])] = (
            _VIEW["sleeping"])
        code[state == _STATE_CODE["waking"]] = _VIEW["waking"]
        code[state == _STATE_CODE["error"]] = _VIEW["error"]
        code[self.stale(now, stale_after_s)] = _VIEW["offline"]
        return code

    def counts_by_state(self, now: float, stale_after_s: float) -> dict[str, int]:
        """Miners per VIEW_STATES name."""
        return view_counts(self.view_states(now, stale_after_s))


def view_counts(view_state: npt.NDArray[np.int8]) -> dict[str, int]:
    """Miners per VIEW_STATES name, from per-miner view codes."""
    counts = np.bincount(view_state, minlength=len(VIEW_STATES))
    return {name: int(counts[i]) for i, name in enumerate(VIEW_STATES)}

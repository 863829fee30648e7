"""The fleet as classes of miners that the optimizer and the policy cannot tell apart.

Miners of one model, priority and never-curtail flag behave identically in the backtest,
so it works on classes with a count rather than on miners (see engine.py: cohorts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.core.fleet_state import FleetState
from controller.core.optimizer import highest_level

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class FleetClasses:
    """Miners grouped into classes that the optimizer and policy cannot tell apart."""

    model_keys: tuple[str, ...]  # per class
    priority: IntArray
    never_curtail: npt.NDArray[np.bool_]
    count: IntArray  # miners per class
    points_w: FloatArray  # (n_cls, k) per-miner operating points, column 0 = sleep
    points_ths: FloatArray
    top: IntArray  # highest real level per class
    stock_level: IntArray  # firmware target nearest the nominal power
    wake_s: FloatArray
    member: IntArray  # class of every configured miner

    @classmethod
    def from_config(cls, cfg: SiteConfig) -> FleetClasses:
        """The site's fleet by (model, priority, never_curtail), classes in config order."""
        fs = FleetState(cfg.inventory)
        keys = np.stack([fs.model_idx, fs.priority.astype(np.intp), fs.never_curtail], axis=1)
        _, first, member = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first)  # classes in the order their first miner is configured
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        member = rank[member.ravel()]
        rep = first[order]
        catalogue = load_catalogue()
        models = [fs.model_keys[fs.model_idx[i]] for i in rep]
        p, h = fs.points_w[rep], fs.points_ths[rep]
        top = highest_level(p, h).astype(np.int64)
        stock = np.empty(rep.size, dtype=np.int64)
        for j, key in enumerate(models):
            nominal = catalogue.get(key).nominal_w
            targets = p[j, 1 : top[j] + 1]
            stock[j] = 1 + int(np.argmin(np.abs(targets - nominal)))
        return cls(
            model_keys=tuple(models),
            priority=fs.priority[rep].astype(np.int64),
            never_curtail=fs.never_curtail[rep].copy(),
            count=np.bincount(member, minlength=rep.size).astype(np.int64),
            points_w=p,
            points_ths=h,
            top=top,
            stock_level=stock,
            wake_s=np.array([catalogue.get(k).wake_s for k in models]),
            member=member.astype(np.int64),
        )

    @property
    def n_classes(self) -> int:
        """How many classes (the length of every per-class array)."""
        return len(self.model_keys)

    def stock_points(self) -> tuple[FloatArray, FloatArray]:
        """Sleep and stock only, per class: the fleet of an on/off operator."""
        rows = np.arange(self.n_classes)
        p = np.stack([self.points_w[:, 0], self.points_w[rows, self.stock_level]], axis=1)
        h = np.stack([self.points_ths[:, 0], self.points_ths[rows, self.stock_level]], axis=1)
        return p, h

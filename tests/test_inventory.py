"""The expanded inventory: the same entries as validating each miner would give, and small.

A 300,000-miner site keeps its inventory for the controller's lifetime, so each entry's
size counts (docs/scale.md): built from the validated group, ~0.4 KB each instead of ~1.1.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest
from pydantic import ValidationError

from controller.config import SiteConfig
from controller.config_types import MinerEntry


def site(groups: list[dict[str, Any]], miners: list[dict[str, Any]] | None = None) -> SiteConfig:
    return SiteConfig.model_validate({
        "site_id": "inv", "fleet": {"groups": groups, "miners": miners or []},
        "power_cap_kw": 1_000_000, "hashprice_usd_per_ph_day": 40.0})


def test_entries_are_those_validation_gives() -> None:
    cfg = site([{"name": "r1", "model": "s21", "count": 3},
                {"name": "hall", "model": "s19j_pro", "count": 12_345, "id_prefix": "h",
                 "priority": 4},
                {"name": "vip", "model": "s21", "count": 2, "never_curtail": True}],
               [{"id": "solo", "model": "s21", "group": "odd"}])
    inv = cfg.inventory
    assert len(inv) == 3 + 12_345 + 2 + 1
    assert [m.id for m in inv[:4]] == ["r1-0001", "r1-0002", "r1-0003", "h-0001"]
    assert inv[3 + 12_344].id == "h-12345"
    for m in inv:
        assert MinerEntry.model_validate(m.model_dump()) == m
    assert inv[5].priority == 4 and inv[5].group == "hall" and inv[5].model == "s19j_pro"
    assert inv[-2].never_curtail and inv[-2].id == "vip-0002"


def test_an_id_too_long_is_still_rejected() -> None:
    with pytest.raises(ValidationError, match="String should match pattern"):
        site([{"name": "g" * 60, "model": "s21", "count": 10}])  # "ggg...g-0010": 65 chars


def test_an_entry_costs_under_half_a_kilobyte() -> None:
    groups = [{"name": f"r{i:04d}", "model": "s21", "count": 40} for i in range(500)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cfg = site(groups)  # validation expands (and keeps) the inventory
        gc.collect()
        per_miner = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    finally:
        tracemalloc.stop()
    assert len(cfg.inventory) == 20_000
    assert per_miner < 500, per_miner

"""The miner-model catalogue: data validated on load, facts that match the vendors' figures."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from controller.catalogue import MinerModel, load_catalogue, operating_points

REQUIRED = ("s19j_pro", "s19_xp", "s21", "s21_pro", "s21_xp", "s21_xp_hydro", "s23_hydro", "m60s")


def test_catalogue_has_the_fleet_we_promise() -> None:
    cat = load_catalogue()
    assert set(REQUIRED) <= set(cat.models)
    assert cat.get("s23_hydro").efficiency_j_per_th < 10  # the sub-10 J/TH generation
    assert cat.get("s21").efficiency_j_per_th == pytest.approx(17.5)


def test_breakeven_matches_the_design_brief() -> None:
    # DESIGN.md: at $38/PH/day an S21 (17.5 J/TH) breaks even near $0.09/kWh.
    assert load_catalogue().get("s21").breakeven_usd_per_mwh(38.0) == pytest.approx(90.5, abs=1)


@pytest.mark.parametrize("key", REQUIRED)
def test_underclocking_improves_efficiency(key: str) -> None:
    m = load_catalogue().get(key)
    targets = m.targets_w()
    j_per_th = targets / m.hashrate_ths(targets)
    assert targets[0] == m.min_w and targets[-1] <= m.max_w
    assert np.all(np.diff(j_per_th) > 0), "every step up costs more J/TH"
    assert m.hashrate_ths(m.nominal_w) == pytest.approx(m.nominal_ths, rel=0.01)


def test_a_convex_curve_is_refused() -> None:
    base = load_catalogue().get("s21").model_dump()
    base["curve"] = [(1800, 100.0), (2800, 120.0), (3800, 210.0)]
    with pytest.raises(ValidationError, match="concave"):
        MinerModel.model_validate(base)


def test_presets_and_padding() -> None:
    cat = load_catalogue()
    preset = cat.get("s21").model_copy(update={"presets_w": (2000.0, 3500.0)})
    power, hashrate = operating_points([cat.get("s21"), preset])
    assert power.shape == hashrate.shape
    assert power[1, :3].tolist() == [preset.sleep_w, 2000.0, 3500.0]
    assert np.all(power[1, 3:] == 3500.0), "short rows repeat their last point"
    assert hashrate[0, 0] == 0.0 and hashrate[1, 0] == 0.0

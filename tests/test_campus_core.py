"""The campus as a decision sees it (controller/core/campus.py): headroom, stale readings on
the safe side, islanded limits, and the stepped cost curve."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.campus_config import CampusConfig, campus_review
from controller.core.campus import CampusPicture, PartReading, campus_picture

NOW = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC
STALE_S = 10.0


def campus(**over: Any) -> CampusConfig:
    """50 MW import, a 24 MW GPU hall, 20 MW of solar, a 5 MW genset, an 8 MWh battery."""
    data: dict[str, Any] = {
        "poi": {"import_limit_kw": 50_000, "meter": "poi"},
        "firm_loads": [{"id": "gpu-hall-1", "meter": "gpu", "max_kw": 24_000}],
        "generators": [
            {"id": "solar-1", "kind": "solar", "meter": "pv", "rating_kw": 20_000},
            {"id": "genset-1", "kind": "genset", "meter": "gen", "rating_kw": 5000,
             "marginal_cost_usd_per_mwh": 45, "reserve_kw": 500, "max_load_step_kw": 1500},
        ],
        "battery": {"capacity_kwh": 8000, "max_charge_kw": 4000, "max_discharge_kw": 4000,
                    "meter": "bess"},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return CampusConfig.model_validate(data)


def fresh(kw: float | None, age_s: float = 1.0, **kw_args: Any) -> PartReading:
    return PartReading(None if kw is None else kw * 1000.0, NOW - age_s, **kw_args)


def picture(c: CampusConfig, readings: dict[str, PartReading], **kw: Any) -> CampusPicture:
    args: dict[str, Any] = {"now_unix_s": NOW, "stale_s": STALE_S, "margin_fraction": 0.01,
                            "market_usd_per_mwh": 40.0, "adders_usd_per_mwh": 8.0}
    return campus_picture(c, readings, **{**args, **kw})


ALL_FRESH = {"poi": fresh(10_000), "gpu": fresh(20_000), "pv": fresh(12_000),
             "gen": fresh(0), "bess": fresh(0, soc_fraction=0.6)}


def test_headroom_is_limit_plus_generation_less_firm_load_and_margin() -> None:
    p = picture(campus(), ALL_FRESH)
    # 50 MW + 12 MW solar + 0 genset + 0 battery - 20 MW GPU = 42 MW; margin 1 % of 50 MW.
    assert p.limit_w == pytest.approx(42e6)
    assert p.margin_w == pytest.approx(0.5e6)
    assert p.headroom_w == pytest.approx(41.5e6)
    assert p.cap_w == p.headroom_w
    assert (p.firm_load_w, p.generation_w, p.battery_w) == (20e6, 12e6, 0.0)
    assert p.net_import_w == pytest.approx(10e6)
    assert p.soc_fraction == 0.6
    assert p.stale == ()


@pytest.mark.parametrize(("meter", "reading", "stale_part", "headroom_mw"), [
    # Firm load unknown: at its max_kw (24 MW, not the 20 MW last read).
    ("gpu", fresh(20_000, age_s=STALE_S + 0.1), "gpu-hall-1", 41.5 - 4),
    ("gpu", None, "gpu-hall-1", 41.5 - 4),
    ("gpu", PartReading(None, NOW - 0.5, available=False), "gpu-hall-1", 41.5 - 4),
    # Generation unknown: at 0 (the 12 MW of solar is not counted).
    ("pv", fresh(12_000, age_s=60.0), "solar-1", 41.5 - 12),
    ("pv", PartReading(None, NOW), "solar-1", 41.5 - 12),
    # Battery unknown: charging at its 4 MW limit.
    ("bess", fresh(0, age_s=STALE_S * 2), "battery", 41.5 - 4),
])
def test_stale_or_unknown_readings_count_on_the_safe_side(
        meter: str, reading: PartReading | None, stale_part: str, headroom_mw: float) -> None:
    readings = dict(ALL_FRESH)
    if reading is None:
        del readings[meter]
    else:
        readings[meter] = reading
    p = picture(campus(), readings)
    assert p.stale == (stale_part,)
    assert p.headroom_w == pytest.approx(headroom_mw * 1e6)


def test_a_firm_load_counts_its_announced_draw_before_it_starts() -> None:
    c = campus(firm_loads=[{"id": "gpu-hall-1", "meter": "gpu", "max_kw": 24_000, "schedule": [
        {"start": "2025-06-15T15:00:00Z", "end": "2025-06-15T16:00:00Z", "kw": 22_000}]}])
    p = picture(c, ALL_FRESH)  # reads 20 MW, 22 MW announced from 15:00
    assert p.firm_load_w == pytest.approx(22e6)
    later = picture(c, ALL_FRESH, now_unix_s=NOW + 3600)
    assert later.stale == ("gpu-hall-1", "solar-1", "genset-1", "battery")  # an hour old


def test_a_rising_load_and_falling_generation_count_one_reading_ahead() -> None:
    # The GPU hall rose 3 MW since its last reading (a job ramping in), the solar fell
    # 4 MW (a cloud's edge): each counts where it will be if it keeps moving.
    readings = {**ALL_FRESH, "gpu": PartReading(20e6, NOW - 1, change_w=3e6),
                "pv": PartReading(12e6, NOW - 1, change_w=-4e6)}
    p = picture(campus(), readings)
    assert p.firm_load_w == pytest.approx(23e6)
    assert p.generation_w == pytest.approx(8e6)
    assert p.headroom_w == pytest.approx(41.5e6 - 7e6)
    # Never past the firm load's max_kw, never below 0 W of generation; the other way
    # (a load falling, generation rising) waits for the next reading.
    steep = {**ALL_FRESH, "gpu": PartReading(20e6, NOW - 1, change_w=9e6),
             "pv": PartReading(12e6, NOW - 1, change_w=-20e6)}
    assert picture(campus(), steep).firm_load_w == pytest.approx(24e6)
    assert picture(campus(), steep).generation_w == 0.0
    calm = {**ALL_FRESH, "gpu": PartReading(20e6, NOW - 1, change_w=-5e6),
            "pv": PartReading(12e6, NOW - 1, change_w=5e6)}
    assert picture(campus(), calm).headroom_w == pytest.approx(41.5e6)


def test_a_grid_target_on_net_import_lowers_the_poi_limit() -> None:
    p = picture(campus(), ALL_FRESH, poi_limit_w=30e6)
    assert p.poi_limit_w == 30e6
    assert p.headroom_w == pytest.approx(30e6 + 12e6 - 20e6 - 0.3e6)
    # A target above the interconnect changes nothing.
    assert picture(campus(), ALL_FRESH, poi_limit_w=80e6).poi_limit_w == 50e6


def test_planned_net_import_of_a_plan() -> None:
    # Miners at 30 MW with 12 MW solar and a 20 MW GPU hall: 38 MW at the POI (what a
    # grid target on net import is judged by); islanded there is no net import.
    p = picture(campus(), ALL_FRESH)
    assert p.net_import_w_at(30e6) == pytest.approx(38e6)
    island = picture(campus(**ISLAND), ALL_FRESH)
    assert island.net_import_w_at(30e6) is None


def test_firm_load_above_the_limit_leaves_no_headroom() -> None:
    readings = {**ALL_FRESH, "gpu": fresh(24_000), "pv": fresh(0)}
    c = campus(poi={"import_limit_kw": 20_000})
    p = picture(c, readings)
    assert p.headroom_w == 0.0
    assert p.curve.segments == ()
    assert p.curve.steps() is None


# -- the cost curve ------------------------------------------------------------------------


def test_surplus_comes_first_at_its_cost_then_the_grid_at_market_plus_adders() -> None:
    # 14 MW GPU, 20 MW solar: 6 MW of surplus (no export: it would be curtailed, $0).
    p = picture(campus(), {**ALL_FRESH, "gpu": fresh(14_000), "pv": fresh(20_000)})
    seg = [(s.width_w / 1e6, s.price_usd_per_mwh, s.source) for s in p.curve.segments]
    assert seg == [(pytest.approx(6.0), 0.0, "curtailed"), (pytest.approx(49.5), 48.0, "grid")]
    assert p.curve.width_w == pytest.approx(p.headroom_w)
    assert p.curve.on_site_w == pytest.approx(6e6)
    steps = p.curve.steps()
    assert steps is not None
    assert steps.upper_w.tolist() == pytest.approx([6e6, 55.5e6])
    assert p.curve.price_at(5e6) == 0.0
    assert p.curve.price_at(7e6) == 48.0
    assert p.curve.price_at(60e6) is None


def test_exportable_surplus_costs_the_export_price_the_rest_its_marginal_cost() -> None:
    # 10 MW GPU, 20 MW solar: 10 MW surplus, 4 MW may be exported at the market price
    # ($40): the miners' first 6 MW would be curtailed ($0), the next 4 would earn $40.
    c = campus(poi={"export_limit_kw": 4000})
    p = picture(c, {**ALL_FRESH, "gpu": fresh(10_000), "pv": fresh(20_000)})
    seg = [(round(s.width_w / 1e6, 6), s.price_usd_per_mwh, s.source)
           for s in p.curve.segments]
    assert seg[:2] == [(6.0, 0.0, "curtailed"), (4.0, 40.0, "export")]
    assert seg[2][1:] == (48.0, "grid")


def test_a_running_genset_surplus_costs_its_fuel_and_the_firm_load_takes_solar_first() -> None:
    # 20 MW GPU on 18 MW solar + 4 MW genset: the GPU hall takes the solar and 2 MW of the
    # genset; the other 2 MW of genset output are surplus at $45 (saved if curtailed), and
    # the grid at $48 follows.
    p = picture(campus(), {**ALL_FRESH, "pv": fresh(18_000), "gen": fresh(4000)})
    seg = [(round(s.width_w / 1e6, 6), s.price_usd_per_mwh, s.part) for s in p.curve.segments]
    assert seg[0] == (2.0, 45.0, "genset-1")
    assert seg[1][1:] == (48.0, "grid")


def test_cheap_grid_behind_a_dearer_genset_keeps_the_physical_order() -> None:
    # Night: grid at $20 + $8, the genset's surplus at $45 still comes first (it is what
    # the miners' first watts take); the optimizer decides such a curve exactly.
    p = picture(campus(), {**ALL_FRESH, "pv": fresh(0), "gpu": fresh(2000), "gen": fresh(4000)},
                market_usd_per_mwh=20.0)
    prices = [s.price_usd_per_mwh for s in p.curve.segments]
    assert prices == [45.0, 28.0]


def test_a_discharging_battery_is_supply_a_charging_one_a_load() -> None:
    discharging = picture(campus(), {**ALL_FRESH, "bess": fresh(3000)})
    charging = picture(campus(), {**ALL_FRESH, "bess": fresh(-3000)})
    base = picture(campus(), ALL_FRESH)
    assert discharging.headroom_w - base.headroom_w == pytest.approx(3e6)
    assert base.headroom_w - charging.headroom_w == pytest.approx(3e6)


# -- islanded ------------------------------------------------------------------------------

ISLAND = {"poi": {"import_limit_kw": 50_000, "meter": "poi", "islanded": True}}


def test_islanded_limit_is_genset_rating_less_reserve_and_load_steps() -> None:
    c = campus(**ISLAND, firm_loads=[{"id": "office", "meter": "gpu", "max_kw": 500}],
               generators=[{"id": "genset-1", "kind": "genset", "meter": "gen",
                            "rating_kw": 5000, "marginal_cost_usd_per_mwh": 45,
                            "reserve_kw": 500, "max_load_step_kw": 1500}],
               battery=None)
    # The genset carries 300 kW office + 1200 kW of miners.
    p = picture(c, {"gpu": fresh(300), "gen": fresh(1500)})
    assert p.islanded and p.poi_limit_w is None
    assert p.limit_w == pytest.approx(4.5e6 - 0.3e6)
    assert p.margin_w == pytest.approx(0.045e6)
    assert p.headroom_w == pytest.approx(4.155e6)
    # The miners draw 1.2 MW now: they may rise by the genset's 1.5 MW load step.
    assert p.ramp_limit_w == pytest.approx(2.7e6)
    assert p.cap_w == pytest.approx(2.7e6)
    assert [(s.source, s.price_usd_per_mwh) for s in p.curve.segments] == [("genset", 45.0)]
    # Genset output unknown: no step above the last plan.
    unknown = picture(c, {"gpu": fresh(300)}, miners_planned_w=1.1e6)
    assert unknown.cap_w == pytest.approx(1.1e6)
    assert picture(c, {"gpu": fresh(300)}).cap_w == 0.0
    # Office meter stale: at its 500 kW max, in the limit and in what the miners draw now.
    stale = picture(c, {"gen": fresh(1500)})
    assert stale.headroom_w == pytest.approx(4.5e6 - 0.5e6 - 0.045e6)
    assert stale.ramp_limit_w == pytest.approx(1.0e6 + 1.5e6)


def test_islanded_next_step_waits_for_the_last_to_land_and_the_frequency() -> None:
    c = campus(**ISLAND, firm_loads=[{"id": "office", "meter": "gpu", "max_kw": 500}],
               generators=[{"id": "genset-1", "kind": "genset", "meter": "gen",
                            "rating_kw": 5000, "marginal_cost_usd_per_mwh": 45,
                            "reserve_kw": 500, "max_load_step_kw": 1500}],
               battery=None)
    office = fresh(300)
    # Planned 2.7 MW of miners, 1.2 MW drawn: the step has not landed, hold at the plan.
    p = picture(c, {"gpu": office, "gen": fresh(1500, frequency_hz=60.0)},
                miners_planned_w=2.7e6)
    assert p.ramp_limit_w == pytest.approx(2.7e6)
    # Landed (2.68 MW drawn, within 2 %), but the frequency still 0.3 % low: hold.
    dipped = picture(c, {"gpu": office, "gen": fresh(2980, frequency_hz=59.82)},
                     miners_planned_w=2.7e6)
    assert dipped.ramp_limit_w == pytest.approx(2.7e6)
    # Landed and recovered (within 0.25 % of 60 Hz): the next 1.5 MW step.
    ready = picture(c, {"gpu": office, "gen": fresh(2980, frequency_hz=59.86)},
                    miners_planned_w=2.7e6)
    assert ready.ramp_limit_w == pytest.approx(2.68e6 + 1.5e6)
    # A 50 Hz genset is judged against 50 Hz.
    fifty = picture(c, {"gpu": office, "gen": fresh(2980, frequency_hz=49.88)},
                    miners_planned_w=2.7e6)
    assert fifty.ramp_limit_w == pytest.approx(2.68e6 + 1.5e6)


def test_islanded_without_a_genset_is_refused() -> None:
    review = campus_review(campus(**ISLAND, generators=[
        {"id": "solar-1", "kind": "solar", "meter": "pv", "rating_kw": 20_000}]))
    assert any(e.startswith("campus.poi.islanded: no genset") for e in review.errors)
    assert not any("islanded" in e for e in campus_review(campus(**ISLAND)).errors)


# -- properties ----------------------------------------------------------------------------

readings_strategy = st.fixed_dictionaries({
    "poi": st.floats(-30_000, 50_000), "gpu": st.floats(0, 24_000), "pv": st.floats(0, 20_000),
    "gen": st.floats(0, 5000), "bess": st.floats(-4000, 4000)})


@settings(max_examples=200, deadline=None)
@given(readings_strategy, st.sets(st.sampled_from(["gpu", "pv", "gen", "bess"])),
       st.floats(-100, 500), st.floats(0, 20_000), st.booleans())
def test_stale_never_raises_headroom_and_the_curve_spans_it(
        kw: dict[str, float], stale: set[str], market: float, export_kw: float,
        islanded: bool) -> None:
    c = campus(poi={"export_limit_kw": export_kw, "islanded": islanded})
    readings = {m: fresh(v) for m, v in kw.items()}
    p = picture(c, readings, market_usd_per_mwh=market, miners_planned_w=3e6)
    worse = picture(c, {m: fresh(v, age_s=STALE_S + 1 if m in stale else 1.0)
                        for m, v in kw.items()}, market_usd_per_mwh=market, miners_planned_w=3e6)
    assert worse.headroom_w <= p.headroom_w + 1e-6
    if islanded and "gen" in stale:
        # The genset's load unknown: no step beyond the last plan (3 MW), granted already.
        assert worse.ramp_limit_w == 3e6
    else:
        assert worse.cap_w <= p.cap_w + 1e-6
    for q in (p, worse):
        assert q.headroom_w >= 0
        assert q.curve.width_w == pytest.approx(q.headroom_w, abs=0.01)
        assert all(s.width_w > 0 for s in q.curve.segments)
        if not islanded and q.curve.segments:
            grid = [s for s in q.curve.segments if s.source == "grid"]
            assert all(s.price_usd_per_mwh == market + 8.0 for s in grid)
            # the grid is last: the surplus is what the miners' first watts take
            assert [s.source == "grid" for s in q.curve.segments] == sorted(
                s.source == "grid" for s in q.curve.segments)
        steps = q.curve.steps()
        if steps is not None:
            assert np.all(np.diff(steps.upper_w) > 0)

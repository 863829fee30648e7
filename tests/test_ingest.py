"""Ingest, message by message: columns and rows, per-miner checks, strict types, time, bounds.

The controller is built from a site file and given messages as the transport would
(`Controller.on_message`); nothing connects. The broker-level tests (priorities, the
bounded queue, a flood) are in tests/test_ingest_flood.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.daemon.ingest import HASHRATE_MARGIN, POWER_MARGIN
from controller.daemon.loop import Controller
from controller.protocol.payloads import (
    GroupCapabilities,
    GroupMinerReading,
    GroupTelemetry,
    MeterTelemetry,
    MinerTelemetry,
    PayloadError,
    PowerControlSet,
    PriceSchedule,
    PriceSignal,
    ScheduledPrice,
    decode_group_telemetry,
    encode_group_telemetry,
)
from tests.conftest import make_site

FIELD_CASE = Path(__file__).parent / "fixtures" / "field-cases" / "bridge-pyasic-partial-data"


class _NoBroker:
    """Only host/port are read from the broker by make_site; nothing connects here."""

    host = "127.0.0.1"
    port = 1


def controller(groups: list[tuple[str, str, int]] | None = None, **overrides: Any) -> Controller:
    cfg = make_site(_NoBroker(), groups or [("a", "s21", 4), ("b", "s19j_pro", 2)],  # type: ignore[arg-type]
                    **overrides)
    return Controller(cfg)


def rack(c: Controller, group: str, raw: bytes) -> None:
    c.on_message(c.topics.group(group, "telemetry"), raw)


def v2(ids: list[str], ts: float | None = None, **columns: Any) -> bytes:
    n = len(ids)
    cols: dict[str, Any] = {"power_w": [3400.0] * n, "hashrate_ths": [195.0] * n,
                            "target_w": [3500.0] * n, "temp_c": [66.0] * n}
    cols.update(columns)
    state = cols.pop("state", ["running"] * n)
    return encode_group_telemetry(time.time() if ts is None else ts, ids, state, **cols)


def seen(c: Controller) -> list[bool]:
    return [bool(x) for x in np.isfinite(c.fleet.last_seen)]


# -- columns, rows and one miner at a time --------------------------------------------------

def test_v2_columns_land_in_the_fleet_arrays() -> None:
    c = controller()
    sent = c.actuator.mark_sleep(np.arange(4), time.monotonic())
    rack(c, "a", v2(["a-0001", "a-0002", "a-0003", "a-0004"],
                    power_w=[3401.5, None, 2000.0, 15.0], hashrate_ths=[195.5, 150.0, None, 0.0],
                    state=["running", "running", "waking", "sleeping"],
                    ack_seq=[None, sent - 2, sent - 1, sent],
                    temp_c=[70.0, 71.0, None, 30.0]))
    f = c.fleet
    assert seen(c) == [True] * 4 + [False] * 2
    assert f.power_w[0] == 3401.5 and math.isnan(f.power_w[1]), "null is unknown, never 0"
    assert f.power_w[2:4].tolist() == [2000.0, 15.0]
    assert math.isnan(f.hashrate_ths[2]) and f.hashrate_ths[3] == 0.0
    assert [f.state[i] for i in range(4)] == [1, 1, 3, 2]  # running, running, waking, sleeping
    assert f.ack_seq[:4].tolist() == [-1, sent - 2, sent - 1, sent]
    assert math.isnan(f.temp_c[2]) and f.temp_c[0] == 70.0
    assert not c.ingest.invalid and not c.ingest.rejected_readings


def test_v1_rows_and_per_miner_messages_are_still_read() -> None:
    c = controller()
    rows = GroupTelemetry(ts=time.time(), miners=[
        GroupMinerReading(id="a-0001", state="running", power_w=3300.0, hashrate_ths=190.0),
        GroupMinerReading(id="a-0002", state="sleeping", power_w=15.0)])
    rack(c, "a", rows.encode())
    one = MinerTelemetry(ts=time.time(), state="running", power_w=3100.0, hashrate_ths=101.0,
                         ack_seq=0)
    c.on_message(c.topics.miner("b-0001", "telemetry"), one.encode())
    f = c.fleet
    assert seen(c) == [True, True, False, False, True, False]
    assert f.power_w[[0, 1, 4]].tolist() == [3300.0, 15.0, 3100.0]
    assert math.isnan(f.hashrate_ths[1]) and f.hashrate_ths[4] == 101.0
    assert not c.ingest.invalid


@given(st.lists(st.tuples(st.sampled_from(["running", "sleeping", "waking", "error"]),
                          st.none() | st.floats(0, 50_000, allow_nan=False),
                          st.none() | st.integers(0, 2**63 - 1)), max_size=50))
def test_v2_round_trip(rows: list[tuple[str, float | None, int | None]]) -> None:
    ids = [f"m-{i}" for i in range(len(rows))]
    raw = encode_group_telemetry(12.5, ids, [r[0] for r in rows],
                                 power_w=[r[1] for r in rows], ack_seq=[r[2] for r in rows])
    cols = decode_group_telemetry(raw)
    assert cols.ts == 12.5 and cols.ids == ids and cols.state == [r[0] for r in rows]
    assert [None if math.isnan(x) else x for x in cols.power_w.tolist()] == [r[1] for r in rows]
    assert cols.ack_seq.tolist() == [-1 if r[2] is None else r[2] for r in rows]
    assert np.isnan(cols.hashrate_ths).all(), "a column left out is unknown for every miner"


# -- one miner's bad reading stays with that miner ------------------------------------------

def test_field_case_absurd_hashrate_costs_only_that_miner() -> None:
    """bridge-pyasic-partial-data as the controller received it before the bridge's fix:
    power 0.0 and hashrate 6.8e13 (H/s taken for TH/s) for one miner; its rack-mates fine."""
    data = json.loads((FIELD_CASE / "miner_data.json").read_text())
    hs = sum(b["hashrate"]["rate"] for b in data["hashboards"])
    c = controller([("r", data["site_model"], 3)])
    raw = GroupTelemetry.model_construct(v=1, ts=time.time(), miners=[
        GroupMinerReading.model_construct(id="r-0001", state="running", power_w=0.0,
                                          hashrate_ths=hs / 1e12 * 1e12),
        GroupMinerReading(id="r-0002", state="running", power_w=3068.0, hashrate_ths=104.01),
        GroupMinerReading(id="r-0003", state="running", power_w=3068.0, hashrate_ths=104.01),
    ]).encode()
    rack(c, "r", raw)
    assert seen(c) == [False, True, True]
    assert c.fleet.hashrate_ths[1:].tolist() == [104.01, 104.01]
    assert c.ingest.rejected_readings == {"out_of_range": 1}
    assert not c.ingest.invalid, "the message was applied, only one reading left out"
    # The right reading (power unknown, 68.17 TH/s) is taken as it is.
    rack(c, "r", v2(["r-0001"], power_w=[None], hashrate_ths=[round(hs / 1e12, 2)],
                    target_w=[None]))
    assert seen(c) == [True, True, True]
    assert math.isnan(c.fleet.power_w[0]) and c.fleet.hashrate_ths[0] == 68.17


@pytest.mark.parametrize(("column", "value", "reason"), [
    ("power_w", 49_999.0, "out_of_range"),  # the fuzz case: one S21 at 49,999 W
    ("power_w", 3800 * POWER_MARGIN + 1, "out_of_range"),
    ("power_w", -1.0, "out_of_range"),
    ("target_w", 10_000.0, "out_of_range"),
    ("hashrate_ths", 6.8e13, "out_of_range"),
    ("hashrate_ths", -0.5, "out_of_range"),
    ("temp_c", 400.0, "out_of_range"),
    ("fan_rpm", 99_999, "out_of_range"),
    ("hashboards", 12, "out_of_range"),
    ("state", "dancing", "bad_value"),
    ("ids", "b-0001", "wrong_group"),  # a miner of rack b on rack a's topic
    ("ids", "nobody", "unknown_miner"),
])
def test_a_bad_reading_is_dropped_alone(column: str, value: Any, reason: str) -> None:
    c = controller()
    ids = ["a-0001", "a-0002", "a-0003"]
    cols: dict[str, list[Any]] = {"power_w": [3400.0] * 3, "hashrate_ths": [195.0] * 3,
                                  "target_w": [3500.0] * 3, "temp_c": [66.0] * 3,
                                  "fan_rpm": [4000] * 3, "hashboards": [3] * 3,
                                  "state": ["running"] * 3}
    if column == "ids":
        ids[1] = value
    else:
        cols[column][1] = value
    rack(c, "a", v2(ids, **cols))
    f = c.fleet
    assert bool(np.isfinite(f.last_seen[[0, 2]]).all()), "rack-mates applied"
    assert not np.isfinite(f.last_seen[1]) and not np.isfinite(f.last_seen[4])
    assert c.ingest.rejected_readings == {reason: 1}
    assert not c.ingest.invalid
    if column == "power_w":
        assert np.nanmax(f.power_w) < 3800 * POWER_MARGIN


def test_plausible_bounds_are_the_models_own() -> None:
    c = controller()
    s21_max, s19_max = 3800 * POWER_MARGIN, c.fleet.max_w[4] * POWER_MARGIN
    assert s19_max < s21_max
    rack(c, "b", v2(["b-0001", "b-0002"], power_w=[s19_max - 1, s19_max + 1],
                    target_w=[None, None], hashrate_ths=[100.0, 100.0]))
    assert seen(c)[4:] == [True, False]
    hashrate_top = float(c.fleet.points_ths[0].max()) * HASHRATE_MARGIN
    rack(c, "a", v2(["a-0001", "a-0002"], hashrate_ths=[hashrate_top - 1, hashrate_top + 1]))
    assert seen(c)[:2] == [True, False]
    assert c.ingest.rejected_readings == {"out_of_range": 2}


def test_a_message_with_no_good_reading_is_invalid() -> None:
    c = controller()
    rack(c, "a", v2(["b-0001", "b-0002"]))
    assert c.ingest.invalid == {("group_telemetry", "wrong_group"): 1}
    assert not any(seen(c))


def test_an_unknown_group_topic_is_rejected() -> None:
    c = controller()
    rack(c, "zz", v2(["a-0001"]))
    assert c.ingest.invalid == {("group_telemetry", "unknown_group"): 1}
    assert not any(seen(c))


# -- strict types ---------------------------------------------------------------------------

NOW = "NOW"
STRICT_CASES = [
    ("group/a/telemetry", '{"v":2,"ts":NOW,"ids":["a-0001"],"state":["running"],'
                          '"power_w":["3400"]}'),
    ("group/a/telemetry", '{"v":2,"ts":NOW,"ids":["a-0001"],"state":["running"],'
                          '"power_w":[true]}'),
    ("group/a/telemetry", '{"v":2,"ts":"NOW","ids":["a-0001"],"state":["running"]}'),
    ("group/a/telemetry", '{"v":2,"ts":NOW,"ids":[1],"state":["running"]}'),
    ("group/a/telemetry", '{"v":2,"ts":NOW,"ids":["a-0001"],"state":["running"],'
                          '"ack_seq":[1.5]}'),
    ("group/a/telemetry", '{"v":1,"ts":NOW,"miners":[{"id":"a-0001","state":"running",'
                          '"power_w":"3400"}]}'),
    ("miner/a-0001/telemetry", '{"v":1,"ts":NOW,"state":"running","power_w":false}'),
    ("miner/a-0001/telemetry", '{"v":1,"ts":NOW,"state":"running","hashboards":"3"}'),
    ("meter/poi/telemetry", '{"v":1,"ts":NOW,"power_w":"1000"}'),
    ("signal/price", '{"v":1,"ts":NOW,"price_usd_per_mwh":"30"}'),
    ("signal/price", '{"v":1,"ts":NOW,"price_usd_per_mwh":true}'),
    ("signal/hashprice", '{"v":1,"ts":NOW,"hashprice_usd_per_ph_day":"45"}'),
    ("signal/grid", '{"v":1,"id":"e","kind":"target_kw","value_kw":"100","start_ts":NOW,'
                    '"end_ts":9999999999}'),
]


@pytest.mark.parametrize(("leaf", "payload"), STRICT_CASES)
def test_numbers_as_strings_or_booleans_are_wrong_type(leaf: str, payload: str) -> None:
    c = controller()
    c.on_message(f"{c.topics.base}/{leaf}", payload.replace(NOW, f"{time.time():.3f}").encode())
    assert [r for (_, r) in c.ingest.invalid] == ["wrong_type"]
    assert not any(seen(c))
    assert math.isnan(c.fleet.site.meter_power_w)
    assert c.fleet.site.market_price_usd_per_mwh is None
    assert c.fleet.site.hashprice_usd_per_ph_day is None


# -- time -------------------------------------------------------------------------------------

def _stamped(leaf: str, ts: float) -> bytes:
    if leaf.startswith("group"):
        return v2(["a-0001"], ts=ts)
    if leaf.startswith("miner"):
        return MinerTelemetry(ts=ts, state="running", power_w=3400.0).encode()
    if leaf.startswith("meter"):
        return MeterTelemetry(ts=ts, power_w=1000.0).encode()
    if leaf == "signal/price":
        return PriceSignal(ts=ts, price_usd_per_mwh=30.0).encode()
    if leaf == "signal/price_schedule":
        return PriceSchedule(ts=ts, interval_s=3600, prices=[
            ScheduledPrice(start_ts=time.time() - 60, price_usd_per_mwh=40.0)]).encode()
    return json.dumps({"v": 1, "ts": ts, "hashprice_usd_per_ph_day": 45.0}).encode()


LEAVES = ["group/a/telemetry", "miner/a-0001/telemetry", "meter/poi/telemetry", "signal/price",
          "signal/price_schedule", "signal/hashprice"]
YEAR_5138 = 99_999_999_999.0  # what 1e11 s since 1970 is


@pytest.mark.parametrize("leaf", LEAVES)
@pytest.mark.parametrize("ts", [0.0, 86_400.0, YEAR_5138, "ahead"])
def test_timestamps_out_of_bounds_are_bad_timestamp(leaf: str, ts: float | str) -> None:
    c = controller()
    stamp = time.time() + 2 * c.cfg.policy.clock_skew_s if ts == "ahead" else float(ts)
    c.on_message(f"{c.topics.base}/{leaf}", _stamped(leaf, stamp))
    assert list(c.ingest.invalid) == [(c.topics.parse(f"{c.topics.base}/{leaf}").kind.value,
                                       "bad_timestamp")]
    site = c.fleet.site
    assert not any(seen(c)) and math.isnan(site.meter_power_w)
    assert site.market_price_usd_per_mwh is None and site.price_schedule is None
    assert site.hashprice_usd_per_ph_day is None


@pytest.mark.parametrize("leaf", LEAVES)
def test_timestamps_within_bounds_are_taken(leaf: str) -> None:
    c = controller()
    # A clock a little ahead is fine; so is a price or hashprice of days ago.
    ahead = time.time() + 0.5 * c.cfg.policy.clock_skew_s
    c.on_message(f"{c.topics.base}/{leaf}", _stamped(leaf, ahead))
    if leaf.startswith("signal"):
        c.on_message(f"{c.topics.base}/{leaf}", _stamped(leaf, time.time() - 3 * 86_400))
    assert not c.ingest.invalid


@pytest.mark.parametrize("leaf", ["group/a/telemetry", "miner/a-0001/telemetry",
                                  "meter/poi/telemetry"])
def test_readings_older_than_the_stale_window_are_stale(leaf: str) -> None:
    c = controller()
    old = time.time() - c.cfg.policy.telemetry_stale_s - 1.0
    c.on_message(f"{c.topics.base}/{leaf}", _stamped(leaf, old))
    assert [r for (_, r) in c.ingest.invalid] == ["stale"]
    assert not any(seen(c)) and math.isnan(c.fleet.site.meter_power_w)


def test_staleness_is_judged_by_the_readings_own_time() -> None:
    """A reading that waited 4 s (in a queue, a broker, a slow bridge) has 1 s left of a
    5 s window; one stamped in the future counts from its arrival, never later."""
    c = controller()
    stale_s = c.cfg.policy.telemetry_stale_s
    assert stale_s == 5.0
    rack(c, "a", v2(["a-0001"], ts=time.time() - 4.0))
    rack(c, "a", v2(["a-0002"], ts=time.time()))
    rack(c, "a", v2(["a-0003"], ts=time.time() + 30.0))
    now = time.monotonic()
    f = c.fleet
    assert now - f.last_seen[0] == pytest.approx(4.0, abs=0.2)
    assert now - f.last_seen[1] == pytest.approx(0.0, abs=0.2)
    assert now - f.last_seen[2] == pytest.approx(0.0, abs=0.2), "not fresher than its arrival"
    assert f.stale(now + 1.5, stale_s)[:3].tolist() == [True, False, False]
    assert f.stale(now + 5.5, stale_s)[:3].tolist() == [True, True, True]
    # The meter and the price alike: taken at the older of their time and their arrival.
    c.on_message(c.topics.meter("poi"), MeterTelemetry(ts=time.time() - 3.0,
                                                       power_w=1000.0).encode())
    assert time.monotonic() - f.site.meter_at == pytest.approx(3.0, abs=0.2)
    c.on_message(c.topics.price, PriceSignal(ts=time.time() - 1800.0,
                                             price_usd_per_mwh=30.0).encode())
    assert time.monotonic() - f.site.price_at == pytest.approx(1800.0, abs=1.0)


# -- site bounds --------------------------------------------------------------------------------

def test_meter_bounds_are_relative_to_the_site_cap() -> None:
    c = controller()
    cap_w = c.cfg.power_cap_kw * 1000
    for power in (-2e9, 10.5 * cap_w, -10.5 * cap_w):
        c.on_message(c.topics.meter("poi"), MeterTelemetry(ts=time.time(), power_w=power).encode())
    assert c.ingest.invalid == {("meter_telemetry", "out_of_range"): 3}
    assert math.isnan(c.fleet.site.meter_power_w)
    for power in (-9.5 * cap_w, 1.2 * cap_w):  # exporting solar, a cap overrun: real readings
        c.on_message(c.topics.meter("poi"), MeterTelemetry(ts=time.time(), power_w=power).encode())
        assert c.fleet.site.meter_power_w == power


def price_msg(price: float) -> bytes:
    return PriceSignal(ts=time.time(), price_usd_per_mwh=price).encode()


def clamped(c: Controller, bound: str) -> float:
    value = c.metrics.registry.get_sample_value("mineops_price_clamped_total", {"bound": bound})
    assert value is not None
    return value


@pytest.mark.parametrize(("price", "planned", "bound"), [
    (30.0, 30.0, None), (5000.0, 5000.0, None), (-250.0, -250.0, None),
    # ERCOT settled at $9,000 in February 2021, above today's $5,000 offer cap.
    (9000.0, 5000.0, "cap"), (5000.5, 5000.0, "cap"), (-9999.0, -250.0, "floor"),
    (-250.01, -250.0, "floor")])
def test_a_price_beyond_the_bounds_is_planned_with_at_the_bound(
        price: float, planned: float, bound: str | None) -> None:
    c = controller()
    c.on_message(c.topics.price, price_msg(price))
    assert c.fleet.site.market_price_usd_per_mwh == price, "the market's price is kept"
    p = c.price()
    assert p.market_usd_per_mwh == planned and p.source == "real_time"
    assert p.bound == bound and p.real_market_usd_per_mwh == price
    assert not c.ingest.invalid, "a real, extreme price is not an invalid message"
    assert c.ingest.prices_clamped == ({} if bound is None else {bound: 1})
    for b in ("cap", "floor"):
        assert clamped(c, b) == (1.0 if b == bound else 0.0)
    schedule = PriceSchedule(ts=time.time(), interval_s=3600, prices=[
        ScheduledPrice(start_ts=time.time() - 60, price_usd_per_mwh=price),
        ScheduledPrice(start_ts=time.time() + 3540, price_usd_per_mwh=40.0)])
    c.on_message(c.topics.price_schedule, schedule.encode())
    s = c.fleet.site.price_schedule
    assert s is not None
    assert [p.price_usd_per_mwh for p in s.prices] == [price, 40.0]
    c.fleet.site.market_price_usd_per_mwh = None  # the day-ahead price in force
    p = c.price()
    assert p.source == "day_ahead" and p.market_usd_per_mwh == planned
    assert p.bound == bound and p.real_market_usd_per_mwh == price
    assert c.ingest.prices_clamped == ({} if bound is None else {bound: 2})


def test_the_previous_price_does_not_stay_in_force_after_a_spike_beyond_the_cap() -> None:
    """The reviewer's demo: $25, then $9,000 twice: the site must not run on at $25."""
    c = controller()
    rack(c, "a", v2(["a-0001", "a-0002", "a-0003", "a-0004"]))
    rack(c, "b", v2(["b-0001", "b-0002"], power_w=[3000.0] * 2, hashrate_ths=[100.0] * 2,
                    target_w=[3068.0] * 2))
    c.on_message(c.topics.price, price_msg(25.0))
    snap = asyncio.run(c.decide_and_act("price"))
    assert snap.planned_site_power_w > 0.4 * c.site_cap_w(), "at $25 the fleet runs"
    c.on_message(c.topics.price, price_msg(9000.0))
    c.on_message(c.topics.price, price_msg(9000.0))
    snap = asyncio.run(c.decide_and_act("price"))
    assert snap.price.market_usd_per_mwh == 5000.0
    assert snap.summary().market_price_usd_per_mwh == 5000.0
    assert snap.summary().real_market_price_usd_per_mwh == 9000.0
    assert snap.summary().price_bound == "cap"
    # At $5,000 no miner earns its power: the whole fleet is told to sleep.
    assert snap.planned_site_power_w < 0.01 * c.site_cap_w()
    assert c.ingest.prices_clamped == {"cap": 2}
    assert clamped(c, "cap") == 2.0


def test_price_bounds_are_configurable() -> None:
    """CAISO's hard cap is $2,000/MWh, floor -$150: a site there says so."""
    c = controller(energy={"price_floor_usd_per_mwh": -150.0, "price_cap_usd_per_mwh": 2000.0})
    for price, planned in ((-200.0, -150.0), (2500.0, 2000.0), (1999.0, 1999.0)):
        c.on_message(c.topics.price, price_msg(price))
        assert c.price().market_usd_per_mwh == planned, "planned within the site's bounds"
        assert c.price().real_market_usd_per_mwh == price
    assert c.ingest.prices_clamped == {"floor": 1, "cap": 1}
    assert not c.ingest.invalid


@pytest.mark.parametrize("price", [100_000.0, 5000.5, -6000.0])
def test_a_price_no_market_has_is_still_dropped(price: float) -> None:
    """100 times beyond the bounds is a unit slip or a corrupt feed, not a price."""
    c = controller(energy={"price_floor_usd_per_mwh": -30.0, "price_cap_usd_per_mwh": 50.0})
    c.on_message(c.topics.price, price_msg(40.0))
    c.on_message(c.topics.price, price_msg(price))
    assert c.fleet.site.market_price_usd_per_mwh == 40.0
    assert c.ingest.invalid == {("price", "out_of_range"): 1}
    assert not c.ingest.prices_clamped
    schedule = PriceSchedule(ts=time.time(), interval_s=3600, prices=[
        ScheduledPrice(start_ts=time.time(), price_usd_per_mwh=price)])
    c.on_message(c.topics.price_schedule, schedule.encode())
    assert c.fleet.site.price_schedule is None


def test_a_non_finite_price_is_dropped() -> None:
    c = controller()
    c.on_message(c.topics.price, b'{"v":1,"ts":%f,"price_usd_per_mwh":NaN}' % time.time())
    assert c.fleet.site.market_price_usd_per_mwh is None
    assert sum(c.ingest.invalid.values()) == 1


def test_price_clamps_are_logged_with_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from controller import logs  # noqa: PLC0415

    logs.configure("info", json=True)
    c = controller()
    c.on_message(c.topics.price, price_msg(9000.0))
    err = capsys.readouterr().err
    line = next(json.loads(x) for x in err.splitlines() if "price_clamped" in x)
    assert line["price_usd_per_mwh"] == 9000.0 and line["planned_usd_per_mwh"] == 5000.0
    assert line["setting"] == "[energy] price_cap_usd_per_mwh = 5000"
    assert line["level"] == "warning"


def test_ack_seq_above_what_was_sent_is_not_trusted() -> None:
    c = controller()
    # Before this run sent anything, an ack is the last run's: ignored without a word.
    rack(c, "a", v2(["a-0001"], ack_seq=[5]))
    assert c.fleet.ack_seq[0] == -1 and not c.ingest.rejected_readings
    sent = c.actuator.mark_sleep(np.arange(6), time.monotonic())
    rack(c, "a", v2(["a-0001", "a-0002"], ack_seq=[2**63 - 1, sent]))
    f = c.fleet
    assert f.ack_seq[0] == -1, "2^63-1 would mark every later command acknowledged"
    assert f.ack_seq[1] == sent
    assert bool(np.isfinite(f.last_seen[:2]).all()), "the rest of the reading stands"
    assert c.ingest.rejected_readings == {"bad_ack": 1}
    c.on_message(c.topics.miner("b-0001", "telemetry"), MinerTelemetry(
        ts=time.time(), state="sleeping", power_w=15.0, ack_seq=sent + 1).encode())
    assert f.ack_seq[4] == -1 and np.isfinite(f.last_seen[4])
    assert c.ingest.rejected_readings == {"bad_ack": 2}


# -- capabilities, set by set -------------------------------------------------------------------

def _caps(*sets: dict[str, Any]) -> bytes:
    return json.dumps({"v": 1, "ts": time.time(), "sets": list(sets)}).encode()


def test_a_bad_capability_set_is_dropped_alone_and_poisons_nothing() -> None:
    c = controller()
    good = {"firmware": "LuxOS", "control": "presets", "presets_w": [2000.0, 2800.0, 3500.0],
            "miners": ["a-0001", "a-0002"]}
    absurd = {"firmware": "LuxOS", "control": "presets", "presets_w": [2000.0, 1e6],
              "miners": ["a-0003"]}
    foreign = {"firmware": "LuxOS", "control": "presets", "presets_w": [1500.0, 2500.0],
               "miners": ["b-0001"]}
    malformed = {"firmware": "LuxOS", "control": "presets", "miners": ["a-0004"]}
    stringly = {"firmware": "LuxOS", "control": "presets", "presets_w": ["2000"],
                "miners": ["a-0004"]}
    c.on_message(c.topics.group("a", "capabilities"),
                 _caps(absurd, good, foreign, malformed, stringly))
    f = c.fleet
    assert f.points_w[0, :4].tolist() == [15.0, 2000.0, 2800.0, 3500.0]
    assert f.points_w[2].max() == 3800.0, "the absurd set changed nothing"
    assert f.points_w[4, 1] == 1600.0, "rack b's miner keeps the catalogue's range"
    assert c.ingest.invalid == {("group_capabilities", "out_of_range"): 1,
                                ("group_capabilities", "wrong_group"): 1,
                                ("group_capabilities", "bad_value"): 1,
                                ("group_capabilities", "wrong_type"): 1}
    # A later message applies as if the bad one had never come.
    later = dict(good, presets_w=[1900.0, 3000.0], miners=["a-0003"])
    c.on_message(c.topics.group("a", "capabilities"), _caps(later))
    assert f.points_w[2, :3].tolist() == [15.0, 1900.0, 3000.0]
    c.on_message(c.topics.group("b", "capabilities"), GroupCapabilities(ts=time.time(), sets=[
        PowerControlSet(firmware="stock", control="none", miners=["b-0001"])]).encode())
    assert set(f.points_w[4]) == {f.points_w[4, 0], f.nominal_w[4]}


def test_a_set_the_optimizer_cannot_prepare_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    c = controller()
    before = c.fleet.points_w.copy()
    real = c._prepare_again
    calls = []

    def fails_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("cannot prepare")
        real()

    c.ingest.on_points_changed = fails_once
    c.on_message(c.topics.group("a", "capabilities"), _caps(
        {"firmware": "LuxOS", "control": "presets", "presets_w": [2000.0, 3000.0],
         "miners": ["a-0001"]}))
    assert np.array_equal(c.fleet.points_w, before)
    assert c.ingest.invalid == {("group_capabilities", "bad_value"): 1}
    assert len(calls) == 2, "prepared again with the points restored"


def test_payload_errors_name_a_fixed_reason() -> None:
    for raw, reason in [(b'{"v":3,"ts":1,"ids":[],"state":[]}', "bad_version"),
                        (b'{"v":2,"ts":1,"ids":["a"],"state":[]}', "bad_schema"),
                        (b'{"v":2,"ts":1,"ids":[],"state":[],"extra":1}', "bad_schema"),
                        (b'{"v":2,"ts":1,"ids":["a"],"state":["x"],"ack_seq":[1e400]}',
                         "out_of_range"),
                        (b'{"v":2,"ts":1,"ids":["a"],"state":["x"],"ack_seq":[1e30]}',
                         "wrong_type"),
                        (b'{"v":2,"ts":1', "bad_json"),
                        (b'{"v":2,"ts":1,"ids":[' + b'"a",' * 300_000 + b'"a"]}', "oversized")]:
        with pytest.raises(PayloadError) as e:
            decode_group_telemetry(raw)
        assert e.value.reason == reason, raw[:60]

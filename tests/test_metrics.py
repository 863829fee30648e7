"""The metrics collector: names, what is left out when unknown, group sums, cost at 100k miners.

Gauges come from the latest decision snapshot, so each test makes a decision
(`decide(c)`) after setting up the fleet state it wants to see.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.config import SiteConfig
from controller.core.fleet_state import VIEW_STATES
from controller.daemon.loop import Controller
from controller.daemon.metrics import PER_GROUP_AUTO_MAX, EnergyCounter
from controller.daemon.snapshot import DecisionSnapshot
from controller.protocol.payloads import GridEvent, PriceSignal
from tests.test_deploy_support import need

STATE_CODES = {"running": 1, "sleeping": 2, "waking": 3, "stopping": 4, "error": 5}


def site(groups: list[tuple[str, str, int]], **metrics: Any) -> SiteConfig:
    return SiteConfig.model_validate({
        "site_id": "unit",
        "fleet": {"groups": [{"name": n, "model": m, "count": c} for n, m, c in groups]},
        "power_cap_kw": 5000,
        "hashprice_usd_per_ph_day": 40.0,
        "policy": {"telemetry_stale_s": 30.0},
        "metrics": {"port": 0, **metrics},
        "grid": {"journal_path": str(Path(tempfile.mkdtemp(prefix="mineops-test-")) / "g.db"),
                 "prepare_s": 0.0},
    })


def decide(c: Controller) -> DecisionSnapshot:
    """One decision cycle (no broker: nothing is sent), so the collector has a snapshot."""
    return asyncio.run(c.decide_and_act("test"))


def samples(c: Controller) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = c.metrics.render().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(c: Controller, name: str, **labels: str) -> float:
    return samples(c)[(name, tuple(sorted(labels.items())))]


def names(c: Controller) -> set[str]:
    return {name for name, _ in samples(c)}


def report(c: Controller, i: int, state: str, power_w: float, ths: float, *,
           target_w: float | None = None) -> None:
    f = c.fleet
    f.state[i] = STATE_CODES[state]
    f.power_w[i] = power_w
    f.hashrate_ths[i] = ths
    f.target_w[i] = math.nan if target_w is None else target_w
    f.last_seen[i] = time.monotonic()


def test_unknown_values_are_left_out_not_invented() -> None:
    c = Controller(site([("a", "s21", 4)]))
    # Before the first decision: only what the controller knows without one.
    assert names(c) >= {"mineops_controller_info", "mineops_miners_configured",
                        "mineops_site_energy_joules_total", "mineops_mqtt_connected"}
    assert "mineops_site_power_cap_watts" not in names(c)
    decide(c)
    got = names(c)
    for absent in ("mineops_site_power_watts", "mineops_grid_frequency_hertz",
                   "mineops_fleet_efficiency_joules_per_terahash",
                   "mineops_profit_rate_usd_per_hour", "mineops_grid_event_target_watts",
                   "mineops_grid_event_on_track", "mineops_miner_power_watts"):
        assert absent not in got, absent
    # After it: the cap, prices, counts (all offline before any telemetry).
    assert value(c, "mineops_site_power_cap_watts") == 5e6
    assert value(c, "mineops_energy_price_usd_per_mwh") == 1000.0, "the cautious default"
    assert value(c, "mineops_miners", state="offline") == 4
    assert "mineops_site_meter_last_reading_timestamp_seconds" not in got
    assert value(c, "mineops_mqtt_connected") == 0
    assert value(c, "mineops_mqtt_messages_invalid_total", kind="price", reason="bad_json") == 0


def test_site_and_group_series_follow_fleet_state() -> None:
    c = Controller(site([("a", "s21", 3), ("b", "s19j_pro", 2)]))
    nominal = c.fleet.nominal_w
    report(c, 0, "running", 3500.0, 200.0, target_w=float(nominal[0]))
    report(c, 1, "running", 2800.0, 170.0, target_w=float(nominal[1]) - 500)
    report(c, 2, "sleeping", 15.0, 0.0)
    report(c, 3, "waking", 300.0, 10.0)
    # miner 4 never reported: offline
    c.fleet.site.meter_power_w = 7000.0
    c.fleet.site.meter_at = time.monotonic()
    c.fleet.site.frequency_hz = 60.01
    decide(c)

    assert value(c, "mineops_site_power_watts") == 7000.0
    assert value(c, "mineops_fleet_hashrate_hashes_per_second") == pytest.approx(380e12)
    assert value(c, "mineops_fleet_efficiency_joules_per_terahash") == pytest.approx(
        (3500 + 2800 + 15 + 300) / 380)
    for state, n in {"running": 1, "underclocked": 1, "sleeping": 1, "waking": 1,
                     "error": 0, "offline": 1}.items():
        assert value(c, "mineops_miners", state=state) == n, state
        assert value(c, "mineops_group_miners", group="a", state=state) == (
            n if state not in ("waking", "offline") else 0), state
    assert value(c, "mineops_group_power_watts", group="a") == 3500 + 2800 + 15
    assert value(c, "mineops_group_power_watts", group="b") == 300
    assert value(c, "mineops_group_hashrate_hashes_per_second", group="b") == pytest.approx(10e12)
    assert value(c, "mineops_group_info", group="b", model="s19j_pro") == 1
    assert value(c, "mineops_miners_configured") == 5
    # Profit: revenue at the hashprice minus the metered power at the price in force.
    revenue = 380 / 1000 * 40.0 / 24
    cost = 7000 / 1e6 * c.price().total_usd_per_mwh
    assert value(c, "mineops_revenue_rate_usd_per_hour") == pytest.approx(revenue)
    assert value(c, "mineops_profit_rate_usd_per_hour") == pytest.approx(revenue - cost)
    assert value(c, "mineops_breakeven_price_usd_per_mwh", model="s21") > value(
        c, "mineops_breakeven_price_usd_per_mwh", model="s19j_pro")


def test_view_states_follow_the_reported_state_unless_stale() -> None:
    c = Controller(site([("a", "s21", 300)]))
    rng = np.random.default_rng(7)
    now = time.monotonic()
    f = c.fleet
    f.state[:] = rng.integers(1, 6, f.n)
    f.target_w[:] = np.where(rng.random(f.n) < 0.3, np.nan, rng.uniform(2000, 4000, f.n))
    f.last_seen[:] = now - rng.uniform(0, 60, f.n)
    f.announced_offline[:] = rng.random(f.n) < 0.1
    code = f.view_states(now, 30.0)
    by_code = {1: "running", 2: "sleeping", 3: "waking", 4: "sleeping", 5: "error"}
    for i in range(f.n):  # one miner at a time, by the documented rules
        stale = f.announced_offline[i] or now - f.last_seen[i] > 30.0
        want = "offline" if stale else by_code[int(f.state[i])]
        if want == "running" and f.target_w[i] < f.nominal_w[i] - 1.0:
            want = "underclocked"
        assert VIEW_STATES[code[i]] == want, i


def test_grid_event_series_only_with_an_event_and_the_cap_is_the_events() -> None:
    c = Controller(site([("a", "s21", 2)]))
    decide(c)
    assert "mineops_grid_event_on_track" not in names(c)
    now = time.time()
    event = GridEvent(id="dr-1", kind="target_kw", value_kw=4.0, start_ts=now - 1,
                      end_ts=now + 600)
    c.on_message(c.topics.grid, event.encode())
    snap = decide(c)
    assert value(c, "mineops_grid_event_target_watts") == 4000.0
    assert value(c, "mineops_grid_event_deadline_timestamp_seconds") == pytest.approx(now - 1)
    # The cap in force is the event's, not the configured one (which has its own series).
    assert value(c, "mineops_site_power_cap_watts") == 4000.0
    assert value(c, "mineops_site_power_cap_configured_watts") == 5e6
    assert snap.cap.source == "target_kw" and snap.summary().cap_in_force_w == 4000.0


def test_per_miner_series_only_when_enabled() -> None:
    off = Controller(site([("a", "s21", 3)]))
    assert not any(n.startswith("mineops_miner_") for n in names(off))
    decide(off)
    assert not any(n.startswith("mineops_miner_") for n in names(off))
    on = Controller(site([("a", "s21", 3)], per_miner=True))
    report(on, 1, "running", 3000.0, 190.0)
    decide(on)
    assert value(on, "mineops_miner_power_watts", miner="a-0002", group="a") == 3000
    assert value(on, "mineops_miner_up", miner="a-0001", group="a") == 0
    assert ("mineops_miner_power_watts", (("group", "a"), ("miner", "a-0001"))) not in samples(on)


def test_names_follow_prometheus_conventions() -> None:
    c = Controller(site([("a", "s21", 2)], per_miner=True))
    now = time.time()
    c.on_message(c.topics.grid, GridEvent(id="dr-1", kind="target_kw", value_kw=1.0,
                                          start_ts=now - 1, end_ts=now + 600).encode())
    decide(c)
    assert "mineops_grid_event_on_track" in names(c)
    text = c.metrics.render().decode()
    units = ("_watts", "_hertz", "_seconds", "_joules_total", "_usd_per_mwh", "_usd_per_ph_day",
             "_usd_per_hour", "_hashes_per_second", "_joules_per_terahash", "_celsius")
    for family in text_string_to_metric_families(text):
        if family.name.startswith(("process_", "python_")):  # prometheus_client's collectors
            continue
        assert family.name.startswith("mineops_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.name.endswith("_info"):
            assert {s.value for s in family.samples} == {1.0}
        if family.name.endswith("_created"):  # prometheus_client's counter start times
            continue
        if family.type == "gauge" and not family.name.endswith("_info"):
            counts = ("mineops_miners", "mineops_miners_by_reason", "mineops_miners_configured",
                      "mineops_group_miners", "mineops_mqtt_connected",
                      "mineops_mqtt_incoming_queue_messages", "mineops_grid_event_on_track",
                      "mineops_miner_up", "mineops_site_meter_fresh", "mineops_site_over_cap",
                      "mineops_miners_power_unknown", "mineops_miners_temperature_unknown",
                      "mineops_grid_journal_pending_records")
            assert family.name in counts or family.name.endswith(units), family.name


def test_energy_counter_uses_register_else_integrates_power() -> None:
    e = EnergyCounter()
    e.observe(1000.0, None, 0.0)
    e.observe(3000.0, None, 2.0)  # trapezoid: 2000 W for 2 s
    assert e.joules == pytest.approx(4000.0)
    e.observe(3000.0, None, 2.0 + 3600.0)  # a gap too long to guess across
    assert e.joules == pytest.approx(4000.0)
    e.observe(3000.0, 10.0, 3700.0)  # a register appears: counting starts from it
    e.observe(3000.0, 12.5, 3703.0)
    assert e.joules == pytest.approx(4000.0 + 2.5 * 3600)
    e.observe(3000.0, 1.0, 3704.0)  # meter reset: never goes backwards
    e.observe(3000.0, 2.0, 3705.0)
    assert e.joules == pytest.approx(4000.0 + 3.5 * 3600)


def test_scrape_series_grow_with_groups_not_miners() -> None:
    c = Controller(site([(f"r{i:04d}", "s21" if i % 2 else "s19j_pro", 40) for i in range(2500)]))
    f = c.fleet
    assert f.n == 100_000
    rng = np.random.default_rng(1)
    f.state[:] = rng.integers(1, 6, f.n)
    f.power_w[:] = rng.uniform(0, 3500, f.n)
    f.hashrate_ths[:] = rng.uniform(0, 200, f.n)
    f.last_seen[:] = time.monotonic()
    decide(c)
    text = c.metrics.render().decode()
    lines = sum(1 for line in text.splitlines() if not line.startswith("#"))
    # Series grow with groups (2,500 here), never with miners: ~10 per group plus a few hundred.
    assert lines < 11 * 2500 + 500, lines
    # How long a scrape takes is measured by benchmarks/, not asserted here.


def fill(c: Controller, seed: int = 1) -> None:
    """Every miner reporting something (random states, power, hashrate)."""
    f = c.fleet
    rng = np.random.default_rng(seed)
    f.state[:] = rng.integers(1, 6, f.n)
    f.power_w[:] = rng.uniform(0, 3500, f.n)
    f.hashrate_ths[:] = rng.uniform(0, 200, f.n)
    f.target_w[:] = rng.uniform(2000, 3600, f.n)
    f.temp_c[:] = rng.uniform(30, 90, f.n)
    f.last_seen[:] = time.monotonic()


def test_the_text_passes_promtool_and_is_rendered_once_per_decision() -> None:
    c = Controller(site([("a", "s21", 30), ("b", "s19j_pro", 20)], per_miner=True))
    fill(c)
    c.on_message(c.topics.grid, GridEvent(id="dr-1", kind="target_kw", value_kw=60.0,
                                          start_ts=time.time() - 1,
                                          end_ts=time.time() + 600).encode())
    c.fleet.site.meter_power_w, c.fleet.site.meter_at = 90_000.0, time.monotonic()
    decide(c)
    text = c.metrics.render()
    check = subprocess.run([need("promtool"), "check", "metrics"], input=text,
                           capture_output=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    # The decision's part is rendered once: the same bytes until the next decision.
    assert c.metrics.site is not None
    seq, first = c.metrics.site.snapshot_text()
    assert c.metrics.site.snapshot_text()[1] is first
    c.fleet.power_w[:] = 0.0  # working state changes do not leak into the snapshot's part
    assert c.metrics.site.snapshot_text() == (seq, first)
    assert decide(c).seq == seq + 1
    assert c.metrics.site.snapshot_text()[1] is not first
    assert value(c, "mineops_group_power_watts", group="a") == 0.0


def test_gzip_scrapes_carry_the_same_series() -> None:
    c = Controller(site([(f"r{i}", "s21", 5) for i in range(40)]))
    fill(c)
    decide(c)
    server = c.metrics.serve("127.0.0.1", 0)
    try:
        def get(gz: bool) -> tuple[str | None, str]:
            req = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics",
                                         headers={"Accept-Encoding": "gzip"} if gz else {})
            with urllib.request.urlopen(req, timeout=5) as r:
                body = r.read()
                return r.headers.get("Content-Encoding"), (
                    gzip.decompress(body) if gz else body).decode()

        scrapes = [get(True), get(False), get(True)]  # the second gzip reuses the first part
        decide(c)
        scrapes.append(get(True))
    finally:
        server.close()
    assert [enc for enc, _ in scrapes] == ["gzip", None, "gzip", "gzip"]

    def gauges(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) if f.type == "gauge"
                and not f.name.startswith(("process_", "mineops_mqtt", "mineops_last_decision"))
                for s in f.samples}

    base = gauges(scrapes[1][1])
    assert len([k for k in base if k[0] == "mineops_group_miners"]) == 40 * len(VIEW_STATES)
    assert all(gauges(text) == base for _, text in scrapes)


@pytest.mark.parametrize(("groups", "per_group", "exported"), [
    (3, "auto", True), (3, "never", False), (PER_GROUP_AUTO_MAX + 1, "auto", False),
    (PER_GROUP_AUTO_MAX + 1, "always", True)])
def test_per_group_series_are_bounded(groups: int, per_group: str, exported: bool) -> None:
    c = Controller(site([(f"g{i}", "s21", 1) for i in range(groups)], per_group=per_group))
    fill(c)
    decide(c)
    got = samples(c)  # parsed once: 60,000 series take the parser a few seconds
    families = {name for name, _ in got}
    per_group_names = {"mineops_group_info", "mineops_group_power_watts",
                       "mineops_group_hashrate_hashes_per_second",
                       "mineops_group_power_planned_watts", "mineops_group_miners"}
    assert (per_group_names <= families) is exported
    assert bool(per_group_names & families) is exported
    assert got[("mineops_miners_configured", ())] == groups
    assert sum(got[("mineops_miners", (("state", s),))] for s in VIEW_STATES) == groups
    if exported:
        assert sum(v for (name, _), v in got.items() if name == "mineops_group_miners") == groups


def test_telemetry_lag_is_measured_from_the_readings_own_time() -> None:
    c = Controller(site([("a", "s21", 2)]))
    reading = '{"id":"a-0001","state":"running","power_w":3000,"hashrate_ths":200}'
    for age_s in (0.2, 3.0, 20.0):
        raw = f'{{"v":1,"ts":{time.time() - age_s},"miners":[{reading}]}}'
        c.on_message(c.topics.group("a", "telemetry"), raw.encode())
    buckets = {s.labels["le"]: s.value for f in text_string_to_metric_families(
        c.metrics.render().decode()) if f.name == "mineops_telemetry_lag_seconds"
        for s in f.samples if s.name.endswith("_bucket")}
    assert (buckets["0.1"], buckets["0.25"], buckets["2.5"], buckets["5.0"], buckets["30.0"]) == (
        0, 1, 1, 2, 3)


@pytest.mark.parametrize(("market", "planned"), [
    (9000.0, 5000.0),  # ERCOT, February 2021, above the $5,000 cap
    (-400.0, -250.0),  # below the floor: the site is paid less than planned with
    (40.0, 40.0),
])
def test_cost_and_profit_rates_are_at_the_markets_own_price_not_the_planned_one(
        market: float, planned: float) -> None:
    """A spike past [energy] price_cap_usd_per_mwh costs the site the market's price."""
    c = Controller(site([("a", "s21", 3)]))
    for i in range(3):
        report(c, i, "running", 3500.0, 200.0, target_w=float(c.fleet.nominal_w[i]))
    c.on_message(c.topics.price, PriceSignal(ts=time.time(), price_usd_per_mwh=market).encode())
    c.fleet.site.meter_power_w = 10_000.0
    c.fleet.site.meter_at = time.monotonic()
    decide(c)
    assert value(c, "mineops_energy_market_price_usd_per_mwh") == market
    assert value(c, "mineops_energy_price_usd_per_mwh") == market  # no adders on this site
    assert value(c, "mineops_energy_planned_price_usd_per_mwh") == planned
    cost = 10_000 / 1e6 * market
    assert value(c, "mineops_energy_cost_rate_usd_per_hour") == pytest.approx(cost)
    revenue = value(c, "mineops_revenue_rate_usd_per_hour")
    assert value(c, "mineops_profit_rate_usd_per_hour") == pytest.approx(revenue - cost)

"""The live site view: what the summary carries, what the panel and the line say.

Rendered on rich's recording console (`Console(record=True)`, `export_text()`), so the
tests read the text an operator reads. Summaries come from real decisions of a
Controller (no broker needed: a decision without one sends nothing) or are written out
in full where a test needs exact figures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import math
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from rich.console import Console

from controller.campus_config import CampusConfig
from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.core.campus import PartReading, campus_picture
from controller.daemon.loop import Controller
from controller.protocol.payloads import (
    DecisionSummary,
    GridEvent,
    PayloadError,
    PriceSchedule,
    PriceSignal,
    ScheduledPrice,
)
from controller.view import SiteClock, SiteView, read_summary
from controller.view.screen import Screen

CHICAGO = ZoneInfo("America/Chicago")
# 2024-08-20 18:05:00 CDT
T = datetime(2024, 8, 20, 18, 5, tzinfo=CHICAGO).timestamp()
MODELS = {k: load_catalogue().get(k) for k in ("s19j_pro", "s21")}


def render(view: SiteView, width: int = 200) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(view.render())
    return console.export_text()


def summary(**kw: Any) -> DecisionSummary:
    """A summary during a grid event, every figure chosen (see the assertions)."""
    base: dict[str, Any] = {
        "ts": T, "price_usd_per_mwh": 75.73, "market_price_usd_per_mwh": 67.73,
        "price_source": "real_time", "adders_usd_per_mwh": 8.0,
        "hashprice_usd_per_ph_day": 42.0, "cap_w": 2_128_500.0, "cap_in_force_w": 2_150_000.0,
        "cap_source": "target_kw", "cap_site_w": 3_590_000.0, "grid_event_id": "drill-1",
        "grid_event_kind": "target_kw", "grid_event_target_w": 2_150_000.0,
        "grid_event_deadline_ts": T - 300.0, "grid_event_end_ts": T + 900.0,
        "grid_event_on_track": True, "planned_site_power_w": 2_127_000.0,
        "measured_site_power_w": 2_131_000.0, "fleet_power_w": 2_030_000.0,
        "fleet_hashrate_ths": 163_400.0, "frequency_hz": 60.001,
        "miners_by_state": {"running": 160, "underclocked": 440, "sleeping": 280, "waking": 120,
                            "error": 0, "offline": 0},
        "miners_by_reason": {"profit": 240, "grid": 760},
        "miners_by_state_reason": {"running": {"profit": 80, "grid": 80},
                                   "underclocked": {"grid": 440},
                                   "sleeping": {"profit": 160, "grid": 120},
                                   "waking": {"grid": 120}},
        "commands_sent": 12, "duration_s": 0.004, "seq": 21, "trigger": "tick",
        "infeasible": False,
    }
    return DecisionSummary(**{**base, **kw})


def view(s: DecisionSummary | None, **kw: Any) -> SiteView:
    args: dict[str, Any] = {"site_id": "demo", "summary": s,
                            "clock": SiteClock.wall(CHICAGO), "now_wall_s": T + 1.0,
                            "models": MODELS}
    return SiteView(**{**args, **kw})


def test_panel_shows_clock_cap_and_why_price_parts_counts_and_reasons() -> None:
    text = render(view(summary()))
    assert "site time   2024-08-20 18:05:00 CDT" in text
    assert "2.13 MW measured, plan 2.13 MW, planning under 2.13 MW (incl. aux)" in text
    assert ("2.15 MW in force: grid event drill-1: power target, target 2.15 MW by 18:00 CDT, "
            "until 18:20 CDT, on track (site cap 3.59 MW)") in text
    assert "$75.73/MWh = market $67.73/MWh (real-time) + adders $8.00/MWh" in text
    assert "$42.00/PH/day" in text
    assert "163.4 PH/s from 1,000 reporting miners (their power 2.03 MW, excl. aux)" in text
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("│ ")
            and len(line.split()) > 2 and line.split()[1] in
            ("running", "underclocked", "sleeping", "waking", "error", "offline", "total")}
    assert rows["running"].split()[2:7] == ["160", "profit", "80,", "grid", "80"]
    assert rows["underclocked"].split()[2:5] == ["440", "grid", "440"]
    assert rows["sleeping"].split()[2:7] == ["280", "profit", "160,", "grid", "120"]
    assert rows["waking"].split()[2:5] == ["120", "grid", "120"]
    assert rows["offline"].split()[2] == "0"
    assert rows["total"].split()[2] == "1,000"
    assert "s19j_pro $59/MWh  s21 $100/MWh" in text, "break-even prices at the hashprice"
    assert "decision #21 (tick) · 1 s ago · 12 setpoints sent" in text
    assert "!" not in text, "nothing to warn about"


def test_simulated_clock_runs_at_speed_on_the_trace_timeline() -> None:
    wall = 1_800_000_000.0
    clock = SiteClock.simulated_at(site_s=T, wall_s=wall, speed=60.0, tz=CHICAGO)
    assert clock.at(wall + 10.0) == datetime(2024, 8, 20, 18, 15, tzinfo=CHICAGO)
    assert clock.describe() == "simulated, 60x real time"
    s = summary(ts=wall + 10.0, grid_event_deadline_ts=wall + 12.0,
                grid_event_end_ts=wall + 32.0)
    text = render(view(s, clock=clock, now_wall_s=wall + 11.0))
    assert "2024-08-20 18:15:00 CDT (simulated, 60x real time)" in text
    # Deadline and end on the same simulated clock: 2 and 22 real seconds later.
    assert "target 2.15 MW by 18:17 CDT, until 18:37 CDT" in text


def test_the_summary_carries_the_site_clock_so_every_viewer_shows_the_same_times() -> None:
    """The demo's view and `mineops top` on another machine (UTC, no --timezone) read the
    one published summary: both show the demo's simulated CDT clock, not the wall clock."""
    wall = 1_800_000_000.0
    s = summary(ts=wall, site_ts=T, site_speed=60.0, site_timezone="America/Chicago",
                grid_event_deadline_ts=wall + 2.0, grid_event_end_ts=wall + 22.0)
    read, unknown = read_summary(s.encode())
    assert unknown == [] and read.site_ts == T
    for viewer_zone in (ZoneInfo("UTC"), CHICAGO, ZoneInfo("Asia/Tokyo")):
        clock = SiteClock.of_summary(read, viewer_zone)
        text = render(view(read, clock=clock, now_wall_s=wall + 1.0))
        assert "2024-08-20 18:05:00 CDT (simulated, 60x real time)" in text
        assert "target 2.15 MW by 18:07 CDT, until 18:27 CDT" in text
    # An operator's --timezone still wins; a real site's summary has no site clock.
    utc = SiteClock.of_summary(read, ZoneInfo("UTC"), tz_given=True)
    assert utc.at(wall).strftime("%H:%M %Z") == "23:05 UTC"
    real = SiteClock.of_summary(summary(ts=wall), ZoneInfo("UTC"))
    assert not real.simulated and real.at(wall) == datetime.fromtimestamp(wall, UTC)
    assert SiteClock.of_summary(summary(ts=wall, site_timezone="Nowhere/Town"),
                                CHICAGO).tz == CHICAGO


async def test_a_simulated_controller_publishes_its_site_clock(tmp_path: Path) -> None:
    from controller.daemon.loop import SiteTime  # noqa: PLC0415
    from tests.conftest import make_site  # noqa: PLC0415

    class _NoBroker:
        host, port = "127.0.0.1", 1

    cfg = make_site(_NoBroker(), [("a", "s21", 4)],  # type: ignore[arg-type]
                    grid={"journal_path": str(tmp_path / "grid.db")})
    c = Controller(cfg, site_clock=lambda: SiteTime(T, 60.0, "America/Chicago"))
    await c.decide_and_act("tick")
    assert c.summary is not None
    assert (c.summary.site_ts, c.summary.site_speed, c.summary.site_timezone) == (
        T, 60.0, "America/Chicago")
    assert SiteClock.of_summary(c.summary, UTC).at(c.summary.ts) == datetime(
        2024, 8, 20, 18, 5, tzinfo=CHICAGO)
    plain = Controller(cfg)
    await plain.decide_and_act("tick")
    assert plain.summary is not None and plain.summary.site_ts is None


def test_a_broker_out_of_reach_is_said_in_place_of_waiting() -> None:
    why = "cannot reach the broker: 10.0.0.5:1883: connection refused; retrying"
    text = render(view(None, link=why))
    assert why in text and "waiting" not in text
    assert view(None, link=why).line() == f"demo: {why}"
    assert "waiting for the first decision on broker" in render(view(None, source="broker x"))
    # With figures on screen: they are said to be old.
    assert f"! {why}: figures are old" in render(view(summary(), link=why))
    out = io.StringIO()
    screen = Screen(out, force_terminal=False)
    screen.show(view(None))
    assert out.getvalue() == "", "nothing to say before the first decision"
    screen.show(view(None, link=why))
    screen.show(view(None, link=why))
    assert out.getvalue() == f"demo: {why}\n", "said once, while it holds"


@pytest.mark.parametrize(("source", "why"), [
    ("site", "3.59 MW in force: the site cap"),
    ("recovery", "in force: recovery ramp after a grid obligation ended, rising to the site "
     "cap 3.59 MW"),
    ("frequency", "in force: under-frequency shed (site cap 3.59 MW)"),
    ("emergency", "grid event drill-1: emergency, keep-alive load only"),
    ("peak", "grid event drill-1: peak alert"),
])
def test_cap_source_is_said_in_words(source: str, why: str) -> None:
    kind = source if source in ("emergency", "peak") else "target_kw"
    kw: dict[str, Any] = {"cap_source": source, "grid_event_kind": kind}
    if source == "site":
        kw.update(cap_in_force_w=3_590_000.0, grid_event_id=None, grid_event_kind=None)
    if source in ("recovery", "frequency"):
        kw.update(grid_event_id=None, grid_event_kind=None, grid_event_target_w=None,
                  grid_event_on_track=None)
    assert why in render(view(summary(**kw)), width=200)


def test_unknown_is_unknown_and_warnings_are_shown() -> None:
    s = summary(measured_site_power_w=None, grid_event_on_track=False, infeasible=True)
    text = render(view(s, controller_online=False, now_wall_s=T + 45.0), width=160)
    assert "unknown measured" in text
    assert "0.00 MW" not in text
    assert "! controller OFFLINE" in text
    assert "! last decision 45 s ago: the controller is not deciding" in text
    assert "! cap cannot be met" in text
    assert "! grid event NOT on track" in text
    assert "! no fresh site-meter reading: site power unknown" in text


def test_a_summary_from_before_the_new_fields_still_renders() -> None:
    old = DecisionSummary(ts=T, price_usd_per_mwh=25.0, hashprice_usd_per_ph_day=42.0,
                          cap_w=3_554_100.0, planned_site_power_w=3_000_000.0,
                          miners_by_state={"running": 840, "sleeping": 160},
                          miners_by_reason={"profit": 840, "grid": 160},
                          commands_sent=0, duration_s=0.01)
    text = render(view(old))
    assert "$25.00/MWh" in text
    assert "3.55 MW in force: the site cap" in text
    assert "hashrate    unknown" in text
    assert "sleeping         160" in text


def test_read_summary_ignores_fields_of_a_newer_controller() -> None:
    raw = json.loads(summary().encode())
    raw["battery_soc_pct"] = 55.0
    s, unknown = read_summary(json.dumps(raw).encode())
    assert unknown == ["battery_soc_pct"]
    assert s.cap_source == "target_kw" and s.seq == 21
    with pytest.raises(PayloadError) as e:
        read_summary(b"[1, 2]")
    assert e.value.reason == "bad_schema"
    with pytest.raises(PayloadError) as e:
        read_summary(b'{"ts": "soon"}')
    assert e.value.reason in ("wrong_type", "bad_schema")
    with pytest.raises(PayloadError) as e:
        read_summary(b"\xff not json")
    assert e.value.reason == "bad_json"


def test_pipe_gets_a_line_only_when_something_changed() -> None:
    out = io.StringIO()
    screen = Screen(out)
    assert not screen.tty
    with screen:
        for i in range(5):  # the clock and the meter move; nothing the operator acts on does
            screen.show(view(summary(ts=T + i, measured_site_power_w=2_131_000.0 + 900 * i),
                             now_wall_s=T + i + 0.5))
        screen.show(view(summary(ts=T + 6, price_usd_per_mwh=240.0,
                                 market_price_usd_per_mwh=232.0), now_wall_s=T + 6.5))
        screen.show(view(summary(ts=T + 7, price_usd_per_mwh=240.0,
                                 market_price_usd_per_mwh=232.0), now_wall_s=T + 7.5))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("break-even all-in price (market + adders) at stock"), \
        "once, not every 5 s"
    assert lines[1].startswith("2024-08-20 18:05:00 CDT | site 2.13 MW / cap 2.15 MW")
    assert "price $240.00/MWh = market $232.00/MWh" in lines[2]
    assert "\x1b" not in out.getvalue(), "no cursor control on a pipe"


def test_a_controller_decision_summary_says_why_miners_sleep_during_recovery() -> None:
    """The issue's case: miners asleep at a low price with no word of the recovery ramp."""
    cfg = SiteConfig.model_validate({
        "site_id": "unit",
        "fleet": {"groups": [{"name": "a", "model": "s21", "count": 40}]},
        "power_cap_kw": 160, "hashprice_usd_per_ph_day": 42.0,
        "energy": {"adders_usd_per_mwh": 8.0},
        "policy": {"telemetry_stale_s": 30.0, "min_run_s": 0.0, "min_sleep_s": 0.0,
                   "wake_latency_factor": 0.0},
        "metrics": {"port": 0},
        "grid": {"journal_path": str(Path(tempfile.mkdtemp(prefix="mineops-test-")) / "g.db"),
                 "prepare_s": 0.0, "recovery_kw_per_min": 1.0},
    })
    c = Controller(cfg)
    f = c.fleet
    now_ts = time.time()
    f.state[:] = 2  # sleeping, as after an event
    f.power_w[:] = 10.0
    f.hashrate_ths[:] = 0.0
    f.last_seen[:] = time.monotonic()
    c.on_message(c.topics.price, PriceSignal(ts=now_ts, price_usd_per_mwh=25.0).encode())
    event = GridEvent(id="ev-1", kind="target_kw", value_kw=20.0, start_ts=now_ts - 60,
                      end_ts=now_ts + 600)
    c.on_message(c.topics.grid, event.encode())
    during = asyncio.run(c.decide_and_act("test")).summary()
    assert during.cap_source == "target_kw" and during.grid_event_target_w == 20_000.0
    assert during.grid_event_end_ts == pytest.approx(now_ts + 600)
    c.on_message(c.topics.grid, event.model_copy(update={"cancelled": True}).encode())
    after = asyncio.run(c.decide_and_act("test")).summary()
    assert after.cap_source == "recovery"
    assert after.cap_site_w == 160_000.0 and after.adders_usd_per_mwh == 8.0
    assert after.price_usd_per_mwh == 33.0 and after.market_price_usd_per_mwh == 25.0
    held = (after.miners_by_state_reason or {}).get("sleeping", {}).get("grid", 0)
    assert held > 0, after.miners_by_state_reason
    assert sum(sum(r.values()) for r in (after.miners_by_state_reason or {}).values()) == 40
    text = render(SiteView("unit", after, SiteClock.wall(UTC), time.time()), width=160)
    assert "recovery ramp after a grid obligation ended, rising to the site cap 0.16 MW" in text
    assert f"grid {held}" in text
    assert "$33.00/MWh = market $25.00/MWh (real-time) + adders $8.00/MWh" in text
    assert math.isclose(after.fleet_hashrate_ths or 0.0, 0.0)


def test_job_progress_draws_only_when_asked_and_ends_itself() -> None:
    from controller.view.progress import JobProgress  # noqa: PLC0415

    shown = io.StringIO()
    bar = JobProgress("first poll", 3, enabled=True, stream=shown)
    for n in (1, 2, 3):
        bar(n)
    bar(3)  # after the end: nothing more, no error
    text = shown.getvalue()
    assert "first poll" in text and "3/3" in text
    quiet = io.StringIO()
    off = JobProgress("first poll", 3, stream=quiet)  # a StringIO is no terminal
    off(1)
    off(3)
    assert quiet.getvalue() == ""


async def test_luxos_api_start_reports_each_miner_bound() -> None:
    import random  # noqa: PLC0415

    from simulators.fleet import SimulatedFleet  # noqa: PLC0415
    from simulators.luxos_api import LuxosApiServer  # noqa: PLC0415

    model = load_catalogue().get("s21")
    fleet = SimulatedFleet(["m1", "m2", "m3"], [model] * 3, start_now=time.monotonic())
    base = f"127.{random.randint(100, 250)}.{random.randint(0, 250)}.2"
    api = LuxosApiServer(fleet, [model] * 3, first_address=base)
    seen: list[int] = []
    await api.start(progress=seen.append)
    try:
        assert seen == [1, 2, 3]
    finally:
        await api.close()


def test_logs_show_times_as_iso_8601_with_the_zone(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog  # noqa: PLC0415

    from controller import logs  # noqa: PLC0415

    logs.configure("info", json=True)
    structlog.get_logger("test").info("grid_event_accepted", start_ts=1_724_194_800.0,
                                      end_ts=1_724_198_400, count=3, stale_ts=math.inf)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["start_ts"] == "2024-08-20T23:00:00+00:00"
    assert line["end_ts"] == "2024-08-21T00:00:00+00:00"
    assert line["count"] == 3, "only Unix-time fields"
    assert line["stale_ts"] == "Infinity" or math.isinf(line["stale_ts"])
    stamp = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert stamp.tzinfo is not None


# -- like with like: a campus's POI meter, a market price beyond the site's bounds --------

# The reviewer's campus (`mineops demo --campus`): the POI imports 2.24 MW, above the
# miners' 2.09 MW cap (firm load exceeds generation) and under the 2.339 MW import limit.
CAMPUS = {"cap_source": "campus", "grid_event_id": None, "grid_event_kind": None,
          "grid_event_target_w": None, "grid_event_deadline_ts": None,
          "grid_event_end_ts": None, "grid_event_on_track": None,
          "cap_in_force_w": 2_090_300.0, "cap_w": 2_069_000.0,
          "measured_site_power_w": 2_238_236.0, "campus_miners_measured_w": 2_051_000.0,
          "campus_headroom_w": 2_090_300.0, "campus_poi_limit_w": 2_339_000.0,
          "campus_firm_load_w": 400_000.0, "campus_generation_w": 200_000.0,
          "campus_on_site_w": 0.0, "campus_islanded": False, "campus_stale": []}


def styled(view: SiteView) -> list[str]:
    """The panel's lines with their styles as ANSI codes (bold red: 1;31)."""
    console = Console(record=True, width=200, file=io.StringIO(), force_terminal=True,
                      color_system="standard")
    console.print(view.render())
    return console.export_text(styles=True).splitlines()


def test_on_a_campus_the_miners_share_meets_the_miners_cap_and_net_import_the_limit() -> None:
    v = view(summary(**CAMPUS))
    line = v.line()
    assert "miners 2.05 MW / miners' cap 2.09 MW (the campus's headroom" in line
    assert "POI net import 2.24 MW / import limit 2.34 MW" in line
    assert "site 2.24 MW / cap 2.09 MW" not in line, "net import against the miners' cap"
    text = render(v)
    assert ("miners' power  2.05 MW measured (the POI reading less the campus's other "
            "parts), plan 2.13 MW, planning under 2.07 MW (incl. aux)") in text
    assert "POI            2.24 MW net import, import limit 2.34 MW" in text
    assert not [ln for ln in styled(v) if "\x1b[1;31m" in ln], "nothing is over"


@pytest.mark.parametrize(("over", "row"), [
    ({"campus_miners_measured_w": 2_200_000.0}, "miners' power"),
    ({"measured_site_power_w": 2_400_000.0}, "POI"),
])
def test_on_a_campus_what_is_over_its_own_limit_is_marked(over: dict[str, float],
                                                          row: str) -> None:
    red = [ln for ln in styled(view(summary(**{**CAMPUS, **over}))) if "\x1b[1;31m" in ln]
    assert len(red) == 1 and row in red[0], red


def test_on_a_campus_without_a_poi_reading_the_miners_share_is_unknown() -> None:
    v = view(summary(**{**CAMPUS, "measured_site_power_w": None,
                        "campus_miners_measured_w": None}))
    assert "miners unknown / miners' cap 2.09 MW" in v.line()
    assert "POI net import unknown / import limit 2.34 MW" in v.line()
    islanded = view(summary(**{**CAMPUS, "campus_islanded": True, "campus_poi_limit_w": None}))
    assert "POI net import 2.24 MW / islanded, no grid" in islanded.line()


def test_a_plain_site_still_shows_site_power_against_the_cap() -> None:
    assert "site 2.13 MW / cap 2.15 MW (grid event drill-1" in view(summary()).line()


@pytest.mark.parametrize(("market", "planned", "bound", "said"), [
    (9000.0, 5000.0, "cap", "$9,008.00/MWh = market $9,000.00/MWh (real-time; planned at "
     "the $5,000 cap) + adders $8.00/MWh"),
    (-400.0, -250.0, "floor", "-$392.00/MWh = market -$400.00/MWh (real-time; planned at "
     "the -$250 floor) + adders $8.00/MWh"),
])
def test_a_price_beyond_the_bounds_is_shown_as_the_markets_with_its_bound(
        market: float, planned: float, bound: str, said: str) -> None:
    s = summary(price_usd_per_mwh=planned + 8.0, market_price_usd_per_mwh=planned,
                real_market_price_usd_per_mwh=market, price_bound=bound)
    assert f"price {said}" in view(s).line()
    assert said in render(view(s))
    # The market moving on beyond the bound is a change worth a new line.
    further = s.model_copy(update={"real_market_price_usd_per_mwh": market * 1.5})
    assert view(further).change_key() != view(s).change_key()


def test_a_controller_decision_beyond_the_cap_says_the_markets_price() -> None:
    """The reviewer's repro: a $9,000 market under a $5,000 cap, real-time then day-ahead."""
    cfg = SiteConfig.model_validate({
        "site_id": "unit", "fleet": {"groups": [{"name": "a", "model": "s21", "count": 4}]},
        "power_cap_kw": 20, "hashprice_usd_per_ph_day": 42.0,
        "energy": {"adders_usd_per_mwh": 8.0}, "metrics": {"port": 0},
        "grid": {"journal_path": str(Path(tempfile.mkdtemp(prefix="mineops-test-")) / "g.db")},
    })
    c = Controller(cfg)
    c.on_message(c.topics.price, PriceSignal(ts=time.time(), price_usd_per_mwh=9000.0).encode())
    s = asyncio.run(c.decide_and_act("price")).summary()
    assert (s.price_usd_per_mwh, s.market_price_usd_per_mwh) == (5008.0, 5000.0), "planned"
    assert (s.real_market_price_usd_per_mwh, s.price_bound) == (9000.0, "cap")
    assert ("price $9,008.00/MWh = market $9,000.00/MWh (real-time; planned at the $5,000 "
            "cap)") in view(s).line()
    # The same spike in the day-ahead schedule, with no real-time price.
    c.fleet.site.market_price_usd_per_mwh = None
    c.on_message(c.topics.price_schedule, PriceSchedule(ts=time.time(), interval_s=3600, prices=[
        ScheduledPrice(start_ts=time.time() - 60, price_usd_per_mwh=12_000.0)]).encode())
    s = asyncio.run(c.decide_and_act("price_schedule")).summary()
    assert (s.market_price_usd_per_mwh, s.real_market_price_usd_per_mwh) == (5000.0, 12_000.0)
    assert ("market $12,000.00/MWh (day-ahead schedule; planned at the $5,000 cap)"
            in view(s).line())
    # Within the bounds nothing is said of them.
    c.on_message(c.topics.price, PriceSignal(ts=time.time(), price_usd_per_mwh=40.0).encode())
    s = asyncio.run(c.decide_and_act("price")).summary()
    assert (s.real_market_price_usd_per_mwh, s.price_bound) == (40.0, None)
    assert "price $48.00/MWh = market $40.00/MWh (real-time) + adders $8.00/MWh" in view(s).line()


def test_the_summary_carries_the_miners_measured_share_of_the_poi_reading() -> None:
    """POI reading less the other parts' fresh readings, as the meter guard counts it."""
    campus = CampusConfig.model_validate({
        "poi": {"import_limit_kw": 2339, "meter": "poi"},
        "firm_loads": [{"id": "hall", "meter": "hall", "max_kw": 600}],
        "generators": [{"id": "pv", "kind": "solar", "meter": "pv", "rating_kw": 500}]})
    now = time.time()
    readings = {"poi": PartReading(2_238_236.0, now), "hall": PartReading(400_000.0, now),
                "pv": PartReading(200_000.0, now)}
    picture = campus_picture(campus, readings, now_unix_s=now, stale_s=10.0,
                             margin_fraction=0.01, market_usd_per_mwh=40.0,
                             adders_usd_per_mwh=8.0)
    cfg = SiteConfig.model_validate({
        "site_id": "unit", "fleet": {"groups": [{"name": "a", "model": "s21", "count": 4}]},
        "power_cap_kw": 20, "hashprice_usd_per_ph_day": 42.0, "metrics": {"port": 0},
        "grid": {"journal_path": str(Path(tempfile.mkdtemp(prefix="mineops-test-")) / "g.db")},
    })
    snap = asyncio.run(Controller(cfg).decide_and_act("tick"))
    on_campus = dataclasses.replace(snap, campus=picture, measured_site_power_w=2_238_236.0)
    # 2.238 MW at the POI, 0.4 MW of it the hall's, 0.2 MW of the hall's supplied by the PV.
    assert on_campus.summary().campus_miners_measured_w == 2_038_236.0
    # Unknown POI: the share is unknown, not the other parts' negative.
    unknown = dataclasses.replace(on_campus, measured_site_power_w=None)
    assert unknown.summary().campus_miners_measured_w is None
    assert snap.summary().campus_miners_measured_w is None, "no campus, no share"

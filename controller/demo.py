"""`mineops demo`: a whole simulated site, its controller and metrics, in one command.

Starts a local broker (mosquitto if installed, else the embedded amqtt) on
127.0.0.1, a simulated mixed fleet with a site meter and a price replay, the
controller and its /metrics endpoint, and shows the live site view
(`controller.view`, the same view `mineops top` shows of a running daemon). Time runs
`speed` times faster in the simulation; the controller's policy and grid times are
scaled to match, so an hour of site behaviour passes in a minute at speed 60.

By default the replay is the real ERCOT trace shipped with mineops from 2024-08-20
17:45 CDT, an hour and a half before that evening's scarcity spike ($4,858/MWh at
19:30), and a demo grid event (a power target at 60 % of the site cap, ten site minutes'
notice, twenty minutes long) is sent five seconds in: the first minute shows the
controller curtailing for price, holding a grid target and ramping back afterwards.

On a terminal the view is redrawn in place; on a pipe a line is printed only when
something changed (cap, price, grid event, miners by state or reason). Ctrl-C, like
`--duration`, ends with a final summary.

`--campus` puts the miners on an energy campus (docs/campus.md): behind one
interconnect with a GPU hall whose training jobs start and stop at random (steps of
several hundred kW in 2 s), a solar field on its daily curve with passing clouds, a
genset carrying part of the GPU hall and an idle battery, all sized to the fleet. The
campus devices are served as SunSpec devices on Modbus TCP on 127.0.0.1
(simulators/campus_modbus.py) and read by the controller as a real site's would; the
POI meter is the site meter on MQTT. The view then shows the miners filling the
campus's headroom (import limit + generation - firm load) live.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from zoneinfo import ZoneInfo

from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.grid.standing import compliance
from drivers.prices import PriceFileError, PriceSeries, load_prices
from simulators.prices import synthetic_prices

if TYPE_CHECKING:  # the CLI imports this module for add_arguments: the rest when it runs
    from controller.core.prices import PriceBound
    from controller.daemon.loop import Controller
    from controller.daemon.metrics import MetricsServer
    from controller.protocol.broker import LocalBroker
    from controller.view import SiteView
    from controller.view.screen import Screen
    from simulators.campus import CampusSimulation
    from simulators.campus_modbus import CampusModbus
    from simulators.site import SimulatedSite

# A plausible 2026 mix: older air-cooled fleet, current air, and some hydro.
DEMO_MIX = (
    ("s19j_pro", 0.16), ("s19_xp", 0.12), ("m60s", 0.12), ("s21", 0.24),
    ("s21_pro", 0.12), ("s21_xp", 0.08), ("s21_xp_hydro", 0.08), ("s23_hydro", 0.08),
)
RACK_SIZE = 40
DEFAULT_PRICES = "ercot-hb-south-2024-summer"
# Prices from $68 to $232/MWh in the first simulated hour (the fleet's break-evens span
# $59-184 at the demo's hashprice), the $2,450-4,858 spike from 19:15.
DEFAULT_START = "2024-08-20T17:45"
SYNTHETIC = "synthetic"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's own options (beside --prices and its friends)."""
    p.add_argument("--start", metavar="TIME",
                   help="where the price replay starts, a time on the price file's clock "
                   f"(e.g. 2024-08-20T17:45; default: {DEFAULT_START} for the built-in "
                   "ERCOT trace, else the first interval)")
    p.add_argument("--event-at", type=float, default=5.0, metavar="SECONDS",
                   help="send a demo grid event (power target at 60 %% of the site cap, ten "
                   "site minutes' notice, twenty minutes long) this many real seconds after "
                   "the start (default 5)")
    p.add_argument("--no-event", action="store_true", help="send no demo grid event")
    p.add_argument("--campus", action="store_true",
                   help="an energy campus: the miners share the interconnect with a GPU hall "
                   "(jobs starting and stopping), solar with clouds, a genset and a battery, "
                   "served as SunSpec devices on Modbus TCP on 127.0.0.1; the miners fill "
                   "the headroom they leave")


def demo_site(miners: int, *, speed: float, broker_host: str, broker_port: int,
              metrics_port: int, journal_path: str, cap_fraction: float = 0.92,
              campus_port: int | None = None) -> SiteConfig:
    """A mixed site of `miners` miners in racks, capped below its stock draw.

    `campus_port`: on an energy campus (`demo_campus`) whose SunSpec devices answer on
    this port; the miners' own cap is then their stock draw, the interconnect 80 % of it.
    """
    catalogue = load_catalogue()
    groups: list[dict[str, Any]] = []
    left = miners
    for i, (model, share) in enumerate(DEMO_MIX):
        count = left if i == len(DEMO_MIX) - 1 else min(left, max(1, round(miners * share)))
        left -= count
        rack = 1
        while count > 0:
            size = min(RACK_SIZE, count)
            groups.append({"name": f"{model.replace('_', '-')}-r{rack}", "model": model,
                           "count": size})
            count -= size
            rack += 1
    aux = 0.05
    stock_w = sum(catalogue.get(g["model"]).nominal_w * g["count"] for g in groups)
    stock_kw = stock_w * (1 + aux) / 1000.0
    cap_kw = round(stock_kw * (1.0 if campus_port is not None else cap_fraction), 1)
    campus = {} if campus_port is None else {"campus": demo_campus(stock_kw, campus_port)}
    return SiteConfig.model_validate({
        **campus,
        "site_id": "demo",
        "broker": {"host": broker_host, "port": broker_port, "reconnect_max_s": 2.0},
        "fleet": {"groups": groups},
        "meters": [{"type": "mineops", "id": "poi"}],
        "power_cap_kw": cap_kw,
        "hashprice_usd_per_ph_day": 42.0,
        "energy": {"adders_usd_per_mwh": 8.0, "aux_fraction": aux},
        "policy": {
            "decision_interval_s": 1.0,
            "telemetry_stale_s": 10.0,
            "min_run_s": 300.0 / speed,
            "min_sleep_s": 300.0 / speed,
            # The controller reads wake times from the catalogue in real seconds.
            "wake_latency_factor": 1.0 / speed,
        },
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "grid": {
            "journal_path": journal_path,
            # Site minutes, like everything else: 2 minutes to prepare (but at least three
            # decisions, which tick in real seconds), back at 10 % of the cap per minute
            # (unscaled, the recovery would take the demo an hour).
            "prepare_s": max(120.0 / speed, 3.0),
            "recovery_kw_per_min": 0.1 * cap_kw * speed,
            "record_interval_s": max(0.2, 5.0 / speed),
        },
    })


# The demo campus, in fractions of the fleet's stock draw with cooling (S): the miners'
# own feeder is S, the interconnect 0.8 S, a GPU hall idling at 0.1 S that runs jobs of
# 0.05-0.3 S (up to 0.5 S), 0.4 S of solar, a genset of 0.12 S carrying a quarter of the
# GPU hall, a two-hour battery of 0.05 S, export up to 0.1 S.
CAMPUS_UNITS = {"gpu": 2, "pv": 3, "genset": 4, "bess": 5}


def demo_campus(stock_kw: float, modbus_port: int) -> dict[str, Any]:
    """The demo's `[campus]` table for a fleet drawing `stock_kw` at stock (with cooling)."""
    s = stock_kw
    devices = [{"id": meter, "host": "127.0.0.1", "port": modbus_port, "unit_id": unit,
                "poll_interval_s": 1.0, "timeout_s": 1.0}
               for meter, unit in CAMPUS_UNITS.items()]
    return {
        "poi": {"import_limit_kw": round(0.8 * s, 1), "export_limit_kw": round(0.1 * s, 1),
                "meter": "poi"},
        "firm_loads": [{"id": "gpu-hall", "meter": "gpu", "max_kw": round(0.5 * s, 1)}],
        "generators": [
            {"id": "solar", "kind": "solar", "meter": "pv", "rating_kw": round(0.4 * s, 1)},
            {"id": "genset", "kind": "genset", "meter": "genset", "rating_kw": round(0.12 * s, 1),
             "marginal_cost_usd_per_mwh": 45.0, "reserve_kw": round(0.012 * s, 1),
             "max_load_step_kw": round(0.04 * s, 1)},
        ],
        "battery": {"capacity_kwh": round(0.1 * s, 1), "max_charge_kw": round(0.05 * s, 1),
                    "max_discharge_kw": round(0.05 * s, 1), "meter": "bess"},
        "modbus": devices,
    }


def campus_simulation(stock_kw: float, *, start_hour: float, seed: int = 0
                      ) -> CampusSimulation:
    """The demo campus's devices (simulators/campus.py), sized as `demo_campus`."""
    from simulators.campus import (  # noqa: PLC0415 - see TYPE_CHECKING
        BatterySpec,
        CampusSimulation,
        GensetSpec,
        GpuHallSpec,
        SolarSpec,
    )

    s = stock_kw
    return CampusSimulation(
        seed=seed, start_hour=start_hour,
        gpu=GpuHallSpec(capacity_kw=0.5 * s, idle_kw=0.1 * s, job_kw=(0.05 * s, 0.3 * s)),
        solar=SolarSpec(capacity_kw=0.4 * s),
        genset=GensetSpec(rating_kw=0.12 * s, max_load_step_kw=0.04 * s),
        battery=BatterySpec(capacity_kwh=0.1 * s, max_charge_kw=0.05 * s,
                            max_discharge_kw=0.05 * s))


def demo_prices(source: str | None, column: str | None = None, *, timezone: str | None = None,
                settlement_point: str | None = None, start: str | None = None,
                unit: str | None = None) -> PriceSeries:
    """The price series the demo replays, from its `start` on.

    `source` None is the built-in ERCOT trace from DEFAULT_START; "synthetic" a synthetic
    week from today's midnight UTC; anything else a trace name or file (`load_prices`).
    `start` is read on the series' clock when it has no zone.

    Raises:
        PriceFileError: the file cannot be read, or `start` is not a time in the series.
    """
    if source == SYNTHETIC:
        midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        prices = synthetic_prices(start_s=midnight.timestamp())
    else:
        prices = load_prices(source or DEFAULT_PRICES, column, timezone=timezone,
                             settlement_point=settlement_point, unit=unit)
        if source is None and start is None:
            start = DEFAULT_START
    if start is None:
        return prices
    try:
        t = datetime.fromisoformat(start)
    except ValueError:
        raise PriceFileError(f"--start {start!r}: not a time such as 2024-08-20T17:45") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=ZoneInfo(prices.timezone))
    ts = t.timestamp()
    first, last = float(prices.start_s[0]), float(prices.start_s[-1]) + prices.interval_s
    if not first <= ts < last:
        raise PriceFileError(f"--start {start}: outside the prices ({prices.span_text()})")
    i = int((ts - first) // prices.interval_s)
    return replace(prices, start_s=prices.start_s[i:],
                   price_usd_per_mwh=prices.price_usd_per_mwh[i:])


@dataclass(frozen=True, slots=True)
class DemoEvent:
    """The demo's grid event: sent `at_s` real seconds in, times in site seconds."""

    at_s: float
    notice_site_s: float = 600.0
    duration_site_s: float = 1200.0
    target_fraction: float = 0.6  # of the site cap
    id: str = "demo-drill"


class MetricsEndpointError(OSError):
    """The demo's metrics endpoint could not be bound (`host`, `port`; `error` says why)."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        super().__init__(error.errno, error.strerror)
        self.host, self.port, self.error = host, port, error


@dataclass
class DemoResult:
    """How a demo run went: `ok` when the site worked, else `why` says what failed."""

    ok: bool
    why: str


def _view(c: Controller, tz: ZoneInfo) -> SiteView:
    """The live view of the summary the controller published, as `mineops top` shows it.

    The site clock is the one the summary carries (`SiteClock.of_summary`).
    """
    from controller.view import SiteClock, SiteView  # noqa: PLC0415

    catalogue = load_catalogue()
    return SiteView(
        site_id=c.cfg.site_id, summary=c.summary, clock=SiteClock.of_summary(c.summary, tz),
        now_wall_s=time.time(), models={k: catalogue.get(k) for k in c.fleet.model_keys},
        controller_online=c.transport.connected.is_set() or None,
        aux_fraction=c.cfg.energy.aux_fraction)


def _events_text(c: Controller, view: SiteView) -> list[str]:
    """One line per grid event of the run: its terms on the site clock, and its standing."""
    from controller.view.site import event_terms  # noqa: PLC0415

    now = time.time()
    lines = []
    for r in c.grid.journal.rows():
        p = r.payload
        value = p.get("value_kw")
        terms = event_terms(r.kind, None if value is None else float(value) * 1000.0)
        if "end_ts" in p:
            start, end = view.clock.at(p["start_ts"]), view.clock.at(p["end_ts"])
            terms += f" from {start:%H:%M} to {end:%H:%M %Z}"
        lines.append(f"grid event {r.id} ({terms}): {compliance(r, now)}")
    return lines


def _final(c: Controller, sim: SimulatedSite, screen: Screen, *, seconds: float, tz: ZoneInfo,
           over_cap_samples: int, samples: int, interrupted: bool) -> DemoResult:
    now = time.monotonic()
    seen = int((now - c.fleet.last_seen < c.cfg.policy.telemetry_stale_s).sum())
    view = _view(c, tz)
    how = "interrupted by Ctrl-C" if interrupted else f"after {seconds:.0f} s"
    screen.final(f"mineops demo: final summary, {how}", view)
    for line in _events_text(c, view):
        screen.write(line)
    invalid = sum(c.ingest.invalid.values())
    screen.write(
        f"ran {seconds:.0f} s at speed {sim.speed:g}: {c.decisions} decisions, "
        f"{sim.commands_applied} setpoints applied by miners, {invalid} invalid messages, "
        f"miners reporting {seen}/{c.fleet.n}, meter over cap in {over_cap_samples} of "
        f"{samples} samples after settling"
    )
    energy = c.cfg.energy
    bounds: tuple[tuple[PriceBound, str, float], ...] = (
        ("cap", "above", energy.price_cap_usd_per_mwh),
        ("floor", "below", energy.price_floor_usd_per_mwh))
    for bound, side, at in bounds:
        n = c.ingest.prices_clamped.get(bound, 0)
        if n:
            screen.write(f"{n} price{'s' if n != 1 else ''} {side} the site's price {bound} "
                         f"(${at:,.0f}/MWh, [energy] price_{bound}_usd_per_mwh): planned with "
                         f"at the {bound}")
    if seen < 0.95 * c.fleet.n:
        return DemoResult(False, f"only {seen} of {c.fleet.n} miners reported telemetry")
    if c.decisions == 0:
        return DemoResult(False, "the controller made no decision")
    return DemoResult(True, "ok")


def retained_topics(cfg: SiteConfig) -> list[str]:
    """What a demo leaves retained on its broker.

    Its racks' availability, the price, the controller's availability and its last decision summary.
    """
    from controller.protocol.topics import SiteTopics  # noqa: PLC0415

    t = SiteTopics(cfg.site_id)
    return [*(t.group(g.name, "availability") for g in cfg.fleet.groups), t.price,
            t.controller_availability, t.decision]


# Clearing is best effort and must fit in the stop's budget (cli.common.STOP_BACKSTOP_S).
CLEAR_TIMEOUT_S = 3.0


async def clear_retained(cfg: SiteConfig, topics: list[str]) -> bool:
    """Delete the retained messages on `topics` (an empty retained message each, QoS 1).

    On a broker the demo does not own (`--broker`), they would outlive it: a later demo
    counts another fleet's racks as invalid, `top` shows a site that is gone. Returns
    whether every topic was cleared within CLEAR_TIMEOUT_S.
    """
    from controller.protocol.transport import Transport  # noqa: PLC0415

    transport = Transport(cfg.broker, client_id=f"mineops-demo-clear-{os.getpid()}",
                          subscriptions=[])
    task = asyncio.create_task(transport.run(lambda *_: None), name="demo-clear")
    try:
        async with asyncio.timeout(CLEAR_TIMEOUT_S):
            await transport.connected.wait()
            done = await asyncio.gather(*(transport.publish(t, b"", qos=1, retain=True)
                                          for t in topics))
            return all(done)
    except TimeoutError:
        return False
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _send_event(c: Controller, sim: SimulatedSite, ev: DemoEvent) -> None:
    """Publish the demo grid event, as a utility's or an operator's would arrive."""
    from controller.protocol.payloads import GridEvent  # noqa: PLC0415

    await asyncio.sleep(ev.at_s)
    await c.transport.connected.wait()
    now = time.time()
    start = now + ev.notice_site_s / sim.speed
    event = GridEvent(
        id=ev.id, kind="target_kw",
        value_kw=round(c.cfg.power_cap_kw * ev.target_fraction, 1), start_ts=start,
        end_ts=start + ev.duration_site_s / sim.speed, source="mineops-demo")
    # Not retained: on a shared broker (--broker) it must not outlive the demo.
    await sim.transport.publish(c.topics.grid, event.encode(), qos=1)


async def run_demo(
    *,
    miners: int,
    duration_s: float | None,
    speed: float,
    metrics_port: int,
    broker: str | None,
    embedded: str = "auto",
    prices_file: str | None,
    price_column: str | None,
    price_timezone: str | None = None,
    settlement_point: str | None = None,
    price_unit: str | None = None,
    start: str | None = None,
    event: DemoEvent | None = DemoEvent(at_s=5.0),
    campus: bool = False,
    out: TextIO = sys.stdout,
) -> DemoResult:
    """Run the demo until `duration_s` passes, or Ctrl-C (forever); return whether it went well.

    `prices_file` None replays the built-in ERCOT trace from `start` (default
    DEFAULT_START); "synthetic" a synthetic week. `event` None sends no grid event.
    `campus`: the miners on an energy campus (module docstring).

    Raises:
        PriceFileError: the prices or `start` cannot be used.
        MissingExtra: no mosquitto and no embedded broker installed.
        MetricsEndpointError: the metrics port cannot be bound (in use, mostly).
    """
    from controller.view.screen import Screen  # noqa: PLC0415 - see TYPE_CHECKING

    prices = demo_prices(prices_file, price_column, timezone=price_timezone,
                         settlement_point=settlement_point, start=start, unit=price_unit)
    tz = ZoneInfo(prices.timezone)
    screen = Screen(out)
    host, port_n, local = _demo_broker(broker, embedded, screen)
    try:
        site = await _start_site(miners, speed=speed, prices=prices, broker_host=host,
                                 broker_port=port_n, metrics_port=metrics_port, campus=campus)
        _say_what_runs(screen, site, prices=prices, speed=speed, event=event)
        started = time.monotonic()
        cap_watch = _CapWatch(site, started=started, speed=speed)
        try:
            interrupted = await _run_until_stopped(site, screen, duration_s=duration_s,
                                                   event=event, cap_watch=cap_watch, tz=tz)
        finally:
            await _stop_site(site, screen, shared_broker=bool(broker), host=host, port=port_n)
        try:
            return _final(site.controller, site.sim, screen,
                          seconds=time.monotonic() - started, tz=tz,
                          over_cap_samples=cap_watch.over_cap, samples=cap_watch.samples,
                          interrupted=interrupted)
        finally:
            # The demo's journal lives in a directory of its own (_start_site): its record
            # has been shown; nothing else names it, so nothing is left behind.
            site.controller.grid.journal.close()
            shutil.rmtree(Path(site.cfg.grid.journal_path).parent, ignore_errors=True)
    finally:
        if local is not None:
            with contextlib.suppress(Exception):
                local.close()


def _demo_broker(broker: str | None, embedded: str, screen: Screen
                 ) -> tuple[str, int, LocalBroker | None]:
    """(host, port, the broker started for the demo or None) of the demo's MQTT broker.

    `broker` "HOST:PORT" is the operator's (`--broker`); None starts one on 127.0.0.1
    (`embedded`: LocalBroker's `prefer`), which the caller closes, and says which on
    `screen`.

    Raises:
        MissingExtra: no mosquitto and no embedded broker installed.
    """
    from controller.protocol.broker import LocalBroker  # noqa: PLC0415 - see TYPE_CHECKING

    if broker:
        host, _, port = broker.rpartition(":")
        return host or "127.0.0.1", int(port), None
    local = LocalBroker(prefer=embedded).start()
    screen.write(f"broker: embedded {local.kind} on {local.host}:{local.port}")
    return local.host, local.port, local


@dataclass(frozen=True, slots=True)
class _DemoSite:
    """The demo's parts, started: its site config, simulation, controller and endpoints.

    `metrics` is the controller's /metrics endpoint; `modbus` the campus's SunSpec devices
    on Modbus TCP, None off a campus.
    """

    cfg: SiteConfig
    sim: SimulatedSite
    controller: Controller
    metrics: MetricsServer
    modbus: CampusModbus | None


async def _start_site(miners: int, *, speed: float, prices: PriceSeries, broker_host: str,
                      broker_port: int, metrics_port: int, campus: bool) -> _DemoSite:
    """The demo site on the broker at broker_host:broker_port, its controller and endpoints.

    On a `campus` its devices are simulated from the first price interval's local hour
    and served on Modbus TCP (started here). The controller runs on the simulation's clock
    (`speed` times real time) with its grid journal in a new temporary directory.

    Raises:
        MetricsEndpointError: the metrics port cannot be bound (in use, mostly).
    """
    from controller.daemon.loop import Controller, SiteTime  # noqa: PLC0415 - see TYPE_CHECKING
    from simulators.campus_modbus import CampusModbus  # noqa: PLC0415
    from simulators.campus_site import SimulatedCampus  # noqa: PLC0415
    from simulators.site import SimulatedSite  # noqa: PLC0415

    state_dir = tempfile.mkdtemp(prefix="mineops-demo-")
    site_args: dict[str, Any] = {
        "speed": speed, "broker_host": broker_host, "broker_port": broker_port,
        "metrics_port": metrics_port, "journal_path": f"{state_dir}/grid.sqlite3"}
    cfg = demo_site(miners, **site_args)
    sim: SimulatedSite
    modbus: CampusModbus | None = None
    if campus:
        stock_kw = cfg.cap_review().fleet_stock_kw
        first_hour = prices.local_time(float(prices.start_s[0]))
        campus_sim = campus_simulation(
            stock_kw, start_hour=first_hour.hour + first_hour.minute / 60.0)
        modbus = CampusModbus(campus_sim, poi_rating_kw=stock_kw * 1.5)
        await modbus.server.start()
        cfg = demo_site(miners, campus_port=modbus.server.port, **site_args)
        sim = SimulatedCampus(cfg, campus_sim, modbus=modbus, speed=speed, prices=prices)
    else:
        sim = SimulatedSite(cfg, speed=speed, prices=prices)
    controller = Controller(cfg, site_clock=lambda: SiteTime(
        sim.site_time_s(), sim.speed, prices.timezone))
    try:
        server = controller.metrics.serve(cfg.metrics.host, cfg.metrics.port)
    except OSError as e:  # port in use, mostly: another demo or a daemon on 9108
        if modbus is not None:
            await modbus.server.stop()  # nothing else was started that outlives this
        raise MetricsEndpointError(cfg.metrics.host, cfg.metrics.port, e) from None
    return _DemoSite(cfg, sim, controller, server, modbus)


def _say_what_runs(screen: Screen, site: _DemoSite, *, prices: PriceSeries, speed: float,
                   event: DemoEvent | None) -> None:
    """The demo's opening lines: the site and its prices, the grid event, the campus, /metrics."""
    cfg, controller, modbus = site.cfg, site.controller, site.modbus
    first = prices.local_time(float(prices.start_s[0]))
    screen.write(
        f"site: {controller.fleet.n} miners in {len(controller.fleet.groups)} racks, "
        f"cap {cfg.power_cap_kw / 1000:.2f} MW; prices: {prices.column}"
        f"{' at ' + prices.location if prices.location else ''} from "
        f"{first:%Y-%m-%d %H:%M %Z}, {len(prices)} intervals of "
        f"{prices.interval_s / 60:g} min, one every {prices.interval_s / speed:.1f} s "
        f"(site clock {speed:g}x real time)")
    if event is not None:
        screen.write(
            f"grid event: {event.id} at +{event.at_s:g} s, a target of "
            f"{cfg.power_cap_kw * event.target_fraction / 1000:.2f} MW from "
            f"{event.notice_site_s / 60:g} site minutes later for "
            f"{event.duration_site_s / 60:g} minutes")
    if cfg.campus is not None and modbus is not None:
        c = cfg.campus
        screen.write(
            f"campus: interconnect {c.poi.import_limit_kw / 1000:.2f} MW import, "
            f"{c.poi.export_limit_kw / 1000:.2f} MW export; GPU hall up to "
            f"{c.firm_loads[0].max_kw / 1000:.2f} MW (jobs start and stop), solar "
            f"{c.generators[0].rating_kw / 1000:.2f} MW (clouds), genset "
            f"{c.generators[1].rating_kw / 1000:.2f} MW, battery "
            f"{c.battery.capacity_kwh / 1000 if c.battery else 0:.2f} MWh; SunSpec on "
            f"modbus://127.0.0.1:{modbus.server.port} (units 2-5), the POI meter on MQTT")
    screen.write(f"metrics: http://{cfg.metrics.host}:{site.metrics.port}/metrics")


@dataclass
class _CapWatch:
    """The site meter sampled against the cap in force, once the controller has settled.

    `started` is when the run began (time.monotonic(), s); `samples` counts the samples
    taken after the settling time, `over_cap` those above the cap.
    """

    site: _DemoSite
    started: float
    speed: float
    over_cap: int = 0
    samples: int = 0

    async def run(self) -> None:
        """Sample twice a second until cancelled."""
        controller, sim = self.site.controller, self.site.sim
        settle_s = 3.0 * self.site.cfg.policy.decision_interval_s + 30.0 / self.speed + 5.0
        while True:
            await asyncio.sleep(0.5)
            snap = controller.snapshot
            if snap is None or time.monotonic() - self.started <= settle_s:
                continue
            # The cap the site must be under now: a grid target binds from its deadline
            # (before it, the site is still ramping down to it). On a campus the site
            # meter is the POI's, and the limit the POI's.
            limit = snap.cap.in_force_w
            ev = snap.grid_event
            if snap.campus is not None and snap.campus.poi_limit_w is not None:
                limit = snap.campus.poi_limit_w
                if ev is not None and time.time() < ev.deadline_unix_s:
                    limit = snap.campus.import_limit_w
            elif ev is not None and time.time() < ev.deadline_unix_s:
                limit = snap.cap.site_w
            self.samples += 1
            # 0.5 % headroom: the meter's own noise is 0.2 %.
            self.over_cap += sim.site_power_w() > limit * 1.005


async def _show_view(screen: Screen, controller: Controller, tz: ZoneInfo) -> None:
    """Redraw the live view until cancelled: twice a second on a terminal, else every second."""
    while True:
        screen.show(_view(controller, tz))
        await asyncio.sleep(0.5 if screen.tty else 1.0)


async def _run_until_stopped(site: _DemoSite, screen: Screen, *, duration_s: float | None,
                             event: DemoEvent | None, cap_watch: _CapWatch,
                             tz: ZoneInfo) -> bool:
    """Run the simulation, the controller, the view, the cap watch and the grid event.

    Until `duration_s` passes (None: forever) or Ctrl-C; returns whether it was
    interrupted (Ctrl-C or SIGTERM), which ends the run as the duration would.
    """
    controller, sim = site.controller, site.sim
    with screen:
        try:
            async with asyncio.timeout(duration_s), asyncio.TaskGroup() as tg:
                tg.create_task(sim.run(), name="simulator")
                tg.create_task(controller.run(), name="controller")
                tg.create_task(_show_view(screen, controller, tz), name="view")
                tg.create_task(cap_watch.run(), name="cap-watch")
                if event is not None:
                    tg.create_task(_send_event(controller, sim, event), name="event")
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            # Ctrl-C or SIGTERM: everything above has stopped; summarise, not crash.
            return True
    return False


async def _stop_site(site: _DemoSite, screen: Screen, *, shared_broker: bool, host: str,
                     port: int) -> None:
    """Close the metrics endpoint and the campus's Modbus server.

    On a `shared_broker` (`--broker`, at host:port) also clear the demo's retained
    messages there, or say on `screen` that they could not be.
    """
    cfg = site.cfg
    site.metrics.close()
    if site.modbus is not None:
        await site.modbus.server.stop()
    if shared_broker and not await clear_retained(cfg, retained_topics(cfg)):
        screen.write(f"could not clear the demo's retained messages on {host}:{port} "
                     f"(mineops/{cfg.site_id}/#)")

"""`mineops demo`: a whole simulated site, its controller and metrics, in one command.

Starts a local broker (mosquitto if installed, else the embedded amqtt) on
127.0.0.1, a simulated mixed fleet with a site meter and a price replay, the
controller and its /metrics endpoint, and shows a live summary. Time runs
`speed` times faster in the simulation; the controller's policy times are
scaled to match, so an hour of site behaviour passes in a minute at speed 60.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, TextIO

from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.daemon.loop import Controller
from controller.protocol.broker import LocalBroker
from drivers.prices import load_prices
from simulators.prices import synthetic_prices
from simulators.site import SimulatedSite

# A plausible 2026 mix: older air-cooled fleet, current air, and some hydro.
DEMO_MIX = (
    ("s19j_pro", 0.16), ("s19_xp", 0.12), ("m60s", 0.12), ("s21", 0.24),
    ("s21_pro", 0.12), ("s21_xp", 0.08), ("s21_xp_hydro", 0.08), ("s23_hydro", 0.08),
)
RACK_SIZE = 40


def demo_site(miners: int, *, speed: float, broker_host: str, broker_port: int,
              metrics_port: int, journal_path: str, cap_fraction: float = 0.92) -> SiteConfig:
    """A mixed site of `miners` miners in racks, capped below its stock draw."""
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
    return SiteConfig.model_validate({
        "site_id": "demo",
        "broker": {"host": broker_host, "port": broker_port, "reconnect_max_s": 2.0},
        "fleet": {"groups": groups},
        "meters": [{"type": "mineops", "id": "poi"}],
        "power_cap_kw": round(stock_w * (1 + aux) * cap_fraction / 1000.0, 1),
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
        "grid": {"journal_path": journal_path},
    })


@dataclass
class DemoResult:
    ok: bool
    why: str


def _summary_line(c: Controller) -> str:
    snap = c.snapshot
    if snap is None:
        return "waiting for the first decision ..."
    states = snap.miners_by_state
    hp = snap.hashprice_usd_per_ph_day
    catalogue = load_catalogue()
    be = " ".join(
        f"{k}:${catalogue.get(k).breakeven_usd_per_mwh(hp):.0f}" for k in c.fleet.model_keys
    )
    measured = snap.measured_site_power_w
    mw = "  ?  " if measured is None else f"{measured / 1e6:5.2f}"
    cap = snap.cap
    return (
        f"site {mw} MW / cap {cap.in_force_w / 1e6:.2f} MW ({cap.source}) | "
        f"{snap.fleet_hashrate_ths / 1000:7.1f} PH/s | "
        f"price ${snap.price.total_usd_per_mwh:7.2f}/MWh | "
        f"run {states['running']} under {states['underclocked']} "
        f"wake {states['waking']} asleep {states['sleeping']} offline {states['offline']}"
        f"\n    break-even $/MWh: {be}"
    )


async def _show(c: Controller, out: TextIO, every_s: float) -> None:
    tty = out.isatty()
    while True:
        await asyncio.sleep(every_s)
        line = _summary_line(c)
        if tty:
            out.write("\x1b[2K\r" + line.replace("\n", "\n\x1b[2K") + "\x1b[1A\r")
        else:
            out.write(line + "\n")
        out.flush()


def _final(c: Controller, sim: SimulatedSite, seconds: float, out: TextIO,
           over_cap_samples: int, samples: int) -> DemoResult:
    now = time.monotonic()
    seen = int((now - c.fleet.last_seen < c.cfg.policy.telemetry_stale_s).sum())
    out.write("\n\n== mineops demo: final summary ==\n")
    out.write(_summary_line(c) + "\n")
    invalid = sum(c.ingest.invalid.values())
    out.write(
        f"ran {seconds:.0f} s at speed {sim.speed:g}: {c.decisions} decisions, "
        f"{sim.commands_applied} setpoints applied by miners, {invalid} invalid messages, "
        f"miners reporting {seen}/{c.fleet.n}, meter over cap in {over_cap_samples} of "
        f"{samples} samples after settling\n"
    )
    if seen < 0.95 * c.fleet.n:
        return DemoResult(False, f"only {seen} of {c.fleet.n} miners reported telemetry")
    if c.decisions == 0:
        return DemoResult(False, "the controller made no decision")
    return DemoResult(True, "ok")


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
    out: TextIO = sys.stdout,
) -> DemoResult:
    """Run the demo until `duration_s` passes (or forever); return whether it went well."""
    local: LocalBroker | None = None
    if broker:
        host, _, port = broker.rpartition(":")
        host, port_n = host or "127.0.0.1", int(port)
    else:
        local = LocalBroker(prefer=embedded).start()
        host, port_n = local.host, local.port
        out.write(f"broker: embedded {local.kind} on {host}:{port_n}\n")
    try:
        state_dir = tempfile.mkdtemp(prefix="mineops-demo-")
        cfg = demo_site(miners, speed=speed, broker_host=host, broker_port=port_n,
                        metrics_port=metrics_port, journal_path=f"{state_dir}/grid.sqlite3")
        prices = (load_prices(prices_file, price_column, timezone=price_timezone,
                              settlement_point=settlement_point) if prices_file
                  else synthetic_prices())
        sim = SimulatedSite(cfg, speed=speed, prices=prices)
        controller = Controller(cfg)
        server = controller.metrics.serve(cfg.metrics.host, cfg.metrics.port)
        out.write(
            f"site: {controller.fleet.n} miners in {len(controller.fleet.groups)} racks, "
            f"cap {cfg.power_cap_kw / 1000:.2f} MW; prices: {prices.column}"
            f"{' at ' + prices.location if prices.location else ''} "
            f"({len(prices)} intervals of {prices.interval_s / 60:g} min, one every "
            f"{prices.interval_s / speed:.1f} s"
            f"{'; ' + prices.span_text() if prices_file else ''})\n"
            f"metrics: http://{cfg.metrics.host}:{server.port}/metrics\n"
        )
        out.flush()
        started = time.monotonic()
        over_cap = samples = 0

        async def watch_cap() -> None:
            nonlocal over_cap, samples
            settle_s = 3.0 * cfg.policy.decision_interval_s + 30.0 / speed + 5.0
            while True:
                await asyncio.sleep(0.5)
                if time.monotonic() - started > settle_s:
                    samples += 1
                    # 0.5 % headroom: the meter's own noise is 0.2 %.
                    snap = controller.snapshot
                    cap_w = controller.site_cap_w() if snap is None else snap.cap.in_force_w
                    over_cap += sim.site_power_w() > cap_w * 1.005

        try:
            async with asyncio.timeout(duration_s), asyncio.TaskGroup() as tg:
                tg.create_task(sim.run(), name="simulator")
                tg.create_task(controller.run(), name="controller")
                tg.create_task(_show(controller, out, 2.0 if out.isatty() else 5.0))
                tg.create_task(watch_cap())
        except TimeoutError:
            pass
        finally:
            server.close()
        return _final(controller, sim, time.monotonic() - started, out, over_cap, samples)
    finally:
        if local is not None:
            with contextlib.suppress(Exception):
                local.close()

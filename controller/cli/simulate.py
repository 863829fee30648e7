"""`mineops simulate`: a simulated fleet, meter and price feed for a site file, on its broker."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from controller.catalogue import load_catalogue
from controller.cli.common import (
    EXIT_OK,
    Subparsers,
    add_price_args,
    count,
    positive,
    run_async,
)
from controller.config import SiteConfig
from controller.site_file import ConfigError, describe_validation_error, load_config
from drivers.prices import load_prices

if TYPE_CHECKING:
    from simulators.site import AppliedCommand, SimulatedSite


def add_parser(sub: Subparsers) -> None:
    """Register `simulate`."""
    p = sub.add_parser("simulate", help="run a simulated site (miners, meter, prices)",
                       description="Simulate the fleet in FILE on its broker, for a "
                       "controller to drive.")
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="site TOML file")
    p.add_argument("--no-prices", action="store_true",
                   help="publish no prices (another feed does)")
    p.add_argument("--telemetry-interval", type=positive, default=1.0, metavar="SECONDS",
                   help="period of the telemetry rounds, kept whatever a round takes to "
                   "publish (default 1)")
    p.add_argument("--telemetry", choices=("racked", "per-miner"), default="racked",
                   help="racked: a message per rack, as a bridge sends (default); per-miner: "
                   "a message per miner, as miners that speak MQTT do")
    p.add_argument("--apply-log", type=Path, metavar="FILE",
                   help="append a JSON line per command message applied (kind, seq, miners, "
                   "monotonic received_s and applied_s): for latency measurements")
    p.add_argument("--speed", type=positive, default=1.0,
                   help="simulated seconds per real second (default 1)")
    p.add_argument("--miners", type=count, metavar="N",
                   help="simulate only the first N miners of the fleet")
    p.add_argument("--luxos-api", action="store_true",
                   help="also serve each simulated Antminer's LuxOS API on its own loopback "
                   "address (127.0.0.2, 127.0.0.3, ... port 4028); prints the address map")
    p.add_argument("--luxos-only", action="store_true",
                   help="like --luxos-api, but the miners speak only LuxOS (no MQTT miner "
                   "telemetry or commands): for `mineops bridge` to be their voice")
    add_price_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Simulate until SIGINT/SIGTERM."""
    cfg = load_config(args.config)
    if args.miners is not None:
        cfg = first_miners(cfg, args.miners)
    return run_async(_simulate(cfg, args))


async def _simulate(cfg: SiteConfig, args: argparse.Namespace) -> int:
    from simulators.prices import synthetic_prices  # noqa: PLC0415
    from simulators.site import SimulatedSite  # noqa: PLC0415

    prices = (None if args.no_prices else
              load_prices(args.prices, args.price_column, timezone=args.timezone,
                          settlement_point=args.settlement_point, unit=args.price_unit)
              if args.prices else
              synthetic_prices())
    luxos = args.luxos_api or args.luxos_only
    site = SimulatedSite(cfg, speed=args.speed, prices=prices,
                         telemetry_interval_s=args.telemetry_interval,
                         telemetry_format="miner" if args.telemetry == "per-miner" else "group",
                         miner_mqtt=not args.luxos_only)
    with contextlib.ExitStack() as stack:
        if args.apply_log is not None:
            out = stack.enter_context(args.apply_log.open("a", buffering=1))

            def record(applied: AppliedCommand) -> None:
                out.write(json.dumps(dataclasses.asdict(applied)) + "\n")

            site.on_applied = record
        if not luxos:
            await site.run()
            return EXIT_OK
        await _with_luxos(site, cfg)
    return EXIT_OK


async def _with_luxos(site: SimulatedSite, cfg: SiteConfig) -> None:
    """Run the site with a LuxOS API per simulated miner (prints the address map)."""
    from simulators.luxos_api import LuxosApiServer, address_map_lines  # noqa: PLC0415

    catalogue = load_catalogue()
    api = LuxosApiServer(site.fleet, [catalogue.get(m.model) for m in cfg.inventory])
    await api.start()
    groups: dict[str, list[str]] = {}
    for m in cfg.inventory:
        groups.setdefault(m.group, []).append(m.id)
    print(f"LuxOS API of {len(api.miners)} simulated miners:", flush=True)
    for line in address_map_lines(api, groups):
        print(line, flush=True)
    try:
        await site.run()
    finally:
        await api.close()


def first_miners(cfg: SiteConfig, n: int) -> SiteConfig:
    """The site with only the first `n` miners of its inventory (ids and groups kept)."""
    data = cfg.model_dump(exclude={"fleet", "bridge"})
    kept = cfg.inventory[:n]
    data["fleet"] = {"miners": [m.model_dump() for m in kept]}
    # Grid settings may name racks that are now left out.
    groups = {m.group for m in kept}
    grid = data["grid"]
    grid["keep_alive_groups"] = [g for g in grid["keep_alive_groups"] if g in groups]
    grid["frequency"]["shed_groups"] = [g for g in grid["frequency"]["shed_groups"]
                                        if g in groups]
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"--miners {n}: {describe_validation_error(e)}") from None

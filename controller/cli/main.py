"""The `mineops` command line."""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib
import importlib.metadata
import signal
import sys
import textwrap
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from controller import logs
from controller.catalogue import load_catalogue
from controller.config import (
    ConfigError,
    SiteConfig,
    describe_validation_error,
    format_kw,
    load_config,
)
from controller.demo import add_arguments as demo_arguments
from controller.extras import MissingExtra
from drivers.prices import PriceFileError, dataset_help, load_prices

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

log = structlog.get_logger("mineops.cli")


class StartupError(Exception):
    """The daemon cannot start with this configuration on this machine (exit 2)."""

# Subcommands that live in their own modules: each has `add_parser(subparsers)`, which
# registers a parser with `set_defaults(handler=fn)`, fn(args) -> exit code.
COMMAND_MODULES: tuple[str, ...] = (
    "controller.cli.backtest", "controller.cli.events", "controller.cli.decode",
    "controller.cli.ven", "controller.cli.bridge", "controller.cli.top",
)


def _version() -> str:
    try:
        return importlib.metadata.version("mineops")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help text without breaking names at hyphens (trace names, model keys, topics)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser, with the same help formatting as the top level."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=_HelpFormatter, **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mineops", formatter_class=_HelpFormatter,
        description="Operations controller for Bitcoin mining sites: runs every miner at the "
        "power target that earns the most under the site's power cap and the grid's signals.",
        epilog="Start with `mineops demo`. Docs: README.md and docs/ in the source tree.",
    )
    p.add_argument("--version", action="version", version=f"mineops {_version()}")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="default: info")
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                   help="auto: JSON lines unless stderr is a terminal")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_SubParser)

    run = sub.add_parser("run", help="run the controller daemon against a site's broker",
                         description="Run the controller for the site in FILE until stopped "
                         "(SIGINT/SIGTERM). Metrics on the configured port (default 9108).")
    run.add_argument("--config", type=Path, required=True, metavar="FILE", help="site TOML file")
    run.add_argument("--metrics-port", type=_port, metavar="PORT",
                     help="override [metrics] port")

    sim = sub.add_parser("simulate", help="run a simulated site (miners, meter, prices)",
                         description="Simulate the fleet in FILE on its broker, for a "
                         "controller to drive.")
    sim.add_argument("--config", type=Path, required=True, metavar="FILE", help="site TOML file")
    sim.add_argument("--no-prices", action="store_true",
                     help="publish no prices (another feed does)")
    sim.add_argument("--telemetry-interval", type=_positive, default=1.0, metavar="SECONDS",
                     help="seconds between telemetry rounds, a message per rack (default 1)")
    sim.add_argument("--speed", type=_positive, default=1.0,
                     help="simulated seconds per real second (default 1)")
    sim.add_argument("--miners", type=_count, metavar="N",
                     help="simulate only the first N miners of the fleet")
    sim.add_argument("--luxos-api", action="store_true",
                     help="also serve each simulated Antminer's LuxOS API on its own loopback "
                     "address (127.0.0.2, 127.0.0.3, ... port 4028); prints the address map")
    sim.add_argument("--luxos-only", action="store_true",
                     help="like --luxos-api, but the miners speak only LuxOS (no MQTT miner "
                     "telemetry or commands): for `mineops bridge` to be their voice")
    _price_args(sim)

    demo = sub.add_parser(
        "demo", help="a whole simulated site with its controller, on a local broker",
        description="Start a local MQTT broker (mosquitto if installed, else embedded amqtt) "
        "on 127.0.0.1, a simulated mixed fleet, a site meter, a price replay, the controller "
        "and its metrics endpoint, and show the live site view (as `mineops top` shows a "
        "running site). Ctrl-C stops everything and prints a final summary.")
    demo.add_argument("--miners", type=_count, default=1000, help="fleet size (default 1000)")
    demo.add_argument("--duration", type=_positive, metavar="SECONDS",
                      help="stop after this many seconds and print a summary (default: run "
                      "until Ctrl-C)")
    demo.add_argument("--speed", type=_positive, default=60.0,
                      help="simulated seconds per real second (default 60: a 15-minute price "
                      "interval every 15 s)")
    demo.add_argument("--metrics-port", type=int, default=9108, metavar="PORT",
                      help="Prometheus endpoint port on 127.0.0.1 (default 9108; 0: any free)")
    demo.add_argument("--broker", metavar="HOST:PORT",
                      help="use this broker instead of starting one")
    demo.add_argument("--embedded", choices=["auto", "mosquitto", "amqtt"], default="auto",
                      help="which local broker to start (default auto: mosquitto if installed)")
    _price_args(demo, default="the built-in ercot-hb-south-2024-summer; 'synthetic': a "
                "synthetic week")
    demo_arguments(demo)

    check = sub.add_parser("check-config", help="validate a site file",
                           description="Exit 0 if FILE (with the MINEOPS_* environment) is a "
                           "valid site file for this machine, else print every problem, one "
                           "per line, and exit 2. Also checks the power cap against the "
                           "fleet's draw and that the grid journal can be written; doubtful "
                           "values are printed as warnings.")
    check.add_argument("file", type=Path, metavar="FILE")

    sub.add_parser("models", help="list the miner models the catalogue knows")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return p


def _price_args(p: argparse.ArgumentParser, default: str = "a synthetic week") -> None:
    p.add_argument("--prices", metavar="NAME|FILE",
                   help=f"replay a built-in price trace or a price CSV (default: {default}). "
                   f"Built-in: {dataset_help()}")
    p.add_argument("--price-column", metavar="COLUMN",
                   help="price column in the file (default: the layout's own, e.g. "
                   "SettlementPointPrice, SPP, price_usd_per_mwh; see docs/prices.md)")
    p.add_argument("--timezone", metavar="ZONE",
                   help="IANA time zone of naive times in the price file, e.g. America/Chicago "
                   "(default: the market's when the layout says, e.g. ERCOT's)")
    p.add_argument("--settlement-point", metavar="NAME",
                   help="the settlement point or node to replay from a file holding several, "
                   "e.g. HB_SOUTH")


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run until done; SIGTERM and SIGINT stop it cleanly (last words published, exit 0)."""

    async def main() -> int:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            print("\nstopped", file=sys.stderr)
            return EXIT_OK

    return asyncio.run(main())


async def _run(cfg: SiteConfig) -> int:
    from controller.daemon.loop import Controller  # noqa: PLC0415 - keep `check-config` fast

    controller = Controller(cfg)
    host, port = cfg.metrics.host, cfg.metrics.port
    try:
        server = controller.metrics.serve(host, port)
    except OSError as e:  # in use, not an address of this host, a privileged port, ...
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        why = (e.strerror or str(e)).lower()
        hint = ("set [metrics] port or --metrics-port" if e.errno == errno.EADDRINUSE else
                "check [metrics] host and port")
        raise StartupError(f"metrics endpoint {where}: {why} ({hint})") from None
    try:
        await controller.run()
    finally:
        server.close()
    return EXIT_OK


async def _simulate(cfg: SiteConfig, args: argparse.Namespace) -> int:
    from simulators.prices import synthetic_prices  # noqa: PLC0415
    from simulators.site import SimulatedSite  # noqa: PLC0415

    prices = (None if args.no_prices else
              load_prices(args.prices, args.price_column, timezone=args.timezone,
                          settlement_point=args.settlement_point) if args.prices else
              synthetic_prices())
    if args.miners is not None:
        cfg = _first_miners(cfg, args.miners)
    luxos = args.luxos_api or args.luxos_only
    site = SimulatedSite(cfg, speed=args.speed, prices=prices,
                         telemetry_interval_s=args.telemetry_interval,
                         miner_mqtt=not args.luxos_only)
    if not luxos:
        await site.run()
        return EXIT_OK
    from controller.view.progress import progress  # noqa: PLC0415
    from simulators.luxos_api import LuxosApiServer, address_map_lines  # noqa: PLC0415

    catalogue = load_catalogue()
    api = LuxosApiServer(site.fleet, [catalogue.get(m.model) for m in cfg.inventory])
    with progress("LuxOS APIs", len(api.miners)) as done:
        await api.start(progress=done)
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
    return EXIT_OK


def _first_miners(cfg: SiteConfig, n: int) -> SiteConfig:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The live views own the terminal: only warnings and errors print above them.
    quiet_demo = args.command in ("demo", "top") and args.log_level == "info"
    fmt = {"auto": None, "json": True, "console": False}[args.log_format]
    logs.configure("warning" if quiet_demo else args.log_level, json=fmt)
    try:
        if getattr(args, "handler", None) is not None:
            return int(args.handler(args))
        if args.command == "check-config":
            cfg = load_config(args.file, check_journal=True)
            review = cfg.cap_review()
            print(f"{args.file}: ok: site {cfg.site_id!r}, {len(cfg.inventory)} miners in "
                  f"{len({m.group for m in cfg.inventory})} groups, cap "
                  f"{format_kw(cfg.power_cap_kw)} kW (fleet stock draw "
                  f"{format_kw(review.fleet_stock_kw)} kW incl. "
                  f"{cfg.energy.aux_fraction * 100:.3g} % aux)")
            for warning in review.warnings:
                print(f"{args.file}: warning: {warning}")
            return EXIT_OK
        if args.command == "models":
            catalogue = load_catalogue()
            print(f"{'key':14} {'model':24} {'TH/s':>6} {'W':>6} {'J/TH':>5} "
                  f"{'range W':>11} {'break-even $/MWh @ $40/PH/day':>30}")
            for key, m in catalogue.models.items():
                print(f"{key:14} {m.name:24} {m.nominal_ths:6g} {m.nominal_w:6g} "
                      f"{m.efficiency_j_per_th:5.1f} {m.min_w:5g}-{m.max_w:<5g} "
                      f"{m.breakeven_usd_per_mwh(40.0):30.1f}")
            return EXIT_OK
        if args.command == "run":
            cfg = load_config(args.config, check_journal=True)
            for warning in cfg.cap_review().warnings:
                log.warning("config_warning", file=str(args.config), problem=warning)
            if args.metrics_port is not None:
                metrics = cfg.metrics.model_copy(update={"port": args.metrics_port})
                cfg = cfg.model_copy(update={"metrics": metrics})
            return _run_async(_run(cfg))
        if args.command == "simulate":
            cfg = load_config(args.config)
            return _run_async(_simulate(cfg, args))
        if args.command == "demo":
            from controller.demo import DemoEvent, run_demo  # noqa: PLC0415

            async def demo() -> int:
                result = await run_demo(
                    miners=args.miners, duration_s=args.duration, speed=args.speed,
                    metrics_port=args.metrics_port, broker=args.broker, embedded=args.embedded,
                    prices_file=args.prices, price_column=args.price_column,
                    price_timezone=args.timezone, settlement_point=args.settlement_point,
                    start=args.start,
                    event=None if args.no_event else DemoEvent(at_s=args.event_at),
                )
                if not result.ok:
                    print(f"demo failed: {result.why}", file=sys.stderr)
                return EXIT_OK if result.ok else EXIT_FAIL

            return _run_async(demo())
    except (ConfigError, PriceFileError, StartupError, MissingExtra) as e:
        for line in str(e).splitlines():  # a ConfigError lists every problem, one per line
            print(f"mineops: {line}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"mineops: {e}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_USAGE


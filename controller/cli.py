"""The `mineops` command line."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import faulthandler
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from controller import logs
from controller.catalogue import load_catalogue
from controller.config import ConfigError, SiteConfig, describe_validation_error, load_config
from drivers.price_csv import PriceFileError, load_price_csv

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_STUCK = 3  # a stop signal did not stop the process in time (stacks on stderr)

# A clean stop takes at most about 3 s (the transport's goodbye and disconnect bounds).
# Still running this long after SIGTERM/SIGINT means something swallowed the stop or
# blocks: say where, and exit anyway, inside the 5 s that operators are promised.
STOP_BACKSTOP_S = 4.5

# Subcommands that live in their own modules: each has `add_parser(subparsers)`, which
# registers a parser with `set_defaults(handler=fn)`, fn(args) -> exit code.
COMMAND_MODULES: tuple[str, ...] = (
    "controller.backtest_cli", "controller.events_cli", "controller.decode_cli",
    "controller.ven_cli", "controller.bridge_cli",
)


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mineops",
        description="Operations controller for Bitcoin mining sites: runs every miner at the "
        "power target that earns the most under the site's power cap and the grid's signals.",
        epilog="Start with `mineops demo`. Docs: README.md and docs/ in the source tree.",
    )
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="default: info")
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                   help="auto: JSON lines unless stderr is a terminal")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the controller daemon against a site's broker",
                         description="Run the controller for the site in FILE until stopped "
                         "(SIGINT/SIGTERM). Metrics on the configured port (default 9108).")
    run.add_argument("--config", type=Path, required=True, metavar="FILE", help="site TOML file")
    run.add_argument("--metrics-port", type=int, metavar="PORT",
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
        "and its metrics endpoint, and show a live summary. Ctrl-C stops everything.")
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
    _price_args(demo)

    check = sub.add_parser("check-config", help="validate a site file",
                           description="Exit 0 if FILE is a valid site file, else print what "
                           "is wrong and exit 2.")
    check.add_argument("file", type=Path, metavar="FILE")

    sub.add_parser("models", help="list the miner models the catalogue knows")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return p


def _price_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prices", type=Path, metavar="FILE",
                   help="replay this price CSV (default: a synthetic week)")
    p.add_argument("--price-column", metavar="NAME",
                   help="price column in FILE (default: price_usd_per_mwh or "
                   "hb_south_rtm_spp_usd_mwh)")


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run until done; SIGTERM and SIGINT stop it cleanly (last words published, exit 0).

    A process that is still alive STOP_BACKSTOP_S after the signal prints the stacks of
    its tasks and threads to stderr and exits EXIT_STUCK (see `_stuck`).
    """

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(_DaemonThreadExecutor())
        task = asyncio.ensure_future(coro)
        backstop = threading.Timer(STOP_BACKSTOP_S, _stuck, args=(loop,))
        backstop.daemon = True  # must not itself keep the process alive

        def stop() -> None:
            task.cancel()
            if not backstop.is_alive():
                # Armed until the process exits: asyncio.run's own shutdown (cancelling
                # the remaining tasks) is part of the stop it bounds.
                backstop.start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        try:
            return await task
        except asyncio.CancelledError:
            print("\nstopped", file=sys.stderr)
            return EXIT_OK

    return asyncio.run(main())


class _DaemonThreadExecutor(concurrent.futures.ThreadPoolExecutor):
    """The event loop's default executor, with each call in a daemon thread of its own.

    aiomqtt connects to the broker in the default executor; to a host that drops SYNs
    (switched off, firewalled) that connect blocks for paho's 5 s timeout, and both
    asyncio.run and the interpreter's exit wait for a pool's threads. Daemon threads
    are left behind at exit instead. Calls are rare (connects, name lookups), so a
    thread each costs nothing; a ThreadPoolExecutor in name only because asyncio
    accepts nothing else as the default.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting coroutine, as a pool does
                future.set_exception(e)

        threading.Thread(target=call, name="mineops-executor", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to wait for: the threads are daemons (see the class docstring)."""


def _stuck(loop: asyncio.AbstractEventLoop) -> None:
    """The stop did not finish: show what is still running, then exit without waiting.

    Runs on the backstop's thread, because the event loop may be the thing that is stuck.
    Reading another thread's tasks is not thread-safe, which matters little for a last
    report; the thread dump shows a loop blocked in a call.
    """
    err = sys.stderr
    print(f"\nmineops: still running {STOP_BACKSTOP_S:g} s after the stop signal; "
          "tasks still alive:", file=err)
    try:
        for task in asyncio.all_tasks(loop):
            print(f"--- {task.get_name()} (cancel requests: {task.cancelling()})", file=err)
            task.print_stack(file=err)
    except RuntimeError as e:  # the task set changed under us: the threads still tell
        print(f"(tasks unavailable: {e})", file=err)
    print("threads:", file=err)
    err.flush()
    faulthandler.dump_traceback(file=err, all_threads=True)
    err.flush()
    os._exit(EXIT_STUCK)  # sys.exit would wait for the very tasks and threads that hang


async def _run(cfg: SiteConfig) -> int:
    from controller.daemon import Controller  # noqa: PLC0415 - keep `check-config` fast

    controller = Controller(cfg)
    server = controller.metrics.serve(cfg.metrics.host, cfg.metrics.port)
    try:
        await controller.run()
    finally:
        server.close()
    return EXIT_OK


async def _simulate(cfg: SiteConfig, args: argparse.Namespace) -> int:
    from simulators.prices import synthetic_prices  # noqa: PLC0415
    from simulators.site import SimulatedSite  # noqa: PLC0415

    prices = (None if args.no_prices else
              load_price_csv(args.prices, args.price_column) if args.prices else
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
    quiet_demo = args.command == "demo" and args.log_level == "info"
    fmt = {"auto": None, "json": True, "console": False}[args.log_format]
    logs.configure("warning" if quiet_demo else args.log_level, json=fmt)
    try:
        if getattr(args, "handler", None) is not None:
            return int(args.handler(args))
        if args.command == "check-config":
            cfg = load_config(args.file)
            print(f"{args.file}: ok: site {cfg.site_id!r}, {len(cfg.inventory)} miners in "
                  f"{len({m.group for m in cfg.inventory})} groups, cap {cfg.power_cap_kw:g} kW")
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
            cfg = load_config(args.config)
            if args.metrics_port is not None:
                metrics = cfg.metrics.model_copy(update={"port": args.metrics_port})
                cfg = cfg.model_copy(update={"metrics": metrics})
            return _run_async(_run(cfg))
        if args.command == "simulate":
            cfg = load_config(args.config)
            return _run_async(_simulate(cfg, args))
        if args.command == "demo":
            from controller.demo import run_demo  # noqa: PLC0415

            async def demo() -> int:
                result = await run_demo(
                    miners=args.miners, duration_s=args.duration, speed=args.speed,
                    metrics_port=args.metrics_port, broker=args.broker, embedded=args.embedded,
                    prices_file=args.prices, price_column=args.price_column,
                )
                if not result.ok:
                    print(f"demo failed: {result.why}", file=sys.stderr)
                return EXIT_OK if result.ok else EXIT_FAIL

            return _run_async(demo())
    except (ConfigError, PriceFileError) as e:
        print(f"mineops: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"mineops: {e}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_USAGE


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

"""`mineops run`: the controller daemon for one site, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
from pathlib import Path

import structlog

from controller.cli.common import (
    EXIT_OK,
    Subparsers,
    UsageError,
    endpoint_problem,
    port,
    run_async,
)
from controller.config import SiteConfig
from controller.site_file import load_config

log = structlog.get_logger("mineops.cli")


def add_parser(sub: Subparsers) -> None:
    """Register `run`."""
    p = sub.add_parser("run", help="run the controller daemon against a site's broker",
                       description="Run the controller for the site in FILE until stopped "
                       "(SIGINT/SIGTERM). Metrics on the configured port (default 9108).")
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="site TOML file")
    p.add_argument("--metrics-port", type=port, metavar="PORT", help="override [metrics] port")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Check the site file (and the journal's path), then run the daemon."""
    cfg = load_config(args.config, check_journal=True)
    for warning in cfg.cap_review().warnings:
        log.warning("config_warning", file=str(args.config), problem=warning)
    if args.metrics_port is not None:
        metrics = cfg.metrics.model_copy(update={"port": args.metrics_port})
        cfg = cfg.model_copy(update={"metrics": metrics})
    return run_async(_daemon(cfg))


async def _daemon(cfg: SiteConfig) -> int:
    from controller.daemon.loop import Controller  # noqa: PLC0415 - keep `check-config` fast
    from controller.grid.journal import JournalError  # noqa: PLC0415

    try:
        controller = Controller(cfg)
    except JournalError as e:  # a file SQLite refuses that the path checks could not see
        raise UsageError(f"grid.journal_path: {e}") from None
    host, port_n = cfg.metrics.host, cfg.metrics.port
    try:
        server = controller.metrics.serve(host, port_n)
    except OSError as e:  # in use, not an address of this host, a privileged port, ...
        raise endpoint_problem(e, host, port_n,
                               in_use_hint="set [metrics] port or --metrics-port",
                               other_hint="check [metrics] host and port") from None
    try:
        await controller.run()
    finally:
        server.close()
    return EXIT_OK

"""`mineops run`: the controller daemon for one site, until SIGINT/SIGTERM.

Start order, so that a start that cannot go ahead changes nothing: the site file, then
the journal's lock (one controller per journal: a second one would fight the first for
the broker's client id and write the same journal), then the metrics port, then the
journal's own checks, and only then the controller, which opens and resumes the journal.
"""

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
from controller.grid.journal import JournalError, JournalLock, JournalLocked, lock_journal
from controller.site_file import (
    ConfigError,
    journal_path_problem,
    journal_path_warnings,
    load_config,
)

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
    """Check the site file, lock its journal, then run the daemon.

    Raises:
        ConfigError: the site file (or its journal's path) is not good to run.
        UsageError: another controller holds the journal, or the metrics port cannot
            be bound.
    """
    try:
        cfg = load_config(args.config)
    except ConfigError:
        # Every problem at once, the journal path's among them, as check-config lists them.
        load_config(args.config, check_journal=True)
        raise
    for warning in [*cfg.cap_review().warnings, *journal_path_warnings(cfg.grid.journal_path)]:
        log.warning("config_warning", file=str(args.config), problem=warning)
    if args.metrics_port is not None:
        metrics = cfg.metrics.model_copy(update={"port": args.metrics_port})
        cfg = cfg.model_copy(update={"metrics": metrics})
    lock = _lock(cfg, args.config)
    try:
        return run_async(_daemon(cfg, args.config))
    finally:
        lock.release()


def _lock(cfg: SiteConfig, config: Path) -> JournalLock:
    """The journal's lock for this process's life, before anything else is opened."""
    path = cfg.grid.journal_path
    holder = f"mineops run --config {Path(config).absolute()}, site {cfg.site_id!r}"
    try:
        return lock_journal(path, holder=holder)
    except JournalError as e:
        if isinstance(e, JournalLocked):
            raise UsageError(f"grid.journal_path: {e}") from None
        # A place the lock file cannot go: the path check says why in the operator's terms.
        why = journal_path_problem(path)
        raise ConfigError(f"{config}: grid.journal_path: {why or e}") from None


async def _daemon(cfg: SiteConfig, config: Path) -> int:
    from controller.daemon.loop import Controller  # noqa: PLC0415 - keep `check-config` fast
    from controller.daemon.metrics import Metrics  # noqa: PLC0415

    host, port_n = cfg.metrics.host, cfg.metrics.port
    metrics = Metrics()
    try:
        server = metrics.serve(host, port_n)
    except OSError as e:  # in use, not an address of this host, a privileged port, ...
        raise endpoint_problem(e, host, port_n,
                               in_use_hint="set [metrics] port or --metrics-port",
                               other_hint="check [metrics] host and port") from None
    try:
        why = journal_path_problem(cfg.grid.journal_path)
        if why is not None:
            raise ConfigError(f"{config}: grid.journal_path: {why}")
        try:
            controller = Controller(cfg, metrics=metrics)
        except JournalError as e:  # a file SQLite refuses that the path checks could not see
            raise UsageError(f"grid.journal_path: {e}") from None
        await controller.run()
    finally:
        server.close()
    return EXIT_OK

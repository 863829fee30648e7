"""The `mineops` command line: the explicit list of subcommands, logging, and error exits."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from controller import logs
from controller.cli import (
    backtest,
    bridge,
    check_config,
    decode,
    demo,
    events,
    models,
    run,
    simulate,
    top,
    ven,
)
from controller.cli.common import (
    EXIT_FAIL,
    EXIT_USAGE,
    HelpFormatter,
    UsageError,
    invalid_input,
)
from controller.extras import MissingExtra
from controller.site_file import ConfigError
from drivers.prices import PriceFileError

# Every subcommand, in the order `mineops --help` lists them. Each module registers its
# parser with a handler; heavy libraries load inside the handlers, so `--help` is quick.
COMMANDS: tuple[ModuleType, ...] = (
    run, simulate, demo, top, check_config, models, backtest, events, decode, ven, bridge,
)


def _version() -> str:
    try:
        return importlib.metadata.version("mineops")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser, with the same help formatting as the top level."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=HelpFormatter, **kwargs)


def parser() -> argparse.ArgumentParser:
    """The whole command line."""
    p = argparse.ArgumentParser(
        prog="mineops", formatter_class=HelpFormatter,
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
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `mineops` command; its exit code (0 ok, 1 failed, 2 a usage problem)."""
    args = parser().parse_args(argv)
    # A live view owns the terminal: at the default level its logs would garble it.
    quiet = getattr(args, "quiet_logs", False) and args.log_level == "info"
    fmt = {"auto": None, "json": True, "console": False}[args.log_format]
    logs.configure("warning" if quiet else args.log_level, json=fmt)
    try:
        return int(args.handler(args))
    except (ConfigError, PriceFileError, UsageError, MissingExtra) as e:
        for line in str(e).splitlines():  # a ConfigError lists every problem, one per line
            print(f"mineops: {line}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as e:  # input a command passed to a model unchecked
        print(f"mineops: invalid input: {invalid_input(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"mineops: {e}", file=sys.stderr)
        return EXIT_FAIL

"""What every `mineops` subcommand shares: exit codes, argument types, price options, the runner.

A subcommand module has `add_parser(subparsers)`, which registers its parser with
`set_defaults(handler=run)`, and `run(args) -> exit code`; `controller.cli.main` lists
the modules. Errors a person can fix (a bad site file, a price file, a port in use)
are raised as `UsageError`s (or the config and price errors) and printed by `main`,
one line each, with exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import textwrap
from collections.abc import Coroutine
from typing import Any

from drivers.prices import dataset_help

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

Subparsers = Any  # argparse's _SubParsersAction is private; its add_parser is what is used


class UsageError(Exception):
    """Something the operator can fix in the command or its configuration (exit 2)."""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps help text without breaking names at hyphens (trace names, model keys, topics)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free) to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {text}")
    return value


def positive(text: str) -> float:
    """argparse type: a number above 0."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def count(text: str) -> int:
    """argparse type: a whole number, at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_price_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """The price-file options (`--prices`, `--price-column`, `--timezone`, `--settlement-point`)."""
    p.add_argument("--prices", metavar="NAME|FILE", required=required,
                   help="a built-in price trace or a price file" +
                   ("" if required else " (default: a synthetic week)") +
                   f". Built-in: {dataset_help()}. Formats: docs/prices.md")
    p.add_argument("--price-column", metavar="COLUMN",
                   help="price column in the file (default: the layout's own, e.g. "
                   "SettlementPointPrice, SPP, price_usd_per_mwh; see docs/prices.md)")
    p.add_argument("--timezone", metavar="ZONE",
                   help="IANA time zone of naive times in the price file, e.g. America/Chicago "
                   "(default: the market's when the layout says, e.g. ERCOT's)")
    p.add_argument("--settlement-point", metavar="NAME",
                   help="the settlement point or node to replay from a file holding several, "
                   "e.g. HB_SOUTH")


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run a daemon's coroutine until done; SIGTERM and SIGINT stop it cleanly (exit 0)."""

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

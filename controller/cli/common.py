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
import concurrent.futures
import errno
import faulthandler
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from pydantic import ValidationError

from controller.site_file import validation_problem
from drivers.prices import PRICE_UNITS, dataset_help

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_STUCK = 3  # a stop signal did not stop the process in time (stacks on stderr)

# A clean stop takes at most about 3 s (the transport's goodbye and disconnect bounds).
# Still running this long after SIGTERM/SIGINT means something swallowed the stop or
# blocks: say where, and exit anyway, inside the 5 s that operators are promised.
STOP_BACKSTOP_S = 4.5

Subparsers = Any  # argparse's _SubParsersAction is private; its add_parser is what is used


class UsageError(Exception):
    """Something the operator can fix in the command or its configuration (exit 2)."""


def endpoint_problem(e: OSError, host: str, port: int, *, in_use_hint: str,
                     other_hint: str) -> UsageError:
    """A listening socket that could not be bound, in one line.

    The line names the address and the option that moves it: "metrics endpoint
    127.0.0.1:9108: address already in use (...)".

    `in_use_hint` is said when the port is taken, `other_hint` otherwise (not an address
    of this host, a privileged port, ...).
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    why = (e.strerror or str(e)).lower()
    hint = in_use_hint if e.errno == errno.EADDRINUSE else other_hint
    return UsageError(f"metrics endpoint {where}: {why} ({hint})")


def invalid_input(e: ValidationError, options: Mapping[str, str] | None = None) -> str:
    """A pydantic error as one line for an operator: "--value-kw: must be >= 0 (got -5)".

    `options` maps a model's field names to the command-line options that set them
    (value_kw -> --value-kw), so the message names what the operator typed. Several
    errors are joined with "; ". The one place the CLI turns a ValidationError into words.
    """
    names = options or {}
    parts = []
    for err in e.errors():
        loc = tuple(err["loc"])
        named = {**err, "loc": (names[str(loc[0])], *loc[1:])} \
            if loc and str(loc[0]) in names else err
        parts.append(validation_problem(named))
    return "; ".join(parts)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps help text without breaking names at hyphens (trace names, model keys, topics)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def port(text: str) -> int:
    """A TCP port, 0 (any free) to 65535 (an argparse type)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {text}")
    return value


def positive(text: str) -> float:
    """A number above 0 (an argparse type)."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def count(text: str) -> int:
    """A whole number, at least 1 (an argparse type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_price_args(p: argparse.ArgumentParser, *, default: str | None = "a synthetic week"
                   ) -> None:
    """Add the price-file options to `p`.

    They are `--prices`, `--price-column`, `--timezone`, `--settlement-point` and
    `--price-unit`. `default` says what runs without `--prices`; None makes `--prices` required.
    """
    p.add_argument("--prices", metavar="NAME|FILE", required=default is None,
                   help="a built-in price trace or a price file" +
                   ("" if default is None else f" (default: {default})") +
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
    p.add_argument("--price-unit", metavar="UNIT", choices=sorted(PRICE_UNITS),
                   help="the unit of the file's prices, converted to $/MWh: "
                   f"{', '.join(PRICE_UNITS)} (default: $/MWh, and a file that looks like "
                   "another unit is an error)")


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run a daemon's coroutine until done; SIGTERM and SIGINT stop it cleanly (exit 0).

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
        """Run `fn` in a new daemon thread; its result or exception on the future."""
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

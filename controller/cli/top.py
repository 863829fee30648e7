"""`mineops top`: the live view of a running site, from its retained decision topic.

Subscribes to `mineops/<site>/controller/decision` (the `DecisionSummary` the daemon
retains after every decision) and `mineops/<site>/controller/availability`, and renders
the same view as `mineops demo` (`controller.view`): the site clock (the controller's:
a demo's simulated clock when the summary carries it), power against the cap
in force and why, the price in force and its parts, hashrate, miners by state and reason.
Needs only read access to those two topics, so an operator on site can watch
`mineops run` from a laptop. `--once` prints the current decision and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import structlog

from controller.catalogue import MinerModel, load_catalogue
from controller.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, Subparsers
from controller.config import BrokerConfig
from controller.logs import LogLimiter
from controller.protocol.payloads import DecisionSummary, PayloadError
from controller.protocol.topics import OFFLINE, ONLINE, SiteTopics
from controller.site_file import load_config
from controller.view.clock import SiteClock, zone
from controller.view.site import STALE_AFTER_S, SiteView, format_ago, read_summary

if TYPE_CHECKING:  # the screen is imported when `top` runs, as the transport is
    from controller.view.screen import Screen

log = structlog.get_logger("mineops.top")


def add_parser(sub: Subparsers) -> None:
    """Register `top` on the CLI's subparsers."""
    p = sub.add_parser(
        "top", help="live view of a running site (its controller's decisions)",
        description="Show the live view of a running site: read the retained decision "
        "summary its controller publishes on mineops/<site>/controller/decision and redraw "
        "it on every decision (on a pipe: a line whenever something changes). Ctrl-C stops.",
        epilog="Either --config FILE (broker, login and TLS from the site file; break-even "
        "prices of its models) or --broker HOST:PORT --site ID. See docs/operating.md.")
    p.add_argument("--config", type=Path, metavar="FILE", help="site TOML file")
    p.add_argument("--broker", metavar="HOST:PORT",
                   help="the site's MQTT broker, without a site file (no login, no TLS)")
    p.add_argument("--site", metavar="ID", help="site id, with --broker")
    p.add_argument("--timezone", metavar="ZONE",
                   help="show the site clock in this IANA zone, e.g. America/Chicago "
                   "(default: the zone the controller names, a demo's price zone, else this "
                   "machine's)")
    p.add_argument("--once", action="store_true",
                   help="print the current decision and exit: 0 if an online controller's, "
                   "1 if none arrives in --wait (the broker unreachable, or no decision) or "
                   "the controller is OFFLINE or not deciding")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="with --once: how long to wait for the retained decision (default 10)")
    p.set_defaults(handler=run, quiet_logs=True)


@dataclass
class TopState:
    """What `top` has read so far."""

    summary: DecisionSummary | None = None
    controller_online: bool | None = None
    unreadable: int = 0
    ignored_fields: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    link_problem: str | None = None  # why the broker cannot be reached, while it cannot


def make_handler(topics: SiteTopics, state: TopState, limiter: LogLimiter | None = None
                 ) -> Callable[[str, bytes], None]:
    """The MQTT message handler: decision summaries and controller availability."""
    limits = limiter or LogLimiter()

    def on_message(topic: str, raw: bytes) -> None:
        if topic == topics.controller_availability:
            text = raw.decode(errors="replace").strip()
            state.controller_online = True if text == ONLINE else (
                False if text == OFFLINE else state.controller_online)
            state.changed.set()
            return
        if topic != topics.decision:
            return
        try:
            summary, unknown = read_summary(raw)
        except PayloadError as e:
            # A bad summary is counted and shown; the view keeps the last good one.
            state.unreadable += 1
            suppressed = limits.allow("decision", e.reason)
            if suppressed is not None:
                log.warning("decision_summary_unreadable", reason=e.reason, detail=e.detail,
                            topic=topic, suppressed_since_last=suppressed)
            return
        new = set(unknown) - state.ignored_fields
        if new:
            log.info("decision_summary_fields_ignored", fields=sorted(new),
                     hint="a newer controller; upgrade mineops to see them")
            state.ignored_fields |= new
        state.summary = summary
        state.changed.set()

    return on_message


def _models(cfg_models: list[str]) -> dict[str, MinerModel]:
    catalogue = load_catalogue()
    return {k: catalogue.get(k) for k in sorted(set(cfg_models))}


# Before the first connection attempt has had a chance, not reaching the broker is no news.
LINK_GRACE_S = 1.5
LINK_PROBE_EVERY_S = 2.0


async def broker_problem(host: str, port: int, timeout_s: float = 3.0) -> str:
    """Why the broker at host:port gives no MQTT session, as far as a TCP connect tells.

    "127.0.0.1:1: connection refused", "no answer from ... within 3 s", or, when TCP
    connects, that the MQTT session itself failed (login, TLS, not a broker's port).
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return f"no answer from {where} within {timeout_s:g} s"
    except OSError as e:  # asyncio words it "Connect call failed (...)": the errno says more
        return f"{where}: {(os.strerror(e.errno) if e.errno else str(e)).lower()}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return (f"{where} takes TCP connections but gave no MQTT session (login, TLS, or not "
            "an MQTT port?)")


def not_deciding(view: SiteView) -> str | None:
    """Why the view's figures are not a live controller's (OFFLINE, stale), or None."""
    if view.controller_online is False:
        return "the controller is OFFLINE (its last will, or a clean stop): figures are old"
    age = view.age_s()
    if age is not None and age > STALE_AFTER_S:
        return f"the last decision is {format_ago(age)} old: the controller is not deciding"
    return None


async def watch(broker: BrokerConfig, site_id: str, *, tz: tzinfo, out: TextIO,
                models: dict[str, MinerModel], once: bool = False, wait_s: float = 10.0,
                stop: asyncio.Event | None = None, tz_given: bool = False,
                aux_fraction: float = 0.0) -> int:
    """Show the site's live view on `out` until `stop` is set (or, `once`, one decision).

    Times are on the controller's site clock (a demo's is simulated), in the zone the
    summary names unless `tz_given` (--timezone), else in `tz`. `aux_fraction` is the
    site's, for the break-even prices. While the broker cannot be reached the view says
    why. Exit code with `once`: 0 for a current decision of an online controller, 1 when
    none was read (the broker unreachable, or no decision) or the controller is OFFLINE
    or not deciding (its figures are old).
    """
    from controller.protocol.transport import Transport  # noqa: PLC0415 - aiomqtt when used
    from controller.view.screen import Screen  # noqa: PLC0415

    topics = SiteTopics(site_id)
    state = TopState()
    transport = Transport(broker, client_id=f"mineops-top-{os.getpid()}",
                          subscriptions=[topics.decision, topics.controller_availability])
    source = f"broker {broker.host}:{broker.port}"
    stopping = stop or asyncio.Event()

    def view() -> SiteView:
        # The controller's own site clock (a demo's simulated one), not this machine's.
        clock = SiteClock.of_summary(state.summary, tz, tz_given=tz_given)
        return SiteView(site_id, state.summary, clock, time.time(), models=models,
                        controller_online=state.controller_online, source=source,
                        aux_fraction=aux_fraction, link=state.link_problem)

    task = asyncio.create_task(transport.run(make_handler(topics, state)), name="top-mqtt")
    link = asyncio.create_task(_watch_link(broker, transport.connected, state), name="top-link")
    screen = Screen(out)
    try:
        if once:
            if not await _first_decision(broker, transport.connected, state, wait_s=wait_s,
                                         topic=topics.decision, source=source):
                return EXIT_FAIL
            # The availability message is retained too: give it a moment to arrive.
            await asyncio.sleep(0.2)
            return _show_once(screen, view())
        with screen:
            await _redraw_until(stopping, screen, state, view)
        screen.final(f"mineops top: site {site_id}, stopped", view())
        if state.unreadable:
            screen.write(f"{state.unreadable} unreadable decision summaries were skipped")
        return EXIT_OK
    finally:
        for t in (link, task):
            t.cancel()
        await asyncio.gather(link, task, return_exceptions=True)


async def _watch_link(broker: BrokerConfig, connected: asyncio.Event, state: TopState) -> None:
    """Keep `state.link_problem` saying why the broker is unreachable, while it is.

    `connected` is the transport's: set while its MQTT session is up. Runs until cancelled,
    probing every LINK_PROBE_EVERY_S after LINK_GRACE_S; sets `state.changed` when the
    problem changes.
    """
    await asyncio.sleep(LINK_GRACE_S)
    while True:
        problem = None
        if not connected.is_set():
            why = await broker_problem(broker.host, broker.port)
            if not connected.is_set():
                problem = f"cannot reach the broker: {why}; retrying"
        if problem != state.link_problem:
            state.link_problem = problem
            state.changed.set()
        await asyncio.sleep(LINK_PROBE_EVERY_S)


async def _first_decision(broker: BrokerConfig, connected: asyncio.Event, state: TopState, *,
                          wait_s: float, topic: str, source: str) -> bool:
    """Wait up to `wait_s` for a decision summary in `state`; whether one arrived.

    When none did, says why on stderr: the broker out of reach (`connected` is the
    transport's), else no decision on `topic` although `source` was reached.
    """
    try:
        async with asyncio.timeout(wait_s):
            while state.summary is None:
                state.changed.clear()
                await state.changed.wait()
    except TimeoutError:
        if not connected.is_set():
            why = await broker_problem(broker.host, broker.port)
            print(f"mineops: cannot reach the broker: {why} (no decision read in "
                  f"{wait_s:g} s)", file=sys.stderr)
        else:
            print(f"mineops: no decision on {topic} within {wait_s:g} s "
                  f"({source} reached; is the controller running, is the site id "
                  "right?)", file=sys.stderr)
        return False
    return True


def _show_once(screen: Screen, shown: SiteView) -> int:
    """`--once`: print the view (the panel on a terminal, else its line); the exit code.

    EXIT_OK for a live controller's decision; EXIT_FAIL, with the reason on stderr, when
    the controller is OFFLINE or not deciding (`not_deciding`).
    """
    if screen.tty:
        screen.print(shown.render())
    else:
        screen.write(shown.line())
    why_old = not_deciding(shown)
    if why_old is not None:
        print(f"mineops: {why_old}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


async def _redraw_until(stopping: asyncio.Event, screen: Screen, state: TopState,
                        view: Callable[[], SiteView]) -> None:
    """Show `view()` on `screen` on every change of `state`, and every second, until `stopping`."""
    while not stopping.is_set():
        screen.show(view())
        state.changed.clear()
        # Redraw on every decision, and every second for the ages on a terminal.
        waiter = asyncio.ensure_future(state.changed.wait())
        stopper = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({waiter, stopper}, timeout=1.0,
                           return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()


def _target(args: argparse.Namespace
            ) -> tuple[BrokerConfig, str, dict[str, MinerModel], float]:
    """(broker, site id, the fleet's models, the site's aux fraction) from the options."""
    if args.config is not None:
        if args.broker or args.site:
            raise ValueError("--config, or --broker and --site, not both")
        cfg = load_config(args.config)
        return (cfg.broker, cfg.site_id, _models([m.model for m in cfg.inventory]),
                cfg.energy.aux_fraction)
    if not (args.broker and args.site):
        raise ValueError("give --config FILE, or --broker HOST:PORT and --site ID")
    host, sep, port = args.broker.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--broker {args.broker!r}: expected HOST:PORT")
    return BrokerConfig(host=host or "127.0.0.1", port=int(port)), args.site, {}, 0.0


def run(args: argparse.Namespace) -> int:
    """Handler of `mineops top`; ConfigError reaches the CLI's main."""
    try:
        broker, site_id, models, aux_fraction = _target(args)
        tz = zone(args.timezone)
        SiteTopics(site_id)
    except ValueError as e:
        print(f"mineops: {e}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await watch(broker, site_id, tz=tz, out=sys.stdout, models=models,
                           once=args.once, wait_s=args.wait, stop=stop,
                           tz_given=args.timezone is not None, aux_fraction=aux_fraction)

    return asyncio.run(main())

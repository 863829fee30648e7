"""`mineops demo`: a whole simulated site and its controller on a local broker."""

from __future__ import annotations

import argparse
import sys

from controller.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    Subparsers,
    add_price_args,
    count,
    endpoint_problem,
    port,
    positive,
    run_async,
)
from controller.demo import add_arguments as add_demo_arguments


def add_parser(sub: Subparsers) -> None:
    """Register `demo`."""
    p = sub.add_parser(
        "demo", help="a whole simulated site with its controller, on a local broker",
        description="Start a local MQTT broker (mosquitto if installed, else embedded amqtt) "
        "on 127.0.0.1, a simulated mixed fleet, a site meter, a price replay, the controller "
        "and its metrics endpoint, and show the live site view (as `mineops top` shows a "
        "running site). Ctrl-C stops everything and prints a final summary.")
    p.add_argument("--miners", type=count, default=1000, help="fleet size (default 1000)")
    p.add_argument("--duration", type=positive, metavar="SECONDS",
                   help="stop after this many seconds and print a summary (default: run "
                   "until Ctrl-C)")
    p.add_argument("--speed", type=positive, default=60.0,
                   help="simulated seconds per real second (default 60: a 15-minute price "
                   "interval every 15 s)")
    p.add_argument("--metrics-port", type=port, default=9108, metavar="PORT",
                   help="Prometheus endpoint port on 127.0.0.1 (default 9108; 0: any free)")
    p.add_argument("--broker", metavar="HOST:PORT",
                   help="use this broker instead of starting one")
    p.add_argument("--embedded", choices=["auto", "mosquitto", "amqtt"], default="auto",
                   help="which local broker to start (default auto: mosquitto if installed)")
    add_price_args(p, default="the built-in ercot-hb-south-2024-summer; 'synthetic': a "
                   "synthetic week")
    add_demo_arguments(p)
    p.set_defaults(handler=run, quiet_logs=True)


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit 1 if the site did not work (miners silent, no decisions)."""
    from controller.demo import (  # noqa: PLC0415 - the simulators load slowly
        DemoEvent,
        MetricsEndpointError,
        run_demo,
    )

    async def demo() -> int:
        try:
            result = await run_demo(
                miners=args.miners, duration_s=args.duration, speed=args.speed,
                metrics_port=args.metrics_port, broker=args.broker, embedded=args.embedded,
                prices_file=args.prices, price_column=args.price_column,
                price_timezone=args.timezone, settlement_point=args.settlement_point,
                price_unit=args.price_unit, start=args.start,
                event=None if args.no_event else DemoEvent(at_s=args.event_at),
                campus=args.campus,
            )
        except MetricsEndpointError as e:
            raise endpoint_problem(
                e.error, e.host, e.port,
                in_use_hint="--metrics-port PORT for another, 0 for any free one",
                other_hint="--metrics-port PORT for another") from None
        if not result.ok:
            print(f"demo failed: {result.why}", file=sys.stderr)
        return EXIT_OK if result.ok else EXIT_FAIL

    return run_async(demo())

"""`mineops ven`: run the site's OpenADR 2.0b VEN, bridging a utility's VTN to the site's MQTT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from controller.config import load_config

EXIT_OK, EXIT_USAGE = 0, 2


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ven", help="run the OpenADR 2.0b VEN: utility events in, site power reports out",
        description="Register with the VTN of the site's [openadr] table, poll it, and publish "
        "each demand-response event as a GridEvent on mineops/<site>/signal/grid (QoS 1, "
        "retained) for the controller; SIMPLE levels 1-3 become the site targets level_N_kw, "
        "LOAD_DISPATCH setpoints are site targets. Opts in or out per `opt_in`. Reports the site "
        "meters' latest power (mineops/<site>/meter/+/telemetry) to the VTN as real power in W. "
        "Runs until SIGINT/SIGTERM.",
        epilog="Example table and field reference: docs/openadr.md.")
    p.add_argument("--config", type=Path, required=True, metavar="FILE",
                   help="site TOML file with an [openadr] table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if cfg.openadr is None:
        print(f"mineops: {args.config}: no [openadr] table; add one with vtn_url, ven_name and "
              "level_1_kw..level_3_kw (see docs/openadr.md)", file=sys.stderr)
        return EXIT_USAGE
    from controller.extras import require  # noqa: PLC0415

    require("ven", "mineops ven")
    from drivers.openadr.ven import OpenAdrVen  # noqa: PLC0415 - keep `mineops --help` fast

    debug = getattr(args, "log_level", "info") == "debug"
    ven = OpenAdrVen(cfg, openleadr_log_level=logging.DEBUG if debug else logging.WARNING)

    async def main() -> int:
        task = asyncio.ensure_future(ven.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            print("\nstopped", file=sys.stderr)
        return EXIT_OK

    return asyncio.run(main())

"""`mineops ven`: run the site's OpenADR 2.0b VEN, bridging a utility's VTN to the site's MQTT."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from controller.cli.common import EXIT_OK, Subparsers, UsageError, run_async
from controller.site_file import load_config


def add_parser(sub: Subparsers) -> None:
    """Register `ven`."""
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
    """Run the VEN until SIGINT/SIGTERM."""
    cfg = load_config(args.config)
    if cfg.openadr is None:
        raise UsageError(f"{args.config}: no [openadr] table; add one with vtn_url, ven_name "
                         "and level_1_kw..level_3_kw (see docs/openadr.md)")
    from controller.extras import require  # noqa: PLC0415

    require("ven", "mineops ven")
    from drivers.openadr.ven import OpenAdrVen  # noqa: PLC0415 - keep `mineops --help` fast

    debug = getattr(args, "log_level", "info") == "debug"
    ven = OpenAdrVen(
        cfg.openadr, site_id=cfg.site_id, broker=cfg.broker,
        site_meter_ids=[m.id for m in cfg.meters if m.type == "mineops" and m.role == "site"],
        openleadr_log_level=logging.DEBUG if debug else logging.WARNING)

    async def main() -> int:
        await ven.run()
        return EXIT_OK

    return run_async(main())

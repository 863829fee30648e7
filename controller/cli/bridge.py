"""`mineops bridge`: poll real miners over their firmware APIs and speak for them on MQTT."""

from __future__ import annotations

import argparse
from pathlib import Path

from controller.cli.common import EXIT_OK, Subparsers, UsageError, run_async
from controller.site_file import load_config


def add_parser(sub: Subparsers) -> None:
    """Register `bridge`."""
    p = sub.add_parser(
        "bridge", help="bridge real miners (LuxOS, Braiins OS, Antminer, Whatsminer, VNish)",
        description="Poll the miners of the site file's [bridge] table over their firmware "
        "APIs (through pyasic), publish their telemetry and availability, and apply the "
        "controller's commands to them, until stopped (SIGINT/SIGTERM).")
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="site TOML file")
    p.add_argument("--groups", metavar="G1,G2",
                   help="bridge only these groups (to split a site over several processes)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Bridge the site's miners until SIGINT/SIGTERM."""
    from controller.extras import require  # noqa: PLC0415

    require("bridge", "mineops bridge")
    from drivers.firmware.bridge import MinerBridge  # noqa: PLC0415 - pyasic is slow to import

    cfg = load_config(args.config)
    if cfg.bridge is None:
        raise UsageError(f"{args.config}: no [bridge] table (see docs/bridge.md)")
    groups = {g.strip() for g in args.groups.split(",") if g.strip()} if args.groups else None
    known = {m.group for m in cfg.inventory}
    if groups is not None and not groups <= known:
        raise UsageError(f"unknown group(s) {', '.join(sorted(groups - known))}")
    bridge = MinerBridge(cfg.bridge, site_id=cfg.site_id, broker=cfg.broker,
                         inventory=cfg.inventory, groups=groups)
    if not bridge.devices:
        raise UsageError("no bridged miners in those groups")
    print(f"bridging {len(bridge.devices)} miners in {len(bridge.groups)} groups for site "
          f"{cfg.site_id!r}, polling every {cfg.bridge.poll_interval_s:g} s", flush=True)
    from controller.view.progress import JobProgress  # noqa: PLC0415

    # The first poll of a large site (identifying every miner) takes a while: show it.
    bridge.first_poll_progress = JobProgress("first poll", len(bridge.devices))

    async def main() -> int:
        await bridge.run()
        return EXIT_OK

    return run_async(main())

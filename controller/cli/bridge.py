"""`mineops bridge`: poll real miners over their firmware APIs and speak for them on MQTT."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from controller.config import load_config


def add_parser(sub: Any) -> None:
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
    from controller.cli.main import _run_async  # noqa: PLC0415 - cli imports this module
    from controller.extras import require  # noqa: PLC0415

    require("bridge", "mineops bridge")
    from drivers.firmware.bridge import MinerBridge  # noqa: PLC0415 - pyasic is slow to import

    cfg = load_config(args.config)
    if cfg.bridge is None:
        print(f"mineops: {args.config}: no [bridge] table (see docs/bridge.md)",
              file=sys.stderr)
        return 2
    groups = {g.strip() for g in args.groups.split(",") if g.strip()} if args.groups else None
    known = {m.group for m in cfg.inventory}
    if groups is not None and not groups <= known:
        print(f"mineops: unknown group(s) {', '.join(sorted(groups - known))}", file=sys.stderr)
        return 2
    bridge = MinerBridge(cfg, groups=groups)
    if not bridge.devices:
        print("mineops: no bridged miners in those groups", file=sys.stderr)
        return 2
    print(f"bridging {len(bridge.devices)} miners in {len(bridge.groups)} groups for site "
          f"{cfg.site_id!r}, polling every {cfg.bridge.poll_interval_s:g} s", file=sys.stderr)
    from controller.view.progress import JobProgress  # noqa: PLC0415

    # The first poll of a large site (identifying every miner) takes a while: show it.
    bridge.first_poll_progress = JobProgress("first poll", len(bridge.devices))

    async def main() -> int:
        await bridge.run()
        return 0

    return _run_async(main())

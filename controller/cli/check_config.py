"""`mineops check-config`: is a site file (with its MINEOPS_* environment) good to run?"""

from __future__ import annotations

import argparse
from pathlib import Path

from controller.campus_config import campus_review
from controller.cli.common import EXIT_OK, Subparsers
from controller.config_types import format_kw
from controller.site_file import journal_path_warnings, load_config


def add_parser(sub: Subparsers) -> None:
    """Register `check-config`."""
    p = sub.add_parser("check-config", help="validate a site file",
                       description="Exit 0 if FILE (with the MINEOPS_* environment) is a "
                       "valid site file for this machine, else print every problem, one "
                       "per line, and exit 2. Also checks the power cap against the "
                       "fleet's draw and that the grid journal can be written (a relative "
                       "journal path is a warning: it depends on the directory); doubtful "
                       "values are printed as warnings.")
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Print `ok` with the cap against the fleet's draw, then any warnings."""
    cfg = load_config(args.file, check_journal=True)
    review = cfg.cap_review()
    print(f"{args.file}: ok: site {cfg.site_id!r}, {len(cfg.inventory)} miners in "
          f"{len({m.group for m in cfg.inventory})} groups, cap "
          f"{format_kw(cfg.power_cap_kw)} kW (fleet stock draw "
          f"{format_kw(review.fleet_stock_kw)} kW incl. "
          f"{cfg.energy.aux_fraction * 100:.3g} % aux)")
    warnings = [*review.warnings, *journal_path_warnings(cfg.grid.journal_path)]
    if cfg.campus is not None:
        warnings += campus_review(cfg.campus, cfg.meters, cfg.power_cap_kw).warnings
    for warning in warnings:
        print(f"{args.file}: warning: {warning}")
    return EXIT_OK

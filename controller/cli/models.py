"""`mineops models`: the miner-model catalogue, with each model's break-even price."""

from __future__ import annotations

import argparse

from controller.catalogue import load_catalogue
from controller.cli.common import EXIT_OK, Subparsers

HASHPRICE_USD_PER_PH_DAY = 40.0  # the break-even column's hashprice


def add_parser(sub: Subparsers) -> None:
    """Register `models`."""
    p = sub.add_parser("models", help="list the miner models the catalogue knows")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """One line per model: stock hashrate and power, efficiency, range, break-even."""
    catalogue = load_catalogue()
    hp = HASHPRICE_USD_PER_PH_DAY
    print(f"{'key':14} {'model':24} {'TH/s':>6} {'W':>6} {'J/TH':>5} "
          f"{'range W':>11} {f'break-even $/MWh @ ${hp:g}/PH/day':>30}")
    for key, m in catalogue.models.items():
        print(f"{key:14} {m.name:24} {m.nominal_ths:6g} {m.nominal_w:6g} "
              f"{m.efficiency_j_per_th:5.1f} {m.min_w:5g}-{m.max_w:<5g} "
              f"{m.breakeven_usd_per_mwh(hp):30.1f}")
    return EXIT_OK

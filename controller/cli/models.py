"""`mineops models`: the miner-model catalogue, with each model's break-even price."""

from __future__ import annotations

import argparse
from pathlib import Path

from controller.catalogue import breakeven_label, load_catalogue
from controller.cli.common import EXIT_OK, Subparsers, positive
from controller.site_file import load_config


def add_parser(sub: Subparsers) -> None:
    """Register `models`."""
    p = sub.add_parser(
        "models", help="list the miner models the catalogue knows",
        description="One line per model: stock hashrate and power, efficiency, power-target "
        "range and, with a site's hashprice, the break-even all-in price at stock (the one "
        "the live view and the backtest show).")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="site TOML file: break-even at its hashprice and aux fraction")
    p.add_argument("--hashprice", type=positive, metavar="USD_PER_PH_DAY",
                   help="break-even at this hashprice (overrides the site file's)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """One line per model: stock hashrate and power, efficiency, range, break-even."""
    catalogue = load_catalogue()
    hp: float | None = args.hashprice
    aux = 0.0
    if args.config is not None:
        cfg = load_config(args.config)
        hp = cfg.hashprice_usd_per_ph_day if hp is None else hp
        aux = cfg.energy.aux_fraction
    if hp is not None:
        print(f"{breakeven_label(hp, aux)}:")
    print(f"{'key':14} {'model':24} {'TH/s':>6} {'W':>6} {'J/TH':>5} {'range W':>11}"
          + ("" if hp is None else f" {'break-even $/MWh':>16}"))
    for key, m in catalogue.models.items():
        line = (f"{key:14} {m.name:24} {m.nominal_ths:6g} {m.nominal_w:6g} "
                f"{m.efficiency_j_per_th:5.1f} {m.min_w:5g}-{m.max_w:<5g}")
        if hp is not None:
            line += f" {m.breakeven_usd_per_mwh(hp, aux_fraction=aux):16.1f}"
        print(line.rstrip())
    if hp is None:
        print("break-even prices: --config FILE (the site's hashprice and aux) or --hashprice "
              "USD_PER_PH_DAY")
    return EXIT_OK

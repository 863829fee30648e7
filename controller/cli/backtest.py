"""The `mineops backtest` subcommand: a site's fleet over historical prices, against baselines."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from controller.backtest import (
    Settings,
    WindowFileError,
    load_windows,
    run_backtest,
)
from controller.backtest.engine import PriceBoundsError
from controller.backtest.report import text_report, write_csv, write_png
from controller.cli.common import EXIT_OK, EXIT_USAGE, Subparsers, UsageError, add_price_args
from controller.config import SiteConfig
from controller.config_types import PolicyKnobs
from controller.extras import require
from controller.site_file import load_config
from drivers.prices import PriceSeries, load_prices


def add_parser(subparsers: Subparsers) -> None:
    """Register `backtest` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "backtest", help="what the fleet would have earned on historical prices",
        description="Run the controller's own optimizer and policy over a price CSV in "
        "simulated time, and compare with always-on, on/off at break-even and the hindsight "
        "optimum. mineops and on/off decide each interval on the previous interval's price. "
        "See docs/backtest.md.",
    )
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="site TOML file")
    add_price_args(p, default=None)
    p.add_argument("--hashprice", type=float, metavar="USD_PER_PH_DAY",
                   help="override the site file's hashprice")
    p.add_argument("--adder", type=float, metavar="USD_PER_MWH",
                   help="override the site file's energy adders")
    p.add_argument("--windows", type=Path, metavar="FILE",
                   help="grid events / peak windows: CSV `start,end,cap_kw[,name]` or JSON")
    p.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                   help="override a policy knob for this run, e.g. hysteresis_usd_per_mwh=3 "
                   "(repeatable)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write backtest.png and backtest.csv (interval series) here")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bar on stderr (auto: when stderr is a terminal)")
    p.add_argument("--exact", action="store_true",
                   help="one optimizer row per miner, no memo (slow; for cross-checks)")
    p.add_argument("--campus-traces", type=Path, metavar="FILE",
                   help="an energy campus (the site file's [campus]): CSV of `timestamp` and "
                   "one column per firm load and generator id, in kW; reports the surplus "
                   "used, the import avoided and the hindsight bound for the campus "
                   "(docs/backtest.md)")
    p.set_defaults(handler=run)


def _knobs(items: list[str]) -> dict[str, Any]:
    known = {f: type(getattr(PolicyKnobs(), f)) for f in PolicyKnobs.__dataclass_fields__}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ValueError(f"--knob {item!r}: expected NAME=VALUE with NAME one of "
                             f"{', '.join(sorted(known))}")
        if known[name] is bool:
            out[name] = value.strip().lower() in ("1", "true", "yes", "on")
        else:
            out[name] = float(value)
    return out


class ProgressBar:
    """A one-line progress bar on a stream, redrawn at most a few times a second.

    Args:
        stream: Where it is drawn (a terminal: it redraws with a carriage return).
        label: The word before the bar.
    """

    def __init__(self, stream: TextIO, label: str = "backtest") -> None:
        self.stream, self.label = stream, label
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        """Report `done` of `total` decisions; redrawn at most every 0.2 s, and at the end."""
        now = time.monotonic()
        if done < total and now - self.last < 0.2:
            return
        self.last = now
        frac = done / max(total, 1)
        bar = "#" * int(frac * 30)
        eta = (now - self.started) * (1 - frac) / frac if frac > 0 else 0.0
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac:5.1%} {done:,}/{total:,} "
                          f"eta {eta:4.0f} s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _campus(args: argparse.Namespace, cfg: SiteConfig, prices: PriceSeries, settings: Settings,
            show: bool) -> int:
    """`--campus-traces`: the fleet on its energy campus (controller/backtest/campus.py)."""
    from controller.backtest.campus import (  # noqa: PLC0415 - only with --campus-traces
        campus_text_report,
        load_campus_traces,
        run_campus_backtest,
    )

    if cfg.campus is None:
        print(f"mineops: --campus-traces: {args.config} has no [campus] table", file=sys.stderr)
        return EXIT_USAGE
    if args.windows is not None or args.out is not None:
        print("mineops: --campus-traces: --windows and --out are not supported with it yet",
              file=sys.stderr)
        return EXIT_USAGE
    traces = load_campus_traces(args.campus_traces, cfg.campus, prices.start_s,
                                prices.interval_s, timezone=args.timezone)
    result = run_campus_backtest(
        cfg, prices.start_s, prices.price_usd_per_mwh, prices.interval_s, settings, traces,
        exact=args.exact, progress=ProgressBar(sys.stderr) if show else None)
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(f"prices: {prices.column}{' at ' + prices.location if prices.location else ''}, "
              f"{prices.span_text()}")
        print(campus_text_report(result))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Handler of `mineops backtest`; ConfigError and PriceFileError reach the CLI's main."""
    cfg = load_config(args.config)
    if args.out is not None:  # before the run, not after it: the chart needs matplotlib
        require("charts", "mineops backtest --out (its chart)")
    prices = load_prices(args.prices, args.price_column, timezone=args.timezone,
                         settlement_point=args.settlement_point, unit=args.price_unit)
    try:
        # Naive window times are read on the price file's clock, as docs/backtest.md says.
        windows = (load_windows(args.windows, naive_tz=ZoneInfo(prices.timezone))
                   if args.windows else [])
        knobs = _knobs(args.knob)
    except (WindowFileError, ValueError) as e:
        print(f"mineops: {e}", file=sys.stderr)
        return EXIT_USAGE
    for w in windows:
        if w.note:
            print(f"mineops: warning: --windows {w.note}", file=sys.stderr)
    settings = Settings.from_config(cfg, hashprice=args.hashprice, adder=args.adder,
                                    knob_overrides=knobs)
    show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    try:
        if args.campus_traces is not None:
            return _campus(args, cfg, prices, settings, show)
        result = run_backtest(
            cfg, prices.start_s, prices.price_usd_per_mwh, prices.interval_s, settings,
            windows=windows, exact=args.exact,
            progress=ProgressBar(sys.stderr) if show else None,
        )
    except PriceBoundsError as e:
        raise UsageError(f"{args.prices}: {e}") from None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(result, args.out / "backtest.csv")
        write_png(result, args.out / "backtest.png", timezone=prices.timezone)
    if args.json:
        summary = result.summary()
        summary["price_column"] = prices.column
        summary["price_location"] = prices.location
        summary["price_timezone"] = prices.timezone
        print(json.dumps(summary))
    else:
        print(f"prices: {prices.column}{' at ' + prices.location if prices.location else ''}, "
              f"{prices.span_text()}")
        print(text_report(result))
        if args.out is not None:
            print(f"wrote {args.out / 'backtest.png'} and {args.out / 'backtest.csv'}")
    return EXIT_OK

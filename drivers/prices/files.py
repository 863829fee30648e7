"""A price CSV file to a regular UTC PriceSeries: layout, settlement point, time zone, checks.

The file is read by drivers.prices.reader (encodings, delimiters, header names, numbers),
its layout recognised by drivers.prices.layouts (ERCOT reports, CAISO OASIS, PJM Data
Miner, gridstatus, generic), its clock turned into UTC by drivers.prices.timezones. Rows
may come in any order; the result is sorted and must be one regular grid: a duplicate or a
gap is an error naming its lines. docs/prices.md describes the formats for users.

Prices are $/MWh. Without a unit named (`unit`, `--price-unit`), a file that looks like
another unit is an error naming the line and the likely unit: a price column whose name
says kWh, cents or a currency other than US dollars; nine in ten prices (or all) under 1
in magnitude (as $/kWh would be); every price 0; a price beyond
PRICE_LIMIT_USD_PER_MWH. Naming the unit converts (PRICE_UNITS) and skips these checks.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt
import structlog

from drivers.prices.layouts import Layout, detect
from drivers.prices.reader import NumberReader, Table, normalise, open_table
from drivers.prices.series import PriceFileError, PriceSeries
from drivers.prices.timezones import Stamp, get_zone, to_utc_s, zone_of_offsets

log = structlog.get_logger("mineops.prices")

_MAX_LISTED = 12
# $/MWh per unit of the file's prices (`--price-unit`).
PRICE_UNITS = {"usd_per_mwh": 1.0, "usd_per_kwh": 1000.0, "cents_per_kwh": 10.0}
# No market settles beyond this: the highest price caps are in the thousands to tens of
# thousands of $/MWh (ERCOT's offer cap is 5,000) and floors in the hundreds below zero.
PRICE_LIMIT_USD_PER_MWH = 100_000.0
# Prices in $/MWh are under 1 in magnitude for minutes at a time, not for nine tenths of
# a file: such a file is in $/kWh (0.025 $/kWh is 25 $/MWh), its few spikes included.
KWH_SHARE = 0.9
# Currencies other than US dollars, as price column names write them (EUR_per_MWh, €/MWh).
_CURRENCIES = frozenset({"eur", "gbp", "aud", "cad", "chf", "nok", "sek", "dkk", "jpy",
                         "pln", "czk", "nzd", "inr", "brl", "mxn", "€", "£"})
_WORDS = re.compile(r"[^a-z0-9€£]+")


def _listing(names: Counter[str]) -> str:
    if len(names) <= _MAX_LISTED:
        return ", ".join(names)
    return ", ".join([*list(names)[:_MAX_LISTED], f"... ({len(names)} in all)"])


def _price_column(table: Table, layout: Layout, column: str | None) -> int:
    if column is not None:
        pi = table.col(normalise(column))
        if pi is None:
            raise PriceFileError(f"{table.where(table.header_line)}: unknown column {column!r} "
                                 f"(columns: {table.found()})")
        return pi
    pi = table.col(*layout.price_keys)
    if pi is None:
        raise PriceFileError(
            f"{table.where(table.header_line)}: no price column found for the {layout.name} "
            f"layout; name one with --price-column (columns: {table.found()})")
    return pi


def _local(t_s: float, zone: ZoneInfo) -> str:
    return f"{datetime.fromtimestamp(t_s, UTC).astimezone(zone):%Y-%m-%d %H:%M %Z}"


def _unit_factor(unit: str | None) -> float:
    if unit is None:
        return 1.0
    try:
        return PRICE_UNITS[unit]
    except KeyError:
        raise PriceFileError(f"unknown price unit {unit!r}: one of "
                             f"{', '.join(PRICE_UNITS)}") from None


def _named_unit(table: Table, column: str) -> None:
    """PriceFileError when the price column's name says it is not in $/MWh."""
    name = column.lower()
    words = set(_WORDS.split(name))
    key = normalise(column)
    where = table.where(table.header_line)
    override = "--price-unit usd_per_mwh if its prices are $/MWh after all"
    if words & _CURRENCIES:
        currency = sorted(words & _CURRENCIES)[0].upper()
        raise PriceFileError(
            f"{where}: price column {column!r} names {currency}: mineops prices are US "
            f"dollars per MWh (hashprice and costs are in USD); convert the prices to $/MWh "
            f"first, or give {override}")
    if "kwh" in key:
        cents = "cents" in key or "centper" in key or "ct" in words or "cent" in words
        unit, factor = ("cents_per_kwh", 10) if cents else ("usd_per_kwh", 1000)
        what = "cents per kWh" if cents else "$/kWh"
        raise PriceFileError(
            f"{where}: price column {column!r} names its prices in {what}; mineops reads "
            f"$/MWh: give --price-unit {unit} to convert them (x {factor}), or {override}")


def _check_magnitude(prices: list[float], lines: list[int], where: str) -> None:
    """PriceFileError when the prices look like another unit than $/MWh."""
    if not prices:
        return
    magnitude = np.abs(np.array(prices, dtype=np.float64))
    over = np.flatnonzero(magnitude > PRICE_LIMIT_USD_PER_MWH)
    if over.size:
        i = int(over[0])
        raise PriceFileError(
            f"{where}:{lines[i]}: price {prices[i]:.12g} is beyond any market's ($/MWh within "
            f"+-{PRICE_LIMIT_USD_PER_MWH:,.0f}; ERCOT's offer cap is 5,000): a misread number "
            "or another unit; correct the row, or give --price-unit usd_per_mwh if it is "
            "truly meant")
    if magnitude.max() == 0.0:
        raise PriceFileError(
            f"{where}:{lines[0]}: every price is 0: a column of missing values? Check the "
            "price column, or give --price-unit usd_per_mwh if they are truly 0 $/MWh")
    under = magnitude < 1.0
    if under.mean() >= KWH_SHARE:
        i = int(np.argmax(np.where(under, magnitude, -1.0)))
        share = ("every price is" if under.all() else
                 f"{int(under.sum())} of {len(prices)} prices are")
        raise PriceFileError(
            f"{where}:{lines[i]}: {share} under 1 in magnitude (the largest of them, "
            f"{prices[i]:g}, is on this line): $/kWh, not $/MWh? Give --price-unit "
            "usd_per_kwh to convert them (x 1000), or --price-unit usd_per_mwh if they are "
            "$/MWh")


def load_price_csv(
    path: Path | str,
    column: str | None = None,
    *,
    timezone: str | None = None,
    settlement_point: str | None = None,
    unit: str | None = None,
) -> PriceSeries:
    """Read and check a price file.

    Args:
        path: a CSV file (or .gz, or a .zip holding one CSV) in one of the layouts of
            drivers.prices.layouts.
        column: the price column; default the layout's (e.g. SettlementPointPrice, SPP).
        timezone: IANA zone of naive times in the file, overriding the layout's market
            zone; also the zone reports show times in.
        settlement_point: the settlement point or node to keep, in a file with several
            (matched ignoring case; for PJM the pnode name or id).
        unit: the prices' unit, a key of PRICE_UNITS (converted to $/MWh); None: $/MWh,
            checked (a column named in another unit, every price under 1, a price
            beyond PRICE_LIMIT_USD_PER_MWH are errors).

    Returns:
        A regular series, start times in Unix seconds UTC, sorted; prices in $/MWh.

    Raises:
        PriceFileError: anything doubtful, naming the file, the line, what was found and
            what was expected: unknown layout or column, several settlement points and
            none chosen, unparseable values, prices that look like another unit, naive
            times of unknown zone or of a generic `timestamp` column beside a market's
            columns, a time in the spring-forward gap, duplicates, gaps.
    """
    zone = get_zone(timezone) if timezone else None
    factor = _unit_factor(unit)
    with open_table(path) as table:
        layout = detect(table)
        pi = _price_column(table, layout, column)
        price_name = table.columns[pi]
        if unit is None:
            _named_unit(table, price_name)
        rows = _read_rows(table, layout, pi, settlement_point)
        where = str(table.path)
        naive_zone_name = zone.key if zone else layout.naive_zone(table)
        by_convention = layout.utc_by_convention(table)
        market_zone = layout.market_zone(table)
        shown_zone = (zone.key if zone else market_zone
                      or zone_of_offsets([s.when for s in rows.stamps]) or "UTC")
    stamps = rows.stamps
    if len(stamps) < 2:
        raise PriceFileError(f"{where}: needs at least two intervals, found {len(stamps)}")
    if unit is None:
        _check_magnitude(rows.prices, [s.line for s in stamps], where)
    assumed_utc = (zone is None and by_convention
                   and any(s.when.tzinfo is None for s in stamps))
    if assumed_utc and market_zone is not None:
        raise _naive_beside_market(stamps, market_zone, where)
    hint = (" (naive times were read as UTC; if the file is in local time, name its zone "
            "with --timezone)") if assumed_utc else ""
    utc = to_utc_s(stamps, get_zone(naive_zone_name) if naive_zone_name else None, where,
                   "name it with --timezone (an IANA name such as America/Chicago)")
    start = np.array(utc, dtype=np.float64)
    order = np.argsort(start, kind="stable")
    start = start[order]
    price = np.array(rows.prices, dtype=np.float64)[order] * factor
    lines = np.array([s.line for s in stamps])[order]
    interval = _regular_interval(start, lines, where, ZoneInfo(shown_zone), hint)
    if assumed_utc:
        log.warning("prices_naive_times_read_as_utc", path=where,
                    why="no --timezone; the generic layout's naive times are UTC")
    log.info("prices_loaded", path=where, layout=layout.name, column=price_name,
             location=rows.chosen, intervals=len(start), interval_s=interval,
             timezone=shown_zone, rows_not_prices=rows.filtered,
             unit=unit or "usd_per_mwh (checked)")
    return PriceSeries(start, price, interval, price_name, timezone=shown_zone,
                       location=rows.chosen)


@dataclass(slots=True)
class _Rows:
    """The price rows of one settlement point: times and prices as written, file order."""

    stamps: list[Stamp] = field(default_factory=list)
    prices: list[float] = field(default_factory=list)  # in the file's unit
    chosen: str | None = None  # the settlement point or node kept (None: no such column)
    filtered: int = 0  # rows the layout says are not prices (e.g. CAISO's LMP components)


def _read_rows(table: Table, layout: Layout, pi: int, settlement_point: str | None) -> _Rows:
    """Every price row of the settlement point asked for (or of the only one).

    Raises:
        PriceFileError: a settlement point asked for and no such column or no such rows;
            several points and none asked for; rows of several markets; a value that
            cannot be read.
    """
    wanted = settlement_point.strip().upper() if settlement_point else None
    point_cols = [i for k in layout.point_keys if (i := table.col(k)) is not None]
    market_i = table.col(*layout.market_keys) if layout.market_keys else None
    if wanted is not None and not point_cols:
        raise PriceFileError(
            f"{table.where(table.header_line)}: --settlement-point {settlement_point} "
            f"given but the file has no settlement point or node column "
            f"(columns: {table.found()})")
    time_of = layout.time_reader(table)
    keep = layout.row_filter(table)
    numbers = NumberReader(table.delimiter)
    price_name, where = table.columns[pi], str(table.path)
    points: Counter[str] = Counter()
    markets: Counter[str] = Counter()
    out = _Rows()
    for row in table.rows():
        if keep is not None and not keep(row):
            out.filtered += 1
            continue
        if point_cols:
            point = row.get(point_cols[0])
            points[point] += 1
            if wanted is not None:
                if all(row.get(i).upper() != wanted for i in point_cols):
                    continue
                out.chosen = out.chosen or point
            elif out.chosen is None:
                out.chosen = point
            elif point != out.chosen:
                continue
        if market_i is not None:
            markets[row.get(market_i)] += 1
        out.stamps.append(time_of(row))
        out.prices.append(numbers.read(row.get(pi), row.line, price_name, where))
    if wanted is not None and not out.stamps:
        raise PriceFileError(f"{where}: no rows for settlement point {settlement_point!r}; "
                             f"the file has {_listing(points)}")
    if wanted is None and len(points) > 1:
        raise PriceFileError(
            f"{where}: prices for {len(points)} settlement points or nodes "
            f"({_listing(points)}); choose one with --settlement-point")
    if len(markets) > 1:
        raise PriceFileError(f"{where}: rows of {len(markets)} markets ({_listing(markets)})"
                             "; split the file, one market (one interval length) each")
    return out


def _naive_beside_market(stamps: list[Stamp], market_zone: str, where: str) -> PriceFileError:
    """The error for naive times UTC by convention in a file whose columns name a market."""
    # mineops' `timestamp` is UTC, the market's own clock is local: either reading is
    # hours off half the time, so the file has to say which.
    naive = next(s for s in stamps if s.when.tzinfo is None)
    return PriceFileError(
        f"{where}:{naive.line}: {naive.when:%Y-%m-%d %H:%M} has no UTC offset, and the "
        f"columns name a market whose clock is {market_zone} (mineops reads a naive "
        "timestamp as UTC, the market writes its local time): name the times' zone with "
        f"--timezone ({market_zone} or UTC), or write them with their offset")


def _regular_interval(start: npt.NDArray[np.float64], lines: npt.NDArray[np.int_],
                      where: str, shown: ZoneInfo, hint: str) -> float:
    """The interval of sorted start times (Unix s) on one regular grid, s.

    Raises:
        PriceFileError: a duplicate start, a gap or a shorter step, naming both lines
            and the time in `shown`'s zone; `hint` is added to the message.
    """
    steps = np.diff(start)
    dup = np.flatnonzero(steps == 0)
    if dup.size:
        i = int(dup[0])
        raise PriceFileError(f"{where}:{lines[i + 1]}: duplicate: the interval starting "
                             f"{_local(start[i], shown)} is also on line {lines[i]}{hint}")
    interval = float(np.median(steps))
    bad = np.flatnonzero(steps != interval)
    if bad.size:
        i = int(bad[0])
        kind = "gap" if steps[i] > interval else "interval shorter than the others"
        raise PriceFileError(
            f"{where}:{lines[i + 1]}: {kind} after {_local(start[i], shown)} (line "
            f"{lines[i]}): step {steps[i]:g} s, expected {interval:g} s{hint}")
    return interval

"""The column layouts of the price files people have, told apart by their header.

Each layout says where a row's time is and in which clock, which column holds the price
and which the settlement point or node, which rows are prices at all, and the market's
own time zone. Sources of each layout are in docs/prices.md and in the fixtures' README.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime, timedelta

from typing_extensions import override

from drivers.prices.reader import Row, Table
from drivers.prices.series import PriceFileError
from drivers.prices.timezones import Stamp, parse_datetime, parse_flag

TimeReader = Callable[[Row], Stamp]
RowFilter = Callable[[Row], bool]
_FLAG_KEYS = ("dstflag", "repeatedhourflag", "intervalrepeatedhourflag")
# Column names that say which market a generic file's prices are from, and its clock:
# ERCOT settlement points as the built-in trace names them (hb_south_rtm_spp_usd_mwh) or
# as ERCOT does (SettlementPointPrice), CAISO's trading hubs, PJM.
_MARKET_COLUMNS = (
    (re.compile(r"^(hb|lz)_[a-z]+_|ercot|settlement_?point", re.IGNORECASE), "America/Chicago"),
    (re.compile(r"caiso|(^|_)(np|sp)15(_|$)", re.IGNORECASE), "America/Los_Angeles"),
    (re.compile(r"pjm", re.IGNORECASE), "America/New_York"),
)
_FIRST_YEAR, _LAST_YEAR = 1970, 2200


def _cell_error(table: Table, row: Row, index: int, why: str) -> PriceFileError:
    return PriceFileError(f"{table.where(row.line)}: unparseable row: "
                          f"{table.columns[index]!r} = {row.get(index)!r}: {why}")


def _plausible(table: Table, row: Row, index: int, when: datetime) -> datetime:
    # Years far out are typos or misread numbers, and would overflow the UTC conversion.
    if not _FIRST_YEAR <= when.year <= _LAST_YEAR:
        raise _cell_error(table, row, index, f"year {when.year} is not a plausible price date")
    return when


def _flag_reader(table: Table) -> Callable[[Row], bool | None]:
    fi = table.col(*_FLAG_KEYS)
    if fi is None:
        return lambda row: None

    def flag(row: Row) -> bool | None:
        try:
            return parse_flag(row.get(fi))
        except ValueError as e:
            raise _cell_error(table, row, fi, str(e)) from None

    return flag


def _datetime_reader(table: Table, ti: int, unix_seconds: bool = False) -> TimeReader:
    flag = _flag_reader(table)

    def read(row: Row) -> Stamp:
        text = row.get(ti)
        dst = flag(row)
        when: datetime | None = None
        if unix_seconds:
            with suppress(ValueError, OverflowError, OSError):  # not seconds: try a date
                when = datetime.fromtimestamp(float(text), UTC)
        if when is None:
            try:
                when = parse_datetime(text)
            except ValueError as e:
                raise _cell_error(table, row, ti, str(e)) from None
        return Stamp(row.line, _plausible(table, row, ti, when), dst)

    return read


class Layout:
    """A file layout: subclasses say how to recognise and read it.

    Column keys are normalised names (`Table.keys`: lower case, letters and digits). By
    default a layout is recognised by its time column, the first of `time_keys` the
    header has, and reads it as a date and time (`unix_seconds`: or Unix seconds); its
    naive times are in `naive_tz` and its market's clock is `market_tz`. A layout that
    needs more overrides the methods.
    """

    name = ""
    title = ""
    price_keys: tuple[str, ...] = ()
    point_keys: tuple[str, ...] = ()
    market_keys: tuple[str, ...] = ()
    time_keys: tuple[str, ...] = ()  # the time column, in order of preference
    unix_seconds = False  # the time column may hold Unix seconds as well as dates
    naive_tz: str | None = None  # the zone of naive times (IANA name); None: unknown
    market_tz: str | None = None  # the market's own zone (IANA name), for showing times
    expects = ""  # the identifying columns, for the "no time column" error

    def matches(self, table: Table) -> bool:
        """Whether the header has this layout's identifying columns."""
        return table.col(*self.time_keys) is not None

    def time_reader(self, table: Table) -> TimeReader:
        """A function from a row to its interval's start (`Stamp`), for a matching table.

        The function raises PriceFileError naming the row, column and value it cannot read.
        """
        ti = table.col(*self.time_keys)
        assert ti is not None  # `matches` said so
        return _datetime_reader(table, ti, unix_seconds=self.unix_seconds)

    def naive_zone(self, table: Table) -> str | None:
        """The zone of naive times when the user names none; None: unknown (an error)."""
        return self.naive_tz

    def market_zone(self, table: Table) -> str | None:
        """The market's local zone for showing times, when the layout identifies it."""
        return self.market_tz

    def utc_by_convention(self, table: Table) -> bool:
        """Whether naive times are UTC by mineops' convention rather than by the file."""
        return False

    def row_filter(self, table: Table) -> RowFilter | None:
        """Which rows are prices (e.g. only the LMP rows of a file of LMP components)."""
        return None


class ErcotReport(Layout):
    """ERCOT's public settlement point price reports, as posted (CSV in a zip) or via its API.

    Real-time NP6-905-CD: DeliveryDate, DeliveryHour (hour ending 1-24), DeliveryInterval
    (1-4, 15 min), SettlementPointName, SettlementPointType, SettlementPointPrice, DSTFlag.
    Day-ahead NP4-190-CD: DeliveryDate, HourEnding ("01:00"-"24:00"), SettlementPoint,
    SettlementPointPrice, DSTFlag. DAM hourly LMPs (NP4-183-CD): BusName, LMP. Dates
    MM/DD/YYYY (the API gives YYYY-MM-DD); times US Central; DSTFlag "Y" marks the
    repeated hour's second pass. The yearly historical workbooks, saved as CSV, use the
    same names with spaces and `Repeated Hour Flag`.
    """

    name = "ercot"
    title = "ERCOT settlement point prices (NP6-905-CD real-time, NP4-190-CD day-ahead)"
    price_keys = ("settlementpointprice", "lmp")
    point_keys = ("settlementpointname", "settlementpoint", "busname")
    naive_tz = market_tz = "America/Chicago"
    expects = "DeliveryDate + DeliveryHour/HourEnding [+ DeliveryInterval]"

    @override
    def matches(self, table: Table) -> bool:
        return (table.col("deliverydate") is not None
                and table.col("deliveryhour", "hourending") is not None)

    @override
    def time_reader(self, table: Table) -> TimeReader:
        di = table.col("deliverydate")
        hi = table.col("deliveryhour", "hourending")
        ii = table.col("deliveryinterval")
        assert di is not None and hi is not None
        flag = _flag_reader(table)

        def read(row: Row) -> Stamp:
            try:
                day = parse_datetime(row.get(di))
            except ValueError as e:
                raise _cell_error(table, row, di, str(e)) from None
            if day.time() != datetime.min.time() or day.tzinfo is not None:
                raise _cell_error(table, row, di, "expected a date only")
            _plausible(table, row, di, day)
            hour_text = row.get(hi)
            hour, _, minutes = hour_text.partition(":")
            if not hour.isdigit() or minutes not in ("", "00") or not 1 <= int(hour) <= 24:
                raise _cell_error(table, row, hi, "expected an hour ending 1-24 or 01:00-24:00")
            # Hour ending N is the hour that starts at N-1 o'clock on the delivery date.
            start = day + timedelta(hours=int(hour) - 1)
            if ii is not None:
                interval = row.get(ii)
                if not interval.isdigit() or not 1 <= int(interval) <= 4:
                    raise _cell_error(table, row, ii, "expected a 15-minute interval 1-4")
                start += timedelta(minutes=15 * (int(interval) - 1))
            return Stamp(row.line, start, flag(row))

        return read


class CaisoOasis(Layout):
    """CAISO OASIS price reports as CSV (resultformat=6), e.g. PRC_LMP and PRC_INTVL_LMP.

    INTERVALSTARTTIME_GMT, INTERVALENDTIME_GMT, OPR_DT, OPR_HR, OPR_INTERVAL, NODE_ID_XML,
    NODE_ID, NODE, MARKET_RUN_ID, LMP_TYPE, XML_DATA_ITEM, PNODE_RESMRID, GRP_TYPE, POS, MW
    (PRC_LMP) or VALUE (PRC_INTVL_LMP), GROUP. One row per LMP component (LMP_TYPE LMP,
    MCE, MCC, MCL, MGHG): only the LMP rows are prices. Times in GMT, often unsorted.
    """

    name = "caiso-oasis"
    title = "CAISO OASIS LMP reports (PRC_LMP, PRC_INTVL_LMP)"
    price_keys = ("mw", "value")
    point_keys = ("node", "nodeid", "nodeidxml")
    market_keys = ("marketrunid",)
    time_keys = ("intervalstarttimegmt",)
    naive_tz = "UTC"
    market_tz = "America/Los_Angeles"
    expects = "INTERVALSTARTTIME_GMT"

    @override
    def row_filter(self, table: Table) -> RowFilter | None:
        ki = table.col("lmptype")
        if ki is not None:
            return lambda row: row.get(ki).upper() == "LMP"
        xi = table.col("xmldataitem")
        if xi is not None:
            return lambda row: row.get(xi).upper() == "LMP_PRC"
        return None


class PjmDataMiner(Layout):
    """PJM Data Miner 2 LMP feeds (da_hrl_lmps, rt_hrl_lmps, rt_fivemin_hrl_lmps) as CSV.

    datetime_beginning_utc, datetime_beginning_ept, pnode_id, pnode_name, voltage,
    equipment, type, zone, system_energy_price_da|rt, total_lmp_da|rt,
    congestion_price_da|rt, marginal_loss_price_da|rt, row_is_current, version_nbr. Times
    `M/D/YYYY h:mm:ss AM` (UTC and Eastern Prevailing Time); rows may come newest first;
    superseded versions have row_is_current FALSE and are skipped.
    """

    name = "pjm"
    title = "PJM Data Miner LMPs (da_hrl_lmps, rt_hrl_lmps, rt_fivemin_hrl_lmps)"
    price_keys = ("totallmprt", "totallmpda", "totallmp")
    point_keys = ("pnodename", "pnodeid")
    time_keys = ("datetimebeginningutc", "datetimebeginningept")
    market_tz = "America/New_York"
    expects = "datetime_beginning_utc or datetime_beginning_ept"

    @override
    def naive_zone(self, table: Table) -> str | None:
        utc = table.col("datetimebeginningutc") is not None
        return "UTC" if utc else self.market_tz

    @override
    def row_filter(self, table: Table) -> RowFilter | None:
        ci = table.col("rowiscurrent")
        if ci is None:
            return None

        def current(row: Row) -> bool:
            try:
                return parse_flag(row.get(ci)) is not False
            except ValueError as e:
                raise _cell_error(table, row, ci, str(e)) from None

        return current


class Gridstatus(Layout):
    """The gridstatus library's price frames saved with pandas `to_csv`.

    ERCOT SPP: Time, Interval Start, Interval End, Location, Location Type, Market, SPP.
    LMPs (CAISO, PJM, MISO, ...): Time, Interval Start, Interval End, Market, Location,
    Location Type, LMP, Energy, Congestion, Loss. Times carry their UTC offset; an unnamed
    first column (the pandas index) is ignored.
    """

    name = "gridstatus"
    title = "gridstatus price frames (Interval Start, Location, Market, SPP or LMP)"
    price_keys = ("spp", "lmp")
    point_keys = ("location",)
    market_keys = ("market",)
    time_keys = ("intervalstart",)
    expects = "Interval Start"


class Generic(Layout):
    """mineops' own `timestamp,price_usd_per_mwh` and the built-in trace's columns.

    The time column is `timestamp`, `time`, `datetime`, `interval_start_utc` or
    `interval_start_local` (ISO 8601 or Unix seconds). Naive times in `timestamp`, `time`,
    `datetime` or a `*_utc` column are UTC (as mineops always read them), in
    `interval_start_local` the market's zone when the columns name its market (ERCOT
    settlement points such as `hb_south_rtm_spp_usd_mwh`, CAISO, PJM: _MARKET_COLUMNS),
    else whatever --timezone says. Naive times by
    convention (`utc_by_convention`) beside columns naming a market are refused by
    drivers.prices.files until --timezone names their zone.
    """

    name = "generic"
    title = "generic: timestamp,price_usd_per_mwh"
    price_keys = ("priceusdpermwh", "hbsouthrtmsppusdmwh")
    time_keys = ("timestamp", "intervalstartutc", "intervalstartlocal", "time", "datetime",
                 "datetimeutc")
    unix_seconds = True
    expects = "timestamp (or time, datetime, interval_start_utc, interval_start_local)"

    def _time_key(self, table: Table) -> str:
        ti = table.col(*self.time_keys)
        assert ti is not None
        return table.keys[ti]

    @override
    def naive_zone(self, table: Table) -> str | None:
        key = self._time_key(table)
        if "local" in key:
            return self.market_zone(table)
        return "UTC"

    @override
    def utc_by_convention(self, table: Table) -> bool:
        key = self._time_key(table)
        return "local" not in key and "utc" not in key

    @override
    def market_zone(self, table: Table) -> str | None:
        for pattern, zone in _MARKET_COLUMNS:
            if any(pattern.search(c) for c in table.columns):
                return zone
        return None


LAYOUTS: tuple[Layout, ...] = (ErcotReport(), CaisoOasis(), PjmDataMiner(), Gridstatus(),
                               Generic())


def detect(table: Table) -> Layout:
    """The first layout whose identifying columns the header has.

    Raises:
        PriceFileError: none matches; the message lists the columns found and expected.
    """
    for layout in LAYOUTS:
        if layout.matches(table):
            return layout
    expected = "; ".join(f"{layout.name}: {layout.expects}" for layout in LAYOUTS)
    raise PriceFileError(f"{table.where(table.header_line)}: no time column in the header "
                         f"(found {table.found()}); expected one of the layouts {expected}")

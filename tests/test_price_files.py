"""Price files as markets and tools write them: layouts, time zones, headers, clear errors.

Fixtures: tests/fixtures/field-cases/prices-*/ (each README names its source). The field
cases prices-dst-fall-back and prices-gridstatus-export are the inputs mineops got wrong;
the other folders are the same kinds of fault in other layouts, markets and zones.
"""

from __future__ import annotations

import gzip
import json
import re
import zipfile
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from controller.backtest import load_windows
from controller.cli.main import main, parser
from drivers.prices import DATASETS, PriceFileError, load_price_csv, load_prices
from simulators.prices import synthetic_prices
from tests.conftest import ERCOT

CASES = Path(__file__).parent / "fixtures" / "field-cases"
DST_CASE = CASES / "prices-dst-fall-back" / "prices.csv"
GRIDSTATUS_CASE = CASES / "prices-gridstatus-export" / "prices.csv"
ERCOT_RT_FALL = CASES / "prices-ercot-reports" / "np6-905-cd_rt_spp_2024-11-03_fall_back.csv"
ERCOT_RT_SPRING = (CASES / "prices-ercot-reports" /
                   "np6-905-cd_rt_spp_2024-03-10_spring_forward.csv")
ERCOT_DAM_FALL = CASES / "prices-ercot-reports" / "np4-190-cd_dam_spp_2024-11-03_fall_back.csv"
ERCOT_DAM_SPRING = (CASES / "prices-ercot-reports" /
                    "np4-190-cd_dam_spp_2024-03-10_spring_forward.csv")
CAISO_DAM = CASES / "prices-caiso-oasis" / "PRC_LMP_DAM_2024-11-03.csv"
CAISO_RTM = CASES / "prices-caiso-oasis" / "PRC_INTVL_LMP_RTM_2024-03-10.csv"
PJM_DA = CASES / "prices-pjm-dataminer" / "da_hrl_lmps_2024-11-03.csv"
PJM_RT_EPT = CASES / "prices-pjm-dataminer" / "rt_hrl_lmps_ept_only_2024-11-03.csv"
GRIDSTATUS_CAISO = CASES / "prices-gridstatus-export" / "gridstatus_caiso_lmp_with_index.csv"
EXCEL_ERCOT = CASES / "prices-european-excel" / "ercot_dam_hb_south_excel_de.csv"
EXCEL_BERLIN = CASES / "prices-european-excel" / "generic_berlin_2024-10-27.csv"

CHICAGO = ZoneInfo("America/Chicago")


def utc_s(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def grid(start_utc: str, n: int, step_s: float) -> list[float]:
    return [utc_s(start_utc) + step_s * k for k in range(n)]


def local_dates(series_start_s: np.ndarray, zone: ZoneInfo) -> list[str]:
    return [f"{datetime.fromtimestamp(float(t), UTC).astimezone(zone):%Y-%m-%d}"
            for t in series_start_s]


def write(tmp_path: Path, text: str, name: str = "prices.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# -- the field cases ----------------------------------------------------------------------


def test_field_case_dst_fall_back_loads_every_interval_once_in_order() -> None:
    s = load_prices(DST_CASE)
    # 22:00 CDT on 11-02 is 03:00 UTC; then 24 quarter hours, the repeated 01:00 hour included.
    assert s.start_s.tolist() == grid("2024-11-03T03:00", 24, 900)
    assert s.interval_s == 900 and s.timezone == "America/Chicago"
    assert s.price_usd_per_mwh.tolist() == [
        21.4, 20.9, 20.1, 19.8, 19.5, 19.2, 18.7, 18.9, 18.1, 17.6, 17.9, 17.3,
        16.8, 16.5, 16.9, 16.2,  # 01:00-01:45 CDT, dst_flag N
        16.0, 15.8, 16.1, 15.9,  # 01:00-01:45 CST, dst_flag Y
        16.4, 16.8, 17.0, 17.5,
    ]
    shown = [f"{s.local_time(t):%H:%M %Z}" for t in s.start_s[12:21]]
    assert shown == ["01:00 CDT", "01:15 CDT", "01:30 CDT", "01:45 CDT",
                     "01:00 CST", "01:15 CST", "01:30 CST", "01:45 CST", "02:00 CST"]


def test_field_case_dst_fall_back_with_the_zone_named_gives_the_same_series() -> None:
    named = load_prices(DST_CASE, timezone="America/Chicago")
    assert named.start_s.tolist() == load_prices(DST_CASE).start_s.tolist()


def test_field_case_gridstatus_export_loads_with_price_column_spp() -> None:
    s = load_prices(GRIDSTATUS_CASE, "SPP")
    assert s.column == "SPP" and s.location == "HB_SOUTH"
    # Interval Start, with its offsets: 23:00 CDT is 04:00 UTC, 20 regular quarter hours.
    assert s.start_s.tolist() == grid("2024-11-03T04:00", 20, 900)
    assert s.price_usd_per_mwh.tolist() == [
        19.5, 19.2, 18.7, 18.9, 18.1, 17.6, 17.9, 17.3, 16.8, 16.5, 16.9, 16.2,
        16.0, 15.8, 16.1, 15.9, 16.4, 16.8, 17.0, 17.5]
    # The offsets (-05:00 then -06:00 on that date) fit only US Central of the market zones.
    assert s.timezone == "America/Chicago"


@pytest.mark.parametrize("column", [None, "spp", " Spp "])
def test_gridstatus_price_column_is_found_ignoring_case_and_spaces(column: str | None) -> None:
    s = load_prices(GRIDSTATUS_CASE, column)
    assert s.column == "SPP" and s.price_usd_per_mwh[0] == 19.5


# -- ERCOT reports: both daylight-saving changes, 15-minute and hourly -------------------


def test_ercot_real_time_fall_back_day_has_25_hours_every_interval_once() -> None:
    s = load_prices(ERCOT_RT_FALL, settlement_point="HB_SOUTH")
    assert s.location == "HB_SOUTH" and s.column == "SettlementPointPrice"
    assert s.start_s.tolist() == grid("2024-11-03T05:00", 100, 900)
    assert local_dates(s.start_s, CHICAGO).count("2024-11-03") == 100  # 25 hours
    # The fixture's price is 10 + 0.25 k for the k-th interval in time: in order, each once.
    assert s.price_usd_per_mwh.tolist() == [10 + 0.25 * k for k in range(100)]


def test_ercot_real_time_spring_forward_day_has_23_hours() -> None:
    s = load_prices(ERCOT_RT_SPRING, settlement_point="lz_houston")
    assert s.location == "LZ_HOUSTON"
    assert s.start_s.tolist() == grid("2024-03-10T06:00", 92, 900)
    assert s.price_usd_per_mwh.tolist() == [30 + 0.25 * k for k in range(92)]
    assert f"{s.local_time(s.start_s[8]):%H:%M %Z}" == "03:00 CDT"  # after 01:45 CST


@pytest.mark.parametrize(("path", "n", "first_utc"), [
    (ERCOT_DAM_FALL, 25, "2024-11-03T05:00"),
    (ERCOT_DAM_SPRING, 23, "2024-03-10T06:00"),
])
def test_ercot_day_ahead_hourly_across_both_changes(path: Path, n: int, first_utc: str) -> None:
    s = load_prices(path, settlement_point="HB_NORTH")
    assert s.interval_s == 3600
    assert s.start_s.tolist() == grid(first_utc, n, 3600)
    assert s.price_usd_per_mwh.tolist() == [20.0 + k for k in range(n)]


def test_ercot_dst_flag_decides_not_the_row_order(tmp_path: Path) -> None:
    lines = ERCOT_DAM_FALL.read_text().splitlines()
    # The flagged (standard time) pass of hour ending 02:00 written before the first pass.
    first, second = lines.index("11/03/2024,02:00,HB_SOUTH, 11.00,N"), lines.index(
        "11/03/2024,02:00,HB_SOUTH, 12.00,Y")
    lines[first], lines[second] = lines[second], lines[first]
    s = load_prices(write(tmp_path, "\n".join(lines)), settlement_point="HB_SOUTH")
    assert s.price_usd_per_mwh.tolist()[:4] == [10.0, 11.0, 12.0, 13.0]


def test_ercot_report_without_dst_flag_tells_the_repeated_hour_by_order(tmp_path: Path) -> None:
    older = "\n".join(line.rsplit(",", 1)[0] for line in ERCOT_DAM_FALL.read_text().splitlines())
    assert "DSTFlag" not in older
    s = load_prices(write(tmp_path, older), settlement_point="HB_SOUTH")
    assert s.start_s.tolist() == grid("2024-11-03T05:00", 25, 3600)
    assert s.price_usd_per_mwh.tolist() == [10.0 + k for k in range(25)]


def test_several_settlement_points_without_a_choice_is_an_error_listing_them() -> None:
    with pytest.raises(PriceFileError) as e:
        load_prices(ERCOT_RT_FALL)
    assert str(ERCOT_RT_FALL) in str(e.value)
    assert "3 settlement points" in str(e.value) and "--settlement-point" in str(e.value)
    for point in ("HB_SOUTH", "HB_NORTH", "LZ_HOUSTON"):
        assert point in str(e.value)


def test_an_absent_settlement_point_is_an_error_listing_those_found() -> None:
    with pytest.raises(PriceFileError, match=r"no rows for settlement point 'HB_WEST'.*"
                                             "HB_SOUTH, HB_NORTH, LZ_HOUSTON"):
        load_prices(ERCOT_RT_FALL, settlement_point="HB_WEST")


def test_a_settlement_point_for_a_file_without_points_is_an_error() -> None:
    with pytest.raises(PriceFileError, match="no settlement point or node column"):
        load_prices(DST_CASE, settlement_point="HB_SOUTH")


# -- CAISO OASIS, PJM Data Miner, gridstatus LMPs --------------------------------------------


def test_caiso_oasis_day_ahead_keeps_only_lmp_rows_of_the_chosen_node() -> None:
    s = load_prices(CAISO_DAM, settlement_point="TH_NP15_GEN-APND")
    assert s.column == "MW" and s.interval_s == 3600 and s.timezone == "America/Los_Angeles"
    assert s.start_s.tolist() == grid("2024-11-03T07:00", 25, 3600)
    assert s.price_usd_per_mwh.tolist() == [50 + 0.5 * k for k in range(25)]


def test_caiso_oasis_real_time_five_minutes_across_spring_forward() -> None:
    s = load_prices(CAISO_RTM)
    assert s.column == "VALUE" and s.interval_s == 300 and s.location == "TH_SP15_GEN-APND"
    assert s.start_s.tolist() == grid("2024-03-10T09:00", 24, 300)
    assert s.price_usd_per_mwh.tolist() == pytest.approx([30 + 0.1 * k for k in range(24)])


@pytest.mark.parametrize("point", ["WESTERN HUB", "western hub", "51288"])
def test_pjm_data_miner_newest_first_superseded_rows_skipped(point: str) -> None:
    s = load_prices(PJM_DA, settlement_point=point)
    assert s.location == "WESTERN HUB" and s.column == "total_lmp_da"
    assert s.timezone == "America/New_York"
    assert s.start_s.tolist() == grid("2024-11-03T04:00", 25, 3600)
    assert s.price_usd_per_mwh.tolist() == [25.0 + k for k in range(25)]


def test_pjm_eastern_time_only_file_newest_first_tells_the_repeated_hour_by_order() -> None:
    s = load_prices(PJM_RT_EPT)
    assert s.start_s.tolist() == grid("2024-11-03T04:00", 25, 3600)
    assert s.price_usd_per_mwh.tolist() == [25.0 + k for k in range(25)]


def test_gridstatus_frame_with_pandas_index_and_two_locations() -> None:
    with pytest.raises(PriceFileError, match="TH_NP15_GEN-APND, TH_SP15_GEN-APND"):
        load_prices(GRIDSTATUS_CAISO)
    s = load_prices(GRIDSTATUS_CAISO, settlement_point="TH_SP15_GEN-APND")
    assert s.column == "LMP" and s.interval_s == 300 and s.timezone == "America/Los_Angeles"
    assert s.start_s.tolist() == grid("2024-11-03T08:30", 24, 300)
    assert s.price_usd_per_mwh.tolist() == [70 + 0.5 * k for k in range(24)]


def test_a_file_mixing_markets_is_an_error_naming_them(tmp_path: Path) -> None:
    text = ("Interval Start,Location,Market,SPP\n"
            "2024-06-01T00:00:00-05:00,HB_SOUTH,REAL_TIME_15_MIN,10\n"
            "2024-06-01T00:15:00-05:00,HB_SOUTH,REAL_TIME_15_MIN,11\n"
            "2024-06-01T00:00:00-05:00,HB_SOUTH,DAY_AHEAD_HOURLY,12\n")
    with pytest.raises(PriceFileError, match=r"2 markets.*REAL_TIME_15_MIN, DAY_AHEAD_HOURLY"):
        load_prices(write(tmp_path, text))


# -- European spreadsheets, encodings, delimiters, header names --------------------------------


def test_ercot_report_resaved_by_german_excel() -> None:
    s = load_prices(EXCEL_ERCOT)
    assert s.location == "HB_SOUTH"
    assert s.start_s.tolist() == grid("2024-11-03T05:00", 25, 3600)
    assert s.price_usd_per_mwh.tolist() == [1000.5 + k for k in range(25)]


def test_generic_berlin_file_across_the_european_fall_back() -> None:
    s = load_prices(EXCEL_BERLIN, timezone="Europe/Berlin")
    assert s.column == "Price_USD_per_MWh" and s.timezone == "Europe/Berlin"
    # 00:00 CEST on 27 Oct is 22:00 UTC the day before; 25 hours follow.
    assert s.start_s.tolist() == grid("2024-10-26T22:00", 25, 3600)
    assert s.price_usd_per_mwh.tolist() == [20 + 0.5 * k for k in range(25)]


def test_generic_naive_times_are_utc_without_a_zone_and_the_error_says_so() -> None:
    with pytest.raises(PriceFileError) as e:
        load_prices(EXCEL_BERLIN)
    assert f"{EXCEL_BERLIN}:6: duplicate" in str(e.value)
    assert "also on line 5" in str(e.value) and "--timezone" in str(e.value)


HEADER_VARIANTS = {
    "plain": "timestamp,price_usd_per_mwh\n{rows}",
    "bom": "\ufefftimestamp,price_usd_per_mwh\n{rows}",
    "spaces and case": "  TimeStamp ,  Price_USD_per_MWh  \n{rows}",
    "quoted": '"timestamp","price_usd_per_mwh"\n{rows}',
    "crlf": "timestamp,price_usd_per_mwh\r\n{rows}",
    "semicolon": "timestamp;price_usd_per_mwh\n{rows}",
    "tab": "timestamp\tprice_usd_per_mwh\n{rows}",
    "sep line": "sep=|\ntimestamp|price_usd_per_mwh\n{rows}",
    "blank lines": "\n\ntimestamp,price_usd_per_mwh\n\n{rows}\n\n",
}


@pytest.mark.parametrize("variant", HEADER_VARIANTS)
def test_header_and_dialect_variants_give_the_same_series(tmp_path: Path, variant: str) -> None:
    template = HEADER_VARIANTS[variant]
    delimiter = {"semicolon": ";", "tab": "\t", "sep line": "|"}.get(variant, ",")
    newline = "\r\n" if variant == "crlf" else "\n"
    rows = newline.join(f"2024-06-01T00:{m:02d}:00Z{delimiter}{p}"
                        for m, p in ((0, "10.5"), (15, "-2.25"), (30, "30")))
    raw = template.format(rows=rows).encode("utf-8")
    if variant == "bom":
        assert raw.startswith(b"\xef\xbb\xbf")
    path = tmp_path / "p.csv"
    path.write_bytes(raw)
    s = load_price_csv(path)
    assert s.start_s.tolist() == grid("2024-06-01T00:00", 3, 900)
    assert s.price_usd_per_mwh.tolist() == [10.5, -2.25, 30.0]


def test_utf16_excel_unicode_text_with_cr_line_ends(tmp_path: Path) -> None:
    text = "timestamp\tprice_usd_per_mwh\r2024-06-01T00:00:00Z\t1,5\r2024-06-01T01:00:00Z\t2,5\r"
    path = tmp_path / "p.txt"
    path.write_bytes(text.encode("utf-16"))
    s = load_price_csv(path)
    assert s.interval_s == 3600 and s.price_usd_per_mwh.tolist() == [1.5, 2.5]


@pytest.mark.parametrize(("cells", "values"), [
    (["1.234,56", "-7,5", "0"], [1234.56, -7.5, 0.0]),
    (["1234.5", "-7.25", "12"], [1234.5, -7.25, 12.0]),
])
def test_numbers_in_semicolon_files(tmp_path: Path, cells: list[str], values: list[float]) -> None:
    rows = "".join(f"2024-06-01T0{i}:00:00Z;{c}\n" for i, c in enumerate(cells))
    s = load_price_csv(write(tmp_path, "timestamp;price_usd_per_mwh\n" + rows))
    assert s.price_usd_per_mwh.tolist() == values


@pytest.mark.parametrize(("text", "message"), [
    # "4.857" may be 4.857 or 4857: a file that also writes "16,5" cannot be read safely.
    ("timestamp;price_usd_per_mwh\n0;16,5\n3600;4.857\n", r":3: '4\.857' uses '\.'.*line 2"),
    ('timestamp,price_usd_per_mwh\n0,"1,234"\n3600,2\n', r":2: '1,234'.*thousands or a decimal"),
    ("timestamp,price_usd_per_mwh\n0,1\n3600,\n", r":3: no value in column"),
    ("timestamp,price_usd_per_mwh\n0,1\n3600,nan\n", r":3: price is not a number"),
])
def test_doubtful_numbers_are_errors_not_guesses(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PriceFileError, match=message):
        load_price_csv(write(tmp_path, text))


# -- compressed and wrong kinds of file ----------------------------------------------------------


def test_zipped_and_gzipped_reports_are_read(tmp_path: Path) -> None:
    z = tmp_path / "cdr.00012301.SPPHLZNP6905.csv.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.write(ERCOT_RT_FALL, "cdr.00012301.0000000000000000.20241103.SPPHLZNP6905.csv")
    g = tmp_path / "rt.csv.gz"
    g.write_bytes(gzip.compress(ERCOT_RT_FALL.read_bytes()))
    for path in (z, g):
        s = load_prices(path, settlement_point="HB_SOUTH")
        assert s.price_usd_per_mwh.tolist() == [10 + 0.25 * k for k in range(100)]


def test_zip_with_several_files_and_excel_workbooks_are_refused_clearly(tmp_path: Path) -> None:
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as f:
        f.writestr("a.csv", "x")
        f.writestr("b.csv", "y")
    with pytest.raises(PriceFileError, match=r"exactly one \.csv inside; found a\.csv, b\.csv"):
        load_prices(two)
    book = tmp_path / "rtm.xlsx"
    with zipfile.ZipFile(book, "w") as f:
        f.writestr("[Content_Types].xml", "<Types/>")
        f.writestr("xl/workbook.xml", "<workbook/>")
    with pytest.raises(PriceFileError, match=r"Excel workbook.*save the sheet as CSV"):
        load_prices(book)


# -- time zones ----------------------------------------------------------------------------


def test_a_naive_time_in_the_spring_forward_gap_is_an_error_naming_the_line(
        tmp_path: Path) -> None:
    text = ("interval_start_local,price_usd_per_mwh\n2024-03-10 01:45:00,1\n"
            "2024-03-10 02:00:00,2\n2024-03-10 03:00:00,3\n")
    with pytest.raises(PriceFileError, match=r":3: 2024-03-10 02:00 does not exist in "
                                             r"America/Chicago"):
        load_prices(write(tmp_path, text), timezone="America/Chicago")


def test_a_local_time_three_times_is_a_duplicate(tmp_path: Path) -> None:
    text = ("interval_start_local,price_usd_per_mwh\n" +
            "".join(f"2024-11-03 01:00:00,{p}\n" for p in (1, 2, 3)))
    with pytest.raises(PriceFileError, match=r":4: duplicate: 2024-11-03 01:00 .* a third time"):
        load_prices(write(tmp_path, text), timezone="America/Chicago")


def test_naive_local_times_of_unknown_zone_are_an_error_until_named(tmp_path: Path) -> None:
    path = write(tmp_path, "interval_start_local,price_usd_per_mwh\n"
                           "2024-06-01 00:00:00,1\n2024-06-01 00:15:00,2\n")
    with pytest.raises(PriceFileError, match=r":2: 2024-06-01 00:00 has no UTC offset and the "
                                             r"file does not say its time zone.*--timezone"):
        load_prices(path)
    s = load_prices(path, timezone="America/Denver")
    assert s.start_s.tolist() == grid("2024-06-01T06:00", 2, 900)


def test_offsets_in_the_file_win_and_timezone_only_names_the_display_zone(
        tmp_path: Path) -> None:
    path = write(tmp_path, "timestamp,price_usd_per_mwh\n2024-06-01T00:00:00+02:00,1\n"
                           "2024-06-01T00:15:00+02:00,2\n")
    s = load_prices(path, timezone="America/Chicago")
    assert s.start_s.tolist() == grid("2024-05-31T22:00", 2, 900)
    assert s.timezone == "America/Chicago"
    assert s.span_text() == ("2024-05-31 17:00 CDT to 2024-05-31 17:15 CDT "
                             "(America/Chicago)")


def test_generic_naive_timestamps_stay_utc_and_say_so_in_the_log(tmp_path: Path) -> None:
    path = write(tmp_path, "timestamp,price_usd_per_mwh\n2024-06-01 00:00,1\n"
                           "2024-06-01 00:15,2\n")
    with capture_logs() as logs:
        s = load_prices(path)
    assert s.start_s.tolist() == grid("2024-06-01T00:00", 2, 900) and s.timezone == "UTC"
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "prices_naive_times_read_as_utc"]


def test_a_utc_column_is_utc_by_the_file_not_by_convention(tmp_path: Path) -> None:
    path = write(tmp_path, "interval_start_utc,price_usd_per_mwh\n2024-06-01 00:00,1\n"
                           "2024-06-01 00:15,2\n")
    with capture_logs() as logs:
        s = load_prices(path)
    assert s.start_s.tolist() == grid("2024-06-01T00:00", 2, 900)
    assert [e for e in logs if e["log_level"] == "warning"] == []


@pytest.mark.parametrize(("header", "zone", "local_utc"), [
    # The review's repro: read as UTC and shown as "2024-05-31 19:00 CDT", a 5-hour shift
    # with only a log line to say so.
    ("timestamp,hb_south_rtm_spp_usd_mwh", "America/Chicago", "2024-06-01T05:00"),
    ("time,hb_south_rtm_spp_usd_mwh", "America/Chicago", "2024-06-01T05:00"),
    ("datetime,price_usd_per_mwh,lz_houston_rtm_spp_usd_mwh", "America/Chicago",
     "2024-06-01T05:00"),
    ("Timestamp,ERCOT_HB_NORTH", "America/Chicago", "2024-06-01T05:00"),
    ("timestamp,SettlementPointPrice", "America/Chicago", "2024-06-01T05:00"),
    ("timestamp,caiso_np15_lmp", "America/Los_Angeles", "2024-06-01T07:00"),
    ("timestamp,np15_price_usd_per_mwh", "America/Los_Angeles", "2024-06-01T07:00"),
    ("timestamp,pjm_western_hub_lmp", "America/New_York", "2024-06-01T04:00"),
])
def test_naive_timestamps_beside_a_markets_columns_need_their_zone_named(
        tmp_path: Path, header: str, zone: str, local_utc: str) -> None:
    column = header.split(",")[1]
    extra = ",1" * (header.count(",") - 1)
    path = write(tmp_path, f"{header}\n2024-06-01 00:00,20{extra}\n2024-06-01 00:15,21{extra}\n")
    with pytest.raises(PriceFileError, match=(
            rf":2: 2024-06-01 00:00 has no UTC offset, and the columns name a market whose "
            rf"clock is {zone} .*--timezone \({zone} or UTC\)")):
        load_prices(path, column)
    local = load_prices(path, column, timezone=zone)
    assert local.start_s.tolist() == grid(local_utc, 2, 900)
    assert local.local_time(float(local.start_s[0])).hour == 0
    utc = load_prices(path, column, timezone="UTC")
    assert utc.start_s.tolist() == grid("2024-06-01T00:00", 2, 900) and utc.timezone == "UTC"


@pytest.mark.parametrize(("header", "rows", "first_utc"), [
    # Times with their offset, or Unix seconds, are exact: no zone to name.
    ("timestamp,hb_south_rtm_spp_usd_mwh",
     ["2024-06-01T00:00:00-05:00,20", "2024-06-01T00:15:00-05:00,21"], "2024-06-01T05:00"),
    ("timestamp,hb_south_rtm_spp_usd_mwh", ["1717200000,20", "1717200900,21"],
     "2024-06-01T00:00"),
    # Columns that say their clock: UTC by the file, or the market's local time.
    ("interval_start_utc,hb_south_rtm_spp_usd_mwh",
     ["2024-06-01 00:00,20", "2024-06-01 00:15,21"], "2024-06-01T00:00"),
    ("interval_start_local,hb_south_rtm_spp_usd_mwh",
     ["2024-06-01 00:00,20", "2024-06-01 00:15,21"], "2024-06-01T05:00"),
])
def test_ercot_named_generic_files_that_say_their_clock_load_without_a_zone(
        tmp_path: Path, header: str, rows: list[str], first_utc: str) -> None:
    s = load_prices(write(tmp_path, "\n".join([header, *rows]) + "\n"))
    assert s.start_s.tolist() == grid(first_utc, 2, 900)
    assert s.timezone == "America/Chicago"


def test_unknown_zone_name_is_a_clear_error() -> None:
    with pytest.raises(PriceFileError, match="unknown time zone 'America/Chicgo'"):
        load_prices(DST_CASE, timezone="America/Chicgo")


ZONES = ("America/Chicago", "America/New_York", "America/Los_Angeles", "Europe/Berlin",
         "Australia/Sydney", "Australia/Lord_Howe", "America/Santiago", "Asia/Kolkata")


@cache
def changes_2024(zone_name: str) -> tuple[datetime, ...]:
    """UTC instants in 2024 where the zone's offset changes (none for Asia/Kolkata)."""
    zone = ZoneInfo(zone_name)
    t = datetime(2024, 1, 1, tzinfo=UTC)
    out = []
    while t.year == 2024:
        if t.astimezone(zone).utcoffset() != (t + timedelta(minutes=30)).astimezone(
                zone).utcoffset():
            out.append(t + timedelta(minutes=30))
        t += timedelta(minutes=30)
    return tuple(out) or (datetime(2024, 6, 1, tzinfo=UTC),)


@given(zone_name=st.sampled_from(ZONES), which=st.integers(0, 3),
       interval_s=st.sampled_from([300, 900, 1800, 3600]), n=st.integers(4, 120),
       before=st.floats(0, 1), flagged=st.booleans(), descending=st.booleans())
# At least four rows: three hourly rows around Lord Howe's 30-minute change, (00:00, 01:00,
# 01:30), fit both passes equally well, and a file that small says too little.
def test_naive_local_files_across_any_change_give_the_utc_grid(
        tmp_path_factory: pytest.TempPathFactory, *, zone_name: str, which: int,
        interval_s: int, n: int, before: float, flagged: bool, descending: bool) -> None:
    zone = ZoneInfo(zone_name)
    changes = changes_2024(zone_name)
    change = changes[which % len(changes)]
    start = change - timedelta(seconds=interval_s * int(before * (n - 1)))
    utc = [start + timedelta(seconds=interval_s * k) for k in range(n)]
    locals_ = [t.astimezone(zone) for t in utc]
    # Rows all inside the repeated hour and unflagged say nothing about which pass they are.
    assume(flagged or not all(
        t.replace(fold=0).utcoffset() != t.replace(fold=1).utcoffset() for t in locals_))
    rows = []
    for k, t in enumerate(utc):
        local = t.astimezone(zone)
        flag = f",{'Y' if local.fold else 'N'}" if flagged else ""
        rows.append(f"{local.replace(tzinfo=None):%Y-%m-%d %H:%M:%S},{k}{flag}")
    if descending:
        rows.reverse()
    header = "interval_start_local,price_usd_per_mwh" + (",DSTFlag" if flagged else "")
    path = tmp_path_factory.mktemp("p") / "p.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    s = load_prices(path, timezone=zone_name)
    assert s.start_s.tolist() == [t.timestamp() for t in utc]
    assert s.price_usd_per_mwh.tolist() == list(range(n))
    assert s.interval_s == interval_s


# -- errors name the file, the line, what was found and what was expected ------------------------


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("timestamp,price_usd_per_mwh\n0,1\n300,2\n900,3\n1200,4\n", None,
         r":4: gap after 1970-01-01 00:05 UTC \(line 3\): step 600 s, expected 300 s"),
        ("timestamp,price_usd_per_mwh\n0,1\n300,2\n300,3\n600,4\n", None,
         r":4: duplicate: the interval starting 1970-01-01 00:05 UTC is also on line 3"),
        ("timestamp,price_usd_per_mwh\n0,1\n300,cheap\n", None, ":3: unparseable row"),
        ("timestamp,price_usd_per_mwh\n0,1\n300,2\n", "lmp",
         r":1: unknown column 'lmp' \(columns: 'timestamp', 'price_usd_per_mwh'\)"),
        ("when,price\n0,1\n", None,
         r":1: no time column in the header \(found 'when', 'price'\); expected one of the "
         r"layouts ercot: DeliveryDate.*gridstatus: Interval Start; generic: timestamp"),
        ("Time,Interval Start,Location,Cost\n2024-06-01T00:00Z,2024-06-01T00:00Z,X,1\n", None,
         r"no price column found for the gridstatus layout; name one with --price-column "
         r"\(columns: 'Time', 'Interval Start', 'Location', 'Cost'\)"),
        ("DeliveryDate,HourEnding,SettlementPoint,SettlementPointPrice\n"
         "11/03/2024,25:00,HB_SOUTH,1\n", None,
         r":2: unparseable row: 'HourEnding' = '25:00': expected an hour ending 1-24"),
        ("timestamp,price_usd_per_mwh,DSTFlag\n0,1,maybe\n", None,
         r":2: unparseable row: 'DSTFlag' = 'maybe': DST flag 'maybe' is not Y or N"),
        ("timestamp,price_usd_per_mwh\n2024-06-01T00:00Z,1\n", None,
         "needs at least two intervals, found 1"),
        ("", None, "empty file"),
        ('sep="\ntimestamp,price_usd_per_mwh\n0,1\n', None,
         r':1: sep=": fields must be separated by , ; tab or \|'),
    ],
)
def test_bad_files_get_clear_errors(tmp_path: Path, text: str, column: str | None,
                                    message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PriceFileError, match=message) as e:
        load_price_csv(path, column)
    assert str(e.value).startswith(str(path))


HEADERS = ["timestamp,price_usd_per_mwh",
           "interval_start_local,hb_south_rtm_spp_usd_mwh,DSTFlag",
           "DeliveryDate,DeliveryHour,DeliveryInterval,SettlementPointName,"
           "SettlementPointPrice,DSTFlag", "DeliveryDate;HourEnding;SettlementPoint;"
           "SettlementPointPrice", "Interval Start,Location,Market,SPP",
           "INTERVALSTARTTIME_GMT,NODE,LMP_TYPE,MW",
           "datetime_beginning_ept,pnode_name,total_lmp_rt"]
CELLS = ["", " ", "0", "1", "-3.5", "1,5", "1.234,5", "nan", "inf", "1e400", "25", "24:00",
         "02:00", "Y", "N", "maybe", "LMP", "MCE", "HB_SOUTH", "HB_NORTH", "11/03/2024",
         "03.11.2024", "2024-11-03 01:00:00", "2024-11-03T01:00:00-05:00", "2024-03-10 02:30",
         "11/3/2024 1:00:00 AM", "9999-12-31", "0001-01-01", "1e12", "-1e12", '"', "\x00"]


@given(header=st.sampled_from(HEADERS), rows=st.lists(st.lists(
    st.sampled_from(CELLS), min_size=0, max_size=7), max_size=12),
    sep=st.sampled_from([",", ";"]), zone=st.sampled_from([None, "America/Chicago"]))
def test_any_table_of_plausible_cells_loads_or_says_why(
        tmp_path_factory: pytest.TempPathFactory, header: str, rows: list[list[str]], sep: str,
        zone: str | None) -> None:
    text = header.replace(",", sep) + "\n" + "\n".join(sep.join(r) for r in rows) + "\n"
    path = tmp_path_factory.mktemp("fuzz") / "p.csv"
    path.write_text(text)
    try:
        s = load_prices(path, timezone=zone, settlement_point=None)
    except PriceFileError as e:
        assert str(e).startswith(str(path))
        return
    assert len(s) >= 2 and np.all(np.diff(s.start_s) == s.interval_s)
    assert np.all(np.isfinite(s.price_usd_per_mwh))


@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_loader(tmp_path_factory: pytest.TempPathFactory,
                                                data: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "p.csv"
    path.write_bytes(data)
    try:
        load_price_csv(path)
    except PriceFileError as e:
        assert str(e).startswith(str(path))


def price_file(tmp_path: Path, prices: list[str], column: str = "price_usd_per_mwh") -> Path:
    """A generic file of 15-minute prices from 2024-06-01 00:00 UTC, one per line from line 2."""
    start = datetime(2024, 6, 1, tzinfo=UTC)
    rows = [f"{start + timedelta(minutes=15 * k):%Y-%m-%dT%H:%M:%SZ},{p}"
            for k, p in enumerate(prices)]
    return write(tmp_path, "\n".join([f"timestamp,{column}", *rows]) + "\n")


def test_prices_all_under_one_look_like_usd_per_kwh(tmp_path: Path) -> None:
    # The review's kwh.csv: a day of $/kWh (0.025-0.0345) under a $/MWh header, which
    # loaded as $/MWh without a word.
    kwh = [f"{0.025 + 0.0001 * k:.4f}" for k in range(96)]
    path = price_file(tmp_path, kwh)
    with pytest.raises(PriceFileError, match=(
            r":97: every price is under 1 in magnitude \(the largest of them, 0.0345, is on this "
            r"line\): \$/kWh, not \$/MWh\? Give --price-unit usd_per_kwh .*--price-unit "
            r"usd_per_mwh")):
        load_prices(path)
    s = load_prices(path, unit="usd_per_kwh")
    assert s.price_usd_per_mwh.tolist() == pytest.approx([25.0 + 0.1 * k for k in range(96)])
    assert load_prices(path, unit="usd_per_mwh").price_usd_per_mwh[-1] == 0.0345
    # Negative ones count by their magnitude.
    with pytest.raises(PriceFileError, match=r":3: every price is under 1"):
        load_prices(price_file(tmp_path, ["0.2", "-0.9", "0.5"]))
    # $/kWh with a scarcity spike (2.5 $/kWh) is still $/kWh: nine in ten under 1.
    spiky = ["0.03"] * 12 + ["2.5"] + ["0.031"] * 7
    with pytest.raises(PriceFileError, match=r":15: 19 of 20 prices are under 1 in magnitude "
                                             r"\(the largest of them, 0.031"):
        load_prices(price_file(tmp_path, spiky))
    assert load_prices(price_file(tmp_path, spiky), unit="usd_per_kwh").price_usd_per_mwh.max() \
        == 2500.0
    # A quiet $/MWh day: prices near zero for hours, but not nine tenths of them.
    quiet = ["0.5", "-0.2", "0.0", "0.8", "-0.9", "0.1", "12.5", "25.0", "31.2", "18.0"]
    assert load_prices(price_file(tmp_path, quiet)).price_usd_per_mwh.tolist() == [
        float(p) for p in quiet]
    # All zeros: a column of missing values, not prices.
    with pytest.raises(PriceFileError, match=r":2: every price is 0: a column of missing"):
        load_prices(price_file(tmp_path, ["0", "0.0", "0"]))


@pytest.mark.parametrize(("prices", "line", "shown"), [
    # The review's huge.csv: one row of 1e9 $/MWh, which backtest accepted.
    (["20", "21", "22", "23", "24", "1e9", "26"], 7, "1000000000"),
    (["20", "-250000", "22"], 3, "-250000"),
    (["20", "100000.01", "22"], 3, "100000.01"),
])
def test_a_price_beyond_any_market_is_an_error_naming_the_line(
        tmp_path: Path, prices: list[str], line: int, shown: str) -> None:
    path = price_file(tmp_path, prices)
    with pytest.raises(PriceFileError, match=(
            rf":{line}: price {re.escape(shown)} is beyond any market's .*--price-unit "
            "usd_per_mwh if it is truly meant")):
        load_prices(path)
    assert load_prices(path, unit="usd_per_mwh").price_usd_per_mwh.tolist() == [
        float(p) for p in prices]


def test_real_market_extremes_load_as_they_are(tmp_path: Path) -> None:
    # ERCOT's 9,000 $/MWh cap of 2021, its -250 floor, a block of scarcity pricing.
    prices = ["25", "9000", "9000", "-250", "3000", "3000", "100000", "-100000"]
    assert load_prices(price_file(tmp_path, prices)).price_usd_per_mwh.tolist() == [
        float(p) for p in prices]


@pytest.mark.parametrize(("column", "message", "unit", "factor"), [
    ("price_cents_per_kwh", r"in cents per kWh.*--price-unit cents_per_kwh to convert them "
     r"\(x 10\)", "cents_per_kwh", 10.0),
    ("PriceCentsPerKWh", r"in cents per kWh", "cents_per_kwh", 10.0),
    ("ct/kWh", r"in cents per kWh", "cents_per_kwh", 10.0),
    ("price_usd_per_kwh", r"in \$/kWh.*--price-unit usd_per_kwh to convert them \(x 1000\)",
     "usd_per_kwh", 1000.0),
    ("price_eur_per_mwh", r"names EUR: mineops prices are US dollars per MWh", "usd_per_mwh",
     1.0),
    ("Preis (€/MWh)", r"names €", "usd_per_mwh", 1.0),
    ("GBP/MWh", r"names GBP", "usd_per_mwh", 1.0),
])
def test_a_price_column_named_in_another_unit_is_an_error_until_the_unit_is_given(
        tmp_path: Path, column: str, message: str, unit: str, factor: float) -> None:
    # The review's cents.csv (2.50-3.45 cents/kWh) would load as 2.5-3.45 $/MWh once its
    # column was named: values over 1, so only the name tells.
    path = price_file(tmp_path, ["2.50", "2.51", "3.45"], column)
    with pytest.raises(PriceFileError, match=rf"{path}:1: price column .*{message}"):
        load_prices(path, column)
    s = load_prices(path, column, unit=unit)
    assert s.price_usd_per_mwh.tolist() == pytest.approx([2.5 * factor, 2.51 * factor,
                                                          3.45 * factor])


def test_the_builtin_trace_is_in_usd_per_mwh() -> None:
    with pytest.raises(PriceFileError, match="its prices are \\$/MWh; --price-unit usd_per_kwh"):
        load_prices(ERCOT, unit="usd_per_kwh")
    assert load_prices(ERCOT, unit="usd_per_mwh").price_usd_per_mwh.max() == pytest.approx(
        4857.82)
    with pytest.raises(PriceFileError, match="unknown price unit 'mills'"):
        load_prices(DST_CASE, unit="mills")


def test_rows_in_any_order_are_sorted(tmp_path: Path) -> None:
    s = load_price_csv(write(tmp_path, "timestamp,price_usd_per_mwh\n600,3\n0,1\n300,2\n"))
    assert s.start_s.tolist() == [0, 300, 600] and s.price_usd_per_mwh.tolist() == [1, 2, 3]


# -- the built-in trace, the simulator's prices, the command line --------------------------------


def test_reads_the_real_ercot_file_by_its_builtin_name() -> None:
    s = load_prices(ERCOT)
    assert len(s) == 11_712 and s.interval_s == 900
    assert s.column == "hb_south_rtm_spp_usd_mwh"
    assert s.price_usd_per_mwh.max() == pytest.approx(4857.82)
    assert s.price_usd_per_mwh.min() == pytest.approx(-3.37)
    dam = load_prices(ERCOT, "hb_south_dam_spp_usd_mwh")
    assert not np.array_equal(dam.price_usd_per_mwh, s.price_usd_per_mwh)


def test_builtin_trace_is_central_time_shown_with_its_zone() -> None:
    s = load_prices(ERCOT)
    assert s.timezone == "America/Chicago" and s.location == "HB_SOUTH"
    assert s.start_s[0] == utc_s("2024-06-01T05:00")  # 00:00 CDT
    # The peak of the README (2024-08-20 19:30 local) is the maximum.
    peak = float(s.start_s[int(np.argmax(s.price_usd_per_mwh))])
    assert f"{s.local_time(peak):%Y-%m-%d %H:%M %Z}" == "2024-08-20 19:30 CDT"
    assert s.span_text() == ("2024-06-01 00:00 CDT to 2024-09-30 23:45 CDT "
                             "(America/Chicago)")
    with pytest.raises(PriceFileError, match="its times are America/Chicago"):
        load_prices(ERCOT, timezone="UTC")
    with pytest.raises(PriceFileError, match="prices for HB_SOUTH only"):
        load_prices(ERCOT, settlement_point="HB_NORTH")
    assert load_prices(ERCOT, settlement_point="hb_south").location == "HB_SOUTH"


def test_synthetic_prices_look_like_a_market() -> None:
    s = synthetic_prices(days=28)
    p = s.price_usd_per_mwh
    assert len(s) == 28 * 96
    assert (p < 0).any(), "occasional negative middays"
    assert (p > 100).sum() > 3, "evening spikes"
    assert 10 < np.median(p) < 60
    hours = (s.start_s % 86_400) // 3600
    assert p[(hours >= 18) & (hours <= 21)].mean() > p[(hours >= 1) & (hours <= 5)].mean()


def test_builtin_traces_ship_with_their_licence_and_are_listed_in_help(
        capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.resources import files  # noqa: PLC0415

    shipped = files("drivers.prices") / "data"
    licence = (shipped / "LICENSE.MPC-BESS-ERCOT.txt").read_text()
    assert licence.startswith("MIT License")
    assert "ThibaudCambronne/MPC-BESS-ERCOT" in (shipped / "README.md").read_text()
    for command in (["demo", "--help"], ["backtest", "--help"], ["simulate", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        help_text = " ".join(capsys.readouterr().out.split())
        assert all(name in help_text for name in DATASETS), command
        assert "--timezone ZONE" in help_text and "--settlement-point NAME" in help_text


def test_an_unknown_name_is_read_as_a_path_and_says_so() -> None:
    with pytest.raises(PriceFileError, match="ercot-typo: cannot open"):
        load_prices("ercot-typo")


def test_simulate_and_demo_take_the_price_file_options() -> None:
    for command in ("simulate", "demo"):
        extra = ["--config", "site.toml"] if command == "simulate" else []
        args = parser().parse_args([command, *extra, "--prices", "rt.csv", "--timezone",
                                     "America/Chicago", "--settlement-point", "HB_SOUTH"])
        assert (args.timezone, args.settlement_point) == ("America/Chicago", "HB_SOUTH")


def write_site(tmp_path: Path) -> Path:
    f = tmp_path / "site.toml"
    f.write_text('site_id = "cli"\npower_cap_kw = 60\nhashprice_usd_per_ph_day = 45\n'
                 '[[fleet.groups]]\nname = "r1"\nmodel = "s21"\ncount = 8\n')
    return f


def test_backtest_cli_on_an_ercot_report_with_a_settlement_point(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = str(write_site(tmp_path))
    code = main(["backtest", "--config", site, "--prices", str(ERCOT_RT_FALL),
                 "--progress", "off", "--json"])
    assert code == 2
    assert "choose one with --settlement-point" in capsys.readouterr().err
    code = main(["backtest", "--config", site, "--prices", str(ERCOT_RT_FALL),
                 "--settlement-point", "HB_SOUTH", "--progress", "off", "--json"])
    assert code == 0
    s = json.loads(capsys.readouterr().out)
    assert s["intervals"] == 100 and s["price_location"] == "HB_SOUTH"
    assert s["price_timezone"] == "America/Chicago"
    assert s["price_column"] == "SettlementPointPrice"


def test_backtest_text_report_shows_local_time_with_its_zone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["backtest", "--config", str(write_site(tmp_path)), "--prices", str(DST_CASE),
                 "--progress", "off"])
    assert code == 0
    out = capsys.readouterr().out
    assert ("prices: hb_south_rtm_spp_usd_mwh, 2024-11-02 22:00 CDT to 2024-11-03 02:45 CST "
            "(America/Chicago)") in out
    assert "from 2024-11-03 03:00 UTC" in out


def test_naive_window_times_are_read_on_the_price_files_clock(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    windows = write(tmp_path, "start,end,cap_kw\n2024-11-03T01:00:00,2024-11-03T01:30:00,0\n",
                    "windows.csv")
    [w] = load_windows(windows, naive_tz=CHICAGO)
    assert (w.start_s, w.end_s) == (utc_s("2024-11-03T06:00"), utc_s("2024-11-03T06:30"))
    code = main(["backtest", "--config", str(write_site(tmp_path)), "--prices", str(DST_CASE),
                 "--windows", str(windows), "--progress", "off", "--json"])
    assert code == 0
    # 01:00-01:30 CDT (the first pass) covers two of the file's intervals; read as UTC it
    # would fall before the file's first interval (03:00 UTC) and cover none.
    assert json.loads(capsys.readouterr().out)["grid_window_intervals"] == 2



def test_backtest_cli_refuses_prices_in_another_unit_until_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = str(write_site(tmp_path))
    kwh = price_file(tmp_path, [f"{0.025 + 0.0001 * k:.4f}" for k in range(96)])
    code = main(["backtest", "--config", site, "--prices", str(kwh), "--progress", "off",
                 "--json"])
    assert code == 2
    assert f"{kwh}:97: every price is under 1" in capsys.readouterr().err
    code = main(["backtest", "--config", site, "--prices", str(kwh), "--price-unit",
                 "usd_per_kwh", "--progress", "off", "--json"])
    assert code == 0
    s = json.loads(capsys.readouterr().out)
    assert s["intervals"] == 96
    naive = write(tmp_path, "timestamp,hb_south_rtm_spp_usd_mwh\n2024-06-01 00:00,20\n"
                            "2024-06-01 00:15,21\n", "hb.csv")
    code = main(["backtest", "--config", site, "--prices", str(naive), "--progress", "off"])
    assert code == 2 and "--timezone (America/Chicago or UTC)" in capsys.readouterr().err
    code = main(["backtest", "--config", site, "--prices", str(naive), "--timezone",
                 "America/Chicago", "--progress", "off"])
    assert code == 0
    assert "2024-06-01 00:00 CDT to 2024-06-01 00:15 CDT" in capsys.readouterr().out


def test_every_price_command_takes_the_price_unit() -> None:
    for command in ("simulate", "demo", "backtest"):
        extra = ["--config", "site.toml"] if command != "demo" else []
        args = parser().parse_args([command, *extra, "--prices", "p.csv", "--price-unit",
                                     "cents_per_kwh"])
        assert args.price_unit == "cents_per_kwh"
        with pytest.raises(SystemExit):
            parser().parse_args([command, *extra, "--price-unit", "mills"])

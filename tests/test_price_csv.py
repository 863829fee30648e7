"""Price files: the real ERCOT export and the generic format, with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drivers.prices import PriceFileError, load_price_csv, load_prices
from simulators.prices import synthetic_prices
from tests.conftest import ERCOT


def test_reads_the_real_ercot_file_by_its_builtin_name() -> None:
    s = load_prices(ERCOT)
    assert len(s) == 11_712 and s.interval_s == 900
    assert s.column == "hb_south_rtm_spp_usd_mwh"
    assert s.price_usd_per_mwh.max() == pytest.approx(4857.82)
    assert s.price_usd_per_mwh.min() == pytest.approx(-3.37)
    dam = load_prices(ERCOT, "hb_south_dam_spp_usd_mwh")
    assert not np.array_equal(dam.price_usd_per_mwh, s.price_usd_per_mwh)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "prices.csv"
    p.write_text(text)
    return p


def test_generic_format(tmp_path: Path) -> None:
    s = load_price_csv(write(tmp_path, "timestamp,price_usd_per_mwh\n"
                             "2024-01-01T00:00:00Z,10\n2024-01-01T00:05:00Z,-2.5\n"
                             "2024-01-01T00:10:00Z,30\n"))
    assert s.interval_s == 300 and s.price_usd_per_mwh.tolist() == [10, -2.5, 30]


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("timestamp,price_usd_per_mwh\n0,1\n300,2\n900,3\n1200,4\n", None, "gap"),
        ("timestamp,price_usd_per_mwh\n0,1\n300,2\n300,3\n600,4\n", None, "duplicate"),
        ("timestamp,price_usd_per_mwh\n0,1\n300,cheap\n", None, ":3: unparseable row"),
        ("timestamp,price_usd_per_mwh\n0,1\n300,2\n", "lmp", "unknown column 'lmp'"),
        ("when,price\n0,1\n", None, "no time column"),
        ("", None, "empty file"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path: Path, text: str, column: str | None,
                                    message: str) -> None:
    with pytest.raises(PriceFileError, match=message):
        load_price_csv(write(tmp_path, text), column)


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

    from controller.cli.main import main  # noqa: PLC0415
    from drivers.prices import DATASETS  # noqa: PLC0415

    shipped = files("drivers.prices") / "data"
    licence = (shipped / "LICENSE.MPC-BESS-ERCOT.txt").read_text()
    assert licence.startswith("MIT License")
    assert "ThibaudCambronne/MPC-BESS-ERCOT" in (shipped / "README.md").read_text()
    for command in (["demo", "--help"], ["backtest", "--help"], ["simulate", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        help_text = " ".join(capsys.readouterr().out.split())
        assert all(name in help_text for name in DATASETS), command


def test_an_unknown_name_is_read_as_a_path_and_says_so() -> None:
    with pytest.raises(PriceFileError, match="ercot-typo: cannot open"):
        load_prices("ercot-typo")

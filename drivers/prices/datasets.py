"""Price traces shipped with mineops, named on the command line without a path.

`--prices ercot-hb-south-2024-summer` replays the real ERCOT trace packaged here;
anything that is not a built-in name is read as a CSV path. Sources and licences
are in data/README.md beside the data files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib.resources import as_file, files
from pathlib import Path

from drivers.prices.files import load_price_csv
from drivers.prices.series import PriceFileError, PriceSeries

_DATA = files("drivers.prices") / "data"


@dataclass(frozen=True, slots=True)
class PriceDataset:
    """A packaged price file, the price column used when none is named, and its clock.

    `timezone` is the IANA zone of the file's naive local times; `location` the settlement
    point its prices are for.
    """

    name: str
    file: str
    price_column: str
    description: str
    timezone: str
    location: str


DATASETS: dict[str, PriceDataset] = {
    d.name: d
    for d in (
        PriceDataset(
            name="ercot-hb-south-2024-summer",
            file="ercot_hb_south_rt15_2024-06_2024-09.csv",
            price_column="hb_south_rtm_spp_usd_mwh",
            description="ERCOT real-time prices at HB_SOUTH, 15 min, Jun-Sep 2024 (MIT, "
            "ThibaudCambronne/MPC-BESS-ERCOT)",
            # Jun-Sep is all daylight time (CDT), so the author's smoothing of the
            # daylight-saving changes touches none of these rows.
            timezone="America/Chicago",
            location="HB_SOUTH",
        ),
    )
}


def dataset_help() -> str:
    """One line per built-in name, for --help texts."""
    return "; ".join(f"{d.name}: {d.description}" for d in DATASETS.values())


def load_prices(
    source: str | Path,
    column: str | None = None,
    *,
    timezone: str | None = None,
    settlement_point: str | None = None,
    unit: str | None = None,
) -> PriceSeries:
    """A built-in trace by name, or a price file by path (see load_price_csv for the rest).

    A built-in trace's own zone, settlement point and unit ($/MWh) are facts: naming
    another with `timezone`, `settlement_point` or `unit` is an error rather than a silent
    reinterpretation.

    Raises:
        PriceFileError: the file cannot be read or checked (see load_price_csv).
    """
    dataset = DATASETS.get(str(source))
    if dataset is None:
        return load_price_csv(source, column, timezone=timezone,
                              settlement_point=settlement_point, unit=unit)
    if timezone is not None and timezone != dataset.timezone:
        raise PriceFileError(f"{dataset.name}: its times are {dataset.timezone}; "
                             f"--timezone {timezone} does not apply")
    if settlement_point is not None and settlement_point.strip().upper() != dataset.location:
        raise PriceFileError(f"{dataset.name}: prices for {dataset.location} only; "
                             f"--settlement-point {settlement_point} is not in it")
    if unit is not None and unit != "usd_per_mwh":
        raise PriceFileError(f"{dataset.name}: its prices are $/MWh; --price-unit {unit} "
                             "does not apply")
    with as_file(_DATA / dataset.file) as path:
        series = load_price_csv(path, column or dataset.price_column, timezone=dataset.timezone)
    return replace(series, location=dataset.location)


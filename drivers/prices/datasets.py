"""Price traces shipped with mineops, named on the command line without a path.

`--prices ercot-hb-south-2024-summer` replays the real ERCOT trace packaged here;
anything that is not a built-in name is read as a CSV path. Sources and licences
are in data/README.md beside the data files.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path

from drivers.prices.files import PriceSeries, load_price_csv

_DATA = files("drivers.prices") / "data"


@dataclass(frozen=True, slots=True)
class PriceDataset:
    """A packaged price file and the price column used when none is named."""

    name: str
    file: str
    price_column: str
    description: str


DATASETS: dict[str, PriceDataset] = {
    d.name: d
    for d in (
        PriceDataset(
            name="ercot-hb-south-2024-summer",
            file="ercot_hb_south_rt15_2024-06_2024-09.csv",
            price_column="hb_south_rtm_spp_usd_mwh",
            description="ERCOT real-time prices at HB_SOUTH, 15 min, Jun-Sep 2024 (MIT, "
            "ThibaudCambronne/MPC-BESS-ERCOT)",
        ),
    )
}


def dataset_help() -> str:
    """One line per built-in name, for --help texts."""
    return "; ".join(f"{d.name}: {d.description}" for d in DATASETS.values())


def load_prices(source: str | Path, column: str | None = None) -> PriceSeries:
    """A built-in trace by name, or a CSV file by path.

    Raises:
        PriceFileError: the file cannot be read or checked (see load_price_csv).
    """
    dataset = DATASETS.get(str(source))
    if dataset is None:
        return load_price_csv(source, column)
    with as_file(_DATA / dataset.file) as path:
        return load_price_csv(path, column or dataset.price_column)


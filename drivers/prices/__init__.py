"""Price series from files: CSV layouts of market exports, and the traces shipped with mineops.

`load_prices(name_or_path)` is the one entry point the CLI, the demo, the simulator and
the backtest use; `docs/backtest.md` lists the formats read.
"""

from drivers.prices.datasets import DATASETS, dataset_help, load_prices
from drivers.prices.files import PriceFileError, PriceSeries, load_price_csv

__all__ = [
    "DATASETS",
    "PriceFileError",
    "PriceSeries",
    "dataset_help",
    "load_price_csv",
    "load_prices",
]

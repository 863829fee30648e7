"""Price series from files: CSV layouts of market exports, and the traces shipped with mineops.

`load_prices(name_or_path, column, timezone=..., settlement_point=..., unit=...)` is the one entry
point the CLI, the demo, the simulator and the backtest use; `docs/prices.md` lists the
formats read. Modules: `reader` (bytes to header and rows), `layouts` (which columns mean
what, per market), `timezones` (local clocks to UTC), `files` (the checks),
`datasets` (the built-in traces), `series` (the result).
"""

from drivers.prices.datasets import DATASETS, dataset_help, load_prices
from drivers.prices.files import PRICE_UNITS, load_price_csv
from drivers.prices.layouts import LAYOUTS
from drivers.prices.series import PriceFileError, PriceSeries
from drivers.prices.timezones import parse_datetime

__all__ = [
    "DATASETS",
    "LAYOUTS",
    "PRICE_UNITS",
    "PriceFileError",
    "PriceSeries",
    "dataset_help",
    "load_price_csv",
    "load_prices",
    "parse_datetime",
]

"""The backtest: the daemon's own optimizer and policy over price history, and baselines.

`engine.py` runs the strategies, `classes.py` groups the fleet into classes of identical
miners, `windows.py` reads grid windows, `result.py` holds the settings and what a run
gives, `report.py` writes it out (text, CSV, chart).
"""

from controller.backtest.classes import FleetClasses
from controller.backtest.engine import run_backtest
from controller.backtest.result import STRATEGIES, BacktestResult, Series, Settings
from controller.backtest.windows import Window, WindowFileError, load_windows, window_caps

__all__ = [
    "STRATEGIES",
    "BacktestResult",
    "FleetClasses",
    "Series",
    "Settings",
    "Window",
    "WindowFileError",
    "load_windows",
    "run_backtest",
    "window_caps",
]

"""The backtest: the daemon's own optimizer and policy over historical prices, the baselines, and
its reports.
"""

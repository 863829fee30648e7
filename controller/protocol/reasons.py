"""Reason codes: why each miner got the target it got (logs, metrics, decision topic)."""

from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    """Why a miner is at its planned operating point; the first rule that decided wins."""

    PROFIT = 0  # economic optimum at the current price and hashprice
    CAP = 1  # held down by the site power cap
    GRID = 2  # held down by a grid obligation (event, peak window, frequency)
    THERMAL = 3  # derated because it runs hot
    DWELL = 4  # minimum run/sleep time not yet over
    RAMP = 5  # site ramp limit (kW/min) holds the change back
    HYSTERESIS = 6  # price moved too little to justify switching
    WAKE_LATENCY = 7  # a price dip shorter than the wake time is not worth waking for
    STALE = 8  # telemetry stale or missing: counted at max power, not commanded
    NEVER_CURTAIL = 9  # operator's never-curtail set
    OFFLINE = 10  # announced offline


REASON_NAMES: tuple[str, ...] = tuple(r.name.lower() for r in Reason)

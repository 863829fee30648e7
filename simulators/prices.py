"""Synthetic real-time prices for the demo: a daily shape, evening spikes, negative middays.

Shaped like an ERCOT summer hub price: cheap nights, a solar midday dip that
sometimes goes negative, an evening ramp, and rare scarcity spikes of
hundreds to thousands of $/MWh. Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np

from drivers.prices import PriceSeries

DAY_S = 86_400.0


def synthetic_prices(
    days: float = 7.0, interval_s: float = 900.0, seed: int = 7, start_s: float = 0.0
) -> PriceSeries:
    """A price series of `days` at `interval_s` resolution."""
    rng = np.random.default_rng(seed)
    n = int(days * DAY_S / interval_s)
    t = start_s + interval_s * np.arange(n)
    hour = (t % DAY_S) / 3600.0
    base = (
        24.0
        + 14.0 * np.exp(-(((hour - 8.0) / 2.0) ** 2))  # morning ramp
        - 20.0 * np.exp(-(((hour - 13.0) / 2.5) ** 2))  # solar midday
        + 55.0 * np.exp(-(((hour - 19.5) / 1.6) ** 2))  # evening peak as solar fades
    )
    # Autocorrelated noise: real prices wander, they do not jitter independently.
    noise = np.zeros(n)
    for i in range(1, n):
        noise[i] = 0.85 * noise[i - 1] + rng.normal(0.0, 4.0)
    price = base + noise
    # Scarcity spikes: short, mostly in the evening, heavy-tailed.
    evening = (hour >= 17.0) & (hour <= 21.5)
    spikes = evening & (rng.random(n) < 0.03)
    price[spikes] += rng.pareto(1.5, spikes.sum()) * 150.0 + 120.0
    return PriceSeries(t.astype(np.float64), np.round(price, 2).astype(np.float64), interval_s,
                       "synthetic")

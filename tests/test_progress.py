"""Progress of long start-ups: the bridge's first poll reports each miner polled, once."""

from __future__ import annotations

from simulators.fleet import SimulatedFleet
from simulators.luxos_api import LuxosApiServer
from tests.conftest import bridge_of
from tests.test_bridge_values import luxos, site  # noqa: F401 - the fixture, and its site


async def test_first_poll_reports_progress_then_stays_quiet(
        luxos: tuple[SimulatedFleet, LuxosApiServer]) -> None:  # noqa: F811
    _, api = luxos
    cfg = site([("a", "s21", 2), ("b", "s21", 1)], first_host=api.addresses["m0"])
    bridge = bridge_of(cfg)
    seen: list[int] = []
    bridge.first_poll_progress = seen.append
    await bridge.poll_once()
    assert seen == [1, 2, 3], "one call per miner polled, in the order they finish"
    await bridge.poll_once()
    assert seen == [1, 2, 3], "later polls are the bridge's routine, not a start-up"

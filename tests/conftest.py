"""Shared fixtures: a real MQTT broker on a free loopback port, and small site configs.

The broker is mosquitto when installed. Without it (a developer's fresh machine)
the embedded amqtt broker stands in and the test header says so; with
MINEOPS_REQUIRE_MOSQUITTO=1 (set by CI) a missing mosquitto fails the run.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from controller.catalogue import load_catalogue
from controller.config import SiteConfig
from controller.protocol.broker import LocalBroker, find_mosquitto
from controller.protocol.transport import Transport

REQUIRE_MOSQUITTO = os.environ.get("MINEOPS_REQUIRE_MOSQUITTO") == "1"

# CI replays a fixed sequence of examples, so a red CI is reproducible; developers'
# runs keep exploring new ones (that is where a property test finds bugs).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
# The real ERCOT trace shipped as package data (drivers/datasets), by its built-in name.
ERCOT = "ercot-hb-south-2024-summer"
# Device payloads copied from the vendors' documentation (sources in its README.md).
DEVICE_PAYLOADS = Path(__file__).parent / "fixtures" / "device-payloads"


def pytest_report_header(config: pytest.Config) -> str:
    forced = os.environ.get("MINEOPS_TEST_BROKER")
    if forced:
        return f"mqtt broker for integration tests: {forced} (MINEOPS_TEST_BROKER)"
    mosquitto = find_mosquitto()
    if mosquitto:
        return f"mqtt broker for integration tests: mosquitto ({mosquitto})"
    if REQUIRE_MOSQUITTO:
        return "mqtt broker: mosquitto REQUIRED (MINEOPS_REQUIRE_MOSQUITTO=1) but not installed"
    return ("mqtt broker for integration tests: embedded amqtt (mosquitto not installed; "
            "apt-get install mosquitto to test against it)")


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    """A fresh broker per test, stopped afterwards."""
    prefer = os.environ.get("MINEOPS_TEST_BROKER", "mosquitto" if REQUIRE_MOSQUITTO else "auto")
    with LocalBroker(prefer=prefer) as b:
        yield b


def make_site(broker: LocalBroker, groups: list[tuple[str, str, int]],
              **overrides: Any) -> SiteConfig:
    """A site config with racks (name, model, count) on the test broker; fast policy times.

    The cap defaults to twice the fleet's highest draw (plus aux): it does not bind, and
    `load_config` (which `mineops run` uses) does not take it for a unit typo.
    """
    catalogue = load_catalogue()
    max_kw = sum(catalogue.get(m).max_w * c for _, m, c in groups) * 1.05 / 1000.0
    data: dict[str, Any] = {
        "site_id": "test",
        "broker": {"host": broker.host, "port": broker.port, "reconnect_max_s": 0.5,
                   "keepalive_s": 5},
        "fleet": {"groups": [{"name": n, "model": m, "count": c} for n, m, c in groups]},
        "meters": [{"type": "mineops", "id": "poi"}],
        "power_cap_kw": round(2 * max_kw, 1),
        "hashprice_usd_per_ph_day": 42.0,
        "energy": {"adders_usd_per_mwh": 0.0, "aux_fraction": 0.05},
        "policy": {"decision_interval_s": 0.5, "telemetry_stale_s": 5.0,
                   "min_run_s": 0.0, "min_sleep_s": 0.0, "wake_latency_factor": 0.0},
        "metrics": {"host": "127.0.0.1", "port": 0},
        "grid": {"journal_path": str(Path(tempfile.mkdtemp(prefix="mineops-test-")) / "grid.db"),
                 "prepare_s": 2.0, "record_interval_s": 0.2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return SiteConfig.model_validate(data)


async def wait_for(cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    """Poll `cond` until true; fail the test with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what or cond}")
        await asyncio.sleep(0.05)


class Peer:
    """A plain MQTT client for tests: publishes, and records what arrives."""

    def __init__(self, cfg: SiteConfig, subscriptions: list[str] | None = None) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.transport = Transport(cfg.broker, client_id=f"test-peer-{id(self)}",
                                   subscriptions=subscriptions or [])

    async def run(self) -> None:
        await self.transport.run(lambda topic, raw: self.received.append((topic, raw)))

    async def publish(self, topic: str, payload: bytes | str, **kw: Any) -> None:
        await self.transport.connected.wait()
        assert await self.transport.publish(topic, payload, **kw), f"publish to {topic} failed"


@pytest.fixture
async def tasks() -> AsyncIterator[Callable[..., asyncio.Task[Any]]]:
    """Start background tasks that are cancelled and awaited when the test ends."""
    started: list[asyncio.Task[Any]] = []

    def start(coro: Any, name: str = "") -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name or None)
        started.append(task)
        return task

    yield start
    for task in reversed(started):
        task.cancel()
    # A task that ignores cancellation is a bug: fail the test rather than hang the run,
    # with the stacks of every task still alive (the stuck one is often a child).
    _, stuck = await asyncio.wait(started, timeout=30)
    if stuck:
        pytest.fail(f"tasks did not stop within 30 s of cancel: {[t.get_name() for t in stuck]}"
                    f"\n{task_stacks()}")


def task_stacks() -> str:
    """Name, pending cancel requests and stack of every task but the caller."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            print(f"--- {task.get_name()} (cancel requests: {task.cancelling()})", file=out)
            task.print_stack(file=out)
    return out.getvalue()


def bridge_of(cfg: SiteConfig, **kwargs: Any) -> Any:
    """The site's `MinerBridge`, built from its sections as `mineops bridge` builds it."""
    from drivers.firmware.bridge import MinerBridge  # noqa: PLC0415 - pyasic is slow to import

    assert cfg.bridge is not None, "the test site has no [bridge] table"
    return MinerBridge(cfg.bridge, site_id=cfg.site_id, broker=cfg.broker,
                       inventory=cfg.inventory, **kwargs)


def ven_of(cfg: SiteConfig, **kwargs: Any) -> Any:
    """The site's `OpenAdrVen`, built from its sections as `mineops ven` builds it."""
    from drivers.openadr.ven import OpenAdrVen  # noqa: PLC0415 - openleadr is slow to import

    assert cfg.openadr is not None, "the test site has no [openadr] table"
    return OpenAdrVen(cfg.openadr, site_id=cfg.site_id, broker=cfg.broker,
                      site_meter_ids=[m.id for m in cfg.meters
                                      if m.type == "mineops" and m.role == "site"], **kwargs)

"""Unmodified pyasic against the simulator's LuxOS API: identify, read, sleep, wake, presets."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pyasic
import pytest
from pyasic.errors import APIError
from pyasic.miners.backends.luxminer import LUXMiner

from controller.catalogue import MinerModel, load_catalogue
from simulators.fleet import Mode, SimulatedFleet
from simulators.luxos_api import LUXOS_PORT, LuxosApiServer, loopback_addresses, luxos_profiles
from tests.conftest import wait_for

SPEED = 100.0  # sleep in 0.1 s, wake in ~2 s
# catalogue key -> the model name pyasic reports for it
MODELS = {"s21": "S21", "s19j_pro": "S19j Pro", "s21_pro": "S21 Pro", "s19_xp": "S19 XP"}


@dataclass
class Sim:
    fleet: SimulatedFleet
    api: LuxosApiServer
    models: list[MinerModel]

    def host(self, miner_id: str) -> str:
        return self.api.addresses[miner_id]


def free_loopback_base() -> str:
    """A random 127.x.y.2, so parallel test runs do not fight over port 4028."""
    return f"127.{random.randint(100, 250)}.{random.randint(0, 250)}.2"


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    catalogue = load_catalogue()
    keys = [*MODELS, "m60s"]  # a Whatsminer: LuxOS does not run on it
    models = [catalogue.get(k) for k in keys]
    fleet = SimulatedFleet(keys, models, speed=SPEED, start_now=time.monotonic())

    async def physics() -> None:
        while True:
            fleet.step(time.monotonic())
            await asyncio.sleep(0.02)

    task = asyncio.create_task(physics())
    api = LuxosApiServer(fleet, models, first_address=free_loopback_base())
    await api.start()
    try:
        yield Sim(fleet, api, models)
    finally:
        await api.close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_addresses_are_loopback_only() -> None:
    assert loopback_addresses("127.0.0.2", 3) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    with pytest.raises(ValueError, match="loopback"):
        loopback_addresses("10.0.0.2", 1)
    with pytest.raises(ValueError, match="loopback"):
        loopback_addresses("127.255.255.250", 10)


async def test_get_miner_identifies_model_and_luxos(sim: Sim) -> None:
    assert sim.api.skipped == ["m60s"]
    for key, name in MODELS.items():
        miner = await pyasic.get_miner(sim.host(key))
        assert isinstance(miner, LUXMiner), f"{key}: {type(miner)}"
        assert miner.model == f"{name} (LuxOS)"
    # Each miner on its own address, port 4028, as pyasic's discovery needs.
    assert sim.api.port == LUXOS_PORT
    assert len(set(sim.api.addresses.values())) == len(MODELS)


async def test_get_data_matches_simulated_state(sim: Sim) -> None:
    for i, key in enumerate(MODELS):
        miner = await pyasic.get_miner(sim.host(key))
        data = await miner.get_data()
        model = sim.models[i]
        assert data.wattage == pytest.approx(sim.fleet.power_w[i], abs=1)
        assert data.wattage == pytest.approx(model.nominal_w, abs=1)
        expected_ths = float(sim.fleet.hashrate_ths()[i])
        assert float(data.hashrate) == pytest.approx(expected_ths, rel=1e-3)
        assert float(data.hashrate) == pytest.approx(model.nominal_ths, rel=1e-3)
        assert data.wattage_limit == round(model.nominal_w)  # the `default` profile
        assert len(data.fans) == 4 and all(f.speed and f.speed > 0 for f in data.fans)
        assert data.temperature_avg == pytest.approx(sim.fleet.temp_c[i], abs=1.0)
        assert data.uptime is not None and data.uptime >= 0


async def test_stop_and_resume_mining_change_the_miner(sim: Sim) -> None:
    i = 0
    miner = await pyasic.get_miner(sim.host("s21"))
    assert await miner.stop_mining()
    await wait_for(lambda: sim.fleet.mode[i] == Mode.SLEEPING, timeout_s=5, what="asleep")
    await wait_for(lambda: sim.fleet.power_w[i] < 50, timeout_s=5, what="power down")
    data = await miner.get_data()
    # pyasic says is_mining even asleep on LuxOS: sleep shows as no hashrate and low power.
    assert float(data.hashrate) == 0.0
    assert data.wattage is not None and data.wattage < 50
    others = sim.fleet.mode[1:4]
    assert (others == Mode.RUNNING).all(), "the other miners never heard it"

    assert await miner.resume_mining()
    assert sim.fleet.mode[i] == Mode.WAKING
    await wait_for(lambda: sim.fleet.mode[i] == Mode.RUNNING, timeout_s=10, what="awake")
    await wait_for(lambda: abs(sim.fleet.power_w[i] - 3500) < 20, timeout_s=5, what="settled")
    data = await miner.get_data()
    assert float(data.hashrate) == pytest.approx(200.0, rel=0.01)


async def test_set_power_limit_picks_a_profile(sim: Sim) -> None:
    i = 1  # s19j_pro
    model = sim.models[i]
    miner = await pyasic.get_miner(sim.host("s19j_pro"))
    config = await miner.get_config()
    presets = sorted(p.power for p in config.mining_mode.available_presets)
    assert presets == [round(p.watts) for p in luxos_profiles(model)]

    assert await miner.set_power_limit(2450)  # highest profile at or below: 2400 W
    assert sim.fleet.target_w[i] == 2400
    await wait_for(lambda: abs(sim.fleet.power_w[i] - 2400) < 10, timeout_s=5, what="settled")
    data = await miner.get_data()
    assert data.wattage_limit == 2400
    assert data.wattage == pytest.approx(2400, abs=10)
    assert float(data.hashrate) == pytest.approx(float(model.hashrate_ths(2400)), rel=0.01)
    # ATM was on: pyasic turned it off for the change and on again afterwards.
    assert sim.api.miners["s19j_pro"].atm_enabled

    assert not await miner.set_power_limit(1000), "below the lowest profile: refused"
    assert sim.fleet.target_w[i] == 2400


async def test_profile_change_while_asleep_keeps_it_asleep(sim: Sim) -> None:
    miner = await pyasic.get_miner(sim.host("s21"))
    assert await miner.stop_mining()
    assert await miner.set_power_limit(2000)
    await asyncio.sleep(0.3)
    assert sim.fleet.mode[0] == Mode.SLEEPING
    assert await miner.resume_mining()
    await wait_for(lambda: sim.fleet.mode[0] == Mode.RUNNING, timeout_s=10, what="awake")
    await wait_for(lambda: abs(sim.fleet.power_w[0] - 2000) < 20, timeout_s=5, what="at 2 kW")


async def test_session_dies_with_a_restart(sim: Sim) -> None:
    miner = await pyasic.get_miner(sim.host("s21"))
    assert await miner.stop_mining()  # logs on; pyasic keeps the session id
    sim.api.restart(["s21"])
    # pyasic never logs on again: its stale session is refused, and the miner stays asleep
    # (curtailment persists across a restart).
    assert not await miner.resume_mining()
    assert sim.fleet.mode[0] in (Mode.SLEEPING, Mode.STOPPING)
    fresh = await pyasic.get_miner(sim.host("s21"))
    assert await fresh.resume_mining()
    assert sim.fleet.mode[0] == Mode.WAKING


async def test_wire_format_details(sim: Sim) -> None:
    host = sim.host("s21")

    async def raw(payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, LUXOS_PORT)
        writer.write(payload)  # no newline, write side kept open: the server must not wait
        await writer.drain()
        async with asyncio.timeout(2):
            data = await reader.read()  # until the server closes
        writer.close()
        return data

    import json  # noqa: PLC0415

    multi = json.loads((await raw(b'{"command":"power+summary"}')).rstrip(b"\x00"))
    assert set(multi) == {"power", "summary", "id"}
    assert multi["power"][0]["STATUS"][0]["STATUS"] == "S"
    bad = json.loads((await raw(b'{"command":"curtail","parameter":"nope,sleep"}'))
                     .rstrip(b"\x00"))
    assert bad["STATUS"][0]["STATUS"] == "E"
    assert sim.fleet.mode[0] == Mode.RUNNING, "a wrong session id changes nothing"
    unknown = json.loads((await raw(b'{"command":"selfdestruct"}')).rstrip(b"\x00"))
    assert unknown["STATUS"][0]["STATUS"] == "E"


async def test_offline_miner_does_not_answer(sim: Sim) -> None:
    miner = await pyasic.get_miner(sim.host("s21"))
    sim.fleet.set_offline(np.array([0]))
    # Its connections are reset (pyasic lets that OSError through, or says APIError).
    with pytest.raises((APIError, OSError)):
        await miner.get_data()
    assert await pyasic.get_miner(sim.host("s21")) is None
    sim.fleet.set_offline(np.array([0]), False)
    data = await miner.get_data()
    assert data.wattage == pytest.approx(sim.fleet.power_w[0], abs=1)


async def test_faults_as_pyasic_sees_them(sim: Sim) -> None:
    """The simulator's field faults reach pyasic the way real firmware's do."""
    miner = await pyasic.get_miner(sim.host("s21"))
    sim.api.set_faults(["s21"], failing=["power"])
    data = await miner.get_data()
    assert data.wattage is None, "a failing `power` is None in pyasic, the rest still read"
    assert float(data.hashrate) == pytest.approx(float(sim.fleet.hashrate_ths()[0]), rel=1e-3)
    sim.api.set_faults(["s21"], watts=65535)
    assert (await miner.get_data()).wattage == 65535, "pyasic passes a sentinel through"
    sim.api.set_faults(["s21"])
    assert (await miner.get_data()).wattage == pytest.approx(sim.fleet.power_w[0], abs=1)
    with pytest.raises(ValueError, match="not reader commands"):
        sim.api.set_faults(["s21"], failing=["curtail"])

"""One miner's firmware I/O through pyasic: identify, read, sleep, wake, set a power target.

pyasic (Apache-2.0) speaks LuxOS, Braiins OS, stock Antminer, Whatsminer and VNish; this
module is the only one that imports it. Every call is bounded by a timeout (pyasic's own
connect has none), and every library error becomes FirmwareError, so the bridge's loop
only ever sees "answered" or "did not".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

import pyasic
from pyasic.config.mining import MiningModePowerTune, MiningModePreset
from pyasic.data import MinerData
from pyasic.miners.data import DataOptions
from pyasic.miners.factory import MINER_CLASSES, MinerTypes

from controller.cancellation import propagate_lost_cancel
from controller.catalogue import MinerModel
from controller.config import BridgeEndpoint

PowerControl = Literal["presets", "range", "none"]

_FIRMWARE_TYPES = {
    "luxos": MinerTypes.LUX_OS,
    "braiins": MinerTypes.BRAIINS_OS,
    "antminer": MinerTypes.ANTMINER,
    "whatsminer": MinerTypes.WHATSMINER,
    "vnish": MinerTypes.VNISH,
}
# What one poll reads: with LuxOS this is a single `stats+power+config+profiles+fans+summary`.
_READ = [DataOptions.HASHBOARDS, DataOptions.WATTAGE, DataOptions.WATTAGE_LIMIT,
         DataOptions.FANS, DataOptions.UPTIME, DataOptions.HASHRATE]


class FirmwareError(Exception):
    """The miner did not answer, or answered with an error."""


@dataclass(frozen=True, slots=True)
class FirmwareReading:
    """What one poll learned; None where the firmware did not say."""

    power_w: float
    hashrate_ths: float
    target_w: float | None
    temp_c: float | None
    fan_rpm: int | None
    hashboards: int | None
    uptime_s: int | None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """How the miner's power can be set: its presets (W, and TH/s when reported), or a range."""

    firmware: str
    control: PowerControl
    presets_w: tuple[float, ...] = ()
    presets_ths: tuple[float, ...] | None = None
    presets_name: tuple[str, ...] = ()


class FirmwareMiner:
    """A pyasic miner object for one endpoint; a new one per firmware session.

    pyasic caches a LuxOS session id for the life of its object and never logs on again,
    so the bridge drops this object when the miner restarts or stops answering.
    """

    def __init__(self, endpoint: BridgeEndpoint, model: MinerModel, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.model = model
        self.timeout_s = timeout_s
        self._miner: Any = None
        self.capabilities: Capabilities | None = None

    @property
    def firmware(self) -> str:
        fw = getattr(self._miner, "firmware", None)
        return str(getattr(fw, "value", fw) or self.endpoint.firmware)

    async def _call(self, coro: Any) -> Any:
        try:
            # pyasic waits with 3.11's wait_for, which can swallow the bridge's stop.
            async with asyncio.timeout(self.timeout_s):
                with propagate_lost_cancel():
                    return await coro
        except TimeoutError:
            raise FirmwareError("timed out") from None
        except FirmwareError:
            raise
        except Exception as e:  # pyasic raises APIError, KeyError, ValueError, OSError, ...
            raise FirmwareError(f"{type(e).__name__}: {e}") from e

    async def connect(self) -> None:
        """Identify the miner (or build the named firmware's class) and learn its power control."""
        ep = self.endpoint
        if ep.firmware == "auto":
            miner = await self._call(pyasic.get_miner(ep.host))
            if miner is None:
                raise FirmwareError("no known firmware answered")
        else:
            classes = MINER_CLASSES[_FIRMWARE_TYPES[ep.firmware]]
            cls = classes.get(self.model.name.upper(), classes[None])
            miner = cls(ep.host)
        rpc = getattr(miner, "rpc", None)
        if rpc is not None and ep.port != rpc.port:
            rpc.port = ep.port
        self._miner = miner
        self.capabilities = await self._learn_capabilities()

    async def _learn_capabilities(self) -> Capabilities:
        miner = self._miner
        config = await self._call(miner.get_config())
        mode = config.mining_mode
        if isinstance(mode, MiningModePreset) and mode.available_presets:
            presets = sorted((p for p in mode.available_presets if p.power is not None),
                             key=lambda p: p.power)
            hashrates = [p.hashrate for p in presets]
            return Capabilities(
                firmware=self.firmware, control="presets",
                presets_w=tuple(float(p.power) for p in presets),
                presets_ths=(tuple(float(h) for h in hashrates)
                             if all(h is not None for h in hashrates) else None),
                presets_name=tuple(str(p.name) for p in presets))
        if isinstance(mode, MiningModePowerTune) or getattr(miner, "supports_autotuning", False):
            return Capabilities(firmware=self.firmware, control="range")
        return Capabilities(firmware=self.firmware, control="none")

    async def read(self) -> FirmwareReading:
        data: MinerData = await self._call(self._miner.get_data(include=_READ))
        if data.wattage is None and data.hashrate is None:
            raise FirmwareError("no power or hashrate in the reply")
        hashrate = data.hashrate
        temps = [b.temp for b in data.hashboards if b.temp is not None]
        fans = [f.speed for f in data.fans if f.speed is not None]
        live = [b for b in data.hashboards if b.hashrate is not None and float(b.hashrate) > 0]
        return FirmwareReading(
            power_w=float(data.wattage or 0.0),
            hashrate_ths=float(hashrate) if hashrate is not None else 0.0,
            target_w=float(data.wattage_limit) if data.wattage_limit is not None else None,
            temp_c=max(temps) if temps else None,
            fan_rpm=round(sum(fans) / len(fans)) if fans else None,
            hashboards=len(live) if data.hashboards else None,
            uptime_s=data.uptime,
        )

    # -- control ----------------------------------------------------------------------

    async def sleep(self) -> None:
        if not await self._call(self._miner.stop_mining()):
            raise FirmwareError("stop_mining refused")

    async def wake(self) -> None:
        if not await self._call(self._miner.resume_mining()):
            raise FirmwareError("resume_mining refused")

    def snap_w(self, power_w: float) -> float:
        """The target the firmware will run at for a requested one (never above, if it can)."""
        caps = self.capabilities
        if caps is None or caps.control == "none":
            return self.model.nominal_w
        if caps.control == "presets":
            below = [w for w in caps.presets_w if w <= power_w + 1e-6]
            # Below the lowest preset the lowest is the best the firmware can do.
            return max(below) if below else caps.presets_w[0]
        m = self.model
        return float(min(max(power_w, m.min_w), m.max_w))

    async def set_power(self, power_w: float, current_target_w: float | None) -> float:
        """Run at (the firmware's nearest) `power_w`; returns the target now in force."""
        target = self.snap_w(power_w)
        caps = self.capabilities
        if caps is None or caps.control == "none":
            return target
        # A preset change re-tunes a LuxOS machine for minutes: never send an unchanged one.
        if current_target_w is not None and abs(current_target_w - target) < 0.5:
            return target
        if not await self._call(self._miner.set_power_limit(round(target))):
            raise FirmwareError(f"set_power_limit({round(target)}) refused")
        return target

"""One miner's firmware I/O through pyasic: identify, read, sleep, wake, set a power target.

pyasic (Apache-2.0) speaks LuxOS, Braiins OS, stock Antminer, Whatsminer and VNish; this
module is the only one that imports it. Every call is bounded by a timeout (pyasic's own
connect has none), and every library error becomes FirmwareError, so the bridge's loop
only ever sees "answered" or "did not".

What pyasic returns is checked before the bridge trusts it (`reading_from_data`): a value
pyasic leaves as None stays unknown (never 0), hashrates are converted with pyasic's own
unit types (a GenericAlgo hashrate is in H/s, a SHA-256 one in TH/s), and a value no miner
of the catalogue model could report is dropped as unknown with a named reason.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Literal

import pyasic
from pyasic.config.mining import MiningModePowerTune, MiningModePreset
from pyasic.data import MinerData
from pyasic.device.algorithm.hashrate import AlgoHashRateType
from pyasic.miners.data import DataOptions
from pyasic.miners.factory import MINER_CLASSES, MinerTypes

from controller.cancellation import propagate_lost_cancel
from controller.catalogue import MinerModel
from drivers.firmware.config import BridgeEndpoint

PowerControl = Literal["presets", "range", "none"]
PYASIC_VERSION = version("pyasic")

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
# A reading above this multiple of the catalogue model's maximum (power, or hashrate at
# that power) is not a reading of that model: a unit slip (x1000), a sentinel such as
# 65535 W, or a wrong model in the site file. Overclocking stays well inside it.
_ABSURD_FACTOR = 2.0
# Board (PCB) temperatures outside this are sensor faults (-64, 255 and the like).
TEMP_RANGE_C = (-40.0, 150.0)
FAN_MAX_RPM = 30_000  # GroupMinerReading's bound
MAX_HASHBOARDS = 8  # GroupMinerReading's bound


class FirmwareError(Exception):
    """The miner did not answer, or answered with an error."""


@dataclass(frozen=True, slots=True)
class FirmwareReading:
    """What one poll learned, checked; None where the firmware did not say, or said nonsense.

    `problems` names each value left unknown that matters to the controller, as
    `(field, reason)`: field one of `power_w`, `hashrate_ths`, `temp_c`, `target_w`,
    `fan_rpm`, `hashboards`, `uptime_s`; reason `missing` (pyasic gave None), `out_of_range`
    (no miner of the model could report it), `no_unit` (a hashrate without pyasic's unit
    type), `unreadable` (pyasic's own hashrate sum failed) or `zero_while_hashing` (a
    power at sleep level while the boards hash).
    """

    power_w: float | None
    hashrate_ths: float | None
    target_w: float | None
    temp_c: float | None
    fan_rpm: int | None
    hashboards: int | None
    uptime_s: int | None
    problems: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Capabilities:
    """How the miner's power can be set: its presets (W, and TH/s when reported), or a range."""

    firmware: str
    control: PowerControl
    presets_w: tuple[float, ...] = ()
    presets_ths: tuple[float, ...] | None = None
    presets_name: tuple[str, ...] = ()


def sleep_threshold_w(model: MinerModel) -> float:
    """The most a miner of `model` draws while not hashing (asleep, or control board only), W."""
    return max(3 * model.sleep_w, 0.05 * model.min_w)


def hashrate_to_ths(value: object) -> float | None:
    """A pyasic hashrate in TH/s, through its own unit type (None stays None).

    pyasic's `AlgoHashRateType` has a rate and a unit (`SHA256Unit.TH`, `GenericUnit.H`, ...):
    `float()` of it is the rate in *its* unit, which for a GenericAlgo miner (a model pyasic
    does not know) is H/s. A bare number has no unit, and none is assumed.

    Raises:
        TypeError: a bare number, or anything else without pyasic's unit type.
        ValueError: a unit type without a TH/s member.
    """
    if value is None:
        return None
    if not isinstance(value, AlgoHashRateType):
        raise TypeError(f"hashrate {value!r} has no pyasic unit")
    th = getattr(type(value.unit), "TH", None)
    if th is None:
        raise ValueError(f"hashrate unit {type(value.unit).__name__} has no TH/s")
    return float(value.into(th).rate)


def reading_from_data(data: MinerData, model: MinerModel) -> FirmwareReading:
    """Check what pyasic returned for a miner of catalogue `model`; unknown stays None.

    Reads `wattage`, `wattage_limit`, `hashrate` (pyasic's sum of `hashboards[].hashrate`,
    else the firmware's total), `hashboards[].hashrate` and `.temp`, `fans[].speed` and
    `uptime` (pyasic 0.79 `MinerData`). Bounds: power 0..2 x `model.max_w` W, hashrate
    0..2 x the model's hashrate at `max_w` TH/s, board temperature -40..150 degC, fans
    0..30,000 rpm; a power at sleep level while the boards hash is unknown too (firmwares
    that cannot read their PSU report 0 W).

    Returns:
        The reading; it never raises for bad values (each becomes None and a `problems`
        entry), so one miner's nonsense never costs its rack-mates their telemetry.
    """
    c = _Checks(max_ths=_ABSURD_FACTOR * float(model.hashrate_ths(model.max_w)))
    max_w = _ABSURD_FACTOR * model.max_w
    try:
        total: object = data.hashrate
    except (TypeError, ValueError, AttributeError):  # pyasic's own sum failed on its boards
        c.problems.append(("hashrate_ths", "unreadable"))
        hashrate = None
    else:
        hashrate = c.ths("hashrate_ths", total, report_missing=True)
    hashboards, temp_c = _boards(c, data)
    power_w = c.number("power_w", data.wattage, 0.0, max_w, report_missing=True)
    if power_w is not None and hashrate and power_w <= sleep_threshold_w(model):
        c.problems.append(("power_w", "zero_while_hashing"))
        power_w = None
    limit = c.number("target_w", data.wattage_limit, 0.0, max_w, report_missing=False)
    speeds = [c.number("fan_rpm", getattr(f, "speed", None), 0, FAN_MAX_RPM,
                       report_missing=False)
              for f in data.fans or []]
    known_speeds = [v for v in speeds if v is not None]
    uptime = c.number("uptime_s", data.uptime, 0, math.inf, report_missing=False)
    return FirmwareReading(
        power_w=power_w,
        hashrate_ths=hashrate,
        target_w=limit if limit else None,  # 0 W is "no limit set", not a target
        temp_c=temp_c,
        fan_rpm=round(sum(known_speeds) / len(known_speeds)) if known_speeds else None,
        hashboards=hashboards,
        uptime_s=None if uptime is None else int(uptime),
        problems=tuple(dict.fromkeys(c.problems)),
    )


@dataclass(slots=True)
class _Checks:
    """One reply's values checked against their bounds; what failed, as (field, reason)."""

    max_ths: float  # the most hashrate that is not absurd, TH/s
    problems: list[tuple[str, str]] = field(default_factory=list)

    def number(self, name: str, value: object, lo: float, hi: float, *,
               report_missing: bool) -> float | None:
        """`value` as a finite float within lo..hi, else None (and a problem)."""
        if value is None:
            if report_missing:
                self.problems.append((name, "missing"))
            return None
        try:
            x = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.problems.append((name, "out_of_range"))
            return None
        if not (math.isfinite(x) and lo <= x <= hi):
            self.problems.append((name, "out_of_range"))
            return None
        return x

    def ths(self, name: str, value: object, *, report_missing: bool) -> float | None:
        """A pyasic hashrate in TH/s within 0..max_ths, else None (and a problem)."""
        try:
            converted = hashrate_to_ths(value)
        except (TypeError, ValueError, AttributeError):
            self.problems.append((name, "no_unit"))
            return None
        return self.number(name, converted, 0.0, self.max_ths, report_missing=report_missing)


def _boards(c: _Checks, data: MinerData) -> tuple[int | None, float | None]:
    """Boards hashing, and the hottest board's temperature, deg C; None: unknown."""
    # pyasic sets MinerData's fields without validation: expect anything in the lists.
    boards = list(data.hashboards or [])
    board_ths = [c.ths("hashrate_ths", getattr(b, "hashrate", None), report_missing=False)
                 for b in boards]
    known_boards = [h for h in board_ths if h is not None]
    hashboards = sum(1 for h in known_boards if h > 0) if known_boards else None
    if hashboards is not None and hashboards > MAX_HASHBOARDS:
        c.problems.append(("hashboards", "out_of_range"))
        hashboards = None
    temps = [c.number("temp_c", getattr(b, "temp", None), *TEMP_RANGE_C, report_missing=False)
             for b in boards]
    known_temps = [t for t in temps if t is not None]
    temp_c = max(known_temps) if known_temps else None
    if temp_c is None and not any(p[0] == "temp_c" for p in c.problems):
        c.problems.append(("temp_c", "missing"))
    return hashboards, temp_c


def pyasic_model_keys(model: MinerModel) -> list[str]:
    """The names pyasic's class tables may use for a catalogue model (`HYDRO` is `HYD.` there)."""
    name = model.name.upper()
    keys = [name]
    if name.endswith(" HYDRO"):
        keys += [name[:-len("HYDRO")] + "HYD.", name[:-len("HYDRO")] + "HYD"]
    return keys


def pyasic_class(firmware: str, model: MinerModel) -> type | None:
    """The pyasic class for `model` under a named firmware; None when it has only a generic one.

    With the generic class pyasic reads what the firmware's API gives without a model
    (LuxOS: power, but no hashboards, so no hashrate; stock: boards in H/s).
    """
    classes = MINER_CLASSES[_FIRMWARE_TYPES[firmware]]
    for key in pyasic_model_keys(model):
        if key in classes:
            cls: type = classes[key]
            return cls
    return None


def unsupported_reason(firmware: str, model: MinerModel) -> str:
    """The short text telemetry and logs carry for a pair pyasic has no class for."""
    return f"no pyasic class: {firmware} on {model.name}"[:64]


class FirmwareMiner:
    """A pyasic miner object for one endpoint; a new one per firmware session.

    pyasic caches a LuxOS session id for the life of its object and never logs on again,
    so the bridge drops this object when the miner restarts or stops answering.

    Args:
        endpoint: Where the miner is and its firmware (`BridgeConfig.endpoints`).
        model: Its catalogue model (targets, stock point).
        timeout_s: The longest a firmware call may take, s (`bridge.timeout_s`).
    """

    def __init__(self, endpoint: BridgeEndpoint, model: MinerModel, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.model = model
        self.timeout_s = timeout_s
        self._miner: Any = None
        self.capabilities: Capabilities | None = None
        # Set when pyasic identified no model (its generic class for the firmware): the
        # reason telemetry gives when that costs the reading its hashrate.
        self.unsupported: str | None = None

    @property
    def firmware(self) -> str:
        """The firmware pyasic identified (e.g. "LuxOS"), else the configured name."""
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
            cls = (pyasic_class(ep.firmware, self.model)
                   or MINER_CLASSES[_FIRMWARE_TYPES[ep.firmware]][None])
            miner = cls(ep.host)
        rpc = getattr(miner, "rpc", None)
        if rpc is not None and ep.port != rpc.port:
            rpc.port = ep.port
        self._miner = miner
        # pyasic's generic class for a firmware has no model (raw_model None).
        self.unsupported = (unsupported_reason(self.firmware, self.model)
                            if getattr(miner, "raw_model", None) is None else None)
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
        """One poll, checked (`reading_from_data`).

        Raises:
            FirmwareError: no answer, or an answer with neither power nor hashrate (some
                pyasic backends swallow connection errors and return an empty MinerData).
        """
        data: MinerData = await self._call(self._miner.get_data(include=_READ))
        try:
            reading = reading_from_data(data, self.model)
        except Exception as e:  # a shape pyasic's types do not allow: unreadable, not fatal
            raise FirmwareError(f"unreadable reply: {type(e).__name__}: {e}") from e
        if {("power_w", "missing"), ("hashrate_ths", "missing")} <= set(reading.problems):
            raise FirmwareError("no power or hashrate in the reply")
        return reading

    # -- control ----------------------------------------------------------------------

    async def sleep(self) -> None:
        """Stop hashing (pyasic stop_mining).

        Raises:
            FirmwareError: the firmware refused, or the call failed or timed out.
        """
        if not await self._call(self._miner.stop_mining()):
            raise FirmwareError("stop_mining refused")

    async def wake(self) -> None:
        """Resume hashing (pyasic resume_mining).

        Raises:
            FirmwareError: the firmware refused, or the call failed or timed out.
        """
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

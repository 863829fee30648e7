"""The LuxOS miner API (TCP 4028, cgminer-style JSON) served for each simulated miner.

One listening socket per miner on its own loopback address (127.0.0.2, 127.0.0.3, ...),
backed by the shared SimulatedFleet arrays, so `curtail sleep` through the API shows in
the miner's power and a profile change moves its power target. Enough of the API for an
unmodified client (pyasic) to identify the model, read hashrate/power/temperatures/fans
and the active profile, and to sleep, wake and change profiles. Facts about the wire
format are in docs/bridge.md; only loopback addresses are ever bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from controller.catalogue import MinerModel
from controller.protocol.payloads import Setpoint
from simulators.fleet import BOARDS, Mode, SimulatedFleet

log = structlog.get_logger("mineops.luxos_sim")

LUXOS_PORT = 4028
FIRMWARE_VERSION = "2025.3.4.170540-mineops-sim"
API_VERSION = "3.7"
# Stock chip counts per board, as the real machines report them (pyasic checks them).
_CHIPS = {"Antminer S19j Pro": 126, "Antminer S19 XP": 110, "Antminer S21": 108,
          "Antminer S21 Pro": 65}
_STOCK_MHZ = 490.0
_MAX_REQUEST_BYTES = 8192
_READ_TIMEOUT_S = 5.0

Reply = dict[str, Any]


def loopback_addresses(first: str, count: int) -> list[str]:
    """`count` consecutive loopback addresses from `first` (as a bridge range expands them)."""
    start = ipaddress.IPv4Address(first)
    last = ipaddress.IPv4Address(int(start) + max(count - 1, 0))
    if not (start.is_loopback and last.is_loopback):
        raise ValueError(f"{count} addresses from {first} leave 127.0.0.0/8 (only loopback "
                         "addresses are served)")
    return [str(ipaddress.IPv4Address(int(start) + k)) for k in range(count)]


def serves_luxos(model: MinerModel) -> bool:
    """LuxOS runs on Antminers only; other simulated models get no LuxOS API."""
    return model.vendor == "bitmain"


@dataclass(frozen=True, slots=True)
class Profile:
    """One LuxOS profile (preset): a name and the power it runs at."""

    name: str
    watts: float
    hashrate_ths: float
    mhz: int


def luxos_profiles(model: MinerModel) -> list[Profile]:
    """The simulated firmware's presets: every power target of the model, plus `default` (stock).

    Names follow LuxOS's frequency naming; frequency scales with hashrate per chip.
    """
    powers = sorted({*(float(w) for w in model.targets_w()), float(model.nominal_w)})
    out = []
    for w in powers:
        h = float(model.hashrate_ths(w))
        mhz = round(_STOCK_MHZ * h / model.nominal_ths)
        name = "default" if w == model.nominal_w else f"{mhz}MHz"
        out.append(Profile(name=name, watts=w, hashrate_ths=h, mhz=mhz))
    names = [p.name for p in out]
    if len(set(names)) != len(names):  # a catalogue with very close steps: keep names unique
        out = [Profile(p.name if p.name == "default" else f"{p.name}-{int(p.watts)}W",
                       p.watts, p.hashrate_ths, p.mhz) for p in out]
    return out


@dataclass(slots=True)
class _MinerApi:
    """Firmware-side state the fleet arrays do not hold: session, profile, ATM, uptime."""

    index: int
    miner_id: str
    model: MinerModel
    host: str
    profiles: list[Profile]
    profile: str = "default"
    atm_enabled: bool = True
    session_id: str = ""
    boot_monotonic: float = field(default_factory=time.monotonic)
    requests: int = 0
    # Field faults (LuxosApiServer.set_faults): commands answered with an error, and a
    # `power` reading that is not the draw (a PSU read fault such as 65535 W).
    failing: frozenset[str] = frozenset()
    watts: float | None = None

    def profile_by_name(self, name: str) -> Profile | None:
        return next((p for p in self.profiles if p.name == name), None)


def _status(code: int, msg: str, ok: bool = True) -> list[dict[str, Any]]:
    return [{"STATUS": "S" if ok else "E", "When": int(time.time()), "Code": code, "Msg": msg,
             "Description": f"LUXminer {FIRMWARE_VERSION}"}]


def _error(msg: str, code: int = 14) -> Reply:
    return {"STATUS": _status(code, msg, ok=False), "id": 1}


class LuxosApiServer:
    """LuxOS API servers for the LuxOS-capable miners of a SimulatedFleet.

    `start()` binds one socket per miner; `close()` releases them. `addresses` maps miner
    id to its host (port LUXOS_PORT unless given). Offline miners (fleet.offline) reset
    every connection, as a machine whose network dropped does; `restart(idx)` models a
    reboot: new uptime, sessions forgotten, sleep kept.

    Args:
        fleet: The simulated fleet whose miners it serves.
        models: Each miner's model; only models LuxOS runs on are served (`skipped`).
        first_address: The first miner's loopback address; the others follow it.
        port: The API port on every address.
        clock: Monotonic time source (uptime, sessions).
    """

    def __init__(
        self,
        fleet: SimulatedFleet,
        models: Sequence[MinerModel],
        *,
        first_address: str = "127.0.0.2",
        port: int = LUXOS_PORT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fleet = fleet
        self.port = port
        self._clock = clock
        served = [i for i, m in enumerate(models) if serves_luxos(m)]
        hosts = loopback_addresses(first_address, len(served))
        profiles: dict[int, list[Profile]] = {}
        self.miners: dict[str, _MinerApi] = {}
        for i, host in zip(served, hosts, strict=True):
            model = models[i]
            key = id(model)
            if key not in profiles:
                profiles[key] = luxos_profiles(model)
            self.miners[fleet.ids[i]] = _MinerApi(i, fleet.ids[i], model, host, profiles[key])
        self.skipped = [fleet.ids[i] for i, m in enumerate(models) if not serves_luxos(m)]
        self._servers: list[asyncio.Server] = []
        self.connections = 0  # open now, across all miners
        self.max_connections = 0  # the most at once: what a client's concurrency bound allows

    @property
    def addresses(self) -> dict[str, str]:
        """Miner id -> the host its API listens on (at `port`)."""
        return {m.miner_id: m.host for m in self.miners.values()}

    async def start(self, progress: Callable[[int], None] | None = None) -> None:
        """Bind every miner's address; on any failure release what was bound and raise.

        `progress` is called with the number bound so far (thousands take a while).
        """
        try:
            for api in self.miners.values():
                server = await asyncio.start_server(
                    functools.partial(self._serve, api), api.host, self.port,
                    reuse_address=True, backlog=64)
                self._servers.append(server)
                if progress is not None:
                    progress(len(self._servers))
        except OSError:
            await self.close()
            raise
        log.info("luxos_api_started", miners=len(self.miners), port=self.port,
                 first=next(iter(self.addresses.values()), None), skipped=len(self.skipped))

    async def close(self) -> None:
        """Stop every miner's server (each given up to 2 s to close)."""
        servers, self._servers = self._servers, []
        for s in servers:
            s.close()
        for s in servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):  # not wait_for: see controller/cancellation.py
                    await s.wait_closed()

    async def __aenter__(self) -> LuxosApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        """Run until cancelled (the servers are already accepting after start())."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    def set_faults(self, miner_ids: Sequence[str], *, failing: Sequence[str] = (),
                   watts: float | None = None) -> None:
        """Give miners the faults real firmware shows (and clear them with no arguments).

        `failing`: reader commands answered with an error status, as a firmware without
        that command (or one that cannot reach its PSU, for `power`) answers them.
        `watts`: what `power` reports instead of the simulated draw.
        """
        unknown = set(failing) - set(_READERS)
        if unknown:
            raise ValueError(f"not reader commands: {sorted(unknown)}")
        for miner_id in miner_ids:
            api = self.miners[miner_id]
            api.failing = frozenset(failing)
            api.watts = watts

    def restart(self, miner_ids: Sequence[str]) -> None:
        """A reboot: sessions and uptime reset; curtailment and the profile persist."""
        now = self._clock()
        for miner_id in miner_ids:
            api = self.miners[miner_id]
            api.session_id = ""
            api.boot_monotonic = now

    # -- connection handling ----------------------------------------------------

    async def _serve(self, api: _MinerApi, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.max_connections = max(self.max_connections, self.connections)
        try:
            if self.fleet.offline[api.index]:
                writer.transport.abort()
                return
            async with asyncio.timeout(_READ_TIMEOUT_S):  # not wait_for: cancellation.py
                request = await _read_request(reader)
            api.requests += 1
            reply = self.handle(api, request) if request is not None else _error("Invalid JSON")
            writer.write(json.dumps(reply).encode() + b"\x00")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.connections -= 1
            # One request per connection: closing is how the client knows the reply is whole.
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def handle(self, api: _MinerApi, request: dict[str, Any]) -> Reply:
        """The reply to one request (a single command or a `+`-joined multicommand)."""
        command = str(request.get("command", ""))
        parameter = str(request.get("parameter", ""))
        names = command.split("+")
        if len(names) == 1:
            return self._command(api, command, parameter)
        if any(n in _PRIVILEGED for n in names):
            return _error("Privileged commands cannot be combined")
        out: Reply = {n: [self._command(api, n, parameter)] for n in names}
        out["id"] = 1
        return out

    def _command(self, api: _MinerApi, name: str, parameter: str) -> Reply:
        handler = _READERS.get(name)
        if handler is not None:
            if name in api.failing:
                return _error(f"{name} unavailable", code=45)
            return handler(self, api)
        if name in _PRIVILEGED:
            args = parameter.split(",") if parameter else []
            if not args or not api.session_id or args[0] != api.session_id:
                return _error("Invalid session id", code=404)
            return _PRIVILEGED[name](self, api, args[1:])
        if name == "session":
            return {"STATUS": _status(310, "Session"),
                    "SESSION": [{"SessionID": api.session_id}], "id": 1}
        if name == "logon":
            if api.session_id:
                return _error("Another session is active", code=402)
            api.session_id = secrets.token_hex(4)
            return {"STATUS": _status(307, "Logon"),
                    "SESSION": [{"SessionID": api.session_id}], "id": 1}
        if name == "logoff":
            api.session_id = ""
            return {"STATUS": _status(308, "Logoff"), "id": 1}
        return _error("Invalid command")

    # -- readings -----------------------------------------------------------------

    def _hashrate_ths(self, api: _MinerApi) -> float:
        f, i = self.fleet, api.index
        share = float(f.boards[i]) / BOARDS
        if f.mode[i] != Mode.RUNNING or share == 0:
            return 0.0
        return float(api.model.hashrate_ths(float(f.power_w[i]) / share)) * share

    def _uptime_s(self, api: _MinerApi) -> int:
        return int((self._clock() - api.boot_monotonic) * self.fleet.speed)

    def _version(self, api: _MinerApi) -> Reply:
        return {"STATUS": _status(22, "LUXminer versions"), "VERSION": [{
            "LUXminer": FIRMWARE_VERSION, "Miner": FIRMWARE_VERSION, "API": API_VERSION,
            "Type": api.model.name, "CompileTime": "2025-03-04"}], "id": 1}

    def _devdetails(self, api: _MinerApi) -> Reply:
        chips = _CHIPS.get(api.model.name, 100)
        return {"STATUS": _status(69, "Device Details"), "DEVDETAILS": [
            {"DEVDETAILS": b, "Name": "ASC", "ID": b, "Driver": "LUXminer",
             "Model": api.model.name, "Chips": chips} for b in range(BOARDS)], "id": 1}

    def _stats(self, api: _MinerApi) -> Reply:
        f, i = self.fleet, api.index
        chips = _CHIPS.get(api.model.name, 100)
        hashing = self._hashrate_ths(api)
        live = int(f.boards[i])
        per_board_ghs = hashing * 1000.0 / live if live else 0.0
        temp = float(f.temp_c[i])
        boards: dict[str, Any] = {"STATS": 0, "ID": "LUXminer0", "Elapsed": self._uptime_s(api),
                                  "total_rateideal": api.model.nominal_ths * 1000.0,
                                  "rate_unit": "GH", "miner_count": BOARDS}
        for b in range(1, BOARDS + 1):
            up = b <= live
            chip_c, pcb_c = round(temp + 8), round(temp)
            boards[f"chain_rate{b}"] = f"{per_board_ghs if up else 0.0:.2f}"
            boards[f"chain_acn{b}"] = chips if up else 0
            boards[f"temp_chip{b}"] = "-".join([str(chip_c)] * 4)
            boards[f"temp_pcb{b}"] = "-".join([str(pcb_c)] * 4)
        return {"STATUS": _status(70, "LUXminer stats"),
                "STATS": [{"STATS": 0, "ID": "LUXminer0", "Type": api.model.name}, boards],
                "id": 1}

    def _summary(self, api: _MinerApi) -> Reply:
        ghs = self._hashrate_ths(api) * 1000.0
        return {"STATUS": _status(11, "Summary"), "SUMMARY": [
            {"Elapsed": self._uptime_s(api), "GHS 5s": round(ghs, 2), "GHS av": round(ghs, 2),
             "Accepted": 0, "Rejected": 0}], "id": 1}

    def _power(self, api: _MinerApi) -> Reply:
        watts = float(self.fleet.power_w[api.index]) if api.watts is None else api.watts
        return {"STATUS": _status(335, "Power"), "POWER": [{"Watts": round(watts)}], "id": 1}

    def _fans(self, api: _MinerApi) -> Reply:
        f, i = self.fleet, api.index
        duty = float(np.clip((f.temp_c[i] - 35.0) / 40.0, 0.15, 1.0))
        rpm = 0 if f.mode[i] == Mode.SLEEPING else int(6000 * duty)
        return {"STATUS": _status(202, "Fans"),
                "FANS": [{"FAN": k, "ID": k, "RPM": rpm, "Speed": round(duty * 100)}
                         for k in range(4)],
                "FANCTRL": [{"MinFans": 4}], "id": 1}

    def _config(self, api: _MinerApi) -> Reply:
        asleep = self.fleet.mode[api.index] in (Mode.SLEEPING, Mode.STOPPING)
        return {"STATUS": _status(33, "Config"), "CONFIG": [{
            "Profile": api.profile, "RedLed": "off", "IsAtmEnabled": api.atm_enabled,
            "CurtailMode": "Sleep" if asleep else "None",
            "MACAddr": f"02:00:{api.index >> 24 & 255:02x}:{api.index >> 16 & 255:02x}:"
                       f"{api.index >> 8 & 255:02x}:{api.index & 255:02x}"}], "id": 1}

    def _profiles(self, api: _MinerApi) -> Reply:
        return {"STATUS": _status(300, "Profiles"), "PROFILES": [
            {"Profile Name": p.name, "Watts": round(p.watts),
             "Hashrate": round(p.hashrate_ths, 2), "IsTuned": False, "Frequency": p.mhz,
             "Voltage": round(12.0 + 3.0 * p.watts / api.model.max_w, 2), "Step": k}
            for k, p in enumerate(api.profiles)], "id": 1}

    def _pools(self, api: _MinerApi) -> Reply:
        return {"STATUS": _status(7, "1 Pool(s)"), "POOLS": [
            {"POOL": 0, "GROUP": 0, "URL": "stratum+tcp://pool.invalid:3333",
             "User": f"mineops.{api.miner_id}", "Status": "Alive", "Stratum Active": True,
             "Accepted": 0, "Rejected": 0, "Get Failures": 0, "Remote Failures": 0}], "id": 1}

    def _groups(self, api: _MinerApi) -> Reply:
        return {"STATUS": _status(7, "1 Group(s)"),
                "GROUPS": [{"GROUP": 0, "Name": "Default", "Quota": 1}], "id": 1}

    def _tempctrl(self, api: _MinerApi) -> Reply:
        return {"STATUS": _status(200, "Temp control"), "TEMPCTRL": [
            {"Mode": "Auto", "Target": 75, "Hot": 85, "Dangerous": 95}], "id": 1}

    def _atm(self, api: _MinerApi) -> Reply:
        return {"STATUS": _status(339, "ATM configuration values"), "ATM": [
            {"Enabled": api.atm_enabled, "MaxProfile": api.profiles[-1].name,
             "MinProfile": api.profiles[0].name, "PostRampMinutes": 15,
             "StartupMinutes": 15, "TempWindow": 5}], "id": 1}

    # -- control --------------------------------------------------------------------

    def _apply(self, api: _MinerApi, setpoint: Setpoint) -> None:
        i = api.index
        # The LuxOS API carries no sequence numbers: the fleet's ack stays as it was.
        self.fleet.apply(np.array([i], dtype=np.intp), setpoint, int(self.fleet.ack_seq[i]),
                         self._clock())

    def _curtail(self, api: _MinerApi, args: list[str]) -> Reply:
        what = args[0] if args else ""
        if what == "sleep":
            self._apply(api, Setpoint(action="sleep"))
        elif what == "wakeup":
            self._apply(api, Setpoint(action="wake"))
        else:
            return _error(f"Invalid curtail mode {what!r}")
        return {"STATUS": _status(340, f"Curtail {what}"), "id": 1}

    def _profileset(self, api: _MinerApi, args: list[str]) -> Reply:
        profile = api.profile_by_name(args[0]) if args else None
        if profile is None:
            return _error(f"Invalid profile {args[0] if args else ''!r}", code=301)
        i = api.index
        if self.fleet.mode[i] in (Mode.RUNNING, Mode.WAKING):
            self._apply(api, Setpoint(action="set_power", power_w=profile.watts))
        # The preset is the firmware's truth (the fleet's own snapping does not apply), and
        # a curtailed miner stays asleep with the new profile waiting for its wake-up.
        self.fleet.target_w[i] = profile.watts
        api.profile = profile.name
        return {"STATUS": _status(302, "Profile set"),
                "PROFILE": [{"Profile": profile.name, "Watts": round(profile.watts)}],
                "id": 1}

    def _atmset(self, api: _MinerApi, args: list[str]) -> Reply:
        for arg in args:
            key, _, value = arg.partition("=")
            if key == "enabled":
                api.atm_enabled = value.strip().lower() == "true"
        return {"STATUS": _status(340, "ATM settings changed"), "id": 1}


_READERS: dict[str, Callable[[LuxosApiServer, _MinerApi], Reply]] = {
    "version": LuxosApiServer._version,
    "devdetails": LuxosApiServer._devdetails,
    "stats": LuxosApiServer._stats,
    "summary": LuxosApiServer._summary,
    "power": LuxosApiServer._power,
    "fans": LuxosApiServer._fans,
    "config": LuxosApiServer._config,
    "profiles": LuxosApiServer._profiles,
    "pools": LuxosApiServer._pools,
    "groups": LuxosApiServer._groups,
    "tempctrl": LuxosApiServer._tempctrl,
    "atm": LuxosApiServer._atm,
}
_PRIVILEGED: dict[str, Callable[[LuxosApiServer, _MinerApi, list[str]], Reply]] = {
    "curtail": LuxosApiServer._curtail,
    "profileset": LuxosApiServer._profileset,
    "atmset": LuxosApiServer._atmset,
}


async def _read_request(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Read until the bytes form one JSON object: clients send no newline and keep writing open."""
    buf = b""
    while len(buf) <= _MAX_REQUEST_BYTES:
        chunk = await reader.read(4096)
        if not chunk:
            break
        buf += chunk
        try:
            parsed = json.loads(buf)
        except ValueError:
            continue
        return parsed if isinstance(parsed, dict) else None
    return None


def address_map_lines(server: LuxosApiServer, groups: Mapping[str, Sequence[str]]) -> Iterator[str]:
    """The address map, one line per group, then the `[bridge]` table that reaches it."""
    addresses = server.addresses
    ranges = []
    for group, ids in groups.items():
        served = [i for i in ids if i in addresses]
        if not served:
            continue
        first, last = addresses[served[0]], addresses[served[-1]]
        ranges.append((group, first, len(served)))
        yield (f"  {group:12} {len(served):6d} miners  {served[0]} .. {served[-1]}  "
               f"{first} .. {last}  port {server.port}")
    if server.skipped:
        yield f"  ({len(server.skipped)} miners of non-Antminer models have no LuxOS API)"
    yield ""
    yield "  # for `mineops bridge`, in the site file:"
    yield "  [bridge]"
    yield "  miners = ["
    for group, first, count in ranges:
        yield f'    {{ group = "{group}", first_host = "{first}", count = {count}, ' \
              'firmware = "luxos" },'
    yield "  ]"

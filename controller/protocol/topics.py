"""Every MQTT topic of a site, built and parsed in one place.

Topic, publisher -> subscribers, delivery:

    mineops/<site>/miner/<id>/telemetry     miner -> controller     QoS 0
    mineops/<site>/miner/<id>/availability  miner -> all            retained, last will
    mineops/<site>/miner/<id>/cmd           controller -> miner     QoS 1, sequence number
    mineops/<site>/group/<g>/telemetry      bridge/simulator -> controller, a rack in one message
    mineops/<site>/group/<g>/availability   bridge/simulator -> all  retained, last will
    mineops/<site>/group/<g>/cmd            controller -> group     QoS 1, batch or broadcast
    mineops/<site>/group/<g>/capabilities   bridge -> controller    retained: presets per miner
    mineops/<site>/fleet/cmd                controller -> fleets    QoS 1, site-wide batch/broadcast
    mineops/<site>/meter/<id>/telemetry     meter -> controller
    mineops/<site>/signal/price             price feed -> controller, retained
    mineops/<site>/signal/price_schedule    day-ahead prices -> controller, retained
    mineops/<site>/signal/hashprice         hashprice feed -> controller, retained
    mineops/<site>/signal/grid              grid events -> controller, retained, QoS 1
    mineops/<site>/controller/availability  retained, last will
    mineops/<site>/controller/decision      latest decision summary, retained
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from controller.protocol.payloads import (
    DecisionSummary,
    FleetCommand,
    GridEvent,
    GroupCapabilities,
    GroupCommand,
    GroupTelemetry,
    HashpriceSignal,
    MeterTelemetry,
    MinerCommand,
    MinerTelemetry,
    Payload,
    PayloadError,
    PriceSchedule,
    PriceSignal,
)

ROOT = "mineops"
ONLINE = "online"
OFFLINE = "offline"


class Kind(StrEnum):
    """What a topic carries; also the `kind` label of message counters."""

    MINER_TELEMETRY = "miner_telemetry"
    MINER_AVAILABILITY = "miner_availability"
    MINER_CMD = "miner_cmd"
    GROUP_TELEMETRY = "group_telemetry"
    GROUP_AVAILABILITY = "group_availability"
    GROUP_CMD = "group_cmd"
    GROUP_CAPABILITIES = "group_capabilities"
    FLEET_CMD = "fleet_cmd"
    METER_TELEMETRY = "meter_telemetry"
    PRICE = "price"
    PRICE_SCHEDULE = "price_schedule"
    HASHPRICE = "hashprice"
    GRID = "grid"
    CONTROLLER_AVAILABILITY = "controller_availability"
    DECISION = "decision"
    UNKNOWN = "unknown"


_DEVICE_KINDS = {
    ("miner", "telemetry"): Kind.MINER_TELEMETRY,
    ("miner", "availability"): Kind.MINER_AVAILABILITY,
    ("miner", "cmd"): Kind.MINER_CMD,
    ("group", "telemetry"): Kind.GROUP_TELEMETRY,
    ("group", "availability"): Kind.GROUP_AVAILABILITY,
    ("group", "cmd"): Kind.GROUP_CMD,
    ("group", "capabilities"): Kind.GROUP_CAPABILITIES,
    ("meter", "telemetry"): Kind.METER_TELEMETRY,
}
_SITE_KINDS = {
    ("signal", "price"): Kind.PRICE,
    ("signal", "price_schedule"): Kind.PRICE_SCHEDULE,
    ("signal", "hashprice"): Kind.HASHPRICE,
    ("signal", "grid"): Kind.GRID,
    ("fleet", "cmd"): Kind.FLEET_CMD,
    ("controller", "availability"): Kind.CONTROLLER_AVAILABILITY,
    ("controller", "decision"): Kind.DECISION,
}


# Incoming messages are handled by lane, most urgent first (transport.IncomingQueue):
# grid events, meters (under-frequency) and commands; then prices, capabilities and
# availability; telemetry last, the only lane that a flood may make drop.
LANE_URGENT, LANE_CONTROL, LANE_TELEMETRY = 0, 1, 2
LANES = 3
_LANE = {
    Kind.GRID: LANE_URGENT, Kind.METER_TELEMETRY: LANE_URGENT, Kind.MINER_CMD: LANE_URGENT,
    Kind.GROUP_CMD: LANE_URGENT, Kind.FLEET_CMD: LANE_URGENT,
    Kind.MINER_TELEMETRY: LANE_TELEMETRY, Kind.GROUP_TELEMETRY: LANE_TELEMETRY,
}


def incoming_lane(topic: str) -> tuple[int, Kind]:
    """The lane and kind of a received topic, for any site (no SiteTopics needed).

    A topic outside `mineops/` is a vendor meter's (Tasmota, Shelly): the only foreign
    topics a mineops process subscribes to. Unknown mineops topics go to the control
    lane: counted, never dropped for telemetry's sake.
    """
    parts = topic.split("/")
    if parts[0] != ROOT:
        return LANE_URGENT, Kind.METER_TELEMETRY
    if len(parts) == 5:
        kind = _DEVICE_KINDS.get((parts[2], parts[4]), Kind.UNKNOWN)
    elif len(parts) == 4:
        kind = _SITE_KINDS.get((parts[2], parts[3]), Kind.UNKNOWN)
    else:
        kind = Kind.UNKNOWN
    return _LANE.get(kind, LANE_CONTROL), kind


def parse_availability(raw: bytes) -> bool:
    """An availability payload: True for "online", False for "offline".

    Raises:
        PayloadError: anything else (reason `bad_value`).
    """
    text = raw.decode(errors="replace").strip()
    if text not in (ONLINE, OFFLINE):
        raise PayloadError("bad_value", f"availability must be online/offline: {text[:40]!r}")
    return text == ONLINE


# What each kind of topic carries: a payload model, or None for the plain-text
# availability ("online"/"offline"). Dispatch on received messages is a lookup here.
PAYLOAD_TYPES: dict[Kind, type[Payload] | None] = {
    Kind.MINER_TELEMETRY: MinerTelemetry,
    Kind.MINER_AVAILABILITY: None,
    Kind.MINER_CMD: MinerCommand,
    Kind.GROUP_TELEMETRY: GroupTelemetry,
    Kind.GROUP_AVAILABILITY: None,
    Kind.GROUP_CMD: GroupCommand,
    Kind.GROUP_CAPABILITIES: GroupCapabilities,
    Kind.FLEET_CMD: FleetCommand,
    Kind.METER_TELEMETRY: MeterTelemetry,
    Kind.PRICE: PriceSignal,
    Kind.PRICE_SCHEDULE: PriceSchedule,
    Kind.HASHPRICE: HashpriceSignal,
    Kind.GRID: GridEvent,
    Kind.CONTROLLER_AVAILABILITY: None,
    Kind.DECISION: DecisionSummary,
}


@dataclass(frozen=True, slots=True)
class Parsed:
    """A topic taken apart: its kind and the device id (empty for site topics)."""

    kind: Kind
    device: str = ""


@dataclass(frozen=True, slots=True)
class SiteTopics:
    """Topic names for one site."""

    site: str

    @property
    def base(self) -> str:
        """mineops/<site>: the prefix of every topic of the site."""
        return f"{ROOT}/{self.site}"

    def miner(self, miner_id: str, leaf: str) -> str:
        """mineops/<site>/miner/<id>/<leaf>; leaf telemetry, availability or cmd."""
        return f"{self.base}/miner/{miner_id}/{leaf}"

    def group(self, group: str, leaf: str) -> str:
        """mineops/<site>/group/<g>/<leaf>; leaf telemetry, availability, cmd or capabilities."""
        return f"{self.base}/group/{group}/{leaf}"

    def meter(self, meter_id: str) -> str:
        """mineops/<site>/meter/<id>/telemetry: a meter in the project's own format."""
        return f"{self.base}/meter/{meter_id}/telemetry"

    @property
    def fleet_cmd(self) -> str:
        """mineops/<site>/fleet/cmd: site-wide commands (FleetCommand), QoS 1."""
        return f"{self.base}/fleet/cmd"

    @property
    def price(self) -> str:
        """mineops/<site>/signal/price: the real-time price (PriceSignal), retained."""
        return f"{self.base}/signal/price"

    @property
    def price_schedule(self) -> str:
        """mineops/<site>/signal/price_schedule: day-ahead prices (PriceSchedule), retained."""
        return f"{self.base}/signal/price_schedule"

    @property
    def hashprice(self) -> str:
        """mineops/<site>/signal/hashprice: HashpriceSignal, retained."""
        return f"{self.base}/signal/hashprice"

    @property
    def grid(self) -> str:
        """mineops/<site>/signal/grid: grid events (GridEvent), QoS 1, retained."""
        return f"{self.base}/signal/grid"

    @property
    def controller_availability(self) -> str:
        """mineops/<site>/controller/availability: online/offline, retained, the last will."""
        return f"{self.base}/controller/availability"

    @property
    def decision(self) -> str:
        """mineops/<site>/controller/decision: the latest DecisionSummary, retained."""
        return f"{self.base}/controller/decision"

    def simulator_subscriptions(self) -> list[str]:
        """What a simulated (or bridged) fleet listens to."""
        return [f"{self.base}/miner/+/cmd", f"{self.base}/group/+/cmd", self.fleet_cmd]

    def parse(self, topic: str) -> Parsed:
        """Classify a topic of this site; anything else is Kind.UNKNOWN."""
        parts = topic.split("/")
        if len(parts) < 4 or parts[0] != ROOT or parts[1] != self.site:
            return Parsed(Kind.UNKNOWN)
        if len(parts) == 5:
            kind = _DEVICE_KINDS.get((parts[2], parts[4]))
            return Parsed(kind, parts[3]) if kind else Parsed(Kind.UNKNOWN)
        if len(parts) == 4:
            return Parsed(_SITE_KINDS.get((parts[2], parts[3]), Kind.UNKNOWN))
        return Parsed(Kind.UNKNOWN)

"""Shelly Gen2/Gen3 three-phase meters (Pro 3EM, 3EM Gen3, triphase profile) over MQTT.

Three topics under the device's prefix:
- `<prefix>/status/em:0`: the full EM status (per phase a_/b_/c_ current A, voltage V,
  act_power W, aprt_power VA, pf, freq Hz; total_current, total_act_power and
  total_aprt_power), published with "generic status update over MQTT";
- `<prefix>/status/emdata:0`: the energy registers in Wh (total_act import,
  total_act_ret export, and per phase a_total_act_energy, a_total_act_ret_energy...);
- `<prefix>/events/rpc`: JSON-RPC notifications ("RPC status notifications over MQTT").
  NotifyStatus carries only the fields that changed, under params["em:0"] and
  params["emdata:0"]; they are merged onto the last full status. NotifyFullStatus
  replaces it. Other notifications (NotifyEvent) carry no reading.

A negative act_power is export. A delta before any full status of its component is
an error (reason no_base_status): there is nothing to merge it onto, and a reading
made from half a status would understate the site's power. The state is the last
value of a fixed set of fields per component, so it cannot grow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from controller.config import ShellyGen2Meter
from controller.protocol.payloads import PayloadError
from drivers.meters.base import (
    MeterDriver,
    MeterReading,
    as_number,
    combined_power_factor,
    load_json,
    mean,
)

EM = "em:0"
EMDATA = "emdata:0"
PHASES = ("a", "b", "c")
EM_FIELDS = frozenset(
    [f"{p}_{q}" for p in PHASES
     for q in ("current", "voltage", "act_power", "aprt_power", "pf", "freq")]
    + ["n_current", "total_current", "total_act_power", "total_aprt_power"]
)
EMDATA_FIELDS = frozenset(
    [f"{p}_total_act_energy" for p in PHASES] + [f"{p}_total_act_ret_energy" for p in PHASES]
    + ["total_act", "total_act_ret"]
)
REQUIRED = {EM: "total_act_power", EMDATA: "total_act"}
FIELDS = {EM: EM_FIELDS, EMDATA: EMDATA_FIELDS}
MAX_STATUS_BYTES = 8 * 1024
MAX_RPC_BYTES = 64 * 1024  # NotifyFullStatus holds every component of the device


class ShellyGen2Driver(MeterDriver):
    """One Shelly Gen2/Gen3 EM device; keeps the last full EM and EMData status."""

    name = "shelly_gen2"

    def __init__(self, config: ShellyGen2Meter) -> None:
        super().__init__(config)
        prefix = config.prefix
        self.status_topics = {f"{prefix}/status/{EM}": EM, f"{prefix}/status/{EMDATA}": EMDATA}
        self.rpc_topic = f"{prefix}/events/rpc"
        self.status: dict[str, dict[str, float]] = {}

    def subscriptions(self) -> list[str]:
        return [*self.status_topics, self.rpc_topic]

    def exact_topics(self) -> list[str]:
        return self.subscriptions()

    def decode(self, topic: str, raw: bytes) -> MeterReading | None:
        component = self.status_topics.get(topic)
        if component is not None:
            updates = {component: _full(component, load_json(raw, MAX_STATUS_BYTES), component)}
        elif topic == self.rpc_topic:
            updates = self._notification(load_json(raw, MAX_RPC_BYTES))
        else:
            raise PayloadError("unknown_topic", f"not a topic of Shelly {self.config.id}")
        if not updates:
            return None
        reading = _reading(updates.get(EM, self.status.get(EM)),
                           updates.get(EMDATA, self.status.get(EMDATA)))
        if reading is not None:
            reading.checked()
        self.status.update(updates)  # only once the whole message is good
        return reading

    def _notification(self, msg: dict[str, Any]) -> dict[str, dict[str, float]]:
        method = msg.get("method")
        if not isinstance(method, str):
            raise PayloadError("bad_schema", "method: missing or not a string")
        if method not in ("NotifyStatus", "NotifyFullStatus"):
            return {}  # NotifyEvent and the like: no reading in them
        params = msg.get("params")
        if not isinstance(params, dict):
            raise PayloadError("bad_schema", "params: missing or not an object")
        updates: dict[str, dict[str, float]] = {}
        for component in (EM, EMDATA):
            body = params.get(component)
            if body is None:
                continue
            where = f"params.{component}"
            if method == "NotifyFullStatus":
                updates[component] = _full(component, body, where)
                continue
            delta = _fields(component, body, where)
            base = self.status.get(component)
            if base is None:
                raise PayloadError("no_base_status", f"NotifyStatus delta for {component} "
                                   f"before any full {component} status")
            updates[component] = {**base, **delta}
        return updates

    @classmethod
    def config_from_topics(cls, topics: Sequence[str]) -> ShellyGen2Meter:
        prefixes = set()
        for topic in topics:
            for suffix in (f"/status/{EM}", f"/status/{EMDATA}", "/events/rpc"):
                if topic.endswith(suffix) and len(topic) > len(suffix):
                    prefixes.add(topic[: -len(suffix)])
                    break
            else:
                raise PayloadError("unknown_topic", f"{topic}: Shelly Gen2 topics are "
                                   f"<prefix>/status/{EM}, <prefix>/status/{EMDATA} and "
                                   "<prefix>/events/rpc")
        if len(prefixes) != 1:
            raise PayloadError("unknown_topic", "topics of more than one Shelly device")
        return ShellyGen2Meter(type="shelly_gen2", id="shelly", prefix=prefixes.pop())


def _fields(component: str, body: Any, where: str) -> dict[str, float]:
    """The known numeric fields of a component status (nulls and other keys left out)."""
    if not isinstance(body, dict):
        raise PayloadError("wrong_type", f"{where}: expected an object")
    out: dict[str, float] = {}
    for key in FIELDS[component].intersection(body):
        value = as_number(body[key], f"{where}.{key}")
        if value is not None:
            out[key] = value
    return out


def _full(component: str, body: Any, where: str) -> dict[str, float]:
    fields = _fields(component, body, where)
    if REQUIRED[component] not in fields:
        raise PayloadError("bad_schema", f"{where}.{REQUIRED[component]}: missing")
    return fields


def _reading(em: dict[str, float] | None, emdata: dict[str, float] | None) -> MeterReading | None:
    if em is None:
        return None  # energy registers alone: no power to report yet
    phases = [p for p in PHASES if f"{p}_act_power" in em]
    power = [em[f"{p}_act_power"] for p in phases]
    apparent = [em[f"{p}_aprt_power"] for p in phases if f"{p}_aprt_power" in em]
    pfs = [em[f"{p}_pf"] for p in phases if f"{p}_pf" in em]
    currents = [em[f"{p}_current"] for p in PHASES if f"{p}_current" in em]
    total_va = em.get("total_aprt_power")
    if total_va is not None:  # the device's totals, rather than sums of rounded phases
        power, apparent = [em["total_act_power"]], [total_va]
    return MeterReading(
        power_w=em["total_act_power"],
        energy_import_wh=None if emdata is None else emdata.get("total_act"),
        energy_export_wh=None if emdata is None else emdata.get("total_act_ret"),
        voltage_v=mean([em[f"{p}_voltage"] for p in PHASES if f"{p}_voltage" in em]),
        current_a=em.get("total_current", sum(currents) if currents else None),
        power_factor=combined_power_factor(power, apparent or None, pfs or None),
        frequency_hz=mean([em[f"{p}_freq"] for p in PHASES if f"{p}_freq" in em]),
    )

"""Shelly Gen2/Gen3 energy meters over MQTT: em:0 (Pro 3EM, 3EM Gen3) or em1:N (Pro EM, EM Gen3).

Shelly's Gen2 API names a device's parts components, `<type>:<id>`. A meter is read in
one of two layouts, as the device's profile has it:
- `em:0` and `emdata:0` (Pro 3EM, 3EM Gen3 in the triphase profile): per phase a_/b_/c_
  current A, voltage V, act_power W, aprt_power VA, pf, freq Hz, with total_current,
  total_act_power and total_aprt_power; the energy registers in Wh (total_act import,
  total_act_ret export, per phase a_total_act_energy, a_total_act_ret_energy...);
- `em1:N` and `em1data:N` for the configured channels (`em1_channels`: Pro EM, EM Gen3,
  3EM in the monophase profile): per channel current A, voltage V, act_power W,
  aprt_power VA, pf, freq Hz; registers total_act_energy and total_act_ret_energy in Wh.
  The reading sums the configured channels and waits until each one's power is known.

Topics under the device's prefix:
- `<prefix>/status/<component>`: a component's full status ("generic status update
  over MQTT"). Every status topic is subscribed to, so that a meter component this
  config does not read is reported, not ignored;
- `<prefix>/events/rpc`: JSON-RPC notifications ("RPC status notifications over MQTT").
  NotifyStatus carries only the fields that changed, per component; they are merged onto
  the last full status (Shelly's documented use). NotifyFullStatus replaces it. Other
  notifications (NotifyEvent) carry no reading.

A negative act_power is export. A delta before any full status of its component is an
error (reason no_base_status): there is nothing to merge it onto. A component's `id`
in the payload must be the one its topic or key names (em1:1 holds "id": 1), else
bad_value: a payload of another channel is not read as this one's. A meter component
(em, emdata, em1, em1data, pm1), or any component whose status holds `apower` (the
metering relays, plugs and dimmers: switch:N, cover:N, light:N...), that the config
does not read, in a message that holds none that it does, is an error (reason
unsupported_component) naming the setting that reads it; em1 channels left out of
`em1_channels` on purpose are ignored. Voltage and frequency come from the live phases
or channels only (drivers.meters.base.grid_voltage_frequency). The state is the last
value of a fixed set of fields per configured component, so it cannot grow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from typing_extensions import override

from controller.config_types import TOPIC_PREFIX_PATTERN, MeterBase
from controller.protocol.payloads import PayloadError
from drivers.meters.base import (
    MeterDriver,
    MeterReading,
    UnknownValue,
    as_number,
    combined_power_factor,
    distinct_channels,
    grid_voltage_frequency,
    load_json,
    register_sum,
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
EM1_FIELDS = frozenset(["current", "voltage", "act_power", "aprt_power", "pf", "freq"])
EM1DATA_FIELDS = frozenset(["total_act_energy", "total_act_ret_energy"])
# Component types whose status is a meter reading (pm1: the Plus PM Mini's power meter).
METER_TYPES = frozenset(["em", "emdata", "em1", "em1data", "pm1"])
# A status with this field is a power meter's whatever its type: Shelly's metering relays,
# plugs, covers and dimmers (switch:N, cover:N, light:N...) report their power in it.
METERING_FIELD = "apower"
MAX_STATUS_BYTES = 8 * 1024
MAX_RPC_BYTES = 64 * 1024  # NotifyFullStatus holds every component of the device


@dataclass(frozen=True, slots=True)
class _Kind:
    """What is kept of one component type, and the field its full status must hold."""

    fields: frozenset[str]
    required: str


KINDS = {
    "em": _Kind(EM_FIELDS, "total_act_power"),
    "emdata": _Kind(EMDATA_FIELDS, "total_act"),
    "em1": _Kind(EM1_FIELDS, "act_power"),
    "em1data": _Kind(EM1DATA_FIELDS, "total_act_energy"),
}


class ShellyGen2Meter(MeterBase):
    """A Shelly Gen2/Gen3 meter: em:0, or em1:N channels.

    em:0 on the Pro 3EM and the 3EM Gen3 (triphase profile); em1:N on the Pro EM, the EM
    Gen3 and the 3EM in its monophase profile.
    """

    type: Literal["shelly_gen2"]
    prefix: str = Field(
        pattern=TOPIC_PREFIX_PATTERN, max_length=128,
        description="The device's MQTT topic prefix (default on the device: its id, e.g. "
        "shellypro3em-0cb815fcaff4)",
    )
    em1_channels: list[Annotated[int, Field(ge=0, le=2)]] | None = Field(
        default=None, min_length=1, max_length=3,
        description="EM1 channels (em1:N) summed into the reading, for devices without em:0 "
        "(Pro EM, EM Gen3, 3EM in its monophase profile); unset: the device's em:0",
    )

    @field_validator("em1_channels")
    @classmethod
    def _distinct_em1_channels(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else distinct_channels(value)

    @property
    @override
    def source(self) -> str:
        return f"shelly {self.prefix}"


class ShellyGen2Driver(MeterDriver[ShellyGen2Meter]):
    """One Shelly Gen2/Gen3 EM device; keeps the last full status of each component it reads.

    Args:
        config: Its `[[meters]]` table.
    """

    name = "shelly_gen2"

    def __init__(self, config: ShellyGen2Meter) -> None:
        super().__init__(config)
        self.em1_channels: tuple[int, ...] | None = (
            None if config.em1_channels is None else tuple(config.em1_channels))
        if self.em1_channels is None:
            self.components: tuple[str, ...] = (EM, EMDATA)
        else:
            self.components = (*(f"em1:{n}" for n in self.em1_channels),
                               *(f"em1data:{n}" for n in self.em1_channels))
        self.status_prefix = f"{config.prefix}/status/"
        self.rpc_topic = f"{config.prefix}/events/rpc"
        self.status: dict[str, dict[str, float]] = {}

    @override
    def subscriptions(self) -> list[str]:
        return [f"{self.status_prefix}+", self.rpc_topic]

    @override
    def exact_topics(self) -> list[str]:
        return [self.rpc_topic]

    @override
    def topic_prefixes(self) -> list[str]:
        return [self.status_prefix]

    @override
    def decode(self, topic: str, raw: bytes) -> MeterReading | None:
        notes: list[UnknownValue] = []  # malformed fields other than power, left unknown
        if topic == self.rpc_topic:
            updates = self._notification(load_json(raw, MAX_RPC_BYTES), notes)
        elif topic.startswith(self.status_prefix) and "/" not in topic[len(self.status_prefix):]:
            component = topic[len(self.status_prefix):]
            if component not in self.components:
                self._check_other({component: _peek(raw)})
                return None  # sys, wifi, a plain switch...: no reading in them
            updates = {component: _full(component, load_json(raw, MAX_STATUS_BYTES), component,
                                        notes)}
        else:
            raise PayloadError("unknown_topic", f"not a topic of Shelly {self.config.id}")
        if not updates:
            return None
        reading = self._reading({**self.status, **updates})
        if reading is not None:
            reading = replace(reading, unknown=(*notes, *reading.unknown)).checked()
        self.status.update(updates)  # only once the whole message is good
        return reading

    def _check_other(self, components: Mapping[str, Any]) -> None:
        """Raise unsupported_component for meter components this config does not read.

        `components` maps each component's name to its status (None when unknown).
        """
        foreign = [c for c, body in components.items()
                   if (c.partition(":")[0] in METER_TYPES and not self._left_out(c))
                   or (isinstance(body, dict) and body.get(METERING_FIELD) is not None)]
        if not foreign:
            return
        reads = ", ".join(self.components)
        em1 = sorted({int(i) for k, _, i in (c.partition(":") for c in foreign)
                      if k in ("em1", "em1data") and i.isdigit()})
        others = [c for c in foreign if c.partition(":")[0] not in KINDS]
        if em1:
            hint = (f"a Pro EM, EM Gen3 or 3EM in its monophase profile reports em1:N: set "
                    f"em1_channels (e.g. {em1})")
        elif self.em1_channels is not None and any(c.startswith("em") for c in foreign):
            hint = "a Pro 3EM or 3EM Gen3 in its triphase profile reports em:0: remove em1_channels"
        elif others:
            hint = (f"{', '.join(others)}: the power meter of a relay, plug, dimmer or PM "
                    "Mini (Plus 1PM, Pro 4PM, Plus Plug, Plus PM Mini...); no meter type "
                    "reads those: measure the site with a Shelly EM device")
        else:
            hint = "no meter type reads this component"
        raise PayloadError("unsupported_component",
                           f"{', '.join(foreign)}: not read by this meter (it reads {reads}); "
                           f"{hint}")

    def _left_out(self, component: str) -> bool:
        """An em1 channel the config leaves out on purpose (it measures something else)."""
        kind, _, _ = component.partition(":")
        return self.em1_channels is not None and kind in ("em1", "em1data")

    def _notification(self, msg: dict[str, Any],
                      notes: list[UnknownValue]) -> dict[str, dict[str, float]]:
        method = msg.get("method")
        if not isinstance(method, str):
            raise PayloadError("bad_schema", "method: missing or not a string")
        if method not in ("NotifyStatus", "NotifyFullStatus"):
            return {}  # NotifyEvent and the like: no reading in them
        params = msg.get("params")
        if not isinstance(params, dict):
            raise PayloadError("bad_schema", "params: missing or not an object")
        present = [c for c in self.components if params.get(c) is not None]
        if not present:
            self._check_other(params)
            return {}
        updates: dict[str, dict[str, float]] = {}
        for component in present:
            body = params[component]
            where = f"params.{component}"
            if method == "NotifyFullStatus":
                updates[component] = _full(component, body, where, notes)
                continue
            delta, unknown = _fields(component, body, where, notes)
            base = self.status.get(component)
            if base is None:
                raise PayloadError("no_base_status", f"NotifyStatus delta for {component} "
                                   f"before any full {component} status")
            # A field the delta makes null or malformed is unknown now, not its old value.
            updates[component] = {k: v for k, v in {**base, **delta}.items()
                                  if k not in unknown}
        return updates

    def _reading(self, status: dict[str, dict[str, float]]) -> MeterReading | None:
        if self.em1_channels is None:
            return _em_reading(status.get(EM), status.get(EMDATA))
        return _em1_reading(self.em1_channels,
                            [status.get(f"em1:{n}") for n in self.em1_channels],
                            [status.get(f"em1data:{n}") for n in self.em1_channels])

    @classmethod
    @override
    def config_from_topics(cls, topics: Sequence[str]) -> ShellyGen2Meter:
        prefixes, channels = set(), set()
        for topic in topics:
            if topic.endswith("/events/rpc") and len(topic) > len("/events/rpc"):
                prefixes.add(topic[: -len("/events/rpc")])
                continue
            prefix, _, component = topic.rpartition("/status/")
            if not prefix or not component or "/" in component:
                raise PayloadError("unknown_topic", f"{topic}: Shelly Gen2 topics are "
                                   "<prefix>/status/<component> (em:0, emdata:0, em1:N, "
                                   "em1data:N) and <prefix>/events/rpc")
            prefixes.add(prefix)
            kind, _, index = component.partition(":")
            if kind in ("em1", "em1data") and index.isdigit():
                channels.add(int(index))
        if len(prefixes) != 1:
            raise PayloadError("unknown_topic", "topics of more than one Shelly device")
        # EM1 topics name the channels; the reading waits for each one's power.
        return ShellyGen2Meter(type="shelly_gen2", id="shelly", prefix=prefixes.pop(),
                               em1_channels=sorted(channels) or None)


def _peek(raw: bytes) -> Any:
    """A status of a component the meter does not read, if it is JSON (else None).

    Only to see whether it meters power: a `sys` or `wifi` status that does not parse is
    none of this meter's business.
    """
    try:
        return load_json(raw, MAX_STATUS_BYTES)
    except PayloadError:
        return None


def _fields(component: str, body: Any, where: str,
            notes: list[UnknownValue]) -> tuple[dict[str, float], set[str]]:
    """The known numeric fields of a component status, and those it makes unknown.

    Other keys are left out. A field that is null or malformed (a string, a number too
    large) is unknown: it costs only itself, and a malformed one that the reading uses
    is noted in `notes` with its reason. The component's required field (its power, or
    its import register) malformed or null is an error.

    Raises:
        PayloadError: not an object (wrong_type), the required field malformed or null,
            or an `id` that is not the component's own (bad_value: another channel's).
    """
    if not isinstance(body, dict):
        raise PayloadError("wrong_type", f"{where}: expected an object")
    _check_id(component, body.get("id"), where)
    kind = KINDS[component.partition(":")[0]]
    out: dict[str, float] = {}
    unknown: set[str] = set()
    for key in kind.fields.intersection(body):
        try:
            value = as_number(body[key], f"{where}.{key}")
        except PayloadError as e:
            if key == kind.required:
                raise
            unknown.add(key)
            if (field := _reading_key(key)) is not None:
                notes.append(UnknownValue(field, e.reason, e.detail))
            continue
        if value is None:
            if key == kind.required:
                raise PayloadError("bad_schema", f"{where}.{key}: null")
            unknown.add(key)
        else:
            out[key] = value
    return out, unknown


def _reading_key(field: str) -> str | None:
    """The reading's key a component field feeds; None for fields it does not use."""
    if field.endswith("voltage"):
        return "voltage_v"
    if field.endswith("freq"):
        return "frequency_hz"
    if field.endswith("current") and field != "n_current":
        return "current_a"
    if field.endswith(("pf", "aprt_power", "act_power")):
        return "power_factor"  # em's per-phase powers only weigh the phases' factors
    if field in ("total_act", "total_act_energy"):
        return "energy_import_wh"
    if field in ("total_act_ret", "total_act_ret_energy"):
        return "energy_export_wh"
    return None  # per-phase registers: kept, but the reading uses the totals


def _check_id(component: str, value: Any, where: str) -> None:
    """A payload's `id` must be its component's (Shelly puts it in every status)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError("wrong_type", f"{where}.id: expected an integer, got {value!r:.40}")
    kind, _, index = component.partition(":")
    if str(value) != index:
        raise PayloadError("bad_value", f"{where}.id is {value}: a payload of {kind}:{value}, "
                           f"not {component} (a device's message on another's topic?)")


def _full(component: str, body: Any, where: str,
          notes: list[UnknownValue]) -> dict[str, float]:
    fields, _ = _fields(component, body, where, notes)
    required = KINDS[component.partition(":")[0]].required
    if required not in fields:
        raise PayloadError("bad_schema", f"{where}.{required}: missing")
    return fields


def _em_reading(em: dict[str, float] | None,
                emdata: dict[str, float] | None) -> MeterReading | None:
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
    grid = grid_voltage_frequency(
        [em.get(f"{p}_voltage") for p in PHASES], [em.get(f"{p}_freq") for p in PHASES])
    return MeterReading(
        power_w=em["total_act_power"],
        energy_import_wh=None if emdata is None else emdata.get("total_act"),
        energy_export_wh=None if emdata is None else emdata.get("total_act_ret"),
        voltage_v=grid.voltage_v,
        current_a=em.get("total_current", sum(currents) if currents else None),
        power_factor=combined_power_factor(power, apparent or None, pfs or None),
        frequency_hz=grid.frequency_hz,
        unknown=grid.unknown,
    )


def _em1_reading(channels: Sequence[int], em1: list[dict[str, float] | None],
                 em1data: list[dict[str, float] | None]) -> MeterReading | None:
    chans = [c for c in em1 if c is not None]
    if len(chans) < len(em1):
        return None  # a channel's power is still unknown: a partial sum would understate

    def every(quantity: str, statuses: list[dict[str, float] | None]) -> list[float] | None:
        got = [s[quantity] for s in statuses if s is not None and quantity in s]
        return got if len(got) == len(statuses) else None

    power = [c["act_power"] for c in chans]
    current = every("current", em1)
    notes: list[UnknownValue] = []

    def register(quantity: str, field: str) -> float | None:
        values = every(quantity, em1data)
        if values is None:
            return None
        total, note = register_sum(field, [(f"em1data:{n}.{quantity}", v)
                                           for n, v in zip(channels, values, strict=True)])
        if note is not None:
            notes.append(note)
        return total

    imported = register("total_act_energy", "energy_import_wh")
    exported = register("total_act_ret_energy", "energy_export_wh")
    grid = grid_voltage_frequency(
        [c.get("voltage") for c in chans], [c.get("freq") for c in chans])
    return MeterReading(
        power_w=sum(power),
        energy_import_wh=imported,
        energy_export_wh=exported,
        voltage_v=grid.voltage_v,
        current_a=None if current is None else sum(current),
        power_factor=combined_power_factor(power, every("aprt_power", em1), every("pf", em1)),
        frequency_hz=grid.frequency_hz,
        unknown=(*notes, *grid.unknown),
    )

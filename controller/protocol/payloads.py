"""Every MQTT payload as a versioned pydantic model with a size limit, and one decoder.

Bounds are physical: a value outside them is absurd (a 2 MW miner, a 90 Hz grid)
and the message is dropped with reason `out_of_range` rather than trusted. Types are
strict: a number sent as a string ("12") or as a boolean is `wrong_type`, never coerced.
Bounds that depend on the site (a model's maximum power, the site cap, the market's
price rules, the controller's clock) are checked by ingest (controller/daemon/ingest.py).

Miner telemetry, the one high-rate input, is decoded by msgspec (a C validating JSON
decoder, ~10x pydantic on these shapes) straight into columns: `TelemetryColumns`, one
entry per reading, whatever the message's format (per miner, rack v1 rows, rack v2
columns). Group messages decode into lists (`decode_group_message`), and the lists of
all the messages ingest handles together become numpy arrays once (`TelemetryBatch`).
The pydantic models of telemetry stay as the documented schema and for producers that
build one reading at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1


class PayloadError(Exception):
    """A payload that cannot be accepted.

    Args:
        reason: A fixed metric label (the `reason` of mineops_mqtt_messages_invalid_total),
            e.g. "bad_json", "out_of_range".
        detail: What was wrong, for the log.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Payload(BaseModel):
    """Base of all payloads: strict keys, a schema version, a byte limit."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)
    MAX_BYTES: ClassVar[int] = 4096

    v: Literal[1] = 1  # SCHEMA_VERSION

    def encode(self) -> bytes:
        """The payload as compact JSON, UTF-8, absent (None) fields left out."""
        return self.model_dump_json(exclude_none=True).encode()


Watts = Annotated[float, Field(ge=0, le=50_000)]
MinerState = Literal["running", "sleeping", "waking", "stopping", "error"]


class MinerReading(BaseModel):
    """What a miner reports about itself; an absent value is unknown, never zero.

    `power_w` and `hashrate_ths` may be absent since bridges report what firmware could
    not tell (pyasic returns None); a miner of unknown power counts at its model's maximum.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    state: MinerState
    power_w: Watts | None = Field(default=None, description="Draw, W; absent when unknown")
    hashrate_ths: float | None = Field(default=None, ge=0, le=5_000,
                                       description="TH/s; absent when unknown")
    target_w: Watts | None = Field(default=None, description="Power target in force")
    temp_c: float | None = Field(default=None, ge=-50, le=150)
    fan_rpm: int | None = Field(default=None, ge=0, le=30_000)
    hashboards: int | None = Field(default=None, ge=0, le=8, description="Boards hashing")
    ack_seq: int | None = Field(default=None, ge=0, description="Last command applied")
    reason: str | None = Field(default=None, max_length=64,
                               description="Why the state is 'error', e.g. 'no pyasic class: "
                               "LuxOS on Antminer S21 XP'")


class MinerTelemetry(Payload, MinerReading):
    """One miner's reading, on mineops/<site>/miner/<id>/telemetry."""

    ts: float = Field(ge=0, description="Unix time of the reading, s")


class GroupMinerReading(MinerReading):
    """One miner's reading within a rack's message (GroupTelemetry v1), named by its id."""

    id: str = Field(min_length=1, max_length=64)


class GroupTelemetry(Payload):
    """mineops/<site>/group/<g>/telemetry: a rack's readings in one message."""

    MAX_BYTES: ClassVar[int] = 512 * 1024

    ts: float = Field(ge=0)
    miners: list[GroupMinerReading] = Field(max_length=2000)


# -- telemetry on the wire (msgspec) ---------------------------------------------------
#
# Lists are typed loosely on purpose: a value a miner cannot have (49,999 W for an S21)
# costs that miner its reading, not its rack-mates theirs, so per-value bounds are
# checked per miner by ingest against the miner's own model. What fails here is the
# message's shape: a wrong type ("12", true), a missing or unknown field, a list of
# another length, an integer beyond 64 bits. JSON has no NaN or Infinity, and a number
# too large for a double (1e400) is "out of range" to msgspec: floats are finite.

TELEMETRY_V2 = 2
MAX_GROUP_READINGS = 2000  # per message; a bridge splits a larger group
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_Short = Annotated[str, msgspec.Meta(max_length=64)]


class _MinerWire(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One reading, as in `MinerTelemetry` and `GroupTelemetry.miners` (v1)."""

    state: _Short
    power_w: float | None = None
    hashrate_ths: float | None = None
    target_w: float | None = None
    temp_c: float | None = None
    fan_rpm: _Int64 | None = None
    hashboards: _Int64 | None = None
    ack_seq: _Int64 | None = None
    reason: _Short | None = None


class MinerTelemetryWire(_MinerWire, frozen=True, kw_only=True):
    """mineops/<site>/miner/<id>/telemetry, v1 (the schema is `MinerTelemetry`)."""

    ts: float
    v: Literal[1] = 1


class _GroupRowWire(_MinerWire, frozen=True, kw_only=True):
    id: _Id


class GroupTelemetryV1Wire(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """mineops/<site>/group/<g>/telemetry, v1: a row per miner (the schema is `GroupTelemetry`)."""

    ts: float
    miners: Annotated[list[_GroupRowWire], msgspec.Meta(max_length=MAX_GROUP_READINGS)]
    v: Literal[1] = 1


_Col = Annotated[list[float | None], msgspec.Meta(max_length=MAX_GROUP_READINGS)]
_IntCol = Annotated[list[_Int64 | None], msgspec.Meta(max_length=MAX_GROUP_READINGS)]


class GroupTelemetryV2(msgspec.Struct, forbid_unknown_fields=True, frozen=True,
                       omit_defaults=True):
    """mineops/<site>/group/<g>/telemetry, v2: a group's readings as columns.

    `{"v":2,"ts":1732900000.0,"ids":["r1-0001",...],"state":["running",...],
    "power_w":[3480.5,null,...],"hashrate_ths":[...],...}`: entry k of every column is
    miner `ids[k]`. `ids` and `state` are required; every other column is optional
    (absent: unknown for every miner) and, when present, as long as `ids`; `null` is
    unknown for that miner (never zero). Units and bounds as `MinerReading`. `ts` is
    the Unix time of the oldest reading in the message, s (the staleness of each
    reading is judged by it). At most 2,000 miners a message.

    About half the bytes of v1's rows (field names once per message, not per miner),
    and decoded without a Python object per reading.
    """

    ts: float
    ids: Annotated[list[_Id], msgspec.Meta(max_length=MAX_GROUP_READINGS)]
    state: Annotated[list[_Short], msgspec.Meta(max_length=MAX_GROUP_READINGS)]
    power_w: _Col | None = None
    hashrate_ths: _Col | None = None
    target_w: _Col | None = None
    temp_c: _Col | None = None
    fan_rpm: _IntCol | None = None
    hashboards: _IntCol | None = None
    ack_seq: _IntCol | None = None
    reason: Annotated[list[_Short | None], msgspec.Meta(max_length=MAX_GROUP_READINGS)] | None \
        = None
    v: Literal[2] = 2


class _Version(msgspec.Struct):
    v: _Int64 = 1


_F64 = npt.NDArray[np.float64]
_I64 = npt.NDArray[np.int64]
_NUMBER_COLUMNS = ("power_w", "hashrate_ths", "target_w", "temp_c")
_INT_COLUMNS = ("fan_rpm", "hashboards", "ack_seq")


@dataclass(frozen=True, slots=True)
class TelemetryColumns:
    """Readings as columns, n entries, from any telemetry format, of one message or several.

    Numbers are float64 with NaN for unknown; `fan_rpm`, `hashboards`, `ack_seq` are
    int64 with -1 for unknown. `ts` is the message's Unix time, s (of several messages
    the oldest's, as a v2 message's own `ts` is its oldest reading's; -1: none given).
    """

    ts: float
    ids: list[str]
    state: list[str]
    power_w: _F64
    hashrate_ths: _F64
    target_w: _F64
    temp_c: _F64
    fan_rpm: _I64
    hashboards: _I64
    ack_seq: _I64
    reason: list[str | None] | None

    @property
    def n(self) -> int:
        """How many readings (the length of every column)."""
        return len(self.ids)


_V2 = msgspec.json.Decoder(GroupTelemetryV2)
_V1 = msgspec.json.Decoder(GroupTelemetryV1Wire)
_PEEK = msgspec.json.Decoder(_Version)
_MINER = msgspec.json.Decoder(MinerTelemetryWire)


def _numpy_values(obj: object) -> object:
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


# NaN and infinities encode as null: unknown, the payloads' meaning for null.
_ENCODER = msgspec.json.Encoder(enc_hook=_numpy_values)


def _payload_error(e: msgspec.MsgspecError) -> PayloadError:
    """A msgspec error as a PayloadError with a fixed reason (the same reasons as `decode`)."""
    text = str(e)
    if isinstance(e, msgspec.DecodeError) and not isinstance(e, msgspec.ValidationError):
        return PayloadError("bad_json", text)
    if text.endswith("at `$.v`"):
        return PayloadError("bad_version", text)
    if text.startswith(("Object missing required field", "Object contains unknown field")):
        return PayloadError("bad_schema", text)
    if text.startswith(("Number out of range", "Expected `array` of length")) or (
            text.startswith("Expected `") and ("<=" in text or ">=" in text)):
        return PayloadError("out_of_range", text)
    return PayloadError("wrong_type", text)


class _GroupV2Wire(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`GroupTelemetryV2` as decoded: `ids` and `state` left as JSON (GroupDecoder)."""

    ts: float
    ids: msgspec.Raw
    state: msgspec.Raw
    power_w: _Col | None = None
    hashrate_ths: _Col | None = None
    target_w: _Col | None = None
    temp_c: _Col | None = None
    fan_rpm: _IntCol | None = None
    hashboards: _IntCol | None = None
    ack_seq: _IntCol | None = None
    reason: Annotated[list[_Short | None], msgspec.Meta(max_length=MAX_GROUP_READINGS)] | None \
        = None
    v: Literal[2] = 2


_V2_WIRE = msgspec.json.Decoder(_GroupV2Wire)
_IDS = msgspec.json.Decoder(Annotated[list[_Id], msgspec.Meta(max_length=MAX_GROUP_READINGS)])
_STATES = msgspec.json.Decoder(
    Annotated[list[_Short], msgspec.Meta(max_length=MAX_GROUP_READINGS)])


class GroupDecoder:
    """Decodes group telemetry (`decode`), keeping the `ids` and `state` lists it has seen.

    A rack sends the same ids in every message, and mostly the same states: a column
    whose JSON was seen before is the same list object as then (validated then), not
    40 new strings. Ingest relies on that identity to reuse what it derived from them
    (rows, state codes). The lists are shared: never modify them. At most `max_lists`
    lists of each kind are kept (then the cache starts again), so a stream of ever new
    ids costs bounded memory.

    Args:
        max_lists: Lists kept per column (ids, state); 0 keeps none.
    """

    def __init__(self, max_lists: int = 20_000) -> None:
        self.max_lists = max_lists
        self._ids: dict[bytes, list[str]] = {}
        self._states: dict[bytes, list[str]] = {}

    def decode(self, raw: bytes) -> GroupTelemetryV2:
        """A group telemetry message, v2 (columns) or v1 (rows), checked, as v2's lists.

        Lists rather than arrays: the messages ingest handles together become arrays
        once for all of them (`TelemetryBatch`), which for racks of 40 costs less than
        the decoding.

        Raises:
            PayloadError: oversized, bad_json, bad_version, bad_schema (a column of
                another length than `ids` included), wrong_type, out_of_range (only what
                no miner can send: an integer beyond 64 bits, a number beyond a double,
                a list beyond MAX_GROUP_READINGS).
        """
        if len(raw) > GroupTelemetry.MAX_BYTES:
            raise PayloadError("oversized", f"{len(raw)} bytes > {GroupTelemetry.MAX_BYTES}")
        try:
            try:
                w = _V2_WIRE.decode(raw)
            except msgspec.ValidationError:
                version = _PEEK.decode(raw).v
                if version == TELEMETRY_V2:
                    raise
                if version != 1:
                    raise PayloadError("bad_version", f"schema version {version!r}") from None
                return _rows_as_lists(_V1.decode(raw))
        except msgspec.MsgspecError as e:
            raise _payload_error(e) from None
        ids = self._column(self._ids, _IDS, w.ids, "ids")
        state = self._column(self._states, _STATES, w.state, "state")
        n = len(ids)
        for column in (state, w.power_w, w.hashrate_ths, w.target_w, w.temp_c, w.fan_rpm,
                       w.hashboards, w.ack_seq, w.reason):
            if column is not None and len(column) != n:
                name = "state" if column is state else next(
                    k for k in (*_NUMBER_COLUMNS, *_INT_COLUMNS, "reason")
                    if getattr(w, k) is column)
                raise PayloadError("bad_schema", f"{name}: {len(column)} entries for {n} ids")
        return GroupTelemetryV2(
            ts=w.ts, ids=ids, state=state, power_w=w.power_w, hashrate_ths=w.hashrate_ths,
            target_w=w.target_w, temp_c=w.temp_c, fan_rpm=w.fan_rpm, hashboards=w.hashboards,
            ack_seq=w.ack_seq, reason=w.reason)

    def _column(self, seen: dict[bytes, list[str]], decoder: msgspec.json.Decoder[list[str]],
                text: msgspec.Raw, name: str) -> list[str]:
        key = bytes(text)
        found = seen.get(key)
        if found is not None:
            return found
        try:
            values = decoder.decode(key)
        except msgspec.MsgspecError as e:
            error = _payload_error(e)
            where = (error.detail.replace("at `$", f"at `$.{name}") if "at `$" in error.detail
                     else f"{error.detail} - at `$.{name}`")
            raise PayloadError(error.reason, where) from None
        if len(seen) >= self.max_lists:
            seen.clear()
        if self.max_lists:
            seen[key] = values
        return values


_DECODER = GroupDecoder()


def decode_group_message(raw: bytes) -> GroupTelemetryV2:
    """`GroupDecoder.decode` with a decoder shared by the process."""
    return _DECODER.decode(raw)


def _rows_as_lists(m: GroupTelemetryV1Wire) -> GroupTelemetryV2:
    rows = m.miners
    return GroupTelemetryV2(
        ts=m.ts, ids=[r.id for r in rows], state=[r.state for r in rows],
        power_w=[r.power_w for r in rows], hashrate_ths=[r.hashrate_ths for r in rows],
        target_w=[r.target_w for r in rows], temp_c=[r.temp_c for r in rows],
        fan_rpm=[r.fan_rpm for r in rows], hashboards=[r.hashboards for r in rows],
        ack_seq=[r.ack_seq for r in rows], reason=[r.reason for r in rows])


class TelemetryBatch:
    """Decoded group messages gathered column by column, to become arrays once.

    Each column is a list over every message added, converted to an array once by
    `columns()`: a numpy call per column per batch, not per message. A message's lists
    are copied in as it is added, so it need not be kept: thousands of decoded messages
    alive at once would each be traversed by every garbage collection meanwhile (it
    doubled the cost of a batch of 400 racks).
    """

    __slots__ = ("_ints", "_nulls", "_numbers", "_reasons", "_sent_reason", "ids", "state",
                 "ts")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.state: list[str] = []
        self.ts = math.inf  # the oldest message's
        self._numbers: tuple[list[float | None], ...] = ([], [], [], [])
        self._ints: tuple[list[int | None], ...] = ([], [], [])
        self._reasons: list[str | None] = []
        self._sent_reason = False
        self._nulls = False  # an integer column holds None somewhere

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, m: GroupTelemetryV2) -> None:
        """Append a message's readings (as `decode_group_message` checked them)."""
        # Unrolled: this runs for every rack message, and a loop over the columns cost
        # as much as the copying.
        n = len(m.ids)
        self.ids.extend(m.ids)
        self.state.extend(m.state)
        self.ts = min(self.ts, m.ts)
        power, hashrate, target, temp = self._numbers
        nones: list[None] = [None] * n if (m.power_w is None or m.hashrate_ths is None
                                           or m.target_w is None or m.temp_c is None) else []
        power.extend(nones if m.power_w is None else m.power_w)
        hashrate.extend(nones if m.hashrate_ths is None else m.hashrate_ths)
        target.extend(nones if m.target_w is None else m.target_w)
        temp.extend(nones if m.temp_c is None else m.temp_c)
        fan, boards, ack = self._ints
        unknown: list[int] = [-1] * n if (m.fan_rpm is None or m.hashboards is None
                                          or m.ack_seq is None) else []
        for out, values in ((fan, m.fan_rpm), (boards, m.hashboards), (ack, m.ack_seq)):
            if values is None:
                out.extend(unknown)
            else:
                out.extend(values)
                if not self._nulls and None in values:
                    self._nulls = True
        if m.reason is not None:
            if not self._sent_reason:
                self._reasons = [None] * (len(self.ids) - n)
                self._sent_reason = True
            self._reasons.extend(m.reason)
        elif self._sent_reason:
            self._reasons.extend([None] * n)

    def columns(self) -> TelemetryColumns:
        """The readings added, message after message, as columns.

        A column a message left out is unknown for its readings (NaN, or -1 for the
        integer columns); `reason` is None only if no message sent one; `ts` is the
        oldest message's (-1 if none).
        """
        power, hashrate, target, temp = (np.array(v, dtype=np.float64)  # None: NaN
                                         for v in self._numbers)
        fan, boards, ack = (np.array([-1 if x is None else x for x in v] if self._nulls else v,
                                     dtype=np.int64) for v in self._ints)
        return TelemetryColumns(
            ts=self.ts if self.ts < math.inf else -1.0, ids=self.ids,
            state=self.state, power_w=power, hashrate_ths=hashrate, target_w=target,
            temp_c=temp, fan_rpm=fan, hashboards=boards, ack_seq=ack,
            reason=self._reasons if self._sent_reason else None)


def decode_group_telemetry(raw: bytes) -> TelemetryColumns:
    """A group telemetry message, v2 (columns) or v1 (rows), as columns.

    Raises:
        PayloadError: as `decode_group_message`.
    """
    batch = TelemetryBatch()
    batch.add(decode_group_message(raw))
    return batch.columns()


def decode_miner_telemetry(raw: bytes) -> MinerTelemetryWire:
    """A per-miner telemetry message (v1); bounds are ingest's, per model.

    Raises:
        PayloadError: as `decode_group_telemetry`.
    """
    if len(raw) > MinerTelemetry.MAX_BYTES:
        raise PayloadError("oversized", f"{len(raw)} bytes > {MinerTelemetry.MAX_BYTES}")
    try:
        return _MINER.decode(raw)
    except msgspec.MsgspecError as e:
        raise _payload_error(e) from None


def encode_group_telemetry(ts: float, ids: Sequence[str], state: Sequence[str], *,
                           power_w: Sequence[float | None] | None = None,
                           hashrate_ths: Sequence[float | None] | None = None,
                           target_w: Sequence[float | None] | None = None,
                           temp_c: Sequence[float | None] | None = None,
                           fan_rpm: Sequence[int | None] | None = None,
                           hashboards: Sequence[int | None] | None = None,
                           ack_seq: Sequence[int | None] | None = None,
                           reason: Sequence[str | None] | None = None) -> bytes:
    """The JSON of a `GroupTelemetryV2` (columns as given; None or NaN: unknown).

    Columns may be sequences or numpy arrays. A column left out is unknown for every
    miner. Raises ValueError if a column's length differs from `ids`' (the controller
    would drop the message).
    """
    n = len(ids)

    def col(values: Sequence[object] | None) -> list[object] | None:
        if values is None:
            return None
        out = list(values)
        if len(out) != n:
            raise ValueError(f"{len(out)} entries for {n} ids")
        return out

    msg = {"v": TELEMETRY_V2, "ts": ts, "ids": col(ids), "state": col(state),
           "power_w": col(power_w), "hashrate_ths": col(hashrate_ths),
           "target_w": col(target_w), "temp_c": col(temp_c), "fan_rpm": col(fan_rpm),
           "hashboards": col(hashboards), "ack_seq": col(ack_seq), "reason": col(reason)}
    return _ENCODER.encode({k: v for k, v in msg.items() if v is not None})


class MeterTelemetry(Payload):
    """mineops/<site>/meter/<id>/telemetry: the project's own meter format."""

    ts: float = Field(ge=0)
    power_w: float = Field(ge=-2e9, le=2e9, description="Active power, import positive")
    energy_import_wh: float | None = Field(default=None, ge=0)
    energy_export_wh: float | None = Field(default=None, ge=0)
    voltage_v: float | None = Field(default=None, ge=0, le=1_000_000)
    frequency_hz: float | None = Field(default=None, ge=40, le=70)


class PriceSignal(Payload):
    """mineops/<site>/signal/price: real-time energy price for the interval starting at ts."""

    ts: float = Field(ge=0)
    price_usd_per_mwh: float = Field(ge=-10_000, le=100_000)
    interval_s: float | None = Field(default=None, gt=0, le=86_400)
    source: str | None = Field(default=None, max_length=64)


class ScheduledPrice(BaseModel):
    """One interval of a PriceSchedule: its start (Unix time, s) and price, $/MWh."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    start_ts: float = Field(ge=0)
    price_usd_per_mwh: float = Field(ge=-10_000, le=100_000)


class PriceSchedule(Payload):
    """mineops/<site>/signal/price_schedule (retained): day-ahead prices by interval.

    Used when the real-time price is missing or stale, before the cautious default.
    """

    MAX_BYTES: ClassVar[int] = 256 * 1024

    ts: float = Field(ge=0)
    interval_s: float = Field(gt=0, le=86_400)
    prices: list[ScheduledPrice] = Field(min_length=1, max_length=2000)
    source: str | None = Field(default=None, max_length=64)

    def price_at(self, ts: float) -> float | None:
        """The price, $/MWh, of the interval holding Unix time `ts`; None outside them all."""
        for p in self.prices:
            if p.start_ts <= ts < p.start_ts + self.interval_s:
                return p.price_usd_per_mwh
        return None


class HashpriceSignal(Payload):
    """Revenue per PH/s per day, $, on mineops/<site>/signal/hashprice (retained)."""

    ts: float = Field(ge=0)
    hashprice_usd_per_ph_day: float = Field(gt=0, le=10_000)


GridEventKind = Literal["target_kw", "shed_kw", "emergency", "peak"]


class GridEvent(Payload):
    """mineops/<site>/signal/grid (QoS 1, retained): one demand-response event.

    `target_kw`: hold site power at or below `value_kw`. `shed_kw`: `value_kw` below
    the baseline the controller measured before the event. `emergency`: everything
    sleeps except the configured keep-alive set. `peak`: a transmission-peak alert (ERCOT
    4CP season, June-September): hold the configured low level (`grid.peak_hold_kw`),
    or `value_kw` when given. The target must be met by
    `deadline_ts` (default: the start), so the controller ramps down before it.
    Re-sending an id updates that event; `cancelled: true` cancels it. `version`, when
    given, orders revisions of one event (a lower one must not replace a higher one).
    """

    MAX_BYTES: ClassVar[int] = 16 * 1024

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")
    kind: GridEventKind
    value_kw: float | None = Field(default=None, ge=0, le=10_000_000)
    start_ts: float = Field(ge=0, description="Unix time the obligation starts")
    end_ts: float = Field(ge=0, description="Unix time it ends")
    deadline_ts: float | None = Field(default=None, ge=0, description="Target met by, Unix s")
    source: str = Field(default="mqtt", max_length=128)
    priority: int = Field(default=0, ge=0, le=9)
    cancelled: bool = False
    version: int | None = Field(
        default=None, ge=0,
        description="Revision of this event (OpenADR modificationNumber): a higher one supersedes")

    @model_validator(mode="after")
    def _check(self) -> GridEvent:
        if self.end_ts <= self.start_ts:
            raise ValueError("end_ts must be after start_ts")
        if self.kind in ("target_kw", "shed_kw") and self.value_kw is None:
            raise ValueError(f"a {self.kind} event needs value_kw")
        return self

    @property
    def met_by_ts(self) -> float:
        """Unix time, s, by which the target must be met: the deadline, else the start."""
        return self.start_ts if self.deadline_ts is None else self.deadline_ts


CommandAction = Literal["set_power", "sleep", "wake"]


class Setpoint(BaseModel):
    """One command body: sleep, wake, or run at a power target (waking if asleep)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    action: CommandAction
    power_w: Watts | None = None


class MinerCommand(Payload, Setpoint):
    """A command to one miner, on mineops/<site>/miner/<id>/cmd (QoS 1, numbered by seq)."""

    seq: int = Field(ge=0)
    ts: float = Field(ge=0)


# Limits of one message, so that a receiver's decode stays bounded (a few ms); the
# actuator splits larger commands into several messages.
GROUP_TARGETS_MAX = 5000
FLEET_GROUPS_MAX = 20_000
FLEET_MINERS_MAX = 20_000
FLEET_SETPOINTS_MAX = 4096


class GroupCommand(Payload):
    """mineops/<site>/group/<g>/cmd: one broadcast setpoint for all, or per-miner setpoints."""

    MAX_BYTES: ClassVar[int] = 512 * 1024

    seq: int = Field(ge=0)
    ts: float = Field(ge=0)
    all: Setpoint | None = Field(default=None, description="Applies to every group member")
    targets: dict[str, Setpoint] | None = Field(default=None, max_length=GROUP_TARGETS_MAX)


def _setpoint_json(sleep: bool, power_w: float) -> str:
    return '{"action":"sleep"}' if sleep else \
        f'{{"action":"set_power","power_w":{float(power_w)!r}}}'


def encode_targets(seq: int, ts: float, ids: Sequence[str],
                   sleep: Sequence[bool] | npt.NDArray[np.bool_],
                   power_w: Sequence[float] | npt.NDArray[np.float64]) -> bytes:
    """The JSON of a Group/FleetCommand(seq, ts, targets={id: sleep or set_power}), built directly.

    For a few racks' changes. Miner ids match the config's id pattern (no quotes or
    escapes), so they are written as they are; a test checks that the result decodes to
    the same GroupCommand as the model would build.
    """
    parts = [f'"{i}":{_setpoint_json(bool(s), float(p))}'
             for i, s, p in zip(ids, sleep, power_w, strict=True)]
    return f'{{"v":1,"seq":{int(seq)},"ts":{float(ts)!r},"targets":{{{",".join(parts)}}}}}'.encode()


def encode_group_all(seq: int, ts: float, sleep: bool, power_w: float) -> bytes:
    """The JSON of GroupCommand(seq, ts, all=sleep or set_power at `power_w` W)."""
    return (f'{{"v":1,"seq":{int(seq)},"ts":{float(ts)!r},'
            f'"all":{_setpoint_json(sleep, power_w)}}}').encode()


class FleetCommand(Payload):
    """mineops/<site>/fleet/cmd: site-wide setpoints, compact enough for a fleet-wide shed.

    Setpoints apply in this order, a later one winning for a miner:

    1. `all` to every miner of `groups` (of every group when omitted): the broadcast shed.
    2. `group_setpoints`, group -> index into `setpoints`: every member of the group gets
       that setpoint, except the miners listed in `except_miners` (left as they are).
    3. `miner_setpoints`, miner id -> index into `setpoints`, and `targets`, miner id ->
       setpoint: one miner each.

    A shed that sleeps 50,000 miners and underclocks 50,000 in 2,500 uniform racks is
    2,500 group entries (~40 KB), not 100,000 per-miner setpoints (~4 MB). Indices and
    the lists they index stay within one message. Every simulator and bridge process
    reads the topic and applies what concerns its own miners: another process's groups
    and miners are not errors.
    """

    MAX_BYTES: ClassVar[int] = 1024 * 1024

    seq: int = Field(ge=0)
    ts: float = Field(ge=0)
    all: Setpoint | None = None
    groups: list[str] | None = Field(default=None, max_length=100_000)
    targets: dict[str, Setpoint] | None = Field(default=None, max_length=FLEET_MINERS_MAX)
    setpoints: list[Setpoint] | None = Field(
        default=None, max_length=FLEET_SETPOINTS_MAX,
        description="The distinct setpoints that group_setpoints and miner_setpoints index")
    group_setpoints: dict[str, Annotated[int, Field(ge=0)]] | None = Field(
        default=None, max_length=FLEET_GROUPS_MAX)
    except_miners: list[str] | None = Field(
        default=None, max_length=FLEET_MINERS_MAX,
        description="Members of group_setpoints' groups that this message leaves alone")
    miner_setpoints: dict[str, Annotated[int, Field(ge=0)]] | None = Field(
        default=None, max_length=FLEET_MINERS_MAX)

    @model_validator(mode="after")
    def _check(self) -> FleetCommand:
        n = len(self.setpoints or ())
        for name, table in (("group_setpoints", self.group_setpoints),
                            ("miner_setpoints", self.miner_setpoints)):
            if table and max(table.values()) >= n:
                raise ValueError(f"{name}: index {max(table.values())} with {n} setpoints")
        if self.except_miners and not self.group_setpoints:
            raise ValueError("except_miners without group_setpoints")
        return self

    def setpoints_for(self, members: Mapping[str, Iterable[str]]) -> dict[str, Setpoint]:
        """What this message tells each of the receiver's miners (the reference semantics).

        Args:
            members: The receiver's groups, each with its miner ids.

        Returns:
            miner id -> setpoint, for every miner of `members` the message sets; the
            others are absent. Ids in `targets`/`miner_setpoints` outside `members` count
            as the receiver's too (a miner listed by itself in no known group).
        """
        out: dict[str, Setpoint] = {}
        if self.all is not None:
            for g in members if self.groups is None else self.groups:
                for m in members.get(g, ()):
                    out[m] = self.all
        table = self.setpoints or []
        if self.group_setpoints:
            skip = set(self.except_miners or ())
            for g, k in self.group_setpoints.items():
                for m in members.get(g, ()):
                    if m not in skip:
                        out[m] = table[k]
        for m, k in (self.miner_setpoints or {}).items():
            out[m] = table[k]
        out.update(self.targets or {})
        return out


def encode_fleet(seq: int, ts: float, *, table_sleep: Sequence[bool],
                 table_power_w: Sequence[float], group_names: Sequence[str],
                 group_codes: Sequence[int], except_ids: Sequence[str],
                 miner_ids: Sequence[str], miner_codes: Sequence[int]) -> bytes:
    """The JSON of a compact FleetCommand, built directly (the hot path of a fleet-wide shed).

    Args:
        seq: Sequence number of the command.
        ts: Unix time of the command, s.
        table_sleep: The setpoint table's sleep flags, (k,): entry j is sleep where
            table_sleep[j], else set_power at table_power_w[j].
        table_power_w: The setpoint table's power targets, (k,), W.
        group_names: Groups with one setpoint for all their members, (g,).
        group_codes: Each of those groups' index into the table, (g,).
        except_ids: Members of those groups the message leaves alone.
        miner_ids: Miners with a setpoint of their own, (m,).
        miner_codes: Each of those miners' index into the table, (m,).

    Ids match the config's id pattern (no quotes or escapes), so they are written as they
    are; a test checks that the result decodes to the FleetCommand the model builds.
    Empty parts are left out.
    """
    parts = [f'"v":1,"seq":{int(seq)},"ts":{float(ts)!r}']
    if len(table_sleep):
        table = ",".join(_setpoint_json(bool(s), float(p))
                         for s, p in zip(table_sleep, table_power_w, strict=True))
        parts.append(f'"setpoints":[{table}]')
    if len(group_names):
        body = ",".join([f'"{g}":{int(k)}' for g, k in zip(group_names, group_codes,
                                                          strict=True)])
        parts.append(f'"group_setpoints":{{{body}}}')
    if len(except_ids):
        quoted = ",".join([f'"{i}"' for i in except_ids])
        parts.append(f'"except_miners":[{quoted}]')
    if len(miner_ids):
        body = ",".join([f'"{m}":{int(k)}' for m, k in zip(miner_ids, miner_codes,
                                                          strict=True)])
        parts.append(f'"miner_setpoints":{{{body}}}')
    return ("{" + ",".join(parts) + "}").encode()


class PowerControlSet(BaseModel):
    """Miners that share one way of setting power."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    firmware: str = Field(max_length=32, description="pyasic's firmware name, e.g. 'LuxOS'")
    control: Literal["presets", "range", "none"]
    presets_w: list[Annotated[float, Field(gt=0, le=50_000)]] | None = Field(
        default=None, max_length=128, description="Ascending preset powers, W (presets only)")
    presets_ths: list[Annotated[float, Field(ge=0, le=5_000)]] | None = Field(
        default=None, max_length=128,
        description="The firmware's own hashrate for each preset, TH/s, when it reports one")
    miners: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=5000)

    @model_validator(mode="after")
    def _check(self) -> PowerControlSet:
        if (self.control == "presets") != bool(self.presets_w):
            raise ValueError("presets_w is given exactly when control is 'presets'")
        if self.presets_w and self.presets_w != sorted(self.presets_w):
            raise ValueError("presets_w must be ascending")
        if self.presets_ths is not None and len(self.presets_ths) != len(self.presets_w or []):
            raise ValueError("presets_ths must match presets_w")
        return self


class GroupCapabilities(Payload):
    """mineops/<site>/group/<g>/capabilities (retained): the group's power controls."""

    MAX_BYTES: ClassVar[int] = 512 * 1024

    ts: float = Field(ge=0)
    sets: list[PowerControlSet] = Field(max_length=5000)


class DecisionSummary(Payload):
    """mineops/<site>/controller/decision (retained): the latest decision, for audit."""

    MAX_BYTES: ClassVar[int] = 64 * 1024

    ts: float
    price_usd_per_mwh: float = Field(description="Price planned with: market plus adders")
    market_price_usd_per_mwh: float | None = None
    price_source: Literal["real_time", "day_ahead", "default"] | None = None
    hashprice_usd_per_ph_day: float
    cap_w: float = Field(description="What the plan aims under: the cap in force less headroom")
    cap_in_force_w: float | None = None
    cap_source: str | None = Field(default=None, max_length=32,
                                   description="site, or the grid obligation that set the cap")
    grid_event_id: str | None = Field(default=None, max_length=128)
    planned_site_power_w: float
    measured_site_power_w: float | None = None
    miners_by_state: dict[str, int]
    miners_by_reason: dict[str, int]
    commands_sent: int
    duration_s: float
    # Added for the live views (`mineops top`, the demo); optional, so summaries published
    # before them still decode.
    seq: int | None = Field(default=None, ge=0, description="Decisions since the start")
    trigger: str | None = Field(default=None, max_length=32,
                                description="What asked for it: tick, price, grid, connect, ...")
    adders_usd_per_mwh: float | None = Field(
        default=None, description="The site's adders: price = market + adders")
    cap_site_w: float | None = Field(default=None, description="The configured site cap, W")
    grid_event_kind: str | None = Field(default=None, max_length=32)
    grid_event_target_w: float | None = Field(default=None, description="Incl. aux, W")
    grid_event_deadline_ts: float | None = Field(default=None, description="Target met by, Unix s")
    grid_event_end_ts: float | None = Field(default=None, description="Event ends, Unix s")
    grid_event_on_track: bool | None = None
    fleet_power_w: float | None = Field(
        default=None, description="Reported by miners with fresh telemetry, excl. aux, W")
    fleet_hashrate_ths: float | None = Field(
        default=None, description="Reported by miners with fresh telemetry, TH/s")
    frequency_hz: float | None = None
    infeasible: bool | None = Field(
        default=None, description="Even the miners the controller cannot move exceed the cap")
    miners_by_state_reason: dict[str, dict[str, int]] | None = Field(
        default=None, description="Miners per state, then per reason (only non-zero counts)")
    # An energy campus (docs/campus.md); all None on a site without one.
    campus_headroom_w: float | None = Field(
        default=None, description="What the miners may plan under from the campus, incl. aux")
    campus_poi_limit_w: float | None = Field(
        default=None, description="Import limit in force at the POI (None: islanded), W")
    campus_firm_load_w: float | None = Field(default=None, description="Firm loads as counted")
    campus_generation_w: float | None = Field(default=None,
                                              description="Generation as counted, W")
    campus_on_site_w: float | None = Field(
        default=None, description="Headroom on-site surplus supplies (not the grid), W")
    campus_islanded: bool | None = None
    campus_stale: list[str] | None = Field(
        default=None, max_length=100, description="Parts counted at their worst case")
    # The market's own price beside the price planned with (controller/core/prices.py
    # PriceBounds); None in summaries from before them: then the market's price is
    # `market_price_usd_per_mwh`.
    price_bound: Literal["cap", "floor"] | None = Field(
        default=None, description="The [energy] bound the market price was planned at")
    real_market_price_usd_per_mwh: float | None = Field(
        default=None, description="The market's own price, bounded or not, $/MWh")
    campus_miners_measured_w: float | None = Field(
        default=None, description="The POI reading less the campus's other parts' readings: "
        "the miners' measured share, incl. aux, W (None: no fresh POI reading)")
    # The site's clock when it is not the wall clock (a simulated site: `mineops demo`),
    # so that every view shows the decision at the same site time; None on a real site.
    site_ts: float | None = Field(
        default=None, ge=0, description="The decision's time on the site's clock, Unix s")
    site_speed: float | None = Field(
        default=None, gt=0, le=1e6, description="Site seconds per wall-clock second")
    site_timezone: str | None = Field(
        default=None, max_length=64, description="IANA zone of the site's clock")


P = TypeVar("P", bound=Payload)

_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal",
                 "finite_number"}


def decode(model: type[P], raw: bytes) -> P:
    """Validate raw bytes as `model`, or raise PayloadError with a fixed reason."""
    if len(raw) > model.MAX_BYTES:
        raise PayloadError("oversized", f"{len(raw)} bytes > {model.MAX_BYTES}")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] in ("json_invalid", "json_type"):
            raise PayloadError("bad_json", err["msg"]) from None
        if err["type"] in _RANGE_ERRORS:
            raise PayloadError("out_of_range", f"{where}: {err['msg']}") from None
        if err["loc"] == ("v",):
            raise PayloadError("bad_version", f"schema version {err.get('input')!r}") from None
        if err["type"] == "value_error":
            raise PayloadError("bad_value", f"{where}: {err['msg']}") from None
        if err["type"] in ("missing", "extra_forbidden"):
            raise PayloadError("bad_schema", f"{where}: {err['msg']}") from None
        raise PayloadError("wrong_type", f"{where}: {err['msg']}") from None

"""Ingest: every received message validated and applied to what the controller knows.

Dispatch is a table: the topic's kind gives the handler. A message that fails validation
is counted by kind and reason (`mineops_mqtt_messages_invalid_total`), logged (once a
minute per kind and reason) and dropped; it never raises and never half-applies. Meters
in vendor formats are decoded by their drivers and handed to the same meter handler as
the project's own meter messages.

Telemetry (docs/scale.md, "Ingest") is decoded by msgspec into columns
(`payloads.GroupDecoder`, `TelemetryBatch`) and checked per miner, vectorised: the miner must be
known and belong to the topic's group, its state known, its power and power target at
most its model's top operating point plus POWER_MARGIN, its hashrate at most the model's
top plus HASHRATE_MARGIN, temperature, fans and boards within physical bounds. A miner
that fails is left out and counted (`mineops_telemetry_readings_rejected_total{reason}`);
its rack-mates are applied with one array write per field. An `ack_seq` above what the
controller last sent that miner is unknown rather than trusted (reason `bad_ack`; the
rest of the reading stands), so it cannot mark commands acknowledged that never were
(before this run sent a miner anything, its ack is the previous run's and is ignored).
The transport hands over queued telemetry in batches (`on_telemetry`): consecutive rack
messages are checked and written to the fleet together, each reading with its own
message's time, with exactly the result (state, counters, logged reasons) of handling
them one by one.

Time: each payload's `ts` is checked against the controller's clock. Further ahead than
`policy.clock_skew_s`, or (prices, hashprice) older than `policy.signal_max_age_s`, is
`bad_timestamp`; telemetry and meter readings older than `policy.telemetry_stale_s` are
`stale`. A reading counts as taken at the older of its own time and its arrival
(FleetState.last_seen, SiteReadings.meter_at, price_at): a reading that waited in a
queue is as old as it is, and a device clock running ahead cannot make one look younger.

Site bounds: a meter's |power| at most METER_CAP_MULTIPLE times the site cap. A price
(real-time or scheduled) beyond `[energy] price_floor_usd_per_mwh`..`price_cap_usd_per_mwh`
is a real, extreme price: it is planned with at that bound (at the cap the fleet sleeps,
the safe side), counted in `mineops_price_clamped_total{bound}` and logged
(`price_clamped`, naming the setting); only a price no market has (beyond 100 times the
bounds, `controller.core.prices.PriceBounds`) is dropped as out_of_range.
Capabilities are taken set by set: a set that fails (bad shape, unknown or foreign
miners, presets beyond the model) is counted and skipped, the others apply, and a set
is applied only if the fleet's operating points can be prepared with it.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import structlog
from pydantic import Field, ValidationError

from controller.config import SiteConfig
from controller.core.fleet_state import STATE_CODE, FleetState
from controller.core.prices import PriceBound, PriceBounds
from controller.daemon.metrics import Metrics
from controller.grid.obligations import GridObligations
from controller.logs import LogLimiter
from controller.protocol.payloads import (
    GridEvent,
    GroupCapabilities,
    GroupDecoder,
    GroupTelemetryV2,
    HashpriceSignal,
    MeterTelemetry,
    PayloadError,
    PowerControlSet,
    PriceSchedule,
    PriceSignal,
    TelemetryBatch,
    TelemetryColumns,
    decode,
    decode_miner_telemetry,
)
from controller.protocol.topics import Kind, Parsed, SiteTopics, parse_availability
from controller.protocol.transport import Incoming
from drivers.meters import MeterRouter

log = structlog.get_logger("mineops.ingest")

# A miner's reported power (and target) may exceed its model's top operating point by this
# share (firmware overshoot, PSU-side measurement) before it is implausible.
POWER_MARGIN = 1.25
# Hashrate is noisier (chip-side estimates, a board re-tuning): a wider margin.
HASHRATE_MARGIN = 1.5
# A meter's |power| beyond this many site caps is a fault (a unit or sign error).
METER_CAP_MULTIPLE = 10.0
TEMP_RANGE_C = (-50.0, 150.0)
FAN_MAX_RPM = 30_000
MAX_HASHBOARDS = 8
_LOG_IDS = 5

Handler = Callable[[str, bytes], None]


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """The site-dependent bounds ingest checks (see the module docstring)."""

    telemetry_stale_s: float = 30.0
    clock_skew_s: float = 60.0
    signal_max_age_s: float = 7 * 86_400.0
    meter_max_abs_w: float = math.inf
    price_bounds: PriceBounds = field(default_factory=PriceBounds)

    @classmethod
    def for_site(cls, cfg: SiteConfig) -> IngestLimits:
        """The limits of a site's config ([policy], [energy], the cap)."""
        return cls(
            telemetry_stale_s=cfg.policy.telemetry_stale_s,
            clock_skew_s=cfg.policy.clock_skew_s,
            signal_max_age_s=cfg.policy.signal_max_age_s,
            meter_max_abs_w=METER_CAP_MULTIPLE * cfg.power_cap_kw * 1000.0,
            price_bounds=PriceBounds.of_site(cfg))


class Ingest:
    """Applies messages to the fleet state, the site readings and the grid obligations.

    Args:
        topics: The site's topics.
        fleet: Fleet state, updated in place.
        grid: Grid obligations; events are journaled through it.
        meters: Vendor-format meter drivers, by topic.
        site_meter_ids: Ids of the project's own meters with role "site" (empty: any id).
        metrics: Message and invalid-message counters, the energy counter.
        on_change: Asks for a decision now; called with the trigger's name.
        on_shed: Sleeps the miners of a mask at once (under-frequency).
        on_points_changed: The fleet's operating points changed (firmware capabilities);
            raises if they cannot be planned with (the change is then undone).
        limits: Site bounds (default: IngestLimits(), no meter bound).
        sent_seq: The last command sequence sent to each miner, (n,), -1 none; read
            live (the actuator's array). None: acknowledgements are not bounded.
        on_meter: Offered every meter reading by meter id (an energy campus reads its
            parts' meters); returns whether it took the reading.
        on_online: Miners (indices) announced online: they get their setpoints again.
    """

    def __init__(self, *, topics: SiteTopics, fleet: FleetState, grid: GridObligations,
                 meters: MeterRouter, site_meter_ids: set[str], metrics: Metrics,
                 on_change: Callable[[str], None],
                 on_shed: Callable[[npt.NDArray[np.bool_]], None],
                 on_points_changed: Callable[[], None],
                 limits: IngestLimits | None = None,
                 sent_seq: npt.NDArray[np.int64] | None = None,
                 on_meter: Callable[[str, MeterTelemetry], bool] | None = None,
                 on_online: Callable[[npt.NDArray[np.intp]], None] | None = None) -> None:
        self.topics = topics
        self.fleet = fleet
        self.grid = grid
        self.meters = meters
        self.site_meter_ids = site_meter_ids
        self.metrics = metrics
        self.on_change = on_change
        self.on_shed = on_shed
        self.on_points_changed = on_points_changed
        self.limits = limits or IngestLimits()
        self.sent_seq = sent_seq
        self.on_meter = on_meter
        self.on_online = on_online
        self.invalid: Counter[tuple[str, str]] = Counter()
        self.prices_clamped: Counter[PriceBound] = Counter()
        self.rejected_readings: Counter[str] = Counter()
        self._quiet = LogLimiter(60.0)
        self._group_index = {g: i for i, g in enumerate(fleet.groups)}
        self._row_of = _Lookup(fleet.index)
        self._decoder = GroupDecoder()
        # By group: its last message's ids and state lists (the decoder's, reused while
        # unchanged) and what they give: rows, state codes.
        self._rows: dict[int, tuple[list[str], npt.NDArray[np.intp]]] = {}
        self._states: dict[int, tuple[list[str], npt.NDArray[np.int8]]] = {}
        self._rack_topics: dict[str, str] = {}  # a known group's telemetry topic -> group
        self._plausible()
        # Label children looked up once: `.labels()` per message costs more than the rest.
        self._counted = {k: metrics.messages.labels(k.value) for k in Kind}
        self._handlers: dict[Kind, Handler] = {
            Kind.GROUP_TELEMETRY: self._group_telemetry,
            Kind.MINER_TELEMETRY: self._miner_telemetry,
            Kind.MINER_AVAILABILITY: self._miner_availability,
            Kind.GROUP_AVAILABILITY: self._group_availability,
            Kind.METER_TELEMETRY: self._meter,
            Kind.GRID: self._grid_event,
            Kind.PRICE: self._price,
            Kind.PRICE_SCHEDULE: self._price_schedule,
            Kind.HASHPRICE: self._hashprice,
            Kind.GROUP_CAPABILITIES: self._capabilities,
        }

    def _plausible(self) -> None:
        """Per-miner ceilings from the operating points (again when presets change them)."""
        fleet = self.fleet
        self._max_w = fleet.points_w.max(axis=1) * POWER_MARGIN
        self._max_ths = fleet.points_ths.max(axis=1) * HASHRATE_MARGIN

    def subscriptions(self) -> list[str]:
        """Topic filters for every kind this ingest handles, vendor meters included."""
        t = self.topics
        return [
            t.miner("+", "telemetry"),
            t.miner("+", "availability"),
            t.group("+", "telemetry"),
            t.group("+", "availability"),
            t.group("+", "capabilities"),
            t.meter("+"),
            t.price,
            t.price_schedule,
            t.hashprice,
            t.grid,
            *self.meters.subscriptions(),
        ]

    # -- dispatch -----------------------------------------------------------------

    def on_message(self, topic: str, raw: bytes) -> None:
        """Validate and apply one message; a bad one is counted and dropped, never raised."""
        vendor = self.meters.claims(topic)
        self._handle(topic, raw, Parsed(Kind.METER_TELEMETRY) if vendor
                     else self.topics.parse(topic), vendor)

    def _handle(self, topic: str, raw: bytes, parsed: Parsed, vendor: bool) -> None:
        kind = parsed.kind
        self._counted[kind].inc()
        try:
            if vendor:
                self._vendor_meter(topic, raw)
                return
            handler = self._handlers.get(kind)
            if handler is None:
                raise PayloadError("unknown_topic", "not a topic the controller reads")
            handler(parsed.device, raw)
        except PayloadError as e:
            self.reject(kind, e.reason, topic, e.detail)
        except Exception as e:  # a bug must not take the controller down with it
            log.exception("message_handler_failed", topic=topic)
            self.reject(kind, "internal_error", topic, repr(e))

    def reject(self, kind: Kind, reason: str, topic: str, detail: str) -> None:
        """Count a dropped message and log it (rate-limited per kind and reason)."""
        self.invalid[(kind.value, reason)] += 1
        self.metrics.invalid.labels(kind.value, reason).inc()
        suppressed = self._quiet.allow(kind.value, reason)
        if suppressed is not None:
            log.warning("message_dropped", kind=kind.value, reason=reason, topic=topic,
                        detail=detail[:200], suppressed_since_last=suppressed)

    def _reject_readings(self, reason: str, topic: str, ids: list[str], detail: str) -> None:
        """Count readings left out of a message whose other readings were applied."""
        self.rejected_readings[reason] += len(ids)
        self.metrics.readings_rejected.labels(reason).inc(len(ids))
        suppressed = self._quiet.allow("reading", reason)
        if suppressed is not None:
            log.warning("readings_dropped", reason=reason, topic=topic, miners=len(ids),
                        ids=ids[:_LOG_IDS], detail=detail[:200],
                        suppressed_since_last=suppressed)

    # -- time -----------------------------------------------------------------------

    def _age_s(self, ts: float, now_unix: float, max_age_s: float, what: str) -> float:
        """How old a payload's timestamp is, s (>= 0); PayloadError if out of bounds."""
        age = now_unix - ts
        if age < -self.limits.clock_skew_s:
            raise PayloadError("bad_timestamp", f"{what} ts {ts!r} is {-age:.0f} s ahead of the "
                               f"controller's clock (policy.clock_skew_s "
                               f"{self.limits.clock_skew_s:g})")
        if age > self.limits.signal_max_age_s:
            raise PayloadError("bad_timestamp", f"{what} ts {ts!r} is {age:.0f} s old "
                               f"(policy.signal_max_age_s {self.limits.signal_max_age_s:g})")
        if age > max_age_s:
            raise PayloadError("stale", f"{what} taken {age:.1f} s ago, stale after "
                               f"{max_age_s:g} s (policy.telemetry_stale_s)")
        return max(age, 0.0)

    def _taken_at(self, ts: float, what: str) -> float:
        """A reading's time on the monotonic clock: the older of its own and its arrival."""
        now_mono, now_unix = time.monotonic(), time.time()
        age = self._age_s(ts, now_unix, self.limits.telemetry_stale_s, what)
        self.metrics.telemetry_lag.observe(age)
        return now_mono - age

    # -- miners -------------------------------------------------------------------

    def _miner(self, miner_id: str) -> int:
        i = self.fleet.index.get(miner_id)
        if i is None:
            raise PayloadError("unknown_miner", miner_id)
        return i

    def on_telemetry(self, messages: Sequence[Incoming]) -> None:
        """Handle messages taken from the queue together: as `on_message` one by one would.

        The same fleet state, the same counters and the same logged reasons as handling
        each alone, but the checks and the fleet write of consecutive rack messages are
        done once for all of them (docs/scale.md, "Ingest"): decoding is per message
        (msgspec, in C), the numpy work per batch. A rack message that fails as a whole
        (bad JSON, unknown group, bad timestamp, stale) is counted alone; each reading
        keeps its own message's time. Any other message is handled by `on_message` after
        the racks gathered before it, and a rack that comes twice ends a gathering first,
        so a miner's later reading wins and its acknowledgements are taken in order.

        Args:
            messages: (topic, payload) in the order received; any kind, telemetry
                expected.
        """
        gathering = _Gathering()
        racks_of = self._rack_topics
        counted = 0
        try:
            for topic, raw in messages:
                group = racks_of.get(topic)
                if group is None:
                    vendor = self.meters.claims(topic)
                    parsed = Parsed(Kind.METER_TELEMETRY) if vendor else self.topics.parse(topic)
                    if parsed.kind is not Kind.GROUP_TELEMETRY:
                        if gathering.racks:
                            self._apply_racks(gathering)
                            gathering = _Gathering()
                        self._handle(topic, raw, parsed, vendor)
                        continue
                    group = parsed.device
                    if group in self._group_index:  # bounded by the fleet: worth keeping
                        racks_of[topic] = group
                counted += 1
                try:
                    rack = self._rack(topic, group, raw)
                except PayloadError as e:
                    self.reject(Kind.GROUP_TELEMETRY, e.reason, topic, e.detail)
                    continue
                except Exception as e:  # a bug must not take the controller down with it
                    log.exception("message_handler_failed", topic=topic)
                    self.reject(Kind.GROUP_TELEMETRY, "internal_error", topic, repr(e))
                    continue
                if rack is None:
                    continue
                if rack[0].g in gathering.groups:
                    self._apply_racks(gathering)
                    gathering = _Gathering()
                self._gather(gathering, *rack)
            if gathering.racks:
                self._apply_racks(gathering)
        finally:
            self._counted[Kind.GROUP_TELEMETRY].inc(counted)

    def _rack(self, topic: str, group: str,
              raw: bytes) -> tuple[_Rack, GroupTelemetryV2] | None:
        """A rack message decoded and checked as a whole; None if it has no reading.

        Raises:
            PayloadError: as `GroupDecoder.decode`, unknown_group, bad_timestamp, stale.
        """
        m = self._decoder.decode(raw)
        g = self._group_index.get(group)
        if g is None:
            raise PayloadError("unknown_group", group)
        taken_at = self._taken_at(m.ts, "telemetry")
        n = len(m.ids)
        return (_Rack(topic, group, g, n, taken_at), m) if n else None

    def _gather(self, gathering: _Gathering, rack: _Rack, m: GroupTelemetryV2) -> None:
        """Add a message to a gathering: its readings' rows and its columns.

        Rows are cached (a group sends the same ids each time); the message itself is not
        kept.
        """
        cached = self._rows.get(rack.g)
        if cached is not None and (cached[0] is m.ids or cached[0] == m.ids):
            rows = cached[1]
        else:
            rows = np.fromiter(map(self._row_of.__getitem__, m.ids), dtype=np.intp,
                               count=rack.n)
            self._rows[rack.g] = (m.ids, rows)
        cached_state = self._states.get(rack.g)
        if cached_state is not None and cached_state[0] is m.state:
            codes = cached_state[1]
        else:
            codes = np.fromiter(map(_STATE_OR_BAD.__getitem__, m.state), dtype=np.int8,
                                count=rack.n)
            self._states[rack.g] = (m.state, codes)
        gathering.racks.append(rack)
        gathering.rows.append(rows)
        gathering.states.append(codes)
        gathering.groups.add(rack.g)
        gathering.columns.add(m)

    def _apply_racks(self, gathering: _Gathering) -> None:
        try:
            self._apply_columns(gathering)
        except Exception as e:  # a bug: every message of the batch counts as failed
            racks = gathering.racks
            log.exception("message_handler_failed", topic=racks[0].topic, messages=len(racks))
            for rack in racks:
                self.reject(Kind.GROUP_TELEMETRY, "internal_error", rack.topic, repr(e))

    def _group_telemetry(self, group: str, raw: bytes) -> None:
        rack = self._rack(self.topics.group(group, "telemetry"), group, raw)
        if rack is not None:
            gathering = _Gathering()
            self._gather(gathering, *rack)
            self._apply_columns(gathering)

    def _apply_columns(self, gathering: _Gathering) -> None:
        """Check every reading gathered at once, apply the good ones, count the rest.

        The rest are counted by reason, message by message, as if each message were
        handled alone.

        Each group at most once in a gathering (a reading per miner; see `on_telemetry`).
        A message none of whose readings is good is rejected as a whole (the first
        reason of its readings).
        """
        fleet = self.fleet
        racks = gathering.racks
        c = gathering.columns.columns()
        n = c.n
        own: int | npt.NDArray[np.intp]
        taken_at: float | npt.NDArray[np.float64]
        if len(racks) == 1:
            idx, own, taken_at = gathering.rows[0], racks[0].g, racks[0].taken_at
            state = gathering.states[0]
        else:
            counts = np.array([r.n for r in racks])
            idx = np.concatenate(gathering.rows)
            state = np.concatenate(gathering.states)
            own = np.repeat(np.array([r.g for r in racks], dtype=np.intp), counts)
            taken_at = np.repeat(np.array([r.taken_at for r in racks]), counts)
        known = idx >= 0
        rows = np.where(known, idx, 0)
        max_w, max_ths = self._max_w[rows], self._max_ths[rows]
        with np.errstate(invalid="ignore"):  # NaN (unknown) compares False: allowed
            out_of_range = (
                (c.power_w < 0) | (c.power_w > max_w) | (c.target_w < 0) | (c.target_w > max_w)
                | (c.hashrate_ths < 0) | (c.hashrate_ths > max_ths)
                | (c.temp_c < TEMP_RANGE_C[0]) | (c.temp_c > TEMP_RANGE_C[1])
                | (c.fan_rpm < -1) | (c.fan_rpm > FAN_MAX_RPM)
                | (c.hashboards < -1) | (c.hashboards > MAX_HASHBOARDS) | (c.ack_seq < -1))
        checks = (
            ("unknown_miner", ~known),
            ("wrong_group", known & (fleet.group_idx[rows] != own)),
            ("bad_value", state < 0),
            ("out_of_range", out_of_range),
        )
        bad = np.zeros(n, dtype=bool)
        news: list[tuple[str, npt.NDArray[np.bool_]]] = []
        for reason, mask in checks:
            new = mask & ~bad
            if new.any():
                news.append((reason, new))
                bad |= new
        any_bad = bool(news)
        ends: npt.NDArray[np.int64] | None = None  # each message's end in the columns
        if any_bad:
            ends = np.cumsum([r.n for r in racks])
            for k in _segments_with(bad, ends):
                r, start, end = racks[k], int(ends[k]) - racks[k].n, int(ends[k])
                for reason, new in news:
                    j = np.flatnonzero(new[start:end]) + start
                    if j.size:
                        self._reject_readings(reason, r.topic, [c.ids[i] for i in j],
                                              _why(reason, c, j, r.group))
                if bad[start:end].all():
                    first = next(reason for reason, mask in checks if mask[start:end].any())
                    self.reject(Kind.GROUP_TELEMETRY, first, r.topic,
                                f"no valid reading of {end - start}")
        ack = self._trusted_acks(c.ack_seq, idx, rows, bad, racks)
        if any_bad:
            ok = ~bad
            if not ok.any():
                return
            fleet.apply(idx[ok], state=state[ok], power_w=c.power_w[ok],
                        hashrate_ths=c.hashrate_ths[ok], target_w=c.target_w[ok],
                        temp_c=c.temp_c[ok], ack_seq=ack[ok],
                        taken_at=taken_at if isinstance(taken_at, float) else taken_at[ok])
        else:
            fleet.apply(idx, state=state, power_w=c.power_w, hashrate_ths=c.hashrate_ths,
                        target_w=c.target_w, temp_c=c.temp_c, ack_seq=ack, taken_at=taken_at)

    def _trusted_acks(self, ack: npt.NDArray[np.int64], idx: npt.NDArray[np.intp],
                      rows: npt.NDArray[np.intp], bad: npt.NDArray[np.bool_],
                      racks: list[_Rack]) -> npt.NDArray[np.int64]:
        """`ack` with every acknowledgement above what this run sent that miner unknown (-1).

        One above a sequence actually sent is forged or corrupt: counted (`bad_ack`) for
        the readings otherwise good. Before this run sent a miner anything, its ack is the
        last run's: ignored without a count.
        """
        if self.sent_seq is None:
            return ack
        sent = self.sent_seq[rows]
        over = ack > sent
        if not over.any():
            return ack
        forged = over & (sent >= 0) & ~bad
        if forged.any():
            ends = np.cumsum([r.n for r in racks])
            for k in _segments_with(forged, ends):
                r, start, end = racks[k], int(ends[k]) - racks[k].n, int(ends[k])
                self._reject_readings(
                    "bad_ack", r.topic,
                    [self.fleet.ids[i] for i in idx[start:end][forged[start:end]]],
                    "ack_seq above the last sequence sent to the miner")
        return np.where(over, -1, ack)

    def _miner_telemetry(self, miner_id: str, raw: bytes) -> None:
        m = decode_miner_telemetry(raw)
        i = self._miner(miner_id)
        state = STATE_CODE.get(m.state)
        if state is None:
            raise PayloadError("bad_value", f"state {m.state[:20]!r}")
        max_w = self._max_w[i]
        nan = math.nan
        power = nan if m.power_w is None else m.power_w
        target = nan if m.target_w is None else m.target_w
        hashrate = nan if m.hashrate_ths is None else m.hashrate_ths
        temp = nan if m.temp_c is None else m.temp_c
        if (not (0.0 <= power <= max_w or m.power_w is None)
                or not (0.0 <= target <= max_w or m.target_w is None)
                or not (0.0 <= hashrate <= self._max_ths[i] or m.hashrate_ths is None)
                or not (TEMP_RANGE_C[0] <= temp <= TEMP_RANGE_C[1] or m.temp_c is None)
                or not (m.fan_rpm is None or 0 <= m.fan_rpm <= FAN_MAX_RPM)
                or not (m.hashboards is None or 0 <= m.hashboards <= MAX_HASHBOARDS)
                or not (m.ack_seq is None or m.ack_seq >= 0)):
            raise PayloadError("out_of_range", f"{miner_id}: beyond its model's bounds "
                               f"(power, target <= {max_w:.0f} W, hashrate <= "
                               f"{self._max_ths[i]:.1f} TH/s)")
        taken_at = self._taken_at(m.ts, "telemetry")
        ack = -1 if m.ack_seq is None else m.ack_seq
        if self.sent_seq is not None and ack > self.sent_seq[i]:
            if self.sent_seq[i] >= 0:
                self._reject_readings("bad_ack", self.topics.miner(miner_id, "telemetry"),
                                      [miner_id], "ack_seq above the last sequence sent to it")
            ack = -1
        self.fleet.apply_one(i, state=state, power_w=power, hashrate_ths=hashrate,
                             target_w=target, temp_c=temp, ack_seq=ack, taken_at=taken_at)

    def _miner_availability(self, miner_id: str, raw: bytes) -> None:
        online = parse_availability(raw)
        i = self._miner(miner_id)
        self.fleet.set_available(i, online)
        if online and self.on_online is not None:
            self.on_online(np.array([i], dtype=np.intp))
        if not online:
            self.on_change("availability")

    def _group_availability(self, group: str, raw: bytes) -> None:
        online = parse_availability(raw)
        if group not in self._group_index:
            raise PayloadError("unknown_group", group)
        self.fleet.set_available(self.fleet.members(group), online)
        if online and self.on_online is not None:
            self.on_online(self.fleet.members(group))
        if not online:
            self.on_change("availability")

    def _capabilities(self, group: str, raw: bytes) -> None:
        """A bridge's firmware facts, set by set: preset-only miners plan over their presets.

        A set is dropped alone (counted) when it is malformed, names miners that are not
        this group's, or presets beyond its model; a change the optimizer cannot prepare
        is undone, so one bad message can never poison the points later ones build on.
        """
        g = self._group_index.get(group)
        if g is None:
            raise PayloadError("unknown_group", group)
        envelope = decode(_CapabilitiesEnvelope, raw)
        fleet = self.fleet
        changed = False
        failures: Counter[str] = Counter()
        for k, item in enumerate(envelope.sets):
            try:
                s = _control_set(item)
                plan = self._set_plan(s, g, group)
            except PayloadError as e:
                failures[e.reason] += 1
                self.reject(Kind.GROUP_CAPABILITIES, e.reason,
                            self.topics.group(group, "capabilities"), f"set {k}: {e.detail}")
                continue
            before = (fleet.points_w.copy(), fleet.points_ths.copy(), fleet.max_w.copy())
            set_changed = False
            for ix, power_w, hashrate_ths in plan:
                set_changed |= fleet.set_points(ix, power_w, hashrate_ths)
            if not set_changed:
                continue
            try:
                self.on_points_changed()
            except Exception as e:
                fleet.points_w, fleet.points_ths, fleet.max_w = before
                self.on_points_changed()
                self.reject(Kind.GROUP_CAPABILITIES, "bad_value",
                            self.topics.group(group, "capabilities"),
                            f"set {k}: cannot plan with it: {e!r}")
                continue
            changed = True
        if changed:
            self._plausible()
            log.info("operating_points_updated", group=group, sets=len(envelope.sets),
                     sets_rejected=sum(failures.values()))

    def _set_plan(self, s: PowerControlSet, g: int,
                  group: str) -> list[tuple[list[int], list[float], list[float] | None]]:
        """The set_points calls one set asks for, by model; PayloadError if it cannot apply."""
        fleet = self.fleet
        idx = [fleet.index.get(m) for m in s.miners]
        unknown = [m for m, i in zip(s.miners, idx, strict=True) if i is None]
        if unknown:
            raise PayloadError("unknown_miner", f"{len(unknown)} unknown, e.g. {unknown[0]}")
        rows = [i for i in idx if i is not None]
        foreign = [fleet.ids[i] for i in rows if fleet.group_idx[i] != g]
        if foreign:
            raise PayloadError("wrong_group", f"{len(foreign)} miner(s) not in {group}, "
                               f"e.g. {foreign[0]}")
        by_model: dict[int, list[int]] = {}
        for i in rows:
            by_model.setdefault(int(fleet.model_idx[i]), []).append(i)
        plan: list[tuple[list[int], list[float], list[float] | None]] = []
        for m, ix in by_model.items():
            model = fleet.models[m]
            if s.control == "presets" and s.presets_w:
                top = model.max_w * POWER_MARGIN
                if s.presets_w[-1] > top or s.presets_w[0] <= model.sleep_w:
                    raise PayloadError("out_of_range", f"presets {s.presets_w[0]:g}.."
                                       f"{s.presets_w[-1]:g} W outside {model.name}'s "
                                       f"{model.sleep_w:g}..{top:.0f} W")
                if s.presets_ths is not None and max(s.presets_ths) > (
                        float(fleet.points_ths[ix[0]].max()) * HASHRATE_MARGIN):
                    raise PayloadError("out_of_range", f"preset hashrate beyond {model.name}'s")
                plan.append((ix, list(s.presets_w), s.presets_ths))
            elif s.control == "none":  # stock firmware: stock or asleep
                plan.append((ix, [model.nominal_w], None))
        return plan

    # -- site: meters, markets, grid -----------------------------------------------

    def _vendor_meter(self, topic: str, raw: bytes) -> None:
        routed = self.meters.decode(topic, raw)
        if routed is None:
            return
        for value in routed.reading.unknown:  # counted and logged by the router too
            self.metrics.meter_values_unknown.labels(
                routed.meter_id, value.field, value.reason).inc()
        telemetry = routed.reading.telemetry(time.time())
        if self.on_meter is not None:
            self.on_meter(routed.meter_id, telemetry)
        if routed.role == "site":
            self._apply_meter(telemetry, time.monotonic())

    def _meter(self, meter_id: str, raw: bytes) -> None:
        reading = decode(MeterTelemetry, raw)
        if self.on_meter is not None and self.on_meter(meter_id, reading) \
                and meter_id not in self.site_meter_ids:
            return  # a campus part's own meter, not the site's
        if self.site_meter_ids and meter_id not in self.site_meter_ids:
            raise PayloadError("unknown_meter", meter_id)
        self._apply_meter(reading, self._taken_at(reading.ts, "meter reading"))

    def apply_site_meter(self, reading: MeterTelemetry) -> None:
        """A site-meter reading from elsewhere (a campus's Modbus POI meter)."""
        self._apply_meter(reading, time.monotonic())

    def _apply_meter(self, reading: MeterTelemetry, taken_at: float) -> None:
        bound = self.limits.meter_max_abs_w
        if abs(reading.power_w) > bound:
            raise PayloadError("out_of_range", f"meter power {reading.power_w:g} W beyond "
                               f"+-{bound:g} W ({METER_CAP_MULTIPLE:g} x the site cap)")
        site = self.fleet.site
        site.meter_power_w = reading.power_w
        site.meter_at = taken_at
        self.metrics.energy.observe(reading.power_w, reading.energy_import_wh, time.monotonic())
        if reading.frequency_hz is None:
            return
        site.frequency_hz = reading.frequency_hz
        change = self.grid.frequency(reading.frequency_hz, time.time(), time.monotonic())
        if change == "shed":
            self.on_shed(self.grid.frequency_shed)
        if change:
            self.on_change("frequency")

    def _grid_event(self, _device: str, raw: bytes) -> None:
        event = decode(GridEvent, raw)
        if self.grid.accept(event, time.time(), time.monotonic()):
            self.on_change("grid")

    def _bounded_price(self, price: float, what: str) -> tuple[float, PriceBound | None]:
        """The price to plan with: within the site's bounds (PriceBounds); absurd raises."""
        try:
            return self.limits.price_bounds.bound(price)
        except ValueError as e:
            raise PayloadError("out_of_range", f"{what}: {e}") from None

    def _clamped(self, bound: PriceBound, prices: list[float], what: str) -> None:
        """Count and log prices planned with at a bound: a real price, not a bad message."""
        self.prices_clamped[bound] += len(prices)
        self.metrics.price_clamped.labels(bound).inc(len(prices))
        suppressed = self._quiet.allow("price_clamped", bound)
        if suppressed is not None:
            b = self.limits.price_bounds
            at = b.cap_usd_per_mwh if bound == "cap" else b.floor_usd_per_mwh
            log.warning("price_clamped", what=what, price_usd_per_mwh=max(prices, key=abs),
                        prices=len(prices), bound=bound, planned_usd_per_mwh=at,
                        setting=f"[energy] price_{bound}_usd_per_mwh = {at:g}",
                        suppressed_since_last=suppressed)

    def _price(self, _device: str, raw: bytes) -> None:
        price = decode(PriceSignal, raw)
        now_unix = time.time()
        age = self._age_s(price.ts, now_unix, math.inf, "price")
        # The market's own price is kept: the price in force bounds it for the plan only.
        market = price.price_usd_per_mwh
        _, bound = self._bounded_price(market, "price")
        if bound is not None:
            self._clamped(bound, [market], "price")
        site = self.fleet.site
        changed = market != site.market_price_usd_per_mwh
        site.market_price_usd_per_mwh = market
        site.price_at = time.monotonic() - age
        if changed:
            self.on_change("price")

    def _price_schedule(self, _device: str, raw: bytes) -> None:
        schedule = decode(PriceSchedule, raw)
        self._age_s(schedule.ts, time.time(), math.inf, "price schedule")
        clamped: dict[PriceBound, list[float]] = {}
        for p in schedule.prices:
            _, bound = self._bounded_price(p.price_usd_per_mwh,
                                           f"scheduled price at {p.start_ts:.0f}")
            if bound is not None:
                clamped.setdefault(bound, []).append(p.price_usd_per_mwh)
        for bound, prices in clamped.items():
            self._clamped(bound, prices, "price schedule")
        # Kept as the market's: the price in force bounds it for the plan only.
        self.fleet.site.price_schedule = schedule
        self.on_change("price_schedule")

    def _hashprice(self, _device: str, raw: bytes) -> None:
        hp = decode(HashpriceSignal, raw)
        self._age_s(hp.ts, time.time(), math.inf, "hashprice")
        self.fleet.site.hashprice_usd_per_ph_day = hp.hashprice_usd_per_ph_day
        self.on_change("hashprice")


class _Lookup(dict[str, int]):
    """A dict whose missing keys are -1: `map(d.__getitem__, keys)` at C speed."""

    def __missing__(self, key: str) -> int:
        return -1


_STATE_OR_BAD = _Lookup(STATE_CODE)


class _CapabilitiesEnvelope(GroupCapabilities):
    """GroupCapabilities with its sets unchecked: ingest validates them one by one."""

    sets: list[Any] = Field(max_length=5000)


def _control_set(item: Any) -> PowerControlSet:
    try:
        return PowerControlSet.model_validate(item)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        kind = err["type"]
        reason = ("out_of_range" if kind in ("greater_than", "greater_than_equal", "less_than",
                                             "less_than_equal", "too_long", "too_short")
                  else "bad_value" if kind == "value_error"
                  else "bad_schema" if kind in ("missing", "extra_forbidden")
                  else "wrong_type")
        raise PayloadError(reason, f"{where}: {err['msg']}") from None


class _Rack(NamedTuple):
    """A rack message that passed the checks of a whole message, awaiting its readings'."""

    topic: str
    group: str
    g: int  # the group's index
    n: int  # readings
    taken_at: float  # monotonic, s


@dataclass(slots=True)
class _Gathering:
    """Rack messages to check and apply together, each group at most once."""

    racks: list[_Rack] = field(default_factory=list)
    rows: list[npt.NDArray[np.intp]] = field(default_factory=list)  # each message's
    states: list[npt.NDArray[np.int8]] = field(default_factory=list)  # each message's codes
    groups: set[int] = field(default_factory=set)
    columns: TelemetryBatch = field(default_factory=TelemetryBatch)


def _segments_with(mask: npt.NDArray[np.bool_], ends: npt.NDArray[np.int64]) -> list[int]:
    """The messages (by position) with a True reading; `ends`: each message's end."""
    found: list[int] = np.unique(np.searchsorted(ends, np.flatnonzero(mask), side="right")).tolist()
    return found


def _why(reason: str, c: TelemetryColumns, k: npt.NDArray[np.intp], group: str) -> str:
    """A readable detail for the first rejected reading."""
    j = int(k[0])
    if reason == "unknown_miner":
        return f"{c.ids[j]} is not in the inventory"
    if reason == "wrong_group":
        return f"{c.ids[j]} is not in group {group}"
    if reason == "bad_value":
        return f"{c.ids[j]}: state {c.state[j][:20]!r}"
    return (f"{c.ids[j]}: power_w {c.power_w[j]:g}, target_w {c.target_w[j]:g}, hashrate_ths "
            f"{c.hashrate_ths[j]:g}, temp_c {c.temp_c[j]:g}, fan_rpm {c.fan_rpm[j]}, "
            f"hashboards {c.hashboards[j]}")

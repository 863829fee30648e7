"""The controller: ingest -> fleet state -> decide (optimizer + policy) -> actuate -> metrics.

One asyncio task reads MQTT and updates state; one loop decides on a tick, or
at once when a trigger (a new price, a reconnect) asks for it. Each cycle re-reads
the state, plans from scratch and sends only what changed, so a missed message
or a restart costs one cycle, not correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter

import numpy as np
import numpy.typing as npt
import structlog

from controller.actuation import Actuator
from controller.config import SiteConfig
from controller.fleet_state import FleetState
from controller.grid import GridObligations, GridRules, Obligation
from controller.grid_journal import GridJournal
from controller.logs import LogLimiter
from controller.metrics import GridEventStatus, Metrics
from controller.optimizer import prepare
from controller.payloads import (
    DecisionSummary,
    FleetCommand,
    GridEvent,
    GroupCapabilities,
    GroupTelemetry,
    HashpriceSignal,
    MeterTelemetry,
    MinerTelemetry,
    PayloadError,
    PriceSchedule,
    PriceSignal,
    Setpoint,
    decode,
)
from controller.policy import MarketInputs, MinerInputs, PolicyKnobs, PolicyState, decide
from controller.reasons import REASON_NAMES, Reason
from controller.systemd import supervise
from controller.topics import OFFLINE, ONLINE, Kind, SiteTopics
from controller.transport import LastWill, Transport
from drivers.meters import MeterRouter

log = structlog.get_logger("mineops.controller")

PRICE_STALE_S = 3600.0


class Controller:
    """A site's controller; `run()` until cancelled."""

    def __init__(self, cfg: SiteConfig, *, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.topics = SiteTopics(cfg.site_id)
        self.fleet = FleetState(cfg.inventory)
        self.prepared = prepare(self.fleet.points_w, self.fleet.points_ths)
        # Until miners report, assume every one runs at full power: the worst case.
        self.policy_state = PolicyState.initial(self.fleet.n, self.prepared.max_level)
        pc = cfg.policy
        self.knobs = PolicyKnobs(
            min_run_s=pc.min_run_s, min_sleep_s=pc.min_sleep_s,
            hysteresis_usd_per_mwh=pc.hysteresis_usd_per_mwh,
            wake_latency_factor=pc.wake_latency_factor, ramp_kw_per_min=pc.ramp_kw_per_min,
            derate_start_c=pc.derate_start_c, critical_c=pc.critical_c,
        )
        self.actuator = Actuator(self.fleet.n, self.fleet.group_idx, self.fleet.ids,
                                 self.fleet.groups)
        self.meter_ids = {m.id for m in cfg.meters if m.role == "site"}
        self.meter_router = MeterRouter(cfg.meters)  # meters in vendor formats
        self.grid = self._grid_obligations(cfg)
        self.metrics = metrics or Metrics()
        self.transport = Transport(
            cfg.broker,
            client_id=f"mineops-controller-{cfg.site_id}",
            subscriptions=self._subscriptions(),
            will=LastWill(self.topics.controller_availability, OFFLINE.encode()),
            on_connect=self._on_connect,
            on_disconnect=self.actuator.forget,
            on_close=self._on_close,
        )
        self.last_planned_w = math.nan
        # Per miner, from the last decision (metrics).
        self.planned_power_w: npt.NDArray[np.float64] | None = None
        self.last_decision_unix_s = math.nan
        self.grid_event: GridEventStatus | None = None  # set by the grid-event lifecycle
        self.reason_counts = np.zeros(len(Reason), dtype=np.int64)
        self.decision_count = 0
        self.invalid: Counter[tuple[str, str]] = Counter()
        self._trigger = asyncio.Event()
        self._trigger_why = "start"
        self._quiet = LogLimiter(60.0)
        self._background: set[asyncio.Task[None]] = set()
        self.cap_in_force_w = self.cap_w()
        self.price_schedule: PriceSchedule | None = None
        self.metrics.attach(self)  # last: the collector reads the attributes above

    def _subscriptions(self) -> list[str]:
        t = self.topics
        return [
            t.miner("+", "telemetry"),
            t.miner("+", "availability"),
            t.group("+", "telemetry"),
            t.group("+", "availability"),
            t.group("+", "capabilities"),
            f"{t.base}/meter/+/telemetry",
            t.price,
            t.price_schedule,
            t.hashprice,
            t.grid,
            *self.meter_router.subscriptions(),
        ]

    def _grid_obligations(self, cfg: SiteConfig) -> GridObligations:
        fleet, g = self.fleet, cfg.grid
        in_groups = np.array([fleet.groups[i] for i in fleet.group_idx])
        keep_alive = np.isin(in_groups, g.keep_alive_groups)
        shed = (np.isin(in_groups, g.frequency.shed_groups) if g.frequency.shed_groups
                else np.ones(fleet.n, dtype=bool))
        sleep_w = fleet.points_w[:, 0]
        keep_alive_w = float(np.where(keep_alive, fleet.max_w, sleep_w).sum()) * (
            1.0 + cfg.energy.aux_fraction)
        ramp = cfg.policy.ramp_kw_per_min if math.isfinite(cfg.policy.ramp_kw_per_min) else None
        recovery_kw_per_min = g.recovery_kw_per_min or ramp or 0.1 * cfg.power_cap_kw
        rules = GridRules(
            prepare_s=g.prepare_s, recovery_w_per_s=recovery_kw_per_min * 1000.0 / 60.0,
            record_interval_s=g.record_interval_s, shed_below_hz=g.frequency.shed_below_hz,
            restore_above_hz=g.frequency.restore_above_hz,
            restore_hold_s=g.frequency.restore_hold_s,
            peak_hold_w=None if g.peak_hold_kw is None else g.peak_hold_kw * 1000.0,
        )
        return GridObligations(GridJournal(g.journal_path), rules, keep_alive=keep_alive,
                               frequency_shed=shed, keep_alive_w=keep_alive_w)

    # -- inputs in force --------------------------------------------------------

    def price_usd_per_mwh(self) -> float:
        """Market price plus adders: real-time if fresh, else day-ahead, else a cautious default."""
        site = self.fleet.site
        fresh = time.monotonic() - site.price_at < PRICE_STALE_S
        market = site.price_usd_per_mwh if fresh else None
        if market is None and self.price_schedule is not None:
            market = self.price_schedule.price_at(time.time())
        if market is None:
            market = self.cfg.energy.default_price_usd_per_mwh
        return market + self.cfg.energy.adders_usd_per_mwh

    def hashprice_usd_per_ph_day(self) -> float:
        feed = self.fleet.site.hashprice_usd_per_ph_day
        return self.cfg.hashprice_usd_per_ph_day if feed is None else feed

    def cap_w(self) -> float:
        return self.cfg.power_cap_kw * 1000.0

    # -- ingest -------------------------------------------------------------------

    def trigger(self, why: str) -> None:
        """Ask for a decision now rather than at the next tick."""
        self._trigger_why = why
        self._trigger.set()

    def _reject(self, kind: Kind, reason: str, topic: str, detail: str) -> None:
        self.invalid[(kind.value, reason)] += 1
        self.metrics.invalid.labels(kind.value, reason).inc()
        suppressed = self._quiet.allow(kind.value, reason)
        if suppressed is not None:
            log.warning("message_dropped", kind=kind.value, reason=reason, topic=topic,
                        detail=detail[:200], suppressed_since_last=suppressed)

    def on_message(self, topic: str, raw: bytes) -> None:
        """Validate and apply one message; a bad one is counted and dropped, never raised."""
        if self.meter_router.claims(topic):
            self._on_vendor_meter(topic, raw)
            return
        parsed = self.topics.parse(topic)
        self.metrics.messages.labels(parsed.kind.value).inc()
        try:
            self._apply(parsed.kind, parsed.device, raw)
        except PayloadError as e:
            self._reject(parsed.kind, e.reason, topic, e.detail)
        except Exception as e:  # a bug must not take the controller down with it
            log.exception("message_handler_failed", topic=topic)
            self._reject(parsed.kind, "internal_error", topic, repr(e))

    def _on_vendor_meter(self, topic: str, raw: bytes) -> None:
        """A meter in its vendor's format: its driver decodes, then it is applied as our own."""
        kind = Kind.METER_TELEMETRY
        self.metrics.messages.labels(kind.value).inc()
        try:
            routed = self.meter_router.decode(topic, raw)
            if routed is not None and routed.role == "site":
                # Through the same path as the project's own meter messages (frequency too).
                telemetry = routed.reading.telemetry(time.time())
                self._apply(kind, routed.meter_id, telemetry.encode())
        except PayloadError as e:
            self._reject(kind, e.reason, topic, e.detail)
        except Exception as e:  # a bug must not take the controller down with it
            log.exception("message_handler_failed", topic=topic)
            self._reject(kind, "internal_error", topic, repr(e))

    def _apply(self, kind: Kind, device: str, raw: bytes) -> None:
        now = time.monotonic()
        fleet = self.fleet
        if kind is Kind.GROUP_TELEMETRY:
            msg = decode(GroupTelemetry, raw)
            found = [(fleet.index.get(r.id), r) for r in msg.miners]
            known = [(i, r) for i, r in found if i is not None]
            if known:
                idx, readings = zip(*known, strict=True)
                fleet.update_many(idx, readings, now)
            unknown = len(found) - len(known)
            if unknown:
                raise PayloadError("unknown_miner", f"{unknown} unknown miner id(s) in {device}")
        elif kind is Kind.MINER_TELEMETRY:
            reading = decode(MinerTelemetry, raw)
            fleet.update(self._miner(device), reading, now)
        elif kind in (Kind.MINER_AVAILABILITY, Kind.GROUP_AVAILABILITY):
            text = raw.decode(errors="replace").strip()
            if text not in (ONLINE, OFFLINE):
                raise PayloadError("bad_value", f"availability must be online/offline: {text!r}")
            if kind is Kind.MINER_AVAILABILITY:
                fleet.set_available(self._miner(device), text == ONLINE)
            elif device in fleet.groups:
                fleet.set_available(fleet.members(device), text == ONLINE)
            else:
                raise PayloadError("unknown_group", device)
            if text == OFFLINE:
                self.trigger("availability")
        elif kind is Kind.METER_TELEMETRY:
            reading_m = decode(MeterTelemetry, raw)
            if self.meter_ids and device not in self.meter_ids:
                raise PayloadError("unknown_meter", device)
            fleet.site.meter_power_w = reading_m.power_w
            fleet.site.meter_at = now
            self.metrics.energy.observe(reading_m.power_w, reading_m.energy_import_wh, now)
            if reading_m.frequency_hz is not None:
                fleet.site.frequency_hz = reading_m.frequency_hz
                change = self.grid.frequency(reading_m.frequency_hz, time.time())
                if change == "shed":
                    self._shed_now(self.grid.frequency_shed)
                if change:
                    self.trigger("frequency")
        elif kind is Kind.GRID:
            if self.grid.accept(decode(GridEvent, raw), time.time()):
                self.trigger("grid")
        elif kind is Kind.PRICE:
            price = decode(PriceSignal, raw)
            changed = price.price_usd_per_mwh != fleet.site.price_usd_per_mwh
            fleet.site.price_usd_per_mwh = price.price_usd_per_mwh
            fleet.site.price_at = now
            if changed:
                self.trigger("price")
        elif kind is Kind.GROUP_CAPABILITIES:
            self._apply_capabilities(decode(GroupCapabilities, raw))
        elif kind is Kind.PRICE_SCHEDULE:
            self.price_schedule = decode(PriceSchedule, raw)
            self.trigger("price_schedule")
        elif kind is Kind.HASHPRICE:
            hp = decode(HashpriceSignal, raw)
            fleet.site.hashprice_usd_per_ph_day = hp.hashprice_usd_per_ph_day
            self.trigger("hashprice")
        else:
            raise PayloadError("unknown_topic", "not a topic the controller reads")

    def _apply_capabilities(self, caps: GroupCapabilities) -> None:
        """A bridge's firmware facts: preset-only miners plan over their presets alone."""
        fleet = self.fleet
        changed = False
        for s in caps.sets:
            idx = [i for i in (fleet.index.get(m) for m in s.miners) if i is not None]
            by_model: dict[int, list[int]] = {}
            for i in idx:
                by_model.setdefault(int(fleet.model_idx[i]), []).append(i)
            for m, ix in by_model.items():
                model = fleet.models[m]
                if s.control == "presets" and s.presets_w:
                    changed |= fleet.set_points(ix, s.presets_w, s.presets_ths)
                elif s.control == "none":  # stock firmware: stock or asleep
                    changed |= fleet.set_points(ix, [model.nominal_w], None)
        if changed:
            # The step order depends on every row: prepare again (rare: retained, per session).
            self.prepared = prepare(fleet.points_w, fleet.points_ths)
            top = self.prepared.max_level
            self.policy_state.level = np.minimum(self.policy_state.level, top)
            log.info("operating_points_updated", sets=len(caps.sets))
            self.trigger("capabilities")

    def _miner(self, miner_id: str) -> int:
        i = self.fleet.index.get(miner_id)
        if i is None:
            raise PayloadError("unknown_miner", miner_id)
        return i

    # -- decide and act -----------------------------------------------------------

    def _shed_now(self, mask: npt.NDArray[np.bool_]) -> None:
        """Sleep the groups of the miners in `mask` now: one site-wide broadcast message."""
        idx = np.flatnonzero(mask)
        seq = self.actuator.mark_sleep(idx, time.monotonic())
        groups = sorted({self.fleet.groups[g] for g in np.unique(self.fleet.group_idx[idx])})
        cmd = FleetCommand(seq=seq, ts=time.time(), all=Setpoint(action="sleep"),
                           groups=None if len(groups) == len(self.fleet.groups) else groups)
        task = asyncio.get_running_loop().create_task(self._broadcast(cmd.encode()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _broadcast(self, payload: bytes) -> None:
        ok = await self.transport.publish(self.topics.fleet_cmd, payload, qos=1)
        self.metrics.command_messages.inc()
        if not ok:
            self.actuator.forget()

    def site_power_w(self, now: float) -> float | None:
        """Site power as best known: a fresh meter reading, else the last plan (None: unknown)."""
        site = self.fleet.site
        if now - site.meter_at <= self.cfg.policy.telemetry_stale_s:
            return site.meter_power_w
        return None if math.isnan(self.last_planned_w) else self.last_planned_w

    def _grid_status(self, ob: Obligation, planned_w: float, now_ts: float,
                     meter_w: float | None) -> GridEventStatus | None:
        if ob.event is None or ob.event.target_w is None or ob.deadline_ts is None:
            return None
        target = ob.event.target_w
        on_plan = planned_w <= target * 1.0001
        met = now_ts < ob.deadline_ts or (meter_w is not None and meter_w <= target * 1.005)
        return GridEventStatus(target_w=target, deadline_unix_s=ob.deadline_ts,
                               on_track=on_plan and met)

    async def _on_connect(self) -> None:
        await self.transport.publish(self.topics.controller_availability, ONLINE, qos=1,
                                     retain=True)
        self.actuator.forget()
        self.trigger("connect")

    async def decide_and_act(self, why: str) -> DecisionSummary:
        started = time.perf_counter()
        now = time.monotonic()
        fleet = self.fleet
        stale = fleet.stale(now, self.cfg.policy.telemetry_stale_s)
        price = self.price_usd_per_mwh()
        now_ts = time.time()
        site_w = self.site_power_w(now)
        ob = self.grid.obligation(now_ts, site_w, self.cap_w())
        cap = min(self.cap_w(), ob.cap_w)
        market = MarketInputs(
            price_usd_per_mwh=price,
            hashprice_usd_per_ph_day=self.hashprice_usd_per_ph_day(),
            cap_w=cap * (1.0 - self.cfg.policy.cap_headroom_fraction),
            aux_fraction=self.cfg.energy.aux_fraction,
            cap_is_grid=ob.cap_w < self.cap_w() or ob.force_sleep is not None,
        )
        decision = decide(
            self.prepared,
            market,
            MinerInputs(stale=stale, never_curtail=fleet.never_curtail, temp_c=fleet.temp_c,
                        priority=fleet.priority, wake_s=fleet.wake_s,
                        offline=fleet.announced_offline, force_sleep=ob.force_sleep),
            self.policy_state,
            self.knobs,
            now_s=now,
        )
        commands, sent = self.actuator.plan(
            decision.level, decision.power_w, decision.commandable, fleet.ack_seq, now
        )
        if commands:
            results = await asyncio.gather(*(
                self.transport.publish(
                    self.topics.fleet_cmd if g is None else self.topics.group(g, "cmd"),
                    payload, qos=1)
                for g, payload in commands
            ))
            if not all(results):
                self.actuator.forget()  # some did not go out: re-send all once reconnected
            self.metrics.commands.inc(int(sent.size))
            self.metrics.command_messages.inc(len(commands))
        self.last_planned_w = decision.site_power_w
        self.grid_event = self._grid_status(ob, decision.site_power_w, now_ts, site_w)
        self.cap_in_force_w = cap
        self.reason_counts = np.bincount(decision.reason, minlength=len(Reason))[: len(Reason)]
        self.decision_count += 1
        self.planned_power_w = decision.power_w
        self.last_decision_unix_s = time.time()
        duration = time.perf_counter() - started
        self.metrics.decision_seconds.observe(duration)
        self.metrics.decisions.labels(why).inc()
        summary = DecisionSummary(
            ts=time.time(),
            price_usd_per_mwh=price,
            hashprice_usd_per_ph_day=market.hashprice_usd_per_ph_day,
            cap_w=market.cap_w,
            planned_site_power_w=round(decision.site_power_w, 1),
            measured_site_power_w=None if math.isnan(fleet.site.meter_power_w)
            else fleet.site.meter_power_w,
            miners_by_state=fleet.counts_by_state(now, self.cfg.policy.telemetry_stale_s),
            miners_by_reason={
                REASON_NAMES[r]: int(c) for r, c in enumerate(self.reason_counts) if c
            },
            commands_sent=int(sent.size),
            duration_s=round(duration, 6),
        )
        await self.transport.publish(self.topics.decision, summary.encode(), qos=1, retain=True)
        if sent.size:
            log.info("decision", trigger=why, price_usd_per_mwh=round(price, 2),
                     planned_kw=round(decision.site_power_w / 1000, 1),
                     cap_kw=round(market.cap_w / 1000, 1), commands=int(sent.size),
                     reasons=summary.miners_by_reason)
        return summary

    async def _decide_forever(self) -> None:
        interval = self.cfg.policy.decision_interval_s
        # Retained price and availability arrive right after connecting: deciding before
        # them would sleep the fleet on the cautious default price, then wake it again.
        grace_s = max(2.0, 2 * interval)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                while self.fleet.site.price_usd_per_mwh is None:  # noqa: ASYNC110 - once, at start
                    await asyncio.sleep(0.05)
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns normally when the
            # trigger fires in the loop iteration that cancels this task, and this loop
            # then never stops (controller/cancellation.py).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._trigger.wait()
            why = self._trigger_why if self._trigger.is_set() else "tick"
            self._trigger.clear()
            try:
                await self.decide_and_act(why)
            except Exception:
                # Keep deciding: a failed cycle is retried at the next tick.
                log.exception("decision_failed", trigger=why)

    async def run(self) -> None:
        """Run until cancelled; 'offline' is published on a clean stop, the last will on a crash."""
        log.info("controller_starting", site=self.cfg.site_id, miners=self.fleet.n,
                 cap_kw=self.cfg.power_cap_kw, broker=f"{self.cfg.broker.host}:"
                 f"{self.cfg.broker.port}")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.transport.run(self.on_message), name="controller-mqtt")
            tg.create_task(self._decide_forever(), name="controller-decide")
            # systemd (Type=notify): READY=1 after the first connect, watchdog pings from
            # this event loop; does nothing without $NOTIFY_SOCKET.
            tg.create_task(supervise(self.transport.connected), name="controller-systemd")

    async def _on_close(self) -> None:
        await self.transport.publish(self.topics.controller_availability, OFFLINE, qos=1,
                                     retain=True)

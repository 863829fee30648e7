"""The controller: ingest -> fleet state -> decide (optimizer + policy) -> actuate -> snapshot.

One asyncio task reads MQTT and updates state (`Ingest`); one loop decides on a tick,
or at once when a trigger (a new price, a grid event, a reconnect) asks for it. Each
cycle re-reads the state, plans from scratch, sends only what changed and ends in one
frozen `DecisionSnapshot` that metrics, the decision topic and the live views read.
A missed message or a restart costs one cycle, not correctness.

The plan is checked against the meter every cycle (`closed_loop.MeterGuard`): load the
plan does not see is taken off the planning cap, and a site over the cap in force gets
every setpoint again. A miner whose acknowledged sequence goes back, or a rack that
announces itself online, gets its setpoints again at once. Grid events are obeyed from
memory and journaled after (`grid/`); journal I/O never fails a decision. Durations
run on the monotonic clock; the wall clock is read through `wall_clock` (injectable).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import structlog

from controller.config import SiteConfig
from controller.core.actuation import Actuator
from controller.core.campus import CampusPicture
from controller.core.fleet_state import FleetState
from controller.core.optimizer import prepare
from controller.core.policy import (
    Decision,
    MarketInputs,
    MinerInputs,
    PolicyState,
    decide,
)
from controller.core.prices import PriceInForce, price_in_force
from controller.daemon.campus import CampusLink
from controller.daemon.campus_metrics import CampusCollector
from controller.daemon.closed_loop import LoopCollector, LoopStatus, MeterGuard, telemetry_view
from controller.daemon.ingest import Ingest, IngestLimits
from controller.daemon.metrics import Metrics, SiteCollector
from controller.daemon.snapshot import CapInForce, CapSource, DecisionSnapshot, GridEventStatus
from controller.daemon.systemd import supervise
from controller.grid.journal import GridJournal
from controller.grid.obligations import GridObligations, GridRules, Obligation
from controller.protocol.payloads import DecisionSummary, FleetCommand, Setpoint
from controller.protocol.topics import OFFLINE, ONLINE, SiteTopics
from controller.protocol.transport import LastWill, Transport
from drivers.meters import MeterRouter

log = structlog.get_logger("mineops.controller")


def _grid_obligations(cfg: SiteConfig, fleet: FleetState) -> GridObligations:
    """The site's grid obligations from its [grid] table, resumed from the journal."""
    g = cfg.grid
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


def _cap_source(ob: Obligation, site_cap_w: float, frequency_shed: bool) -> CapSource:
    """What set the cap in force (for the operator: "why is the site held here")."""
    if ob.event is not None and ob.event.target_w is not None and ob.cap_w == ob.event.target_w \
            and ob.cap_w < site_cap_w:
        kind = ob.event.kind
        if kind in ("target_kw", "shed_kw", "emergency", "peak"):
            return kind  # type: ignore[return-value]
    if frequency_shed:
        return "frequency"
    return "recovery" if ob.cap_w < site_cap_w else "site"


class SiteTime(NamedTuple):
    """A simulated site's clock at a decision (see Controller's `site_clock`)."""

    site_ts: float | None  # the site's time now, Unix s; None: not running yet
    speed: float  # site seconds per wall-clock second
    timezone: str  # IANA zone the site's times are shown in


class Controller:
    """A site's controller; `run()` until cancelled. `snapshot` is the latest decision.

    Args:
        cfg: The site.
        metrics: Where to count (default: a registry of its own).
        wall_clock: Unix time now, s (the tests step it; durations use the monotonic clock).
        site_clock: A simulated site's clock (the demo): read at each decision, its time
            goes out in the decision summary for the live views; None on a real site.

    Raises:
        JournalError: the grid journal cannot be opened for writing.
    """

    def __init__(self, cfg: SiteConfig, *, metrics: Metrics | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 site_clock: Callable[[], SiteTime] | None = None) -> None:
        self.cfg = cfg
        self.wall_clock = wall_clock
        self.site_clock = site_clock
        self.topics = SiteTopics(cfg.site_id)
        self.fleet = FleetState(cfg.inventory)
        self.prepared = prepare(self.fleet.points_w, self.fleet.points_ths)
        # Until miners report, assume every one runs at full power: the worst case.
        self.policy_state = PolicyState.initial(self.fleet.n, self.prepared.max_level)
        pc = cfg.policy
        self.knobs = pc.knobs()
        self.actuator = Actuator(self.fleet.n, self.fleet.group_idx, self.fleet.ids,
                                 self.fleet.groups)
        self.grid = _grid_obligations(cfg, self.fleet)
        self.metrics = metrics or Metrics()
        self.snapshot: DecisionSnapshot | None = None
        self.summary: DecisionSummary | None = None  # the latest one published
        self.decisions = 0
        self.campus = None if cfg.campus is None else CampusLink(
            cfg.campus, stale_s=pc.telemetry_stale_s, margin_fraction=pc.cap_headroom_fraction,
            on_change=self.trigger, on_frequency=self._genset_frequency,
            on_site_meter=lambda r: self.ingest.apply_site_meter(r))  # noqa: PLW0108 - made below
        self.decision_failures = 0
        models = self.fleet.models
        self.guard = MeterGuard(
            confirm_s=max(pc.decision_interval_s, 1.0),
            # Miners told to sleep or to a lower target take this long to get there.
            settle_s=max((max(m.sleep_s, m.settle_s) for m in models), default=10.0)
            + pc.decision_interval_s,
            noise_fraction=self.grid.rules.tolerance_fraction,
            release_w_per_s=self.grid.rules.recovery_w_per_s)
        self.loop_status: LoopStatus | None = None
        self._last_plan: npt.NDArray[np.float64] | None = None
        # Setpoints marked for re-send whatever was acknowledged, by why.
        self.resends: Counter[str] = Counter()
        self.ingest = Ingest(
            topics=self.topics, fleet=self.fleet, grid=self.grid,
            meters=MeterRouter(cfg.meters),
            site_meter_ids={m.id for m in cfg.meters if m.role == "site"},
            metrics=self.metrics, on_change=self.trigger, on_shed=self._shed_now,
            on_points_changed=self._prepare_again,
            limits=IngestLimits.for_site(cfg), sent_seq=self.actuator.seq,
            on_meter=None if self.campus is None else self.campus.on_meter,
            on_online=self._back_online,
        )
        self.transport = Transport(
            cfg.broker,
            client_id=f"mineops-controller-{cfg.site_id}",
            subscriptions=self.ingest.subscriptions(),
            will=LastWill(self.topics.controller_availability, OFFLINE.encode()),
            on_connect=self._on_connect,
            on_disconnect=self.actuator.forget,
            on_close=self._on_close,
            # The broker queues grid events (QoS 1) for the controller while it is away.
            persistent_session=True,
        )
        self._trigger = asyncio.Event()
        self._trigger_why = "start"
        self._background: set[asyncio.Task[None]] = set()
        self.metrics.attach(SiteCollector(
            site_id=cfg.site_id, fleet=self.fleet, per_miner=cfg.metrics.per_miner,
            stale_s=pc.telemetry_stale_s, snapshot=lambda: self.snapshot,
            energy=self.metrics.energy, link=self.transport.status,
            per_group=cfg.metrics.per_group, aux_fraction=cfg.energy.aux_fraction,
        ))
        if self.campus is not None:
            self.metrics.attach(CampusCollector(link=self.campus, snapshot=lambda: self.snapshot))
        journal = self.grid.journal
        self.metrics.attach(LoopCollector(
            status=lambda: self.loop_status, guard=self.guard,
            journal=lambda: (journal.pending, journal.write_errors, journal.samples_dropped),
            clock=lambda: (self.grid.clock.steps, self.grid.clock.offset_s),
            resends=lambda: dict(self.resends),
            decision_failures=lambda: self.decision_failures,
        ))

    # -- inputs in force --------------------------------------------------------

    def price(self) -> PriceInForce:
        """The price a decision made now would plan with, and its parts."""
        return price_in_force(
            self.fleet.site, now_monotonic_s=time.monotonic(), now_unix_s=self.wall_clock(),
            default_usd_per_mwh=self.cfg.energy.default_price_usd_per_mwh,
            adders_usd_per_mwh=self.cfg.energy.adders_usd_per_mwh,
            bounds=self.ingest.limits.price_bounds)

    def hashprice_usd_per_ph_day(self) -> float:
        """The feed's hashprice, else the site file's."""
        feed = self.fleet.site.hashprice_usd_per_ph_day
        return self.cfg.hashprice_usd_per_ph_day if feed is None else feed

    def site_cap_w(self) -> float:
        """The configured site cap, incl. auxiliary load."""
        return self.cfg.power_cap_kw * 1000.0

    def meter_w(self, now: float) -> float | None:
        """The site meter's reading if fresh, W; None otherwise (never a plan in its place)."""
        site = self.fleet.site
        if now - site.meter_at <= self.cfg.policy.telemetry_stale_s \
                and not math.isnan(site.meter_power_w):
            return site.meter_power_w
        return None

    # -- ingest -------------------------------------------------------------------

    def trigger(self, why: str) -> None:
        """Ask for a decision now rather than at the next tick."""
        self._trigger_why = why
        self._trigger.set()

    def on_message(self, topic: str, raw: bytes) -> None:
        """Validate and apply one message (see `Ingest.on_message`)."""
        self.ingest.on_message(topic, raw)

    def on_telemetry(self, messages: list[tuple[str, bytes]]) -> None:
        """Validate and apply queued telemetry together (see `Ingest.on_telemetry`)."""
        self.ingest.on_telemetry(messages)

    def _prepare_again(self) -> None:
        # The step order depends on every row: prepare again (rare: retained, per session).
        self.prepared = prepare(self.fleet.points_w, self.fleet.points_ths)
        self.policy_state.level = np.minimum(self.policy_state.level, self.prepared.max_level)
        self.trigger("capabilities")

    def _back_online(self, idx: npt.NDArray[np.intp]) -> None:
        """Miners announced online (a rack or bridge reconnected): send their setpoints again.

        Commands sent while they were away may never have reached them (a restarted
        broker keeps no session for them).
        """
        self.actuator.forget(idx)
        self.resends["back_online"] += int(idx.size)
        self.trigger("online")

    # -- decide and act -----------------------------------------------------------

    def _shed_now(self, mask: npt.NDArray[np.bool_]) -> None:
        """Sleep the groups of the miners in `mask` now: one site-wide broadcast message."""
        idx = np.flatnonzero(mask)
        seq = self.actuator.mark_sleep(idx, time.monotonic())
        groups = sorted({self.fleet.groups[g] for g in np.unique(self.fleet.group_idx[idx])})
        cmd = FleetCommand(seq=seq, ts=self.wall_clock(), all=Setpoint(action="sleep"),
                           groups=None if len(groups) == len(self.fleet.groups) else groups)
        self._send([(self.topics.fleet_cmd, cmd.encode())])

    def _send(self, messages: list[tuple[str, bytes]], *, retain: bool = False,
              commands: bool = True) -> None:
        """Publish `messages` (topic, payload) at QoS 1 without waiting for the broker.

        The broker's acknowledgements arrive in the same TCP stream as everything it
        sends us: under a telemetry flood each waits behind thousands of messages, and
        a decision that awaited them could not decide again for seconds (a grid
        target came in late). The messages are written now, in order, before the
        decision goes on (`Transport.publish_now`: not on later turns of a loop busy
        with telemetry); if one is not acknowledged, every miner's command is sent again
        at the next decision.
        """
        acks = [self.transport.publish_now(topic, payload, qos=1, retain=retain)
                for topic, payload in messages]
        task = asyncio.get_running_loop().create_task(self._confirm(acks, commands))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _confirm(self, acks: list[asyncio.Future[bool]], commands: bool) -> None:
        results = await asyncio.gather(*acks)
        if commands:
            self.metrics.command_messages.inc(len(acks))
            if not all(results):
                self.actuator.forget()  # some did not go out: re-send all once reconnected

    async def _on_connect(self) -> None:
        await self.transport.publish(self.topics.controller_availability, ONLINE, qos=1,
                                     retain=True)
        self.actuator.forget()
        self.trigger("connect")

    def _genset_frequency(self, hz: float) -> None:
        """An islanded campus's genset frequency: the grid's, for the under-frequency shed."""
        change = self.grid.frequency(hz, time.time())
        if change == "shed":
            self._shed_now(self.grid.frequency_shed)
        if change:
            self.trigger("frequency")

    def _cap(self, ob: Obligation) -> CapInForce:
        site_w = self.site_cap_w()
        in_force = min(site_w, ob.cap_w)
        return CapInForce(
            site_w=site_w, in_force_w=in_force,
            planning_w=in_force * (1.0 - self.cfg.policy.cap_headroom_fraction),
            source=_cap_source(ob, site_w, self.grid.frequency_event is not None))

    def _decide(self, now: float, price: PriceInForce, hashprice: float, cap: CapInForce,
                ob: Obligation, *, campus: CampusPicture | None = None) -> Decision:
        fleet = self.fleet
        market = MarketInputs(
            price_usd_per_mwh=price.total_usd_per_mwh,
            hashprice_usd_per_ph_day=hashprice,
            cap_w=cap.planning_w,
            aux_fraction=self.cfg.energy.aux_fraction,
            cap_is_grid=cap.source != "site" or ob.force_sleep is not None,
            cost_steps=None if campus is None else campus.curve.steps(),
        )
        miners = MinerInputs(
            stale=fleet.stale(now, self.cfg.policy.telemetry_stale_s),
            never_curtail=fleet.never_curtail, temp_c=fleet.temp_c, priority=fleet.priority,
            wake_s=fleet.wake_s, offline=fleet.announced_offline, force_sleep=ob.force_sleep)
        return decide(self.prepared, market, miners, self.policy_state, self.knobs, now_s=now)

    def _actuate(self, decision: Decision, now: float) -> int:
        """Send the commands the decision needs; the number of setpoints sent."""
        commands, sent = self.actuator.plan(
            decision.level, decision.power_w, decision.commandable, self.fleet.ack_seq, now)
        if not commands:
            return 0
        self._send([(self.topics.fleet_cmd if g is None else self.topics.group(g, "cmd"), payload)
                    for g, payload in commands])
        self.metrics.commands.inc(int(sent.size))
        return int(sent.size)

    @staticmethod
    def _grid_status(ob: Obligation, planned_w: float, now_ts: float,
                     meter_w: float | None) -> GridEventStatus | None:
        event = ob.event
        if event is None or event.target_w is None or ob.deadline_ts is None:
            return None
        target = event.target_w
        on_plan = planned_w <= target * 1.0001
        met = now_ts < ob.deadline_ts or (meter_w is not None and meter_w <= target * 1.005)
        return GridEventStatus(id=event.id, kind=event.kind, target_w=target,
                               deadline_unix_s=ob.deadline_ts, on_track=on_plan and met,
                               end_unix_s=event.payload.get("end_ts"))

    def _snapshot(self, *, why: str, started: float, now: float, now_ts: float,
                  decision: Decision, price: PriceInForce, hashprice: float, cap: CapInForce,
                  grid_event: GridEventStatus | None, sent: int,
                  campus: CampusPicture | None = None) -> DecisionSnapshot:
        fleet, site = self.fleet, self.fleet.site
        stale_s = self.cfg.policy.telemetry_stale_s
        view = fleet.view_states(now, stale_s)
        fresh = ~fleet.stale(now, stale_s)
        n_groups = len(fleet.groups)
        # What fresh miners report; a value a miner does not know (NaN) adds nothing.
        power = np.where(fresh & ~np.isnan(fleet.power_w), fleet.power_w, 0.0)
        ths = np.where(fresh & ~np.isnan(fleet.hashrate_ths), fleet.hashrate_ths, 0.0)
        group_power = np.bincount(fleet.group_idx, weights=power,
                                  minlength=n_groups).astype(np.float64)
        group_ths = np.bincount(fleet.group_idx, weights=ths,
                                minlength=n_groups).astype(np.float64)
        meter_fresh = now - site.meter_at <= stale_s and not math.isnan(site.meter_power_w)
        self.decisions += 1
        return DecisionSnapshot(
            seq=self.decisions, trigger=why, at_unix_s=now_ts,
            duration_s=time.perf_counter() - started, price=price,
            hashprice_usd_per_ph_day=hashprice, cap=cap, grid_event=grid_event,
            planned_site_power_w=decision.site_power_w, planned_power_w=decision.power_w,
            reason=decision.reason, view_state=view,
            measured_site_power_w=site.meter_power_w if meter_fresh else None,
            meter_reading_unix_s=now_ts - (now - site.meter_at) if meter_fresh else None,
            frequency_hz=None if math.isnan(site.frequency_hz) else site.frequency_hz,
            fleet_power_w=float(group_power.sum()), fleet_hashrate_ths=float(group_ths.sum()),
            group_power_w=group_power, group_hashrate_ths=group_ths,
            commands_sent=sent, infeasible=decision.infeasible, campus=campus,
        )

    async def decide_and_act(self, why: str) -> DecisionSnapshot:
        """One cycle: read the inputs in force, decide, send what changed, snapshot it."""
        started = time.perf_counter()
        now, now_ts = time.monotonic(), self.wall_clock()
        price = self.price()
        hashprice = self.hashprice_usd_per_ph_day()
        site_w = self.meter_w(now)
        pc = self.cfg.policy
        view = telemetry_view(self.fleet, now_s=now, stale_s=pc.telemetry_stale_s,
                              aux_fraction=self.cfg.energy.aux_fraction,
                              planned_w=self._last_plan,
                              acked=self.actuator.acked(self.fleet.ack_seq))
        ob = self.grid.obligation(now_ts, site_w, self.site_cap_w(), now_mono=now,
                                  meter_at=self.fleet.site.meter_at, least_w=view.least_w)
        cap, campus = self._cap(ob), None
        if self.campus is not None:
            last = None if self.snapshot is None else self.snapshot.planned_site_power_w
            cap, campus = self.campus.cap_in_force(cap, ob, price, last)
        # On a campus the meter sees the other parts too: the guard holds the miners'
        # measured share against the miners' cap.
        guard_w = site_w if campus is None or site_w is None else (
            site_w - campus.others_measured_w)
        loop = self.guard.observe(now, meter_w=guard_w,
                                  meter_seen=math.isfinite(self.fleet.site.meter_at),
                                  telemetry=view, cap_in_force_w=cap.in_force_w,
                                  planning_w=cap.planning_w)
        self.loop_status = loop
        if loop.resend:
            self.actuator.forget()
            self.resends["over_cap"] += self.fleet.n
        restarted = self.fleet.take_restarted()
        if restarted.size:
            # Their acknowledged sequence went back: they forgot what they were told.
            log.warning("miners_restarted", miners=int(restarted.size),
                        first=self.fleet.ids[int(restarted[0])])
            self.actuator.forget(restarted)
            self.resends["sequence_restart"] += int(restarted.size)
        if loop.trim_w > 0:
            cap = dataclasses.replace(cap, planning_w=max(0.0, cap.planning_w - loop.trim_w))
        decision = self._decide(now, price, hashprice, cap, ob, campus=campus)
        self._last_plan = decision.power_w
        if self.campus is not None and campus is not None:
            self.campus.decided_at(campus, price, ob, decision.site_power_w)
        sent = self._actuate(decision, now)
        planned_w = decision.site_power_w  # a grid target on a campus is on net import
        if campus is not None and (net_w := campus.net_import_w_at(planned_w)) is not None:
            planned_w = net_w
        grid_event = self._grid_status(ob, planned_w, now_ts, site_w)
        snap = self._snapshot(why=why, started=started, now=now, now_ts=now_ts,
                              decision=decision, price=price, hashprice=hashprice, cap=cap,
                              grid_event=grid_event, sent=sent, campus=campus)
        self.snapshot = snap
        self.metrics.decision_seconds.observe(snap.duration_s)
        self.metrics.decisions.labels(why).inc()
        summary = snap.summary()
        if self.site_clock is not None:
            t = self.site_clock()
            summary = summary.model_copy(update={
                "site_ts": t.site_ts, "site_speed": t.speed, "site_timezone": t.timezone})
        self.summary = summary
        self._send([(self.topics.decision, summary.encode())], retain=True, commands=False)
        if sent:
            log.info("decision", trigger=why, price_usd_per_mwh=round(price.total_usd_per_mwh, 2),
                     planned_kw=round(decision.site_power_w / 1000, 1),
                     cap_kw=round(cap.planning_w / 1000, 1), cap_source=cap.source,
                     commands=sent, reasons=summary.miners_by_reason)
        return snap

    async def _decide_forever(self) -> None:
        interval = self.cfg.policy.decision_interval_s
        # Retained price and availability arrive right after connecting: deciding before
        # them would sleep the fleet on the cautious default price, then wake it again.
        grace_s = max(2.0, 2 * interval)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                while self.fleet.site.market_price_usd_per_mwh is None:  # noqa: ASYNC110 - once, at start
                    await asyncio.sleep(0.05)
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns normally when the
            # trigger fires in the loop iteration that cancels this task, and this loop
            # then never stops (controller/cancellation.py).
            wait_s, why_else, now_ts = interval, "tick", self.wall_clock()
            change = self.grid.next_change_ts(now_ts)
            if change is not None and change - now_ts < wait_s:
                # A millisecond past the boundary, so the decision sees the event in force.
                wait_s, why_else = change - now_ts + 0.001, "grid"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._trigger.wait()
            why = self._trigger_why if self._trigger.is_set() else why_else
            self._trigger.clear()
            try:
                await self.decide_and_act(why)
            except Exception:
                # Keep deciding: a failed cycle is retried at the next tick.
                self.decision_failures += 1
                log.exception("decision_failed", trigger=why)

    async def run(self) -> None:
        """Run until cancelled; 'offline' is published on a clean stop, the last will on a crash."""
        log.info("controller_starting", site=self.cfg.site_id, miners=self.fleet.n,
                 cap_kw=self.cfg.power_cap_kw, broker=f"{self.cfg.broker.host}:"
                 f"{self.cfg.broker.port}")
        try:
            await self._run_tasks()
        finally:
            # Acknowledgements still awaited: the messages went out or will be sent again.
            pending = list(self._background)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _run_tasks(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.transport.run(self.on_message, self.on_telemetry),
                           name="controller-mqtt")
            tg.create_task(self._decide_forever(), name="controller-decide")
            if self.campus is not None:
                tg.create_task(self.campus.run(), name="controller-campus")
            # systemd (Type=notify): READY=1 after the first connect, watchdog pings from
            # this event loop; does nothing without $NOTIFY_SOCKET.
            tg.create_task(supervise(self.transport.connected), name="controller-systemd")

    async def _on_close(self) -> None:
        await self.transport.publish(self.topics.controller_availability, OFFLINE, qos=1,
                                     retain=True)

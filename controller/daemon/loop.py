"""The controller: ingest -> fleet state -> decide (optimizer + policy) -> actuate -> snapshot.

One asyncio task reads MQTT and updates state (`Ingest`); one loop decides on a tick,
or at once when a trigger (a new price, a grid event, a reconnect) asks for it. Each
cycle re-reads the state, plans from scratch, sends only what changed and ends in one
frozen `DecisionSnapshot` that metrics, the decision topic and the live views read.
A missed message or a restart costs one cycle, not correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import numpy as np
import numpy.typing as npt
import structlog

from controller.config import SiteConfig
from controller.core.actuation import Actuator
from controller.core.fleet_state import FleetState
from controller.core.optimizer import prepare
from controller.core.policy import (
    Decision,
    MarketInputs,
    MinerInputs,
    PolicyKnobs,
    PolicyState,
    decide,
)
from controller.core.prices import PriceInForce, price_in_force
from controller.daemon.ingest import Ingest
from controller.daemon.metrics import Metrics, SiteCollector
from controller.daemon.snapshot import CapInForce, CapSource, DecisionSnapshot, GridEventStatus
from controller.daemon.systemd import supervise
from controller.grid.journal import GridJournal
from controller.grid.obligations import GridObligations, GridRules, Obligation
from controller.protocol.payloads import FleetCommand, Setpoint
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


class Controller:
    """A site's controller; `run()` until cancelled. `snapshot` is the latest decision."""

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
        self.grid = _grid_obligations(cfg, self.fleet)
        self.metrics = metrics or Metrics()
        self.snapshot: DecisionSnapshot | None = None
        self.decisions = 0
        self.ingest = Ingest(
            topics=self.topics, fleet=self.fleet, grid=self.grid,
            meters=MeterRouter(cfg.meters),
            site_meter_ids={m.id for m in cfg.meters if m.role == "site"},
            metrics=self.metrics, on_change=self.trigger, on_shed=self._shed_now,
            on_points_changed=self._prepare_again,
        )
        self.transport = Transport(
            cfg.broker,
            client_id=f"mineops-controller-{cfg.site_id}",
            subscriptions=self.ingest.subscriptions(),
            will=LastWill(self.topics.controller_availability, OFFLINE.encode()),
            on_connect=self._on_connect,
            on_disconnect=self.actuator.forget,
            on_close=self._on_close,
        )
        self._trigger = asyncio.Event()
        self._trigger_why = "start"
        self._background: set[asyncio.Task[None]] = set()
        self.metrics.attach(SiteCollector(
            site_id=cfg.site_id, fleet=self.fleet, per_miner=cfg.metrics.per_miner,
            stale_s=pc.telemetry_stale_s, snapshot=lambda: self.snapshot,
            energy=self.metrics.energy, link=self.transport.status,
            per_group=cfg.metrics.per_group,
        ))

    # -- inputs in force --------------------------------------------------------

    def price(self) -> PriceInForce:
        """The price a decision made now would plan with, and its parts."""
        return price_in_force(
            self.fleet.site, now_monotonic_s=time.monotonic(), now_unix_s=time.time(),
            default_usd_per_mwh=self.cfg.energy.default_price_usd_per_mwh,
            adders_usd_per_mwh=self.cfg.energy.adders_usd_per_mwh)

    def hashprice_usd_per_ph_day(self) -> float:
        """The feed's hashprice, else the site file's."""
        feed = self.fleet.site.hashprice_usd_per_ph_day
        return self.cfg.hashprice_usd_per_ph_day if feed is None else feed

    def site_cap_w(self) -> float:
        """The configured site cap, incl. auxiliary load."""
        return self.cfg.power_cap_kw * 1000.0

    def site_power_w(self, now: float) -> float | None:
        """Site power as best known: a fresh meter reading, else the last plan (None: unknown)."""
        site = self.fleet.site
        if now - site.meter_at <= self.cfg.policy.telemetry_stale_s:
            return site.meter_power_w
        return None if self.snapshot is None else self.snapshot.planned_site_power_w

    # -- ingest -------------------------------------------------------------------

    def trigger(self, why: str) -> None:
        """Ask for a decision now rather than at the next tick."""
        self._trigger_why = why
        self._trigger.set()

    def on_message(self, topic: str, raw: bytes) -> None:
        """Validate and apply one message (see `Ingest.on_message`)."""
        self.ingest.on_message(topic, raw)

    def _prepare_again(self) -> None:
        # The step order depends on every row: prepare again (rare: retained, per session).
        self.prepared = prepare(self.fleet.points_w, self.fleet.points_ths)
        self.policy_state.level = np.minimum(self.policy_state.level, self.prepared.max_level)
        self.trigger("capabilities")

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

    async def _on_connect(self) -> None:
        await self.transport.publish(self.topics.controller_availability, ONLINE, qos=1,
                                     retain=True)
        self.actuator.forget()
        self.trigger("connect")

    def _cap(self, ob: Obligation) -> CapInForce:
        site_w = self.site_cap_w()
        in_force = min(site_w, ob.cap_w)
        return CapInForce(
            site_w=site_w, in_force_w=in_force,
            planning_w=in_force * (1.0 - self.cfg.policy.cap_headroom_fraction),
            source=_cap_source(ob, site_w, self.grid.frequency_event is not None))

    def _decide(self, now: float, price: PriceInForce, hashprice: float, cap: CapInForce,
                ob: Obligation) -> Decision:
        fleet = self.fleet
        market = MarketInputs(
            price_usd_per_mwh=price.total_usd_per_mwh,
            hashprice_usd_per_ph_day=hashprice,
            cap_w=cap.planning_w,
            aux_fraction=self.cfg.energy.aux_fraction,
            cap_is_grid=cap.source != "site" or ob.force_sleep is not None,
        )
        miners = MinerInputs(
            stale=fleet.stale(now, self.cfg.policy.telemetry_stale_s),
            never_curtail=fleet.never_curtail, temp_c=fleet.temp_c, priority=fleet.priority,
            wake_s=fleet.wake_s, offline=fleet.announced_offline, force_sleep=ob.force_sleep)
        return decide(self.prepared, market, miners, self.policy_state, self.knobs, now_s=now)

    async def _actuate(self, decision: Decision, now: float) -> int:
        """Send the commands the decision needs; the number of setpoints sent."""
        commands, sent = self.actuator.plan(
            decision.level, decision.power_w, decision.commandable, self.fleet.ack_seq, now)
        if not commands:
            return 0
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
                  grid_event: GridEventStatus | None, sent: int) -> DecisionSnapshot:
        fleet, site = self.fleet, self.fleet.site
        stale_s = self.cfg.policy.telemetry_stale_s
        view = fleet.view_states(now, stale_s)
        fresh = ~fleet.stale(now, stale_s)
        n_groups = len(fleet.groups)
        group_power = np.bincount(fleet.group_idx, weights=np.where(fresh, fleet.power_w, 0.0),
                                  minlength=n_groups).astype(np.float64)
        group_ths = np.bincount(fleet.group_idx,
                                weights=np.where(fresh, fleet.hashrate_ths, 0.0),
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
            commands_sent=sent, infeasible=decision.infeasible,
        )

    async def decide_and_act(self, why: str) -> DecisionSnapshot:
        """One cycle: read the inputs in force, decide, send what changed, snapshot it."""
        started = time.perf_counter()
        now, now_ts = time.monotonic(), time.time()
        price = self.price()
        hashprice = self.hashprice_usd_per_ph_day()
        site_w = self.site_power_w(now)
        ob = self.grid.obligation(now_ts, site_w, self.site_cap_w())
        cap = self._cap(ob)
        decision = self._decide(now, price, hashprice, cap, ob)
        sent = await self._actuate(decision, now)
        grid_event = self._grid_status(ob, decision.site_power_w, now_ts, site_w)
        snap = self._snapshot(why=why, started=started, now=now, now_ts=now_ts,
                              decision=decision, price=price, hashprice=hashprice, cap=cap,
                              grid_event=grid_event, sent=sent)
        self.snapshot = snap
        self.metrics.decision_seconds.observe(snap.duration_s)
        self.metrics.decisions.labels(why).inc()
        summary = snap.summary()
        await self.transport.publish(self.topics.decision, summary.encode(), qos=1, retain=True)
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

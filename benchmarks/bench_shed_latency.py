"""How fast does the site shed? Grid event / frequency dip -> the last simulated miner applied it.

Runs, through a real mosquitto on 127.0.0.1, `mineops simulate` (racked telemetry
every 5 s, as in operation) and `mineops run` as their own processes; here a client
publishes grid signals and reads the controller's decisions, and the simulator's
`--apply-log` says when each command message was applied to its miners. For each
fleet size and trial it measures the time from publishing

- a grid event (`target_kw` at half the planned site power, in force at once) until
  the simulated miners have applied every setpoint of the decision it causes (the
  decision's `commands_sent` must all be applied, or the trial counts as failed), and
- a meter reading at 59.5 Hz until every miner has applied the broadcast shed,

then cancels the event / lets the frequency recover and waits for the fleet to be
commanded back up. Each event trial is split into the controller's part (publish ->
the simulator receives the command: broker, queue, decide, encode, broker) and the
simulator's (decode and apply). Prints true p50/p90/p99 over every trial (numpy's
linear interpolation) and the max; last, one JSON line.

Targets (Scale issue; ERCOT fast frequency response acts within 15 cycles): event p99
under 100 ms at 100,000 miners and under 250 ms at 300,000.

    python benchmarks/bench_shed_latency.py [--sizes 100000 300000] [--trials 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from site_rig import ApplyLog, Rig, percentiles, timed

from controller.config import BrokerConfig
from controller.protocol.payloads import (
    DecisionSummary,
    GridEvent,
    MeterTelemetry,
    PriceSignal,
    decode,
)
from controller.protocol.topics import SiteTopics
from controller.protocol.transport import Transport

T = SiteTopics("bench")
TARGET_P99_MS = {100_000: 100.0, 300_000: 250.0}
TRIAL_TIMEOUT_S = 15.0


@dataclass
class Client:
    """Publishes grid signals; keeps every decision summary with its arrival time."""

    port: int
    decisions: list[tuple[float, DecisionSummary]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.transport = Transport(BrokerConfig(port=self.port),
                                   client_id=f"bench-shed-{os.getpid()}",
                                   subscriptions=[T.decision])

    def on_message(self, _topic: str, raw: bytes) -> None:
        self.decisions.append((time.monotonic(), decode(DecisionSummary, raw)))

    def after(self, t: float, trigger: str) -> DecisionSummary | None:
        """The first decision with this trigger that arrived after monotonic `t`."""
        return next((d for at, d in self.decisions if at >= t and d.trigger == trigger), None)


@dataclass
class Completion:
    """The first command (sequence number) applied after t0, once all its miners are."""

    latency_ms: float  # t0 -> the last miner applied it
    received_ms: float  # t0 -> the simulator began to handle its first message
    apply_ms: float  # the simulator's decode and apply, summed over its messages
    messages: int
    miners: int
    queued_ms: float = float("nan")  # t0 -> the decision began (broker, queue, journal)
    decide_ms: float = float("nan")  # the decision: decide, encode, publish


class Trials:
    """Runs the trials: publishes, then waits on decisions and the apply log."""

    def __init__(self, n: int, rig: Rig, client: Client) -> None:
        self.n = n
        self.rig = rig
        self.client = client
        self.log = ApplyLog(rig.apply_log)
        self.last_seq = -1

    async def wait(self, cond: Callable[[], object], what: str,
                   timeout_s: float = TRIAL_TIMEOUT_S) -> object:
        """Poll `cond` (reading the apply log) until it returns something truthy."""
        deadline = time.monotonic() + timeout_s
        while not (got := cond()):
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            self.rig.check_alive()
            await asyncio.sleep(0.002)
            self.log.poll()
        return got

    def applied(self, t0: float, miners: int) -> Completion | None:
        """The first new command after t0, once `miners` setpoints of it are applied."""
        new = [e for e in self.log.entries if e["received_s"] >= t0 and e["seq"] > self.last_seq]
        if not new:
            return None
        seq = int(min(e["seq"] for e in new))
        mine = [e for e in new if e["seq"] == seq]
        got = sum(int(e["miners"]) for e in mine)
        if got < miners:
            return None
        self.last_seq = seq
        return Completion(
            latency_ms=(max(e["applied_s"] for e in mine) - t0) * 1e3,
            received_ms=(min(e["received_s"] for e in mine) - t0) * 1e3,
            apply_ms=sum(e["applied_s"] - e["received_s"] for e in mine) * 1e3,
            messages=len(mine), miners=got)

    async def decision_applied(self, t0: float, trigger: str
                               ) -> tuple[Completion, DecisionSummary]:
        """The first decision by `trigger` after t0 that sends setpoints, once all are applied."""
        d = await self.wait(lambda: next(
            (d for at, d in self.client.decisions
             if at >= t0 and d.trigger == trigger and d.commands_sent > 0), None),
            f"a {trigger} decision that sends setpoints")
        assert isinstance(d, DecisionSummary)
        done = await self.wait(lambda: self.applied(t0, d.commands_sent),
                               f"{d.commands_sent} setpoints of the {trigger} decision applied")
        assert isinstance(done, Completion)
        return done, d

    def sync(self) -> None:
        """Everything applied so far is not the next trial's."""
        self.log.poll()
        self.last_seq = int(max((e["seq"] for e in self.log.entries), default=-1))

    async def start(self) -> None:
        """Until every miner reports and is commanded: nudge decisions with price updates."""
        pub, started = self.client.transport, time.monotonic()
        i = 0
        while not any(d.miners_by_state.get("offline", self.n) == 0 and d.commands_sent == 0
                      for _, d in self.client.decisions[-3:]):
            if time.monotonic() - started > 600:
                raise TimeoutError("the site did not start within 10 minutes")
            self.rig.check_alive()
            # $5/MWh and a hair more: every miner runs at full power either way.
            price = PriceSignal(ts=time.time(), price_usd_per_mwh=5.0 + 0.01 * (i % 2))
            await pub.publish(T.price, price.encode(), qos=1, retain=True)
            i += 1
            await asyncio.sleep(3.0)
        self.sync()

    async def event(self, i: int) -> Completion:
        """A grid event at half the planned power: its setpoints all applied; then cancel."""
        planned_w = self.client.decisions[-1][1].planned_site_power_w
        pub = self.client.transport
        self.sync()
        ev = GridEvent(id=f"bench-{self.n}-{i}", kind="target_kw",
                       value_kw=round(planned_w * 0.5 / 1000, 1), start_ts=time.time() - 1,
                       end_ts=time.time() + 3600, source="bench")
        t0, t0_unix = time.monotonic(), time.time()
        await pub.publish(T.grid, ev.encode(), qos=1)
        done, d = await self.decision_applied(t0, "grid")
        done.queued_ms = (d.ts - t0_unix) * 1e3
        done.decide_ms = d.duration_s * 1e3
        t1 = time.monotonic()
        await pub.publish(T.grid, ev.model_copy(update={"cancelled": True}).encode(), qos=1)
        await self.decision_applied(t1, "grid")  # back to full power
        return done

    async def frequency(self) -> Completion:
        """A 59.5 Hz reading: the broadcast applied to every miner; then the restore."""
        planned_w = self.client.decisions[-1][1].planned_site_power_w
        self.sync()
        dip = MeterTelemetry(ts=time.time(), power_w=planned_w, frequency_hz=59.5)
        t0 = time.monotonic()
        await self.client.transport.publish(T.meter("poi"), dip.encode())
        done = await self.wait(lambda: self.applied(t0, self.n), "the broadcast shed applied")
        assert isinstance(done, Completion)
        # The simulator's own meter reads 60 Hz again: restored after the hold.
        await self.decision_applied(t0, "frequency")
        return done


async def measure(n: int, trials: int, rack: int) -> dict[str, object]:
    rig = Rig(n, simulate=["--speed", "100", "--telemetry-interval", "5"], site={"rack": rack})
    with rig:
        client = Client(rig.broker.port)
        task = asyncio.create_task(client.transport.run(client.on_message))
        t = Trials(n, rig, client)
        event: list[Completion] = []
        freq: list[Completion] = []
        failed = {"event": 0, "frequency": 0}
        try:
            await client.transport.connected.wait()
            with timed("every miner reporting and commanded"):
                await t.start()
            for i in range(trials):
                for kind, trial, out in (("event", lambda i=i: t.event(i), event),
                                         ("frequency", t.frequency, freq)):
                    try:
                        out.append(await trial())
                    except TimeoutError as e:
                        failed[kind] += 1
                        print(f"  {kind} trial {i}: timed out waiting for {e}", flush=True)
                        await asyncio.sleep(5.0)
                await asyncio.sleep(0.2)
                if (i + 1) % 10 == 0:
                    print(f"  {i + 1} trials", flush=True)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return {
        "event": percentiles([c.latency_ms for c in event]),
        "event_controller": percentiles([c.received_ms for c in event]),
        "event_queued": percentiles([c.queued_ms for c in event]),
        "event_decide": percentiles([c.decide_ms for c in event]),
        "event_simulator": percentiles([c.apply_ms for c in event]),
        "frequency": percentiles([c.latency_ms for c in freq]),
        # Where the slowest trials' time went: before the decision, in it, from its end
        # to the simulator (mosquitto, the simulator's loop; negative when the command,
        # written as soon as it is built, arrived before the decision finished its
        # snapshot), in the simulator.
        "event_slowest": [
            {"total": round(c.latency_ms, 1), "queued": round(c.queued_ms, 1),
             "decide": round(c.decide_ms, 1),
             "to_sim": round(c.received_ms - c.queued_ms - c.decide_ms, 1),
             "sim": round(c.latency_ms - c.received_ms, 1)}
            for c in sorted(event, key=lambda c: -c.latency_ms)[:5]],
        "event_messages": max((c.messages for c in event), default=0),
        "event_miners": max((c.miners for c in event), default=0),
        "trials": len(event), "frequency_trials": len(freq), "failed": failed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--rack", type=int, default=40, help="miners per rack (default 40)")
    args = ap.parse_args()
    results: dict[str, float] = {}
    rows = []
    for n in args.sizes:
        print(f"{n:,} miners in racks of {args.rack}:", flush=True)
        r = asyncio.run(measure(n, args.trials, args.rack))
        rows.append((n, r))
        key = f"{n // 1000}k"
        for name in ("event", "event_controller", "event_queued", "event_decide",
                     "event_simulator", "frequency"):
            for q, v in r[name].items():  # type: ignore[attr-defined]
                results[f"{name}_{key}_{q}_ms"] = round(v, 1)
        results[f"trials_{key}"] = r["trials"]  # type: ignore[assignment]
        results[f"failed_{key}"] = sum(r["failed"].values())  # type: ignore[attr-defined]
        results[f"event_slowest_{key}"] = r["event_slowest"]  # type: ignore[assignment]
    print(f"\n{'miners':>8} {'what':<28} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}  ms")
    for n, r in rows:
        for name, what in (("event", "grid event -> all applied"),
                           ("event_controller", "  publish -> sim receives"),
                           ("event_queued", "    publish -> decision starts"),
                           ("event_decide", "    decide + send"),
                           ("event_simulator", "  sim decode + apply"),
                           ("frequency", "59.5 Hz -> all applied")):
            p = r[name]
            print(f"{n:8,d} {what:<28} {p['p50']:7.1f} {p['p90']:7.1f} "  # type: ignore[index]
                  f"{p['p99']:7.1f} {p['max']:7.1f}")  # type: ignore[index]
        target = TARGET_P99_MS.get(n)
        p99 = r["event"]["p99"]  # type: ignore[index]
        verdict = "" if target is None else (
            f"; target p99 < {target:.0f} ms: {'met' if p99 < target else 'NOT met'}")
        for slow in r["event_slowest"]:  # type: ignore[attr-defined]
            print(f"{'':8} slow event trial: " + ", ".join(f"{k} {v:.1f}" for k, v in slow.items()))
        print(f"{'':8} {r['trials']} event / {r['frequency_trials']} frequency trials, failed "
              f"{r['failed']}; an event's command: {r['event_messages']} message(s) for "
              f"{r['event_miners']:,} miners{verdict}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""`mineops events`: list grid events, export their compliance records, send and cancel.

Records come from the site's grid journal (`[grid] journal_path`, written by the
controller). Times are ISO 8601 with their UTC offset (UTC unless `--timezone`), power in
kW, energy in kWh. An event is judged only once it has ended: while it runs it is
"in progress"; one whose deadline had already passed when the controller received it
is marked "deadline past at arrival" and not judged, since no site could have met it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import time
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from controller.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, Subparsers
from controller.config import SiteConfig
from controller.grid.journal import EventRow, GridJournal
from controller.grid.standing import compliance, complied, deadline_ts
from controller.protocol.payloads import GridEvent
from controller.protocol.topics import SiteTopics
from controller.protocol.transport import Transport
from controller.site_file import load_config
from controller.view.clock import zone
from controller.view.progress import progress, wanted

FIELDS = ("id", "kind", "status", "compliance", "source", "received", "start", "end",
          "deadline", "notice_s", "value_kw", "baseline_kw", "target_kw", "reached",
          "time_to_target_s", "curtailed_kwh", "samples_after_deadline", "violations",
          "complied")
# `events send` without --start-in: five minutes' notice, more if the site needs more than
# four to prepare (grid.prepare_s). With none, the deadline passes while the message is
# on its way and no site can comply.
DEFAULT_NOTICE_S = 300.0


def add_parser(sub: Subparsers) -> None:
    """Register `events`."""
    p = sub.add_parser(
        "events", help="grid events: list, export compliance records, send or cancel",
        description="Read the site's grid-event journal ([grid] journal_path), or publish an "
        "operator's event to the site's grid topic. Times are ISO 8601 with their offset.")
    p.add_argument("action", choices=["list", "export", "send", "cancel"],
                   help="list: one line per event; export: CSV or JSON for settlement; "
                   "send/cancel: publish an operator's event to the site's grid topic")
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="site TOML file")
    p.add_argument("--format", choices=["csv", "json"], default="csv", help="export format")
    p.add_argument("--out", type=Path, metavar="FILE", help="write here (default: stdout)")
    p.add_argument("--samples", action="store_true",
                   help="JSON only: include the meter samples of each event")
    p.add_argument("--timezone", metavar="ZONE",
                   help="show times in this IANA zone, e.g. America/Chicago (default: UTC)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="export: a progress bar on stderr (auto: when stderr is a terminal)")
    send = p.add_argument_group("send/cancel")
    send.add_argument("--id", help="event id (default: operator-<unix time>)")
    send.add_argument("--kind", choices=["target_kw", "shed_kw", "emergency", "peak"],
                      default="target_kw")
    send.add_argument("--value-kw", type=float, help="target (target_kw, peak) or shed amount")
    send.add_argument("--start-in", type=float, metavar="SECONDS",
                      help="starts (and must be met) this many seconds from now (default: "
                      f"{DEFAULT_NOTICE_S:g}, or grid.prepare_s + 60 if more)")
    send.add_argument("--duration", type=float, default=3600.0, metavar="SECONDS",
                      help="lasts this long (default 3600)")
    p.set_defaults(handler=run)


def iso(ts: float | None, tz: tzinfo = UTC) -> str | None:
    """Unix seconds as ISO 8601 with the offset, e.g. 2024-08-20T19:00:00+00:00."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).astimezone(tz).isoformat(timespec="seconds")


def record(row: EventRow, *, tz: tzinfo = UTC, now_ts: float | None = None) -> dict[str, Any]:
    """One event's settlement record: ISO 8601 times, kW and kWh."""
    now = time.time() if now_ts is None else now_ts
    p = row.payload
    start = p.get("start_ts")
    deadline = deadline_ts(row)
    reached = row.reached_ts
    return {
        "id": row.id, "kind": row.kind, "status": row.status,
        "compliance": compliance(row, now), "source": p.get("source"),
        "received": iso(row.received_ts, tz), "start": iso(start, tz),
        "end": iso(p.get("end_ts"), tz), "deadline": iso(deadline, tz),
        "notice_s": None if deadline is None or row.kind == "frequency"
        else round(deadline - row.received_ts, 3),
        "value_kw": p.get("value_kw"),
        "baseline_kw": None if row.baseline_w is None else round(row.baseline_w / 1e3, 3),
        "target_kw": None if row.target_w is None else round(row.target_w / 1e3, 3),
        "reached": iso(reached, tz),
        "time_to_target_s": None if reached is None or start is None
        else round(max(0.0, reached - start), 3),
        "curtailed_kwh": round(row.curtailed_wh / 1e3, 3),
        "samples_after_deadline": row.samples_after_deadline,
        "violations": row.violations,
        "complied": complied(row, now),
    }


def _send(cfg: SiteConfig, args: argparse.Namespace) -> int:
    """Publish one event (QoS 1, retained) and wait for the broker to take it."""
    now = time.time()
    start_in = (max(DEFAULT_NOTICE_S, cfg.grid.prepare_s + 60.0) if args.start_in is None
                else args.start_in)
    try:
        if args.action == "cancel" and not args.id:
            raise ValueError("cancel needs --id")
        # The send time in ms orders an event's copies (a cancel after its send, a correction
        # after the first try): the controller refuses any copy older than one it has.
        event = GridEvent(
            id=args.id or f"operator-{int(now)}", kind=args.kind, value_kw=args.value_kw,
            start_ts=now + start_in, end_ts=now + start_in + args.duration,
            source="operator-cli", cancelled=args.action == "cancel",
            version=int(now * 1000))
    except (ValueError, ValidationError) as e:
        print(f"mineops: not a valid event: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "send" and start_in <= 0:
        print("mineops: warning: the deadline is already past when the event arrives; it "
              "will be recorded 'deadline past at arrival', not judged", file=sys.stderr)
    elif args.action == "send" and start_in < cfg.grid.prepare_s:
        print(f"mineops: warning: {start_in:g} s of notice is less than grid.prepare_s "
              f"({cfg.grid.prepare_s:g} s) the site takes to reach a target", file=sys.stderr)

    async def publish() -> bool:
        transport = Transport(cfg.broker, client_id=f"mineops-cli-{os.getpid()}",
                              subscriptions=[])
        task = asyncio.create_task(transport.run(lambda *_: None))
        try:
            async with asyncio.timeout(15):
                await transport.connected.wait()
                return await transport.publish(SiteTopics(cfg.site_id).grid, event.encode(),
                                               qos=1, retain=True)
        except TimeoutError:
            return False
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    if not asyncio.run(publish()):
        print(f"mineops: could not publish to {cfg.broker.host}:{cfg.broker.port}",
              file=sys.stderr)
        return EXIT_FAIL
    print(event.model_dump_json())
    if args.action == "send":
        print(f"sent {event.id}: {event.kind} {event.value_kw} kW from "
              f"{iso(event.start_ts)} to {iso(event.end_ts)}", file=sys.stderr)
    return EXIT_OK


def _list(rows: list[EventRow], out: TextIO, tz: tzinfo, now: float) -> None:
    if not rows:
        out.write("no grid events\n")
    for r in rows:
        rec = record(r, tz=tz, now_ts=now)
        target = "" if rec["target_kw"] is None else f"target {rec['target_kw']:g} kW "
        span = f"{rec['start']} to {rec['end']}" if rec["end"] else f"from {rec['start']}"
        out.write(f"{r.id:32} {r.kind:10} {r.status:10} {target}{span}: "
                  f"{rec['compliance']}\n")


def _export(journal: GridJournal | None, rows: list[EventRow], out: TextIO,
            args: argparse.Namespace, *, tz: tzinfo, now: float) -> None:
    show = wanted(args.progress)
    with progress("export", len(rows), enabled=show) as done:
        records = []
        for i, r in enumerate(rows):
            rec = record(r, tz=tz, now_ts=now)
            if args.samples and args.format == "json" and journal is not None:
                rec["samples"] = [
                    {"time": iso(ts, tz), "meter_kw": None if m is None else round(m / 1e3, 3),
                     "target_kw": round(t / 1e3, 3)}
                    for ts, m, t, _ in journal.samples(r.id)
                ]
            records.append(rec)
            done(i + 1)
    if args.format == "json":
        json.dump(records, out, indent=2)
        out.write("\n")
        return
    writer = csv.DictWriter(out, fieldnames=FIELDS)
    writer.writeheader()
    for rec in records:
        writer.writerow(rec)


def run(args: argparse.Namespace) -> int:
    """`mineops events ACTION`: send or cancel an event, or list or export the journal."""
    cfg = load_config(args.config)
    if args.action in ("send", "cancel"):
        return _send(cfg, args)
    try:
        tz = UTC if args.timezone is None else zone(args.timezone)
    except ValueError as e:
        print(f"mineops: --timezone: {e}", file=sys.stderr)
        return 2
    path = cfg.grid.journal_path
    # No journal yet (no event ever received): an empty list or export, without creating
    # the file (the controller owns it).
    journal = GridJournal(path) if path.exists() else None
    now = time.time()
    try:
        rows = [] if journal is None else journal.rows()
        out = args.out.open("w", newline="") if args.out else sys.stdout
        try:
            if args.action == "list":
                _list(rows, out, tz, now)
            else:
                _export(journal, rows, out, args, tz=tz, now=now)
        finally:
            if args.out:
                out.close()
    finally:
        if journal is not None:
            journal.close()
    return EXIT_OK

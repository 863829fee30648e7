"""`mineops events`: list grid events and export their compliance records for settlement."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from controller.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, Subparsers
from controller.config import SiteConfig
from controller.grid.journal import EventRow, GridJournal
from controller.protocol.payloads import GridEvent
from controller.protocol.topics import SiteTopics
from controller.protocol.transport import Transport
from controller.site_file import load_config

FIELDS = ("id", "kind", "status", "source", "start_ts", "end_ts", "deadline_ts", "value_kw",
          "baseline_kw", "target_kw", "reached_ts", "time_to_target_s", "curtailed_kwh",
          "samples_after_deadline", "violations", "complied")


def add_parser(sub: Subparsers) -> None:
    """Register `events`."""
    p = sub.add_parser(
        "events", help="grid events: list, or export compliance records",
        description="Read the site's grid-event journal ([grid] journal_path).")
    p.add_argument("action", choices=["list", "export", "send", "cancel"],
                   help="list: one line per event; export: CSV or JSON for settlement; "
                   "send/cancel: publish an operator's event to the site's grid topic")
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="site TOML file")
    p.add_argument("--format", choices=["csv", "json"], default="csv", help="export format")
    p.add_argument("--out", type=Path, metavar="FILE", help="write here (default: stdout)")
    p.add_argument("--samples", action="store_true",
                   help="JSON only: include the meter samples of each event")
    send = p.add_argument_group("send/cancel")
    send.add_argument("--id", help="event id (default: operator-<unix time>)")
    send.add_argument("--kind", choices=["target_kw", "shed_kw", "emergency", "peak"],
                      default="target_kw")
    send.add_argument("--value-kw", type=float, help="target (target_kw, peak) or shed amount")
    send.add_argument("--start-in", type=float, default=0.0, metavar="SECONDS",
                      help="starts this many seconds from now (default 0)")
    send.add_argument("--duration", type=float, default=3600.0, metavar="SECONDS",
                      help="lasts this long (default 3600)")
    p.set_defaults(handler=run)


def record(row: EventRow) -> dict[str, Any]:
    """One event's settlement record, in kW and kWh."""
    p = row.payload
    start = p.get("start_ts")
    deadline = p.get("deadline_ts") or start
    reached = row.reached_ts
    return {
        "id": row.id, "kind": row.kind, "status": row.status, "source": p.get("source"),
        "start_ts": start, "end_ts": p.get("end_ts"), "deadline_ts": deadline,
        "value_kw": p.get("value_kw"),
        "baseline_kw": None if row.baseline_w is None else round(row.baseline_w / 1e3, 3),
        "target_kw": None if row.target_w is None else round(row.target_w / 1e3, 3),
        "reached_ts": reached,
        "time_to_target_s": None if reached is None or start is None
        else round(max(0.0, reached - start), 3),
        "curtailed_kwh": round(row.curtailed_wh / 1e3, 3),
        "samples_after_deadline": row.samples_after_deadline,
        "violations": row.violations,
        "complied": row.complied,
    }


def _send(cfg: SiteConfig, args: argparse.Namespace) -> int:
    """Publish one event (QoS 1, retained) and wait for the broker to take it."""
    now = time.time()
    try:
        if args.action == "cancel" and not args.id:
            raise ValueError("cancel needs --id")
        event = GridEvent(
            id=args.id or f"operator-{int(now)}", kind=args.kind, value_kw=args.value_kw,
            start_ts=now + args.start_in, end_ts=now + args.start_in + args.duration,
            source="operator-cli", cancelled=args.action == "cancel")
    except (ValueError, ValidationError) as e:
        print(f"mineops: not a valid event: {e}", file=sys.stderr)
        return EXIT_USAGE

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
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.action in ("send", "cancel"):
        return _send(cfg, args)
    path = cfg.grid.journal_path
    if not path.exists():
        print(f"mineops: no grid journal at {path} (no event has been received yet)",
              file=sys.stderr)
        return EXIT_USAGE
    journal = GridJournal(path)
    rows = journal.rows()
    out = args.out.open("w", newline="") if args.out else sys.stdout
    try:
        if args.action == "list":
            for r in rows:
                rec = record(r)
                out.write(f"{r.id:32} {r.kind:10} {r.status:10} target {rec['target_kw']} kW "
                          f"complied {rec['complied']}\n")
        elif args.format == "json":
            records = [record(r) for r in rows]
            if args.samples:
                for rec in records:
                    rec["samples"] = [
                        {"ts": ts, "meter_w": m, "target_w": t}
                        for ts, m, t, _ in journal.samples(rec["id"])
                    ]
            json.dump(records, out, indent=2)
            out.write("\n")
        else:
            writer = csv.DictWriter(out, fieldnames=FIELDS)
            writer.writeheader()
            for r in rows:
                writer.writerow(record(r))
    finally:
        journal.close()
        if args.out:
            out.close()
    return EXIT_OK

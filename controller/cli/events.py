"""`mineops events`: list grid events, export their compliance records, send and cancel.

Records come from the site's grid journal (`[grid] journal_path`, written by the
controller). Times are ISO 8601 with their UTC offset (UTC unless `--timezone`), power in
kW, energy in kWh. An event is judged only once it has ended: while it runs it is
"in progress"; one whose deadline had already passed when the controller received it
is marked "deadline past at arrival" and not judged, since no site could have met it.

`send` checks `--value-kw` against the site before publishing (a value that looks typed
in W or MW is refused with the unit hint `check-config` gives for the cap); `cancel
--id X` re-sends the journaled event X with only `cancelled` set (and a newer version),
so the journal's record keeps the event's own kind, value and times.
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
from typing import Any, TextIO, cast

from pydantic import ValidationError

from controller.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    Subparsers,
    UsageError,
    invalid_input,
)
from controller.config import SiteConfig
from controller.config_types import format_kw, unit_slip
from controller.grid.journal import EventRow, GridJournal
from controller.grid.standing import compliance, complied, deadline_ts
from controller.protocol.payloads import GridEvent, GridEventKind
from controller.protocol.topics import SiteTopics
from controller.protocol.transport import Transport
from controller.site_file import load_config
from controller.view.clock import zone
from controller.view.progress import progress, wanted

FIELDS = ("id", "kind", "status", "compliance", "source", "received", "start", "end",
          "deadline", "notice_s", "value_kw", "baseline_kw", "target_kw", "reached",
          "time_to_target_s", "curtailed_kwh", "samples_after_deadline",
          "samples_without_meter", "violations", "complied")
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
    send.add_argument("--id", help="event id (send: default operator-<unix time>; cancel: "
                      "the event to cancel, its terms read from the journal)")
    send.add_argument("--kind", choices=["target_kw", "shed_kw", "emergency", "peak"],
                      help="send: default target_kw (cancel takes the journaled event's)")
    send.add_argument("--value-kw", type=float, metavar="KW",
                      help="send: the site's power target in kW (target_kw, peak) or the kW "
                      "to shed (shed_kw); checked against the site cap like check-config's "
                      "cap (a value that looks typed in W or MW is refused)")
    send.add_argument("--start-in", type=float, metavar="SECONDS",
                      help="starts (and must be met) this many seconds from now (default: "
                      f"{DEFAULT_NOTICE_S:g}, or grid.prepare_s + 60 if more)")
    send.add_argument("--duration", type=float, default=3600.0, metavar="SECONDS",
                      help="lasts this long (default 3600)")
    p.set_defaults(handler=run, quiet_logs=True)  # its output is the lines it prints


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
        # Compliance samples taken with no fresh meter reading: not judged, counted apart.
        "samples_without_meter": row.samples_without_meter,
        "violations": row.violations,
        "complied": complied(row, now),
    }


# What each kind's --value-kw means, for messages and the one-line summary.
VALUE_MEANS = {"target_kw": "the site's power target", "shed_kw": "the power to shed below "
               "the baseline", "peak": "the level held through the peak (default: "
               "grid.peak_hold_kw)"}


def terms(event: GridEvent) -> str:
    """An event's terms in the operator's words: "power target 2,150 kW (2.15 MW)"."""
    v = event.value_kw
    amount = "" if v is None else f"{v:,.6g} kW ({v / 1000:,.3g} MW)"
    if event.kind == "target_kw":
        return f"power target {amount}"
    if event.kind == "shed_kw":
        return f"shed {amount} below the baseline"
    if event.kind == "peak":
        return "peak alert, hold " + (amount or "grid.peak_hold_kw")
    return "emergency: keep-alive load only"


def check_value(cfg: SiteConfig, kind: str, value_kw: float | None
                ) -> tuple[list[str], list[str]]:
    """(errors, warnings) for an operator's --value-kw against the site, before it is sent.

    A value off from the site cap by the factor of a unit slip is an error with the unit
    hint `check-config` gives for the cap (`controller.config_types.unit_slip`), and so is a
    target or shed smaller than the smallest miner's stock draw (no miner could change
    for it: most likely MW typed as kW). A target below the never-curtail miners' draw,
    or above the cap, and a shed of the whole cap are warnings.
    """
    errors: list[str] = []
    warnings: list[str] = []
    if kind == "emergency":
        if value_kw is not None:
            warnings.append("--value-kw is not used by an emergency (the keep-alive groups "
                            "run, everything else sleeps)")
        return errors, warnings
    if value_kw is None:
        if kind != "peak":
            errors.append(f"--kind {kind} needs --value-kw KW ({VALUE_MEANS[kind]}, in kW)")
        return errors, warnings
    if value_kw < 0:
        errors.append(f"--value-kw: {value_kw:g} kW is negative ({VALUE_MEANS[kind]}, in kW)")
        return errors, warnings
    cap_kw = cfg.power_cap_kw
    review = cfg.cap_review()
    slip = unit_slip("--value-kw", value_kw, f"the site cap ({format_kw(cap_kw)} kW)", cap_kw)
    if slip is not None:
        return [slip], warnings
    got = f"--value-kw: {format_kw(value_kw)} kW"
    if value_kw < review.smallest_miner_kw:
        errors.append(
            f"{got} is below the smallest miner's stock draw ({format_kw(review.smallest_miner_kw)}"
            f" kW incl. aux, {review.smallest_model}): no miner could change for it; MW typed "
            f"as kW? ({format_kw(value_kw)} MW = {format_kw(value_kw * 1000)} kW)"
            + ("; to stop everything but the keep-alive groups: --kind emergency"
               if kind != "shed_kw" else ""))
        return errors, warnings
    if kind == "shed_kw":
        if value_kw >= cap_kw:
            warnings.append(f"{got} is the whole site cap ({format_kw(cap_kw)} kW) or more: "
                            "every miner sleeps, never-curtail ones too "
                            "(the grid comes first)")
        return errors, warnings
    if value_kw > cap_kw:
        warnings.append(f"{got} is above the site cap ({format_kw(cap_kw)} kW): the event "
                        "does not lower it")
    if review.never_curtail_max_kw > value_kw:
        warnings.append(f"{got} is below the never-curtail miners' draw (up to "
                        f"{format_kw(review.never_curtail_max_kw)} kW incl. aux): everything "
                        "else sleeps and the target is still not met")
    return errors, warnings


def journaled(cfg: SiteConfig, event_id: str) -> EventRow:
    """The event `event_id` as the site's grid journal holds it (its terms and status).

    Raises:
        UsageError: no journal at `[grid] journal_path`, no such event, or one that is
            not an operator's to cancel (a frequency shed).
    """
    path = cfg.grid.journal_path
    if not path.exists():
        raise UsageError(
            f"events cancel reads the event's terms from the site's grid journal, and "
            f"there is none at {path} ([grid] journal_path): run it where the controller "
            "keeps its journal")
    journal = GridJournal(path)
    try:
        rows = {r.id: r for r in journal.rows()}
    finally:
        journal.close()
    row = rows.get(event_id)
    if row is None:
        recent = ", ".join(sorted(rows, key=lambda i: -rows[i].received_ts)[:5])
        raise UsageError(f"--id {event_id}: no such event in {path}"
                         + (f" (latest: {recent}; `mineops events list` shows all)"
                            if recent else " (it holds no events)"))
    if row.kind == "frequency":
        raise UsageError(f"--id {event_id}: an under-frequency shed, ended by the grid's "
                         "frequency, not by a cancel")
    return row


def _event(cfg: SiteConfig, args: argparse.Namespace, now: float) -> GridEvent | None:
    """The event to publish for send or cancel; None when there is nothing to do.

    Raises:
        UsageError: a bad value (see `check_value`), or a cancel of an unknown event.
    """
    # The send time in ms orders an event's copies (a cancel after its send, a correction
    # after the first try): the controller refuses any copy older than one it has.
    version = int(now * 1000)
    if args.action == "cancel":
        if not args.id:
            raise UsageError("events cancel needs --id (`mineops events list` shows the ids)")
        row = journaled(cfg, args.id)
        if args.kind is not None or args.value_kw is not None:
            print("mineops: warning: --kind and --value-kw are not used by cancel: the "
                  "event's journaled terms are sent with only the cancel changed",
                  file=sys.stderr)
        if row.status == "cancelled":
            print(f"{row.id} is already cancelled; nothing sent")
            return None
        if row.status == "completed":
            raise UsageError(f"--id {row.id}: ended at {iso(row.payload.get('end_ts'))}; "
                             "nothing to cancel")
        payload = {**row.payload, "cancelled": True,
                   "version": max(version, (row.version or 0) + 1)}
        try:
            return GridEvent.model_validate(payload)
        except ValidationError as e:  # a journal written by another version
            raise UsageError(f"--id {row.id}: the journaled event cannot be re-sent: "
                             f"{invalid_input(e)}") from None
    kind = args.kind or "target_kw"
    errors, warnings = check_value(cfg, kind, args.value_kw)
    if errors:
        raise UsageError("\n".join(errors))
    for warning in warnings:
        print(f"mineops: warning: {warning}", file=sys.stderr)
    start_in = (max(DEFAULT_NOTICE_S, cfg.grid.prepare_s + 60.0) if args.start_in is None
                else args.start_in)
    if start_in <= 0:
        print("mineops: warning: the deadline is already past when the event arrives; it "
              "will be recorded 'deadline past at arrival', not judged", file=sys.stderr)
    elif start_in < cfg.grid.prepare_s:
        print(f"mineops: warning: {start_in:g} s of notice is less than grid.prepare_s "
              f"({cfg.grid.prepare_s:g} s) the site takes to reach a target", file=sys.stderr)
    try:
        return GridEvent(
            id=args.id or f"operator-{int(now)}", kind=cast(GridEventKind, kind),
            value_kw=args.value_kw,
            start_ts=now + start_in, end_ts=now + start_in + args.duration,
            source="operator-cli", version=version)
    except ValidationError as e:
        raise UsageError(f"not a valid event: {invalid_input(e, OPTIONS)}") from None


# GridEvent's fields as `events send` sets them, for error messages.
OPTIONS = {"id": "--id", "kind": "--kind", "value_kw": "--value-kw", "start_ts": "--start-in",
           "end_ts": "--duration"}


def _send(cfg: SiteConfig, args: argparse.Namespace) -> int:
    """Publish one event (QoS 1, retained) and wait for the broker to take it."""
    event = _event(cfg, args, time.time())
    if event is None:
        return EXIT_OK
    topic = SiteTopics(cfg.site_id).grid

    async def publish() -> bool:
        transport = Transport(cfg.broker, client_id=f"mineops-cli-{os.getpid()}",
                              subscriptions=[])
        task = asyncio.create_task(transport.run(lambda *_: None))
        try:
            async with asyncio.timeout(15):
                await transport.connected.wait()
                return await transport.publish(topic, event.encode(), qos=1, retain=True)
        except TimeoutError:
            return False
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    if not asyncio.run(publish()):
        print(f"mineops: could not publish to {cfg.broker.host}:{cfg.broker.port}",
              file=sys.stderr)
        return EXIT_FAIL
    done = "cancelled" if event.cancelled else "sent"
    deadline = "" if event.deadline_ts is None else f", met by {iso(event.deadline_ts)}"
    print(f"{done} {event.id}: {terms(event)} from {iso(event.start_ts)} to "
          f"{iso(event.end_ts)}{deadline} (on {topic}, version {event.version})")
    return EXIT_OK


def _list(rows: list[EventRow], out: TextIO, tz: tzinfo, now: float) -> None:
    if not rows:
        out.write("no grid events\n")
    for r in rows:
        rec = record(r, tz=tz, now_ts=now)
        target = "" if rec["target_kw"] is None else f"target {rec['target_kw']:g} kW "
        span = f"{rec['start']} to {rec['end']}" if rec["end"] else f"from {rec['start']}"
        # The standing only where it says more than the status ("scheduled: scheduled").
        standing = "" if rec["compliance"] == r.status else f": {rec['compliance']}"
        out.write(f"{r.id:32} {r.kind:10} {r.status:10} {target}{span}{standing}\n")


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
        return EXIT_USAGE
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

"""`mineops decode`: run meter payloads through a driver and print the normalised readings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from controller.cli.common import EXIT_OK, EXIT_USAGE, Subparsers
from controller.protocol.payloads import PayloadError
from drivers.meters import DRIVERS, UnknownDriverError, driver_type

DIGITS = 6


def add_parser(subparsers: Subparsers) -> None:
    """Register `decode` on the `mineops` command line."""
    p = subparsers.add_parser(
        "decode", help="decode meter payloads in a vendor's format (to check a device)",
        description="Decode meter payloads in order, as the controller would (a Shelly "
        "NotifyStatus delta merges onto the status before it), and print one JSON line per "
        "payload: power_w, energy_import_wh, energy_export_wh, voltage_v, current_a, "
        "power_factor, frequency_hz (null when absent), or null when the payload carries no "
        "reading yet. A value the device sent that the reading leaves null (a negative "
        "register, live phases whose frequencies disagree): one line on stderr, why. A "
        "payload that cannot be decoded: its reason on stderr, exit 2.",
        epilog=f"Drivers: {', '.join(sorted(DRIVERS))}. Example: mineops decode --driver "
        "tasmota --topic tele/pow/SENSOR --payload sensor.json",
    )
    p.add_argument("--driver", required=True, metavar="NAME",
                   help=f"meter type as in the site config: {', '.join(sorted(DRIVERS))}")
    p.add_argument("--topic", action="append", required=True, metavar="TOPIC",
                   help="the MQTT topic the payload arrived on (repeat, one per --payload)")
    p.add_argument("--payload", action="append", required=True, type=Path, metavar="FILE",
                   help="the payload's bytes, as published (repeat, in arrival order)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Decode every (topic, payload) pair in order; exit 2 on the first that fails."""
    topics: list[str] = args.topic
    files: list[Path] = args.payload
    if len(topics) != len(files):
        return _fail(f"{len(topics)} --topic but {len(files)} --payload: give one topic per "
                     "payload, in order")
    try:
        kind = driver_type(args.driver)
    except UnknownDriverError as e:
        return _fail(str(e))
    try:
        driver = kind(kind.config_from_topics(topics))
    except PayloadError as e:
        return _fail(f"{e.reason}: {e.detail}")
    for topic, path in zip(topics, files, strict=True):
        try:
            raw = path.read_bytes()
        except OSError as e:
            return _fail(f"{path}: cannot read: {e.strerror or e}")
        try:
            reading = driver.decode(topic, raw)
        except PayloadError as e:
            return _fail(f"{path} on {topic}: {e.reason}: {e.detail}")
        if reading is None:
            print("null")
        else:
            values = {k: None if v is None else round(v, DIGITS)
                      for k, v in reading.as_dict().items()}
            print(json.dumps(values))
            for value in reading.unknown:  # a value left null that the device did send
                print(f"mineops decode: {path} on {topic}: {value.field} unknown: "
                      f"{value.reason}: {value.detail}", file=sys.stderr)
        sys.stdout.flush()
    return EXIT_OK


def _fail(message: str) -> int:
    print(f"mineops decode: {message}", file=sys.stderr)
    return EXIT_USAGE

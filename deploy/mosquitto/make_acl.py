"""Write the mosquitto ACL for a mineops site file: `python make_acl.py SITE.toml > mineops.acl`.

Every account gets an explicit `user` block naming its own topics, and nothing else:
a miner (user name = miner id) its own telemetry, availability and commands; a rack
bridge (user name = group name) its own group's; a firmware bridge serving a few
groups (`--bridge NAME=GROUP,...`) those groups'; the service accounts (controller,
bridge, ven, grid-source, price-feed, meters, monitor) their fixed rights. There are
no `pattern` lines on purpose: mosquitto applies a pattern to every account, so
`pattern write .../group/%u/telemetry` let a miner or the read-only monitor publish
`group/<its own name>/telemetry` with any miners' readings in it.

Exits 2 with the reason when the site file is invalid, an account name is used twice
(mosquitto would merge the two blocks, and their rights with them), or a `--bridge`
names a group the fleet does not have. Regenerate after changing the fleet.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from controller.config import SiteConfig
from controller.site_file import ConfigError, load_config
from drivers.meters.mineops import MineopsMeter
from drivers.meters.registry import build

# Fixed service accounts; no miner, group or bridge may be named like one.
SERVICE_ACCOUNTS = ("controller", "bridge", "ven", "grid-source", "price-feed", "simulator")
# Above this many per-miner accounts, mosquitto takes seconds to load the file (measured with
# mosquitto 2.0.11: 5,000 accounts 0.2 s, 20,000 4 s, 100,000 over 3 minutes).
LARGE_ACL_MINERS = 5000
# What the fleet's side publishes (miners, or a bridge for them), and the commands it reads.
FLEET_STATE = ("miner/+/telemetry", "miner/+/availability", "group/+/telemetry",
               "group/+/availability", "group/+/capabilities")
COMMANDS = ("miner/+/cmd", "group/+/cmd", "fleet/cmd")


class AclError(ValueError):
    """The accounts asked for cannot be written as one ACL; the message says why."""


def _group_rights(base: str, groups: Iterable[str],
                  members: Mapping[str, Sequence[str]]) -> Iterator[str]:
    """What `mineops bridge --groups ...` publishes and reads for these groups."""
    for g in groups:
        for leaf in ("telemetry", "availability", "capabilities"):
            yield f"topic write {base}/group/{g}/{leaf}"
        yield f"topic read {base}/group/{g}/cmd"
        for m in members[g]:
            yield f"topic write {base}/miner/{m}/availability"
            yield f"topic read {base}/miner/{m}/cmd"
    # Fleet-wide sheds and large batches go out on this topic alone (controller/actuation.py).
    yield f"topic read {base}/fleet/cmd"


def _fleet_side(base: str, writes: Iterable[str]) -> Iterator[str]:
    """An account that speaks for the fleet: writes `writes`, reads every command topic."""
    for leaf in writes:
        yield f"topic write {base}/{leaf}"
    for leaf in COMMANDS:
        yield f"topic read {base}/{leaf}"


def members_by_group(cfg: SiteConfig) -> dict[str, list[str]]:
    """Miner ids by group, groups in inventory order (listed miners may add groups)."""
    members: dict[str, list[str]] = {}
    for m in cfg.inventory:
        members.setdefault(m.group, []).append(m.id)
    return members


def _check_names(cfg: SiteConfig, bridges: Mapping[str, Sequence[str]], monitors: Sequence[str],
                 *, miners: bool, racks: bool) -> None:
    groups = members_by_group(cfg)
    meters = [f"meter-{m.id}" for m in cfg.meters]
    named = [*SERVICE_ACCOUNTS, *meters, *monitors, *bridges]
    if racks:
        named += groups
    if miners:
        named += [m.id for m in cfg.inventory]
    twice = sorted(n for n, count in Counter(named).items() if count > 1)
    if twice:
        raise AclError(f"account names used twice (mosquitto would merge their rights): "
                       f"{', '.join(twice)}")
    for name, served in bridges.items():
        unknown = sorted(set(served) - set(groups))
        if unknown or not served:
            raise AclError(f"--bridge {name}: unknown group(s) {', '.join(unknown) or '(none)'}; "
                           f"the fleet has {', '.join(sorted(groups))}")


def acl_lines(cfg: SiteConfig, *, source: str, simulator: bool = False, miners: bool = True,
              racks: bool = True, bridges: Mapping[str, Sequence[str]] | None = None,
              monitors: Sequence[str] = ("monitor",)) -> Iterator[str]:
    """The ACL file for `cfg`, line by line.

    `source` is the command line shown in the header; `bridges` maps an extra firmware
    bridge account to the groups it serves. Raises AclError (see the module docstring).
    """
    bridges = dict(bridges or {})
    _check_names(cfg, bridges, monitors, miners=miners, racks=racks)
    b = f"mineops/{cfg.site_id}"
    members = members_by_group(cfg)
    vendor = [build(m) for m in cfg.meters if not isinstance(m, MineopsMeter)]

    yield f"# mosquitto ACL for mineops site {cfg.site_id!r}, generated by"
    yield f"#   {source}"
    yield "# Regenerate rather than edit. Every account has its own block below; anything not"
    yield "# granted is denied. No `pattern` lines: mosquitto applies them to every account."
    yield ""
    yield "# The controller: reads the site, alone commands miners and publishes decisions."
    yield "user controller"
    for leaf in (*FLEET_STATE, "meter/+/telemetry", "signal/#"):
        yield f"topic read {b}/{leaf}"
    for d in vendor:
        for topic in d.subscriptions():
            yield f"topic read {topic}"
    for leaf in COMMANDS:
        yield f"topic write {b}/{leaf}"
    yield f"topic readwrite {b}/controller/#"
    yield ""
    yield "# The site-wide firmware bridge (`mineops bridge`): every group's telemetry and"
    yield "# availability, every command topic, and the fleet topic for fast sheds."
    yield "user bridge"
    yield from _fleet_side(b, FLEET_STATE)
    for name, served in bridges.items():
        yield ""
        yield f"# Firmware bridge {name!r} (`mineops bridge --groups {','.join(served)}`)."
        yield f"user {name}"
        yield from _group_rights(b, served, members)
    yield ""
    yield "# The OpenADR VEN (`mineops ven`): grid events in, the site meter's power out."
    yield "user ven"
    yield f"topic write {b}/signal/grid"
    yield f"topic read {b}/meter/+/telemetry"
    yield ""
    yield "# Another grid-signal source (an aggregator's bridge, `mineops events send`)."
    yield "user grid-source"
    yield f"topic write {b}/signal/grid"
    yield ""
    yield "# The price feed: energy price, day-ahead schedule and hashprice."
    yield "user price-feed"
    for leaf in ("price", "price_schedule", "hashprice"):
        yield f"topic write {b}/signal/{leaf}"
    for meter in cfg.meters:
        yield ""
        yield f"# Meter {meter.id!r} ({meter.type}, {meter.role})."
        yield f"user meter-{meter.id}"
        if isinstance(meter, MineopsMeter):
            yield f"topic write {b}/meter/{meter.id}/telemetry"
        else:
            for topic in build(meter).subscriptions():
                yield f"topic write {topic}"
    for name in monitors:
        yield ""
        yield "# Read-only view of the whole site, for operators' debugging (mosquitto_sub)."
        yield f"user {name}"
        yield f"topic read {b}/#"
    if simulator:
        yield ""
        yield "# DEMO/TEST ONLY: the simulator plays every miner, meter and the price feed."
        yield "# Never give this account to anything on a real site."
        yield "user simulator"
        yield from _fleet_side(b, (*FLEET_STATE[:4], "meter/+/telemetry", "signal/price",
                                   "signal/hashprice"))
    if racks:
        yield ""
        yield "# Rack bridges log in with user name = group name: their own group only."
        for g in members:
            yield f"user {g}"
            yield from _group_rights(b, [g], members)
    if miners:
        yield ""
        yield "# Miners log in with user name = miner id: their own topics and their group's"
        yield "# commands only."
        for m in cfg.inventory:
            yield f"user {m.id}"
            yield f"topic write {b}/miner/{m.id}/telemetry"
            yield f"topic write {b}/miner/{m.id}/availability"
            yield f"topic read {b}/miner/{m.id}/cmd"
            yield f"topic read {b}/group/{m.group}/cmd"
            yield f"topic read {b}/fleet/cmd"


def _bridge_arg(text: str) -> tuple[str, list[str]]:
    name, sep, groups = text.partition("=")
    if not sep or not name or not groups:
        raise argparse.ArgumentTypeError(f"expected NAME=GROUP[,GROUP...], got {text!r}")
    return name, [g for g in groups.split(",") if g]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("site", type=Path, help="site TOML file")
    p.add_argument("--simulator", action="store_true",
                   help="add the demo/test-only 'simulator' account")
    p.add_argument("--no-miners", action="store_true",
                   help="leave out the per-miner accounts (no miner logs in itself)")
    p.add_argument("--no-racks", action="store_true",
                   help="leave out the per-group (rack bridge) accounts")
    p.add_argument("--bridge", type=_bridge_arg, action="append", default=[],
                   metavar="NAME=GROUP[,GROUP...]",
                   help="an account for a firmware bridge serving these groups only "
                   "(repeatable; one per `mineops bridge --groups` process)")
    p.add_argument("--monitor", action="append", metavar="NAME",
                   help="read-only account name (repeatable; default: monitor)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.site)
        source = shlex.join(["make_acl.py", *(argv if argv is not None else sys.argv[1:])])
        lines = list(acl_lines(cfg, source=source, simulator=args.simulator,
                               miners=not args.no_miners, racks=not args.no_racks,
                               bridges=dict(args.bridge),
                               monitors=args.monitor or ["monitor"]))
    except (ConfigError, AclError) as e:
        print(f"make_acl: {e}", file=sys.stderr)
        return 2
    if not args.no_miners and len(cfg.inventory) > LARGE_ACL_MINERS:
        print(f"make_acl: {len(cfg.inventory)} per-miner accounts: mosquitto 2.0 loads an ACL in "
              "time quadratic in its accounts (20,000 take seconds, 100,000 minutes); use "
              "--no-miners unless miners log in themselves", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

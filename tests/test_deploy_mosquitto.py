"""deploy/mosquitto against the real mosquitto: it starts as shipped, and its ACL holds.

The shipped mosquitto.conf runs with its paths pointed into tmp (listeners on free
loopback ports, a password file hashed by mosquitto_passwd from passwords.example,
the shipped acl.example, test certificates made with the openssl CLI). Real clients
(mosquitto_pub / mosquitto_sub, and the controller's own Transport) then try what a
stolen credential would: forge other devices' readings, commands and signals, publish
as the read-only monitor, take over the controller's session.

The broker gives every client its user name as client id, so one account is one
connection: a test never connects the same account twice at once (the second
connection would replace the first), and watches with accounts other than the one
trying to forge.
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from controller.config import BrokerConfig
from controller.protocol.broker import free_port
from controller.protocol.transport import Transport
from tests.test_deploy_support import (  # noqa: F401 - default_logging is a fixture
    DEPLOY,
    Subscriber,
    default_logging,
    hash_passwords,
    log_tail,
    make_certs,
    mosquitto,
    moved_config,
    mqtt_pub,
    need,
    run,
)

MOSQUITTO = DEPLOY / "mosquitto"
SITE = "mineops/pecos-1"
PASSWORDS = dict(
    line.split(":", 1) for line in (MOSQUITTO / "passwords.example").read_text().splitlines()
)
# The controller's own client id (controller/daemon.py), which a thief would try to take.
CONTROLLER_CLIENT_ID = "mineops-controller-pecos-1"

pytestmark = pytest.mark.integration


def moved_paths(d: Path, port: int, tls_port: int) -> dict[str, str]:
    """What moves a shipped mosquitto config's listeners to free ports and its files into `d`."""
    return {
        r"listener 1883 127\.0\.0\.1": f"listener {port} 127.0.0.1",
        r"listener 8883": f"listener {tls_port} 127.0.0.1",
        r"password_file .+": f"password_file {d / 'passwd'}",
        r"acl_file .+": f"acl_file {d / 'acl'}",
        r"cafile .+": f"cafile {d / 'ca.crt'}",
        r"certfile .+": f"certfile {d / 'server.crt'}",
        r"keyfile .+": f"keyfile {d / 'server.key'}",
        r"persistence_location .+": f"persistence_location {d}/",
    }


def shipped_config(d: Path, port: int, tls_port: int) -> str:
    """deploy/mosquitto/mosquitto.conf with its ports and paths moved into `d`."""
    (d / "conf.d").mkdir(exist_ok=True)
    return moved_config((MOSQUITTO / "mosquitto.conf").read_text(), {
        **moved_paths(d, port, tls_port), r"include_dir .+": f"include_dir {d / 'conf.d'}",
    }, "mosquitto.conf")


@dataclass
class Broker:
    port: int
    tls_port: int
    dir: Path

    def pub(self, user: str | None, topic: str, payload: str = "x", *, qos: int = 1,
            client_id: str | None = None) -> subprocess.CompletedProcess[str]:
        return mqtt_pub(self.port, auth(user), topic, payload, qos=qos, client_id=client_id)

    def sub(self, user: str, topics: list[str]) -> Subscriber:
        return Subscriber(self.port, auth(user), topics,
                          self.dir / f"sub-{user}-{time.time_ns()}.log")

    def log(self) -> str:
        return log_tail(self.dir / "mosquitto.log", 200_000)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    need("mosquitto_pub")
    need("mosquitto_sub")
    make_certs(tmp_path)
    hash_passwords(MOSQUITTO / "passwords.example", tmp_path / "passwd")
    (tmp_path / "acl").write_text((MOSQUITTO / "acl.example").read_text())
    port, tls_port = free_port(), free_port()
    (tmp_path / "mosquitto.conf").write_text(shipped_config(tmp_path, port, tls_port))
    with mosquitto(tmp_path / "mosquitto.conf", [port, tls_port], tmp_path / "mosquitto.log"):
        yield Broker(port, tls_port, tmp_path)


def auth(user: str | None) -> list[str]:
    return [] if user is None else ["-u", user, "-P", PASSWORDS[user]]


def make_acl(*args: str, cwd: Path = MOSQUITTO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(MOSQUITTO / "make_acl.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=30, check=False)


# --- make_acl.py --------------------------------------------------------------------------


def test_shipped_acl_is_what_make_acl_writes() -> None:
    shipped = (MOSQUITTO / "acl.example").read_text()
    command = shlex.split(shipped.splitlines()[1].lstrip("# "))
    assert command[0] == "make_acl.py" and "acl.example.site.toml" in command
    generated = make_acl(*command[1:])
    assert generated.returncode == 0, generated.stderr
    assert shipped == generated.stdout
    users = {line.split()[1] for line in shipped.splitlines() if line.startswith("user ")}
    assert users == set(PASSWORDS), "every ACL account has an example password, and no more"
    # A pattern applies to every account: that was the hole (see make_acl.py).
    assert not [line for line in shipped.splitlines() if line.startswith("pattern")]


def test_make_acl_refuses_merged_accounts_and_unknown_groups(tmp_path: Path) -> None:
    site = (MOSQUITTO / "acl.example.site.toml").read_text()
    # A miner named like a group would get the rack's rights too (mosquitto merges blocks).
    clash = tmp_path / "clash.toml"
    clash.write_text(site + '\n[[fleet.miners]]\nid = "s21-r2"\nmodel = "s21"\ngroup = "x"\n')
    out = make_acl(str(clash))
    assert out.returncode == 2 and out.stdout == ""
    assert "account names used twice" in out.stderr and "s21-r2" in out.stderr
    out = make_acl("acl.example.site.toml", "--bridge", "monitor=s21-r1")
    assert out.returncode == 2 and "monitor" in out.stderr
    out = make_acl("acl.example.site.toml", "--bridge", "rack-9=s21-r9")
    assert out.returncode == 2 and "unknown group(s) s21-r9" in out.stderr
    assert "s21-r1, s21-r2" in out.stderr, "the error lists the groups there are"
    out = make_acl("acl.example.site.toml", "--bridge", "rack-9")
    assert out.returncode == 2 and "NAME=GROUP" in out.stderr


def test_make_acl_grants_vendor_meters_their_device_topics(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text((MOSQUITTO / "acl.example.site.toml").read_text() + """
[[meters]]
type = "tasmota"
id = "aux-pow"
role = "aux"
topic = "pow-r2"

[[meters]]
type = "shelly_gen2"
id = "poi-shelly"
prefix = "shellypro3em-0cb815fcaff4"
""")
    out = make_acl(str(site))
    assert out.returncode == 0, out.stderr
    blocks: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        if line.startswith("user "):
            user = blocks.setdefault(line.split()[1], [])
        elif line.startswith("topic "):
            user.append(line)
    assert "topic write tele/pow-r2/SENSOR" in blocks["meter-aux-pow"]
    assert "topic read tele/pow-r2/SENSOR" in blocks["controller"]
    assert "topic write shellypro3em-0cb815fcaff4/events/rpc" in blocks["meter-poi-shelly"]
    assert "topic read shellypro3em-0cb815fcaff4/events/rpc" in blocks["controller"]
    # Each vendor meter writes only its own device's topics.
    assert not [t for t in blocks["meter-aux-pow"] if "shelly" in t or "mineops/" in t]


# --- the shipped broker -------------------------------------------------------------------


def test_anonymous_and_wrong_password_are_refused(broker: Broker) -> None:
    anonymous = broker.pub(None, f"{SITE}/signal/grid")
    assert anonymous.returncode != 0
    assert "not authorised" in (anonymous.stderr + anonymous.stdout).lower()
    wrong = mqtt_pub(broker.port, ["-u", "controller", "-P", "guess"],
                     f"{SITE}/group/s21-r1/cmd")
    assert wrong.returncode != 0


def test_a_miner_cannot_forge_commands_grid_signals_or_decisions(broker: Broker) -> None:
    miner = "s21-r1-0001"
    forged = [
        f"{SITE}/miner/s21-r1-0002/cmd",  # another miner's command
        f"{SITE}/miner/{miner}/cmd",  # even its own command comes only from the controller
        f"{SITE}/group/s21-r1/cmd",  # its group's broadcast
        f"{SITE}/group/s21-r2/cmd",
        f"{SITE}/signal/grid",
        f"{SITE}/signal/price",
        f"{SITE}/controller/decision",
        f"{SITE}/miner/s21-r1-0002/telemetry",  # another miner's telemetry
        f"{SITE}/group/s21-r1/telemetry",  # its rack's telemetry, with any miners' readings
        f"{SITE}/group/{miner}/telemetry",  # a "group" named like itself (the old %u hole)
    ]
    sentinel = f"{SITE}/miner/{miner}/telemetry"
    with broker.sub("monitor", [f"{SITE}/#"]) as everything, \
            broker.sub("controller", [f"{SITE}/signal/+", f"{SITE}/controller/decision",
                                      f"{SITE}/miner/+/telemetry",
                                      f"{SITE}/group/+/telemetry"]) as controller:
        for topic in forged:
            assert broker.pub(miner, topic, "forged").returncode == 0  # MQTT 3: dropped silently
        # Same client, so in order: once the allowed message is here, the forged ones would be.
        assert broker.pub(miner, sentinel, "sentinel").returncode == 0
        everything.wait_for(f"{sentinel} sentinel")
        controller.wait_for(f"{sentinel} sentinel")
        for sub in (everything, controller):
            assert not [line for line in sub.lines() if "forged" in line], sub.lines()


def test_each_account_writes_only_its_own_group_and_miner_telemetry(broker: Broker) -> None:
    """The reported hole: any account could publish group/<its name>/telemetry."""
    allowed = {  # account -> the telemetry topics (below) it may write; every other: none
        "bridge": {"group/bridge", "group/s21-r2", "miner/bridge", "miner/s21-r2-0001"},
        "s21-r2": {"group/s21-r2"},
        "rack-2": {"group/s21-r2"},
        "s21-r1": {"group/s21-r1"},
        "s21-r1-0001": {"miner/s21-r1-0001"},
        "s21-r1-0002": {"miner/s21-r1-0002"},
        "s21-r2-0001": {"miner/s21-r2-0001"},
    }
    expected = []
    watched = [f"{SITE}/group/+/telemetry", f"{SITE}/miner/+/telemetry"]
    with broker.sub("controller", watched) as controller:
        for user in sorted(set(PASSWORDS) - {"controller"}):
            for device in (f"group/{user}", "group/s21-r2", f"miner/{user}",
                           "miner/s21-r2-0001"):
                topic = f"{SITE}/{device}/telemetry"
                assert broker.pub(user, topic, f"by-{user}").returncode == 0
                if device in allowed.get(user, set()):
                    expected.append(f"{topic} by-{user}")
        assert broker.pub("s21-r1", f"{SITE}/group/s21-r1/telemetry", "sentinel").returncode == 0
        controller.wait_for(f"{SITE}/group/s21-r1/telemetry sentinel")
        got = [line for line in controller.lines() if "sentinel" not in line]
    assert sorted(got) == sorted(expected)
    assert {line.rsplit(" by-", 1)[1] for line in got} == set(allowed), "rights still work"


def test_the_monitor_publishes_nothing(broker: Broker) -> None:
    leaves = ["miner/s21-r1-0001/telemetry", "miner/s21-r1-0001/availability",
              "miner/monitor/telemetry", "miner/s21-r1-0001/cmd", "group/s21-r1/telemetry",
              "group/monitor/telemetry", "group/s21-r1/availability",
              "group/s21-r1/capabilities", "group/s21-r1/cmd", "fleet/cmd",
              "meter/poi/telemetry", "signal/price", "signal/price_schedule",
              "signal/hashprice", "signal/grid", "controller/decision",
              "controller/availability"]
    reads = [f"{SITE}/{leaf}" for leaf in ("miner/+/telemetry", "miner/+/availability",
                                           "group/+/telemetry", "group/+/availability",
                                           "group/+/capabilities", "meter/+/telemetry",
                                           "signal/+", "controller/#")]
    with broker.sub("bridge", [f"{SITE}/miner/+/cmd", f"{SITE}/group/+/cmd",
                               f"{SITE}/fleet/cmd"]) as commands:
        with broker.sub("controller", reads) as controller:
            for leaf in leaves:
                assert broker.pub("monitor", f"{SITE}/{leaf}", "forged").returncode == 0
            assert broker.pub("grid-source", f"{SITE}/signal/grid", "sentinel").returncode == 0
            controller.wait_for(f"{SITE}/signal/grid sentinel")
        # The controller's watcher is gone, so the controller account can send the sentinel.
        assert broker.pub("controller", f"{SITE}/fleet/cmd", "sentinel").returncode == 0
        commands.wait_for(f"{SITE}/fleet/cmd sentinel")
    for sub in (controller, commands):
        assert not [line for line in sub.lines() if "forged" in line], sub.lines()


def test_only_the_controller_commands_and_only_grid_accounts_signal(broker: Broker) -> None:
    with broker.sub("monitor", [f"{SITE}/#"]) as everything:
        for user, topic in [("controller", f"{SITE}/group/s21-r1/cmd"),
                            ("controller", f"{SITE}/miner/s21-r2-0001/cmd"),
                            ("controller", f"{SITE}/controller/decision"),
                            ("grid-source", f"{SITE}/signal/grid"),
                            ("ven", f"{SITE}/signal/grid"),
                            ("price-feed", f"{SITE}/signal/price"),
                            ("price-feed", f"{SITE}/signal/price_schedule"),
                            ("meter-poi", f"{SITE}/meter/poi/telemetry")]:
            assert broker.pub(user, topic, f"by-{user}").returncode == 0
            everything.wait_for(f"{topic} by-{user}")
        for user, topic in [("price-feed", f"{SITE}/signal/grid"),
                            ("controller", f"{SITE}/signal/grid"),
                            ("ven", f"{SITE}/signal/price"),
                            ("ven", f"{SITE}/meter/poi/telemetry"),
                            ("grid-source", f"{SITE}/group/s21-r1/cmd"),
                            ("meter-poi", f"{SITE}/meter/other/telemetry"),
                            ("bridge", f"{SITE}/signal/grid")]:
            assert broker.pub(user, topic, f"forged-by-{user}").returncode == 0
        assert broker.pub("grid-source", f"{SITE}/signal/grid", "sentinel").returncode == 0
        everything.wait_for(f"{SITE}/signal/grid sentinel")
        assert not [line for line in everything.lines() if "forged" in line]


@pytest.mark.parametrize(("rack", "own", "other"), [("s21-r1", "s21-r1", "s21-r2"),
                                                    ("rack-2", "s21-r2", "s21-r1")])
def test_a_rack_bridge_account_serves_only_its_own_groups(broker: Broker, rack: str, own: str,
                                                          other: str) -> None:
    mine, theirs = f"{own}-0001", f"{other}-0001"
    writes = {
        f"{SITE}/group/{own}/telemetry": True, f"{SITE}/group/{own}/availability": True,
        f"{SITE}/group/{own}/capabilities": True, f"{SITE}/miner/{mine}/availability": True,
        f"{SITE}/group/{other}/telemetry": False, f"{SITE}/group/{other}/availability": False,
        f"{SITE}/group/{other}/capabilities": False,
        f"{SITE}/miner/{theirs}/availability": False,
        f"{SITE}/miner/{mine}/telemetry": False,  # the miner's own account writes that
        f"{SITE}/group/{own}/cmd": False, f"{SITE}/signal/grid": False,
    }
    with broker.sub("controller", [f"{SITE}/#"]) as controller:
        for topic in writes:
            assert broker.pub(rack, topic, "by-rack").returncode == 0
        assert broker.pub("grid-source", f"{SITE}/signal/grid", "sentinel").returncode == 0
        controller.wait_for(f"{SITE}/signal/grid sentinel")
    got = {line.split()[0] for line in controller.lines() if line.endswith(" by-rack")}
    assert got == {t for t, ok in writes.items() if ok}
    # Reads: its groups' and miners' commands and the fleet topic; not the other group's.
    with broker.sub(rack, [f"{SITE}/#"]) as sub:
        for topic in (f"{SITE}/group/{other}/cmd", f"{SITE}/miner/{theirs}/cmd",
                      f"{SITE}/group/{own}/cmd", f"{SITE}/miner/{mine}/cmd",
                      f"{SITE}/fleet/cmd"):
            assert broker.pub("controller", topic, "cmd").returncode == 0
        sub.wait_for(f"{SITE}/fleet/cmd cmd")
        assert sorted(sub.lines()) == sorted([f"{SITE}/group/{own}/cmd cmd",
                                              f"{SITE}/miner/{mine}/cmd cmd",
                                              f"{SITE}/fleet/cmd cmd"])


def test_a_miner_reads_only_its_own_its_groups_and_the_fleet_commands(broker: Broker) -> None:
    with broker.sub("s21-r1-0001", [f"{SITE}/#"]) as miner:
        for topic in (f"{SITE}/miner/s21-r1-0002/cmd", f"{SITE}/group/s21-r2/cmd",
                      f"{SITE}/signal/grid", f"{SITE}/miner/s21-r1-0001/cmd",
                      f"{SITE}/group/s21-r1/cmd", f"{SITE}/fleet/cmd"):
            assert broker.pub("controller", topic, "cmd").returncode == 0
        miner.wait_for(f"{SITE}/fleet/cmd cmd")
        assert sorted(miner.lines()) == [f"{SITE}/fleet/cmd cmd",
                                         f"{SITE}/group/s21-r1/cmd cmd",
                                         f"{SITE}/miner/s21-r1-0001/cmd cmd"]


def test_only_the_controller_writes_the_fleet_topic_and_every_device_reads_it(
        broker: Broker) -> None:
    # The controller sends fleet-wide sheds and large batches on fleet/cmd alone
    # (controller/actuation.py): a device that cannot read it would never shed.
    readers = ("s21-r1", "rack-2", "s21-r2-0001")
    with broker.sub(readers[0], [f"{SITE}/fleet/cmd"]) as a, \
            broker.sub(readers[1], [f"{SITE}/fleet/cmd"]) as b, \
            broker.sub(readers[2], [f"{SITE}/fleet/cmd"]) as c:
        for forger in ("bridge", "s21-r1-0001", "monitor", "ven", "s21-r2"):
            assert broker.pub(forger, f"{SITE}/fleet/cmd", "forged").returncode == 0
        assert broker.pub("controller", f"{SITE}/fleet/cmd", "shed").returncode == 0
        for sub in (a, b, c):
            sub.wait_for(f"{SITE}/fleet/cmd shed")
            assert sub.lines() == [f"{SITE}/fleet/cmd shed"], "forged sheds were dropped"
    with broker.sub("bridge", [f"{SITE}/fleet/cmd"]) as bridge:
        assert broker.pub("controller", f"{SITE}/fleet/cmd", "shed-2").returncode == 0
        bridge.wait_for(f"{SITE}/fleet/cmd shed-2")


@pytest.mark.usefixtures("default_logging")
async def test_no_other_credential_can_take_over_the_controllers_session(
        broker: Broker) -> None:
    """The reported attack: a miner password with the controller's client id kicked it."""
    cfg = BrokerConfig(host="127.0.0.1", port=broker.port, username="controller",
                       password=SecretStr(PASSWORDS["controller"]), keepalive_s=5,
                       reconnect_max_s=1)
    t = Transport(cfg, client_id=CONTROLLER_CLIENT_ID, subscriptions=[])
    task = asyncio.create_task(t.run(lambda *_: None))
    try:
        async with asyncio.timeout(10):
            await t.connected.wait()
        for thief in ("s21-r1-0001", "monitor", "bridge", "s21-r1"):
            for _ in range(3):
                done = await asyncio.to_thread(
                    broker.pub, thief, f"{SITE}/miner/{thief}/telemetry", "x",
                    client_id=CONTROLLER_CLIENT_ID)
                assert done.returncode == 0, done.stderr
        await asyncio.sleep(1.0)  # a kicked controller would be reconnecting by now
        assert t.connects == 1 and t.connected.is_set(), broker.log()
        # The broker took each thief's user name as its client id.
        assert "as s21-r1-0001 (" in broker.log() and "as monitor (" in broker.log()
        assert f"as {CONTROLLER_CLIENT_ID}" not in broker.log()
        # The same check sees a takeover when one happens: the controller's own account
        # (one connection per account) replaces the session, and the controller reconnects.
        done = await asyncio.to_thread(broker.pub, "controller", f"{SITE}/controller/decision")
        assert done.returncode == 0
        for _ in range(200):
            if t.connects >= 2:
                break
            await asyncio.sleep(0.05)
        assert t.connects == 2, "the replaced controller reconnected"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.usefixtures("default_logging")
async def test_the_controller_connects_over_tls(broker: Broker) -> None:
    cfg = BrokerConfig(host="127.0.0.1", port=broker.tls_port, tls=True,
                       ca_file=broker.dir / "ca.crt", username="controller",
                       password=SecretStr(PASSWORDS["controller"]), keepalive_s=5)
    t = Transport(cfg, client_id="tls-test", subscriptions=[])
    with broker.sub("monitor", [f"{SITE}/controller/decision"]) as sub:
        task = asyncio.create_task(t.run(lambda *_: None))
        try:
            async with asyncio.timeout(10):
                await t.connected.wait()
            assert await t.publish(f"{SITE}/controller/decision", "over-tls", qos=1)
            await asyncio.to_thread(sub.wait_for, f"{SITE}/controller/decision over-tls")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    # The TLS listener refuses a client that does not trust the server's CA (and serves one
    # that does: the refusal is about trust).
    other = broker.dir / "other"
    other.mkdir()
    make_certs(other)
    for cafile, ok in ((other / "ca.crt", False), (broker.dir / "ca.crt", True)):
        done = await asyncio.to_thread(
            mqtt_pub, broker.tls_port, auth("controller"), f"{SITE}/controller/decision",
            extra=["--cafile", str(cafile)])
        assert (done.returncode == 0) == ok, (cafile, done.stderr)

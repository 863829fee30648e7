"""deploy/mosquitto against the real mosquitto: it starts as shipped, and its ACL holds.

The shipped mosquitto.conf runs with its paths pointed into tmp (listeners on free
loopback ports, a password file hashed by mosquitto_passwd from passwords.example,
the shipped acl.example, test certificates made with the openssl CLI). Real clients
(mosquitto_pub / mosquitto_sub, and the controller's own Transport over TLS) then try
what a stolen miner credential would try.
"""

from __future__ import annotations

import asyncio
import getpass
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from controller.config import BrokerConfig
from controller.protocol.broker import free_port, wait_for_port
from controller.protocol.transport import Transport
from tests.test_deploy_support import (  # noqa: F401 - default_logging is a fixture
    DEPLOY,
    default_logging,
    log_tail,
    need,
    process,
    run,
)

MOSQUITTO = DEPLOY / "mosquitto"
SITE = "mineops/pecos-1"
PASSWORDS = dict(
    line.split(":", 1) for line in (MOSQUITTO / "passwords.example").read_text().splitlines()
)

pytestmark = pytest.mark.integration


def make_certs(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    openssl = need("openssl")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run([openssl, "req", "-x509", *key, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"),
         "-days", "2", "-subj", "/CN=mineops test CA"])
    run([openssl, "req", *key, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
         "-subj", "/CN=127.0.0.1"])
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run([openssl, "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"),
         "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.crt"),
         "-days", "2", "-extfile", str(d / "ext.cnf")])


def shipped_config(d: Path, port: int, tls_port: int) -> str:
    """deploy/mosquitto/mosquitto.conf with its ports and paths moved into `d`."""
    replace = {
        r"listener 1883 127\.0\.0\.1": f"listener {port} 127.0.0.1",
        r"listener 8883": f"listener {tls_port} 127.0.0.1",
        r"password_file .+": f"password_file {d / 'passwd'}",
        r"acl_file .+": f"acl_file {d / 'acl'}",
        r"cafile .+": f"cafile {d / 'ca.crt'}",
        r"certfile .+": f"certfile {d / 'server.crt'}",
        r"keyfile .+": f"keyfile {d / 'server.key'}",
        r"persistence_location .+": f"persistence_location {d}/",
    }
    text = (MOSQUITTO / "mosquitto.conf").read_text()
    for pattern, new in replace.items():
        text, n = re.subn(rf"^{pattern}$", new, text, flags=re.MULTILINE)
        assert n == 1, f"mosquitto.conf: expected one line matching {pattern!r}"
    # Started as root, mosquitto drops to the 'mosquitto' user, which cannot read pytest's
    # private tmp directory: stay the user running the tests.
    return text + f"user {getpass.getuser()}\n"


@dataclass
class Broker:
    port: int
    tls_port: int
    dir: Path


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    mosquitto, passwd = need("mosquitto"), need("mosquitto_passwd")
    need("mosquitto_pub")
    need("mosquitto_sub")
    make_certs(tmp_path)
    shutil.copy(MOSQUITTO / "passwords.example", tmp_path / "passwd")
    run([passwd, "-U", str(tmp_path / "passwd")])  # hash the plain-text example in place
    assert "change-me" not in (tmp_path / "passwd").read_text()
    shutil.copy(MOSQUITTO / "acl.example", tmp_path / "acl")
    port, tls_port = free_port(), free_port()
    (tmp_path / "mosquitto.conf").write_text(shipped_config(tmp_path, port, tls_port))
    log = tmp_path / "mosquitto.log"
    with process([mosquitto, "-c", str(tmp_path / "mosquitto.conf")], log) as proc:
        for p in (port, tls_port):
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the shipped mosquitto.conf did not start:\n{log_tail(log)}")
                try:
                    wait_for_port("127.0.0.1", p, timeout_s=0.2)
                    break
                except TimeoutError:
                    continue
        yield Broker(port, tls_port, tmp_path)
        assert proc.poll() is None, f"mosquitto died:\n{log_tail(log)}"


def auth(user: str | None) -> list[str]:
    return [] if user is None else ["-u", user, "-P", PASSWORDS[user]]


def pub(b: Broker, user: str | None, topic: str, payload: str = "x", qos: int = 1
        ) -> subprocess.CompletedProcess[str]:
    """Publish once as `user`; returns the finished process (a refused login exits non-zero)."""
    return subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(b.port), "-i", f"t-{user}-{time.time_ns()}",
         *auth(user), "-q", str(qos), "-t", topic, "-m", payload],
        capture_output=True, text=True, timeout=10, check=False)


class Subscriber:
    """mosquitto_sub as `user` in the background; `lines()` are the 'topic payload' received."""

    def __init__(self, b: Broker, user: str, topics: list[str]) -> None:
        self.log = b.dir / f"sub-{user}-{time.time_ns()}.log"
        # Line-buffered: mosquitto_sub writes through stdio, block-buffered into a file.
        unbuffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        self._cmd = [*unbuffered, "mosquitto_sub", "-h", "127.0.0.1", "-p", str(b.port), "-d", "-v",
                     "-i", f"sub-{user}-{time.time_ns()}", *auth(user), "-q", "1"]
        for t in topics:
            self._cmd += ["-t", t]
        self._topics = topics

    def __enter__(self) -> Subscriber:
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(self._cmd, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while "Subscribed (mid" not in self.text():
            assert self.proc.poll() is None, f"mosquitto_sub exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"no SUBACK:\n{self.text()}"
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[str]:
        return [line for line in self.text().splitlines()
                if line.startswith("mineops/")]

    def wait_for(self, line: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while line not in self.lines():
            assert time.monotonic() < deadline, f"{line!r} never arrived; got {self.lines()}"
            time.sleep(0.05)


def test_shipped_acl_is_what_make_acl_writes() -> None:
    generated = run([sys.executable, "make_acl.py", "acl.example.site.toml"],
                    cwd=MOSQUITTO).stdout
    assert (MOSQUITTO / "acl.example").read_text() == generated
    users = {line.split()[1] for line in generated.splitlines() if line.startswith("user ")}
    assert users == set(PASSWORDS), "every ACL account has an example password, and no more"


def test_anonymous_and_wrong_password_are_refused(broker: Broker) -> None:
    anonymous = pub(broker, None, f"{SITE}/signal/grid")
    assert anonymous.returncode != 0
    assert "not authorised" in (anonymous.stderr + anonymous.stdout).lower()
    wrong = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-u", "controller",
         "-P", "guess", "-t", f"{SITE}/group/s21-r1/cmd", "-m", "x"],
        capture_output=True, text=True, timeout=10, check=False)
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
    ]
    sentinel = f"{SITE}/miner/{miner}/telemetry"
    with Subscriber(broker, "monitor", [f"{SITE}/#"]) as everything, \
            Subscriber(broker, "controller", [f"{SITE}/signal/+", f"{SITE}/controller/decision",
                                              f"{SITE}/miner/+/telemetry"]) as controller:
        for topic in forged:
            assert pub(broker, miner, topic, "forged").returncode == 0  # MQTT 3: dropped silently
        # Same client, so in order: once the allowed message is here, the forged ones would be.
        assert pub(broker, miner, sentinel, "sentinel").returncode == 0
        everything.wait_for(f"{sentinel} sentinel")
        controller.wait_for(f"{sentinel} sentinel")
        for sub in (everything, controller):
            assert not [line for line in sub.lines() if "forged" in line], sub.lines()


def test_only_the_controller_commands_and_only_the_grid_source_signals(broker: Broker) -> None:
    with Subscriber(broker, "monitor", [f"{SITE}/#"]) as everything:
        for user, topic in [("controller", f"{SITE}/group/s21-r1/cmd"),
                            ("controller", f"{SITE}/miner/s21-r2-0001/cmd"),
                            ("controller", f"{SITE}/controller/decision"),
                            ("grid-source", f"{SITE}/signal/grid"),
                            ("price-feed", f"{SITE}/signal/price"),
                            ("meter-poi", f"{SITE}/meter/poi/telemetry")]:
            assert pub(broker, user, topic, f"by-{user}").returncode == 0
            everything.wait_for(f"{topic} by-{user}")
        for user, topic in [("price-feed", f"{SITE}/signal/grid"),
                            ("controller", f"{SITE}/signal/grid"),
                            ("grid-source", f"{SITE}/group/s21-r1/cmd"),
                            ("meter-poi", f"{SITE}/meter/other/telemetry"),
                            ("monitor", f"{SITE}/group/s21-r1/cmd")]:
            assert pub(broker, user, topic, f"forged-by-{user}").returncode == 0
        assert pub(broker, "grid-source", f"{SITE}/signal/grid", "sentinel").returncode == 0
        everything.wait_for(f"{SITE}/signal/grid sentinel")
        assert not [line for line in everything.lines() if "forged" in line]


def test_a_miner_reads_only_its_own_and_its_groups_commands(broker: Broker) -> None:
    with Subscriber(broker, "s21-r1-0001", [f"{SITE}/#"]) as miner:
        for topic in (f"{SITE}/miner/s21-r1-0002/cmd", f"{SITE}/group/s21-r2/cmd",
                      f"{SITE}/signal/grid", f"{SITE}/fleet/cmd",
                      f"{SITE}/miner/s21-r1-0001/cmd", f"{SITE}/group/s21-r1/cmd"):
            assert pub(broker, "controller", topic, "cmd").returncode == 0
        miner.wait_for(f"{SITE}/group/s21-r1/cmd cmd")
        assert sorted(miner.lines()) == [f"{SITE}/group/s21-r1/cmd cmd",
                                         f"{SITE}/miner/s21-r1-0001/cmd cmd"]


@pytest.mark.usefixtures("default_logging")
async def test_the_controller_connects_over_tls(broker: Broker) -> None:
    cfg = BrokerConfig(host="127.0.0.1", port=broker.tls_port, tls=True,
                       ca_file=broker.dir / "ca.crt", username="controller",
                       password=SecretStr(PASSWORDS["controller"]), keepalive_s=5)
    t = Transport(cfg, client_id="tls-test", subscriptions=[])
    with Subscriber(broker, "monitor", [f"{SITE}/controller/decision"]) as sub:
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
    # And the TLS listener refuses a client that does not trust the server's CA.
    other = broker.dir / "other"
    other.mkdir()
    make_certs(other)
    untrusted = await asyncio.to_thread(
        subprocess.run,
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.tls_port),
         "--cafile", str(other / "ca.crt"), *auth("controller"),
         "-t", f"{SITE}/controller/decision", "-m", "x"],
        capture_output=True, text=True, timeout=10, check=False)
    assert untrusted.returncode != 0, "a client that does not trust the CA got through"


def test_only_the_controller_writes_and_only_bridges_read_the_fleet_topic(broker: Broker) -> None:
    with Subscriber(broker, "bridge", [f"{SITE}/fleet/cmd"]) as bridge:
        assert pub(broker, "bridge", f"{SITE}/fleet/cmd", "forged").returncode == 0
        assert pub(broker, "s21-r1-0001", f"{SITE}/fleet/cmd", "forged").returncode == 0
        assert pub(broker, "controller", f"{SITE}/fleet/cmd", "shed").returncode == 0
        bridge.wait_for(f"{SITE}/fleet/cmd shed")
        assert bridge.lines() == [f"{SITE}/fleet/cmd shed"], "forged sheds were dropped"

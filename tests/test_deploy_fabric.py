"""Many sites on one fabric, with the real servers: site brokers bridged to a central broker,
and a central Prometheus federating the sites' Prometheus servers.

Brokers: two sites run the shipped deploy/mosquitto/mosquitto.conf (their own ACL from
make_acl.py, their own passwords) with the bridge drop-in make_fabric.py writes, and
bridge over TLS to a central mosquitto running the shipped centre.conf with the ACL
make_fabric.py writes, all on free loopback ports. Each site's ACL has one extra,
test-only account that reads everything on that broker, to see what must not arrive.

Prometheus: two site Prometheus servers (the shipped prometheus.yml, each with its site
label) scrape a tiny exporter each (prometheus_client serving a few mineops series), and
a central one (the shipped central.yml) federates both.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from controller.protocol.broker import free_port
from tests.test_deploy_mosquitto import moved_paths, shipped_config
from tests.test_deploy_support import (
    DEPLOY,
    Subscriber,
    hash_passwords,
    log_tail,
    make_certs,
    mosquitto,
    moved_config,
    mqtt_pub,
    need,
    process,
    query,
    run,
    wait_http,
)

MOSQUITTO = DEPLOY / "mosquitto"
PROMETHEUS = DEPLOY / "prometheus"
SITES = ("site-a", "site-b")
WATCHER = "test-all"  # test-only account on each site broker: reads everything

pytestmark = pytest.mark.integration


def tool(script: str, *args: str) -> str:
    return run([sys.executable, str(MOSQUITTO / script), *args], cwd=MOSQUITTO).stdout


# --- shipped files --------------------------------------------------------------------------


def test_shipped_fabric_examples_are_what_make_fabric_writes() -> None:
    for name in ("bridge.example.conf", "centre.acl.example"):
        shipped = (MOSQUITTO / name).read_text()
        command = shipped.splitlines()[1].lstrip("# ").split()
        assert command[0] == "make_fabric.py"
        assert tool(*command) == shipped, f"{name}: regenerate with {' '.join(command)}"
    acl = (MOSQUITTO / "centre.acl.example").read_text()
    users = {line.split()[1] for line in acl.splitlines() if line.startswith("user ")}
    passwords = (MOSQUITTO / "centre-passwords.example").read_text().splitlines()
    assert users == {line.split(":")[0] for line in passwords}
    assert not [line for line in acl.splitlines() if line.startswith("pattern")]


def test_make_fabric_refuses_bad_site_ids_and_addresses(tmp_path: Path) -> None:
    def fabric(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(MOSQUITTO / "make_fabric.py"), *args],
                              capture_output=True, text=True, timeout=30, check=False)

    for bad in ("+", "a/b", "#", ""):
        out = fabric("centre-acl", "ok", bad)
        assert out.returncode == 2 and "site id" in out.stderr and out.stdout == "", bad
    out = fabric("centre-acl", "a", "a")
    assert out.returncode == 2 and "once each" in out.stderr
    out = fabric("site-bridge", "--site", "a", "--centre", "centre.example", "--cafile", "x")
    assert out.returncode == 2 and "HOST:PORT" in out.stderr
    empty = tmp_path / "empty"
    empty.write_text("")
    out = fabric("site-bridge", "--site", "a", "--centre", "c:8883", "--cafile", "x",
                 "--password-file", str(empty))
    assert out.returncode == 2 and "no password" in out.stderr


def test_central_prometheus_config_and_rules() -> None:
    promtool = need("promtool")
    out = run([promtool, "check", "config", str(PROMETHEUS / "central.yml")])
    assert "SUCCESS" in out.stdout
    central = yaml.safe_load((PROMETHEUS / "central.yml").read_text())
    (job,) = central["scrape_configs"]
    assert job["honor_labels"] is True and job["metrics_path"] == "/federate"
    sites = [sc["labels"]["site"] for sc in job["static_configs"]]
    assert len(sites) == len(set(sites)) >= 2
    # The site Prometheus: its one site label on every target, the same as its external label.
    site = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    labels = {sc["labels"]["site"] for j in site["scrape_configs"] for sc in j["static_configs"]}
    assert labels == {site["global"]["external_labels"]["site"]}


# --- brokers --------------------------------------------------------------------------------


@dataclass
class Fabric:
    centre_port: int
    site_ports: dict[str, int]
    passwords: dict[str, dict[str, str]]  # broker ("centre" or a site) -> user -> password
    dir: Path
    brokers: dict[str, ExitStack]  # broker -> what stops it

    def stop(self, broker: str) -> None:
        self.brokers[broker].close()

    def auth(self, broker: str, user: str) -> list[str]:
        return ["-u", user, "-P", self.passwords[broker][user]]

    def port(self, broker: str) -> int:
        return self.centre_port if broker == "centre" else self.site_ports[broker]

    def pub(self, broker: str, user: str, topic: str, payload: str, *,
            retain: bool = False) -> None:
        done = mqtt_pub(self.port(broker), self.auth(broker, user), topic, payload,
                        retain=retain)
        assert done.returncode == 0, done.stderr

    def sub(self, broker: str, user: str, topics: list[str]) -> Subscriber:
        return Subscriber(self.port(broker), self.auth(broker, user), topics,
                          self.dir / f"sub-{broker}-{user}-{time.time_ns()}.log")

    def log(self, broker: str) -> str:
        return log_tail(self.dir / broker / "mosquitto.log", 20_000)


def start_centre(stack: ExitStack, d: Path) -> tuple[int, int, dict[str, str]]:
    d.mkdir()
    make_certs(d)
    plain = d / "passwords"
    accounts = [f"bridge-{s}" for s in SITES] + ["grid-dispatch", "fleet-monitor"]
    plain.write_text("".join(f"{u}:{secrets.token_hex(12)}\n" for u in accounts))
    passwords = hash_passwords(plain, d / "passwd")
    (d / "acl").write_text(tool("make_fabric.py", "centre-acl", *SITES))
    port, tls_port = free_port(), free_port()
    conf = moved_config((MOSQUITTO / "centre.conf").read_text(), moved_paths(d, port, tls_port),
                        "centre.conf")
    (d / "mosquitto.conf").write_text(conf)
    stack.enter_context(mosquitto(d / "mosquitto.conf", [port, tls_port],
                                  d / "mosquitto.log"))
    return port, tls_port, passwords


def start_site(stack: ExitStack, d: Path, site: str, *, centre_tls_port: int, centre_ca: Path,
               bridge_password: str) -> tuple[int, dict[str, str]]:
    d.mkdir()
    make_certs(d)
    toml = (MOSQUITTO / "acl.example.site.toml").read_text().replace('"pecos-1"', f'"{site}"')
    (d / "site.toml").write_text(toml)
    acl = tool("make_acl.py", str(d / "site.toml"))
    assert f"mineops/{site}/" in acl and "pecos-1" not in acl
    (d / "acl").write_text(acl + f"\n# TEST ONLY\nuser {WATCHER}\ntopic read #\n")
    plain = d / "passwords"
    plain.write_text((MOSQUITTO / "passwords.example").read_text()
                     + f"{WATCHER}:{secrets.token_hex(12)}\n")
    passwords = hash_passwords(plain, d / "passwd")
    (d / "bridge.password").write_text(bridge_password + "\n")
    port, tls_port = free_port(), free_port()
    (d / "mosquitto.conf").write_text(shipped_config(d, port, tls_port))
    (d / "conf.d" / "mineops-centre.conf").write_text(tool(
        "make_fabric.py", "site-bridge", "--site", site,
        "--centre", f"127.0.0.1:{centre_tls_port}", "--cafile", str(centre_ca),
        "--password-file", str(d / "bridge.password")))
    stack.enter_context(mosquitto(d / "mosquitto.conf", [port, tls_port],
                                  d / "mosquitto.log"))
    return port, passwords


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    need("mosquitto_pub")
    need("mosquitto_sub")
    with ExitStack() as stack:
        brokers = {name: ExitStack() for name in ("centre", *SITES)}
        for b in brokers.values():  # stopped in reverse order: the sites, then the centre
            stack.callback(b.close)
        centre_port, centre_tls, centre_pw = start_centre(brokers["centre"],
                                                          tmp_path / "centre")
        ports, passwords = {}, {"centre": centre_pw}
        for site in SITES:
            ports[site], passwords[site] = start_site(
                brokers[site], tmp_path / site, site, centre_tls_port=centre_tls,
                centre_ca=tmp_path / "centre" / "ca.crt",
                bridge_password=centre_pw[f"bridge-{site}"])
        f = Fabric(centre_port, ports, passwords, tmp_path, brokers)
        # Both bridges are up once the centre holds their retained link state "1".
        with f.sub("centre", "fleet-monitor", ["mineops/+/bridge/state"]) as links:
            for site in SITES:
                links.wait_for(f"mineops/{site}/bridge/state 1", timeout_s=15)
        yield f


def test_a_sites_decision_and_availability_reach_the_centre_not_other_sites(
        fabric: Fabric) -> None:
    a = "mineops/site-a"
    with fabric.sub("centre", "fleet-monitor", ["mineops/+/controller/#"]) as centre, \
            fabric.sub("site-b", WATCHER, ["#"]) as site_b:
        fabric.pub("site-a", "controller", f"{a}/controller/decision", "decision-1", retain=True)
        fabric.pub("site-a", "controller", f"{a}/controller/availability", "online",
                   retain=True)
        # Not shared: the site's own traffic stays at the site.
        fabric.pub("site-a", "controller", f"{a}/group/s21-r1/cmd", "local-only")
        fabric.pub("site-a", "s21-r1-0001", f"{a}/miner/s21-r1-0001/telemetry", "local-only")
        centre.wait_for(f"{a}/controller/decision decision-1")
        centre.wait_for(f"{a}/controller/availability online")
        time.sleep(0.5)
        assert sorted(centre.lines()) == [f"{a}/controller/availability online",
                                          f"{a}/controller/decision decision-1"]
        assert not [line for line in site_b.lines() if line.startswith(a)], site_b.lines()
    # Retained at the centre too (the bridge keeps the flag): a dashboard started later sees it.
    with fabric.sub("centre", "fleet-monitor", [f"{a}/controller/#"]) as late:
        late.wait_for(f"{a}/controller/decision decision-1")
        late.wait_for(f"{a}/controller/availability online")


def test_grid_events_from_the_centre_reach_only_their_site(fabric: Fabric) -> None:
    with fabric.sub("site-a", "controller", ["mineops/site-a/signal/#"]) as site_a, \
            fabric.sub("site-b", WATCHER, ["#"]) as site_b:
        fabric.pub("centre", "grid-dispatch", "mineops/site-a/signal/grid", "event-a",
                   retain=True)
        site_a.wait_for("mineops/site-a/signal/grid event-a")
        fabric.pub("centre", "grid-dispatch", "mineops/site-b/signal/grid", "event-b")
        site_b.wait_for("mineops/site-b/signal/grid event-b")
        # In order on one connection: event-b came after event-a would have.
        assert not [line for line in site_b.lines() if "site-a" in line], site_b.lines()
    # Retained at the site as published at the centre: a controller that restarts gets it.
    with fabric.sub("site-a", "controller", ["mineops/site-a/signal/grid"]) as late:
        late.wait_for("mineops/site-a/signal/grid event-a")


def test_a_site_bridge_password_speaks_only_for_its_own_site(fabric: Fabric) -> None:
    stolen = "bridge-site-b"
    with fabric.sub("centre", "fleet-monitor", ["mineops/#"]) as centre, \
            fabric.sub("site-a", WATCHER, ["#"]) as site_a:
        for topic in ("mineops/site-a/controller/decision", "mineops/site-a/signal/grid",
                      "mineops/site-a/bridge/state",
                      "mineops/site-b/signal/grid"):  # nor grid events to its own site
            fabric.pub("centre", stolen, topic, "forged")
        fabric.pub("centre", "grid-dispatch", "mineops/site-a/signal/grid", "sentinel")
        centre.wait_for("mineops/site-a/signal/grid sentinel")
        site_a.wait_for("mineops/site-a/signal/grid sentinel")
        for sub in (centre, site_a):
            assert not [line for line in sub.lines() if "forged" in line], sub.lines()
    # Nor read another site's grid events.
    with fabric.sub("centre", stolen, ["mineops/#"]) as thief:
        fabric.pub("centre", "grid-dispatch", "mineops/site-a/signal/grid", "for-a")
        fabric.pub("centre", "grid-dispatch", "mineops/site-b/signal/grid", "for-b")
        thief.wait_for("mineops/site-b/signal/grid for-b")
        assert not [line for line in thief.lines() if "site-a" in line], thief.lines()


def test_the_centre_sees_a_site_drop_off(fabric: Fabric) -> None:
    with fabric.sub("centre", "fleet-monitor", ["mineops/+/bridge/state"]) as links:
        links.wait_for("mineops/site-a/bridge/state 1")
        fabric.stop("site-a")
        links.wait_for("mineops/site-a/bridge/state 0")
        assert "mineops/site-b/bridge/state 0" not in links.lines()


# --- Prometheus federation ------------------------------------------------------------------


@contextmanager
def exporter(site: str, power_w: float) -> Iterator[int]:
    """A few mineops-named series on a free port, as a site's controller would serve them."""
    registry = CollectorRegistry()
    Gauge("mineops_site_power_watts", "Site power", registry=registry).set(power_w)
    Gauge("mineops_controller_info", "Site and version", ["site", "version"],
          registry=registry).labels(site, "test").set(1)
    Gauge("mineops_group_power_watts", "Group power", ["group"],
          registry=registry).labels("r1").set(power_w / 2)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def prometheus_server(config: dict[str, Any], d: Path) -> Iterator[str]:
    d.mkdir()
    (d / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [need("prometheus"), f"--config.file={d / 'prometheus.yml'}",
           f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
           "--log.level=warn"]
    with process(cmd, d / "prometheus.log") as proc:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/-/ready", proc, d / "prometheus.log")
        yield base
        assert proc.poll() is None, log_tail(d / "prometheus.log")


@pytest.mark.slow
def test_central_prometheus_federates_both_sites_told_apart_by_site(tmp_path: Path) -> None:
    power = {"site-a": 1.25e6, "site-b": 3.5e6}
    with ExitStack() as stack:
        site_bases = {}
        for site in SITES:
            port = stack.enter_context(exporter(site, power[site]))
            config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
            config["global"].update(scrape_interval="1s", evaluation_interval="1s")
            config["global"]["external_labels"]["site"] = site
            config["rule_files"] = [str(PROMETHEUS / "rules" / "mineops.rules.yml")]
            config["scrape_configs"][0]["scrape_timeout"] = "1s"
            (static,) = config["scrape_configs"][0]["static_configs"]
            # Both controllers at the same address, as two sites' hosts may well be.
            static.update(targets=[f"127.0.0.1:{port}"], labels={"site": site})
            site_bases[site] = stack.enter_context(prometheus_server(config, tmp_path / site))
        central = yaml.safe_load((PROMETHEUS / "central.yml").read_text())
        central["global"].update(scrape_interval="1s", evaluation_interval="1s")
        central["rule_files"] = [str(PROMETHEUS / "rules" / "central.rules.yml")]
        (job,) = central["scrape_configs"]
        job["scrape_timeout"] = "1s"
        job["static_configs"] = [
            {"targets": [base.removeprefix("http://")], "labels": {"site": site}}
            for site, base in site_bases.items()]
        base = stack.enter_context(prometheus_server(central, tmp_path / "central"))

        deadline = time.monotonic() + 30
        got: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            got = query(base, "mineops_site_power_watts")
            if len(got) == len(SITES):
                break
            time.sleep(0.5)
        by_site = {r["metric"]["site"]: float(r["value"][1]) for r in got}
        assert by_site == power, got
        for r in got:
            assert r["metric"]["job"] == "mineops", "the site's own job label, kept"
        up = query(base, 'up{job="mineops"}')
        assert sorted(r["metric"]["site"] for r in up) == sorted(SITES)
        assert {r["metric"]["site"] for r in query(base, 'up{job="mineops-federate"} == 1')
                } == set(SITES)
        # A fleet sum over sites at the centre.
        (total,) = query(base, "sum(mineops_site_power_watts)")
        assert float(total["value"][1]) == sum(power.values())
        # Per-group series stay at the sites (central.yml's match[]), where they are.
        assert query(base, "mineops_group_power_watts") == []
        for site, site_base in site_bases.items():
            (group,) = query(site_base, "mineops_group_power_watts")
            assert group["metric"]["site"] == site

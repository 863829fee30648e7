"""deploy/docker-compose.yml, checked structurally: no docker engine runs in the tests.

What can be checked without docker is: the services exist and point at files that
exist, every port is on 127.0.0.1, and the names agree across files (broker host,
credentials in the ACL and password file, Prometheus target, Grafana datasource).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from controller.site_file import load_config
from tests.test_deploy_support import DEPLOY, REPO, run

COMPOSE = DEPLOY / "docker-compose.yml"


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def test_services_and_files_exist() -> None:
    services = compose()["services"]
    assert set(services) == {"mosquitto", "controller", "simulator", "prometheus", "grafana"}
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            assert host.startswith("."), f"{name}: {volume} is not a file shipped in deploy/"
            assert (DEPLOY / host).exists(), f"{name}: {host} does not exist"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is not on loopback only"
        if "build" in svc:
            context = DEPLOY / svc["build"]["context"]
            assert (context / svc["build"]["dockerfile"]).is_file()
            assert (context / "pyproject.toml").is_file()


def test_names_agree_across_files() -> None:
    services = compose()["services"]
    controller, simulator = services["controller"], services["simulator"]
    for svc in (controller, simulator):
        assert svc["environment"]["MINEOPS_BROKER__HOST"] == "mosquitto"
        (mount,) = svc["volumes"]
        assert mount.endswith(":/etc/mineops/site.toml:ro")
        assert (DEPLOY / mount.split(":")[0]).resolve() == DEPLOY / "site.example.toml"
    # Credentials: in the password file and the ACL.
    passwords = dict(line.split(":", 1)
                     for line in (DEPLOY / "compose/passwords").read_text().splitlines())
    for svc in (controller, simulator):
        env = svc["environment"]
        assert passwords[env["MINEOPS_BROKER__USERNAME"]] == env["MINEOPS_BROKER__PASSWORD"]
    acl = (DEPLOY / "compose/mosquitto.acl").read_text()
    assert {line.split()[1] for line in acl.splitlines() if line.startswith("user ")} >= set(
        passwords)
    # Prometheus scrapes the controller service on its metrics port.
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    (target,) = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    port = controller["environment"]["MINEOPS_METRICS__PORT"]
    assert target == f"controller:{port}"
    assert controller["environment"]["MINEOPS_METRICS__HOST"] == "0.0.0.0"
    # Grafana's datasource is the prometheus service; its dashboards folder is mounted.
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    url = urlparse(ds["datasources"][0]["url"])
    assert (url.hostname, url.port) == ("prometheus", 9090)
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/mineops.yml").read_text())["providers"][0]
    assert any(v.endswith(":" + provider["options"]["path"] + ":ro")
               for v in services["grafana"]["volumes"])


def test_compose_acl_is_what_make_acl_writes() -> None:
    out = run([sys.executable, "make_acl.py", "../site.example.toml", "--simulator",
               "--no-miners", "--no-racks"], cwd=DEPLOY / "mosquitto").stdout
    assert (DEPLOY / "compose/mosquitto.acl").read_text() == out
    assert load_config(DEPLOY / "site.example.toml").site_id in out


def test_docs_say_compose_is_not_run_in_tests() -> None:
    text = (REPO / "docs/operating.md").read_text()
    assert "docker" in text and "structurally" in text
    assert Path(COMPOSE).name in text

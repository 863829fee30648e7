"""deploy/prometheus and deploy/grafana against the real Prometheus: promtool, and live PromQL.

The live test runs two sites: two `mineops demo --campus` processes (200 miners each on an
energy campus, each on its own broker), scraped every second by one real `prometheus` with
the shipped scrape config (one static_config per site, each with its `site` label) and
rules. It then evaluates
every PromQL expression of the dashboard, once per site ($site set to that site), and of
the alert rules, through the HTTP API: each must return data, and never another site's.
Each demo gets a grid event and one invalid message first, so the grid-event series and
the "invalid messages" panel (which shows only counters that moved) have data too. Alert
expressions are evaluated without their threshold: see `comparison_operands`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.config import BrokerConfig
from controller.daemon.metrics import Metrics
from controller.protocol.broker import LocalBroker, free_port
from controller.protocol.payloads import GridEvent
from controller.protocol.topics import SiteTopics
from controller.protocol.transport import Transport
from tests.test_deploy_support import (
    DEPLOY,
    REPO,
    log_tail,
    need,
    process,
    query,
    run,
    wait_http,
)

PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules" / "mineops.rules.yml"
CENTRAL_RULES = PROMETHEUS / "rules" / "central.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mineops.json"
SITES = ("site-a", "site-b")
FLEET_ROW = "Fleet (the selected sites together)"

# The grid-event series exist only while the controller knows of an event, so the test
# sends the demo one (a target_kw event below the cap) before checking.
GRID_EVENT_SERIES = ("mineops_grid_event_target_watts", "mineops_grid_event_on_track")

# Grafana's variables, as the test substitutes them (all sites and groups; a rate window
# that holds enough 1 s scrapes). Per-site checks set $site to one site.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$group": ".*",
                     "$site": ".*"}

# Comparisons, and the set operators that join two signals (each side must exist).
_COMPARISON = re.compile(r"==|!=|>=|<=|>|<|\bunless\b|\band\b|\bor\b")
_MODIFIER = re.compile(r"^\s*(bool\b|(on|ignoring|group_left|group_right)\s*\([^)]*\))\s*")


def comparison_operands(expr: str) -> list[str]:
    """The sides of an alert's top-level comparison, modifiers and bare numbers dropped.

    `a > b` gives [a, b]; `a / b > 0.1` gives [a / b]; `time() - t > 60` gives
    [time() - t]; `a unless on(x) b` gives [a, b]. Only comparisons outside (), [], {}
    and quotes split, so label matchers such as {state="offline"} stay whole. An alert
    whose signal side returns data can fire on some data; one whose signal never exists
    never fires.
    """
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            quote = "" if ch == quote and expr[i - 1] != "\\" else quote
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and (m := _COMPARISON.match(expr, i)) and expr[i:i + 2] not in ("=~",
                                                                                      "!~"):
            parts.append(expr[start:i])
            i = start = m.end()
            continue
        i += 1
    parts.append(expr[start:])
    out = []
    for raw in parts:
        operand = raw
        while (m := _MODIFIER.match(operand)) is not None:
            operand = operand[m.end():]
        operand = operand.strip()
        try:
            float(operand)
        except ValueError:
            out.append(operand)
    return out


def test_comparison_operands() -> None:
    assert comparison_operands('up{job="mineops"} == 0') == ['up{job="mineops"}']
    assert comparison_operands("a > b") == ["a", "b"]
    assert comparison_operands('sum(x{s="o"}) / sum(y) > 0.10') == ['sum(x{s="o"}) / sum(y)']
    assert comparison_operands("time() - t > 60") == ["time() - t"]
    assert comparison_operands('a{l=~"x>y"} >= bool on(i) b') == ['a{l=~"x>y"}', "b"]
    assert comparison_operands("a unless on(j) b") == ["a", "b"]


def alert_rules(path: Path = RULES) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def fleet_panels() -> set[str]:
    """Titles of the panels in the fleet row: they sum the selected sites."""
    titles, in_fleet = set(), False
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            in_fleet = panel["title"] == FLEET_ROW
        elif in_fleet:
            titles.add(panel["title"])
    assert titles, f"no {FLEET_ROW!r} row"
    return titles


def dashboard_expressions(site: str = ".*") -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable, with $site = `site`."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dash["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        assert m, f"variable {var['name']}: only label_values(metric, label) is checked"
        out.append((f"variable ${var['name']}", m.group(1)))
    for name, value in {**GRAFANA_VARIABLES, "$site": site}.items():
        out = [(w, e.replace(name, value)) for w, e in out]
    assert not any("$" in e for _, e in out), "a Grafana variable the test does not substitute"
    return out


def all_expressions() -> list[tuple[str, str]]:
    exprs = dashboard_expressions()
    for rule in alert_rules():
        exprs += [(f"alert {rule['alert']}", e) for e in comparison_operands(rule["expr"])]
    return exprs


def test_promtool_check_config() -> None:
    promtool = need("promtool")
    out = run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert "SUCCESS" in out.stdout


def test_promtool_check_rules() -> None:
    promtool = need("promtool")
    out = run([promtool, "check", "rules", str(RULES)])
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_promtool_unit_tests_every_alert() -> None:
    promtool = need("promtool")
    run([promtool, "check", "rules", str(CENTRAL_RULES)])
    files = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
    tested: dict[str, tuple[bool, bool]] = {}
    for f in files:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                fires, quiet = tested.get(t["alertname"], (False, False))
                tested[t["alertname"]] = (fires or bool(t["exp_alerts"]),
                                          quiet or not t["exp_alerts"])
    for rule in alert_rules() + alert_rules(CENTRAL_RULES):
        assert tested.get(rule["alert"]) == (True, True), (
            f"{rule['alert']}: needs a promtool test where it fires and one where it does not")
    run([promtool, "test", "rules", *map(str, files)], cwd=PROMETHEUS)


def test_the_checked_expressions_cover_dashboard_and_alerts() -> None:
    exprs = all_expressions()
    assert len(exprs) > 40
    for series in GRID_EVENT_SERIES:
        assert any(e.startswith(series + "{") for _, e in exprs), series
    alerts = {r["alert"] for r in alert_rules()}
    assert alerts == {"MineopsControllerDown", "MineopsSiteOverCap", "MineopsGridEventOffTrack",
                      "MineopsMeterTelemetryStale", "MineopsMinersOffline",
                      "MineopsMqttDisconnected", "MineopsControllerRestarted",
                      "MineopsControllerCrashLooping", "MineopsDecisionLoopStuck",
                      "MineopsCampusOverImportLimit", "MineopsGridJournalNotDurable",
                      "MineopsWallClockStepped"}


def test_the_controller_exports_process_metrics_and_no_created_series() -> None:
    m = Metrics()
    m.decisions.labels("tick").inc()
    m.decision_seconds.observe(0.01)
    m.messages.labels("price").inc()
    text = generate_latest(m.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # What the restart alerts and the controller panels read.
    assert {"process_start_time_seconds", "process_cpu_seconds",
            "process_resident_memory_bytes", "python_info"} <= set(families)
    (start,) = families["process_start_time_seconds"].samples
    assert time.time() - 7 * 86400 < start.value <= time.time()
    # Counters and the histogram without their _created companions.
    assert "mineops_decisions_total" in text and "mineops_decision_duration_seconds_bucket" in text
    assert "_created" not in text


def send_grid_event_and_invalid_message(broker: LocalBroker, metrics_port: int) -> None:
    """To the demo on `broker`: a retained target_kw event (80 % of its cap, from now), and
    one price that is not JSON (counted as price/bad_json)."""
    deadline = time.monotonic() + 20.0  # the cap is exported from the first decision on
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        m = re.search(r"^mineops_site_power_cap_watts (\S+)$", text, re.MULTILINE)
        if m or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert m, "the demo exports its cap"
    cap_w = float(m[1])
    now = time.time()
    event = GridEvent(id="test-event-1", kind="target_kw", value_kw=0.8 * cap_w / 1000,
                      start_ts=now, end_ts=now + 3600, deadline_ts=now + 30)

    async def publish() -> None:
        cfg = BrokerConfig(host=broker.host, port=broker.port)
        t = Transport(cfg, client_id="test-grid-source", subscriptions=[])
        task = asyncio.create_task(t.run(lambda *_: None))
        try:
            async with asyncio.timeout(10):
                await t.connected.wait()
            topics = SiteTopics("demo")
            assert await t.publish(topics.grid, event.encode(), qos=1, retain=True)
            assert await t.publish(topics.price, b"not json", qos=1)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    structlog.reset_defaults()  # see tests.test_deploy_support.default_logging
    asyncio.run(publish())


def site_labels(result: list[dict[str, Any]]) -> set[str | None]:
    return {r["metric"].get("site") for r in result}


@pytest.mark.integration
@pytest.mark.slow
def test_real_prometheus_with_two_sites_every_expression_returns_each_sites_data(
        tmp_path: Path) -> None:
    prometheus = need("prometheus")
    metrics_ports = {site: free_port() for site in SITES}
    web_port = free_port()
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    del config["global"]["external_labels"]  # one Prometheus, two sites (see prometheus.yml)
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    job["scrape_timeout"] = "1s"
    (static,) = job["static_configs"]
    assert set(static) == {"targets", "labels"}
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"], "labels": {"site": site}}
                             for site, port in metrics_ports.items()]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_cmd = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"]
    base = f"http://127.0.0.1:{web_port}"
    with contextlib.ExitStack() as stack:
        # Each site its own broker, so the test can send each demo a grid event.
        brokers = {site: stack.enter_context(LocalBroker().start()) for site in SITES}
        demos = {}
        for site, port in metrics_ports.items():
            # On an energy campus, so the campus panels and alert have their series too.
            cmd = [sys.executable, "-m", "controller.cli", "demo", "--duration", "120",
                   "--miners", "200", "--campus", "--metrics-port", str(port),
                   "--broker", f"{brokers[site].host}:{brokers[site].port}"]
            log = tmp_path / f"demo-{site}.log"
            demos[site] = (stack.enter_context(process(cmd, log)), log)
        prom_log = tmp_path / "prometheus.log"
        prom = stack.enter_context(process(prom_cmd, prom_log))
        running = [*demos.values(), (prom, prom_log)]
        for site, (demo, log) in demos.items():
            wait_http(f"http://127.0.0.1:{metrics_ports[site]}/metrics", demo, log)
        wait_http(f"{base}/-/ready", prom, prom_log)
        # The invalid message goes out after Prometheus holds the counters' zeros: a rate
        # needs the value before it.
        deadline = time.monotonic() + 20
        while len(query(base, "mineops_mqtt_messages_invalid_total")) < 2 * 96:
            assert time.monotonic() < deadline, "Prometheus never scraped both demos"
            time.sleep(0.5)
        for site in SITES:
            send_grid_event_and_invalid_message(brokers[site], metrics_ports[site])

        checks = [(site, w, e) for site in SITES for w, e in dashboard_expressions(site)]
        checks += [(None, w, e) for w, e in all_expressions()]
        results: dict[tuple[str | None, str], list[dict[str, Any]]] = {}
        missing = checks
        deadline = time.monotonic() + 60.0
        while missing and time.monotonic() < deadline:
            time.sleep(1.0)
            for p, log in running:
                if p.poll() is not None:
                    pytest.fail(f"{p.args[0]} exited {p.returncode}:\n{log_tail(log)}")
            still = []
            for site, w, e in missing:
                got = query(base, e)
                # An alert's signal over all sites counts once every site has it (one
                # demo's grid event may show a scrape before the other's).
                if got and (site is not None or not w.startswith("alert ")
                            or site_labels(got) >= set(SITES)):
                    results[(site, w)] = got
                else:
                    still.append((site, w, e))
            missing = still
        assert not missing, "no data for:\n" + "\n".join(
            f"  {s or 'all sites'}: {w}: {e}" for s, w, e in missing)

        fleet = fleet_panels()
        for (site, where), got in results.items():
            labels = site_labels(got)
            if site is None:  # all sites at once: alerts must tell the sites apart
                if where.startswith("alert "):
                    assert labels == set(SITES), f"{where}: alerts by site, got {labels}"
            elif where == "variable $site":  # the list of sites to choose from
                assert labels == set(SITES), labels
            elif any(where.startswith(f"panel {t!r}") for t in fleet):
                assert labels == {None}, f"{where}: the fleet row sums sites, got {labels}"
            else:
                assert labels == {site}, f"{where} with $site={site}: got {labels}"
        # The fleet row adds the sites up, and the per-site rows split them.
        count = 'count(up{job="mineops", site=~"%s"})'
        assert float(query(base, count % ".*")[0]["value"][1]) == len(SITES)
        assert all(float(query(base, count % s)[0]["value"][1]) == 1 for s in SITES)
        # Only the counters that moved: one per site (the invalid price), not 2 x 96.
        (invalid,) = [e for w, e in dashboard_expressions() if "Invalid messages" in w]
        moved = query(base, invalid)
        assert sorted((r["metric"]["site"], r["metric"]["kind"], r["metric"]["reason"])
                      for r in moved) == [(s, "price", "bad_json") for s in SITES]
        assert query(base, 'up{job="mineops"} == 1'), "the demos are up as seen by Prometheus"
    for p, _ in running:
        assert p.returncode is not None


def test_dashboard_refers_to_the_provisioned_datasource() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert panel["targets"], panel["title"]
    assert REPO.joinpath("README.md").read_text().count("## Dashboard") == 1

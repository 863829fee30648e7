"""deploy/prometheus and deploy/grafana against the real Prometheus: promtool, and live PromQL.

The live test runs `mineops demo` (200 miners, on the test's broker) and a real
`prometheus` scraping it every second with the shipped scrape config and rules,
then evaluates every PromQL expression of the dashboard and of the alert rules
through the HTTP API: each must return data. The demo gets a grid event first, so
the grid-event series exist too. Alert expressions are evaluated without their
threshold: see `comparison_operands`.
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

from controller.config import BrokerConfig
from controller.protocol.broker import LocalBroker, free_port
from controller.protocol.payloads import GridEvent
from controller.protocol.topics import SiteTopics
from controller.protocol.transport import Transport
from tests.test_deploy_support import DEPLOY, REPO, log_tail, need, process, run, wait_http

PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules" / "mineops.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mineops.json"

# The grid-event series exist only while the controller knows of an event, so the test
# sends the demo one (a target_kw event below the cap) before checking.
GRID_EVENT_SERIES = ("mineops_grid_event_target_watts", "mineops_grid_event_on_track")

# Grafana's variables, as the test substitutes them (all groups; a rate window that holds
# enough 1 s scrapes).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$group": ".*"}

_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")
_MODIFIER = re.compile(r"^\s*(bool\b|(on|ignoring|group_left|group_right)\s*\([^)]*\))\s*")


def comparison_operands(expr: str) -> list[str]:
    """The sides of an alert's top-level comparison, modifiers and bare numbers dropped.

    `a > b` gives [a, b]; `a / b > 0.1` gives [a / b]; `time() - t > 60` gives
    [time() - t]. Only comparisons outside (), [], {} and quotes split, so label
    matchers such as {state="offline"} stay whole. An alert whose signal side returns
    data can fire on some data; one whose signal never exists never fires.
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


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable of the dashboard."""
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
    for name, value in GRAFANA_VARIABLES.items():
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
    files = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
    tested: dict[str, tuple[bool, bool]] = {}
    for f in files:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                fires, quiet = tested.get(t["alertname"], (False, False))
                tested[t["alertname"]] = (fires or bool(t["exp_alerts"]),
                                          quiet or not t["exp_alerts"])
    for rule in alert_rules():
        assert tested.get(rule["alert"]) == (True, True), (
            f"{rule['alert']}: needs a promtool test where it fires and one where it does not")
    run([promtool, "test", "rules", *map(str, files)], cwd=PROMETHEUS)


def test_the_checked_expressions_cover_dashboard_and_alerts() -> None:
    exprs = all_expressions()
    assert len(exprs) > 25
    assert {e for _, e in exprs} >= set(GRID_EVENT_SERIES)
    alerts = {r["alert"] for r in alert_rules()}
    assert alerts == {"MineopsControllerDown", "MineopsSiteOverCap", "MineopsGridEventOffTrack",
                      "MineopsMeterTelemetryStale", "MineopsMinersOffline",
                      "MineopsMqttDisconnected"}


def query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def send_grid_event(broker: LocalBroker, metrics_port: int) -> None:
    """Publish a retained target_kw event (80 % of the demo's cap, from now) to the demo."""
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
            assert await t.publish(SiteTopics("demo").grid, event.encode(), qos=1, retain=True)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    structlog.reset_defaults()  # see tests.test_deploy_support.default_logging
    asyncio.run(publish())


@pytest.mark.integration
@pytest.mark.slow
def test_real_prometheus_scrapes_demo_and_every_expression_returns_data(tmp_path: Path) -> None:
    prometheus = need("prometheus")
    metrics_port, web_port = free_port(), free_port()
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    job["scrape_timeout"] = "1s"
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))

    broker = LocalBroker().start()  # ours, so the test can send the demo a grid event
    demo_cmd = [sys.executable, "-m", "controller.cli", "demo", "--duration", "90",
                "--miners", "200", "--metrics-port", str(metrics_port),
                "--broker", f"{broker.host}:{broker.port}"]
    prom_cmd = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"]
    base = f"http://127.0.0.1:{web_port}"
    demo_log, prom_log = tmp_path / "demo.log", tmp_path / "prometheus.log"
    with broker, process(demo_cmd, demo_log) as demo, process(prom_cmd, prom_log) as prom:
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", demo, demo_log)
        wait_http(f"{base}/-/ready", prom, prom_log)
        send_grid_event(broker, metrics_port)
        missing: list[tuple[str, str]] = all_expressions()
        deadline = time.monotonic() + 40.0
        while missing and time.monotonic() < deadline:
            time.sleep(1.0)
            for p, log in ((demo, demo_log), (prom, prom_log)):
                if p.poll() is not None:
                    pytest.fail(f"{p.args[0]} exited {p.returncode}:\n{log_tail(log)}")
            missing = [(w, e) for w, e in missing if not query(base, e)]
        assert not missing, "no data for:\n" + "\n".join(f"  {w}: {e}" for w, e in missing)
        assert query(base, 'up{job="mineops"} == 1'), "the demo is up as seen by Prometheus"
    assert demo.returncode is not None and prom.returncode is not None


def test_dashboard_refers_to_the_provisioned_datasource() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert panel["targets"], panel["title"]
    assert REPO.joinpath("README.md").read_text().count("## Dashboard") == 1

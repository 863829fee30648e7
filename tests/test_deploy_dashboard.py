"""deploy/grafana's dashboard: sites kept apart, units, and what its queries show on chosen data.

The live test in test_deploy_prometheus.py shows every query returns each site's data
from two running demos. Here the queries' meaning is pinned down on data chosen to
break them: promtool evaluates the dashboard's own expressions (read from the JSON)
against synthetic series (a meter that never read, 96 counters of which one moved, a
site without a meter reading), and a real Prometheus scraping a tiny exporter shows the
offline-miners bar gauge in order, most first.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from controller.protocol.broker import free_port
from tests.test_deploy_prometheus import DASHBOARD, FLEET_ROW
from tests.test_deploy_support import need, process, query, run, wait_http


def panels() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return out


def panel(title: str) -> dict[str, Any]:
    (found,) = [p for p in panels() if p["title"] == title]
    return found


def expr(title: str, ref: str = "A", **variables: str) -> str:
    """A panel target's PromQL with Grafana's variables filled in (all sites and groups)."""
    (target,) = [t for t in panel(title)["targets"] if t["refId"] == ref]
    text: str = target["expr"]
    for name, value in {"$__rate_interval": "1m", "$site": ".*", "$group": ".*",
                        **variables}.items():
        text = text.replace(name, value)
    return text


# PromQL identifiers that are series names in our expressions.
_SERIES = re.compile(r"\b(mineops_\w+|process_\w+|up)\b(\{[^}]*\})?")


def test_every_series_is_selected_by_site_and_site_panels_name_the_site() -> None:
    in_fleet = False
    for p in panels():
        if p["type"] == "row":
            in_fleet = p["title"] == FLEET_ROW
            continue
        for t in p["targets"]:
            for name, matchers in _SERIES.findall(t["expr"]):
                assert 'site=~"$site"' in matchers, f"{p['title']}: {name} without $site"
            if not in_fleet:
                assert "{{site}}" in t["legendFormat"], f"{p['title']}: legend without site"
            else:
                assert "{{site}}" not in t["legendFormat"], f"{p['title']}: the fleet is one"
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["site"]["query"]["query"] == 'label_values(up{job="mineops"}, site)'
    assert '$site' in variables["group"]["query"]["query"]


def test_units_follow_the_series() -> None:
    """$/MWh for prices, MWh for energy, $ for money, W, H/s and seconds where they belong."""
    expected = [
        ("_usd_per_mwh", "suffix:$/MWh"), ("_usd_per_hour", "currencyUSD"),
        ("energy_joules_total", "suffix:MWh"), ("_watts", "watt"),
        ("_hashes_per_second{", "Hs"), ("_joules_per_terahash", "suffix:J/TH"),
    ]
    checked = 0
    for p in panels():
        if p["type"] == "row":
            continue
        for t in p["targets"]:
            for needle, unit in expected:
                if needle in t["expr"] and "/ (" not in t["expr"]:
                    assert p["fieldConfig"]["defaults"]["unit"] == unit, (p["title"], needle)
                    checked += 1
            if "energy_joules_total" in t["expr"]:
                assert t["expr"].endswith("/ 3.6e9"), "joules to MWh"
    assert checked >= 20
    ages = panel("Meter reading and decision age")
    assert ages["fieldConfig"]["defaults"]["unit"] == "s"


def test_offline_bar_gauge_is_an_instant_query_sorted_most_first() -> None:
    p = panel("Offline miners by group (top 20)")
    assert p["type"] == "bargauge"
    (t,) = p["targets"]
    # sort_desc orders an instant vector only: a range query ignores it.
    assert t["instant"] is True and t["range"] is False
    assert t["expr"].startswith("sort_desc(topk(20, ")


def promtool_case(series: dict[str, str], eval_time: str,
                  checks: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    return {"interval": "15s",
            "input_series": [{"series": k, "values": v} for k, v in series.items()],
            "promql_expr_test": [{"expr": e, "eval_time": eval_time, "exp_samples": samples}
                                 for e, samples in checks]}


def test_dashboard_queries_on_chosen_data(tmp_path: Path) -> None:
    promtool = need("promtool")
    site = 'job="mineops", instance="c:9108"'
    meter_age = expr("Meter reading and decision age", "A")
    invalid = expr("Invalid messages dropped")
    fleet_power = expr("Fleet power vs cap", "A")
    cases = []
    # A meter that never read (timestamp 0): no age at all, not ~1.8e9 s.
    cases.append(promtool_case(
        {f'mineops_site_meter_last_reading_timestamp_seconds{{{site}, site="a"}}': "0x8",
         # ... and one that read 5 s before each scrape (the clock starts at 0 here).
         f'mineops_site_meter_last_reading_timestamp_seconds{{{site}, site="b"}}':
             "-5+15x8"},
        "2m", [(meter_age, [{"labels": f'{{{site}, site="b"}}', "value": 5}])]))
    # 96 invalid-message counters (8 kinds x 12 reasons, all exported from 0), one moving.
    counters = {
        f'mineops_mqtt_messages_invalid_total{{{site}, site="a", kind="k{k}", '
        f'reason="r{r}"}}': "0x8" for k in range(8) for r in range(12)}
    counters[f'mineops_mqtt_messages_invalid_total{{{site}, site="a", kind="k3", '
             f'reason="r7"}}'] = "0+6x8"  # 6 per 15 s: 0.4/s
    cases.append(promtool_case(counters, "2m", [(invalid, [
        {"labels": '{site="a", kind="k3", reason="r7"}', "value": 0.4}])]))
    # Fleet power: site a metered at 1 MW; site b has no reading and counts at its 3 MW cap.
    cases.append(promtool_case(
        {f'mineops_site_power_watts{{{site}, site="a"}}': "1e6x8",
         f'mineops_site_power_cap_watts{{{site}, site="a"}}': "2e6x8",
         f'mineops_site_power_cap_watts{{{site}, site="b"}}': "3e6x8"},
        "1m", [(fleet_power, [{"labels": "{}", "value": 4e6}])]))
    doc = {"rule_files": [], "evaluation_interval": "15s", "tests": cases}
    (tmp_path / "dashboard.test.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run([promtool, "test", "rules", str(tmp_path / "dashboard.test.yml")])


@pytest.mark.integration
def test_offline_bar_gauge_shows_the_top_groups_most_first(tmp_path: Path) -> None:
    prometheus = need("prometheus")
    registry = CollectorRegistry()
    offline = Gauge("mineops_group_miners", "A group's miners by state", ["group", "state"],
                    registry=registry)
    counts = {f"r{i:02d}": (i * 7) % 25 for i in range(25)}  # 25 groups, shuffled counts
    for group, n in counts.items():
        offline.labels(group, "offline").set(n)
        offline.labels(group, "running").set(40 - n)
    port, web = free_port(), free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    config = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [{"job_name": "mineops", "static_configs": [
                  {"targets": [f"127.0.0.1:{port}"], "labels": {"site": "a"}}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    cmd = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
           f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web}",
           "--log.level=warn"]
    base = f"http://127.0.0.1:{web}"
    try:
        with process(cmd, tmp_path / "prometheus.log") as prom:
            wait_http(f"{base}/-/ready", prom, tmp_path / "prometheus.log")
            deadline = time.monotonic() + 20
            got: list[dict[str, Any]] = []
            while not got and time.monotonic() < deadline:
                time.sleep(0.5)
                got = query(base, expr("Offline miners by group (top 20)"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    shown = [(r["metric"]["group"], float(r["value"][1])) for r in got]
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:20]
    assert [n for _, n in shown] == [float(n) for _, n in top], "most first, the top 20"
    assert {g for g, _ in shown} == {g for g, _ in top}
    assert all(r["metric"]["site"] == "a" for r in got)

"""The command line as an operator meets it: demo, check-config, --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "site.example.toml"


def mineops(*args: str, timeout: float = 60, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}, check=False,
    )


@pytest.mark.integration
def test_demo_runs_and_exits_zero() -> None:
    r = mineops("demo", "--duration", "12", "--miners", "400", "--metrics-port", "0",
                timeout=90)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "final summary" in r.stdout
    assert "miners reporting 400/400" in r.stdout
    assert "over cap in 0 of" in r.stdout


def test_check_config_accepts_the_example() -> None:
    r = mineops("check-config", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert "1000 miners" in r.stdout


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("power_cap_kw = 3600", "power_cap_kw = -5"), "power_cap_kw: Input should be greater"),
        (("power_cap_kw = 3600", "power_cap_kw = 3600\npower_cap_mw = 3"),
         "power_cap_mw: unknown key"),
        (('model = "s21"\ncount = 40', 'model = "s99"\ncount = 40'), "unknown miner model 's99'"),
        (("count = 40", "count = 0"), "fleet.groups.0.count: Input should be greater"),
        (("[broker]", "[broker"), "not valid TOML"),
    ],
)
def test_check_config_names_the_bad_field(tmp_path: Path, edit: tuple[str, str],
                                          expected: str) -> None:
    text = EXAMPLE.read_text()
    assert edit[0] in text
    bad = tmp_path / "site.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    r = mineops("check-config", str(bad))
    assert r.returncode == 2
    assert expected in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, "one clear message"


def test_environment_overrides_the_file() -> None:
    r = mineops("check-config", str(EXAMPLE), env={"MINEOPS_POWER_CAP_KW": "2500"})
    assert r.returncode == 0, r.stderr
    assert "cap 2500 kW" in r.stdout
    r = mineops("check-config", str(EXAMPLE), env={"MINEOPS_BROKER__PORT": "99999"})
    assert r.returncode == 2
    assert "broker.port" in r.stderr


def test_missing_file_and_help() -> None:
    r = mineops("check-config", "/nonexistent/site.toml")
    assert r.returncode == 2 and "no such file" in r.stderr
    r = mineops("demo", "--help")
    assert r.returncode == 0 and "--duration" in r.stdout and "--speed" in r.stdout
    r = mineops("models")
    assert r.returncode == 0 and "Antminer S23 Hydro" in r.stdout


@pytest.mark.integration
def test_demo_on_the_embedded_amqtt_broker() -> None:
    """The fresh-machine path: no mosquitto, the embedded broker carries the demo."""
    r = mineops("demo", "--duration", "10", "--miners", "300", "--metrics-port", "0",
                "--embedded", "amqtt", timeout=90)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "embedded amqtt" in r.stdout
    assert "miners reporting 300/300" in r.stdout


@pytest.mark.integration
def test_run_and_simulate_daemons_stop_cleanly_on_sigterm(tmp_path: Path) -> None:
    from controller.protocol.broker import LocalBroker, free_port, wait_for_port  # noqa: PLC0415
    from tests.conftest import REQUIRE_MOSQUITTO  # noqa: PLC0415

    with LocalBroker(prefer="mosquitto" if REQUIRE_MOSQUITTO else "auto") as broker:
        metrics_port = free_port()
        site = tmp_path / "site.toml"
        site.write_text(EXAMPLE.read_text())
        env = {**os.environ, "MINEOPS_BROKER__PORT": str(broker.port),
               "MINEOPS_METRICS__HOST": "127.0.0.1", "MINEOPS_METRICS__PORT": str(metrics_port),
               "MINEOPS_GRID__JOURNAL_PATH": str(tmp_path / "grid.db")}
        procs = [
            subprocess.Popen([sys.executable, "-m", "controller.cli", "--log-format", "json",
                              *args, "--config", str(site)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for args in (["run"], ["simulate", "--speed", "30"])
        ]
        try:
            wait_for_port("127.0.0.1", metrics_port, timeout_s=20)
            import time  # noqa: PLC0415
            import urllib.request  # noqa: PLC0415

            deadline = time.monotonic() + 30
            body = ""
            while time.monotonic() < deadline:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                    body = resp.read().decode()
                if 'mineops_miners{state="offline"} 0.0' in body:
                    break
                time.sleep(0.5)
            assert 'mineops_miners{state="offline"} 0.0' in body, "all 1,000 miners report"
        finally:
            for p in procs:
                p.send_signal(15)
            outs = [p.communicate(timeout=20) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-2000:]
        # JSON log lines, one event each, from the daemon.
        first = outs[0][1].splitlines()[0]
        assert first.startswith("{") and '"event"' in first

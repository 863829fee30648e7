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

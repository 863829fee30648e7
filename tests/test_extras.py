"""Optional extras: the daemon needs none, and each command that needs one says which.

A missing library is simulated in a child process with `sys.modules[name] = None`, which
makes its import fail exactly as on a machine without it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "site.example.toml"
EXTRA_MODULES = ("pyasic", "openleadr", "matplotlib", "amqtt")


def without(module: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """`mineops argv...` in a process where `module` cannot be imported."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from controller.cli.main import main\n"
            f"sys.exit(main({list(argv)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)


def test_the_daemon_and_the_views_import_no_extra() -> None:
    code = ("import sys\n"
            "import controller.cli.main, controller.daemon.loop, controller.demo, "
            "controller.view.screen, controller.cli.top, controller.cli.events, "
            "controller.backtest.report, simulators.site\n"
            "from controller.cli.main import parser\n"
            "parser()\n"
            f"print(sorted(m for m in {EXTRA_MODULES!r} if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60, check=True)
    assert r.stdout.strip() == "[]"


def test_pyproject_lists_them_as_extras_and_dev_pulls_them_all() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"])
    for name in ("pyasic", "openleadr", "matplotlib", "amqtt"):
        assert name not in deps, f"{name} is an extra, not a dependency of the daemon"
    assert "rich" in deps
    extras = project["optional-dependencies"]
    assert extras["bridge"][0].startswith("pyasic")
    assert extras["ven"][0].startswith("openleadr")
    assert extras["charts"][0].startswith("matplotlib")
    assert extras["embedded-broker"][0].startswith("amqtt")
    assert "mineops[bridge,ven,charts,embedded-broker]" in extras["dev"]


def test_bridge_without_pyasic_names_the_extra() -> None:
    r = without("pyasic", "bridge", "--config", str(EXAMPLE))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("mineops: mineops bridge needs the firmware bridge to real "
                                "miners (pyasic), which is not installed: "
                                "pip install 'mineops[bridge]'")


def test_ven_without_openleadr_names_the_extra(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text(EXAMPLE.read_text().replace(
        "# [openadr]\n# vtn_url", "[openadr]\nvtn_url").replace(
        '# ven_name = "pecos-1"', 'ven_name = "pecos-1"').replace(
        "# level_1_kw = 2500", "level_1_kw = 2500"))
    r = without("openleadr", "ven", "--config", str(site))
    assert r.returncode == 2, r.stderr
    assert "mineops ven needs the OpenADR 2.0b VEN (openleadr), which is not installed: " \
        "pip install 'mineops[ven]'" in r.stderr


def test_backtest_chart_without_matplotlib_fails_before_the_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = without("matplotlib", "backtest", "--config", str(EXAMPLE), "--prices",
                "ercot-hb-south-2024-summer", "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert "the backtest chart" in r.stderr or "its chart" in r.stderr
    assert "pip install 'mineops[charts]'" in r.stderr
    assert not out.exists(), "nothing ran"
    # Without --out the backtest needs no chart, and runs.
    r = without("matplotlib", "backtest", "--config", str(EXAMPLE), "--prices",
                "ercot-hb-south-2024-summer", "--json")
    assert r.returncode == 0, r.stderr


def test_write_png_itself_names_the_extra() -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from controller.backtest.report import write_png\n"
            "from controller.extras import MissingExtra\n"
            "try:\n    write_png(None, None)\n"  # the extra is checked first
            "except MissingExtra as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60, check=True)
    assert "pip install 'mineops[charts]'" in r.stdout


@pytest.mark.parametrize("embedded", ["amqtt", "auto"])
def test_demo_without_any_broker_names_the_extra_and_mosquitto(embedded: str,
                                                               tmp_path: Path) -> None:
    # "auto" finds no mosquitto when PATH has none and the Debian paths are not looked at:
    # run it only where mosquitto is absent, else it would rightly start mosquitto.
    from controller.protocol.broker import find_mosquitto  # noqa: PLC0415

    if embedded == "auto" and find_mosquitto() is not None:
        pytest.skip("mosquitto is installed: auto uses it")
    r = without("amqtt", "demo", "--embedded", embedded, "--duration", "1",
                "--metrics-port", "0")
    assert r.returncode == 2, r.stdout + r.stderr
    assert ("a local MQTT broker needs the embedded MQTT broker (amqtt), which is not "
            "installed: pip install 'mineops[embedded-broker]' (or install mosquitto: "
            "apt-get install mosquitto)") in r.stderr

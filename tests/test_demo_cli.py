"""The command line as an operator meets it: demo, check-config, --help."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
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


@pytest.mark.integration
def test_demo_shows_the_controller_at_work_and_prints_only_changes() -> None:
    """Piped: a real price evening and a grid event in the first seconds, a line per change."""
    r = mineops("demo", "--duration", "24", "--miners", "300", "--metrics-port", "0",
                "--speed", "120", "--event-at", "1", timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = r.stdout.splitlines()
    assert "\x1b" not in r.stdout, "no cursor control on a pipe"
    views = [line for line in out if line.startswith("2024-08-20 ")]
    assert views, r.stdout
    # The site clock is the simulated one, on the ERCOT trace from 17:45 CDT.
    assert views[0].startswith("2024-08-20 17:4")
    assert all(" CDT | site " in line for line in views)
    # Each line says something new: never the same cap, price, states and reasons twice in
    # a row (the clock, the meter's noise and hashrate alone are no news).
    def news(line: str) -> tuple[str, ...]:
        parts = line.split(" | ")
        return (parts[1].split(" / ", 1)[1], parts[2], *parts[4:])

    assert all(news(a) != news(b) for a, b in itertools.pairwise(views))
    assert len(views) < 24 * 2, "a line per change, not per tick"
    assert sum(line.startswith("break-even all-in price (market + adders) at stock incl. 5 % "
                               "aux, at $42.00/PH/day: s19j_pro $56/MWh") for line in out) == 1
    # The grid event: its target and why the cap is there, then the recovery ramp.
    assert any("grid event demo-drill: power target, target" in line for line in views)
    assert any("recovery ramp after a grid obligation ended" in line for line in views)
    assert any("(grid " in line or ", grid " in line for line in views), "reasons by state"
    assert any("= market $" in line and "(real-time) + adders $8.00/MWh" in line
               for line in views)
    title = next(i for i, line in enumerate(out)
                 if line.startswith("== mineops demo: final summary, after 2"))
    final = out[title + 1:]
    assert any(line.startswith("grid event demo-drill (target ") and " MW from " in line and
               line.endswith(": complied") for line in final), final
    assert "miners reporting 300/300" in r.stdout
    assert "over cap in 0 of" in r.stdout


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_ctrl_c_in_a_terminal_ends_with_a_clean_final_summary(tmp_path: Path) -> None:
    """In a real terminal (tmux): the live panel redraws in place; Ctrl-C leaves no debris."""
    sock = f"mineops-test-{os.getpid()}"
    done = tmp_path / "exit-code"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True,
                              check=True, timeout=20).stdout

    # COLUMNS from the test's own environment would override the terminal's width.
    cmd = (f"unset COLUMNS LINES; cd {ROOT} && {sys.executable} -m controller.cli demo "
           f"--miners 300 --metrics-port 0 --event-at 1; echo $? > {done}; "
           f"stty -a > {tmp_path / 'stty'}; sleep 60")
    tmux("new-session", "-d", "-s", "demo", "-x", "132", "-y", "50", cmd)
    try:
        deadline = time.monotonic() + 60
        screen = ""
        while time.monotonic() < deadline and "grid event demo-drill" not in screen:
            time.sleep(0.5)
            screen = tmux("capture-pane", "-p", "-t", "demo")
        assert "site time   2024-08-20 17:" in screen, screen
        assert "(simulated, 60x real time)" in screen
        assert "in force: grid event demo-drill: power target, target" in screen, screen
        assert screen.count("mineops · site demo") == 1, "redrawn in place, not scrolled"
        tmux("send-keys", "-t", "demo", "Enter", "x", "C-c")
        while time.monotonic() < deadline and not done.exists():
            time.sleep(0.3)
        time.sleep(0.5)
        screen = tmux("capture-pane", "-p", "-t", "demo", "-S", "-200")
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True, check=False)
    assert done.read_text().strip() == "0", screen
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    title = next(i for i, line in enumerate(lines)
                 if "mineops demo: final summary, interrupted by Ctrl-C" in line)
    # The live panel was erased: the only panel on screen is the final one, right under
    # the title, whole, and nothing else was written into it.
    assert sum("mineops · site demo" in line for line in lines) == 1, screen
    assert lines[title + 1].startswith("╭") and "mineops · site demo" in lines[title + 1]
    bottom = next(i for i in range(title + 1, len(lines)) if lines[i].startswith("╰"))
    assert all(line.startswith("│") and line.endswith("│")
               for line in lines[title + 2:bottom]), screen
    assert not any("stopped" in line or "^C" in line for line in lines), screen
    after = lines[bottom + 1:]
    assert any("miners reporting 300/300" in line for line in after), screen
    assert any(line.startswith("grid event demo-drill") for line in after), screen
    assert not any("Traceback" in line or "ERROR" in line for line in lines), screen
    assert " echo " in (tmp_path / "stty").read_text(), "terminal echo restored"


@pytest.mark.integration
def test_demo_plans_with_a_price_beyond_the_cap_at_the_cap(tmp_path: Path) -> None:
    """The reviewer's repro: $25 with two $9,000 intervals (ERCOT, February 2021), above
    the default $5,000 cap. Before, the $9,000 prices were dropped as invalid and the
    site ran on at $25 through them."""
    rows = [f"2024-06-01T{9 + i // 4:02d}:{15 * (i % 4):02d}:00-05:00,"
            f"{9000 if i in (3, 4) else 25}" for i in range(12)]
    prices = tmp_path / "spike9k.csv"
    prices.write_text("timestamp,price_usd_per_mwh\n" + "\n".join(rows) + "\n")
    r = mineops("demo", "--prices", str(prices), "--start", "2024-06-01T09:30", "--no-event",
                "--duration", "35", "--miners", "80", "--metrics-port", "0", timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    views = [line for line in r.stdout.splitlines() if line.startswith("2024-06-01 ")]
    at_cap = [line for line in views if "= market $9,000.00/MWh (real-time; planned at the "
              "$5,000 cap)" in line]
    assert at_cap, r.stdout
    assert any(", sleeping 80 (" in line for line in at_cap), "the fleet sleeps at the cap"
    assert not any("market $25.00" in line and (" 09:5" in line or " 10:0" in line)
                   for line in views), "the old price does not stay in force"
    assert "0 invalid messages" in r.stdout
    assert ("2 prices above the site's price cap ($5,000/MWh, [energy] "
            "price_cap_usd_per_mwh): planned with at the cap") in r.stdout


def test_demo_with_its_metrics_port_taken_names_the_address_and_the_option() -> None:
    """Was "mineops: [Errno 98] Address already in use", naming neither."""
    import socket  # noqa: PLC0415

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = mineops("demo", "--duration", "5", "--miners", "40", "--metrics-port", str(port),
                    timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"mineops: metrics endpoint 127.0.0.1:{port}: address already in use (--metrics-port "
        "PORT for another, 0 for any free one)")
    assert "Traceback" not in r.stderr

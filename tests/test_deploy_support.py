"""Helpers for the deploy tests (no tests here): find real server binaries, run and stop them.

A test that needs a binary (prometheus, promtool, mosquitto, mosquitto_passwd, openssl)
skips with the reason when it is missing on a developer's machine. In CI
MINEOPS_REQUIRE_SERVERS=1 (set by .ci/run) turns that skip into a failure;
MINEOPS_REQUIRE_MOSQUITTO=1 does the same for the mosquitto tools only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
REQUIRE_SERVERS = os.environ.get("MINEOPS_REQUIRE_SERVERS") == "1"
REQUIRE_MOSQUITTO = os.environ.get("MINEOPS_REQUIRE_MOSQUITTO") == "1"

# Binary -> Debian package that ships it.
PACKAGES = {
    "prometheus": "prometheus", "promtool": "prometheus", "mosquitto": "mosquitto",
    "mosquitto_passwd": "mosquitto", "mosquitto_pub": "mosquitto-clients",
    "mosquitto_sub": "mosquitto-clients", "openssl": "openssl", "systemd-analyze": "systemd",
}


# Not installed by CI (a container has no systemd): always a skip when missing.
OPTIONAL = {"systemd-analyze"}


def need(tool: str) -> str:
    """Path of `tool`; skip the test without it, or fail when the environment requires it."""
    found = shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.access(p, os.X_OK)), None)
    if found:
        return found
    required = tool not in OPTIONAL and (
        REQUIRE_SERVERS or (REQUIRE_MOSQUITTO and tool.startswith("mosquitto")))
    why = f"{tool} is not installed (Debian: apt-get install {PACKAGES.get(tool, tool)})"
    if required:
        pytest.fail(f"{why}, and MINEOPS_REQUIRE_SERVERS=1 requires the real servers")
    pytest.skip(why)


def run(cmd: Sequence[str], *, timeout_s: float = 30.0, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; fail the test with its output if it exits non-zero."""
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s,
                          cwd=cwd, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@contextmanager
def process(cmd: Sequence[str], log: Path, *, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, output to `log`; terminated (then killed) by its pid at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 20.0) -> None:
    """Wait until `url` answers 200; fail early with the log if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited {proc.returncode}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {timeout_s:g} s:\n{log_tail(log)}")


@pytest.fixture
def default_logging() -> Iterator[None]:
    """structlog back to its defaults around a test that runs the controller's own code.

    `logs.configure` binds the sys.stderr of the moment; a test that ran `mineops` under
    capsys leaves it bound to a closed stream, and the next log line would raise.
    """
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()

"""Helpers for the deploy tests (no tests here): find real server binaries, run and stop them.

A test that needs a binary (prometheus, promtool, mosquitto, mosquitto_passwd, openssl)
skips with the reason when it is missing on a developer's machine. In CI
MINEOPS_REQUIRE_SERVERS=1 (set by .ci/run) turns that skip into a failure;
MINEOPS_REQUIRE_MOSQUITTO=1 does the same for the mosquitto tools only.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog

from controller.protocol.broker import wait_for_port

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


def make_certs(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 in `d`, made with the openssl CLI."""
    openssl = need("openssl")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run([openssl, "req", "-x509", *key, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"),
         "-days", "2", "-subj", "/CN=mineops test CA"])
    run([openssl, "req", *key, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
         "-subj", "/CN=127.0.0.1"])
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run([openssl, "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"),
         "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.crt"),
         "-days", "2", "-extfile", str(d / "ext.cnf")])


def moved_config(text: str, replace: Mapping[str, str], name: str) -> str:
    """A shipped mosquitto config with the lines matching each pattern replaced (exactly once).

    Started as root, mosquitto drops to the 'mosquitto' user, which cannot read pytest's
    private tmp directory: the result stays the user running the tests.
    """
    for pattern, new in replace.items():
        text, n = re.subn(rf"^{pattern}$", new, text, flags=re.MULTILINE)
        assert n == 1, f"{name}: expected one line matching {pattern!r}"
    return text + f"user {getpass.getuser()}\n"


def hash_passwords(plain: Path, out: Path) -> dict[str, str]:
    """`user:password` lines from `plain`, hashed into `out` by mosquitto_passwd; the plain map."""
    shutil.copy(plain, out)
    run([need("mosquitto_passwd"), "-U", str(out)])
    assert ":" in out.read_text() and "change-me" not in out.read_text()
    return dict(line.split(":", 1) for line in plain.read_text().splitlines() if line)


@contextmanager
def mosquitto(conf: Path, ports: Sequence[int], log: Path
              ) -> Iterator[subprocess.Popen[bytes]]:
    """The real mosquitto with `conf`, once it listens on every port; checked alive at the end."""
    with process([need("mosquitto"), "-c", str(conf)], log) as proc:
        for p in ports:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mosquitto -c {conf.name} did not start:\n{log_tail(log)}")
                try:
                    wait_for_port("127.0.0.1", p, timeout_s=0.2)
                    break
                except TimeoutError:
                    continue
        yield proc
        assert proc.poll() is None, f"mosquitto died:\n{log_tail(log)}"


def mqtt_pub(port: int, auth: Sequence[str], topic: str, payload: str = "x", *, qos: int = 1,
             retain: bool = False, client_id: str | None = None,
             extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Publish once with mosquitto_pub; returns the finished process (a refused login exits
    non-zero; a publish the ACL denies is dropped silently and exits 0, as MQTT 3.1.1 says)."""
    return subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port),
         "-i", client_id or f"t-{time.time_ns()}", *auth, "-q", str(qos),
         *(["-r"] if retain else []), *extra, "-t", topic, "-m", payload],
        capture_output=True, text=True, timeout=10, check=False)


class Subscriber:
    """mosquitto_sub in the background; `lines()` are the 'topic payload' lines received."""

    def __init__(self, port: int, auth: Sequence[str], topics: Sequence[str], log: Path,
                 *, prefix: str = "mineops/", extra: Sequence[str] = ()) -> None:
        self.log = log
        self._prefix = prefix
        # Line-buffered: mosquitto_sub writes through stdio, block-buffered into a file.
        unbuffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        self._cmd = [*unbuffered, need("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(port),
                     "-d", "-v", "-i", f"sub-{time.time_ns()}", *auth, "-q", "1", *extra]
        for t in topics:
            self._cmd += ["-t", t]

    def __enter__(self) -> Subscriber:
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(self._cmd, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while "Subscribed (mid" not in self.text():
            assert self.proc.poll() is None, f"mosquitto_sub exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"no SUBACK:\n{self.text()}"
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if line.startswith(self._prefix)]

    def connects(self) -> int:
        """CONNACKs received: more than one means the broker dropped this session."""
        return self.text().count("received CONNACK")

    def wait_for(self, line: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while line not in self.lines():
            assert time.monotonic() < deadline, f"{line!r} never arrived; got {self.lines()}"
            time.sleep(0.05)


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """The result of an instant PromQL query against the Prometheus at `base`."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result

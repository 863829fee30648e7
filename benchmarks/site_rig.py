"""What the end-to-end benchmarks share: a site file, mosquitto and the two daemons, figures.

`Rig` starts a real mosquitto on 127.0.0.1, then `mineops simulate` and `mineops run`
as their own processes for a generated site (racks of two models), and stops them.
`ProcessSampler` reads each process's CPU and RSS once a second (psutil);
`percentiles` gives true percentiles over every sample (numpy's linear interpolation),
never the maximum of a few trials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
import psutil

from controller.protocol.broker import LocalBroker, free_port

ROOT = Path(__file__).resolve().parents[1]


def site_toml(n: int, *, port: int, state: Path, metrics_port: int, rack: int = 40,
              decision_interval_s: float = 30.0, telemetry_stale_s: float = 600.0,
              grid: bool = True, per_group: str = "auto") -> str:
    """A site of `n` miners in racks of `rack` (S21 and S19j Pro racks alternating).

    Cap at 10 kW a miner (never binding on its own), no dwell, wake latency or
    hysteresis: every price or grid change moves the fleet at once, as a benchmark of
    the command path wants.
    """
    racks = []
    for r in range(n // rack):
        model = "s19j_pro" if r % 2 else "s21"
        racks.append(f'[[fleet.groups]]\nname = "r{r:05d}"\nmodel = "{model}"\ncount = {rack}\n')
    grid_tables = f"""[grid]
journal_path = "{state / 'grid.db'}"
prepare_s = 0
recovery_kw_per_min = 1e12
record_interval_s = 60
[grid.frequency]
restore_hold_s = 0.5
""" if grid else f'[grid]\njournal_path = "{state / "grid.db"}"\n'
    return f"""site_id = "bench"
power_cap_kw = {n * 10}
hashprice_usd_per_ph_day = 42.0
[broker]
port = {port}
keepalive_s = 30
[energy]
aux_fraction = 0.05
[policy]
decision_interval_s = {decision_interval_s}
telemetry_stale_s = {telemetry_stale_s}
min_run_s = 0
min_sleep_s = 0
wake_latency_factor = 0
hysteresis_usd_per_mwh = 0
[metrics]
port = {metrics_port}
per_group = "{per_group}"
{grid_tables}
[[meters]]
type = "mineops"
id = "poi"
{chr(10).join(racks)}"""


@dataclass
class Rig:
    """mosquitto + `mineops simulate` + `mineops run` for a generated site; a context manager.

    Args:
        n: Miners.
        simulate: Extra arguments of `mineops simulate`.
        site: Extra arguments of `site_toml`.
    """

    n: int
    simulate: Sequence[str] = ()
    site: dict[str, object] = field(default_factory=dict)
    state: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mineops-bench-")))
    metrics_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.broker = LocalBroker(prefer="mosquitto")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.config = self.state / "site.toml"
        self.apply_log = self.state / "applied.jsonl"

    def __enter__(self) -> Rig:
        self.broker.start()
        self.config.write_text(site_toml(self.n, port=self.broker.port, state=self.state,
                                         metrics_port=self.metrics_port,
                                         **self.site))  # type: ignore[arg-type]
        cmd = [sys.executable, "-m", "controller.cli", "--log-level", "warning"]
        self.procs["simulate"] = subprocess.Popen(
            [*cmd, "simulate", "--config", str(self.config), "--no-prices",
             "--apply-log", str(self.apply_log), *self.simulate], cwd=ROOT)
        self.procs["run"] = subprocess.Popen([*cmd, "run", "--config", str(self.config)],
                                             cwd=ROOT)
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        for p in self.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.broker.close()

    def pids(self) -> dict[str, int]:
        """Process ids by role: mosquitto, simulate, run."""
        out = {name: p.pid for name, p in self.procs.items()}
        if self.broker.pid is not None:
            out["mosquitto"] = self.broker.pid
        return out

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"mineops {name} exited with {p.returncode}")


class ApplyLog:
    """Reads `mineops simulate --apply-log` as it grows: one dict per applied message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, float]] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[dict[str, float]]:
        """Entries appended since the last poll."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        new = [json.loads(line) for line in lines if line]
        self.entries.extend(new)
        return new


@dataclass
class ProcessSampler:
    """CPU % (of one core) and RSS of each process, sampled every `interval_s` in a task."""

    pids: dict[str, int]
    interval_s: float = 1.0
    cpu: dict[str, list[float]] = field(default_factory=dict)
    rss_mb: dict[str, list[float]] = field(default_factory=dict)

    async def run(self) -> None:
        procs = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        for p in procs.values():
            p.cpu_percent(None)  # the first call only starts the interval
        while True:
            await asyncio.sleep(self.interval_s)
            for name, p in procs.items():
                with contextlib.suppress(psutil.Error):
                    self.cpu.setdefault(name, []).append(p.cpu_percent(None))
                    self.rss_mb.setdefault(name, []).append(p.memory_info().rss / 1e6)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per process: mean and p99 CPU %, and the largest RSS in MB."""
        return {name: {"cpu_mean_pct": float(np.mean(self.cpu[name])),
                       "cpu_p99_pct": float(np.percentile(self.cpu[name], 99)),
                       "rss_max_mb": float(max(self.rss_mb[name]))}
                for name in self.cpu if self.cpu[name]}


def percentiles(xs: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """p50/p90/p99 (numpy linear interpolation over every sample) and the max; NaN if none."""
    if not xs:
        return {**{f"p{q}": float("nan") for q in qs}, "max": float("nan")}
    a = np.asarray(xs, dtype=np.float64)
    return {**{f"p{q}": float(np.percentile(a, q)) for q in qs}, "max": float(a.max())}


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    """Print how long a step took (start-up at 300,000 miners takes a while)."""
    t0 = time.monotonic()
    print(f"  {what} ...", end="", flush=True)
    yield
    print(f" {time.monotonic() - t0:.1f} s", flush=True)

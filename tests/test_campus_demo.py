"""`mineops demo --campus`: the miners fill an energy campus's headroom, read over Modbus TCP."""

from __future__ import annotations

import re

import pytest

from tests.test_demo_cli import mineops

pytestmark = pytest.mark.integration


def test_demo_campus_fills_the_headroom_and_keeps_the_interconnect() -> None:
    r = mineops("demo", "--campus", "--duration", "15", "--miners", "200", "--metrics-port",
                "0", "--no-event", timeout=90)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    assert "campus: interconnect" in out and "modbus://127.0.0.1:" in out
    assert "miners reporting 200/200" in out
    # The net import never over the POI limit once settled (the demo samples it).
    assert re.search(r"over cap in 0 of [1-9]\d* samples", out), out[-1500:]
    # The view shows the campus: the miners' headroom and what it is made of.
    lines = [line for line in out.splitlines() if "| campus headroom" in line]
    assert lines, out[-1500:]
    last = lines[-1]
    assert re.search(r"campus headroom \d+\.\d\d MW for the miners: import limit "
                     r"\d+\.\d\d MW, generation \d+\.\d\d MW, firm load \d+\.\d\d MW", last)
    assert "at worst case" not in last  # every campus device was read

"""Messages are not held back by Nagle's algorithm, on the clients' sockets or the broker's.

With Nagle on, a message published while an earlier segment is not yet acknowledged
waits for the peer's delayed ACK: ~40 ms per hop on Linux. Between processes that was
most of a fleet shed's latency (benchmarks/bench_shed_latency.py at 20,000 miners:
grid event -> miners applied p50 46 ms with Nagle, 12 ms without; a frequency dip's
broadcast 46 ms vs 6 ms). Inside one process the kernel's ACK heuristics hide it, so
these tests check the settings themselves: the transport's socket has TCP_NODELAY,
and every mosquitto configuration mineops starts or ships sets `set_tcp_nodelay true`.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from controller.protocol.broker import LocalBroker
from controller.protocol.transport import Transport
from tests.conftest import make_site, wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
async def test_the_transport_socket_sends_at_once(broker: LocalBroker, tasks: Any) -> None:
    cfg = make_site(broker, [("a", "s21", 1)])
    transport = Transport(cfg.broker, client_id="nodelay", subscriptions=[])
    tasks(transport.run(lambda _t, _r: None), "transport")
    await wait_for(transport.connected.is_set, what="connected")
    client = transport._client
    assert client is not None
    sock = client._client.socket()  # aiomqtt's paho client: read, never patched
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.parametrize("conf", ["deploy/mosquitto/mosquitto.conf",
                                  "deploy/compose/mosquitto.conf", "local"])
def test_every_mosquitto_config_disables_nagle(conf: str) -> None:
    if conf == "local":
        broker = LocalBroker(prefer="auto")
        if broker.kind != "mosquitto":
            pytest.skip("mosquitto is not installed")
        broker._command()  # writes the configuration it starts mosquitto with
        text = (Path(broker._dir.name) / "mosquitto.conf").read_text()
        broker.close()
    else:
        text = (ROOT / conf).read_text()
    assert "set_tcp_nodelay true" in text.splitlines()

"""MQTT transport: the only module that imports aiomqtt.

One long-lived connection per process, reconnected with jittered exponential
backoff when the broker goes away; on every (re)connect it re-subscribes and
calls `on_connect` so the owner can re-announce itself (availability, state).

Cancelling `run()` stops it within GOODBYE_TIMEOUT_S + DISCONNECT_TIMEOUT_S whatever the
broker does (answering, slow, frozen, gone). Every aiomqtt call goes through
`propagate_lost_cancel()`: aiomqtt waits for acknowledgements with Python 3.11's
`asyncio.wait_for`, which can swallow a cancellation (controller/cancellation.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiomqtt
import structlog

from controller.cancellation import propagate_lost_cancel
from controller.config import BrokerConfig

log = structlog.get_logger("mineops.transport")

# A clean stop must end within seconds whatever the broker does; together these stay
# well inside the 5 s that the daemons promise for SIGTERM.
GOODBYE_TIMEOUT_S = 1.5  # the owner's last words (availability offline, QoS 1)
DISCONNECT_TIMEOUT_S = 1.5  # MQTT 3.1.1 DISCONNECT has no answer: it only has to be written

MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True, slots=True)
class LastWill:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """The broker connection: up or not, connections made, messages waiting to be handled."""

    connected: bool
    connects: int
    incoming_queue_messages: int


class Transport:
    """A reconnecting MQTT client; `run()` delivers every message to `handler` until cancelled."""

    def __init__(
        self,
        broker: BrokerConfig,
        *,
        client_id: str,
        subscriptions: Sequence[str],
        will: LastWill | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._broker = broker
        self._client_id = client_id
        self._subscriptions = list(subscriptions)
        self._will = will
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_close = on_close
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.connects = 0

    def _make_client(self) -> aiomqtt.Client:
        b = self._broker
        tls: ssl.SSLContext | None = None
        if b.tls:
            tls = ssl.create_default_context(cafile=str(b.ca_file) if b.ca_file else None)
        will = (
            aiomqtt.Will(self._will.topic, self._will.payload, self._will.qos, self._will.retain)
            if self._will
            else None
        )
        client = aiomqtt.Client(
            b.host,
            b.port,
            identifier=self._client_id,
            username=b.username,
            password=b.password.get_secret_value() if b.password else None,
            will=will,
            keepalive=b.keepalive_s,
            tls_context=tls,
            timeout=10,
            max_queued_outgoing_messages=100_000,
            # Without TCP_NODELAY a command waits for the broker's delayed ACK of the
            # previous segment (Nagle): ~40 ms per hop, measured by bench_shed_latency.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # Batches of concurrent publishes are normal here, not a sign of trouble.
        client.pending_calls_threshold = 10_000
        return client

    async def run(self, handler: MessageHandler) -> None:
        """Connect, subscribe and dispatch forever; reconnect on any broker failure."""
        attempt = 0
        while True:
            try:
                async with self._session() as client:
                    with propagate_lost_cancel():
                        for topic in self._subscriptions:
                            await client.subscribe(topic, qos=1)
                    self._client = client
                    self.connects += 1
                    self.connected.set()
                    attempt = 0
                    log.info("mqtt_connected", host=self._broker.host, port=self._broker.port,
                             client_id=self._client_id, connects=self.connects)
                    if self._on_connect:
                        await self._on_connect()
                    try:
                        async for message in client.messages:
                            payload = message.payload
                            raw = payload if isinstance(payload, bytes | bytearray) else str(
                                payload
                            ).encode()
                            handler(message.topic.value, bytes(raw))
                            # Let a decision a message triggered run before the next
                            # message of a backlog (a grid event behind a telemetry burst).
                            await asyncio.sleep(0)
                    except asyncio.CancelledError:
                        await self._say_goodbye()
                        raise
            except aiomqtt.MqttError as e:
                self._lost()
                attempt += 1
                # Full jitter: many clients reconnecting at once do not stampede the broker.
                delay = random.uniform(0.5, 1.0) * min(
                    self._broker.reconnect_max_s, 0.25 * 2 ** min(attempt, 10)
                )
                log.warning("mqtt_disconnected", error=str(e), retry_in_s=round(delay, 2),
                            attempt=attempt)
                await asyncio.sleep(delay)
            finally:
                self._lost()

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[aiomqtt.Client]:
        """A connected client, disconnected on the way out (bounded, see `_disconnect`)."""
        client = self._make_client()
        connected = False
        try:
            with propagate_lost_cancel():
                await client.__aenter__()
                connected = True  # a cancel lost in the CONNACK wait still disconnects
            yield client
        finally:
            if connected:
                await self._disconnect(client)

    async def _disconnect(self, client: aiomqtt.Client) -> None:
        """Disconnect within DISCONNECT_TIMEOUT_S; only a new cancellation escapes.

        This runs with the session's exception in flight, the owner's cancellation above
        all: a disconnect that fails must not replace it (an MqttError escaping here would
        turn a stop into a reconnect in `run()`). aiomqtt itself would wait 10 s for a
        DISCONNECT that a frozen broker never reads.
        """
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                with propagate_lost_cancel():
                    await client.__aexit__(None, None, None)
        except TimeoutError:
            log.warning("mqtt_disconnect_timeout", client_id=self._client_id,
                        timeout_s=DISCONNECT_TIMEOUT_S)
        except Exception as e:  # MqttError, or what paho raised while the socket broke
            log.warning("mqtt_disconnect_failed", client_id=self._client_id, error=repr(e))

    async def _say_goodbye(self) -> None:
        """On a clean stop, let the owner publish its last words while still connected."""
        if self._on_close is None:
            return
        try:
            async with asyncio.timeout(GOODBYE_TIMEOUT_S):
                await self._on_close()
        except TimeoutError:
            log.warning("mqtt_goodbye_timeout", client_id=self._client_id,
                        timeout_s=GOODBYE_TIMEOUT_S)
        except Exception as e:  # best effort: the stop in flight must go on
            log.warning("mqtt_goodbye_failed", client_id=self._client_id, error=repr(e))

    def _lost(self) -> None:
        if self._client is not None:
            self._client = None
            self.connected.clear()
            if self._on_disconnect:
                self._on_disconnect()

    async def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 0, retain: bool = False
    ) -> bool:
        """Publish if connected; False (nothing sent) when the broker is away."""
        client = self._client
        if client is None:
            return False
        try:
            with propagate_lost_cancel():
                await client.publish(topic, payload, qos=qos, retain=retain, timeout=10)
        except aiomqtt.MqttError as e:
            log.warning("mqtt_publish_failed", topic=topic, error=str(e))
            return False
        return True

    def publish_nowait(self, topic: str, payload: bytes) -> bool:
        """Queue a QoS 0 message without waiting for it to be written; False when away.

        For bulk telemetry (a simulator's 100,000 messages a round): awaiting each write
        costs several event-loop turns a message (~150 us). paho writes its queue when
        the socket allows, as the event loop runs.
        """
        client = self._client
        if client is None:
            return False
        # aiomqtt has no synchronous publish; its paho client does (same connection).
        info = client._client.publish(topic, payload, qos=0)
        return info.rc == 0

    def status(self) -> LinkStatus:
        """The connection as metrics show it."""
        client = self._client
        return LinkStatus(connected=self.connected.is_set(), connects=self.connects,
                          incoming_queue_messages=len(client.messages) if client else 0)

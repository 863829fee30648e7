"""MQTT transport: the only module that imports aiomqtt.

One long-lived connection per process, reconnected with jittered exponential
backoff when the broker goes away; on every (re)connect it re-subscribes and
calls `on_connect` so the owner can re-announce itself (availability, state).

With `persistent_session` the client keeps its MQTT session across connections (clean
session off, a fixed client id): the broker keeps its QoS 1 subscriptions and queues
QoS 1 messages for it while it is away (up to mosquitto's `max_queued_messages`; with
`persistence true` across a broker restart too, as of the last save). The controller
uses it so that no grid event published while it is down is lost, and devices so that
commands published while they reconnect wait for them. QoS 0 (telemetry) is not queued.

Cancelling `run()` stops it within GOODBYE_TIMEOUT_S + DISCONNECT_TIMEOUT_S whatever the
broker does (answering, slow, frozen, gone). Every aiomqtt call goes through
`propagate_lost_cancel()`: aiomqtt waits for acknowledgements with Python 3.11's
`asyncio.wait_for`, which can swallow a cancellation (controller/cancellation.py).

Incoming side (docs/scale.md, "Ingest"): received messages wait in an `IncomingQueue`
(aiomqtt's `queue_type`) with one lane per priority (`topics.incoming_lane`): grid events,
meters and commands first, then prices, capabilities and availability, telemetry last.
The queue is bounded in messages and bytes; when full, the oldest message of the least
urgent lane goes (in practice always telemetry), counted by kind in `LinkStatus.dropped`.
Messages are handled in batches without a task per message, yielding to the event loop
after every urgent or control message and every `YIELD_EVERY_S` of telemetry, so a
decision a message triggered runs at once and the socket keeps being read. An owner that
gives `run()` a batch handler gets the queued telemetry as lists (`take_telemetry`:
a few ms of work each, and only while nothing more urgent waits), so it can check and
apply many small rack messages at once.

paho-mqtt reads a packet with three `recv` calls and aiomqtt reads one packet per event
loop turn; on a plain TCP connection `_BufferedSocket` reads in large chunks, takes the
QoS 0 PUBLISH packets (telemetry) out of them itself and leaves every other packet to
paho, so a turn handles every complete packet a read brought. paho's per-packet parse
was most of the per-message cost at high rates (docs/scale.md, "Ingest").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiomqtt
import structlog

from controller.cancellation import propagate_lost_cancel
from controller.config import BrokerConfig
from controller.protocol.topics import LANE_TELEMETRY, LANES, Kind, incoming_lane

log = structlog.get_logger("mineops.transport")

# A clean stop must end within seconds whatever the broker does; together these stay
# well inside the 5 s that the daemons promise for SIGTERM.
GOODBYE_TIMEOUT_S = 1.5  # the owner's last words (availability offline, QoS 1)
DISCONNECT_TIMEOUT_S = 1.5  # MQTT 3.1.1 DISCONNECT has no answer: it only has to be written
PUBLISH_TIMEOUT_S = 10.0  # a QoS 1 message's acknowledgement, before it counts as not sent

MessageHandler = Callable[[str, bytes], None]

# Defaults of the incoming bound: ~1 s of a 20k msg/s flood, or 64 MiB of payloads
# (a few hundred of the largest rack messages), whichever comes first.
MAX_QUEUED_MESSAGES = 20_000
MAX_QUEUED_BYTES = 64 * 1024 * 1024
YIELD_EVERY_S = 0.010  # of telemetry handled back to back
# One batch of telemetry for the batch handler: a few ms of work (racks of 40: ~300
# messages; groups of 1,000: ~10), so YIELD_EVERY_S still bounds what an urgent message waits.
BATCH_MAX_MESSAGES = 1024
BATCH_MAX_BYTES = 512 * 1024
RECV_BYTES = 64 * 1024  # one socket read; paho's packets are then cut from it
READ_BUDGET_S = 0.020  # of reading per wake-up while handling keeps up
KEEP_READING_BELOW = 2_000  # queued messages (and a quarter of the byte bound): keeping up
# A QoS 0 PUBLISH cut short by a read is completed by the next one up to this size (a
# group's largest telemetry is 512 KiB); a larger one is left to paho.
HOLD_MAX_BYTES = 1024 * 1024
LANE_CACHE_TOPICS = 100_000  # topics whose lane is remembered (a miner's or a rack's each)


Incoming = tuple[str, bytes]  # topic, payload
BatchHandler = Callable[[list[Incoming]], None]


class IncomingQueue(asyncio.Queue[Incoming]):
    """The incoming queue (aiomqtt's `queue_type`), by lane, most urgent first, and bounded.

    Items are (topic, payload): paho's messages go in directly (`_tune_client`), without
    aiomqtt's Message objects. `get_nowait()` returns the oldest message of the most urgent
    non-empty lane. When `max_messages` or `max_bytes` is reached, the oldest message of
    the least urgent non-empty lane is dropped to make room, unless the new message is less
    urgent than everything queued (then it is the one dropped). Drops are counted by kind.

    Args:
        maxsize: The message bound (aiomqtt passes `max_queued_incoming_messages`);
            0 or less: MAX_QUEUED_MESSAGES.
        max_bytes: The bound on queued payload bytes.
    """

    def __init__(self, maxsize: int = 0, *, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.max_messages = maxsize if maxsize > 0 else MAX_QUEUED_MESSAGES
        self.max_bytes = max_bytes
        self.bytes = 0
        self.count = 0
        self.dropped: Counter[tuple[str, str]] = Counter()
        self.last_lane = LANE_TELEMETRY  # of the message `get_nowait` returned last
        self._lanes: list[deque[tuple[Incoming, int, Kind]]] = [deque() for _ in range(LANES)]
        self._lane_of: dict[str, tuple[int, Kind]] = {}  # by topic
        super().__init__(0)  # unbounded to asyncio: the bound is ours, by lane

    def _init(self, maxsize: int) -> None:
        self._queue = _Sized(self)

    def __len__(self) -> int:
        return self.count

    def lane_sizes(self) -> list[int]:
        """Messages queued per lane, most urgent lane first (for metrics and tests)."""
        return [len(lane) for lane in self._lanes]

    def _put(self, item: Incoming) -> None:
        if not isinstance(item, tuple):  # aiomqtt's own Message (untuned client)
            item = _as_incoming(item)
        lanes_of = self._lane_of
        lane_kind = lanes_of.get(item[0])
        if lane_kind is None:
            lane_kind = incoming_lane(item[0])
            if len(lanes_of) >= LANE_CACHE_TOPICS:
                lanes_of.clear()  # topics come back: a full cache refills within a round
            lanes_of[item[0]] = lane_kind
        lane, kind = lane_kind
        size = len(item[1])
        lanes = self._lanes
        while self.bytes + size > self.max_bytes or self.count >= self.max_messages:
            victim = next((k for k in range(LANES - 1, -1, -1) if lanes[k]), None)
            if victim is None or victim < lane:  # the newcomer is the least urgent
                self.dropped[(kind.value, "queue_full")] += 1
                return
            _, old_size, old_kind = lanes[victim].popleft()
            self.bytes -= old_size
            self.count -= 1
            self.dropped[(old_kind.value, "queue_full")] += 1
        lanes[lane].append((item, size, kind))
        self.bytes += size
        self.count += 1

    def take_telemetry(self, max_messages: int = BATCH_MAX_MESSAGES,
                       max_bytes: int = BATCH_MAX_BYTES) -> list[Incoming]:
        """The oldest telemetry messages, if nothing more urgent is queued (else none).

        At most `max_messages`, and no more than `max_bytes` of payloads unless the first
        message alone is larger.
        """
        lanes = self._lanes
        lane = lanes[LANE_TELEMETRY]
        if not lane or any(lanes[k] for k in range(LANE_TELEMETRY)):
            return []
        out: list[Incoming] = []
        taken = 0
        popleft = lane.popleft
        while lane and len(out) < max_messages:
            size = lane[0][1]
            if out and taken + size > max_bytes:
                break
            out.append(popleft()[0])
            taken += size
        self.bytes -= taken
        self.count -= len(out)
        self.last_lane = LANE_TELEMETRY
        return out

    def _get(self) -> Incoming:
        for k, lane in enumerate(self._lanes):
            if lane:
                item, size, _ = lane.popleft()
                self.bytes -= size
                self.count -= 1
                self.last_lane = k
                return item
        raise asyncio.QueueEmpty


class _Ack:
    """What aiomqtt's on_publish sets when a PUBACK comes: resolves `publish_now`'s future.

    aiomqtt calls `.set()` on it, as on the asyncio.Event its own publish waits on.
    """

    __slots__ = ("_done", "_timer")

    def __init__(self, done: asyncio.Future[bool], timer: asyncio.TimerHandle) -> None:
        self._done = done
        self._timer = timer

    def set(self) -> None:
        self._timer.cancel()
        if not self._done.done():
            self._done.set_result(True)


def _unacknowledged(done: asyncio.Future[bool], pending: dict[int, Any], mid: int,
                    topic: str) -> None:
    pending.pop(mid, None)
    if not done.done():
        log.warning("mqtt_publish_failed", topic=topic,
                    error=f"not acknowledged within {PUBLISH_TIMEOUT_S:g} s")
        done.set_result(False)


def _as_incoming(message: aiomqtt.Message) -> Incoming:
    payload = message.payload
    raw = payload if isinstance(payload, bytes) else (
        bytes(payload) if isinstance(payload, bytearray) else str(payload).encode())
    return message.topic.value, raw


class _Sized:
    """What asyncio.Queue keeps as `_queue`: only its length is read (empty, qsize)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: IncomingQueue) -> None:
        self._owner = owner

    def __len__(self) -> int:
        return len(self._owner)


class _BufferedSocket:
    """A plain socket for paho whose `recv` is served from large reads.

    aiomqtt's reader, woken by the event loop when the socket is readable, calls paho's
    `loop_read()` (one packet) again while `pending()` (meant for TLS) is positive. The
    buffer answers `pending()`, so one wake-up parses every complete packet its reads
    brought. How much one wake-up reads: one RECV_BYTES read while handling is behind
    (`keep_reading()` false: more would only be dropped); while it keeps up, on until the
    socket is empty or READ_BUDGET_S has passed, so that a backlog moves from the kernel
    into the incoming queue, where urgent messages overtake telemetry.

    QoS 0 PUBLISH packets (MQTT 3.1.1 section 3.3: fixed header 0x30-0x39 without QoS
    bits, remaining length, topic, payload; no packet id, nothing to answer) that lie
    whole in the buffer at a packet boundary go to `deliver` as (topic, payload) without
    paho: paho's pure-Python parse of each is most of the per-message cost. One that a
    read cut short (most reads end inside a rack's message) is held back, out of
    `pending()`, and completed by the next read, up to HOLD_MAX_BYTES. Every other packet
    (CONNACK, SUBACK, QoS 1 PUBLISH and its PUBACK, PINGRESP, a larger split packet) is
    paho's, as is everything else about the socket.
    """

    def __init__(self, sock: socket.socket, paho: Any, deliver: Callable[[Incoming], None],
                 keep_reading: Callable[[], bool]) -> None:
        self._sock = sock
        self._paho = paho
        self._deliver = deliver
        self._keep_reading = keep_reading
        self._buf = b""
        self._pos = 0
        self._held = b""  # the start of a QoS 0 PUBLISH that the last read cut short
        self._may_read = True  # this wake-up has not read the socket yet
        self._woke_at = 0.0

    def recv(self, n: int) -> bytes:
        while True:
            if self._pos >= len(self._buf):
                now = time.perf_counter()
                if self._may_read:
                    self._may_read = False
                    self._woke_at = now
                elif not (self._keep_reading() and now - self._woke_at < READ_BUDGET_S):
                    raise BlockingIOError  # paho keeps its partial packet for the next wake-up
                data = self._sock.recv(max(n, RECV_BYTES))
                if not data:
                    return data  # the broker closed: paho sees it
                if self._held:
                    data, self._held = self._held + data, b""
                self._buf, self._pos = data, 0
            if n == 1 and self._paho._in_packet["command"] == 0:  # paho is between packets
                if self._publishes():
                    self._held, self._buf, self._pos = self._buf[self._pos:], b"", 0
                    continue
                if self._pos >= len(self._buf):
                    continue
            end = self._pos + n
            out = self._buf[self._pos:end]
            self._pos = end
            return out

    def _publishes(self) -> bool:
        """Deliver the whole QoS 0 PUBLISH packets at the front of the buffer.

        Returns True if the front is then one cut short by the read (and small enough to
        hold).
        """
        buf, pos, size = self._buf, self._pos, len(self._buf)
        deliver = self._deliver
        split = False
        while pos < size and buf[pos] & 0xF6 == 0x30:  # PUBLISH, QoS 0 (DUP, RETAIN: any)
            length, mult, i = 0, 1, pos + 1
            while i < size and i - pos <= 4:  # the remaining length: 1-4 bytes
                byte = buf[i]
                i += 1
                length += (byte & 0x7F) * mult
                mult <<= 7
                if not byte & 0x80:
                    break
            else:  # the read ended inside it, or a fifth byte (malformed: paho's)
                split = i >= size and i - pos <= 4
                break
            end = i + length
            if end > size:
                split = end - pos <= HOLD_MAX_BYTES
                break
            topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1]) if length >= 2 else end + 1
            if topic_end > end:
                break  # malformed: paho's
            try:
                topic = buf[i + 2:topic_end].decode()
            except UnicodeDecodeError:
                break  # paho drops it, as it would have
            deliver((topic, buf[topic_end:end]))
            pos = end
        if pos != self._pos:
            # paho's keepalive: bytes it did not parse itself were received all the same.
            self._paho._last_bytes_received = time.monotonic()
        self._pos = pos
        return split

    def pending(self) -> int:
        left = len(self._buf) - self._pos
        if left <= 0:
            self._may_read = True  # the reader stops here: its next wake-up may read again
        return max(left, 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _tune_client(client: aiomqtt.Client, queue: IncomingQueue) -> bool:
    """Give the paho client under `client` our reads and our queue; True if it took.

    paho gets a `_BufferedSocket` once it opens a plain TCP socket, and puts its messages
    straight into `queue` as (topic, payload); its writer is registered at once on the
    event loop's thread (`publish_now`).

    It reaches into aiomqtt (2.x) and paho (2.x) internals, pinned in pyproject.toml;
    if they are not as expected, nothing changes (a log line says so) and aiomqtt
    delivers as it always does.
    """
    paho = getattr(client, "_client", None)
    opened = getattr(paho, "on_socket_open", None)
    if paho is None or opened is None or not hasattr(paho, "_sock") \
            or getattr(paho, "_in_packet", {}).get("command") != 0 \
            or getattr(client, "_queue", None) is not queue:
        log.warning("mqtt_read_tuning_unavailable", aiomqtt=aiomqtt.__version__)
        return False

    def on_socket_open(paho_client: Any, userdata: Any, sock: Any) -> None:
        # TLS sockets keep paho's own reads: their decrypted leftovers need pending() as is.
        plain = isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket)
        if isinstance(sock, socket.socket):
            # aiomqtt sets its socket_options only on a plain socket.socket, after this
            # wrapper replaced it: without TCP_NODELAY commands wait ~40 ms (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if plain and paho_client._sock is sock:
            paho_client._sock = _BufferedSocket(
                sock, paho_client, queue.put_nowait,
                lambda: queue.count < KEEP_READING_BELOW and queue.bytes < queue.max_bytes // 4)
        opened(paho_client, userdata, sock)

    put = queue.put_nowait

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        put((message.topic, message.payload))

    register_later = paho.on_socket_register_write  # aiomqtt's: add_writer, scheduled

    def on_socket_register_write(paho_client: Any, userdata: Any, sock: Any) -> None:
        # aiomqtt adds its writer on a later loop turn (paho may call this from the
        # connecting thread). Transport.publish_now writes at once, and paho then asks
        # to remove the writer before that turn adds it: a writer left watching a
        # writable socket with nothing to write spins the loop. On the loop's own
        # thread the writer is added now, so add and remove stay in order.
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # the connecting thread
            register_later(paho_client, userdata, sock)
            return
        if running is not getattr(client, "_loop", None):
            register_later(paho_client, userdata, sock)
            return

        def write() -> None:
            try:
                paho_client.loop_write()
            except Exception as exc:  # a broken socket: the session ends, as in aiomqtt
                if not client._disconnected.done():
                    client._disconnected.set_exception(exc)

        running.add_writer(sock.fileno(), write)

    paho.on_socket_open = on_socket_open
    paho.on_message = on_message
    paho.on_socket_register_write = on_socket_register_write
    return True


@dataclass(frozen=True, slots=True)
class LastWill:
    """What the broker publishes for a client that drops without a DISCONNECT (MQTT 3.1.1)."""

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
    # Messages dropped before handling, by (kind, reason): "queue_full" (IncomingQueue).
    dropped: dict[tuple[str, str], int] = field(default_factory=dict)


class Transport:
    """A reconnecting MQTT client; `run()` delivers every message to `handler` until cancelled.

    Args:
        broker: Where the broker is and how to log in (`[broker]` of the site file).
        client_id: The MQTT client id (fixed, for a persistent session).
        subscriptions: Topic filters subscribed on every connect (QoS 1).
        will: The last will, set on every connect.
        on_connect: Awaited after each connect and subscribe (republish retained state).
        on_disconnect: Called when a connection is lost.
        on_close: Awaited on a clean stop while still connected (publish "offline").
        max_queued_messages: Bound of the incoming queue, messages (IncomingQueue).
        max_queued_bytes: Bound of the incoming queue, payload bytes.
        persistent_session: Keep the session (subscriptions, QoS 1 messages queued while
            away) on the broker across reconnects: clean_session false.
    """

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
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        persistent_session: bool = False,
    ) -> None:
        self._broker = broker
        self._persistent = persistent_session
        self._max_queued_messages = max_queued_messages
        self._max_queued_bytes = max_queued_bytes
        self._queue: IncomingQueue | None = None
        self._tuned = False
        # Drops of earlier sessions' queues, so the counters never go back.
        self._dropped_before: Counter[tuple[str, str]] = Counter()
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
            # A persistent session needs the same id on every connect (mosquitto's
            # use_username_as_clientid gives it the account name, fixed too).
            clean_session=not self._persistent,
            username=b.username,
            password=b.password.get_secret_value() if b.password else None,
            will=will,
            keepalive=b.keepalive_s,
            tls_context=tls,
            timeout=10,
            max_queued_outgoing_messages=100_000,
            queue_type=self._new_queue,  # type: ignore[arg-type]
            max_queued_incoming_messages=self._max_queued_messages,
            # Without TCP_NODELAY a command waits for the broker's delayed ACK of the
            # previous segment (Nagle): ~40 ms per hop, measured by bench_shed_latency.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # Batches of concurrent publishes are normal here, not a sign of trouble.
        client.pending_calls_threshold = 10_000
        assert self._queue is not None  # made by the constructor above (queue_type)
        self._tuned = _tune_client(client, self._queue)
        return client

    def _new_queue(self, maxsize: int = 0) -> IncomingQueue:
        """A fresh IncomingQueue per session (aiomqtt's queue_type), kept to drain and count."""
        if self._queue is not None:
            self._dropped_before.update(self._queue.dropped)
        self._queue = IncomingQueue(maxsize, max_bytes=self._max_queued_bytes)
        return self._queue

    async def run(self, handler: MessageHandler, telemetry: BatchHandler | None = None) -> None:
        """Connect, subscribe and dispatch forever; reconnect on any broker failure.

        Args:
            handler: Called with each message (topic, payload).
            telemetry: If given, called instead with telemetry taken from the queue in
                batches (`IncomingQueue.take_telemetry`: up to BATCH_MAX_MESSAGES and
                BATCH_MAX_BYTES, in the order received, while nothing more urgent waits).
        """
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
                        await self._dispatch(client, handler, telemetry)
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

    async def _dispatch(self, client: aiomqtt.Client, handler: MessageHandler,
                        telemetry: BatchHandler | None) -> None:
        """Hand every message to `handler`, by lane, until the connection ends.

        Telemetry goes in batches to `telemetry`, if given.

        The first message after a quiet spell is awaited through aiomqtt (it also raises
        MqttError when the connection drops); a backlog is then taken from the queue
        directly, with no task per message. Control returns to the event loop (where the
        socket is read, and decisions run) after any message above telemetry and every
        YIELD_EVERY_S.
        """
        queue = self._queue
        assert queue is not None
        messages = client.messages
        clock = time.perf_counter
        while True:
            first = cast(Incoming, await messages.__anext__())
            if telemetry is not None and queue.last_lane == LANE_TELEMETRY:
                telemetry([first, *queue.take_telemetry()])
            else:
                handler(*first)
            started = clock()
            while queue.count:
                if telemetry is not None and (batch := queue.take_telemetry()):
                    telemetry(batch)
                else:
                    topic, payload = queue.get_nowait()
                    handler(topic, payload)
                    if queue.last_lane < LANE_TELEMETRY:
                        await asyncio.sleep(0)
                        started = clock()
                        continue
                if clock() - started > YIELD_EVERY_S:
                    await asyncio.sleep(0)
                    started = clock()

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
                await client.publish(topic, payload, qos=qos, retain=retain,
                                     timeout=PUBLISH_TIMEOUT_S)
        except aiomqtt.MqttError as e:
            log.warning("mqtt_publish_failed", topic=topic, error=str(e))
            return False
        return True

    def publish_now(self, topic: str, payload: bytes | str, *, qos: int = 1,
                    retain: bool = False) -> asyncio.Future[bool]:
        """Publish at once; the future tells whether the broker acknowledged it.

        The message is handed to paho and written to the socket (as far as it takes it)
        before this returns.

        `publish()` is a coroutine: its message reaches paho when its task first runs and
        the socket when the event loop next serves writers, turns a loop busy with
        telemetry can fill with batches (a grid event's command left 5-46 ms after its
        decision, bench_shed_latency). Messages published here go out in the order of
        the calls.

        Returns:
            A future: True once the broker acknowledged the message (QoS 1; QoS 0: once
            handed over), False if the broker is away, paho refused it, or no
            acknowledgement came within PUBLISH_TIMEOUT_S (the session may have ended).
            Dropping it unawaited is harmless.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        client = self._client
        if client is None:
            done.set_result(False)
            return done
        paho = client._client
        info = paho.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != 0:
            log.warning("mqtt_publish_failed", topic=topic, error=f"paho rc {info.rc}")
            done.set_result(False)
            return done
        if qos and not info.is_published():
            # aiomqtt's on_publish calls .set() on it when the PUBACK comes: registered
            # before any read can bring one, as aiomqtt's own publish does.
            pending = client._pending_publishes
            ack = _Ack(done, loop.call_later(PUBLISH_TIMEOUT_S, _unacknowledged, done,
                                             pending, info.mid, topic))
            pending[info.mid] = ack  # type: ignore[assignment]
        else:
            done.set_result(True)
        if self._tuned:  # the writer is registered in step (`_tune_client`): safe to write
            try:
                paho.loop_write()
            except Exception as e:  # a broken socket: aiomqtt's own writer sees it too
                log.warning("mqtt_write_failed", topic=topic, error=repr(e))
        return done

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
        dropped = Counter(self._dropped_before)
        if self._queue is not None:
            dropped.update(self._queue.dropped)
        return LinkStatus(connected=self.connected.is_set(), connects=self.connects,
                          incoming_queue_messages=len(client.messages) if client else 0,
                          dropped=dict(dropped))

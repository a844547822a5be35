"""The built-in registry service: its wire protocol, its limits, its
hand-over from a forwarder, and its client's connection handling.

Hostile or broken peers (garbage, oversized or unknown requests, wrong roles,
silence) lose their connection, with one WARNING line each, and the service
keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fastnat.discovery import open_registry
from fastnat.discovery.service import RegistryLimits, RegistryServer, RegistryService, ServiceRegistry
from fastnat.errors import ControlProtocolError, RegistryUnavailableError
from fastnat.protocol import (
    HELLO_SIZE,
    MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    REGISTRY_REQUESTS,
    REQUESTS,
    ROLE_CLIENT,
    ROLE_REGISTRY,
    HelloStatus,
    MessageReader,
    Status,
    decode_message_body,
    encode_hello,
    encode_message,
    encode_reply,
    encode_request,
    parse_hello,
    parse_reply,
    parse_request,
)

from .support import LOOPBACK, RawConnection, eventually, run_async

LOGGER = "fastnat.discovery.service"


def serve(
    body: Callable[[RegistryServer], Awaitable[Any]], timeout: float = 20.0, loop_kind: str = "asyncio", **limits: Any
) -> Any:
    """Run ``body(server)`` with a RegistryServer on loopback."""

    async def main() -> Any:
        async with RegistryServer(LOOPBACK, 0, limits=RegistryLimits(**limits)) as server:
            return await body(server)

    return run_async(main(), timeout=timeout, loop_kind=loop_kind)


LOOPS = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)


# ------------------------------------------------------------ protocol


def test_protocol_knows_the_registry_role_and_requests() -> None:
    assert parse_hello(encode_hello(ROLE_REGISTRY)).role == ROLE_REGISTRY
    assert len(encode_hello(ROLE_REGISTRY)) == HELLO_SIZE
    with pytest.raises(ValueError):
        encode_hello(b"X")
    assert REGISTRY_REQUESTS == {"announce", "lookup", "withdraw"} and REGISTRY_REQUESTS <= REQUESTS
    good = {
        "announce": {"key": "k", "value": "v", "ttl": 1.5},
        "lookup": {"key": "k", "max_values": 3},
        "withdraw": {"key": "k", "value": "v"},
    }
    for name, value in good.items():
        request = parse_request({"id": 1, "request": name, "value": value})
        assert request.request == name and request.value == value
        encode_request(1, name, value)
    bad = [
        ("announce", {"key": "k", "value": "v"}, "lacks ttl"),
        ("announce", {"key": "k", "value": "v", "ttl": 1, "extra": 1}, "unexpected 'extra'"),
        ("announce", {"key": "", "value": "v", "ttl": 1}, "key"),
        ("announce", {"key": "k", "value": "v", "ttl": 0}, "ttl"),
        ("announce", {"key": "k", "value": "v", "ttl": "1"}, "ttl"),
        ("announce", ["k", "v", 1], "object"),
        ("lookup", {"key": "k", "max_values": 0}, "max_values"),
        ("lookup", {"key": "k"}, "lacks max_values"),
        ("withdraw", {"key": "k", "value": 7}, "value"),
        ("withdraw", None, "object"),
    ]
    for name, value, message in bad:
        with pytest.raises(ControlProtocolError, match=message):
            parse_request({"id": 1, "request": name, "value": value})
        with pytest.raises(ControlProtocolError):
            encode_request(1, name, value)


def test_messages_round_trip_what_a_peer_can_send() -> None:
    """What decodes re-encodes, and what cannot be re-encoded does not decode
    (found by fuzz/fuzz_control.py)."""
    # "\ud800" decodes to a lone surrogate, which has no UTF-8 form: it is
    # written back as the same escape.
    body = b'{"id":1,"status":"FAILED","value":"\\ud800 \\udfff\xc3\xa9"}'
    reply = parse_reply(decode_message_body(body))
    assert reply.value == "\ud800 \udfff\u00e9"
    again = encode_reply(reply.id, reply.status, reply.value)
    assert again[4:] == body
    assert parse_reply(MessageReader().feed(again)[0]) == reply
    # 1e999 would be inf, which encode_message refuses: refused like Infinity.
    for number in (b"1e999", b"-1E400", b"Infinity", b"NaN"):
        with pytest.raises(ControlProtocolError, match="JSON"):
            decode_message_body(b'{"id":1,"status":"OK","value":[' + number + b"]}")
    assert decode_message_body(b"[1e308,1e-400,-0.5]") == [1e308, 0.0, -0.5]


def test_registry_limits_are_checked() -> None:
    for field, value in [
        ("max_keys", 0),
        ("max_keys", 1.5),
        ("max_values_per_key", -1),
        ("max_connections", True),
        ("handshake_timeout", 0),
        ("idle_timeout", float("inf")),
        ("max_message_size", MAX_MESSAGE_SIZE + 1),
        ("max_connections_per_ip", 0),
        ("max_connections_per_ip", 2.5),
        ("max_requests_per_ip_per_second", float("nan")),
    ]:
        with pytest.raises(ValueError, match=field):
            RegistryLimits(**{field: value})


# ------------------------------------------------------------ the wire


def test_requests_on_one_connection() -> None:
    async def body(server: RegistryServer) -> None:
        conn = await RawConnection.open(server.port)
        hello = await conn.hello_reply()
        assert hello.status == HelloStatus.OK and hello.version == PROTOCOL_VERSION
        conn.send({"id": 1, "request": "announce", "value": {"key": "k", "value": "v", "ttl": 30}})
        assert await conn.reply() == {"id": 1, "status": "OK", "value": None}
        conn.send({"id": 2, "request": "lookup", "value": {"key": "k", "max_values": 5}})
        assert await conn.reply() == {"id": 2, "status": "OK", "value": ["v"]}
        conn.send({"id": 3, "request": "withdraw", "value": {"key": "k", "value": "v"}})
        assert await conn.reply() == {"id": 3, "status": "OK", "value": None}
        conn.send({"id": 4, "request": "lookup", "value": {"key": "k", "max_values": 5}})
        assert await conn.reply() == {"id": 4, "status": "OK", "value": []}
        await conn.close()

    serve(body)


def test_pipelined_requests_answered_in_order() -> None:
    async def body(server: RegistryServer) -> None:
        conn = await RawConnection.open(server.port)
        batch = b"".join(
            encode_message({"id": i, "request": "announce", "value": {"key": f"k{i % 7}", "value": f"v{i}", "ttl": 30}})
            for i in range(1, 301)
        )
        conn.writer.write(batch)  # all in one write, with the hello before
        assert (await conn.hello_reply()).status == HelloStatus.OK
        for i in range(1, 301):
            assert await conn.reply() == {"id": i, "status": "OK", "value": None}
        await conn.close()
        assert server.service.stats()["values"] == 300

    serve(body)


def _raw(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


BAD_MESSAGES: list[tuple[str, bytes, str]] = [
    ("oversized", (10 * 1024 * 1024).to_bytes(4, "big") + b"{", "cap"),
    ("not JSON", (5).to_bytes(4, "big") + b"{nope", "JSON"),
    ("not UTF-8", (3).to_bytes(4, "big") + b'"\xff"', "UTF-8"),
    ("not an object", encode_message([1, 2, 3]), "object"),
    ("unknown request", encode_message({"id": 7, "request": "frobnicate", "value": None}), "unknown request"),
    (
        "not a registry request",
        encode_message({"id": 7, "request": "reg_serv", "value": {"server": "s"}}),
        "not for a registry connection",
    ),
    ("missing field", encode_message({"id": 7, "request": "announce", "value": {"key": "k", "value": "v"}}), "ttl"),
    (
        "bad ttl",
        encode_message({"id": 7, "request": "announce", "value": {"key": "k", "value": "v", "ttl": -1}}),
        "ttl",
    ),
    ("bad key", encode_message({"id": 7, "request": "lookup", "value": {"key": 5, "max_values": 1}}), "key"),
    ("bad id", encode_message({"id": -1, "request": "lookup", "value": {"key": "k", "max_values": 1}}), "id"),
    ("extra field", encode_message({"id": 7, "request": "lookup", "value": None, "x": 1}), "unexpected 'x'"),
    # The reason quotes the field, a lone surrogate with no UTF-8 form: the
    # BAD_REQUEST reply used to fail to encode, inside data_received (found by
    # fuzz/fuzz_registry.py).
    ("lone surrogate", _raw(b'{"id":7,"request":"lookup","value":null,"\\ud800":1}'), "unexpected '\\ud800'"),
]


@pytest.mark.parametrize("what,message,reason", BAD_MESSAGES, ids=[b[0] for b in BAD_MESSAGES])
def test_bad_request_closes_that_connection_only(
    what: str, message: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(server: RegistryServer) -> None:
        good = ServiceRegistry(server.url)
        await good.announce("k", "v", 30)
        conn = await RawConnection.open(server.port)
        # a good request first, in the same write: it is answered first
        conn.writer.write(
            encode_message({"id": 1, "request": "lookup", "value": {"key": "k", "max_values": 5}}) + message
        )
        assert (await conn.hello_reply()).status == HelloStatus.OK
        assert await conn.reply() == {"id": 1, "status": "OK", "value": ["v"]}
        error = await conn.reply()
        assert error["status"] == Status.BAD_REQUEST and reason in error["value"], error
        expected_id = 7 if b'"id":7' in message else 0
        assert error["id"] == expected_id
        assert await conn.closed_by_peer()
        await conn.close()
        assert len(warnings(caplog)) == 1, warnings(caplog)
        assert reason in warnings(caplog)[0]
        # everyone else is still served, on their own connection
        assert await good.lookup("k") == ["v"]
        assert server.service.counters["connections_total"] == 2
        await good.close()

    serve(body)


@pytest.mark.parametrize(
    "hello,status,reason",
    [
        (b"GET / HTTP/1.1\r\n\r\n", None, "not a fastnat hello"),
        (b"FNAT\x01", None, None),  # incomplete: dropped by the handshake timeout
        (encode_hello(ROLE_CLIENT), HelloStatus.BAD_ROLE, "role"),
        (b"FNAT\x09R", HelloStatus.VERSION_UNSUPPORTED, "version"),
    ],
    ids=["garbage", "partial", "client-role", "version"],
)
def test_bad_hello(hello: bytes, status: int | None, reason: str | None, caplog: pytest.LogCaptureFixture) -> None:
    async def body(server: RegistryServer) -> None:
        good = ServiceRegistry(server.url)
        await good.announce("k", "v", 30)
        conn = await RawConnection.open(server.port, hello=hello)
        start = time.monotonic()
        if status is not None:
            assert (await conn.hello_reply()).status == status
        assert await conn.closed_by_peer()
        await conn.close()
        if reason is None:
            assert time.monotonic() - start >= 0.25
            reason_seen = "no hello"
        else:
            reason_seen = reason
        await eventually(lambda: warnings(caplog), 2, "the warning")
        assert len(warnings(caplog)) == 1 and reason_seen in warnings(caplog)[0], warnings(caplog)
        assert await good.lookup("k") == ["v"]
        await good.close()

    serve(body, handshake_timeout=0.3)


def test_silent_peer_dropped_after_the_handshake_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async def body(server: RegistryServer) -> None:
        conns = [await RawConnection.open(server.port, hello=None) for _ in range(5)]
        await eventually(lambda: server.service.connection_count == 5, 2, "the connections")
        start = time.monotonic()
        for conn in conns:
            assert await conn.closed_by_peer(timeout=3)
            await conn.close()
        elapsed = time.monotonic() - start
        assert elapsed < 1.5, elapsed
        await eventually(lambda: server.service.connection_count == 0, 2, "the connections to go")
        assert len(warnings(caplog)) == 5 and all("no hello within 0.3 s" in w for w in warnings(caplog))

    serve(body, handshake_timeout=0.3)


def test_idle_connection_closed_and_client_reconnects(caplog: pytest.LogCaptureFixture) -> None:
    async def body(server: RegistryServer) -> None:
        reg = ServiceRegistry(server.url)
        await reg.announce("k", "v", 30)
        await eventually(lambda: server.service.counters["idle_closed"] == 1, 3, "the idle close")
        await asyncio.sleep(0.05)
        # the client notices the closed connection and uses a new one
        assert await reg.lookup("k") == ["v"]
        assert server.service.counters["connections_total"] == 2
        await reg.close()
        assert warnings(caplog) == [], "an idle close is not a dropped connection"

    serve(body, idle_timeout=0.3)


def test_client_retries_once_on_a_connection_lost_unnoticed() -> None:
    """The service drops the connection and the client has not noticed yet:
    its next call fails on the old connection and succeeds on a new one."""

    async def body(server: RegistryServer) -> None:
        reg = ServiceRegistry(server.url)
        await reg.announce("k", "v", 30)
        for round_ in range(1, 4):
            (connection,) = server.service._connections
            connection.abort()  # no await before the next call: the client cannot know
            assert await reg.lookup("k") == ["v"]
            assert server.service.counters["connections_total"] == round_ + 1
        await reg.close()

    serve(body)


def test_full_answers_and_keeps_the_connection() -> None:
    async def body(server: RegistryServer) -> None:
        conn = await RawConnection.open(server.port)
        await conn.hello_reply()
        conn.send({"id": 1, "request": "announce", "value": {"key": "k", "value": "a", "ttl": 30}})
        conn.send({"id": 2, "request": "announce", "value": {"key": "k", "value": "b", "ttl": 30}})
        conn.send({"id": 3, "request": "announce", "value": {"key": "other", "value": "a", "ttl": 30}})
        conn.send({"id": 4, "request": "lookup", "value": {"key": "k", "max_values": 5}})
        assert (await conn.reply())["status"] == Status.OK
        full = await conn.reply()
        assert full["id"] == 2 and full["status"] == Status.FULL and "maximum of 1 values" in full["value"]
        full = await conn.reply()
        assert full["id"] == 3 and full["status"] == Status.FULL and "maximum of 1 keys" in full["value"]
        assert await conn.reply() == {"id": 4, "status": "OK", "value": ["a"]}
        await conn.close()
        # the client turns FULL into ValueError, on the same connection
        reg = ServiceRegistry(server.url)
        with pytest.raises(ValueError, match="maximum of 1 values"):
            await reg.announce("k", "c", 30)
        assert await reg.lookup("k") == ["a"]
        assert server.service.counters["connections_total"] == 2
        await reg.close()

    serve(body, max_keys=1, max_values_per_key=1)


@pytest.mark.parametrize(
    "limits, status, error, counter",
    [
        ({"max_connections": 3}, HelloStatus.BUSY, r"connection limit \(max_connections\)", "connections_full"),
        (
            {"max_connections": 10, "max_connections_per_ip": 3},
            HelloStatus.IP_CONNECTIONS,
            "connection limit for this address",
            "ip_connections_full",
        ),
    ],
    ids=["total", "per-address"],
)
def test_connection_cap(
    limits: dict[str, int], status: int, error: str, counter: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(server: RegistryServer) -> None:
        service = server.service
        conns = [await RawConnection.open(server.port) for _ in range(3)]
        for conn in conns:
            assert (await conn.hello_reply()).status == HelloStatus.OK
        extra = await RawConnection.open(server.port)
        assert (await extra.hello_reply()).status == status
        assert await extra.closed_by_peer()
        await extra.close()
        reg = ServiceRegistry(server.url)
        with pytest.raises(RegistryUnavailableError, match=error):
            await reg.lookup("k")
        assert service.counters[f"dropped_{counter}"] == 2
        assert len(warnings(caplog)) == 2 and all("connections open" in w for w in warnings(caplog))
        await conns[0].close()
        await eventually(lambda: service.connection_count == 2, 2, "a connection to go")
        await reg.announce("k", "v", 30)
        assert await reg.lookup("k") == ["v"]
        await reg.close()
        for conn in conns[1:]:
            await conn.close()
        # nothing stays counted for the address once its connections are gone
        await eventually(lambda: service.connection_count == 0, 2, "the connections to go")
        assert service._ip_connections.total == 0 and len(service._ip_connections) == 0
        assert service._ip_requests == {} and service.stats()["addresses"] == 0

    serve(body, **limits)


def test_request_rate_per_address_delays_and_answers_every_request() -> None:
    rate = 40

    async def body(server: RegistryServer) -> None:
        loop = asyncio.get_running_loop()
        conns = [await RawConnection.open(server.port) for _ in range(2)]
        for conn in conns:
            assert (await conn.hello_reply()).status == HelloStatus.OK
        started = loop.time()
        # 100 requests over two connections from one address: the bucket holds
        # 40 (one second's worth), the other 60 wait for 40 per second.
        for i in range(1, 51):
            for conn in conns:
                conn.send({"id": i, "request": "announce", "value": {"key": "k", "value": f"v{i}", "ttl": 30}})
        for conn in conns:
            for i in range(1, 51):
                assert await conn.reply() == {"id": i, "status": "OK", "value": None}
        elapsed = loop.time() - started
        assert elapsed > (100 - rate) / rate * 0.8, f"100 requests at {rate}/s answered in {elapsed:.2f} s"
        assert server.service.counters["throttled_requests"] >= 1
        assert server.service.counters["announce"] == 100
        for conn in conns:
            await conn.close()

    serve(body, max_requests_per_ip_per_second=rate)


def test_lookup_reply_fits_the_message_cap() -> None:
    """Values up to 4 KiB each (in UTF-8): a lookup answers as many as fit in
    one message, whole."""

    async def body(server: RegistryServer) -> None:
        reg = ServiceRegistry(server.url)
        values = {f"{i:04d}" + "🌍" * 1020 for i in range(40)}
        for value in values:
            await reg.announce("wide", value, 30)
        got = await reg.lookup("wide", 40)
        assert 10 <= len(got) < 40
        assert set(got) <= values and len(set(got)) == len(got)
        assert len(encode_message(got)) <= MAX_MESSAGE_SIZE
        await reg.close()

    serve(body)


@LOOPS
def test_a_peer_that_does_not_read_is_not_buffered_without_bound(loop_kind: str) -> None:
    """Small lookups asking for big replies, never read: the service stops
    reading from that peer instead of buffering every reply."""

    async def body(server: RegistryServer) -> None:
        reg = ServiceRegistry(server.url)
        for i in range(60):
            await reg.announce("big", f"{i:02d}" + "x" * 1000, 30)  # ~60 KiB of reply per lookup
        await reg.close()
        conn = await RawConnection.open(server.port)
        count = 400  # 24 MB of replies
        lookup = {"request": "lookup", "value": {"key": "big", "max_values": 100}}
        conn.writer.write(b"".join(encode_message({"id": i, **lookup}) for i in range(count)))
        await asyncio.sleep(0.3)
        (connection,) = server.service._connections
        assert connection.transport is not None
        buffered = connection.transport.get_write_buffer_size()
        assert buffered < 1024 * 1024, f"{buffered} bytes of replies buffered for a peer that does not read"
        # once the peer reads, every reply comes, in order
        assert (await conn.hello_reply()).status == HelloStatus.OK
        reader = MessageReader()
        received = 0
        while received < count:
            for message in reader.feed(await asyncio.wait_for(conn.reader.read(1 << 20), 5)):
                assert message["id"] == received and len(message["value"]) == 60
                received += 1
        await conn.close()

    serve(body, loop_kind=loop_kind)


# ------------------------------------------------------------ the client


def test_bad_input_is_refused_before_anything_is_sent() -> None:
    async def body(server: RegistryServer) -> None:
        reg = ServiceRegistry(server.url)
        for call in (
            reg.announce("", "v", 1),
            reg.announce("k", "v", -1),
            reg.lookup("k", 0),
            reg.withdraw("k", "x" * 5000),
        ):
            with pytest.raises(ValueError):
                await call
        assert server.service.counters["connections_total"] == 0
        await reg.close()

    serve(body)


def test_client_cancelled_mid_request_stays_in_step() -> None:
    """A call cancelled at any point must not leave a reply behind for the next one."""

    async def body(server: RegistryServer) -> None:
        reg = ServiceRegistry(server.url)
        for i in range(8):
            await reg.announce(f"k{i}", f"v{i}", 30)
        for i in range(40):
            task = asyncio.ensure_future(reg.lookup(f"k{i % 8}"))
            for _ in range(i % 6):
                await asyncio.sleep(0)
            task.cancel()
            try:
                result = await task
                assert result == [f"v{i % 8}"]
            except asyncio.CancelledError:
                pass
            assert await reg.lookup(f"k{(i + 1) % 8}") == [f"v{(i + 1) % 8}"]
        await reg.close()

    serve(body)


def test_client_reconnects_after_restart() -> None:
    async def main() -> None:
        server = RegistryServer(LOOPBACK, 0)
        await server.start()
        port = server.port
        reg = open_registry(f"fastnat://{LOOPBACK}:{port}?timeout=2")
        await reg.announce("k", "v", 30)
        server.close()
        await server.wait_closed()
        start = time.monotonic()
        with pytest.raises(RegistryUnavailableError, match=f"registry fastnat://{LOOPBACK}:{port}"):
            await reg.lookup("k")
        assert time.monotonic() - start < 1.0
        server = RegistryServer(LOOPBACK, port)
        await server.start()
        try:
            assert await reg.lookup("k") == []
            await reg.announce("k", "again", 30)
            assert await reg.lookup("k") == ["again"]
        finally:
            await reg.close()
            server.close()
            await server.wait_closed()

    run_async(main())


def test_server_close_closes_every_connection() -> None:
    async def main() -> None:
        server = RegistryServer(LOOPBACK, 0)
        await server.start()
        clients = [ServiceRegistry(server.url) for _ in range(5)]
        await asyncio.gather(*(c.announce("k", f"v{i}", 30) for i, c in enumerate(clients)))
        assert server.service.connection_count == 5
        server.close()
        start = time.monotonic()
        await server.wait_closed()
        assert time.monotonic() - start < 1.0
        assert server.service.connection_count == 0
        for client in clients:
            with pytest.raises(RegistryUnavailableError):
                await client.lookup("k")
            await client.close()

    run_async(main())


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_client_is_usable_from_one_loop_after_another() -> None:
    """The blocking API will call from fastnat's loop thread; a client used
    on an earlier loop works on the next one, whether it was closed (as
    documented) or not (its old connection is ended)."""
    service = RegistryService()

    async def start() -> RegistryServer:
        server = RegistryServer(LOOPBACK, 0, service)
        await server.start()
        return server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="registry server loop")
    thread.start()
    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
        reg = ServiceRegistry(server.url)

        async def use(value: str, close: bool) -> list[str]:
            await reg.announce("k", value, 30)
            values = await reg.lookup("k")
            if close:
                await reg.close()
            return sorted(values)

        assert run_async(use("a", close=True)) == ["a"]
        assert run_async(use("b", close=False)) == ["a", "b"]  # left open when its loop ended
        assert run_async(use("c", close=True)) == ["a", "b", "c"]
        deadline = time.monotonic() + 3
        while service.connection_count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.connection_count == 0, "the connection of the loop that ended was not ended"
        gc.collect()  # the orphaned transport's descriptor

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# ------------------------------------------------------------ hand-over


class _MiniForwarder(asyncio.Protocol):
    """What a forwarder's handshake does for role R: read the hello itself,
    pause reading, then hand the connection and the bytes that followed the
    hello to the registry service."""

    def __init__(self, service: RegistryService) -> None:
        self.service = service
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if len(self.buffer) < HELLO_SIZE:
            return
        hello = parse_hello(self.buffer[:HELLO_SIZE])
        assert hello.role == ROLE_REGISTRY
        self.transport.pause_reading()
        peer = self.transport.get_extra_info("peername")
        self.service.serve_connection(self.transport, self.buffer[HELLO_SIZE:], (peer[0], peer[1]))


@LOOPS
def test_serve_connection_hand_over(caplog: pytest.LogCaptureFixture, loop_kind: str) -> None:
    async def main() -> None:
        service = RegistryService(RegistryLimits(max_connections=2))
        listener = await asyncio.get_running_loop().create_server(lambda: _MiniForwarder(service), LOOPBACK, 0)
        port = listener.sockets[0].getsockname()[1]
        try:
            # the client sends its hello and first request in one write: the
            # request arrives as initial_data
            reg = ServiceRegistry(f"fastnat://{LOOPBACK}:{port}")
            await reg.announce("k", "v", 30)
            assert await reg.lookup("k") == ["v"]
            # hello, two requests and half of a third in one write
            conn = await RawConnection.open(port, hello=None)
            third = encode_message({"id": 3, "request": "lookup", "value": {"key": "k", "max_values": 9}})
            conn.writer.write(
                encode_hello(ROLE_REGISTRY)
                + encode_message({"id": 1, "request": "announce", "value": {"key": "k", "value": "w", "ttl": 30}})
                + encode_message({"id": 2, "request": "withdraw", "value": {"key": "k", "value": "v"}})
                + third[:7]
            )
            assert (await conn.hello_reply()).status == HelloStatus.OK
            assert (await conn.reply())["id"] == 1
            assert (await conn.reply())["id"] == 2
            conn.writer.write(third[7:])
            assert await conn.reply() == {"id": 3, "status": "OK", "value": ["w"]}
            assert service.connection_count == 2
            # at the cap: BUSY, closed, one warning
            extra = await RawConnection.open(port)
            assert (await extra.hello_reply()).status == HelloStatus.BUSY
            assert await extra.closed_by_peer()
            await extra.close()
            assert len(warnings(caplog)) == 1
            # bad requests are the service's business after the hand-over
            conn.writer.write(encode_message({"id": 4, "request": "open", "value": None}))
            assert (await conn.reply())["status"] == Status.BAD_REQUEST
            assert await conn.closed_by_peer()
            await conn.close()
            await reg.close()
            service.close()
        finally:
            listener.close()
            await listener.wait_closed()

    run_async(main(), loop_kind=loop_kind)

"""Bad input on one connection closes that connection, with one clear log
line, and the forwarder keeps serving everyone else.

One forwarder process per engine (``--handshake-timeout 1``) and one echo
server process registered at it serve the whole module; every case sends
its bad input on a raw socket, checks how the forwarder answered and that
it closed the connection, finds exactly one WARNING line naming that
connection in the forwarder's stderr, and then gets a good client through.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import _default_engine
from .support import (
    ACK,
    SYN,
    TYPE_DATA,
    TYPE_WINDOW,
    ForwarderProcess,
    ServerProcess,
    echo_through,
    engine_env,
    hello,
    message,
    raw_connect,
    raw_stats,
    recv_until_eof,
    wait_until,
    yamux_frame,
)

# every test here is bounded (longer ones say so)
pytestmark = pytest.mark.timeout(60)

ENGINES = [
    pytest.param("compiled", marks=pytest.mark.compiled, id="compiled"),
    pytest.param("python", id="python"),
]
HANDSHAKE_TIMEOUT = 1.0


@contextlib.contextmanager
def make_relay(engine_name: str, tmp: Path) -> Iterator[ForwarderProcess]:
    """A forwarder (short handshake timeout) with the echo server ``victim`` port 80."""
    env = engine_env(engine_name)
    fwd = ForwarderProcess(["--handshake-timeout", str(HANDSHAKE_TIMEOUT)], env, tmp / "forwarder.log")
    try:
        server = ServerProcess(["--id", "victim", "--port", "80", "--forwarder", fwd.address], env, tmp / "server.log")
        try:
            assert server.event() == {"event": "ready", "engine": engine_name}
            yield fwd
        finally:
            server.stop()
    finally:
        fwd.stop()


@pytest.fixture(scope="module", params=ENGINES)
def relay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwarderProcess]:
    """A relay for each engine: for bad input that reaches the multiplexer."""
    with make_relay(request.param, tmp_path_factory.mktemp(f"bad-input-{request.param}")) as fwd:
        yield fwd


@pytest.fixture(scope="module")
def client_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwarderProcess]:
    """One relay (the default engine): a client's handshake involves no
    multiplexer, so its bad input is tried once."""
    with make_relay(_default_engine(), tmp_path_factory.mktemp("bad-client-input")) as fwd:
        yield fwd


def req(request: Any = "client_init", value: Any = None, **fields: Any) -> dict[str, Any]:
    if value is None and request == "client_init":
        value = {"server": "victim", "port": 80}
    obj = {"id": 1, "request": request, "value": value}
    obj.update(fields)
    return obj


def still_serving(fwd: ForwarderProcess, peer: tuple[str, int], pattern: str) -> str:
    """Exactly one WARNING line names ``peer`` and matches ``pattern``; the
    forwarder is up, a good client gets through, no handshake is left pending."""
    import re

    lines = wait_until(lambda: fwd.lines_about(peer), 3, f"a log line about {peer}; log:\n{fwd.log()}")
    time.sleep(0.1)  # a second line would come now
    lines = fwd.lines_about(peer)
    assert len(lines) == 1, f"expected one log line about {peer}, got {lines}"
    assert " WARNING " in lines[0], lines[0]
    assert re.search(pattern, lines[0]), f"{lines[0]!r} does not match {pattern!r}"
    assert fwd.alive(), f"the forwarder died; log:\n{fwd.log()}"
    data = f"still here after {peer}".encode()
    assert echo_through(fwd.port, "victim", 80, data) == data
    assert raw_stats(fwd.port)["pending_handshakes"] <= 1  # only the stats request's own
    return lines[0]


def hello_reply_then_eof(data: bytes) -> tuple[int | None, bytes]:
    """Split what a forwarder sent into the hello status and what followed."""
    if not data:
        return None, b""
    assert data[:4] == b"FNAT", data[:40]
    count = data[22]
    return data[4], data[23 + count :]


# ---------------------------------------------------------------- clients

HUGE = struct.pack(">I", 0xFFFFFFFF)

CLIENT_CASES = [
    # id, bytes sent, hello status expected (None: no answer at all), log pattern
    ("http-request", b"GET / HTTP/1.1\r\nHost: forwarder\r\n\r\n", None, r"not a fastnat hello"),
    ("binary-garbage", bytes(range(256)) * 4, None, r"not a fastnat hello"),
    ("wrong-magic-short", b"FNX", None, r"not a fastnat hello"),
    ("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), None, r"not a fastnat hello"),
    ("bad-role", hello(role=b"Z"), 2, r"role"),
    ("huge-length", hello() + HUGE, 0, r"4294967295"),
    ("just-over-cap", hello() + struct.pack(">I", 64 * 1024 + 1), 0, r"65537"),
    ("invalid-json", hello() + message(b"{not json"), 0, r"JSON"),
    ("invalid-utf8", hello() + message(b'{"id": 1, "request": "\xff\xfe"}'), 0, r"UTF-8"),
    ("nan", hello() + message(b'{"id": 1, "request": "externaladdr", "value": NaN}'), 0, r"NaN|JSON"),
    ("deep-nesting", hello() + message(b"[" * 30000 + b"]" * 30000), 0, r"JSON|nest|deep|recursion"),
    ("not-an-object", hello() + message([1, 2, 3]), 0, r"object"),
    ("id-is-a-string", hello() + message(req(id="1")), 0, r"id"),
    ("id-negative", hello() + message(req(id=-1)), 0, r"id"),
    ("id-float", hello() + message(req(id=1.5)), 0, r"id"),
    ("request-is-a-number", hello() + message(req(request=5)), 0, r"request"),
    ("missing-value", hello() + message({"id": 1, "request": "client_init"}), 0, r"missing value"),
    ("extra-field", hello() + message(req(extra=True)), 0, r"unexpected 'extra'"),
    ("value-is-a-list", hello() + message(req(value=["victim", 80])), 0, r"value"),
    ("port-is-a-string", hello() + message(req(value={"server": "victim", "port": "80"})), 0, r"port"),
    ("port-is-a-bool", hello() + message(req(value={"server": "victim", "port": True})), 0, r"port"),
    ("port-zero", hello() + message(req(value={"server": "victim", "port": 0})), 0, r"port"),
    ("port-too-big", hello() + message(req(value={"server": "victim", "port": 65536})), 0, r"port"),
    ("server-is-a-number", hello() + message(req(value={"server": 7, "port": 80})), 0, r"server id"),
    ("server-has-spaces", hello() + message(req(value={"server": "vic tim", "port": 80})), 0, r"server id"),
    ("server-too-long", hello() + message(req(value={"server": "v" * 256, "port": 80})), 0, r"server id"),
    ("server-missing", hello() + message(req(value={"port": 80})), 0, r"server"),
    ("unknown-request", hello() + message(req("frobnicate", None)), 0, r"frobnicate"),
    ("server-request-from-client", hello() + message(req("reg_serv", {"server": "victim"})), 0, r"reg_serv"),
    (
        "open-request-from-client",
        hello() + message(req("open", {"server": "victim", "port": 80, "client": ["127.0.0.1", 1]})),
        0,
        r"open",
    ),
    ("stats-with-a-value", hello() + message(req("stats", {"all": True})), 0, r"stats"),
    ("bidirectional-bad-ip", hello() + message(req("bidirectional", {"ip": "not-an-ip", "port": 80})), 0, r"IP"),
]


@pytest.mark.parametrize(("data", "status", "pattern"), [c[1:] for c in CLIENT_CASES], ids=[c[0] for c in CLIENT_CASES])
def test_bad_client_input(client_relay: ForwarderProcess, data: bytes, status: int | None, pattern: str) -> None:
    relay = client_relay
    with raw_connect(relay.port) as sock:
        peer = sock.getsockname()
        sock.sendall(data)
        got_status, rest = hello_reply_then_eof(recv_until_eof(sock))
    assert got_status == status
    assert rest == b"", f"the forwarder answered {rest!r} after the hello instead of closing"
    still_serving(relay, peer, pattern)


SILENT_CASES = [
    ("says-nothing", b"", None),
    ("half-a-hello", b"FNA", None),
    ("hello-then-nothing", hello(), 0),
    ("half-a-request", hello() + struct.pack(">I", 100) + b'{"id": 1', 0),
    ("half-a-length", hello() + b"\x00\x00", 0),
]


@pytest.mark.parametrize(("data", "status"), [c[1:] for c in SILENT_CASES], ids=[c[0] for c in SILENT_CASES])
def test_silent_client_is_dropped(client_relay: ForwarderProcess, data: bytes, status: int | None) -> None:
    relay = client_relay
    with raw_connect(relay.port) as sock:
        peer = sock.getsockname()
        sock.sendall(data)
        started = time.monotonic()
        got_status, rest = hello_reply_then_eof(recv_until_eof(sock))
        elapsed = time.monotonic() - started
    assert got_status == status and rest == b""
    assert HANDSHAKE_TIMEOUT * 0.8 < elapsed < HANDSHAKE_TIMEOUT + 2, f"closed after {elapsed:.2f} s"
    still_serving(relay, peer, r"no handshake within 1 s")


# ---------------------------------------------------------------- servers


def control_data(payload: bytes, flags: int = 0) -> bytes:
    """A Data frame on stream 1 (the server's control stream)."""
    return yamux_frame(TYPE_DATA, flags, 1, len(payload), payload)


def open_control() -> bytes:
    return yamux_frame(TYPE_WINDOW, SYN, 1, 0)


SERVER_CASES = [
    # id, bytes after the server's hello, seconds before the forwarder gives up, log pattern
    ("opens-no-control-stream", b"", HANDSHAKE_TIMEOUT, r"no control stream"),
    ("control-stream-says-nothing", open_control(), HANDSHAKE_TIMEOUT, r"registered no id"),
    ("control-half-a-message", open_control() + control_data(struct.pack(">I", 50) + b"{"), HANDSHAKE_TIMEOUT, r"registered no id"),
    ("control-invalid-json", open_control() + control_data(message(b"{nope")), 0, r"bad control message.*JSON"),
    ("control-huge-length", open_control() + control_data(HUGE), 0, r"bad control message.*4294967295"),
    ("control-wrong-types", open_control() + control_data(message(req("reg_serv", {"server": 1}))), 0, r"server id"),
    ("control-client-request", open_control() + control_data(message(req())), 0, r"client_init"),
    ("control-unknown-request", open_control() + control_data(message(req("frobnicate"))), 0, r"frobnicate"),
    # breaking the multiplexer's own protocol
    ("yamux-bad-version", b"\x07" * 24, 0, r"version"),
    ("yamux-even-stream-id", yamux_frame(TYPE_WINDOW, SYN, 2, 0), 0, r"stream 2|even"),
    ("yamux-ack-for-unopened-stream", yamux_frame(TYPE_WINDOW, ACK, 9, 0) + b"\x07" * 12, 0, r"version|stream"),
]


@pytest.mark.parametrize(("data", "after", "pattern"), [c[1:] for c in SERVER_CASES], ids=[c[0] for c in SERVER_CASES])
def test_bad_server_input(relay: ForwarderProcess, data: bytes, after: float, pattern: str) -> None:
    with raw_connect(relay.port) as sock:
        peer = sock.getsockname()
        sock.sendall(hello(role=b"S") + data)
        started = time.monotonic()
        got_status, _ = hello_reply_then_eof(recv_until_eof(sock))
        elapsed = time.monotonic() - started
    assert got_status == 0
    assert after * 0.8 <= elapsed < after + 2, f"closed after {elapsed:.2f} s"
    still_serving(relay, peer, pattern)
    stats = raw_stats(relay.port)
    assert list(stats["per_server"]) == ["victim"], stats


def test_bad_inputs_leave_the_counters_straight(relay: ForwarderProcess) -> None:
    """After all that, one server, one session, nothing pending or active."""
    stats = raw_stats(relay.port)
    assert stats["servers"] == 1 and stats["sessions"] == 1, stats
    assert stats["clients_active"] == 0
    assert stats["pending_handshakes"] <= 1
    assert sum(stats["refusals"].values()) >= 1
    json.dumps(stats)  # plain JSON all the way down

"""Every status and every error class of the NAT layer, produced for real.

Each error must be an ``OSError`` (the seed raised ``EnvironmentError``, so
``except EnvironmentError:`` must still catch it), of its own class, with a
message that says what happened and where.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path

import pytest

import fastnat
from fastnat import aio, errors
from fastnat.aio.server import Registration
from fastnat.errors import (
    AuthenticationError,
    ControlProtocolError,
    ForwarderBusyError,
    ForwarderUnreachableError,
    IdTakenError,
    NoForwarderError,
    NotRegisteredError,
    ProtocolVersionError,
    ServerBusyError,
    ServerNotFoundError,
    ServerRefusedError,
)

from .support import (
    LOOPBACK,
    FakeForwarder,
    RawServer,
    echo_handler,
    echo_through,
    free_port,
    hello,
    raw_connect,
    raw_stats,
    read_hello_reply,
    recv_exactly,
    recv_until_eof,
    wait_until,
)

# every test here is bounded (longer ones say so)
pytestmark = pytest.mark.timeout(60)

NAT_ERRORS = [
    NoForwarderError,
    ForwarderUnreachableError,
    ForwarderBusyError,
    ControlProtocolError,
    ProtocolVersionError,
    ServerNotFoundError,
    ServerBusyError,
    ServerRefusedError,
    IdTakenError,
    AuthenticationError,
    NotRegisteredError,
]


def catch(fn, *args, **kwargs) -> OSError:
    """Call ``fn``; return what ``except EnvironmentError`` catches (fail if nothing)."""
    try:
        fn(*args, **kwargs)
    except EnvironmentError as exc:  # noqa: UP024 - the seed's spelling, on purpose
        return exc
    raise AssertionError(f"{getattr(fn, '__name__', fn)} raised nothing")


def acatch(coro) -> OSError:
    async def main() -> OSError:
        try:
            result = await asyncio.wait_for(coro, 20)
        except EnvironmentError as exc:  # noqa: UP024
            return exc
        raise AssertionError(f"no error; returned {result!r}")

    return asyncio.run(main())


def test_every_nat_error_is_an_environment_error() -> None:
    for cls in NAT_ERRORS:
        assert issubclass(cls, EnvironmentError), cls
        assert getattr(errors, cls.__name__) is cls


# ------------------------------------------------------------- NO_SERVER


def test_no_server(forwarder) -> None:
    exc = catch(fastnat.nat_openconn, "nobody-here", 80, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    assert type(exc) is ServerNotFoundError
    assert "nobody-here" in str(exc) and forwarder.address in str(exc)

    exc = acatch(aio.open_connection("nobody-here", 80, forwarder=forwarder.address))
    assert type(exc) is ServerNotFoundError
    assert raw_stats(forwarder.port)["refusals"].get("no_server") == 2


# ------------------------------------------------------------ BSY_SERVER


def test_server_busy(nat_engine: str, forwarders) -> None:
    fwd = forwarders("--max-clients-per-server", "1")
    handle = fastnat.nat_waitforconn("busy-srv", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
    holder = fastnat.nat_openconn("busy-srv", 80, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
    try:
        holder.settimeout(5)
        holder.sendall(b"x")
        assert holder.recv(1) == b"x"  # relayed: the slot is taken
        exc = catch(fastnat.nat_openconn, "busy-srv", 80, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
        assert type(exc) is ServerBusyError
        assert "busy-srv" in str(exc) and fwd.address in str(exc)
        exc = acatch(aio.open_connection("busy-srv", 80, forwarder=fwd.address))
        assert type(exc) is ServerBusyError
    finally:
        holder.close()
    # once the holder is gone, the slot is free again
    wait_until(lambda: raw_stats(fwd.port)["clients_active"] == 0, 5, "the held client to be released")
    assert echo_through(fwd.port, "busy-srv", 80, b"again") == b"again"
    assert raw_stats(fwd.port)["refusals"].get("busy") == 2
    fastnat.nat_stopcomm(handle)


# ------------------------------------------------------ FAILED: unknown port


def test_unknown_port_is_refused(nat_engine: str, forwarder) -> None:
    handle = fastnat.nat_waitforconn("one-port", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    try:
        exc = catch(fastnat.nat_openconn, "one-port", 81, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
        assert type(exc) is ServerRefusedError
        assert "81" in str(exc) and "one-port" in str(exc)
        exc = acatch(aio.open_connection("one-port", 81, forwarder=forwarder.address))
        assert type(exc) is ServerRefusedError
        assert echo_through(forwarder.port, "one-port", 80) == b"ping"
    finally:
        fastnat.nat_stopcomm(handle)


# ------------------------------------------------------------- ID_TAKEN


def test_id_taken_by_another_process(nat_engine: str, forwarder, server_procs) -> None:
    handle = fastnat.nat_waitforconn("mine", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    before = raw_stats(forwarder.port)["per_server"]["mine"]["address"]
    try:
        intruder = server_procs("--id", "mine", "--port", "81", "--forwarder", forwarder.address, "--no-persist")
        event = intruder.event()
        assert event["event"] == "error" and event["type"] == "IdTakenError", event
        assert "mine" in event["message"]
        assert intruder.proc.wait(10) == 3
        stats = raw_stats(forwarder.port)
        assert stats["servers"] == 1
        assert stats["per_server"]["mine"]["address"] == before
        assert stats["per_server"]["mine"]["ports"] == [80]
        assert stats["refusals"].get("id_taken") == 1
        assert echo_through(forwarder.port, "mine", 80) == b"ping"
    finally:
        fastnat.nat_stopcomm(handle)


def test_id_taken_by_another_registration(nat_engine: str, forwarder) -> None:
    """A second session in this process (a Registration or start_server on
    another loop) cannot take an id held by the first; once released, it can."""
    handle = fastnat.nat_waitforconn("held", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    try:

        async def second_registration() -> None:
            registration = Registration("held", forwarder=forwarder.tuple, persist=False)
            await registration.start()

        exc = acatch(second_registration())
        assert type(exc) is IdTakenError
        assert "held" in str(exc) and forwarder.address in str(exc)

        async def noop(reader, writer) -> None:
            writer.close()

        exc = acatch(aio.start_server(noop, "held", 81, forwarder=forwarder.address))
        assert type(exc) is IdTakenError
        assert echo_through(forwarder.port, "held", 80) == b"ping"
    finally:
        fastnat.nat_stopcomm(handle)
    wait_until(lambda: raw_stats(forwarder.port)["servers"] == 0, 5, "the id to be released")

    async def take_it_now() -> None:
        server = await aio.start_server(noop, "held", 81, forwarder=forwarder.address)
        server.close()
        await server.wait_closed()

    asyncio.run(take_it_now())


# ----------------------------------------------------------- AUTH_FAILED


def test_wrong_secret(nat_engine: str, forwarders) -> None:
    fwd = forwarders("--secret", "right-secret")
    for secret in ("wrong-secret", None):
        if secret is not None:
            fastnat.configure(secret=secret)
        exc = catch(
            fastnat.nat_waitforconn, "guarded", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=fwd.port
        )
        assert type(exc) is AuthenticationError, exc
        assert "guarded" in str(exc) and fwd.address in str(exc)
    fwd.wait_log(r"refused reg_serv 'guarded'", count=2)
    # nothing was registered, and the refused sessions are closed
    wait_until(lambda: (s := raw_stats(fwd.port))["servers"] == 0 and s["sessions"] == 0, 5, "no sessions")
    assert raw_stats(fwd.port)["refusals"].get("auth_failed") == 2

    exc = acatch(aio.start_server(lambda r, w: w.close(), "guarded", 80, forwarder=fwd.address, secret="nope"))
    assert type(exc) is AuthenticationError

    fastnat.configure(secret="right-secret")
    handle = fastnat.nat_waitforconn("guarded", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
    try:
        assert echo_through(fwd.port, "guarded", 80, b"let me in") == b"let me in"
    finally:
        fastnat.nat_stopcomm(handle)


def test_secrets_file(nat_engine: str, forwarders, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text("# id secret\nalice alice-secret\nbob   bob-secret  # trailing comment\n")
    fwd = forwarders("--secrets-file", str(secrets))

    async def register(server_id: str, secret: str) -> None:
        server = await aio.start_server(lambda r, w: w.close(), server_id, 80, forwarder=fwd.address, secret=secret)
        assert server.alive
        server.close()
        await server.wait_closed()

    asyncio.run(register("alice", "alice-secret"))
    asyncio.run(register("bob", "bob-secret"))
    for server_id, secret in (("bob", "alice-secret"), ("alice", "bob-secret"), ("carol", "alice-secret")):
        exc = acatch(register(server_id, secret))
        assert type(exc) is AuthenticationError, (server_id, exc)
    fwd.wait_log(r"refused reg_serv 'carol'.*no secret is known")
    wait_until(lambda: raw_stats(fwd.port)["sessions"] == 0, 5, "no sessions left")


def test_secret_and_secrets_file_together(nat_engine: str, forwarders, tmp_path: Path) -> None:
    """Ids in the file need their own secret; the others the forwarder's."""
    secrets = tmp_path / "secrets"
    secrets.write_text("alice alice-secret\n")
    fwd = forwarders("--secret", "shared", "--secrets-file", str(secrets))

    async def register(server_id: str, secret: str) -> None:
        server = await aio.start_server(lambda r, w: w.close(), server_id, 80, forwarder=fwd.address, secret=secret)
        server.close()
        await server.wait_closed()

    asyncio.run(register("alice", "alice-secret"))
    asyncio.run(register("carol", "shared"))
    assert type(acatch(register("alice", "shared"))) is AuthenticationError
    assert type(acatch(register("carol", "alice-secret"))) is AuthenticationError


# ------------------------------------------------------ protocol versions


@pytest.mark.parametrize("version", [0, 2, 99, 255])
def test_unsupported_version_is_refused_naming_the_versions(forwarder, version: int) -> None:
    with raw_connect(forwarder.port) as sock:
        sock.sendall(hello(version=version))
        reply = read_hello_reply(sock)
        assert reply["status"] == 1  # VERSION_UNSUPPORTED
        assert reply["versions"] == [1]
        assert recv_until_eof(sock) == b""  # and the connection is closed
        peer = sock.getsockname()
    lines = wait_until(lambda: forwarder.lines_about(peer), 5, "a log line")
    assert len(lines) == 1 and f"version {version}" in lines[0], lines
    assert forwarder.alive()


def test_client_sees_protocol_version_error() -> None:
    """Against a forwarder that speaks only versions 7 and 8, every entry
    point raises ProtocolVersionError naming them."""

    def answer(first: bytes) -> bytes:
        return b"FNAT" + bytes((1, 0)) + bytes(16) + bytes((2, 7, 8))

    with FakeForwarder(answer) as fake:
        exc = catch(fastnat.nat_openconn, "x", 80, forwarderIP=LOOPBACK, forwarderPort=fake.port)
        assert type(exc) is ProtocolVersionError
        assert "[7, 8]" in str(exc) and f"{LOOPBACK}:{fake.port}" in str(exc)
        exc = acatch(aio.open_connection("x", 80, forwarder=f"{LOOPBACK}:{fake.port}"))
        assert type(exc) is ProtocolVersionError and "[7, 8]" in str(exc)
        exc = catch(fastnat.nat_waitforconn, "x", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=fake.port)
        assert type(exc) is ProtocolVersionError and "[7, 8]" in str(exc)
        exc = catch(fastnat.getmy_external_ip, LOOPBACK, fake.port)
        assert type(exc) is ProtocolVersionError
        # what they sent was a version-1 hello of the right role
        assert set(fake.received) == {b"FNAT\x01C", b"FNAT\x01S"}


def test_forwarder_choosing_an_unknown_version_is_a_version_error() -> None:
    def answer(first: bytes) -> bytes:
        return b"FNAT" + bytes((0, 9)) + bytes(16) + bytes((1, 9))

    with FakeForwarder(answer) as fake:
        exc = catch(fastnat.nat_openconn, "x", 80, forwarderIP=LOOPBACK, forwarderPort=fake.port)
        assert type(exc) is ProtocolVersionError


def test_not_a_forwarder_is_a_control_protocol_error() -> None:
    with FakeForwarder(lambda first: b"HTTP/1.0 400 Bad Request\r\n\r\n" + b"x" * 100) as fake:
        exc = catch(fastnat.nat_openconn, "x", 80, forwarderIP=LOOPBACK, forwarderPort=fake.port, timeout=3)
        assert type(exc) is ControlProtocolError
        assert f"{LOOPBACK}:{fake.port}" in str(exc)
        exc = acatch(aio.open_connection("x", 80, forwarder=f"{LOOPBACK}:{fake.port}", timeout=3))
        assert type(exc) is ControlProtocolError


def test_garbled_reply_is_a_control_protocol_error() -> None:
    """A good hello, then a reply that is not JSON."""
    body = b"{this is not json"

    with FakeForwarder(lambda first: b"FNAT" + bytes((0, 1)) + bytes(16) + bytes((1, 1)) + struct.pack(">I", len(body)) + body) as fake:
        exc = catch(fastnat.nat_openconn, "x", 80, forwarderIP=LOOPBACK, forwarderPort=fake.port, timeout=3)
        assert type(exc) is ControlProtocolError
        exc = acatch(aio.open_connection("x", 80, forwarder=f"{LOOPBACK}:{fake.port}", timeout=3))
        assert type(exc) is ControlProtocolError


# ------------------------------------------------------------ unreachable


def test_forwarder_unreachable() -> None:
    port = free_port()
    where = f"{LOOPBACK}:{port}"
    started = time.monotonic()
    exc = catch(fastnat.nat_openconn, "x", 80, forwarderIP=LOOPBACK, forwarderPort=port)
    assert type(exc) is ForwarderUnreachableError and where in str(exc)
    exc = acatch(aio.open_connection("x", 80, forwarder=where))
    assert type(exc) is ForwarderUnreachableError and where in str(exc)
    exc = catch(fastnat.nat_waitforconn, "x", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=port)
    assert type(exc) is ForwarderUnreachableError and where in str(exc)
    exc = acatch(aio.start_server(lambda r, w: w.close(), "x", 80, forwarder=where))
    assert type(exc) is ForwarderUnreachableError
    for fn in (fastnat.getmy_external_ip, fastnat.behind_nat):
        exc = catch(fn, LOOPBACK, port)
        assert type(exc) is ForwarderUnreachableError, fn
    assert time.monotonic() - started < 5, "a refused connection must fail at once"


def test_silent_forwarder_times_out() -> None:
    """Something that accepts and never answers: ``timeout`` bounds the handshake."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        started = time.monotonic()
        exc = catch(fastnat.nat_openconn, "x", 80, forwarderIP=LOOPBACK, forwarderPort=port, timeout=1)
        assert type(exc) is ForwarderUnreachableError
        assert 0.9 < time.monotonic() - started < 3
        started = time.monotonic()
        exc = acatch(aio.open_connection("x", 80, forwarder=f"{LOOPBACK}:{port}", timeout=1))
        assert type(exc) is ForwarderUnreachableError
        started = time.monotonic()
        exc = acatch(aio.start_server(lambda r, w: w.close(), "x", 80, forwarder=f"{LOOPBACK}:{port}", connect_timeout=1))
        assert type(exc) is ForwarderUnreachableError
        assert time.monotonic() - started < 3
    finally:
        listener.close()


def test_every_forwarder_tried_and_named(forwarder, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = free_port()
    monkeypatch.setenv("FASTNAT_FORWARDERS", f"{LOOPBACK}:{dead},{forwarder.address}")
    exc = catch(fastnat.nat_openconn, "nobody", 80)
    assert type(exc) is ServerNotFoundError  # the real cause, not the dead forwarder
    assert f"{LOOPBACK}:{dead}" in str(exc) and forwarder.address in str(exc)
    assert [type(e) for _, e in exc.failures] == [ForwarderUnreachableError, ServerNotFoundError]
    # and with a server there, the second forwarder gets the client through
    handle = fastnat.nat_waitforconn("env-srv", 80, echo_handler)
    try:
        sock = fastnat.nat_openconn("env-srv", 80)
        with sock:
            sock.settimeout(5)
            sock.sendall(b"via env")
            assert recv_exactly(sock, 7) == b"via env"
    finally:
        fastnat.nat_stopcomm(handle)


# ------------------------------------------------------------ no forwarder


def test_no_forwarder_configured() -> None:
    calls = [
        lambda: fastnat.nat_openconn("x", 80),
        lambda: fastnat.nat_waitforconn("x", 80, echo_handler),
        lambda: fastnat.getmy_external_ip(),
        lambda: fastnat.behind_nat(),
        lambda: fastnat.nat_check_bi_directional(LOOPBACK, free_port()),
        lambda: asyncio.run(aio.open_connection("x", 80)),
        lambda: asyncio.run(aio.start_server(lambda r, w: w.close(), "x", 80)),
    ]
    for call in calls:
        exc = catch(call)
        assert type(exc) is NoForwarderError, exc
        text = str(exc)
        assert "FASTNAT_FORWARDERS" in text and "configure" in text, text
    assert fastnat.nat_getmyid().startswith("127.0.0.1#")


def test_configure_supplies_the_forwarder(forwarder) -> None:
    fastnat.configure(forwarders=[forwarder.address])
    assert fastnat.getmy_external_ip() == LOOPBACK


# ----------------------------------------------------- forwarder at a limit


def raw_stats_or_busy(port: int) -> bool:
    """True once the forwarder turns a new connection away as busy."""
    with raw_connect(port) as sock:
        sock.sendall(hello())
        return bool(read_hello_reply(sock)["status"] == 3)  # BUSY


def test_forwarder_busy_with_pending_handshakes(forwarders) -> None:
    fwd = forwarders("--max-pending-handshakes", "1")
    silent = raw_connect(fwd.port)
    try:
        wait_until(lambda: raw_stats_or_busy(fwd.port), 5, "the silent connection to hold the only slot")
        exc = catch(fastnat.nat_openconn, "x", 80, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
        assert type(exc) is ForwarderBusyError, exc
        assert fwd.address in str(exc)
    finally:
        silent.close()
    # with the silent one gone, the forwarder answers again
    exc = wait_until(
        lambda: type(e := catch(fastnat.nat_openconn, "x", 80, forwarderIP=LOOPBACK, forwarderPort=fwd.port))
        is ServerNotFoundError
        and e,
        5,
        "the pending slot to free up",
    )
    assert type(exc) is ServerNotFoundError


def test_forwarder_full_of_servers(nat_engine: str, forwarders) -> None:
    fwd = forwarders("--max-servers", "1")
    handle = fastnat.nat_waitforconn("first", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
    try:
        exc = catch(fastnat.nat_waitforconn, "second", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
        assert type(exc) is ForwarderBusyError
        assert "second" in str(exc)
        assert raw_stats(fwd.port)["servers"] == 1
    finally:
        fastnat.nat_stopcomm(handle)


# ---------------------------------------------------------- NOT_REGISTERED


def test_not_registered(nat_engine: str, forwarder) -> None:
    """A server session asking for ports of an id it does not hold gets
    NOT_REGISTERED, which maps to NotRegisteredError."""
    from fastnat.protocol import Reply, reply_error

    async def main() -> list[dict]:
        server = await RawServer.connect(forwarder.port)
        try:
            return [
                await server.request(name, value)
                for name, value in [
                    ("reg_port", {"server": "ghost", "port": 80}),
                    ("dereg_serv", {"server": "ghost"}),
                    ("reg_serv", {"server": "real"}),
                    ("dereg_port", {"server": "real", "port": 80}),
                    ("reg_port", {"server": "ghost", "port": 80}),
                ]
            ]
        finally:
            await server.close()

    replies = asyncio.run(main())
    assert [r["status"] for r in replies] == ["NOT_REGISTERED", "NOT_REGISTERED", "OK", "NOT_REGISTERED", "NOT_REGISTERED"]
    error = reply_error(Reply(1, replies[0]["status"], replies[0]["value"]), "reg_port")
    assert type(error) is NotRegisteredError and isinstance(error, EnvironmentError)
    wait_until(lambda: raw_stats(forwarder.port)["servers"] == 0, 5, "the raw session's id to go")

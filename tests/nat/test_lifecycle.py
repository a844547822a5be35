"""Registering, connecting and stopping with the seed's functions; the
forwarder process's own start and stop."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import time

import pytest

import fastnat
from fastnat.errors import ServerNotFoundError, ServerRefusedError

from .support import (
    LOOPBACK,
    _READY,
    echo_handler,
    echo_through,
    engine_env,
    free_port,
    raw_stats,
    recv_until_eof,
    wait_until,
)

# every test here is bounded (longer ones say so)
pytestmark = pytest.mark.timeout(60)


def test_stopcomm_leaves_nothing_registered(nat_engine: str, forwarder) -> None:
    f = dict(forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    h80 = fastnat.nat_waitforconn("svc", 80, echo_handler, **f)
    h81 = fastnat.nat_waitforconn("svc", 81, echo_handler, **f)
    try:
        assert h80.registration is h81.registration  # a second port reuses the session
        stats = raw_stats(forwarder.port)
        assert stats["servers"] == 1 and stats["sessions"] == 1
        assert stats["per_server"]["svc"]["ports"] == [80, 81]
        assert fastnat.nat_waitforconn_alive()

        fastnat.nat_stopcomm(h80)
        assert raw_stats(forwarder.port)["per_server"]["svc"]["ports"] == [81]
        with pytest.raises(ServerRefusedError):
            echo_through(forwarder.port, "svc", 80)
        assert echo_through(forwarder.port, "svc", 81) == b"ping"

        fastnat.nat_stopcomm(h81)
    finally:
        for h in (h80, h81):
            fastnat.nat_stopcomm(h)
    # the last port took the id, then the session, with it
    stats = wait_until(
        lambda: (s := raw_stats(forwarder.port))["sessions"] == 0 and s, 5, "the server's session to close"
    )
    assert stats["servers"] == 0 and stats["per_server"] == {}
    # harmless twice (and more)
    fastnat.nat_stopcomm(h80)
    fastnat.nat_stopcomm(h81)
    assert not fastnat.nat_waitforconn_alive()
    with pytest.raises(ServerNotFoundError):
        echo_through(forwarder.port, "svc", 81)
    # and the id can be taken again
    h = fastnat.nat_waitforconn("svc", 82, echo_handler, **f)
    try:
        assert echo_through(forwarder.port, "svc", 82) == b"ping"
    finally:
        fastnat.nat_stopcomm(h)


def test_stopcomm_rejects_what_is_not_a_handle() -> None:
    with pytest.raises(TypeError):
        fastnat.nat_stopcomm("not a handle")


def test_function_gets_the_seed_arguments(nat_engine: str, forwarder) -> None:
    """function(remoteip, remoteport, sock, thiscommhandle, listencommhandle),
    in a worker thread, with the client's real address."""
    seen: queue.Queue[tuple] = queue.Queue()

    def function(remoteip, remoteport, sock, thiscommhandle, listencommhandle) -> None:
        import threading

        seen.put((remoteip, remoteport, thiscommhandle, listencommhandle, threading.current_thread().name))
        sock.sendall(b"bye")
        fastnat.nat_stopcomm(thiscommhandle)  # closes this connection only

    handle = fastnat.nat_waitforconn("args", 80, function, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    try:
        local = free_port()
        sock = fastnat.nat_openconn(
            "args", 80, localip=LOOPBACK, localport=local, forwarderIP=LOOPBACK, forwarderPort=forwarder.port
        )
        with sock:
            assert sock.getsockname() == (LOOPBACK, local)
            sock.settimeout(5)
            assert recv_until_eof(sock) == b"bye"
        ip, port, this, listen, thread_name = seen.get(timeout=5)
        assert (ip, port) == (LOOPBACK, local)
        assert listen is handle
        assert this is not None and this is not handle
        assert thread_name not in ("MainThread", "fastnat-loop")
        assert echo_through(forwarder.port, "args", 80, b"") == b"bye"  # still listening
    finally:
        fastnat.nat_stopcomm(handle)


def test_exception_in_function_closes_only_that_stream(nat_engine: str, forwarder) -> None:
    calls = []

    def function(remoteip, remoteport, sock, this, listen) -> None:
        calls.append(remoteport)
        if len(calls) == 1:
            raise RuntimeError("boom (expected by the test)")
        echo_handler(remoteip, remoteport, sock, this, listen)

    handle = fastnat.nat_waitforconn("flaky", 80, function, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    try:
        sock = fastnat.nat_openconn("flaky", 80, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
        with sock:
            sock.settimeout(5)
            assert recv_until_eof(sock) == b""  # closed, not left hanging
        assert echo_through(forwarder.port, "flaky", 80, b"second") == b"second"
        assert fastnat.nat_waitforconn_alive()
    finally:
        fastnat.nat_stopcomm(handle)


def test_openconn_socket_and_timeouts(nat_engine: str, forwarder) -> None:
    handle = fastnat.nat_waitforconn("sock", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
    try:
        f = dict(forwarderIP=LOOPBACK, forwarderPort=forwarder.port)
        with fastnat.nat_openconn("sock", 80, timeout=2, **f) as plain:
            assert type(plain) is socket.socket
            assert plain.gettimeout() is None
            assert plain.getpeername() == forwarder.tuple
        with fastnat.nat_openconn("sock", 80, timeout=2, usetimeoutsock=True, **f) as timed:
            assert timed.gettimeout() == 2
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                timed.recv(1)  # the echo server says nothing unprompted
            assert 1.5 < time.monotonic() - started < 4
    finally:
        fastnat.nat_stopcomm(handle)


# ------------------------------------------------------- the forwarder process


def start_forwarder_raw() -> tuple[subprocess.Popen[bytes], int]:
    """A forwarder started as a user would (no PYTHONUNBUFFERED)."""
    env = engine_env("compiled")
    env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastnat", "forwarder", "--host", LOOPBACK, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        # a plain readline (the test's timeout bounds it): the signal that
        # follows comes as soon as a user's script would send it
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
    except BaseException:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    match = _READY.search(line)
    assert match and match.group(1) == LOOPBACK, line
    return proc, int(match.group(2))


@pytest.mark.timeout(60)
def test_forwarder_stops_cleanly_right_after_its_ready_line() -> None:
    """Once it printed its address, a forwarder is up: SIGTERM then stops it
    cleanly (exit 0, no traceback), however soon it comes. (SIGINT has the
    same window, but Python runs its handler late, so it is hit only now and
    then: SIGTERM makes the test deterministic.)"""
    sig = signal.SIGTERM
    results = []
    for _ in range(5):
        proc, _port = start_forwarder_raw()
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
            raise
        results.append((proc.returncode, err.decode(errors="replace")[-300:]))
    assert all(rc == 0 and "Traceback" not in err for rc, err in results), results


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_forwarder_stops_cleanly_with_sessions_and_clients(nat_engine: str, sig: int) -> None:
    proc, port = start_forwarder_raw()
    try:
        handle = fastnat.nat_waitforconn("sig", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=port, persist=False)
        client = fastnat.nat_openconn("sig", 80, forwarderIP=LOOPBACK, forwarderPort=port)
        client.settimeout(5)
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        idle = socket.create_connection((LOOPBACK, port))  # a connection still in its handshake
        time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode(errors="replace")
        assert "Traceback" not in err.decode(errors="replace")
        # everything it held is closed: the client sees the end ...
        assert recv_until_eof(client) == b""
        idle.settimeout(5)
        assert recv_until_eof(idle) == b""
        # ... and the server sees its link go
        wait_until(lambda: not fastnat.nat_waitforconn_alive(), 5, "the server to see its forwarder gone")
        client.close()
        idle.close()
        fastnat.nat_stopcomm(handle)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_forwarder_bad_port_is_an_error_not_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "fastnat", "forwarder", "--host", LOOPBACK, "--port", str(port)],
            capture_output=True,
            timeout=20,
            env=engine_env("compiled"),
        )
    assert proc.returncode != 0
    assert b"Traceback" not in proc.stderr
    assert str(port).encode() in proc.stderr or b"in use" in proc.stderr, proc.stderr


@pytest.mark.parametrize("policy,shown", [("local", True), ("none", False), ("all", True)])
def test_who_sees_the_per_server_stats(forwarders, policy: str, shown: bool) -> None:
    """The per-server part of ``stats`` (ids, ports, the servers' public
    addresses) goes to callers on the forwarder's host by default; totals go
    to anyone. (tests/e2e asks from the forwarder's host at its public
    address; a caller elsewhere is refused the detail there too.)"""
    fwd = forwarders("--stats-detail", policy)
    handle = fastnat.nat_waitforconn("private", 80, echo_handler, forwarderIP=LOOPBACK, forwarderPort=fwd.port)
    try:
        stats = raw_stats(fwd.port)
        assert stats["servers"] == 1
        if shown:
            assert list(stats["per_server"]) == ["private"] and stats["per_server_omitted"] == 0
        else:
            assert stats["per_server"] == {} and stats["per_server_omitted"] == 1
    finally:
        fastnat.nat_stopcomm(handle)


def test_the_stats_detail_policy() -> None:
    from fastnat.forwarder import Forwarder, stats_detail_allowed

    for ip in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert stats_detail_allowed("local", ip), ip
        assert not stats_detail_allowed("none", ip), ip
    for ip in ("10.0.0.7", "203.0.113.9", "2001:db8::1", "::ffff:192.0.2.1", "fe80::1%eth0", "not an ip"):
        assert not stats_detail_allowed("local", ip), ip
        assert stats_detail_allowed("all", ip), ip
    # from this host to one of its own addresses: the caller's address is the one it dialled
    assert stats_detail_allowed("local", "203.0.113.9", "203.0.113.9")
    assert stats_detail_allowed("local", "::ffff:10.0.0.7", "10.0.0.7")
    assert not stats_detail_allowed("local", "203.0.113.9", "203.0.113.10")
    assert not stats_detail_allowed("none", "203.0.113.9", "203.0.113.9")
    with pytest.raises(ValueError, match="stats_detail"):
        Forwarder("127.0.0.1", 0, stats_detail="everyone")

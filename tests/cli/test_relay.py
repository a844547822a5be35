"""``expose`` and ``connect`` carrying real bytes: ``--listen`` (like ssh -L),
standard input/output (like netcat, half-close included) and
``--proxy-protocol``."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from .support import (
    LISTEN_READY,
    LOOPBACK,
    STOP_TIMEOUT,
    Processes,
    Service,
    clean_env,
    connected,
    echo,
    free_port,
    recv_line,
    recv_until_eof,
    registry_url,
    run,
    FASTNAT,
)

MiB = 1024 * 1024


def listen_tunnel(procs: Processes, server_id: str, port: int, fwd_port: int) -> tuple[str, int]:
    proc = procs.start(["connect", server_id, str(port), "--listen", f"{LOOPBACK}:{free_port()}"],
                       clean_env(FASTNAT_REGISTRY=registry_url(fwd_port)))
    found = proc.wait_line(LISTEN_READY)
    assert found.group(3) == server_id and int(found.group(4)) == port, found.group(0)
    return found.group(1), int(found.group(2))


# ------------------------------------------------------------ --listen


def test_listen_tunnel_carries_concurrent_connections(procs: Processes, forwarder: int,
                                                      services: Callable[..., Service]) -> None:
    service = services(echo)
    procs.expose("web", 80, service.address, forwarder)
    address = listen_tunnel(procs, "web", 80, forwarder)
    payloads = [os.urandom(size) for size in (1, 300_000, 3 * MiB)]
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with connected(address) as conn:
                sender = threading.Thread(target=lambda: (conn.sendall(payloads[i]), conn.shutdown(socket.SHUT_WR)))
                sender.start()
                results[i] = recv_until_eof(conn)
                sender.join(STOP_TIMEOUT)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i, payload in enumerate(payloads):
        assert hashlib.sha256(results[i]).hexdigest() == hashlib.sha256(payload).hexdigest(), (i, len(results[i]))


def test_listen_tunnel_half_close(procs: Processes, forwarder: int, services: Callable[..., Service]) -> None:
    """The local client's end of input reaches the service, which answers after it."""

    def digest_after_eof(conn: socket.socket) -> None:
        data = recv_until_eof(conn)
        conn.sendall(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode())

    service = services(digest_after_eof)
    procs.expose("web", 80, service.address, forwarder)
    address = listen_tunnel(procs, "web", 80, forwarder)
    payload = os.urandom(MiB + 7)
    with connected(address) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        answer = recv_until_eof(conn)
    assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


# ------------------------------------------------------------- netcat


def test_netcat_stdin_to_service_and_answer_after_half_close(procs: Processes, forwarder: int,
                                                              services: Callable[..., Service]) -> None:
    def digest_after_eof(conn: socket.socket) -> None:
        data = recv_until_eof(conn)
        conn.sendall(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode())

    service = services(digest_after_eof)
    procs.expose("nc", 7, service.address, forwarder)
    payload = os.urandom(2 * MiB + 3)
    result = run(["connect", "nc", "7"], env=clean_env(FASTNAT_REGISTRY=registry_url(forwarder)), input=payload)
    assert result.returncode == 0, result
    assert result.stdout == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n"
    assert result.stderr == "", result.stderr


def test_netcat_both_directions_binary(procs: Processes, forwarder: int, services: Callable[..., Service]) -> None:
    """A banner first, then an echo of all input, then a last word after end of input."""

    def banner_echo_bye(conn: socket.socket) -> None:
        conn.sendall(b"HELLO\x00\xff\r\n")
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
        conn.sendall(b"BYE\n")

    service = services(banner_echo_bye)
    procs.expose("nc", 7, service.address, forwarder)
    payload = os.urandom(MiB)
    proc = subprocess.run(FASTNAT + ["connect", "nc", "7", "--forwarder", f"{LOOPBACK}:{forwarder}"],
                          input=payload, capture_output=True, timeout=30, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"HELLO\x00\xff\r\n" + payload + b"BYE\n"
    assert proc.stderr == b""


def test_netcat_service_closes_first_while_stdin_stays_open(procs: Processes, forwarder: int,
                                                            services: Callable[..., Service]) -> None:
    """Like ``nc``: the service sends its answer and closes; the command prints
    it all and exits 0 even though its standard input is still open."""
    answer = os.urandom(3 * MiB)

    def send_and_close(conn: socket.socket) -> None:
        conn.sendall(answer)

    service = services(send_and_close)
    procs.expose("dl", 8, service.address, forwarder)
    proc = subprocess.Popen(FASTNAT + ["connect", "dl", "8", "--forwarder", f"{LOOPBACK}:{forwarder}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
                            start_new_session=True)
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=lambda: out.append(proc.stdout.read())),  # type: ignore[union-attr]
               threading.Thread(target=lambda: err.append(proc.stderr.read()))]  # type: ignore[union-attr]
    for t in readers:
        t.start()
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(5)
        raise AssertionError("connect did not end after the service closed (stdin still open)") from None
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        for t in readers:
            t.join(STOP_TIMEOUT)
    stderr = b"".join(err).decode(errors="replace")
    assert code == 0, f"exit {code}, stderr {stderr!r}"
    assert "Fatal Python error" not in stderr, stderr
    assert b"".join(out) == answer
    assert stderr == ""


def test_netcat_empty_input(procs: Processes, forwarder: int, services: Callable[..., Service]) -> None:
    service = services(lambda conn: conn.sendall(b"nothing came: %d\n" % len(recv_until_eof(conn))))
    procs.expose("nc", 7, service.address, forwarder)
    result = run(["connect", "nc", "7", "--forwarder", f"{LOOPBACK}:{forwarder}"], input=b"")
    assert result.returncode == 0, result
    assert result.stdout == "nothing came: 0\n"


# ------------------------------------------------------- PROXY protocol


def _header_then_echo(conn: socket.socket) -> None:
    header = recv_line(conn)
    conn.sendall(header)
    echo(conn)


def test_proxy_protocol_carries_the_real_client_address(procs: Processes, forwarder: int,
                                                        services: Callable[..., Service]) -> None:
    """The client dials from 127.0.0.5 and a port of its choosing; the local
    service is told exactly that address, not the forwarder's or expose's."""
    import fastnat

    service = services(_header_then_echo)
    procs.expose("pp", 80, service.address, forwarder, "--proxy-protocol")
    client_port = free_port("127.0.0.5")
    sock = fastnat.nat_openconn("pp", 80, localip="127.0.0.5", localport=client_port, timeout=10,
                                forwarderIP=LOOPBACK, forwarderPort=forwarder)
    try:
        sock.settimeout(20)
        assert sock.getsockname() == ("127.0.0.5", client_port)
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        got = recv_until_eof(sock)
    finally:
        sock.close()
    header, _, rest = got.partition(b"\r\n")
    fields = header.decode().split(" ")
    assert fields[:3] == ["PROXY", "TCP4", "127.0.0.5"], got
    assert len(fields) == 6, got
    assert int(fields[4]) == client_port, f"source port {fields[4]} is not the client's {client_port}: {got!r}"
    assert rest == b"hello"


def test_proxy_protocol_through_a_listen_tunnel(procs: Processes, forwarder: int,
                                                services: Callable[..., Service]) -> None:
    service = services(_header_then_echo)
    procs.expose("pp", 80, service.address, forwarder, "--proxy-protocol")
    address = listen_tunnel(procs, "pp", 80, forwarder)
    with connected(address) as conn:
        conn.sendall(b"ping")
        conn.shutdown(socket.SHUT_WR)
        got = recv_until_eof(conn)
    assert got.startswith(b"PROXY TCP4 127.0.0.1 "), got
    assert got.endswith(b"\r\nping"), got
    assert len(got.split(b"\r\n", 1)[0]) <= 105


def test_without_proxy_protocol_the_service_gets_only_the_client_bytes(procs: Processes, forwarder: int,
                                                                       services: Callable[..., Service]) -> None:
    service = services(echo)
    procs.expose("plain", 80, service.address, forwarder)
    result = run(["connect", "plain", "80", "--forwarder", f"{LOOPBACK}:{forwarder}"], input=b"PROXY? no.\n")
    assert result.returncode == 0, result
    assert result.stdout == "PROXY? no.\n"


def test_expose_default_target_is_localhost_port(procs: Processes, forwarder: int) -> None:
    """Without ``--to``, ``expose ID PORT`` relays to 127.0.0.1:PORT."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        proc = procs.start(["expose", "auto", str(port), "--forwarder", f"{LOOPBACK}:{forwarder}"])
        from .support import EXPOSE_READY

        found = proc.wait_line(EXPOSE_READY)
        assert (found.group(3), int(found.group(4))) == (LOOPBACK, port), found.group(0)
        assert found.group(5) == f"{LOOPBACK}:{forwarder}", found.group(0)

        def serve() -> None:
            listener.settimeout(20)
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"default target\n")

        t = threading.Thread(target=serve)
        t.start()
        import fastnat

        sock = fastnat.nat_openconn("auto", port, timeout=10, forwarderIP=LOOPBACK, forwarderPort=forwarder)
        try:
            sock.settimeout(20)
            got = recv_until_eof(sock)
        finally:
            sock.close()
        t.join(STOP_TIMEOUT)
    assert got == b"default target\n"


@pytest.mark.parametrize("when", ["before", "after"])
def test_listen_tunnel_to_an_id_exposed_later(procs: Processes, forwarder: int, services: Callable[..., Service],
                                              when: str) -> None:
    """``connect --listen`` looks the id up per connection: a service exposed
    after the tunnel started is reachable, with no restart."""
    service = services(echo)
    if when == "before":
        procs.expose("late", 80, service.address, forwarder)
    address = listen_tunnel(procs, "late", 80, forwarder)
    if when == "after":
        procs.expose("late", 80, service.address, forwarder)
    deadline = time.monotonic() + 10
    while True:
        with connected(address) as conn:
            conn.sendall(b"x")
            conn.shutdown(socket.SHUT_WR)
            try:
                got = recv_until_eof(conn)
            except ConnectionResetError:
                got = b""
        if got == b"x" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == b"x"


def test_netcat_with_stdin_at_end_while_the_service_answers(procs: Processes, forwarder: int,
                                                            services: Callable[..., Service]) -> None:
    """``fastnat connect ID PORT < /dev/null`` to a service that answers at
    once and closes: the answer, exit 0, nothing on stderr -- every time."""
    service = services(lambda conn: conn.sendall(b"220 ready\r\n"))
    procs.expose("smtp", 25, service.address, forwarder)
    for attempt in range(15):
        proc = subprocess.run(FASTNAT + ["connect", "smtp", "25", "--forwarder", f"{LOOPBACK}:{forwarder}"],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=20, env=clean_env())
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"220 ready\r\n", b""), (
            f"attempt {attempt + 1}: exit {proc.returncode}, stdout {proc.stdout!r}, stderr {proc.stderr!r}")

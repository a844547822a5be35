"""The abuse limits' flags: a bad value is one line naming the flag, and each
value reaches the running forwarder (the client's error names the limit,
``status`` counts the refusal)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable

import pytest

from .support import FASTNAT, LOOPBACK, Processes, Service, assert_user_error, clean_env, run, status_json


@pytest.mark.parametrize(
    "args",
    [
        ["forwarder", "--max-connections-per-ip", "0"],
        ["forwarder", "--max-handshakes-per-ip", "many"],
        ["forwarder", "--max-streams-per-session", "-1"],
        ["forwarder", "--server-byte-rate", "1.5M"],
        ["forwarder", "--server-byte-cap", "0"],
        ["forwarder", "--server-byte-cap", "10X"],
        ["registry", "--max-connections", "0"],
        ["registry", "--max-connections-per-ip", "abc"],
        ["registry", "--max-requests-per-ip", "inf"],
    ],
    ids=lambda args: " ".join(args),
)
def test_bad_limit_is_one_line_naming_the_flag(args: list[str]) -> None:
    assert_user_error(run([*args, "--host", LOOPBACK, "--port", "0"], timeout=10), args[1])


def hello_status(port: int) -> int:
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(b"FNAT\x01C")
        reply = b""
        while len(reply) < 5:
            chunk = sock.recv(64)
            assert chunk, "closed before the hello reply"
            reply += chunk
        return reply[4]


def test_connections_per_ip_flag(procs: Processes) -> None:
    _, port = procs.forwarder("--max-connections-per-ip", "2")
    held = [socket.create_connection((LOOPBACK, port), timeout=5) for _ in range(2)]
    try:
        assert hello_status(port) == 4  # IP_CONNECTIONS
        result = subprocess.run(FASTNAT + ["connect", "x", "80", "--forwarder", f"{LOOPBACK}:{port}"],
                                check=False, capture_output=True, timeout=30, env=clean_env(), stdin=subprocess.DEVNULL)
        assert_user_error(subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                                      result.stderr.decode()), "max_connections_per_ip")
    finally:
        for sock in held:
            sock.close()
    assert status_json(port)["refusals"]["ip_connections_full"] == 2


DATA = os.urandom(100_000)


def send_all(conn: socket.socket) -> None:
    try:
        conn.sendall(DATA)
    except OSError:
        pass


def test_byte_cap_flag(procs: Processes, services: Callable[..., Service]) -> None:
    service = services(send_all)
    # the cap: 1000 bytes of the 100,000, then the connection ends
    _, port = procs.forwarder("--server-byte-cap", "1000")
    procs.expose("capped", 7, service.address, port)
    result = subprocess.run(FASTNAT + ["connect", "capped", "7", "--forwarder", f"{LOOPBACK}:{port}"],
                            check=False, capture_output=True, timeout=30, env=clean_env(), stdin=subprocess.DEVNULL)
    assert result.stdout == DATA[:1000], (len(result.stdout), result.stderr)
    again = run(["connect", "capped", "7", "--forwarder", f"{LOOPBACK}:{port}"])
    assert_user_error(again, "server_byte_cap")


def test_streams_per_session_flag(procs: Processes, services: Callable[..., Service]) -> None:
    service = services(send_all)
    # one stream per session: the control stream; every client is refused
    _, port = procs.forwarder("--max-streams-per-session", "1")
    procs.expose("narrow", 7, service.address, port)
    assert_user_error(run(["connect", "narrow", "7", "--forwarder", f"{LOOPBACK}:{port}"]), "max_streams_per_session")
    assert status_json(port)["refusals"]["session_streams_full"] == 1


def test_limit_flags_reach_the_limits() -> None:
    from fastnat.cli import _build_parser

    args = _build_parser().parse_args(["forwarder", "--server-byte-rate", "2M", "--server-byte-cap", "3G",
                                       "--max-connections-per-ip", "7", "--max-handshakes-per-ip", "5"])
    assert (args.server_byte_rate, args.server_byte_cap) == (2 * 1024**2, 3 * 1024**3)
    assert (args.max_connections_per_ip, args.max_handshakes_per_ip) == (7, 5)
    defaults = _build_parser().parse_args(["forwarder"])
    assert defaults.server_byte_rate is None and defaults.server_byte_cap is None
    args = _build_parser().parse_args(["registry", "--max-requests-per-ip", "12.5", "--max-connections-per-ip", "3"])
    assert (args.max_requests_per_ip, args.max_connections_per_ip) == (12.5, 3)

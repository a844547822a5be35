"""A hello may arrive in pieces: TCP gives no message boundaries."""

from __future__ import annotations

import socket
import time

import pytest

from fastnat.protocol import encode_hello, encode_request

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("role", [b"C", b"R"])
def test_a_hello_sent_one_byte_at_a_time_is_answered(forwarder, role: bytes) -> None:
    hello = encode_hello(role)
    with socket.create_connection(forwarder.tuple, timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(hello)):
            sock.sendall(hello[i : i + 1])
            time.sleep(0.02)  # separate segments
        reply = sock.recv(6)
        assert reply[:4] == b"FNAT" and reply[4] == 0, reply  # status OK
        if role == b"C":
            sock.sendall(encode_request(1, "externaladdr"))
            data = b""
            deadline = time.monotonic() + 5
            while b"127.0.0.1" not in data and time.monotonic() < deadline:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert b"127.0.0.1" in data

"""A hashing server for the TLS tests: it reads a length-prefixed payload and
answers its sha256, so that a transfer is checked end to end without a
half-close (a TLS connection cannot half-close)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from typing import Any

from nat.support import recv_exactly

# Bytes per transfer: enough for many TLS records and mux frames and window
# updates, small enough for a test of a few seconds on a busy machine.
PAYLOAD_SIZE = 4 * 1024 * 1024


def payload() -> tuple[bytes, bytes]:
    """The bytes a client sends (length prefix first) and the digest it expects back."""
    data = os.urandom(PAYLOAD_SIZE)
    return struct.pack("!Q", len(data)) + data, hashlib.sha256(data).digest()


def hash_handler(remoteip: str, remoteport: int, sock: Any, thiscommhandle: Any, listencommhandle: Any) -> None:
    """A ``nat_waitforconn`` function: sha256 of the payload, then close."""
    hash_conn(sock)


def hash_conn(sock: Any) -> None:
    """Read a payload from ``sock``, answer its sha256, close."""
    try:
        (size,) = struct.unpack("!Q", recv_exactly(sock, 8))
        digest = hashlib.sha256()
        while size:
            chunk = sock.recv(min(size, 1 << 16))
            if not chunk:
                return
            digest.update(chunk)
            size -= len(chunk)
        sock.sendall(digest.digest())
    finally:
        sock.close()


async def hash_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The same as an asyncio ``client_connected_cb``."""
    try:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
        digest = hashlib.sha256()
        while size:
            chunk = await reader.read(min(size, 1 << 16))
            if not chunk:
                return
            digest.update(chunk)
            size -= len(chunk)
        writer.write(digest.digest())
        await writer.drain()
    finally:
        writer.close()


def send_and_check(sock: socket.socket) -> None:
    """Send a payload on a blocking socket; assert the server's digest."""
    data, expected = payload()
    sock.sendall(data)
    assert recv_exactly(sock, 32) == expected
    assert sock.recv(1) == b""  # then the server's end: a clean close

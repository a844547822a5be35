"""``fastnat connect``: reach a server's port from here.

With a local listening address, every connection to it is carried to the
server (like ``ssh -L``); without one, standard input and output are the
connection (like netcat).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

from fastnat.aio.client import open_transport
from fastnat.splice import Relays, Splice

__all__ = ["Tunnel", "listen", "stdio"]

log = logging.getLogger("fastnat.connect")


# What a local client may send before its relay is ready is kept; past this,
# reading pauses until the relay takes over.
_EARLY_DATA_LIMIT = 256 * 1024


class _Waiting(asyncio.Protocol):
    """A local connection, until its relay is ready: keeps what the client
    sends meanwhile (pausing past a limit). Pausing in connection_made is not
    enough: uvloop starts reading only after it returns."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.early = bytearray()
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.tunnel._relays.spawn(self.tunnel._carry(self))

    def data_received(self, data: bytes) -> None:
        self.early += data
        if len(self.early) >= _EARLY_DATA_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True  # relayed as a FIN once the splice runs

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class Tunnel:
    """A local listener whose connections are carried to ``server_id:port``."""

    def __init__(self, server_id: str, port: int, forwarder: tuple[str, int] | None, timeout: float) -> None:
        self.server_id = server_id
        self.port = port
        self.forwarder = forwarder
        self.timeout = timeout
        self.server: asyncio.Server | None = None
        self.connections_total = 0
        self.failures = 0
        self._relays = Relays()

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]  # type: ignore[no-any-return]

    async def _carry(self, waiting: _Waiting) -> None:
        local = waiting.transport
        assert local is not None
        try:
            relay, rest, relay_eof = await open_transport(self.server_id, self.port, forwarder=self.forwarder, timeout=self.timeout)
        except OSError as exc:
            self.failures += 1
            log.warning("cannot reach %r port %d: %s", self.server_id, self.port, exc)
            local.abort()
            return
        if waiting.lost or local.is_closing():
            relay.close()
            return
        self.connections_total += 1
        local.pause_reading()
        splice = Splice(local, relay, initial_a=bytes(waiting.early), initial_b=rest, eof_a=waiting.eof, eof_b=relay_eof)
        local.resume_reading()
        relay.resume_reading()
        await self._relays.run(splice)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        await self._relays.close()


async def listen(
    server_id: str,
    port: int,
    host: str,
    local_port: int,
    *,
    forwarder: tuple[str, int] | None = None,
    timeout: float = 5.0,
) -> Tunnel:
    """Listen on ``host:local_port``; carry each connection to ``server_id:port``."""
    tunnel = Tunnel(server_id, port, forwarder, timeout)
    loop = asyncio.get_running_loop()
    tunnel.server = await loop.create_server(lambda: _Waiting(tunnel), host, local_port)
    return tunnel


# Seconds the end of a netcat-style connection waits for a send in progress
# to report how it went; a send on a closed or reset connection returns at once.
UPLOAD_SETTLE_TIMEOUT = 2.0


def _raw_reader(stream: BinaryIO) -> Callable[[int], bytes]:
    """A read function for ``stream`` that holds no lock of its buffered
    object: the reading thread is a daemon that may still be blocked in it
    when the interpreter exits, and a held buffer lock makes that exit a
    fatal error. Reads the file descriptor directly when there is one."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream.read1 if hasattr(stream, "read1") else stream.read
    return lambda n: os.read(fd, n)


def stdio(
    sock: socket.socket,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
) -> None:
    """Copy ``stdin`` to ``sock`` and ``sock`` to ``stdout`` until both ends are done.

    End of input half-closes the connection (the server sees end of stream
    and may still answer); the call returns once the server has finished.
    Over TLS (an ``ssl.SSLSocket``) there is no half-close: end of input is
    not passed on, and the call returns once the server closes.
    """
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    errors: list[BaseException] = []
    sending = threading.Event()  # set while the upload is in a socket call, not waiting on stdin
    finished = threading.Event()  # the connection is over: the upload's errors no longer count
    read = _raw_reader(stdin)

    def upload() -> None:
        try:
            while True:
                chunk = read(65536)
                sending.set()
                if not chunk:
                    break
                sock.sendall(chunk)
                sending.clear()
            if not isinstance(sock, ssl.SSLSocket):  # SSLSocket.shutdown would end TLS under the reader
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if not finished.is_set():  # not the socket closed under it below
                errors.append(exc)
        finally:
            sending.clear()

    sender = threading.Thread(target=upload, name="fastnat-stdin", daemon=True)
    sender.start()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            stdout.write(chunk)
            stdout.flush()
        if sending.is_set():
            # A reset is reported to one socket call only: if the upload is
            # in one, it may be the one told; let it finish (a call on a
            # reset socket returns at once).
            sender.join(UPLOAD_SETTLE_TIMEOUT)
    finally:
        finished.set()
        sock.close()
    if errors and not isinstance(errors[0], BrokenPipeError):
        # BrokenPipeError: writing after the connection was already over (its
        # cause, if any, was reported to the reading side).
        raise errors[0]

"""A checked transfer: both sides compute the sha256 of what they got.

The client sends a header (mode, a tag naming the transfer, the upload size
``n`` and the download size ``m``), then ``n`` bytes. The server reads exactly
``n`` bytes, answers with their sha256, then sends ``m`` bytes of its own and
their sha256. A transfer counts as a success only if both sides say so: the
server read all ``n`` bytes (its event carries the digests) and the client got
back the digest of what it sent and a download that matches its trailer.

Mode ``S`` (stall) makes the server's handler stop reading for good after the
header: what the client pushes then piles up against that one stream's window.

This module is imported by ``server_proc.py`` (the server side, blocking and
asyncio) and by the tests (the client side, blocking and asyncio); it uses
nothing but the standard library, ``fastnat`` and ``nat.support``-free code so
that the server process can import it from its own directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

HEADER = struct.Struct(">c16sQQ")  # mode, tag, upload size, download size
MODE_TRANSFER = b"T"
MODE_STALL = b"S"
DIGEST_SIZE = 32
# Pieces of a payload: stamped with their index, so that a piece delivered
# twice or in the wrong place changes the digest.
CHUNK = 64 * 1024

Emit = Callable[..., None]


def chunks(size: int, base: bytes) -> Iterator[bytes]:
    """``size`` bytes made of ``base`` (CHUNK bytes), each piece stamped with its index."""
    sent = 0
    index = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        yield index.to_bytes(8, "big") + base[8:n] if n > 8 else base[:n]
        sent += n
        index += 1


def header(mode: bytes, tag: str, upload: int, download: int) -> bytes:
    return HEADER.pack(mode, tag.encode().ljust(16)[:16], upload, download)


# ------------------------------------------------------------ server side


def _recv_exactly(sock: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"end of stream after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


# Handlers in stall mode wait here (the process ends them).
_stalled = threading.Event()


def serve_blocking(sock: Any, emit: Emit) -> None:
    """The server side on a ``nat_waitforconn`` socket; one ``transfer`` event at the end."""
    tag = "?"
    received = 0
    try:
        mode, raw_tag, n, m = HEADER.unpack(_recv_exactly(sock, HEADER.size))
        tag = raw_tag.decode().strip()
        emit(event="begin", tag=tag)
        if mode == MODE_STALL:
            emit(event="stalled", tag=tag)
            _stalled.wait()
            return
        digest = hashlib.sha256()
        while received < n:
            chunk = sock.recv(min(256 * 1024, n - received))
            if not chunk:
                raise EOFError(f"end of stream after {received} of {n} bytes")
            digest.update(chunk)
            received += len(chunk)
        sock.sendall(digest.digest())
        down = hashlib.sha256()
        for piece in chunks(m, os.urandom(CHUNK)):
            sock.sendall(piece)
            down.update(piece)
        sock.sendall(down.digest())
    except EOFError as exc:
        emit(event="transfer", tag=tag, ok=False, eof=True, received=received, error=f"EOFError: {exc}")
    except OSError as exc:
        emit(event="transfer", tag=tag, ok=False, eof=False, received=received, error=f"{type(exc).__name__}: {exc}")
    else:
        emit(event="transfer", tag=tag, ok=True, received=received, sha=digest.hexdigest(), down_sha=down.hexdigest())
    finally:
        sock.close()


async def serve_async(reader: asyncio.StreamReader, writer: Any, emit: Emit) -> None:
    """The server side on a ``fastnat.aio.start_server`` connection."""
    tag = "?"
    received = 0
    try:
        mode, raw_tag, n, m = HEADER.unpack(await reader.readexactly(HEADER.size))
        tag = raw_tag.decode().strip()
        emit(event="begin", tag=tag)
        if mode == MODE_STALL:
            emit(event="stalled", tag=tag)
            await asyncio.Event().wait()  # cancelled when the server closes
            return
        digest = hashlib.sha256()
        while received < n:
            chunk = await reader.read(min(256 * 1024, n - received))
            if not chunk:
                raise EOFError(f"end of stream after {received} of {n} bytes")
            digest.update(chunk)
            received += len(chunk)
        writer.write(digest.digest())
        down = hashlib.sha256()
        for piece in chunks(m, os.urandom(CHUNK)):
            writer.write(piece)
            down.update(piece)
            await writer.drain()
        writer.write(down.digest())
        await writer.drain()
    except EOFError as exc:  # IncompleteReadError is one
        emit(event="transfer", tag=tag, ok=False, eof=True, received=received, error=f"EOFError: {exc}")
    except OSError as exc:
        emit(event="transfer", tag=tag, ok=False, eof=False, received=received, error=f"{type(exc).__name__}: {exc}")
    else:
        emit(event="transfer", tag=tag, ok=True, received=received, sha=digest.hexdigest(), down_sha=down.hexdigest())
    finally:
        writer.close()


# ------------------------------------------------------------ client side


@dataclasses.dataclass
class Transfer:
    """One client transfer and what the client saw (``time.monotonic()`` times)."""

    tag: str
    upload: int
    download: int
    pause: float = 0.0  # seconds between upload pieces (spreads a transfer over time)
    start: float = 0.0
    end: float = 0.0
    stage: str = "not started"
    sent_sha: str = ""  # set once the whole upload is handed to the connection
    down_sha: str = ""  # of the download the client received
    ok: bool = False
    eof: bool = False  # ended by a clean end of stream before its end
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.end > 0 and not self.ok


def _check(transfer: Transfer, digest: bytes, sent: Any, down: Any, trailer: bytes) -> None:
    transfer.down_sha = down.hexdigest()
    if digest != sent.digest():
        transfer.error = f"the server's digest {digest.hex()} is not the upload's {sent.hexdigest()}"
    elif trailer != down.digest():
        transfer.error = f"the download's digest {transfer.down_sha} is not the server's {trailer.hex()}"
    else:
        transfer.ok = True


def run_blocking(transfer: Transfer, connect: Callable[[], socket.socket]) -> Transfer:
    """Run ``transfer`` on the socket ``connect()`` returns (blocking, no timeout on the data)."""
    transfer.start = time.monotonic()
    try:
        transfer.stage = "connect"
        sock = connect()
        with sock:
            sock.settimeout(None)
            transfer.stage = "upload"
            sock.sendall(header(MODE_TRANSFER, transfer.tag, transfer.upload, transfer.download))
            sent = hashlib.sha256()
            for piece in chunks(transfer.upload, os.urandom(CHUNK)):
                sock.sendall(piece)
                sent.update(piece)
                if transfer.pause:
                    time.sleep(transfer.pause)
            transfer.sent_sha = sent.hexdigest()
            transfer.stage = "download"
            digest = _recv_exactly(sock, DIGEST_SIZE)
            down = hashlib.sha256()
            left = transfer.download
            while left:
                piece = sock.recv(min(256 * 1024, left))
                if not piece:
                    raise EOFError(f"end of stream with {left} of {transfer.download} download bytes missing")
                down.update(piece)
                left -= len(piece)
            _check(transfer, digest, sent, down, _recv_exactly(sock, DIGEST_SIZE))
    except EOFError as exc:
        transfer.eof = True
        transfer.error = f"EOFError in {transfer.stage}: {exc}"
    except OSError as exc:
        transfer.error = f"{type(exc).__name__} in {transfer.stage}: {exc}"
    transfer.end = time.monotonic()
    return transfer


async def run_async(transfer: Transfer, connect: Callable[[], Any]) -> Transfer:
    """Run ``transfer`` on the ``(reader, writer)`` that ``await connect()`` returns."""
    transfer.start = time.monotonic()
    try:
        transfer.stage = "connect"
        reader, writer = await connect()
        try:
            transfer.stage = "upload"
            writer.write(header(MODE_TRANSFER, transfer.tag, transfer.upload, transfer.download))
            sent = hashlib.sha256()
            for piece in chunks(transfer.upload, os.urandom(CHUNK)):
                writer.write(piece)
                sent.update(piece)
                await writer.drain()
                if transfer.pause:
                    await asyncio.sleep(transfer.pause)
            transfer.sent_sha = sent.hexdigest()
            transfer.stage = "download"
            digest = await reader.readexactly(DIGEST_SIZE)
            down = hashlib.sha256()
            left = transfer.download
            while left:
                piece = await reader.read(min(256 * 1024, left))
                if not piece:
                    raise EOFError(f"end of stream with {left} of {transfer.download} download bytes missing")
                down.update(piece)
                left -= len(piece)
            _check(transfer, digest, sent, down, await reader.readexactly(DIGEST_SIZE))
        finally:
            writer.close()
    except EOFError as exc:
        transfer.eof = True
        transfer.error = f"EOFError in {transfer.stage}: {exc}"
    except OSError as exc:
        transfer.error = f"{type(exc).__name__} in {transfer.stage}: {exc}"
    transfer.end = time.monotonic()
    return transfer

"""Helpers of the NAT layer's end-to-end tests.

Nothing here is a mock: forwarders are ``python -m fastnat forwarder``
processes, servers and clients use real sockets on 127.0.0.1. The raw
client speaks the control protocol from its description (hello, u32-length
prefixed JSON), independently of :mod:`fastnat.protocol`, so that it can
also say things the library never would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _net_helpers import async_wait_until, free_port, wait_until  # noqa: F401 (re-exported)

LOOPBACK = "127.0.0.1"
HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "server_proc.py"
KiB = 1024
MiB = 1024 * KiB

_READY = re.compile(r"fastnat forwarder listening on (\S+):(\d+)")


# ------------------------------------------------------------------ engines


def engine_env(engine_name: str, **extra: str) -> dict[str, str]:
    """The environment of a child process that must run ``engine_name``."""
    env = dict(os.environ)
    for name in ("FASTNAT_NO_EXTENSIONS", "FASTNAT_FORWARDERS", "FASTNAT_SECRET"):
        env.pop(name, None)
    if engine_name == "python":
        env["FASTNAT_NO_EXTENSIONS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# --------------------------------------------------------- child processes


def _read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    """One line of ``proc``'s stdout, within ``timeout``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = bytearray()
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{what}: no line on stdout within {timeout} s (got {bytes(buf)!r})")
            if not sel.select(remaining):
                continue
            chunk = os.read(fd, 1)  # one byte at a time: leave the rest for later reads
            if not chunk:
                raise AssertionError(f"{what}: stdout closed (exit {proc.poll()}) after {bytes(buf)!r}")
            buf += chunk
    return buf.decode().rstrip("\n")


def _stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    """Signal ``proc``, wait for it, kill it if it does not exit; its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for stream in (proc.stdout, proc.stdin):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    assert proc.returncode is not None
    return proc.returncode


class ForwarderProcess:
    """``python -m fastnat forwarder`` on 127.0.0.1, its stderr in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, *, port: int = 0) -> None:
        self.log_path = log_path
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "fastnat", "forwarder", "--host", LOOPBACK, "--port", str(port), *args]
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log_file, stdin=subprocess.DEVNULL, env=env
        )
        self.returncode: int | None = None
        try:
            line = _read_line(self.proc, 20.0, "forwarder")
            match = _READY.search(line)
            if not match:
                raise AssertionError(f"forwarder's first line is not its address: {line!r}")
            self.host = match.group(1)
            self.port = int(match.group(2))
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def tuple(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if line.strip()]

    def lines_about(self, peer: tuple[str, int]) -> list[str]:
        """Log lines that name the connection from ``peer``."""
        tag = re.compile(re.escape(f"{peer[0]}:{peer[1]}") + r"(?!\d)")
        return [line for line in self.log_lines() if tag.search(line)]

    def wait_log(self, pattern: str, timeout: float = 5.0, count: int = 1) -> list[str]:
        regex = re.compile(pattern)

        def found() -> list[str] | None:
            lines = [line for line in self.log_lines() if regex.search(line)]
            return lines if len(lines) >= count else None

        return wait_until(found, timeout, f"{count} forwarder log line(s) matching {pattern!r}; log:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL, and reap."""
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.returncode is None:
            self.returncode = _stop_process(self.proc, sig, timeout)
        if not self._log_file.closed:
            self._log_file.close()
        return self.returncode

    def stats(self) -> dict[str, Any]:
        return raw_stats(self.port)


class ServerProcess:
    """``server_proc.py``: a NAT server in its own process (blocking API).

    It prints one JSON object per line on stdout: ``{"event": "ready"}`` once
    registered, ``{"event": "error", "type": ..., "message": ...}`` if
    registering fails, and more (see the script).
    """

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), *args],
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            stdin=subprocess.PIPE,
            env=env,
        )
        self.returncode: int | None = None

    def event(self, timeout: float = 20.0) -> dict[str, Any]:
        line = _read_line(self.proc, timeout, f"server process (stderr: {self.log()!r})")
        return dict(json.loads(line))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.returncode is None:
            self.returncode = _stop_process(self.proc, signal.SIGTERM, timeout)
        if not self._log_file.closed:
            self._log_file.close()
        return self.returncode


# ------------------------------------------------------------- raw client

HELLO_REPLY_FIXED = 4 + 1 + 1 + 16 + 1


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything until the peer closes (ECONNRESET counts as the end too)."""
    buf = bytearray()
    while len(buf) < limit:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def raw_connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout)
    sock.settimeout(timeout)
    return sock


def hello(version: int = 1, role: bytes = b"C") -> bytes:
    return b"FNAT" + bytes((version,)) + role


def read_hello_reply(sock: socket.socket) -> dict[str, Any]:
    head = recv_exactly(sock, HELLO_REPLY_FIXED)
    assert head[:4] == b"FNAT", f"hello reply starts with {head[:4]!r}"
    count = head[-1]
    versions = list(recv_exactly(sock, count)) if count else []
    return {"status": head[4], "version": head[5], "nonce": head[6:22], "versions": versions}


def message(obj: Any) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def read_message(sock: socket.socket) -> Any:
    (length,) = struct.unpack(">I", recv_exactly(sock, 4))
    assert length <= 64 * KiB, f"reply of {length} bytes"
    return json.loads(recv_exactly(sock, length))


def raw_request(port: int, name: str, value: Any = None, timeout: float = 5.0) -> dict[str, Any]:
    """One client request on a fresh connection; the reply object."""
    with raw_connect(port, timeout) as sock:
        sock.sendall(hello() + message({"id": 7, "request": name, "value": value}))
        reply = read_hello_reply(sock)
        assert reply["status"] == 0, reply
        answer = read_message(sock)
    assert answer["id"] == 7, answer
    return dict(answer)


def raw_stats(port: int) -> dict[str, Any]:
    reply = raw_request(port, "stats")
    assert reply["status"] == "OK", reply
    return dict(reply["value"])


# ---------------------------------------------------------------- yamux

YAMUX_HEADER = struct.Struct(">BBHII")
TYPE_DATA, TYPE_WINDOW, TYPE_PING, TYPE_GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8


def yamux_frame(kind: int, flags: int, stream_id: int, length: int, payload: bytes = b"") -> bytes:
    return YAMUX_HEADER.pack(0, kind, flags, stream_id, length) + payload


# ------------------------------------------------------------ payloads


class Payload:
    """``size`` bytes generated chunk by chunk (each chunk differs: its
    index is stamped in), with the sha256 of the whole."""

    def __init__(self, size: int, chunk: int = 1 * MiB, seed: bytes | None = None) -> None:
        self.size = size
        self.chunk = chunk
        self.base = bytearray(os.urandom(chunk) if seed is None else (seed * (chunk // len(seed) + 1))[:chunk])
        digest = hashlib.sha256()
        for part in self.chunks():
            digest.update(part)
        self.sha256 = digest.hexdigest()

    def chunks(self) -> Iterator[bytes]:
        sent = 0
        index = 0
        while sent < self.size:
            n = min(self.chunk, self.size - sent)
            self.base[:8] = index.to_bytes(8, "big")
            yield bytes(self.base[:n])
            sent += n
            index += 1


# --------------------------------------------------------------- threads


class Worker(threading.Thread):
    """A thread that keeps its target's result or exception."""

    def __init__(self, target: Callable[[], Any], name: str = "nat-test-worker") -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def outcome(self, timeout: float) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


# ------------------------------------------------------- NAT layer helpers


def echo_handler(remoteip: str, remoteport: int, sock: Any, thiscommhandle: Any, listencommhandle: Any) -> None:
    """A ``nat_waitforconn`` function: echo until the client's end of stream."""
    try:
        sock.settimeout(30)
        while data := sock.recv(256 * KiB):
            sock.sendall(data)
    except OSError:
        pass
    finally:
        sock.close()


async def aio_echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A ``fastnat.aio.start_server`` handler: echo until the client's end of stream."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def echo_through(fport: int, server_id: str, port: int, data: bytes = b"ping", timeout: float = 5.0) -> bytes:
    """Open a connection with ``nat_openconn`` via the forwarder on ``fport``,
    send ``data``, half-close, return everything that comes back."""
    import fastnat

    sock = fastnat.nat_openconn(server_id, port, forwarderIP=LOOPBACK, forwarderPort=fport, timeout=timeout)
    with sock:
        sock.settimeout(timeout)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock)


class FakeForwarder:
    """A real TCP server in a thread that answers every connection with
    ``answer(first_bytes)`` and closes it: for a client to meet a forwarder
    that speaks another version, or something that is not a forwarder."""

    def __init__(self, answer: Callable[[bytes], bytes], read: int = 6) -> None:
        self._answer = answer
        self._read = read
        self.listener = socket.socket()
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.port = int(self.listener.getsockname()[1])
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-forwarder", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    first = recv_exactly(conn, self._read) if self._read else b""
                    self.received.append(first)
                    conn.sendall(self._answer(first))
                    time.sleep(0.05)
                except (OSError, EOFError):
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()

    def __enter__(self) -> FakeForwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawServer:
    """A server session made by hand (a real MuxSession, the control
    protocol spoken from its description), to say what fastnat's own
    server never would: many ids on one session, or never accept a stream."""

    def __init__(self, session: Any, control: Any, nonce: bytes, keep: Any = None) -> None:
        self._keep = keep  # asyncio's StreamWriter closes its transport when collected
        self.session = session
        self.control = control
        self.nonce = nonce
        self._next_id = 0

    @classmethod
    async def connect(cls, port: int) -> RawServer:
        from fastnat.aio.session import MuxSession

        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(hello(role=b"S"))
        head = await asyncio.wait_for(reader.readexactly(HELLO_REPLY_FIXED), 5)
        assert head[:6] == b"FNAT\x00\x01", head
        await reader.readexactly(head[-1])
        session = MuxSession.from_transport(writer.transport, client=True)
        control = await session.open_stream()
        return cls(session, control, head[6:22], keep=(reader, writer))

    async def request(self, name: str, value: Any = None) -> dict[str, Any]:
        self._next_id += 1
        self.control.write(message({"id": self._next_id, "request": name, "value": value}))
        (length,) = struct.unpack(">I", await asyncio.wait_for(self.control.readexactly(4), 10))
        reply = json.loads(await self.control.readexactly(length))
        assert reply["id"] == self._next_id, reply
        return dict(reply)

    async def close(self) -> None:
        self.session.close()
        await asyncio.wait_for(self.session.wait_closed(), 5)

#!/usr/bin/env python3
"""The Python processes of the network benchmarks: clients, servers, a plain relay.

    python bench/net_peer.py aio-client
    python bench/net_peer.py aio-server [--session] [--forwarder HOST:PORT --server-id ID --nat-port N]
    python bench/net_peer.py blocking-client
    python bench/net_peer.py blocking-server [--session] [--forwarder HOST:PORT --server-id ID --nat-port N]
    python bench/net_peer.py plain-relay --upstream HOST:PORT

Started and driven by ``bench/procs.py`` (see ``bench/net_bench.py``), one
process per role, everything on 127.0.0.1. The engine is the process's own:
``FASTNAT_NO_EXTENSIONS=1`` in the environment selects the pure one. asyncio
roles run on :func:`fastnat.aio.run` (uvloop when installed).

Driver protocol. stdout carries JSON lines only: first ``{"event": "ready",
...}`` (ports, engine, loop), then one reply per command. stdin carries one
JSON command per line, ``{"id": N, "cmd": NAME, ...}``; the reply is ``{"id":
N, "ok": true, "result": {...}}`` or ``{"id": N, "ok": false, "error": TEXT}``.
Commands run one at a time. ``quit`` (or EOF on stdin: the driver is gone)
ends the process. Logs and tracebacks go to stderr.

Workload protocol, on every connection or stream (the same in
``bench/go_relay/relay.go``): the client's first byte picks the workload.

* ``E``: echo. The server writes the ``E`` back, then echoes everything until EOF.
* ``U`` + big-endian u64 N: upload. The server reads N bytes, answers N as a
  u64, then reads to EOF. The client's clock runs from its first byte to the answer.
* ``u`` + u64 N: the same, and the server checks the bytes (the pattern
  below); wrong bytes make its answer 2^64-1. Warm-up runs use it.
* ``D`` + u64 N: download. The server writes N bytes (a fixed 256 KiB pattern,
  repeated), then its FIN, then reads to EOF. The client's clock runs from its
  request to the last byte.

Client commands (both clients): ``bulk`` {target, direction: up|down, size,
streams, verify}, ``rtt`` {target, count, warmup, message_size}, ``cps``
{target, loops, seconds}. A target is ``{"kind": "tcp", "host", "port"}`` (a
plain TCP connection), ``{"kind": "mux", "host", "port"}`` (a stream on the
multiplexer session this client keeps to that address), ``{"kind": "fastnat",
"forwarder": "HOST:PORT", "server_id", "port", "tls_ca"?}`` (``fastnat.aio.open_connection``,
over TLS when ``tls_ca`` names the CA file;
for the blocking client ``fastnat.nat_openconn``).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import math
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

LOOPBACK = "127.0.0.1"
CHUNK = 256 * 1024  # every write and read of the workloads, on every side
STREAM_LIMIT = 256 * 1024  # asyncio StreamReader limit, as fastnat.aio.open_connection's default
U64 = struct.Struct(">Q")
# The download pattern (as relay.go's: byte(i*7+1)); PATTERN2 lets a chunk of up
# to CHUNK bytes starting anywhere in the pattern be compared in one slice.
PATTERN = bytes((i * 7 + 1) & 0xFF for i in range(CHUNK))
PATTERN2 = PATTERN * 2
WRONG_BYTES = 2**64 - 1  # an upload's answer when the server checked the bytes and found them wrong
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 60.0  # one read or write (or connection setup) that makes no progress for this long fails

log = logging.getLogger("net_peer")

_out_lock = threading.Lock()


def emit(obj: dict[str, Any]) -> None:
    line = json.dumps(obj, separators=(",", ":")) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def die_with_parent() -> None:
    """SIGTERM when the driver dies (Linux); harmless elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    expected = os.environ.get("BENCH_DRIVER_PID")
    if expected and os.getppid() != int(expected):
        sys.exit("net_peer: the driver is gone")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    n = len(sorted_values)
    rank = max(1, min(n, math.ceil(q * n - 1e-9)))
    return sorted_values[rank - 1]


def latency_summary(samples_ns: list[int]) -> dict[str, Any]:
    ordered = sorted(samples_ns)
    n = len(ordered)
    return {
        "count": n,
        "p50_us": percentile(ordered, 0.50) / 1e3,
        "p99_us": percentile(ordered, 0.99) / 1e3,
        "mean_us": sum(ordered) / n / 1e3,
        "min_us": ordered[0] / 1e3,
        "max_us": ordered[-1] / 1e3,
    }


def pattern_ok(data: Any, offset: int) -> bool:
    """Are ``data`` (at most CHUNK bytes) the pattern's bytes from ``offset`` on?"""
    start = offset % CHUNK
    return bool(data == PATTERN2[start : start + len(data)])


def check_pattern(data: Any, offset: int) -> None:
    if not pattern_ok(data, offset):
        raise AssertionError(f"download: wrong bytes at offset {offset} (length {len(data)})")


def engine_info() -> dict[str, Any]:
    import fastnat
    import fastnat.mux

    return {
        "engine": fastnat.mux.IMPLEMENTATION,
        "fallback_reason": fastnat.mux.FALLBACK_REASON,
        "fastnat": getattr(fastnat, "__version__", "?"),
        "pid": os.getpid(),
        "python": sys.version.split()[0],
    }


# =====================================================================
# asyncio


async def aio_stdin_commands(handle: Callable[[dict[str, Any]], Any]) -> None:
    """Read commands from stdin (in a thread) and run them one at a time."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    while True:
        line = await queue.get()
        if line is None:
            return
        if not line.strip():
            continue
        command = json.loads(line)
        ident = command.get("id")
        if command.get("cmd") == "quit":
            emit({"id": ident, "ok": True, "result": {}})
            return
        try:
            result = await handle(command)
        except Exception:
            emit({"id": ident, "ok": False, "error": traceback.format_exc()})
        else:
            emit({"id": ident, "ok": True, "result": result})


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


async def aio_workload_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one connection or stream (asyncio streams, TCP or multiplexed alike)."""
    try:
        op = await reader.readexactly(1)
        if op == b"E":
            writer.write(op)
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        elif op in (b"U", b"u", b"D"):
            (n,) = U64.unpack(await reader.readexactly(8))
            if op != b"D":
                got, good = 0, True
                while got < n:
                    data = await reader.read(min(CHUNK, n - got))
                    if not data:
                        raise ConnectionError(f"upload: EOF after {got} of {n} bytes")
                    if op == b"u" and good:
                        good = pattern_ok(data, got)
                    got += len(data)
                writer.write(U64.pack(got if good else WRONG_BYTES))
                await writer.drain()
            else:
                view = memoryview(PATTERN)
                left = n
                while left:
                    k = min(CHUNK, left)
                    writer.write(view[:k])
                    await writer.drain()
                    left -= k
                writer.write_eof()
            while await reader.read(CHUNK):
                pass
        else:
            raise ValueError(f"unknown workload {op!r}")
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        log.debug("server: connection ended: %r", exc)
    except Exception:
        log.exception("server: workload failed")
    finally:
        writer.close()


class AioClient:
    def __init__(self) -> None:
        self.sessions: dict[tuple[str, int], Any] = {}

    async def session(self, host: str, port: int) -> Any:
        from fastnat.aio import MuxSession

        session = self.sessions.get((host, port))
        if session is None or session.is_closing():
            session = await MuxSession.connect(host, port)
            self.sessions[(host, port)] = session
        return session

    async def connect(self, target: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kind = target["kind"]
        if kind == "tcp":
            reader, writer = await asyncio.open_connection(target["host"], target["port"], limit=STREAM_LIMIT)
            _nodelay(writer)
            return reader, writer
        if kind == "mux":
            session = await self.session(target["host"], target["port"])
            stream = await session.open_stream()
            return stream.reader, stream.writer
        if kind == "fastnat":
            import fastnat.aio

            return await fastnat.aio.open_connection(
                target["server_id"], target["port"], forwarder=target["forwarder"], limit=STREAM_LIMIT,
                timeout=CONNECT_TIMEOUT, ssl=target.get("tls_ca") or False,
            )
        raise ValueError(f"unknown target kind {kind!r}")

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "bulk":
            return await self.bulk(command["target"], command["direction"], int(command["size"]),
                                   int(command.get("streams", 1)), bool(command.get("verify", False)))
        if cmd == "rtt":
            return await self.rtt(command["target"], int(command["count"]), int(command.get("warmup", 0)),
                                  int(command.get("message_size", 64)))
        if cmd == "cps":
            return await self.cps(command["target"], int(command.get("loops", 4)), float(command["seconds"]))
        raise ValueError(f"unknown command {cmd!r}")

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                await writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def bulk(self, target: dict[str, Any], direction: str, size: int, streams: int,
                   verify: bool) -> dict[str, Any]:
        sizes = [size // streams + (1 if i < size % streams else 0) for i in range(streams)]
        async with asyncio.timeout(IO_TIMEOUT):
            conns = [await self.connect(target) for _ in range(streams)]

        async def up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            writer.write((b"u" if verify else b"U") + U64.pack(n))
            view = memoryview(PATTERN)
            left = n
            while left:
                k = min(CHUNK, left)
                writer.write(view[:k])
                await writer.drain()
                left -= k
            (got,) = U64.unpack(await reader.readexactly(8))
            if got == WRONG_BYTES:
                raise AssertionError("upload: the server received wrong bytes")
            if got != n:
                raise AssertionError(f"upload: the server counted {got} bytes of {n}")

        async def down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            writer.write(b"D" + U64.pack(n))
            got = 0
            while got < n:
                data = await reader.read(CHUNK)
                if not data:
                    raise ConnectionError(f"download: EOF after {got} of {n} bytes")
                if verify:
                    check_pattern(data, got)
                got += len(data)
            if got != n:
                raise AssertionError(f"download: {got} bytes instead of {n}")

        work = up if direction == "up" else down
        try:
            start = time.perf_counter()
            async with asyncio.timeout(IO_TIMEOUT + size / 1e6):  # >= 1 MB/s, or it is broken
                await asyncio.gather(*(work(r, w, n) for (r, w), n in zip(conns, sizes)))
            seconds = time.perf_counter() - start
            if direction == "down":
                for reader, _ in conns:  # the server's FIN follows its last byte
                    async with asyncio.timeout(IO_TIMEOUT):
                        rest = await reader.read(CHUNK)
                    if rest:
                        raise AssertionError(f"download: {len(rest)} bytes more than asked for")
        finally:
            for _, writer in conns:
                await self._close(writer)
        return {"seconds": seconds, "bytes": size, "streams": streams}

    async def rtt(self, target: dict[str, Any], count: int, warmup: int, message_size: int) -> dict[str, Any]:
        message = bytes(PATTERN[:message_size])
        samples = [0] * count
        clock = time.perf_counter_ns
        async with asyncio.timeout(IO_TIMEOUT):
            reader, writer = await self.connect(target)
        try:
            async with asyncio.timeout(IO_TIMEOUT + (count + warmup) * 0.01):
                writer.write(b"E")
                if await reader.readexactly(1) != b"E":
                    raise AssertionError("echo: wrong first byte")
                for _ in range(warmup):
                    writer.write(message)
                    if await reader.readexactly(message_size) != message:
                        raise AssertionError("echo: wrong bytes")
                for i in range(count):
                    t0 = clock()
                    writer.write(message)
                    echoed = await reader.readexactly(message_size)
                    samples[i] = clock() - t0
                    if echoed != message:
                        raise AssertionError("echo: wrong bytes")
        finally:
            await self._close(writer)
        return latency_summary(samples)

    async def cps(self, target: dict[str, Any], loops: int, seconds: float) -> dict[str, Any]:
        counts = [0] * loops
        errors: list[str] = []
        start = time.perf_counter()
        stop_at = start + seconds
        connect, close = self.connect, self._close

        async def loop(i: int) -> None:
            while time.perf_counter() < stop_at:
                try:
                    async with asyncio.timeout(IO_TIMEOUT):
                        reader, writer = await connect(target)
                        writer.write(b"E")
                        if await reader.readexactly(1) != b"E":
                            raise AssertionError("echo: wrong byte")
                        await close(writer)
                except Exception as exc:  # count it, go on (a relay under load may refuse some)
                    errors.append(repr(exc))
                    if len(errors) > 1000:
                        return
                    continue
                counts[i] += 1

        await asyncio.gather(*(loop(i) for i in range(loops)))
        elapsed = time.perf_counter() - start
        total = sum(counts)
        return {"connections": total, "seconds": elapsed, "per_second": total / elapsed,
                "errors": len(errors), "first_errors": errors[:3]}


async def aio_client_main(args: argparse.Namespace) -> None:
    client = AioClient()
    emit({"event": "ready", "role": "aio-client", "loop": type(asyncio.get_running_loop()).__module__, **engine_info()})
    try:
        await aio_stdin_commands(client.handle)
    finally:
        for session in client.sessions.values():
            session.close()


async def aio_server_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    tcp = await asyncio.start_server(aio_workload_server, LOOPBACK, 0, limit=STREAM_LIMIT)
    ready: dict[str, Any] = {"event": "ready", "role": "aio-server", "tcp_port": tcp.sockets[0].getsockname()[1]}
    session_server = None
    if args.session:
        from fastnat.aio import start_session_server

        async def on_session(session: Any) -> None:
            try:
                async for stream in session:
                    spawn(aio_workload_server(stream.reader, stream.writer))
            except ConnectionError:
                pass

        session_server = await start_session_server(on_session, LOOPBACK, 0)
        ready["session_port"] = session_server.sockets[0].getsockname()[1]
    nat_server = None
    if args.forwarder:
        import fastnat.aio

        nat_server = await fastnat.aio.start_server(
            aio_workload_server, args.server_id, args.nat_port, forwarder=args.forwarder, persist=False,
            ssl=args.tls_ca or False,
        )
        ready.update(server_id=args.server_id, nat_port=args.nat_port, forwarder=args.forwarder)

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(f"unknown command {command['cmd']!r}")

    emit({**ready, "loop": type(loop).__module__, **engine_info()})
    try:
        await aio_stdin_commands(handle)
    finally:
        tcp.close()
        if session_server is not None:
            session_server.close()
        if nat_server is not None:
            nat_server.close()
            try:
                async with asyncio.timeout(5):
                    await nat_server.wait_closed()
            except (TimeoutError, OSError):
                pass
        for task in list(tasks):
            task.cancel()


# =====================================================================
# plain relay (asyncio, no multiplexing): the reference relay


class _Half(asyncio.Protocol):
    """One side of a plain relay: what it reads goes to the other side.

    Until both sides are linked, what arrives is kept (uvloop may deliver a
    first read even though reading was paused in ``connection_made``).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Half | None = None
        self.pending: list[bytes] = []
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]  # until both sides are linked

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None:
            self.pending.append(data)
        else:
            other.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        if self.other is not None:
            self._forward_eof()
        return True

    def _forward_eof(self) -> None:
        other = self.other
        if other is not None and other.transport is not None and not other.lost:
            other.transport.write_eof()
            if other.eof:
                self.transport.close()  # type: ignore[union-attr]
                other.transport.close()

    def link(self, other: _Half) -> None:
        self.other = other
        for data in self.pending:
            other.transport.write(data)  # type: ignore[union-attr]
        self.pending.clear()
        if self.eof:
            self._forward_eof()
        elif not self.lost:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        if self.other is not None and not self.other.lost:
            self.other.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if self.other is not None and not self.other.lost:
            self.other.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        other = self.other
        if other is not None and other.transport is not None and not other.lost:
            if exc is None:
                other.transport.close()
            else:
                other.transport.abort()


class _ClientHalf(_Half):
    """The client side: dials the upstream server, then links both sides."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.task = asyncio.get_running_loop().create_task(self._link())

    async def _link(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, up = await loop.create_connection(_Half, *self.upstream)
        except (OSError, TimeoutError) as exc:
            log.warning("plain relay: upstream %s:%d: %s", *self.upstream, exc)
            self.transport.abort()  # type: ignore[union-attr]
            return
        if self.lost:
            up.transport.close()  # type: ignore[union-attr]
            return
        up.link(self)
        self.link(up)


async def plain_relay_main(args: argparse.Namespace) -> None:
    host, port = args.upstream.rsplit(":", 1)
    upstream = (host, int(port))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ClientHalf(upstream), LOOPBACK, 0, backlog=1024)

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(f"unknown command {command['cmd']!r}")

    emit({"event": "ready", "role": "plain-relay", "port": server.sockets[0].getsockname()[1],
          "loop": type(loop).__module__, "pid": os.getpid()})
    try:
        await aio_stdin_commands(handle)
    finally:
        server.close()


# =====================================================================
# blocking


def recv_exactly(sock: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def blocking_workload_server(sock: Any) -> None:
    """Serve one connection or stream (socket.socket or fastnat StreamSocket alike)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        op = recv_exactly(sock, 1)
        if op == b"E":
            sock.sendall(op)
            while True:
                n = sock.recv_into(buf)
                if not n:
                    break
                sock.sendall(view[:n])
        elif op in (b"U", b"u", b"D"):
            (n,) = U64.unpack(recv_exactly(sock, 8))
            if op != b"D":
                got, good = 0, True
                while got < n:
                    k = sock.recv_into(view, min(CHUNK, n - got))
                    if not k:
                        raise ConnectionError(f"upload: EOF after {got} of {n} bytes")
                    if op == b"u" and good:
                        good = pattern_ok(view[:k], got)
                    got += k
                sock.sendall(U64.pack(got if good else WRONG_BYTES))
            else:
                pattern = memoryview(PATTERN)
                left = n
                while left:
                    k = min(CHUNK, left)
                    sock.sendall(pattern[:k])
                    left -= k
                sock.shutdown(socket.SHUT_WR)
            while sock.recv_into(buf):
                pass
        else:
            raise ValueError(f"unknown workload {op!r}")
    except (ConnectionError, OSError) as exc:
        log.debug("server: connection ended: %r", exc)
    except Exception:
        log.exception("server: workload failed")
    finally:
        sock.close()


def _thread(target: Callable[..., Any], *args: Any, name: str = "worker") -> threading.Thread:
    t = threading.Thread(target=target, args=args, name=name, daemon=True)
    t.start()
    return t


class BlockingClient:
    def __init__(self) -> None:
        self.sessions: dict[tuple[str, int], Any] = {}

    def session(self, host: str, port: int) -> Any:
        from fastnat.blocking import BlockingSession

        session = self.sessions.get((host, port))
        if session is None or session.closed:
            session = BlockingSession.connect(host, port, timeout=CONNECT_TIMEOUT)
            self.sessions[(host, port)] = session
        return session

    def connect(self, target: dict[str, Any]) -> Any:
        kind = target["kind"]
        if kind == "tcp":
            sock = socket.create_connection((target["host"], target["port"]), timeout=CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif kind == "mux":
            sock = self.session(target["host"], target["port"]).open_stream(timeout=CONNECT_TIMEOUT)
        elif kind == "fastnat":
            import fastnat

            host, port = target["forwarder"].rsplit(":", 1)
            sock = fastnat.nat_openconn(target["server_id"], target["port"], timeout=CONNECT_TIMEOUT,
                                        forwarderIP=host, forwarderPort=int(port), ssl=target.get("tls_ca") or False)
        else:
            raise ValueError(f"unknown target kind {kind!r}")
        sock.settimeout(IO_TIMEOUT)
        return sock

    def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "bulk":
            return self.bulk(command["target"], command["direction"], int(command["size"]),
                             int(command.get("streams", 1)), bool(command.get("verify", False)))
        if cmd == "rtt":
            return self.rtt(command["target"], int(command["count"]), int(command.get("warmup", 0)),
                            int(command.get("message_size", 64)))
        if cmd == "cps":
            return self.cps(command["target"], int(command.get("loops", 4)), float(command["seconds"]))
        raise ValueError(f"unknown command {cmd!r}")

    def bulk(self, target: dict[str, Any], direction: str, size: int, streams: int, verify: bool) -> dict[str, Any]:
        sizes = [size // streams + (1 if i < size % streams else 0) for i in range(streams)]
        socks = [self.connect(target) for _ in range(streams)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(streams + 1, timeout=IO_TIMEOUT)

        def up(sock: Any, n: int) -> None:
            pattern = memoryview(PATTERN)
            sock.sendall((b"u" if verify else b"U") + U64.pack(n))
            left = n
            while left:
                k = min(CHUNK, left)
                sock.sendall(pattern[:k])
                left -= k
            (got,) = U64.unpack(recv_exactly(sock, 8))
            if got == WRONG_BYTES:
                raise AssertionError("upload: the server received wrong bytes")
            if got != n:
                raise AssertionError(f"upload: the server counted {got} bytes of {n}")

        def down(sock: Any, n: int) -> None:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            sock.sendall(b"D" + U64.pack(n))
            got = 0
            while got < n:
                k = sock.recv_into(buf)
                if not k:
                    raise ConnectionError(f"download: EOF after {got} of {n} bytes")
                if verify:
                    check_pattern(view[:k], got)
                got += k

        work = up if direction == "up" else down

        def run(sock: Any, n: int) -> None:
            try:
                barrier.wait()
                work(sock, n)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s, n), daemon=True) for s, n in zip(socks, sizes)]
        try:
            for t in threads:
                t.start()
            barrier.wait()
            start = time.perf_counter()
            deadline = time.monotonic() + IO_TIMEOUT + size / 1e6
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            seconds = time.perf_counter() - start
            if any(t.is_alive() for t in threads):
                raise TimeoutError("bulk: a transfer did not finish in time")
            if errors:
                raise errors[0]
            if direction == "down":
                for sock in socks:
                    if sock.recv(CHUNK):
                        raise AssertionError("download: more bytes than asked for")
        finally:
            for sock in socks:
                sock.close()
        return {"seconds": seconds, "bytes": size, "streams": streams}

    def rtt(self, target: dict[str, Any], count: int, warmup: int, message_size: int) -> dict[str, Any]:
        message = bytes(PATTERN[:message_size])
        samples = [0] * count
        clock = time.perf_counter_ns
        sock = self.connect(target)
        try:
            sock.sendall(b"E")
            if recv_exactly(sock, 1) != b"E":
                raise AssertionError("echo: wrong first byte")
            for _ in range(warmup):
                sock.sendall(message)
                if recv_exactly(sock, message_size) != message:
                    raise AssertionError("echo: wrong bytes")
            for i in range(count):
                t0 = clock()
                sock.sendall(message)
                echoed = recv_exactly(sock, message_size)
                samples[i] = clock() - t0
                if echoed != message:
                    raise AssertionError("echo: wrong bytes")
        finally:
            sock.close()
        return latency_summary(samples)

    def cps(self, target: dict[str, Any], loops: int, seconds: float) -> dict[str, Any]:
        counts = [0] * loops
        errors: list[str] = []
        start = time.perf_counter()
        stop_at = start + seconds

        def loop(i: int) -> None:
            while time.perf_counter() < stop_at:
                try:
                    sock = self.connect(target)
                    try:
                        sock.sendall(b"E")
                        if recv_exactly(sock, 1) != b"E":
                            raise AssertionError("echo: wrong byte")
                    finally:
                        sock.close()
                except Exception as exc:
                    errors.append(repr(exc))
                    if len(errors) > 1000:
                        return
                    continue
                counts[i] += 1

        threads = [_thread(loop, i, name=f"cps-{i}") for i in range(loops)]
        for t in threads:
            t.join(seconds + IO_TIMEOUT)
        elapsed = time.perf_counter() - start
        total = sum(counts)
        return {"connections": total, "seconds": elapsed, "per_second": total / elapsed,
                "errors": len(errors), "first_errors": errors[:3]}


def blocking_commands(handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        ident = command.get("id")
        if command.get("cmd") == "quit":
            emit({"id": ident, "ok": True, "result": {}})
            return
        try:
            result = handle(command)
        except Exception:
            emit({"id": ident, "ok": False, "error": traceback.format_exc()})
        else:
            emit({"id": ident, "ok": True, "result": result})


def blocking_client_main(args: argparse.Namespace) -> None:
    client = BlockingClient()
    emit({"event": "ready", "role": "blocking-client", **engine_info()})
    try:
        blocking_commands(client.handle)
    finally:
        for session in client.sessions.values():
            session.close(timeout=5)


def _accept_loop(listener: socket.socket, on_conn: Callable[[socket.socket], None]) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        on_conn(conn)


def blocking_server_main(args: argparse.Namespace) -> None:
    def listener() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, 0))
        sock.listen(1024)
        return sock

    tcp = listener()
    _thread(_accept_loop, tcp, lambda conn: _thread(blocking_workload_server, conn, name="tcp-conn"), name="accept-tcp")
    ready: dict[str, Any] = {"event": "ready", "role": "blocking-server", "tcp_port": tcp.getsockname()[1]}
    if args.session:
        from fastnat.blocking import BlockingSession

        def on_session(conn: socket.socket) -> None:
            session = BlockingSession.from_socket(conn, client=False)

            def accept() -> None:
                while True:
                    try:
                        stream = session.accept_stream()
                    except (ConnectionError, OSError):
                        return
                    _thread(blocking_workload_server, stream, name="mux-stream")

            _thread(accept, name="accept-streams")

        mux = listener()
        _thread(_accept_loop, mux, on_session, name="accept-sessions")
        ready["session_port"] = mux.getsockname()[1]
    handle_nat = None
    if args.forwarder:
        import fastnat

        host, port = args.forwarder.rsplit(":", 1)

        def on_client(remoteip: str, remoteport: int, sock: Any, thiscommhandle: Any, listencommhandle: Any) -> None:
            blocking_workload_server(sock)

        handle_nat = fastnat.nat_waitforconn(args.server_id, args.nat_port, on_client, forwarderIP=host,
                                             forwarderPort=int(port), persist=False, ssl=args.tls_ca or False)
        ready.update(server_id=args.server_id, nat_port=args.nat_port, forwarder=args.forwarder)

    def handle(command: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(f"unknown command {command['cmd']!r}")

    emit({**ready, **engine_info()})
    try:
        blocking_commands(handle)
    finally:
        if handle_nat is not None:
            import fastnat

            fastnat.nat_stopcomm(handle_nat)


# =====================================================================


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role",
                        choices=["aio-client", "aio-server", "blocking-client", "blocking-server", "plain-relay"])
    parser.add_argument("--session", action="store_true", help="servers: also accept multiplexer sessions")
    parser.add_argument("--forwarder", help="servers: register at this forwarder (HOST:PORT)")
    parser.add_argument("--server-id", default="bench-server")
    parser.add_argument("--nat-port", type=int, default=7000)
    parser.add_argument("--upstream", help="plain-relay: the server's HOST:PORT")
    parser.add_argument("--tls-ca", help="servers: reach the forwarder over TLS, trusting this CA file")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.role} %(levelname)s %(name)s: %(message)s")
    if args.role in ("blocking-client", "blocking-server"):
        (blocking_client_main if args.role == "blocking-client" else blocking_server_main)(args)
        return 0
    from fastnat.aio import run

    main_fn = {"aio-client": aio_client_main, "aio-server": aio_server_main, "plain-relay": plain_relay_main}[args.role]
    run(main_fn(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers of the asyncio (and blocking) session tests: event loops, leak
checks, session pairs over loopback TCP, a peer process, a frame-counting
TCP proxy. Nothing here is a mock: every session runs over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop
from _net_helpers import async_wait_until

from fastnat.aio import MuxSession, start_session_server
from fastnat.mux_config import MuxConfig

LOOPBACK = "127.0.0.1"
HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "peer_proc.py"
KiB = 1024
MiB = 1024 * KiB

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


# ------------------------------------------------------------ engines


def engine_env(engine_name: str) -> dict[str, str]:
    """The environment that makes a child process pick ``engine_name``."""
    env = dict(os.environ)
    env.pop("FASTNAT_NO_EXTENSIONS", None)
    if engine_name == "python":
        env["FASTNAT_NO_EXTENSIONS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def engine_name_of(session: MuxSession) -> str:
    module = type(session.engine).__module__
    return {"fastnat._mux": "compiled", "fastnat._mux_py": "python"}[module]


# ------------------------------------------------------------ leak checks


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what they point at."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own fd, already closed
            pass
    return fds


def other_tasks() -> set[asyncio.Task[Any]]:
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not current and not t.done()}


async def assert_no_tasks_left(timeout: float = 2.0) -> None:
    """Every task but the caller's ends (within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while other_tasks():
        if time.monotonic() > deadline:
            left = other_tasks()
            for t in left:
                t.cancel()
            raise AssertionError(f"tasks left pending after close: {left}")
        await asyncio.sleep(0.01)


def run_async(
    coro: Coroutine[Any, Any, Any], *, loop_kind: str = "asyncio", timeout: float = 30.0, check_tasks: bool = True
) -> Any:
    """Run ``coro`` on a fresh loop of ``loop_kind``, bounded by ``timeout``;
    then assert that it left no task behind."""

    async def main() -> Any:
        try:
            result = await asyncio.wait_for(coro, timeout)
        except TimeoutError as exc:
            raise AssertionError(f"the test's coroutine did not finish within {timeout} s") from exc
        if check_tasks:
            await assert_no_tasks_left()
        return result

    with asyncio.Runner(loop_factory=LOOP_FACTORIES[loop_kind]) as runner:
        return runner.run(main())


class LeakCheck:
    """Threads and fds before a test; compare after it."""

    def __init__(self) -> None:
        self.threads = set(threading.enumerate())
        self.fds = open_fds()

    def problems(self) -> list[str]:
        problems = []
        extra_threads = [t for t in threading.enumerate() if t not in self.threads and t.is_alive()]
        if extra_threads:
            problems.append(f"threads left running: {extra_threads}")
        fds = open_fds()
        extra = {fd: target for fd, target in fds.items() if self.fds.get(fd) != target}
        if extra:
            problems.append(f"file descriptors left open: {extra}")
        return problems

    def check(self, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            problems = self.problems()
            if not problems:
                return
            if time.monotonic() > deadline:
                raise AssertionError("; ".join(problems))
            time.sleep(0.02)


# ------------------------------------------------------------ session pairs


class Pair:
    """Two MuxSessions over one loopback TCP connection, in this process."""

    def __init__(self, client: MuxSession, server: MuxSession, listener: asyncio.Server) -> None:
        self.client = client
        self.server = server
        self.listener = listener
        self.errors: list[tuple[str, str, BaseException]] = []
        client.set_error_callback(lambda s, where, exc: self.errors.append(("client", where, exc)))
        server.set_error_callback(lambda s, where, exc: self.errors.append(("server", where, exc)))

    async def aclose(self) -> None:
        self.client.close()
        self.server.close()
        self.listener.close()
        await asyncio.wait_for(self.client.wait_closed(), 5)
        await asyncio.wait_for(self.server.wait_closed(), 5)
        await asyncio.wait_for(self.listener.wait_closed(), 5)


@contextlib.asynccontextmanager
async def session_pair(
    *,
    client_config: MuxConfig | None = None,
    server_config: MuxConfig | None = None,
    client_options: dict[str, Any] | None = None,
    server_options: dict[str, Any] | None = None,
) -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[MuxSession] = loop.create_future()

    def on_session(session: MuxSession) -> None:
        if not accepted.done():
            accepted.set_result(session)

    listener = await start_session_server(on_session, LOOPBACK, 0, config=server_config, **(server_options or {}))
    port = listener.sockets[0].getsockname()[1]
    client = await MuxSession.connect(LOOPBACK, port, config=client_config, **(client_options or {}))
    server = await asyncio.wait_for(accepted, 5)
    pair = Pair(client, server, listener)
    try:
        yield pair
    finally:
        await pair.aclose()


async def read_all(reader: Any, chunk: int = 1 << 20) -> bytes:
    parts = []
    while True:
        data = await reader.read(chunk)
        if not data:
            return b"".join(parts)
        parts.append(data)


# Polls every 5 ms: a session's events follow one another within milliseconds.
wait_until = functools.partial(async_wait_until, interval=0.005)


async def expect_failure(awaitable: Awaitable[Any], timeout: float, *types: type[BaseException]) -> BaseException:
    """``awaitable`` must raise one of ``types`` within ``timeout`` s."""
    try:
        result = await asyncio.wait_for(awaitable, timeout)
    except types as exc:
        return exc
    except TimeoutError:
        raise AssertionError(f"still waiting after {timeout} s; expected {types}") from None
    raise AssertionError(f"returned {result!r:.200}; expected {types}")


# ------------------------------------------------------------ a peer process


class PeerProcess:
    """One ``peer_proc.py`` process; see its docstring for the protocol."""

    def __init__(self, args: list[str], engine_name: str) -> None:
        self.args = [sys.executable, str(PEER_SCRIPT), *args]
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=engine_env(engine_name),
            cwd=str(HERE),
        )
        self.messages: list[dict[str, Any]] = []
        self.stderr_tail: deque[str] = deque(maxlen=100)
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read_stdout, name="peer stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="peer stderr", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                message = {"event": "bad-line", "line": line}
            with self._cond:
                self.messages.append(message)
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_tail.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        with self._cond:
            return next((m for m in self.messages if predicate(m)), None)

    def describe(self) -> str:
        with self._cond:
            messages = "\n    ".join(json.dumps(m) for m in self.messages[-20:])
        stderr = "\n    ".join(self.stderr_tail)
        return f"peer {self.args[2:]} (exit {self.proc.poll()}):\n    {messages}\n  stderr:\n    {stderr}"

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """Blocking wait (for use outside the event loop)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                message = next((m for m in self.messages if predicate(m)), None)
                if message is not None:
                    return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}\n  {self.describe()}")
                self._cond.wait(min(left, 0.05))

    async def event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """Wait for a message without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.find(predicate)
            if message is not None:
                return message
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n  {self.describe()}")
            await asyncio.sleep(0.005)

    def wait_event(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        return self.wait_for(lambda m: m.get("event") == name, timeout, f'the "{name}" event')

    async def stream_report(self, stream_id: int, timeout: float) -> dict[str, Any]:
        return await self.event(
            lambda m: m.get("event") == "stream" and m.get("id") == stream_id, timeout, f"the report of stream {stream_id}"
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    async def call(self, line: str, timeout: float = 10.0) -> dict[str, Any]:
        cmd = line.split()[0]
        seen = len([m for m in list(self.messages) if m.get("event") == "reply" and m.get("cmd") == cmd])
        self.send(line)

        def answered() -> list[dict[str, Any]]:
            with self._cond:
                return [m for m in self.messages if m.get("event") == "reply" and m.get("cmd") == cmd]

        deadline = time.monotonic() + timeout
        while len(answered()) <= seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"no reply to {line!r}\n  {self.describe()}")
            await asyncio.sleep(0.005)
        return answered()[seen]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def close(self, timeout: float = 5.0) -> None:
        """Ask the peer to quit; kill it if it does not. Always reaps it and
        closes its pipes."""
        proc = self.proc
        try:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGCONT)  # harmless unless it was stopped
                with contextlib.suppress(OSError, ValueError):
                    assert proc.stdin is not None
                    proc.stdin.write("quit\n")
                    proc.stdin.flush()
                with contextlib.suppress(OSError, ValueError):
                    proc.stdin.close()  # type: ignore[union-attr]
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for t in self._threads:
                t.join(timeout)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError, ValueError):
                        pipe.close()


# ------------------------------------------------------------ a frame-counting proxy

HEADER = struct.Struct(">BBHII")
TYPE_DATA, TYPE_WINDOW, TYPE_PING, TYPE_GO_AWAY = 0, 1, 2, 3
FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST = 1, 2, 4, 8


class FrameLog:
    """Parses one direction of a yamux byte stream, keeping frame headers
    (type, flags, stream id, length) and the time each was seen."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.frames: list[tuple[float, int, int, int, int]] = []
        self.skip = 0  # payload bytes of a Data frame still to pass

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.skip:
                n = min(self.skip, len(self.buf))
                del self.buf[:n]
                self.skip -= n
                if self.skip:
                    return
            if len(self.buf) < HEADER.size:
                return
            version, kind, flags, stream_id, length = HEADER.unpack_from(self.buf)
            assert version == 0, f"bad yamux version {version}"
            del self.buf[: HEADER.size]
            self.frames.append((time.monotonic(), kind, flags, stream_id, length))
            if kind == TYPE_DATA:
                self.skip = length

    def pings(self, flag: int) -> list[tuple[float, int]]:
        return [(t, length) for t, kind, flags, _sid, length in self.frames if kind == TYPE_PING and flags & flag]

    def go_aways(self) -> list[int]:
        return [length for _t, kind, _f, _sid, length in self.frames if kind == TYPE_GO_AWAY]


class FrameProxy:
    """A TCP proxy on 127.0.0.1 that logs the yamux frames going through it,
    client->server in ``up`` and server->client in ``down``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = FrameLog()
        self.down = FrameLog()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t_reader, t_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        self.writers += [writer, t_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: FrameLog) -> None:
            try:
                while data := await src.read(1 << 16):
                    log.feed(data)
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, t_writer, self.up), pipe(t_reader, writer, self.down))

    async def aclose(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for w in self.writers:
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()


def free_port_socket() -> socket.socket:
    """A listening socket on 127.0.0.1 (the caller closes it)."""
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    s.listen(16)
    return s


# ------------------------------------------------------------ services on a session


class Service:
    """Runs ``handler(stream)`` in a task for every stream the session accepts
    (``async for``); ``aclose()`` waits for the loop and the handlers."""

    def __init__(self, session: MuxSession, handler: Callable[[Any], Coroutine[Any, Any, Any]]) -> None:
        self.session = session
        self.handler = handler
        self.handlers: set[asyncio.Task[Any]] = set()
        self.results: list[Any] = []
        self.errors: list[BaseException] = []
        self.accepted = 0
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        async for stream in self.session:
            self.accepted += 1
            task = asyncio.create_task(self._run(stream))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)

    async def _run(self, stream: Any) -> None:
        try:
            self.results.append(await self.handler(stream))
        except Exception as exc:
            self.errors.append(exc)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Wait for the accept loop to end (the session must be closing) and the handlers."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        finally:
            if not self.task.done():
                self.task.cancel()
            if self.handlers:
                await asyncio.wait(set(self.handlers), timeout=timeout)
            for t in list(self.handlers):
                t.cancel()


async def echo_handler(stream: Any) -> int:
    """Copy everything back; at EOF, half-close and close. Returns bytes echoed."""
    n = 0
    async with stream:
        while data := await stream.read(1 << 18):
            n += len(data)
            stream.write(data)
            await stream.drain()
        stream.write_eof()
    return n

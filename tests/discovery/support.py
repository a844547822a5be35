"""Helpers of the discovery tests: running coroutines with a bound, leak
checks, a ``redis-server`` process, a registry service in its own process,
and raw connections to the registry service. Nothing here is a mock: every
registry is a real one, over real sockets.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from _net_helpers import async_wait_until, free_port

from fastnat.protocol import (
    ROLE_REGISTRY,
    HelloReply,
    HelloReplyReader,
    MessageReader,
    encode_hello,
    encode_message,
)

LOOPBACK = "127.0.0.1"
HERE = Path(__file__).resolve().parent
REGISTRY_SCRIPT = HERE / "registry_proc.py"
REDIS_SERVER = "redis-server"
DEBIAN_REDIS_SERVER = "/usr/bin/redis-server"

# The caps every backend of the contract suite is opened with.
CAP_KEYS = 20
CAP_VALUES = 10


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip locally; fail in CI, which installs every dependency."""
    if in_ci():
        pytest.fail(f"{reason}; CI must install it (CI is set, so this is not skipped)", pytrace=False)
    pytest.skip(reason)


# ------------------------------------------------------------ running


def other_tasks() -> set[asyncio.Task[Any]]:
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not current and not t.done()}


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """``asyncio`` or ``uvloop`` (which a forwarder may run on)."""
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def run_async(coro: Coroutine[Any, Any, Any], *, timeout: float = 20.0, loop_kind: str = "asyncio") -> Any:
    """Run ``coro`` on a fresh loop of ``loop_kind``, bounded by ``timeout``;
    then assert that it left no task behind."""

    async def main() -> Any:
        try:
            result = await asyncio.wait_for(coro, timeout)
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise AssertionError(f"the test's coroutine did not finish within {timeout} s") from exc
        deadline = time.monotonic() + 2.0
        while other_tasks():
            if time.monotonic() > deadline:
                left = other_tasks()
                for task in left:
                    task.cancel()
                raise AssertionError(f"tasks left pending: {left}")
            await asyncio.sleep(0.01)
        return result

    with asyncio.Runner(loop_factory=loop_factory(loop_kind)) as runner:
        return runner.run(main())


# Polls every 10 ms: the registry's own events are quick.
eventually = functools.partial(async_wait_until, interval=0.01)


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return fds


class LeakCheck:
    """Threads and file descriptors before a test; compared after it."""

    def __init__(self) -> None:
        self.threads = set(threading.enumerate())
        self.fds = open_fds()

    def problems(self) -> list[str]:
        problems = []
        threads = [t for t in threading.enumerate() if t not in self.threads and t.is_alive()]
        if threads:
            problems.append(f"threads left running: {threads}")
        extra = {fd: target for fd, target in open_fds().items() if self.fds.get(fd) != target}
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


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    return free_port()


# ------------------------------------------------------------ processes


def _stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    assert proc.returncode is not None


def find_redis_server() -> str | None:
    found = shutil.which(REDIS_SERVER)
    if found:
        return found
    return DEBIAN_REDIS_SERVER if os.access(DEBIAN_REDIS_SERVER, os.X_OK) else None


class RedisServer:
    """A ``redis-server`` on a free loopback port, without persistence, in ``directory``."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable = executable
        self.directory = directory
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, port: int | None = None, timeout: float = 10.0) -> None:
        """Start it (on ``port``, else a free one); returns once it answers PING."""
        attempts = 1 if port is not None else 3
        for _ in range(attempts):
            self.port = port if port is not None else free_port()
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        self.executable,
                        "--port",
                        str(self.port),
                        "--bind",
                        LOOPBACK,
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(self.directory),
                        "--daemonize",
                        "no",
                        "--logfile",
                        "",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=str(self.directory),
                )
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self.ping():
                    return
                time.sleep(0.02)
            _stop_process(self.proc, signal.SIGKILL)
        raise AssertionError(
            f"redis-server did not start on port {self.port}:\n{self.log.read_text(errors='replace')[-2000:]}"
        )

    def ping(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One raw RESP command; the raw answer (for tests that look inside Redis)."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
        )
        with socket.create_connection((LOOPBACK, self.port), timeout=5.0) as sock:
            sock.sendall(payload)
            return sock.recv(1 << 20)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop_process(self.proc, sig)


class RegistryProcess:
    """``registry_proc.py``: a standalone registry service in its own process."""

    def __init__(self, directory: Path, *args: str, port: int = 0) -> None:
        self.port_file = directory / f"registry-{time.monotonic_ns()}.port"
        self.log = self.port_file.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(REGISTRY_SCRIPT), "--port", str(port), "--port-file", str(self.port_file), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.port = self._wait_port(15.0)

    def _wait_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.exists():
                return int(self.port_file.read_text())
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"the registry process did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    @property
    def url(self) -> str:
        return f"fastnat://{LOOPBACK}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        _stop_process(self.proc, sig)
        return int(self.proc.returncode)


# ------------------------------------------------------ raw connections


class RawConnection:
    """A plain asyncio connection speaking the registry protocol by hand
    (to send what no client would)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.messages = MessageReader()

    @classmethod
    async def open(cls, port: int, hello: bytes | None = encode_hello(ROLE_REGISTRY)) -> RawConnection:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        conn = cls(reader, writer)
        if hello is not None:
            writer.write(hello)
        return conn

    async def hello_reply(self, timeout: float = 5.0) -> HelloReply:
        parser = HelloReplyReader()
        head = await asyncio.wait_for(self.reader.readexactly(HelloReplyReader.max_size() - 255), timeout)
        reply = parser.feed(head)
        if reply is None:
            reply = parser.feed(await asyncio.wait_for(self.reader.readexactly(head[-1]), timeout))
        assert reply is not None
        return reply

    def send(self, obj: Any) -> None:
        self.writer.write(encode_message(obj))

    async def reply(self, timeout: float = 5.0) -> Any:
        """The next message (a decoded reply)."""
        header = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        length = int.from_bytes(header, "big")
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return self.messages.feed(header + body)[0]

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the peer closed the connection (reads what is left)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except (ConnectionError, OSError):
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (ConnectionError, OSError):
            pass

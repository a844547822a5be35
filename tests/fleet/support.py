"""Helpers of the fleet tests: forwarders, registries and servers in their own
processes, registry lookups, and clients that find servers with no forwarder
named.

Nothing is mocked: forwarders run the real command line (``forwarder_proc.py``
only shortens the announce timings first, which the command line cannot do),
the built-in registry is ``python -m fastnat registry``, Redis is a real
``redis-server``, and every byte goes over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _net_helpers import wait_until  # noqa: F401 (re-exported)
from nat.support import _read_line, _stop_process, engine_env, recv_until_eof

import fastnat
from fastnat import aio, locate
from fastnat.discovery import open_registry
from fastnat.settings import FORWARDER_KEY, SERVER_KEY_PREFIX

LOOPBACK = "127.0.0.1"
HERE = Path(__file__).resolve().parent
FORWARDER_SCRIPT = HERE / "forwarder_proc.py"
SERVER_SCRIPT = HERE / "server_proc.py"

_FORWARDER_READY = re.compile(r"fastnat forwarder listening on (\S+):(\d+)")
_REGISTRY_READY = re.compile(r"fastnat registry listening on (\S+):(\d+)")

# Shortened timings of the processes of a fleet (the defaults are 180 s,
# 60 s, 30 s / 10 s, 0.5 s up to 30 s, 10 s).
TTL = 2.0
FAST = {
    "announce_ttl": TTL,
    "announce_interval": 0.5,
    "keepalive_interval": 0.5,
    "keepalive_timeout": 0.5,
    "reconnect_initial_delay": 0.2,
    "reconnect_max_delay": 1.0,
    "request_timeout": 3.0,
}


def child_env(engine_name: str, registry: str | None, settings: dict[str, Any] | None = None) -> dict[str, str]:
    """A child's environment: its engine, its registry, its timings, nothing else of ours."""
    env = engine_env(engine_name)
    env.pop("FASTNAT_REGISTRY", None)
    env.pop("FLEET_SETTINGS", None)
    if registry:
        env["FASTNAT_REGISTRY"] = registry
    if settings:
        env["FLEET_SETTINGS"] = json.dumps(settings)
    return env


# ------------------------------------------------------------ processes


class Child:
    """A child process whose stdout is read by a thread, its stderr in a log file.

    ``stop()`` (SIGTERM, then SIGKILL after a bound) and ``kill()`` (SIGKILL)
    always reap it; the fixture that started it calls ``stop()`` even when
    the test failed.
    """

    name = "child"

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log_file, stdin=subprocess.PIPE, env=env
        )
        self.returncode: int | None = None
        self.killed_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def first_line(self, timeout: float) -> str:
        return _read_line(self.proc, timeout, f"{self.name} (stderr: {self.log()[-2000:]!r})")

    def kill(self) -> float:
        """SIGKILL and reap; the time it was dead for sure (``time.monotonic()``)."""
        self.stop(signal.SIGKILL)
        self.killed_at = time.monotonic()
        return self.killed_at

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.returncode is None:
            self.returncode = _stop_process(self.proc, sig, timeout)
        if not self._log_file.closed:
            self._log_file.close()
        return self.returncode


class ForwarderProc(Child):
    """A forwarder (the real command line) on 127.0.0.1."""

    name = "forwarder"

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, *, plain: bool = False) -> None:
        # plain: ``python -m fastnat forwarder`` itself (default timings)
        head = [sys.executable, "-m", "fastnat"] if plain else [sys.executable, str(FORWARDER_SCRIPT)]
        cmd = [*head, "-v", "forwarder", "--host", LOOPBACK, "--port", "0", *args]
        super().__init__(cmd, env, log_path)
        try:
            line = self.first_line(20.0)
            match = _FORWARDER_READY.search(line)
            if not match:
                raise AssertionError(f"the forwarder's first line is not its address: {line!r}")
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        self.host = match.group(1)
        self.port = int(match.group(2))

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def advertisement(self) -> str:
        """Its ``__NAT__FORWARDER__`` value: ``ip*serverport*clientport``."""
        return f"{self.host}*{self.port}*{self.port}"

    @property
    def server_value(self) -> str:
        """The ``__NAT_SRV__<id>`` value of a server registered at it."""
        return f"{self.host}*{self.port}"

    @property
    def url(self) -> str:
        """Its embedded registry."""
        return f"fastnat://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<forwarder {self.host}:{self.port} pid {self.pid}>"


class RegistryProc(Child):
    """``python -m fastnat registry`` on 127.0.0.1."""

    name = "registry"

    def __init__(self, env: dict[str, str], log_path: Path, port: int = 0) -> None:
        # port: 0 for a free one; a given one to restart a registry where its clients look
        cmd = [sys.executable, "-m", "fastnat", "-v", "registry", "--host", LOOPBACK, "--port", str(port)]
        super().__init__(cmd, env, log_path)
        try:
            line = self.first_line(20.0)
            match = _REGISTRY_READY.search(line)
            if not match:
                raise AssertionError(f"the registry's first line is not its address: {line!r}")
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        self.port = int(match.group(2))

    @property
    def url(self) -> str:
        return f"fastnat://{LOOPBACK}:{self.port}"


class ServerProc(Child):
    """``server_proc.py``: an echo server registered by id, with no forwarder named.

    Its stdout events are collected by a thread; ``wait_event`` waits for one.
    """

    name = "server"

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        super().__init__([sys.executable, str(SERVER_SCRIPT), *args], env, log_path)
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="fleet-server-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"event": "garbage", "line": raw.decode(errors="replace")}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"server {self.pid}: no event {what} within {timeout} s; events {self.events}; "
                        f"stderr:\n{self.log()[-3000:]}"
                    )
                self._cond.wait(min(remaining, 0.1))

    def ready(self, timeout: float = 20.0) -> dict[str, Any]:
        event = self.wait_event(lambda e: e["event"] in ("ready", "error"), timeout, "ready")
        if event["event"] != "ready":
            raise AssertionError(f"the server failed to register: {event}; stderr:\n{self.log()[-3000:]}")
        return event

    def forwarders(self) -> list[tuple[str, int]]:
        """Where it said it was registered last."""
        with self._cond:
            last = [e for e in self.events if e["event"] in ("ready", "links")][-1]
        return [(h, p) for h, p in last["forwarders"]]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        code = super().stop(sig, timeout)
        self._reader.join(5)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        return code


# ------------------------------------------------------------ registry


def lookup(url: str, key: str) -> list[str]:
    """The live values of ``key``, read with a fresh registry client (closed after)."""

    async def ask() -> list[str]:
        registry = open_registry(url)
        try:
            return await registry.lookup(key, 50)
        finally:
            await registry.close()

    return asyncio.run(ask())


def forwarders_listed(url: str) -> set[str]:
    return set(lookup(url, FORWARDER_KEY))


def server_entries(url: str, server_id: str) -> set[str]:
    return set(lookup(url, SERVER_KEY_PREFIX + server_id))


# ------------------------------------------------------------ clients


def seed_echo(server_id: str, port: int = 80, data: bytes = b"ping", timeout: float = 5.0) -> tuple[bytes, int]:
    """``nat_openconn`` with no forwarder named; what came back and the
    port of the forwarder that relayed it."""
    sock = fastnat.nat_openconn(server_id, port, timeout=timeout)
    with sock:
        via = int(sock.getpeername()[1])
        sock.settimeout(timeout)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_eof(sock), via


async def aio_echo(server_id: str, port: int = 80, data: bytes = b"ping", timeout: float = 5.0) -> tuple[bytes, int]:
    """``fastnat.aio.open_connection`` with no forwarder named."""
    reader, writer = await aio.open_connection(server_id, port, timeout=timeout)
    try:
        via = int(writer.get_extra_info("peername")[1])
        writer.write(data)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return got, via


async def close_loop_registries() -> None:
    """Close the registry clients fastnat opened for the running loop (the
    public way: ``fastnat.aio.close_registries``)."""
    await locate.close_registries()


def run_aio(coro_fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Run ``coro_fn()`` on a fresh loop, bounded, closing fastnat's registry clients of that loop."""

    async def main() -> Any:
        try:
            return await asyncio.wait_for(coro_fn(), timeout)
        finally:
            await close_loop_registries()

    return asyncio.run(main())


@dataclasses.dataclass
class Attempt:
    """One connection of a :class:`ClientLoop` (``time.monotonic()`` times)."""

    start: float
    end: float = 0.0
    connected: float | None = None  # when the handshake was done (None: the connect failed)
    via: int | None = None  # the port of the forwarder that relayed it
    error: str | None = None  # None: connected, echoed its payload, got the end of stream

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def connect_failed(self) -> bool:
        return self.connected is None

    @property
    def duration(self) -> float:
        return self.end - self.start


class ClientLoop(threading.Thread):
    """Connects, echoes a fresh payload and closes, again and again, until told to stop.

    Each connection is an :class:`Attempt`. ``kind`` is ``seed``
    (``nat_openconn`` on this thread) or ``aio``
    (``fastnat.aio.open_connection`` on a loop of this thread); neither
    names a forwarder.
    """

    def __init__(self, kind: str, server_id: str, port: int = 80, timeout: float = 5.0) -> None:
        super().__init__(name=f"fleet-client-{kind}", daemon=True)
        self.kind = kind
        self.server_id = server_id
        self.port = port
        self.timeout = timeout
        self.attempts: list[Attempt] = []
        self.halt = threading.Event()
        self.crash: BaseException | None = None
        self._counter = 0

    def _payload(self) -> bytes:
        self._counter += 1
        return f"{self.kind}-{self._counter}-".encode() * 8

    def run(self) -> None:
        try:
            if self.kind == "seed":
                self._run_seed()
            else:
                asyncio.run(self._run_aio())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.crash = exc

    def _run_seed(self) -> None:
        while not self.halt.is_set():
            data = self._payload()
            attempt = Attempt(time.monotonic())
            try:
                sock = fastnat.nat_openconn(self.server_id, self.port, timeout=self.timeout)
            except OSError as exc:
                attempt.error = f"{type(exc).__name__}: {exc}"
            else:
                attempt.connected = time.monotonic()
                with sock:
                    try:
                        attempt.via = int(sock.getpeername()[1])
                        sock.settimeout(self.timeout)
                        sock.sendall(data)
                        sock.shutdown(socket.SHUT_WR)
                        got = recv_until_eof(sock)
                        if got != data:
                            attempt.error = f"echo cut short: {len(got)} of {len(data)} bytes"
                    except OSError as exc:
                        attempt.error = f"{type(exc).__name__}: {exc}"
            attempt.end = time.monotonic()
            self.attempts.append(attempt)
            if not attempt.ok:
                time.sleep(0.01)

    async def _run_aio(self) -> None:
        try:
            while not self.halt.is_set():
                data = self._payload()
                attempt = Attempt(time.monotonic())
                try:
                    reader, writer = await aio.open_connection(self.server_id, self.port, timeout=self.timeout)
                except OSError as exc:
                    attempt.error = f"{type(exc).__name__}: {exc}"
                else:
                    attempt.connected = time.monotonic()
                    try:
                        attempt.via = int(writer.get_extra_info("peername")[1])
                        writer.write(data)
                        writer.write_eof()
                        got = await asyncio.wait_for(reader.read(), self.timeout)
                        if got != data:
                            attempt.error = f"echo cut short: {len(got)} of {len(data)} bytes"
                    except (TimeoutError, OSError) as exc:
                        attempt.error = f"{type(exc).__name__}: {exc}"
                    finally:
                        writer.close()
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
                attempt.end = time.monotonic()
                self.attempts.append(attempt)
                if not attempt.ok:
                    await asyncio.sleep(0.01)
        finally:
            await close_loop_registries()

    def successes(self) -> int:
        return sum(1 for a in self.attempts if a.ok)

    def finish(self, timeout: float = 15.0) -> None:
        self.halt.set()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} did not stop within {timeout} s")
        if self.crash is not None:
            raise AssertionError(f"{self.name} crashed: {self.crash!r}") from self.crash

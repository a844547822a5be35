"""Fixtures of the discovery tests.

* ``backend`` runs a contract test over every registry backend: ``memory``
  (in this process), ``service`` (a :class:`RegistryServer` on this test's
  loop, reached over TCP), ``service-process`` (a registry service in its own
  process, ``registry_proc.py``) and ``redis`` (a real ``redis-server``).
  Each is opened with the same caps (:data:`support.CAP_KEYS` keys,
  :data:`support.CAP_VALUES` values per key) and a namespace of its own, so
  tests do not see each other's values. ``backend.run(body)`` runs
  ``body(backend)`` on a fresh loop, bounded in time; ``backend.client()``
  opens a registry (several clients of one test share one view), closed
  when the body ends.
* ``redis_server`` (session scope) starts Debian's ``redis-server`` on a free
  loopback port with no persistence, in a temporary directory, and always
  stops it. Without ``redis-server`` (or the ``redis`` package) the Redis
  tests are skipped with the reason, unless the environment variable ``CI``
  is set: CI installs both, so there a missing one is a failure.
* ``registry_process(*args)`` starts ``registry_proc.py`` processes and
  always stops them.
* an autouse leak check compares threads and open file descriptors before
  and after every test.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastnat.discovery import Registry, open_registry
from fastnat.discovery.memory import MemoryRegistry
from fastnat.discovery.service import RegistryLimits, RegistryServer
from fastnat.discovery.store import TTLStore

from .support import (
    CAP_KEYS,
    CAP_VALUES,
    LOOPBACK,
    LeakCheck,
    RedisServer,
    RegistryProcess,
    find_redis_server,
    run_async,
    skip_or_fail,
)

BACKENDS = ["memory", "service", "service-process", "redis"]
NETWORK_BACKENDS = ["service", "service-process", "redis"]


@pytest.fixture(scope="session", autouse=True)
def _warm_up() -> None:
    """Make each kind of loop once (and a TCP connection on it), so that what
    a library opens once per process (uvloop's wake-up pipe, libuv's reserve
    descriptor) is in every test's baseline."""

    async def touch() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), LOOPBACK, 0)
        _, writer = await asyncio.open_connection(LOOPBACK, server.sockets[0].getsockname()[1])
        writer.close()
        server.close()
        await server.wait_closed()

    factories: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]
    try:
        import uvloop

        factories.append(uvloop.new_event_loop)
    except ImportError:
        pass
    for factory in factories:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(touch())


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    check = LeakCheck()
    yield
    check.check()


def require_redis_package() -> None:
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        skip_or_fail("the Redis tests need the redis package (pip install 'fastnat[test]')")


@pytest.fixture(scope="session")
def redis_executable() -> str:
    require_redis_package()
    executable = find_redis_server()
    if executable is None:
        skip_or_fail("the Redis tests need redis-server (Debian: apt-get install redis-server)")
    assert executable is not None
    return executable


@pytest.fixture(scope="session")
def redis_server(redis_executable: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(redis_executable, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_redis(redis_executable: str, tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``start_redis(port=None)``: a redis-server of this test alone (to stop and restart)."""
    started: list[RedisServer] = []

    def start(port: int | None = None) -> RedisServer:
        directory = tmp_path / f"redis-{len(started)}"
        directory.mkdir()
        server = RedisServer(redis_executable, directory)
        started.append(server)
        server.start(port)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop(signal.SIGKILL)


@pytest.fixture
def registry_process(tmp_path: Path) -> Iterator[Callable[..., RegistryProcess]]:
    started: list[RegistryProcess] = []

    def start(*args: str, port: int = 0) -> RegistryProcess:
        proc = RegistryProcess(tmp_path, *args, port=port)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


class Backend:
    """One registry backend under the contract, with its own namespace."""

    kind: str

    def __init__(self) -> None:
        self.clients: list[Registry] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def open(self) -> Registry:
        raise NotImplementedError

    def client(self) -> Registry:
        """A new registry client on this backend's namespace."""
        registry = self.open()
        self.clients.append(registry)
        return registry

    def run(self, body: Callable[[Backend], Awaitable[Any]], timeout: float = 20.0) -> Any:
        async def main() -> Any:
            await self.start()
            try:
                return await body(self)
            finally:
                for registry in self.clients:
                    await registry.close()
                self.clients.clear()
                await self.stop()

        return run_async(main(), timeout=timeout)

    def __repr__(self) -> str:
        return f"<backend {self.kind}>"


class MemoryBackend(Backend):
    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.store = TTLStore(max_keys=CAP_KEYS, max_values_per_key=CAP_VALUES)
        self.name = f"contract-{uuid.uuid4().hex}"

    def open(self) -> Registry:
        return MemoryRegistry(self.name, store=self.store)


class ServiceBackend(Backend):
    """A RegistryServer on the test's own loop."""

    kind = "service"

    def __init__(self) -> None:
        super().__init__()
        self.server: RegistryServer | None = None

    async def start(self) -> None:
        self.server = RegistryServer(
            LOOPBACK, 0, limits=RegistryLimits(max_keys=CAP_KEYS, max_values_per_key=CAP_VALUES)
        )
        await self.server.start()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def open(self) -> Registry:
        assert self.server is not None
        return open_registry(self.server.url)


class ProcessBackend(Backend):
    kind = "service-process"

    def __init__(self, proc: RegistryProcess) -> None:
        super().__init__()
        self.proc = proc

    def open(self) -> Registry:
        return open_registry(self.proc.url)


class RedisBackend(Backend):
    kind = "redis"

    def __init__(self, server: RedisServer) -> None:
        super().__init__()
        self.server = server
        self.prefix = f"contract-{uuid.uuid4().hex}:"

    def open(self) -> Registry:
        return open_registry(
            f"{self.server.url}?prefix={self.prefix}&max_keys={CAP_KEYS}&max_values_per_key={CAP_VALUES}"
        )


def make_backend(kind: str, request: pytest.FixtureRequest) -> Backend:
    if kind == "memory":
        return MemoryBackend()
    if kind == "service":
        return ServiceBackend()
    if kind == "service-process":
        start = request.getfixturevalue("registry_process")
        return ProcessBackend(start("--max-keys", str(CAP_KEYS), "--max-values-per-key", str(CAP_VALUES)))
    if kind == "redis":
        return RedisBackend(request.getfixturevalue("redis_server"))
    raise AssertionError(kind)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request.param, request)


@pytest.fixture(params=NETWORK_BACKENDS)
def network_backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request.param, request)

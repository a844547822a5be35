"""Fixtures of the fleet tests.

* ``nat_engine`` (from ``tests/nat``): the engine of the test, in this
  process and in every process it starts (``FASTNAT_NO_EXTENSIONS=1`` for
  ``python``).
* ``redis_server`` (from ``tests/discovery``, session scope): a real
  ``redis-server`` on a free loopback port; without it the Redis cases are
  skipped with the reason, or fail when ``CI`` is set.
* ``fleet``: starts forwarders, registries and servers, each in its own
  process on 127.0.0.1, and always stops and reaps them (servers first),
  even when the test failed.
* every test starts with no ``FASTNAT_REGISTRY`` / ``FASTNAT_FORWARDERS``
  and the default settings, and is checked afterwards for leaked threads,
  descriptors, registrations and tasks on fastnat's background loop (the
  background loop's own registry client, which lives as long as the
  process, is closed first).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from discovery.conftest import redis_executable, redis_server  # noqa: F401 - fixtures, reused
from nat.conftest import _engine_of, _open_fds, _stop_leftovers, _warm_up, background_tasks, nat_engine  # noqa: F401

from fastnat import locate, natlayer, settings
from fastnat.aio import server as aio_server
from fastnat.blocking import loop_thread

from .support import ForwarderProc, RegistryProc, ServerProc, child_env


def close_background_registries() -> None:
    """Close the registry clients of fastnat's background loop (the blocking API's)."""
    loop = loop_thread.get_loop()

    asyncio.run_coroutine_threadsafe(locate.close_registries(), loop).result(10)


@pytest.fixture(autouse=True)
def _clean_and_no_leaks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("FASTNAT_FORWARDERS", "FASTNAT_SECRET", "FASTNAT_REGISTRY"):
        monkeypatch.delenv(name, raising=False)
    saved = dataclasses.replace(settings._settings)
    saved.forwarders = list(saved.forwarders)
    locate._client_cache.clear()
    threads = set(threading.enumerate())
    fds = _open_fds()
    yield
    _stop_leftovers()
    close_background_registries()
    locate._client_cache.clear()
    for field in dataclasses.fields(saved):
        setattr(settings._settings, field.name, getattr(saved, field.name))
    deadline = time.monotonic() + 5.0
    while True:
        problems = []
        extra_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        if extra_threads:
            problems.append(f"threads left running: {extra_threads}")
        extra_fds = {fd: target for fd, target in _open_fds().items() if fds.get(fd) != target}
        if extra_fds:
            problems.append(f"file descriptors left open: {extra_fds}")
        if natlayer._handles:
            problems.append(f"nat_waitforconn handles left: {natlayer._handles}")
        if aio_server._registrations:
            problems.append(f"registrations left: {aio_server._registrations}")
        tasks = background_tasks()
        if tasks:
            problems.append(f"tasks left on fastnat's loop: {tasks}")
        if not problems:
            return
        if time.monotonic() > deadline:
            aio_server._registrations.clear()
            pytest.fail("leaked after the test: " + "; ".join(problems), pytrace=False)
        time.sleep(0.05)


class Fleet:
    """What one test started; everything is stopped and reaped at its end."""

    def __init__(self, engine_name: str, directory: Path) -> None:
        self.engine = engine_name
        self.directory = directory
        self.forwarders: list[ForwarderProc] = []
        self.registries: list[RegistryProc] = []
        self.servers: list[ServerProc] = []

    def _log(self, kind: str, count: int) -> Path:
        return self.directory / f"{kind}-{count}.log"

    def forwarder(self, *args: str, settings: dict[str, Any] | None = None, plain: bool = False) -> ForwarderProc:
        """A forwarder process; ``settings`` shorten its timings (see forwarder_proc.py)."""
        proc = ForwarderProc(
            list(args),
            child_env(self.engine, None, settings),
            self._log("forwarder", len(self.forwarders)),
            plain=plain,
        )
        self.forwarders.append(proc)
        return proc

    def registry(self, port: int = 0) -> RegistryProc:
        """``python -m fastnat registry`` (on ``port``, else a free one)."""
        proc = RegistryProc(child_env(self.engine, None), self._log("registry", len(self.registries)), port)
        self.registries.append(proc)
        return proc

    def server(
        self,
        server_id: str,
        registry: str,
        *args: str,
        settings: dict[str, Any] | None = None,
        wait: bool = True,
    ) -> ServerProc:
        """``server_proc.py --id server_id *args`` with ``FASTNAT_REGISTRY=registry``; waits until it is ready."""
        proc = ServerProc(
            ["--id", server_id, *args],
            child_env(self.engine, registry, settings),
            self._log("server", len(self.servers)),
        )
        self.servers.append(proc)
        if wait:
            proc.ready()
        return proc

    def logs(self) -> str:
        parts = []
        for proc in [*self.servers, *self.forwarders, *self.registries]:
            parts.append(f"--- {proc.name} {proc.pid} ({proc.log_path.name}):\n{proc.log()[-4000:]}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        for proc in [*self.servers, *self.forwarders, *self.registries]:
            try:
                proc.stop(signal.SIGTERM, timeout=10)
            except Exception:  # noqa: BLE001 - make sure the others are stopped too
                proc.stop(signal.SIGKILL, timeout=10)


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    started = Fleet(_engine_of(request), tmp_path)
    try:
        yield started
    finally:
        _stop_leftovers()
        started.stop_all()
        if getattr(request.node, "rep_call_failed", False):
            print(started.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call_failed = report.failed  # type: ignore[attr-defined]


@pytest.fixture
def registry_url(request: pytest.FixtureRequest, fleet: Fleet) -> str:
    """A shared registry of the parametrized kind: ``service`` (``python -m
    fastnat registry`` in its own process) or ``redis`` (the real
    redis-server, in a namespace of this test's own)."""
    kind = request.param
    if kind == "service":
        return fleet.registry().url
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        return f"{server.url}?prefix=fleet-{uuid.uuid4().hex}:"
    raise AssertionError(kind)

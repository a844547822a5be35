"""Fixtures of the NAT layer's end-to-end tests.

* ``nat_engine`` runs a test for both engines (built on ``engine`` from
  ``tests/conftest.py``): in this process ``fastnat.mux.Session`` (which
  every ``MuxSession`` calls when it is made, on any thread) points at the
  engine's ``Session`` for the test, and every child process (forwarders,
  server processes) gets ``FASTNAT_NO_EXTENSIONS=1`` for the python engine.
* ``forwarders(*args)`` starts ``python -m fastnat forwarder`` processes on
  127.0.0.1 and always stops and reaps them; ``server_procs(*args)`` starts
  ``server_proc.py`` processes likewise.
* every test starts from a clean NAT-layer configuration (no
  ``FASTNAT_FORWARDERS``, nothing from ``fastnat.configure``) and is checked
  for leaked threads, file descriptors, registrations and tasks on fastnat's
  background loop afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import fastnat.mux
from fastnat import _mux_py, natlayer, settings
from fastnat.aio import server as aio_server
from fastnat.blocking import loop_thread

from .support import ForwarderProcess, ServerProcess, engine_env


def _default_engine() -> str:
    """The engine a process started from here runs by default: this one's
    (the pure one with FASTNAT_NO_EXTENSIONS=1 or on a pure-Python install)."""
    import fastnat.mux

    return str(fastnat.mux.IMPLEMENTATION)


@pytest.fixture(scope="session", autouse=True)
def _warm_up() -> None:
    """Start what a process makes once (fastnat's background loop thread,
    asyncio's default loop pieces) so that it is in every test's baseline."""
    bg = loop_thread.get_loop()
    # libuv opens one descriptor per loop (its EMFILE reserve, on /dev/null)
    # the first time the loop makes a TCP stream: do that here, once.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        async def touch() -> None:
            _, writer = await asyncio.open_connection(*listener.getsockname())
            writer.close()
            await writer.wait_closed()

        asyncio.run_coroutine_threadsafe(touch(), bg).result(10)
        listener.accept()[0].close()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return fds


def background_tasks() -> list[asyncio.Task[Any]]:
    """Unfinished tasks on fastnat's background loop (except the one asking)."""
    loop = loop_thread.get_loop()

    async def ask() -> list[asyncio.Task[Any]]:
        me = asyncio.current_task()
        return [t for t in asyncio.all_tasks() if t is not me and not t.done()]

    return asyncio.run_coroutine_threadsafe(ask(), loop).result(5)


def _stop_leftovers() -> None:
    """Stop whatever a failed test left registered (so one failure does not
    cascade into the next tests)."""
    with natlayer._handles_lock:
        handles = list(natlayer._handles)
    for handle in handles:
        try:
            natlayer.nat_stopcomm(handle)
        except Exception:  # noqa: BLE001 - best effort after a failure
            pass
    loop = loop_thread.get_loop()
    for key, registration in list(aio_server._registrations.items()):
        if registration._loop is loop:
            try:
                asyncio.run_coroutine_threadsafe(registration.close(), loop).result(10)
            except Exception:  # noqa: BLE001
                pass


@pytest.fixture(autouse=True)
def _no_leaks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A clean configuration before; nothing left running after."""
    for name in ("FASTNAT_FORWARDERS", "FASTNAT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    saved = dataclasses.replace(settings._settings)
    saved.forwarders = list(saved.forwarders)
    threads = set(threading.enumerate())
    fds = _open_fds()
    yield
    _stop_leftovers()
    for field in dataclasses.fields(saved):
        setattr(settings._settings, field.name, getattr(saved, field.name))
    deadline = time.monotonic() + 5.0
    while True:
        problems = []
        extra_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        if extra_threads:
            problems.append(f"threads left running: {extra_threads}")
        now = _open_fds()
        extra_fds = {fd: target for fd, target in now.items() if fds.get(fd) != target}
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


@pytest.fixture
def nat_engine(engine: ModuleType, monkeypatch: pytest.MonkeyPatch) -> str:
    """``"compiled"`` or ``"python"``: the engine of this test, in this
    process and in every process it starts."""
    name = "python" if engine is _mux_py else "compiled"
    monkeypatch.setattr(fastnat.mux, "Session", engine.Session)
    return name


def _engine_of(request: pytest.FixtureRequest) -> str:
    if "nat_engine" in request.fixturenames:
        return str(request.getfixturevalue("nat_engine"))
    return _default_engine()


@pytest.fixture
def forwarders(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., ForwarderProcess]]:
    """``forwarders(*args, port=0)`` starts a forwarder process."""
    started: list[ForwarderProcess] = []
    engine_name = _engine_of(request)

    def start(*args: str, port: int = 0) -> ForwarderProcess:
        log = tmp_path / f"forwarder-{len(started)}.log"
        fwd = ForwarderProcess(list(args), engine_env(engine_name), log, port=port)
        started.append(fwd)
        return fwd

    try:
        yield start
    finally:
        _stop_leftovers()
        for fwd in started:
            fwd.stop(signal.SIGTERM)


@pytest.fixture
def forwarder(forwarders: Callable[..., ForwarderProcess]) -> ForwarderProcess:
    """One forwarder with the default limits."""
    return forwarders()


@pytest.fixture
def server_procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``server_procs(*args, **env)`` starts ``server_proc.py``."""
    started: list[ServerProcess] = []
    engine_name = _engine_of(request)

    def start(*args: str, **env: str) -> ServerProcess:
        log = tmp_path / f"server-{len(started)}.log"
        proc = ServerProcess(list(args), engine_env(engine_name, **env), log)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()

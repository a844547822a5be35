"""Fixtures of the asyncio session tests.

* ``aio_engine`` runs a test for both engines (built on ``engine`` from
  ``tests/conftest.py``, so the compiled case carries the ``compiled``
  marker): ``MuxSession`` calls ``fastnat.mux.Session`` when it is made, so
  the ``python`` case points that name at ``fastnat._mux_py.Session`` for the
  test (a real engine, not a mock). Peer processes get the same engine through
  ``FASTNAT_NO_EXTENSIONS``.
* ``loop_kind`` parametrizes the event loop (asyncio's default, uvloop) for
  the tests that request it; ``arun(coro, timeout=...)`` runs a coroutine on
  a fresh loop of that kind (asyncio's when the test does not ask), bounded in
  time, and fails if a task is left pending afterwards.
* an autouse leak check compares threads and open file descriptors before and
  after every test.
* ``peers`` starts ``peer_proc.py`` processes and always stops and reaps them.
* ``go_peers`` starts the Go hashicorp/yamux peer of ``tests/interop``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import uvloop

import fastnat.mux
from fastnat import _mux_py

from .support import LeakCheck, PeerProcess, run_async


@pytest.fixture(scope="session", autouse=True)
def _warm_up() -> None:
    """Make each kind of loop once, so that whatever a library opens once per
    process (not per test) is in every test's fd baseline."""
    for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
        loop = factory()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    check = LeakCheck()
    yield
    check.check()


@pytest.fixture
def aio_engine(engine: ModuleType, monkeypatch: pytest.MonkeyPatch) -> str:
    """``"compiled"`` or ``"python"``: the engine every MuxSession of the test uses."""
    name = "python" if engine is _mux_py else "compiled"
    monkeypatch.setattr(fastnat.mux, "Session", engine.Session)
    return name


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def arun(request: pytest.FixtureRequest) -> Callable[..., Any]:
    kind = request.getfixturevalue("loop_kind") if "loop_kind" in request.fixturenames else "asyncio"

    def run(coro: Any, *, timeout: float = 30.0, check_tasks: bool = True) -> Any:
        return run_async(coro, loop_kind=kind, timeout=timeout, check_tasks=check_tasks)

    return run


@pytest.fixture
def peers(aio_engine: str) -> Iterator[Callable[..., PeerProcess]]:
    """``peers(*args)`` starts a peer process running the test's engine."""
    started: list[PeerProcess] = []

    def start(*args: str) -> PeerProcess:
        peer = PeerProcess(list(args), aio_engine)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.close()
    leaked = [p.args for p in started if p.proc.returncode is None]
    assert not leaked, f"peer processes left running: {leaked}"


# ------------------------------------------------------------ the Go peer


@pytest.fixture(scope="session")
def go_peer_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from interop.go_peer import build_peer, find_toolchain

    go, gopath, missing = find_toolchain()
    if missing:
        reason = f"Go interop tests need {missing}"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{reason}; CI must install them", pytrace=False)
        pytest.skip(reason)
    assert go is not None and gopath is not None
    return build_peer(go, gopath, tmp_path_factory.mktemp("aio_yamux_peer"))


@pytest.fixture
def go_peers(go_peer_binary: Path) -> Iterator[Callable[..., Any]]:
    from interop.go_peer import GoPeer

    started: list[GoPeer] = []

    def start(*args: str) -> GoPeer:
        peer = GoPeer(go_peer_binary, [*args, "-lifetime", "2m"])
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.close()
    leaked = [p.args for p in started if p.proc.returncode is None]
    assert not leaked, f"Go peer processes left running: {leaked}"


if str(Path(__file__).resolve().parent.parent) not in sys.path:  # for ``interop.go_peer``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

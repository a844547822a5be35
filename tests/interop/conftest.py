"""Fixtures of the interop tests against Go's hashicorp/yamux.

* ``yamux_peer_binary`` (session scope) builds ``yamux_peer.go`` once into a
  temporary directory. Without Go or the hashicorp/yamux source the tests are
  skipped with the reason, unless the environment variable ``CI`` is set: CI
  installs both, so there a missing dependency is a failure, not a silent pass.
* ``start_peer`` starts peer processes; each is asked to quit, killed if it
  does not, and reaped when the test ends, whatever the outcome.
* ``link`` connects a fastnat engine (the ``engine`` fixture: compiled and
  python) to a fresh peer over TCP on 127.0.0.1, fastnat dialling or
  accepting, and returns ``(MuxDriver, GoPeer)``.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .go_peer import GoPeer, build_peer, find_toolchain
from .mux_driver import MuxDriver

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT = 10.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "interop: runs against Go's hashicorp/yamux (needs golang-go and its yamux)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.interop)


@pytest.fixture(scope="session")
def yamux_peer_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go, gopath, missing = find_toolchain()
    if missing:
        reason = f"Go interop tests need {missing}"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{reason}; CI must install them (CI is set, so this is not skipped)", pytrace=False)
        pytest.skip(reason)
    assert go is not None and gopath is not None
    return build_peer(go, gopath, tmp_path_factory.mktemp("yamux_peer"))


@pytest.fixture
def start_peer(yamux_peer_binary: Path) -> Iterator[Callable[..., GoPeer]]:
    peers: list[GoPeer] = []

    def start(
        mode: str,
        *,
        addr: str | None = None,
        window: int | None = None,
        backlog: int | None = None,
        accept_paused: bool = False,
    ) -> GoPeer:
        args = ["-mode", mode]
        if addr is not None:
            args += ["-addr", addr]
        if window is not None:
            args += ["-window", str(window)]
        if backlog is not None:
            args += ["-backlog", str(backlog)]
        if accept_paused:
            args.append("-accept-paused")
        peer = GoPeer(yamux_peer_binary, args)
        peers.append(peer)
        return peer

    yield start
    errors = []
    for peer in peers:
        try:
            peer.close()
        except (OSError, AssertionError, subprocess.SubprocessError) as exc:  # pragma: no cover - reported below
            errors.append(f"{peer.args}: {exc!r}")
    leaked = [p.args for p in peers if p.proc.returncode is None]
    assert not leaked, f"peer processes left running: {leaked}"
    assert not errors, f"closing peers failed: {errors}"


@pytest.fixture(params=[True, False], ids=["fastnat-dials", "fastnat-accepts"])
def fastnat_dials(request: pytest.FixtureRequest) -> bool:
    """fastnat as the dialling side (yamux client, odd ids) or the accepting side."""
    return bool(request.param)


@pytest.fixture
def link(engine: ModuleType, start_peer: Callable[..., GoPeer]) -> Iterator[Callable[..., tuple[MuxDriver, GoPeer]]]:
    drivers: list[MuxDriver] = []
    sockets: list[socket.socket] = []

    def connect(
        fastnat_dials: bool,
        *,
        config: Any = None,
        go_window: int | None = None,
        go_backlog: int | None = None,
        accept_paused: bool = False,
        on_open: str = "accept",
        inbound_mode: str = "buffer",
    ) -> tuple[MuxDriver, GoPeer]:
        go_opts: dict[str, Any] = {"window": go_window, "backlog": go_backlog, "accept_paused": accept_paused}
        if fastnat_dials:
            peer = start_peer("server", addr=f"{LOOPBACK}:0", **go_opts)
            listening = peer.wait_event("listening", CONNECT_TIMEOUT)
            host, port = listening["addr"].rsplit(":", 1)
            assert host == LOOPBACK, listening
            sock = socket.create_connection((LOOPBACK, int(port)), timeout=CONNECT_TIMEOUT)
            sockets.append(sock)
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(listener)
            listener.bind((LOOPBACK, 0))
            listener.listen(1)
            listener.settimeout(CONNECT_TIMEOUT)
            peer = start_peer("client", addr=f"{LOOPBACK}:{listener.getsockname()[1]}", **go_opts)
            try:
                sock, _ = listener.accept()
            except TimeoutError as exc:
                raise AssertionError(f"the Go peer did not connect\n  {peer.describe()}") from exc
            sockets.append(sock)
            listener.close()
        peer.wait_event("ready", CONNECT_TIMEOUT)
        driver = MuxDriver(
            engine, sock, client=fastnat_dials, config=config, on_open=on_open, inbound_mode=inbound_mode
        )
        drivers.append(driver)
        return driver, peer

    yield connect
    for driver in drivers:
        driver.close()
    for sock in sockets:
        sock.close()

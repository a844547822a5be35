"""Fixtures of the command-line tests: processes that are always reaped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _tls_helpers import tls_files  # noqa: F401 - a fixture (tests/cli/test_tls.py)

from .support import Processes, Service


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Starts ``fastnat`` commands; every one is killed (process group) afterwards."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def forwarder(procs: Processes) -> int:
    """A ``fastnat forwarder`` on 127.0.0.1 (hosting its registry): its port."""
    _, port = procs.forwarder()
    return port


@pytest.fixture
def services() -> Iterator[Callable[..., Service]]:
    """``services(handler)`` starts a local TCP service; all are closed afterwards."""
    started: list[Service] = []

    def start(handler) -> Service:  # type: ignore[no-untyped-def]
        service = Service(handler)
        started.append(service)
        return service

    try:
        yield start
    finally:
        for service in started:
            service.close()

"""Shared fixtures: every engine-dependent test runs against both engines.

``engine`` is parametrized with ids ``compiled`` and ``python``. The compiled
cases carry the ``compiled`` marker; ``--no-compiled`` (or ``-m "not
compiled"``) deselects them, as does ``FASTNAT_NO_EXTENSIONS=1``, which is how
a pure-Python install is tested. Otherwise a compiled engine that cannot be
imported is a test failure, not a skip.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from fastnat import _mux_py
from fastnat._engine_choice import NO_EXTENSIONS_ENV


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-compiled",
        action="store_true",
        default=False,
        help="deselect the compiled engine's tests (for a pure-Python install)",
    )


def compiled_disabled(config: pytest.Config) -> bool:
    """True when this run must not use the compiled engine."""
    return bool(config.getoption("--no-compiled")) or os.environ.get(NO_EXTENSIONS_ENV, "") not in ("", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not compiled_disabled(config):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("compiled") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def load_engine(name: str) -> ModuleType:
    """The engine module called ``name``; a missing compiled engine fails the test."""
    if name == "python":
        return _mux_py
    try:
        from fastnat import _mux
    except ImportError as exc:  # pragma: no cover - only on a broken build
        pytest.fail(f"the compiled engine fastnat._mux cannot be imported ({exc}); build it, or pass --no-compiled")
    return _mux


ENGINE_PARAMS = [
    pytest.param("compiled", marks=pytest.mark.compiled, id="compiled"),
    pytest.param("python", id="python"),
]


@pytest.fixture(params=ENGINE_PARAMS)
def engine(request: pytest.FixtureRequest) -> ModuleType:
    """The engine module under test: ``fastnat._mux`` or ``fastnat._mux_py``."""
    return load_engine(request.param)

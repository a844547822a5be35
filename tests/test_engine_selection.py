"""Which engine ``fastnat.mux`` selects, checked in fresh interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastnat._engine_choice import NO_EXTENSIONS_ENV

PROBE = """
import json, fastnat.mux as m, fastnat.events as ev
print(json.dumps({
    "implementation": m.IMPLEMENTATION,
    "reason": m.FALLBACK_REASON,
    "session": m.Session.__module__,
    "events": ev.StreamOpened.__module__,
}))
"""


def probe(env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop(NO_EXTENSIONS_ENV, None)
    if env_value is not None:
        env[NO_EXTENSIONS_ENV] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.compiled
def test_a_normal_install_selects_the_compiled_engine():
    got = probe(None)
    assert got == {
        "implementation": "compiled",
        "reason": None,
        "session": "fastnat._mux",
        "events": "fastnat._mux",
    }


@pytest.mark.compiled
@pytest.mark.parametrize("value", ["", "0"])
def test_empty_or_zero_does_not_disable_the_extension(value):
    assert probe(value)["implementation"] == "compiled"


@pytest.mark.parametrize("value", ["1", "yes"])
def test_no_extensions_selects_the_pure_engine(value):
    got = probe(value)
    assert got["implementation"] == "python"
    assert got["session"] == "fastnat._mux_py"
    assert got["events"] == "fastnat._events_py"
    assert got["reason"] and NO_EXTENSIONS_ENV in got["reason"]


def test_mux_reexports_the_shared_names():
    import fastnat.errors
    import fastnat.events
    import fastnat.mux as m

    assert m.IMPLEMENTATION in ("compiled", "python")
    assert m.ProtocolError is fastnat.errors.ProtocolError
    assert m.StreamOpened is fastnat.events.StreamOpened
    assert m.DataReceived is fastnat.events.DataReceived
    for name in m.__all__:
        assert hasattr(m, name), name

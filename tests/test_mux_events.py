"""The event classes: the compiled ones and their pure-Python twins behave alike.

Both engines build the classes ``fastnat.events`` exports (the compiled ones
when the extension is present, ``fastnat._events_py`` otherwise); the two sets
must compare and print the same way.
"""

from __future__ import annotations

import pytest

from fastnat import _events_py

NAMES_1 = ["StreamOpened", "StreamAccepted", "StreamEnded", "StreamReset"]


def _load_compiled():
    from fastnat import _mux

    return _mux


@pytest.fixture(
    params=[pytest.param("compiled", marks=pytest.mark.compiled), pytest.param("python")],
)
def events(request):
    return _load_compiled() if request.param == "compiled" else _events_py


@pytest.mark.parametrize("name", NAMES_1)
def test_stream_events(events, name):
    cls = getattr(events, name)
    ev = cls(7)
    assert ev.stream_id == 7
    assert isinstance(ev, events.Event)
    assert ev == cls(7)
    assert not (ev != cls(7))
    assert ev != cls(8)
    assert repr(ev) == f"{name}(stream_id=7)"
    for other in NAMES_1:
        if other != name:
            assert ev != getattr(events, other)(7)
    assert ev != 7
    assert ev != (name, 7)
    with pytest.raises(TypeError):
        hash(ev)


def test_value_events(events):
    assert events.WindowUpdated(3, 100) == events.WindowUpdated(3, 100)
    assert events.WindowUpdated(3, 100) != events.WindowUpdated(3, 101)
    assert events.WindowUpdated(3, 100) != events.WindowUpdated(4, 100)
    assert repr(events.WindowUpdated(3, 100)) == "WindowUpdated(stream_id=3, delta=100)"
    assert events.PingReceived(5) != events.PingAcknowledged(5)
    assert repr(events.PingReceived(5)) == "PingReceived(opaque=5)"
    assert repr(events.PingAcknowledged(6)) == "PingAcknowledged(opaque=6)"
    assert repr(events.GoAwayReceived(1)) == "GoAwayReceived(code=1)"
    assert events.GoAwayReceived(1) == events.GoAwayReceived(1)
    assert events.GoAwayReceived(1).code == 1
    assert events.WindowUpdated(3, 100).delta == 100


def test_data_event(events):
    ev = events.DataReceived(1, memoryview(b"abc"))
    assert ev.stream_id == 1
    assert bytes(ev.data) == b"abc"
    assert ev == events.DataReceived(1, memoryview(bytearray(b"abc")))
    assert ev != events.DataReceived(1, memoryview(b"abd"))
    assert ev != events.DataReceived(2, memoryview(b"abc"))
    assert repr(ev) == "DataReceived(stream_id=1, data=<3 bytes>)"
    with pytest.raises(TypeError):
        hash(ev)


def test_fields(events):
    assert events.DataReceived._fields == ("stream_id", "data")
    assert events.WindowUpdated._fields == ("stream_id", "delta")
    assert events.PingReceived._fields == ("opaque",)
    assert events.GoAwayReceived._fields == ("code",)


@pytest.mark.compiled
def test_compiled_and_pure_events_print_alike():
    compiled = _load_compiled()
    cases = [
        ("StreamOpened", (1,)),
        ("StreamAccepted", (2,)),
        ("StreamEnded", (3,)),
        ("StreamReset", (4,)),
        ("WindowUpdated", (5, 6)),
        ("PingReceived", (7,)),
        ("PingAcknowledged", (8,)),
        ("GoAwayReceived", (2,)),
        ("DataReceived", (9, memoryview(b"xyz"))),
    ]
    for name, args in cases:
        c = getattr(compiled, name)(*args)
        p = getattr(_events_py, name)(*args)
        assert repr(c) == repr(p)
        assert c._fields == p._fields
        # different class sets never compare equal
        assert c != p


@pytest.mark.compiled
def test_compiled_events_are_read_only():
    ev = _load_compiled().StreamOpened(1)
    with pytest.raises(AttributeError):
        ev.stream_id = 2
    assert ev.stream_id == 1

"""MuxConfig: defaults and validation (shared by both engines)."""

from __future__ import annotations

import dataclasses

import pytest

from fastnat.frames import MAX_UINT32
from fastnat.mux_config import MuxConfig

FIELDS = [
    "initial_stream_window",
    "max_stream_window",
    "accept_backlog",
    "max_streams",
    "max_frame_size",
    "max_outstanding_pings",
]


def test_defaults():
    c = MuxConfig()
    assert c.initial_stream_window == 256 * 1024
    assert c.max_stream_window == 16 * 1024 * 1024
    assert c.accept_backlog == 256
    assert c.max_streams == 65_536
    assert c.max_frame_size == 64 * 1024
    assert c.max_outstanding_pings >= 1


def test_frozen():
    c = MuxConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.accept_backlog = 1  # type: ignore[misc]
    assert dataclasses.replace(c, accept_backlog=3).accept_backlog == 3


@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("value", ["1", 1.0, None, True, [1]])
def test_bad_types(name, value):
    with pytest.raises(TypeError, match=name):
        MuxConfig(**{name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("initial_stream_window", 256 * 1024 - 1),
        ("initial_stream_window", 0),
        ("initial_stream_window", MAX_UINT32 + 1),
        ("max_stream_window", MAX_UINT32 + 1),
        ("max_stream_window", 1024),
        ("accept_backlog", 0),
        ("accept_backlog", -1),
        ("max_streams", 0),
        ("max_frame_size", 0),
        ("max_frame_size", MAX_UINT32 + 1),
        ("max_outstanding_pings", 0),
    ],
)
def test_bad_values(name, value):
    with pytest.raises(ValueError, match=name):
        MuxConfig(**{name: value})


def test_max_window_below_initial_window():
    with pytest.raises(ValueError, match="max_stream_window"):
        MuxConfig(initial_stream_window=1024 * 1024, max_stream_window=512 * 1024)
    c = MuxConfig(initial_stream_window=1024 * 1024, max_stream_window=1024 * 1024)
    assert c.max_stream_window == c.initial_stream_window


def test_limits_accepted():
    c = MuxConfig(
        initial_stream_window=MAX_UINT32,
        max_stream_window=MAX_UINT32,
        accept_backlog=1,
        max_streams=1,
        max_frame_size=1,
        max_outstanding_pings=1,
    )
    assert c.initial_stream_window == MAX_UINT32

"""The multiplexer's events, one set of classes shared by both engines."""

from __future__ import annotations

from fastnat._engine_choice import compiled_module

if compiled_module is not None:
    from fastnat._mux import (
        DataReceived,
        Event,
        GoAwayReceived,
        PingAcknowledged,
        PingReceived,
        StreamAccepted,
        StreamEnded,
        StreamOpened,
        StreamReset,
        WindowUpdated,
    )
else:
    from fastnat._events_py import (  # type: ignore[assignment]
        DataReceived,
        Event,
        GoAwayReceived,
        PingAcknowledged,
        PingReceived,
        StreamAccepted,
        StreamEnded,
        StreamOpened,
        StreamReset,
        WindowUpdated,
    )

__all__ = [
    "Event",
    "StreamOpened",
    "StreamAccepted",
    "DataReceived",
    "StreamEnded",
    "StreamReset",
    "WindowUpdated",
    "PingReceived",
    "PingAcknowledged",
    "GoAwayReceived",
]

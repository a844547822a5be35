"""Pure-Python definitions of the multiplexer's events.

The compiled extension defines the same classes as extension types; the
module :mod:`fastnat.events` exports one set or the other, and both engines
build their events from it, so ``isinstance`` checks hold whichever engine
produced the event. Treat events as read-only.
"""

from __future__ import annotations

from typing import Any

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


class Event:
    """Base class of everything ``Session.receive_data`` returns."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._fields)

    __hash__ = None  # type: ignore[assignment]  # DataReceived holds a memoryview

    def __repr__(self) -> str:
        parts = []
        for f in self._fields:
            value: Any = getattr(self, f)
            if f == "data":
                parts.append(f"data=<{len(value)} bytes>")
            else:
                parts.append(f"{f}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class StreamOpened(Event):
    """The peer opened a stream (SYN). Accept it with ``accept_stream`` or refuse it with ``reset_stream``."""

    __slots__ = ("stream_id",)
    _fields = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamAccepted(Event):
    """The peer accepted a stream this side opened (ACK)."""

    __slots__ = ("stream_id",)
    _fields = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class DataReceived(Event):
    """Payload of one Data frame.

    ``data`` is a memoryview. When the frame lay whole inside the chunk given
    to ``receive_data`` it is a slice of that chunk (no copy): it stays valid
    while that chunk is unchanged, so a caller that reuses its read buffer must
    consume or copy the data before the next read. A frame that was split
    across chunks is reassembled in a buffer of the session's, valid until the
    next ``receive_data`` call. Pass ``len(data)`` to
    ``acknowledge_received_data`` once the application has consumed it.
    """

    __slots__ = ("stream_id", "data")
    _fields = ("stream_id", "data")

    def __init__(self, stream_id: int, data: memoryview) -> None:
        self.stream_id = stream_id
        self.data = data


class StreamEnded(Event):
    """The peer half-closed the stream (FIN): it will send no more data."""

    __slots__ = ("stream_id",)
    _fields = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamReset(Event):
    """The peer reset the stream, or refused a stream this side opened (RST)."""

    __slots__ = ("stream_id",)
    _fields = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class WindowUpdated(Event):
    """The peer granted ``delta`` more bytes of send window on the stream."""

    __slots__ = ("stream_id", "delta")
    _fields = ("stream_id", "delta")

    def __init__(self, stream_id: int, delta: int) -> None:
        self.stream_id = stream_id
        self.delta = delta


class PingReceived(Event):
    """The peer pinged; the engine has already queued the reply."""

    __slots__ = ("opaque",)
    _fields = ("opaque",)

    def __init__(self, opaque: int) -> None:
        self.opaque = opaque


class PingAcknowledged(Event):
    """The peer answered a ping this side sent."""

    __slots__ = ("opaque",)
    _fields = ("opaque",)

    def __init__(self, opaque: int) -> None:
        self.opaque = opaque


class GoAwayReceived(Event):
    """The peer will accept no new streams. ``code``: 0 normal, 1 protocol error, 2 internal error."""

    __slots__ = ("code",)
    _fields = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code

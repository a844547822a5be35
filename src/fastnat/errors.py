"""Exceptions raised by fastnat.

The multiplexer's errors derive from :class:`MuxError`. They are defined here,
in pure Python, so that ``except`` clauses and ``isinstance`` checks work the
same whichever engine (compiled or pure Python) is running.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MuxError",
    "ProtocolError",
    "StreamClosedError",
    "StreamLimitError",
    "SessionClosedError",
]


class MuxError(Exception):
    """Base class of the multiplexer's errors."""


class ProtocolError(MuxError):
    """The peer broke the yamux protocol; the session is dead.

    The engine has queued a Go Away frame with the protocol-error code (send
    it with ``data_to_send()``), and every later command raises this again.
    ``events`` holds the events decoded from the same input before the
    offending frame, so that nothing the peer sent correctly is lost.
    """

    def __init__(self, message: str, events: list[Any] | None = None) -> None:
        super().__init__(message)
        self.events: list[Any] = events if events is not None else []


class StreamClosedError(MuxError):
    """The stream does not exist (never opened, reset, or closed both ways)
    or this side has already ended it."""


class StreamLimitError(MuxError):
    """A configured limit (concurrent streams, stream ids, pending pings) is reached."""


class SessionClosedError(MuxError):
    """No new streams: a Go Away was sent or received."""

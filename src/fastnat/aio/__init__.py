"""fastnat's asyncio API.

:class:`MuxSession`: a multiplexer session over one TCP connection, whose
streams are asyncio transports and ``(reader, writer)``-like objects.
"""

from __future__ import annotations

from fastnat.aio._loop import new_event_loop, run, uvloop_available
from fastnat.aio.session import MuxSession, start_session_server
from fastnat.aio.stream import MuxStream, StreamTransport

__all__ = [
    "MuxSession",
    "MuxStream",
    "StreamTransport",
    "start_session_server",
    "new_event_loop",
    "run",
    "uvloop_available",
]

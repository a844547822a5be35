"""fastnat's asyncio API.

* :func:`open_connection` / :func:`start_server`: reach a server by its id,
  or serve one, through forwarders (shaped like asyncio's functions);
* :class:`MuxSession`: a multiplexer session over one TCP connection, whose
  streams are asyncio transports and ``(reader, writer)``-like objects.
"""

from __future__ import annotations

from fastnat.aio._loop import new_event_loop, run, uvloop_available
from fastnat.aio.client import check_bidirectional, external_address, open_connection
from fastnat.aio.server import NATServer, start_server
from fastnat.aio.session import MuxSession, start_session_server
from fastnat.aio.stream import MuxStream, StreamTransport
from fastnat.locate import close_registries

__all__ = [
    "open_connection",
    "start_server",
    "NATServer",
    "external_address",
    "check_bidirectional",
    "close_registries",
    "MuxSession",
    "MuxStream",
    "StreamTransport",
    "start_session_server",
    "new_event_loop",
    "run",
    "uvloop_available",
]

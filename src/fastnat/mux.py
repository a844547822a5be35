"""The yamux engine this process uses, compiled or pure Python.

``IMPLEMENTATION`` is ``"compiled"`` when ``fastnat._mux`` is in use and
``"python"`` when the pure twin ``fastnat._mux_py`` is, which happens when the
extension is missing, the interpreter is not CPython, or
``FASTNAT_NO_EXTENSIONS`` is set at import; ``FALLBACK_REASON`` then says which.
"""

from __future__ import annotations

from typing import Literal

from fastnat._engine_choice import compiled_module, fallback_reason
from fastnat.errors import (
    MuxError,
    ProtocolError,
    SessionClosedError,
    StreamClosedError,
    StreamLimitError,
)
from fastnat.events import (
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
from fastnat.mux_config import MuxConfig

IMPLEMENTATION: Literal["compiled", "python"]
FALLBACK_REASON: str | None = fallback_reason

if compiled_module is not None:
    from fastnat._mux import Session

    IMPLEMENTATION = "compiled"
else:
    from fastnat._mux_py import Session  # type: ignore[assignment]

    IMPLEMENTATION = "python"

__all__ = [
    "IMPLEMENTATION",
    "FALLBACK_REASON",
    "Session",
    "MuxConfig",
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
    "MuxError",
    "ProtocolError",
    "StreamClosedError",
    "StreamLimitError",
    "SessionClosedError",
]

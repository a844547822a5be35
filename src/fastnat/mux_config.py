"""Configuration of a multiplexer session, shared by both engines."""

from __future__ import annotations

import dataclasses

from fastnat.frames import INITIAL_STREAM_WINDOW, MAX_UINT32

__all__ = ["MuxConfig"]


@dataclasses.dataclass(frozen=True, slots=True)
class MuxConfig:
    """Limits and windows of one yamux session.

    Every field has a default chosen for a relay that carries many streams
    over one TCP connection; the reason for each is beside it.
    """

    # The spec's 256 KiB: every yamux peer assumes it for a new stream, so it
    # is also the floor. A larger value is advertised at once on SYN/ACK.
    initial_stream_window: int = INITIAL_STREAM_WINDOW
    # Auto-tuning grows a stream's receive window up to this. 16 MiB lets one
    # stream carry about 1.3 Gbit/s at 100 ms round-trip time, while bounding
    # what one stream can make us buffer.
    max_stream_window: int = 16 * 1024 * 1024
    # Streams the peer opened that the application has not accepted yet;
    # beyond this they are refused with RST. 256 is hashicorp/yamux's
    # default: room for a burst of new connections between two accepts.
    accept_backlog: int = 256
    # Concurrent streams per session, both directions. An idle stream costs
    # well under 2 KiB, so the default bounds a session's bookkeeping to
    # about 128 MiB while leaving room for any realistic relay.
    max_streams: int = 65_536
    # Largest Data frame this side sends. 64 KiB frames keep other streams
    # from waiting long behind one stream's frame, and most of them arrive
    # whole inside a receiver's 256 KiB read, where they are delivered
    # without a copy.
    max_frame_size: int = 64 * 1024
    # Pings sent and not yet answered. Keepalive needs one; the cap keeps a
    # caller that pings in a loop from growing the bookkeeping without end.
    max_outstanding_pings: int = 64

    def __post_init__(self) -> None:
        def check(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"MuxConfig.{name} must be an int, not {type(value).__name__}")
            if not low <= value <= high:
                raise ValueError(f"MuxConfig.{name} must be between {low} and {high}, got {value}")

        check("initial_stream_window", INITIAL_STREAM_WINDOW, MAX_UINT32)
        check("max_stream_window", self.initial_stream_window, MAX_UINT32)
        check("accept_backlog", 1, 1 << 31)
        check("max_streams", 1, 1 << 31)
        check("max_frame_size", 1, MAX_UINT32)
        check("max_outstanding_pings", 1, 1 << 20)

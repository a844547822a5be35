"""yamux version 0 wire constants and header helpers, shared by both engines.

A frame is a 12-byte big-endian header (version u8, type u8, flags u16,
stream id u32, length u32), followed by ``length`` payload bytes for Data
frames only. For the other types the length field carries a value: the window
delta (Window Update), an opaque echo value (Ping), an error code (Go Away).
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "VERSION",
    "INITIAL_STREAM_WINDOW",
    "MAX_UINT32",
    "FrameType",
    "Flag",
    "GoAwayCode",
    "encode_frame",
    "decode_header",
]

HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size  # 12
VERSION = 0
# Every yamux peer assumes this window for a new stream in both directions;
# a larger one is advertised by a Window Update riding on the SYN or ACK.
INITIAL_STREAM_WINDOW = 256 * 1024
MAX_UINT32 = 0xFFFFFFFF


class FrameType(enum.IntEnum):
    """The frame types of yamux version 0."""

    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(enum.IntFlag):
    """Header flags. SYN/ACK also mark ping requests/replies."""

    SYN = 0x1
    ACK = 0x2
    FIN = 0x4
    RST = 0x8


class GoAwayCode(enum.IntEnum):
    """Error codes carried in the length field of a Go Away frame."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


def encode_frame(
    frame_type: int, flags: int, stream_id: int, length: int | None = None, payload: bytes = b""
) -> bytes:
    """Encode one frame. For Data frames ``length`` defaults to ``len(payload)``."""
    if length is None:
        length = len(payload)
    return HEADER.pack(VERSION, frame_type, flags, stream_id, length) + bytes(payload)


def decode_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int, int, int]:
    """Return ``(version, type, flags, stream_id, length)`` of the header at ``offset``."""
    return HEADER.unpack_from(data, offset)

"""Helpers shared by the engine's conformance, property and differential tests.

Nothing here is a stand-in for the engine: frames are encoded with
``fastnat.frames`` and fed to real sessions; these are only conveniences to
build byte streams, parse what a session queued, and move bytes between two
sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastnat.frames import HEADER_SIZE, MAX_UINT32, Flag, FrameType, decode_header, encode_frame

DATA = FrameType.DATA
WU = FrameType.WINDOW_UPDATE
PING = FrameType.PING
GO_AWAY = FrameType.GO_AWAY
SYN, ACK, FIN, RST = Flag.SYN, Flag.ACK, Flag.FIN, Flag.RST
KIB = 1024
WINDOW = 256 * KIB


def frame(frame_type: int, flags: int, stream_id: int, length: int | None = None, payload: bytes = b"") -> bytes:
    return encode_frame(int(frame_type), int(flags), stream_id, length, payload)


def data_frame(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return frame(DATA, flags, stream_id, None, payload)


def wu_frame(stream_id: int, delta: int = 0, flags: int = 0) -> bytes:
    return frame(WU, flags, stream_id, delta)


def ping_frame(opaque: int, flags: int = SYN) -> bytes:
    return frame(PING, flags, 0, opaque)


def go_away_frame(code: int = 0) -> bytes:
    return frame(GO_AWAY, 0, 0, code)


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    length: int
    payload: bytes = b""


def parse_frames(data: bytes) -> list[Frame]:
    """Split bytes a session queued into frames; the bytes must end on a frame boundary."""
    data = bytes(data)
    frames = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= HEADER_SIZE, f"truncated header at {pos}: {data[pos:]!r}"
        version, ftype, flags, sid, length = decode_header(data, pos)
        assert version == 0
        pos += HEADER_SIZE
        payload = b""
        if ftype == DATA:
            payload = data[pos : pos + length]
            assert len(payload) == length, "truncated Data payload"
            pos += length
        frames.append(Frame(ftype, flags, sid, length, payload))
    return frames


def ev_key(ev: Any) -> tuple[Any, ...]:
    """An engine-neutral description of an event: its class name and fields, data as bytes."""
    name = type(ev).__name__
    values = []
    for f in type(ev)._fields:
        v = getattr(ev, f)
        values.append(bytes(v) if f == "data" else v)
    return (name, *values)


def keys(events: list[Any]) -> list[tuple[Any, ...]]:
    return [ev_key(e) for e in events]


class FakeClock:
    """A clock the test moves by hand: ``clock()`` returns ``clock.now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


@dataclass
class Pair:
    """Two connected sessions; ``a`` dials (odd ids), ``b`` accepts (even ids)."""

    a: Any
    b: Any
    events_a: list[Any] = field(default_factory=list)
    events_b: list[Any] = field(default_factory=list)

    def a_to_b(self) -> list[Any]:
        evs = self.b.receive_data(self.a.data_to_send())
        self.events_b.extend(evs)
        return evs

    def b_to_a(self) -> list[Any]:
        evs = self.a.receive_data(self.b.data_to_send())
        self.events_a.extend(evs)
        return evs

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything queued."""
        for _ in range(100):
            if not self.a.bytes_to_send and not self.b.bytes_to_send:
                return
            self.a_to_b()
            self.b_to_a()
        raise AssertionError("the sessions keep talking to each other")


def make_pair(engine: Any, config_a: Any = None, config_b: Any = None, **kw: Any) -> Pair:
    return Pair(engine.Session(True, config_a, **kw), engine.Session(False, config_b))


# (name, setup frames fed first to an accepting session, the bad frame, words in the message)
# Protocol violations an accepting session must detect:
# (name, setup frames fed first, the bad frame, words in the error message).
PROTOCOL_ERRORS = [
    ("version", b"", bytes([1]) + wu_frame(1, 0, SYN)[1:], "version"),
    ("version-255", b"", bytes([255]) + ping_frame(1)[1:], "version"),
    ("unknown-type", b"", frame(4, 0, 0, 0), "unknown type"),
    ("unknown-type-255", b"", frame(255, SYN, 1, 0), "unknown type"),
    ("data-beyond-window", wu_frame(1, 0, SYN), frame(DATA, 0, 1, WINDOW + 1), "window"),
    ("data-beyond-window-on-syn", b"", frame(DATA, SYN, 1, WINDOW + 1), "window"),
    (
        "data-beyond-window-cumulative",
        wu_frame(1, 0, SYN) + data_frame(1, bytes(WINDOW - 10)),
        frame(DATA, 0, 1, 11),
        "window",
    ),
    ("window-past-2^32-1", wu_frame(1, 0, SYN), wu_frame(1, MAX_UINT32 - WINDOW + 1), "2^32-1"),
    ("window-past-2^32-1-on-syn", b"", wu_frame(1, MAX_UINT32, SYN), "2^32-1"),
    ("syn-on-id-in-use", wu_frame(1, 0, SYN), wu_frame(1, 0, SYN), "already open"),
    ("syn-data-on-id-in-use", wu_frame(1, 0, SYN), data_frame(1, b"x", SYN), "already open"),
    ("syn-wrong-parity", b"", wu_frame(2, 0, SYN), "SYN on stream 2"),
    ("data-after-fin", wu_frame(1, 0, SYN | FIN), data_frame(1, b"late"), "FIN"),
    ("data-after-data-fin", data_frame(1, b"a", SYN | FIN), data_frame(1, b"late"), "FIN"),
    ("second-fin-on-data", wu_frame(1, 0, SYN | FIN), frame(DATA, FIN, 1, 0), "FIN"),
    ("second-fin-on-window-update", wu_frame(1, 0, SYN | FIN), wu_frame(1, 0, FIN), "FIN"),
    ("data-on-stream-0", b"", data_frame(0, b"x"), "stream 0"),
    ("empty-data-on-stream-0", b"", frame(DATA, 0, 0, 0), "stream 0"),
    ("syn-data-on-stream-0", b"", frame(DATA, SYN, 0, 0), "stream 0"),
    ("window-update-on-stream-0", b"", wu_frame(0, 100), "stream 0"),
    ("ping-on-stream-1", b"", frame(PING, SYN, 1, 7), "Ping on stream 1"),
    ("ping-ack-on-stream-1", b"", frame(PING, ACK, 1, 7), "Ping on stream 1"),
    ("go-away-on-stream-1", b"", frame(GO_AWAY, 0, 1, 0), "Go Away on stream 1"),
    ("ping-without-flags", b"", frame(PING, 0, 0, 7), "neither SYN nor ACK"),
    ("ping-fin-only", b"", frame(PING, FIN, 0, 7), "neither SYN nor ACK"),
]

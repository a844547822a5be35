"""Hypothesis strategies and drivers for the engine's property and differential tests.

* ``peer_streams``: byte streams a peer might send, from well-formed to hostile.
* ``feed``: feeds a byte stream to one session in given chunks and records
  everything observable (events with data as bytes, output, errors).
* ``pair_ops`` / ``run_pair``: random operations on a connected pair of
  sessions with the wire in between, recording every byte each side wrote and
  checking the invariants (exactly-once in-order delivery, window bounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from _mux_helpers import (
    ACK,
    DATA,
    FIN,
    GO_AWAY,
    KIB,
    PING,
    RST,
    SYN,
    WINDOW,
    WU,
    FakeClock,
    ev_key,
    frame,
)
from fastnat.errors import (
    ProtocolError,
    SessionClosedError,
    StreamClosedError,
    StreamLimitError,
)
from fastnat.frames import MAX_UINT32
from fastnat.mux_config import MuxConfig

# ------------------------------------------------------------------ configs

configs = st.builds(
    MuxConfig,
    initial_stream_window=st.sampled_from([WINDOW, WINDOW + 1000, 2 * WINDOW]),
    max_stream_window=st.sampled_from([4 * WINDOW, MAX_UINT32]),
    accept_backlog=st.integers(1, 4),
    max_streams=st.integers(1, 8),
    max_frame_size=st.sampled_from([1, 5, 100, 4096, 64 * KIB]),
    max_outstanding_pings=st.integers(1, 3),
)

# For pairs that move up to hundreds of KiB: frames of a few bytes would make
# hundreds of thousands of events per run (the conformance suite and the
# chunking properties cover tiny frames).
pair_configs = st.builds(
    MuxConfig,
    initial_stream_window=st.sampled_from([WINDOW, WINDOW + 1000, 2 * WINDOW]),
    max_stream_window=st.sampled_from([4 * WINDOW, MAX_UINT32]),
    accept_backlog=st.integers(1, 4),
    max_streams=st.integers(1, 8),
    max_frame_size=st.sampled_from([1000, 4096, 16 * KIB, 64 * KIB]),
    max_outstanding_pings=st.integers(1, 3),
)

# ------------------------------------------------------------ peer streams

_small_ids = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 9, 11, MAX_UINT32, MAX_UINT32 - 1])
_ids = st.one_of(_small_ids, _small_ids, _small_ids, st.integers(0, MAX_UINT32))
_stream_flags = st.sampled_from([0, 0, 0, SYN, SYN, ACK, FIN, RST, SYN | FIN, ACK | FIN, SYN | ACK, FIN | RST])
_any_flags = st.one_of(_stream_flags, st.integers(0, 0xFFFF))
_deltas = st.one_of(
    st.sampled_from([0, 1, 1000, WINDOW, MAX_UINT32 - WINDOW, MAX_UINT32 - WINDOW + 1, MAX_UINT32]),
    st.integers(0, MAX_UINT32),
)

_data = st.builds(lambda f, i, p: frame(DATA, f, i, None, p), _stream_flags, _ids, st.binary(max_size=64))
# big payloads (made of zeros so that hypothesis need not draw them): windows fill up
_big_data = st.builds(
    lambda f, i, n: frame(DATA, f, i, None, bytes(n)),
    _stream_flags,
    _small_ids,
    st.sampled_from([WINDOW // 2, WINDOW // 2 + 1, WINDOW - 1, WINDOW, WINDOW + 1]),
)
_wu = st.builds(lambda f, i, d: frame(WU, f, i, d), _stream_flags, _ids, _deltas)
_ping = st.builds(
    lambda f, o: frame(PING, f, 0, o), st.sampled_from([SYN, SYN, ACK, ACK, 0, FIN, SYN | ACK]), st.integers(0, 8)
)
_go_away = st.builds(lambda c: frame(GO_AWAY, 0, 0, c), st.integers(0, 3))
# hostile: any header, truncated/garbage bytes, Data headers whose payload never comes
_any_header = st.builds(
    lambda v, t, f, i, n: bytes([v, t]) + f.to_bytes(2, "big") + i.to_bytes(4, "big") + n.to_bytes(4, "big"),
    st.sampled_from([0, 0, 0, 1, 255]),
    st.integers(0, 255),
    _any_flags,
    _ids,
    st.one_of(st.integers(0, 100), st.integers(0, MAX_UINT32)),
)
_garbage = st.binary(min_size=1, max_size=20)

well_formed_frame = st.one_of(_data, _data, _data, _wu, _wu, _ping, _go_away, _big_data)
hostile_frame = st.one_of(_data, _data, _wu, _wu, _ping, _go_away, _big_data, _any_header, _garbage)

# Streams that open streams first, so that later frames find them.
_openers = st.lists(
    st.builds(lambda i, f: frame(WU, f, i, 0), st.sampled_from([1, 2, 3, 4, 5, 6, 7]), st.sampled_from([SYN, ACK])),
    max_size=5,
)


def _join(parts: list[list[bytes]]) -> bytes:
    return b"".join(b"".join(p) for p in parts)


def peer_streams(hostile: bool = False, max_frames: int = 25) -> st.SearchStrategy[bytes]:
    body = hostile_frame if hostile else well_formed_frame
    return st.builds(lambda a, b: _join([a, b]), _openers, st.lists(body, max_size=max_frames))


@st.composite
def chunkings(draw: Any, stream: bytes, max_cuts: int = 12) -> list[bytes]:
    """The stream cut into consecutive chunks at random places (empty chunks too)."""
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=max_cuts))
    cuts = sorted(cuts)
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


# -------------------------------------------------------------- one session


def feed(session: Any, chunks: list[bytes]) -> tuple[list[Any], bytes, str | None]:
    """Feed chunks; returns (event keys, everything queued, error message or None)."""
    events: list[Any] = []
    out = bytearray()
    error = None
    for chunk in chunks:
        try:
            evs = session.receive_data(chunk)
        except ProtocolError as exc:
            events.extend(ev_key(e) for e in exc.events)
            error = str(exc)
            break
        events.extend(ev_key(e) for e in evs)  # data copied now: views may not outlive the chunk
        out += session.data_to_send()
    out += session.data_to_send()
    return events, bytes(out), error


# ---------------------------------------------------------- pair of sessions

A, B = 0, 1

# Operation kinds, repeated to weight them: data moves often, sessions end rarely.
_KINDS = (
    ["send"] * 8
    + ["deliver"] * 8
    + ["ack"] * 5
    + ["open"] * 2
    + ["accept"] * 2
    + ["end"] * 2
    + ["reset", "ping", "tick"]
)


@st.composite
def _op(draw: Any) -> tuple[Any, ...]:
    kind = draw(st.sampled_from(_KINDS + ["go_away"] * draw(st.sampled_from([0, 0, 0, 1]))))
    side = draw(st.integers(0, 1))
    stream = st.integers(0, 50)
    if kind in ("open", "ping", "go_away"):
        return (kind, side)
    if kind in ("accept", "end", "reset"):
        return (kind, side, draw(stream))
    if kind == "send":
        size = draw(st.one_of(st.integers(0, 3000), st.sampled_from([1, 70_000, 150_000, 300_000])))
        return (kind, side, draw(stream), size)
    if kind == "ack":
        return (kind, side, draw(stream), draw(st.sampled_from([0.0, 0.3, 0.5, 1.0, 1.0])))
    if kind == "tick":
        return (kind, draw(st.sampled_from([0.001, 0.05, 0.5])))
    # deliver: all of the wire, or part of it, in chunks of these sizes
    amount = draw(st.one_of(st.just(-1), st.just(-1), st.integers(0, 300_000)))
    return (kind, side, amount, draw(st.lists(st.integers(1, 70_000), max_size=4)))


@st.composite
def pair_ops(draw: Any, max_size: int = 40) -> list[tuple[Any, ...]]:
    """A few streams opened (and mostly accepted) first, then random operations."""
    ops: list[tuple[Any, ...]] = []
    for side in (0, 1):
        for _ in range(draw(st.integers(0 if side else 1, 3))):
            ops.append(("open", side))
    ops.append(("deliver", 0, -1, []))
    ops.append(("deliver", 1, -1, []))
    for i in range(draw(st.integers(0, 6))):
        ops.append(("accept", draw(st.integers(0, 1)), i))
    ops += draw(st.lists(_op(), min_size=5, max_size=max_size))
    return ops


_PERIOD = 251  # prime: a shifted, repeated or dropped piece shows in the content
_BASE = bytes(i % _PERIOD for i in range(_PERIOD + 400_000))


def _pattern(key: tuple[int, int], start: int, n: int) -> bytes:
    """Bytes that depend on their stream and offset, so misordering shows."""
    side, sid = key
    o = (sid * 31 + side * 17 + start) % _PERIOD
    return _BASE[o : o + n]


@dataclass
class PairRun:
    sessions: list[Any]
    clock: FakeClock
    check: bool = True
    ids: list[int] = field(default_factory=list)  # every stream id ever seen, in order
    wire: list[bytearray] = field(default_factory=lambda: [bytearray(), bytearray()])
    transcript: list[Any] = field(default_factory=list)  # everything observable, for differential runs
    sent: dict[tuple[int, int], bytearray] = field(default_factory=dict)  # (sender, sid) -> bytes taken
    received: dict[tuple[int, int], bytearray] = field(default_factory=dict)  # (sender, sid) -> bytes arrived
    unacked: dict[tuple[int, int], int] = field(default_factory=dict)  # (receiver, sid) -> bytes
    reset: set[int] = field(default_factory=set)

    def sid(self, index: int) -> int:
        return self.ids[index % len(self.ids)] if self.ids else 1

    def note(self, *item: Any) -> None:
        self.transcript.append(item)

    def call(self, side: int, name: str, *args: Any, allowed: tuple[type, ...] = ()) -> Any:
        try:
            result = getattr(self.sessions[side], name)(*args)
        except allowed as exc:
            self.note(side, name, args, "raised", type(exc).__name__, str(exc))
            return exc
        self.note(side, name, args, "->", result)
        return result

    # -- operations

    def op(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "open":
            r = self.call(op[1], "open_stream", allowed=(SessionClosedError, StreamLimitError))
            if isinstance(r, int):
                self.ids.append(r)
        elif kind == "accept":
            self.call(op[1], "accept_stream", self.sid(op[2]), allowed=(StreamClosedError, ValueError))
        elif kind == "send":
            side, sid, n = op[1], self.sid(op[2]), op[3]
            key = (side, sid)
            buf = self.sent.setdefault(key, bytearray())
            payload = _pattern(key, len(buf), n)
            r = self.call(side, "send_data", sid, payload, allowed=(StreamClosedError,))
            if isinstance(r, int):
                if self.check:
                    assert 0 <= r <= n
                buf += payload[:r]
        elif kind == "ack":
            side, sid = op[1], self.sid(op[2])
            have = self.unacked.get((side, sid), 0)
            n = int(have * op[3])
            self.call(side, "acknowledge_received_data", sid, n)
            self.unacked[(side, sid)] = have - n
        elif kind == "end":
            self.call(op[1], "end_stream", self.sid(op[2]), allowed=(StreamClosedError,))
        elif kind == "reset":
            side, sid = op[1], self.sid(op[2])
            if self._exists(side, sid):
                self.reset.add(sid)
            self.call(side, "reset_stream", sid)
        elif kind == "ping":
            self.call(op[1], "ping", allowed=(StreamLimitError,))
        elif kind == "go_away":
            self.call(op[1], "go_away", 0)
        elif kind == "tick":
            self.clock.advance(op[1])
        elif kind == "deliver":
            self.deliver(op[1], op[2], op[3])
        else:  # pragma: no cover
            raise AssertionError(op)
        if self.check:
            self.check_windows()

    def deliver(self, sender: int, nbytes: int, sizes: list[int]) -> None:
        """Move what ``sender`` queued onto the wire, then hand ``nbytes`` of
        the wire (all of it for -1) to the peer in chunks of ``sizes``."""
        wire = self.wire[sender]
        out = self.sessions[sender].data_to_send()
        self.note(sender, "wrote", out)
        wire += out
        n = len(wire) if nbytes < 0 else min(nbytes, len(wire))
        data = bytes(wire[:n])
        del wire[:n]
        pos = 0
        chunks = []
        for size in sizes:
            if pos >= n:
                break
            chunks.append(data[pos : pos + size])
            pos += size
        if pos < n:
            chunks.append(data[pos:])
        receiver = 1 - sender
        for chunk in chunks:
            events = self.sessions[receiver].receive_data(chunk)
            self.note(receiver, "events", [ev_key(e) for e in events])
            for ev in events:
                name = type(ev).__name__
                if name == "DataReceived":
                    sid = ev.stream_id
                    self.received.setdefault((sender, sid), bytearray()).extend(ev.data)
                    self.unacked[(receiver, sid)] = self.unacked.get((receiver, sid), 0) + len(ev.data)
                elif name == "StreamOpened":
                    self.ids.append(ev.stream_id)
                elif name == "StreamReset":
                    self.reset.add(ev.stream_id)

    def _exists(self, side: int, sid: int) -> bool:
        try:
            self.sessions[side].send_window(sid)
        except StreamClosedError:
            return False
        return True

    def windows(self, side: int, sid: int) -> tuple[int, int] | None:
        s = self.sessions[side]
        try:
            return s.send_window(sid), s.receive_window(sid)
        except StreamClosedError:
            return None

    def check_windows(self) -> None:
        for side in (A, B):
            for sid in set(self.ids):
                w = self.windows(side, sid)
                if w is not None:
                    send, recv = w
                    assert 0 <= send <= MAX_UINT32, (side, sid, send)
                    assert 0 <= recv <= MAX_UINT32, (side, sid, recv)

    def drain(self) -> None:
        """Deliver everything both ways, acknowledging all data, until quiet."""
        for _ in range(200):
            for side in (A, B):
                for (who, sid), have in list(self.unacked.items()):
                    if who == side and have:
                        self.call(side, "acknowledge_received_data", sid, have)
                        self.unacked[(who, sid)] = 0
                self.deliver(side, -1, [])
            if not any(self.wire) and not any(s.bytes_to_send for s in self.sessions):
                if not any(self.unacked.values()):
                    return
        raise AssertionError("the pair never goes quiet")

    def check_delivery(self) -> None:
        for (sender, sid), sent in self.sent.items():
            got = bytes(self.received.get((sender, sid), b""))
            if sid in self.reset:
                assert bytes(sent).startswith(got), f"stream {sid} from side {sender}: not a prefix of what was sent"
            else:
                assert got == bytes(sent), (
                    f"stream {sid} from side {sender}: sent {len(sent)} bytes, received {len(got)}"
                )
        for (sender, sid), got in self.received.items():
            assert (sender, sid) in self.sent, f"data on stream {sid} that side {sender} never sent"

    def check_quiet_windows(self) -> None:
        """At rest, each side's send window is the other's receive window."""
        for sid in set(self.ids):
            wa, wb = self.windows(A, sid), self.windows(B, sid)
            if wa is not None and wb is not None:
                assert wa[0] == wb[1], (sid, wa, wb)
                assert wb[0] == wa[1], (sid, wa, wb)


def run_pair(engine: Any, config_a: MuxConfig, config_b: MuxConfig, ops: list[Any], check: bool = True) -> PairRun:
    clock = FakeClock()
    run = PairRun([engine.Session(True, config_a, clock=clock), engine.Session(False, config_b)], clock, check)
    for op in ops:
        run.op(op)
    run.drain()
    if check:
        run.check_windows()
        run.check_delivery()
        run.check_quiet_windows()
    return run

#!/usr/bin/env python3
"""Coverage-guided, differential fuzz target for the yamux engines' ``receive_data``.

Run it (from the repository root, in an environment where fastnat is installed
with its compiled extension, plus ``pip install atheris``) as CI does::

    fuzz/run.sh 60

(exit status non-zero on any crash, hang or memory blow-up; crashing inputs
and new corpus entries go to a temporary directory whose path it prints), or
by hand, libFuzzer flags after the script; new inputs are written into the
FIRST corpus directory, so give a scratch one before the committed seeds::

    mkdir -p /tmp/mux-corpus
    python fuzz/fuzz_mux.py /tmp/mux-corpus fuzz/corpus/mux -dict=fuzz/mux.dict -max_total_time=60 -timeout=25

Replay inputs (a crash file, or every seed) without fuzzing::

    python fuzz/fuzz_mux.py path/to/crash-file
    python fuzz/make_corpus.py --check

What one input does
-------------------
The input is read with ``atheris.FuzzedDataProvider``: the wire bytes are taken
from its front (``ConsumeBytes``) and the decisions (configuration, chunk
sizes, commands) from its back (``ConsumeIntInRange``), so mutations of the
frames and of the script do not disturb each other. ``fuzz/make_corpus.py``
writes seeds in that layout.

The same input is played twice, once with the sessions in the dialling role
(``client=True``) and once in the accepting role. In each role a session of
the pure engine (``fastnat._mux_py``, instrumented for coverage) and one of the
compiled engine (``fastnat._mux``, not instrumented: the comparison with the
instrumented twin is what steers it) receive the same chunks and the same
commands in between: accept, acknowledge, send, end, reset, open, ping,
go away, a clock step, queries on arbitrary ids, a synthetic Data frame of up
to 512 KiB (so that windows can be used up and window updates and
auto-tuning reached with small inputs), a change of how the output is drained
(``data_to_send``; ``flush``; ``flush`` to a writer that keeps a view of the
buffer; ``flush`` to a writer that raises), and calls outside the happy path
(non-contiguous or 2-D buffers, bad ping and go-away values, ids that are not
stream ids). Options chosen by the input: one of four configurations
(defaults; tiny limits; 512 KiB-2 MiB windows; 4-16 MiB windows), accepting
new streams and consuming data automatically or not, a clock (for RTT and
window auto-tuning) or none, and the type of the chunks (bytes, bytearray,
memoryview slice, memoryview of format 'c').

Crashes (any of these stops the input with an exception)
--------------------------------------------------------
* the engines differ: events (type, ids, values, data bytes), the events a
  ``ProtocolError`` carries, bytes to send, return values, state queries
  (``stream_count``, ``pending_accept_count``, ``rtt``, ``error``, go-away
  flags, windows), or exception type and message;
* ``receive_data`` raises anything but ``ProtocolError``; a command raises
  anything but fastnat's ``MuxError`` family or a ``ValueError`` where the API
  documents one (acknowledging more than was received, bad ping/go-away values);
* an invariant breaks: a window below 0 or above its bound
  (``receive_window + unacknowledged <= max_stream_window``,
  ``send_window <= 2**32-1``), more streams or pending accepts than configured,
  a stream the application never heard of, a stream left over after every
  stream was reset, queued output that grows faster than the input (at most
  one 12-byte frame per frame received), a protocol error without a queued
  Go Away(protocol error), a failed session that accepts more input, a
  partial frame buffered beyond the granted window (pure engine's internals),
  flushed output overwritten while a writer still holds a view of it, output
  lost when the writer raises;
* a hang or runaway memory: libFuzzer's ``-timeout`` and ``-rss_limit_mb``.
"""

from __future__ import annotations

import array
import pickle
import sys

import atheris

with atheris.instrument_imports(include=["fastnat"]):
    import fastnat.errors
    import fastnat.events
    import fastnat.frames
    import fastnat.mux_config
    from fastnat import _mux_py

try:
    from fastnat import _mux as _compiled
except ImportError as exc:  # pragma: no cover - a build without the extension
    sys.exit(f"fuzz_mux: the compiled engine fastnat._mux cannot be imported ({exc}); the target is differential")

MuxConfig = fastnat.mux_config.MuxConfig
MuxError = fastnat.errors.MuxError
ProtocolError = fastnat.errors.ProtocolError
HEADER = fastnat.frames.HEADER
MAX_U32 = fastnat.frames.MAX_UINT32
INITIAL = fastnat.frames.INITIAL_STREAM_WINDOW

# --------------------------------------------------------------------- grammar
# Shared with fuzz/make_corpus.py, which writes seeds in this layout.

CONFIGS = (
    MuxConfig(),
    # Tiny limits: refusal beyond the backlog, max_streams, many small frames, ping cap.
    MuxConfig(accept_backlog=2, max_streams=4, max_frame_size=16, max_outstanding_pings=2),
    # Windows advertised on SYN/ACK and room to auto-tune.
    MuxConfig(initial_stream_window=512 * 1024, max_stream_window=2 * 1024 * 1024, max_frame_size=1000),
    MuxConfig(initial_stream_window=4 * 1024 * 1024, max_stream_window=16 * 1024 * 1024, accept_backlog=8, max_streams=16),
)

# Bits of the first decision.
OPT_CONFIG_MASK = 0x03
OPT_AUTO_ACCEPT = 0x04
OPT_AUTO_ACK = 0x08
OPT_CLOCK = 0x10
OPT_CHUNK_TYPE_SHIFT = 5  # 2 bits: bytes, bytearray, memoryview slice, memoryview cast to 'c'
OPT_FLUSH = 0x80  # drain the output with flush() rather than data_to_send()

# Chunk size kinds.
SIZE_TINY, SIZE_SMALL, SIZE_LARGE, SIZE_REST = range(4)
SIZE_RANGES = {SIZE_TINY: (1, 16), SIZE_SMALL: (1, 512), SIZE_LARGE: (1, 70_000)}

MAX_COMMANDS = 3  # commands after each chunk

(
    OP_ACCEPT,
    OP_ACK,
    OP_SEND,
    OP_END,
    OP_RESET,
    OP_OPEN,
    OP_PING,
    OP_GO_AWAY,
    OP_CLOCK,
    OP_QUERY,
    OP_SYNTH,
    OP_FLUSH,
    OP_MISUSE,
) = range(13)
N_OPS = 13

# Argument ranges.
IDX_RANGE = (0, 255)  # index into the stream ids seen so far
ACK_MODE_RANGE = (0, 3)  # all, half, one byte, one more than received
SEND_RANGE = (0, 1 << 18)
GO_AWAY_RANGE = (0, 2)
CLOCK_MS_RANGE = (0, 255)
QUERY_RANGE = (0, 65535)
SYNTH_LEN_RANGE = (0, 1 << 19)
SYNTH_FLAGS_RANGE = (0, 15)
SYNTH_PIECES_RANGE = (1, 4)
PREOPEN_RANGE = (0, 3)
PREPING_RANGE = (0, 2)
# How the output is drained from then on: data_to_send(); flush(); flush() to
# a writer that keeps a slice of the view and an export of it (the engine must
# then leave that memory alone); flush() to a writer that raises (the frames
# must stay queued); both at once.
DRAIN_DATA_TO_SEND, DRAIN_FLUSH, DRAIN_FLUSH_HOLD, DRAIN_FLUSH_RAISE, DRAIN_FLUSH_HOLD_RAISE = range(5)
DRAIN_RANGE = (0, 4)
MISUSE_RANGE = (0, 13)  # which API misuse, see misuse()
OPAQUE_RANGE = (0, 3)

_ZEROS = bytes(1 << 19)
# Two answers to pings never sent: ignored, unless they complete a partial frame.
_STRAY_PING_ACKS = HEADER.pack(0, 2, 2, 0, 0xFFFFFF00) * 2
_PATTERN = bytes(range(256)) * ((1 << 18) // 256 + 1)


class _WriteFailed(Exception):
    """Raised by a writer that fails, to test that flush keeps the output."""


class Divergence(AssertionError):
    """The two engines disagreed."""


class InvariantError(AssertionError):
    """An engine broke one of its documented guarantees."""


# --------------------------------------------------------------------- helpers


def _norm_events(events):
    """Events as plain tuples, with the data copied out (it may be a view of a
    buffer the engine reuses on its next call)."""
    out = []
    for ev in events:
        cls = type(ev)
        if getattr(fastnat.events, cls.__name__, None) is not cls:
            raise InvariantError(f"event of unexpected class {cls!r}")
        fields = []
        for f in ev._fields:
            value = getattr(ev, f)
            if f == "data":
                if type(value) is not memoryview:
                    raise InvariantError(f"DataReceived.data is a {type(value).__name__}, not a memoryview")
                value = bytes(value)
            fields.append(value)
        out.append((cls.__name__, *fields))
    return out


class _Clock:
    """A clock both engines read; only the script moves it."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Twin:
    """The same session in both engines, driven in lock step."""

    def __init__(self, client: bool, config: MuxConfig, clock: _Clock | None) -> None:
        self.client = client
        self.config = config
        self.pure = _mux_py.Session(client, config, clock=clock)
        self.comp = _compiled.Session(client, config, clock=clock)
        self.known: list[int] = []  # every stream id the application heard of, in order
        self._known_set: set[int] = set()
        self.unacked: dict[int, int] = {}
        self.touched: set[int] = set()
        self.dead = False
        self.drain_mode = DRAIN_DATA_TO_SEND
        # Views a writer kept of flushed output, with what they showed then.
        self.held: list[tuple[memoryview | pickle.PickleBuffer, bytes]] = []

    # -- model
    def learn(self, stream_id: int) -> None:
        if stream_id not in self._known_set:
            self._known_set.add(stream_id)
            self.known.append(stream_id)
        self.touched.add(stream_id)

    def pick(self, idx: int) -> int:
        if not self.known:
            return 1 if not self.client else 2
        return self.known[idx % len(self.known)]

    def next_peer_id(self) -> int:
        sid = 2 if self.client else 1
        while sid in self._known_set:
            sid += 2
        return sid

    # -- lock-step calls
    def call(self, name: str, *args, allowed=(MuxError,)):
        results = []
        for s in (self.pure, self.comp):
            try:
                results.append(("ok", getattr(s, name)(*args)))
            except allowed as e:
                results.append(("raise", type(e).__name__, str(e)))
        if results[0] != results[1]:
            raise Divergence(f"{name}{args!r}: pure engine -> {results[0]!r}, compiled engine -> {results[1]!r}")
        if results[0][0] == "raise" and results[0][1] == "ProtocolError":
            self.dead = True
        return results[0]

    def receive(self, chunk) -> list:
        leftover = self.pure.bytes_to_send
        results = []
        for s in (self.pure, self.comp):
            try:
                events = s.receive_data(chunk)
            except ProtocolError as e:
                results.append(("ProtocolError", str(e), _norm_events(e.events)))
            else:
                results.append(("ok", _norm_events(events)))
        if results[0] != results[1]:
            raise Divergence(
                f"receive_data({len(chunk)} bytes): pure engine -> {_short(results[0])}, compiled engine -> {_short(results[1])}"
            )
        nbytes = memoryview(chunk).nbytes
        out = self.drain()
        if not out and self.pure.bytes_to_send:
            out = self.drain()  # the write failed on purpose: the next one works
        # No amplification: at most one 12-byte frame (ping reply, RST, Go Away)
        # per frame received, and a chunk completes at most len//12 + 1 headers.
        # (Output left queued by a failed write goes out first.)
        if len(out) - leftover > 12 * (nbytes // 12 + 2):
            raise InvariantError(f"{len(out)} bytes queued in answer to a {nbytes}-byte chunk")
        result = results[0]
        events = result[-1]
        self.absorb(events)
        if result[0] == "ProtocolError":
            self.dead = True
            if out[-12:] != HEADER.pack(0, 3, 0, 0, 1):
                raise InvariantError(f"a protocol error did not queue Go Away(protocol error): {out[-12:].hex()}")
        return events

    def absorb(self, events) -> None:
        for ev in events:
            kind = ev[0]
            if kind in ("PingReceived", "PingAcknowledged", "GoAwayReceived"):
                continue
            sid = ev[1]
            if kind == "StreamOpened":
                self.learn(sid)
                self.unacked[sid] = 0
            elif kind == "DataReceived":
                if sid not in self._known_set:
                    raise InvariantError(f"data on stream {sid}, which the application never heard of")
                self.unacked[sid] = self.unacked.get(sid, 0) + len(ev[2])
                self.touched.add(sid)
            else:
                if sid not in self._known_set:
                    raise InvariantError(f"{kind} on stream {sid}, which the application never heard of")
                self.touched.add(sid)

    def drain(self) -> bytes:
        """Take the queued output of both engines, the way ``drain_mode`` says;
        returns it (the same for both), or b"" after a write that failed on
        purpose, which leaves it queued for the next drain."""
        mode = self.drain_mode
        hold = mode in (DRAIN_FLUSH_HOLD, DRAIN_FLUSH_HOLD_RAISE)
        fail = mode in (DRAIN_FLUSH_RAISE, DRAIN_FLUSH_HOLD_RAISE)
        outs = []
        for s in (self.pure, self.comp):
            queued = s.bytes_to_send
            if mode == DRAIN_DATA_TO_SEND or queued == 0:
                data = s.data_to_send()
                if type(data) is not bytes:
                    raise InvariantError(f"data_to_send returned a {type(data).__name__}")
                outs.append(data)
                continue
            parts = []
            held = []

            def write(view):
                if type(view) is not memoryview or view.nbytes != queued:
                    raise InvariantError(f"flush wrote {view!r} with {queued} bytes queued")
                parts.append(bytes(view))
                if hold:
                    held.append(view[1:])  # a slice: shares the engine's buffer
                    held.append(pickle.PickleBuffer(view))  # an export of the view itself
                if fail:
                    raise _WriteFailed

            try:
                n = s.flush(write)
            except _WriteFailed:
                n = None
            if len(parts) != 1:
                raise InvariantError(f"flush wrote {len(parts)} times with {queued} bytes queued")
            for obj in held:
                self.held.append((obj, parts[0][1:] if type(obj) is memoryview else parts[0]))
            if fail:
                if n is not None:
                    raise InvariantError("flush swallowed the writer's exception")
                if s.bytes_to_send != queued:
                    raise InvariantError(f"a failed write lost output: {queued} bytes queued before, {s.bytes_to_send} after")
                outs.append(parts[0])  # still queued
                continue
            if n != queued or s.bytes_to_send != 0:
                raise InvariantError(f"flush returned {n} with {queued} bytes queued, {s.bytes_to_send} left")
            outs.append(parts[0])
        if outs[0] != outs[1]:
            raise Divergence(f"bytes to send differ: pure {outs[0][:96].hex()}..., compiled {outs[1][:96].hex()}...")
        if len(self.held) > 8:
            self.check_held()
            for obj, _ in self.held[:-4]:
                obj.release()
            del self.held[:-4]
        if fail and outs[0]:
            # Fail once: the frames stay queued, more are appended to them, and
            # the next drain (a working flush) must deliver them all.
            self.drain_mode = DRAIN_FLUSH_HOLD if hold else DRAIN_FLUSH
            return b""
        return outs[0]

    def check_held(self) -> None:
        for obj, data in self.held:
            with memoryview(obj) as view:
                if view.tobytes() != data:
                    raise InvariantError("the engine overwrote output that a writer still holds a view of")

    # -- checks
    def compare_state(self) -> None:
        for attr in ("client", "stream_count", "pending_accept_count", "rtt", "bytes_to_send",
                     "go_away_sent", "go_away_received", "error"):
            a, b = getattr(self.pure, attr), getattr(self.comp, attr)
            if a != b or (a is None) != (b is None):
                raise Divergence(f"{attr}: pure {a!r}, compiled {b!r}")
        cfg = self.config
        count = self.pure.stream_count
        if count > cfg.max_streams:
            raise InvariantError(f"{count} streams tracked, max_streams is {cfg.max_streams}")
        if not 0 <= self.pure.pending_accept_count <= min(cfg.accept_backlog, count):
            raise InvariantError(f"pending_accept_count {self.pure.pending_accept_count} ({count} streams)")
        if len(self.pure._header) >= 12:
            raise InvariantError(f"{len(self.pure._header)}-byte partial header kept")
        buf = self.pure._payload_buf
        if buf is not None and len(buf) > cfg.max_stream_window:
            raise InvariantError(f"reassembly buffer of {len(buf)} bytes, beyond max_stream_window")
        if len(self.pure._pings) > cfg.max_outstanding_pings:
            raise InvariantError(f"{len(self.pure._pings)} pings outstanding")

    def check_streams(self, ids) -> int:
        """Windows of the given streams, in both engines; returns how many exist."""
        alive = 0
        for sid in ids:
            sw = self.call("send_window", sid)
            rw = self.call("receive_window", sid)
            if (sw[0] == "ok") != (rw[0] == "ok"):
                raise InvariantError(f"stream {sid}: send_window -> {sw}, receive_window -> {rw}")
            if sw[0] != "ok":
                continue
            alive += 1
            send, recv = sw[1], rw[1]
            if not 0 <= send <= MAX_U32:
                raise InvariantError(f"stream {sid}: send window {send}")
            if recv < 0 or recv + self.unacked.get(sid, 0) > self.config.max_stream_window:
                raise InvariantError(
                    f"stream {sid}: receive window {recv} + {self.unacked.get(sid, 0)} unacknowledged"
                    f" > max_stream_window {self.config.max_stream_window}"
                )
        return alive

    def step_checks(self) -> None:
        self.compare_state()
        self.check_held()
        if self.touched:
            self.check_streams(sorted(self.touched))
            self.touched.clear()

    def final_checks(self) -> None:
        self.check_held()
        if self.dead:
            return
        self.compare_state()
        alive = self.check_streams(self.known)
        if alive != self.pure.stream_count:
            raise InvariantError(f"{self.pure.stream_count} streams tracked, the application knows of {alive}")
        # Resetting everything must leave nothing behind.
        for sid in self.known:
            self.call("reset_stream", sid)
        self.drain()
        if self.pure.stream_count or self.pure.pending_accept_count:
            raise InvariantError(
                f"after resetting every stream: {self.pure.stream_count} streams, "
                f"{self.pure.pending_accept_count} pending accepts"
            )
        self.compare_state()


def _short(result) -> str:
    text = repr(result)
    return text if len(text) < 600 else text[:600] + "..."


def _as_chunk(data: bytes, kind: int):
    if kind == 0:
        return data
    if kind == 1:
        return bytearray(data)
    if kind == 2:
        return memoryview(b"\xee\xee" + data + b"\xee")[2 : 2 + len(data)]
    return memoryview(bytearray(data)).cast("c")


# ------------------------------------------------------------------------ play


def play(data: bytes, client: bool, trace: list | None = None) -> Twin:
    """Play one input in one role; raises on any crash. Returns the twin."""
    fdp = atheris.FuzzedDataProvider(data)
    opts = fdp.ConsumeIntInRange(0, 255)
    config = CONFIGS[opts & OPT_CONFIG_MASK]
    auto_accept = bool(opts & OPT_AUTO_ACCEPT)
    auto_ack = bool(opts & OPT_AUTO_ACK)
    clock = _Clock() if opts & OPT_CLOCK else None
    chunk_kind = (opts >> OPT_CHUNK_TYPE_SHIFT) & 3
    twin = Twin(client, config, clock)
    if opts & OPT_FLUSH:
        twin.drain_mode = DRAIN_FLUSH

    for _ in range(fdp.ConsumeIntInRange(*PREOPEN_RANGE)):
        r = twin.call("open_stream")
        if r[0] == "ok":
            twin.learn(r[1])
            twin.unacked[r[1]] = 0
    for _ in range(fdp.ConsumeIntInRange(*PREPING_RANGE)):
        twin.call("ping")
    twin.drain()

    while fdp.remaining_bytes() and not twin.dead:
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == SIZE_REST:
            size = fdp.remaining_bytes()
        else:
            size = fdp.ConsumeIntInRange(*SIZE_RANGES[kind])
        chunk = fdp.ConsumeBytes(size)
        events = twin.receive(_as_chunk(chunk, chunk_kind))
        if trace is not None:
            trace.extend(events)
        if twin.dead:
            break
        # What an application would do with the events: accept new streams,
        # consume the data. Data delivered on an id that was then reset or
        # opened afresh within the same chunk belongs to a stream that is gone.
        to_ack: dict[int, int] = {}
        for ev in events:
            if ev[0] == "StreamOpened":
                to_ack.pop(ev[1], None)
                if auto_accept:
                    twin.call("accept_stream", ev[1])
            elif ev[0] == "StreamReset":
                to_ack.pop(ev[1], None)
            elif ev[0] == "DataReceived" and auto_ack and ev[2]:
                to_ack[ev[1]] = to_ack.get(ev[1], 0) + len(ev[2])
        for sid, n in to_ack.items():
            _ack(twin, sid, n)
        twin.drain()
        twin.step_checks()
        for _ in range(fdp.ConsumeIntInRange(0, MAX_COMMANDS)):
            if twin.dead:
                break
            command(twin, fdp, clock, trace)
            twin.step_checks()

    if twin.dead:
        # Every later call fails the same way, in both engines.
        r = twin.call("receive_data", b"", allowed=(ProtocolError,))
        if r[0] != "raise":
            raise InvariantError("a failed session accepted more data")
        twin.call("open_stream", allowed=(ProtocolError,))
        twin.drain()
    twin.final_checks()
    return twin


def _ack(twin: Twin, sid: int, n: int) -> None:
    r = twin.call("acknowledge_received_data", sid, n, allowed=(MuxError, ValueError))
    if r[0] != "ok":
        raise InvariantError(f"acknowledging {n} received bytes on stream {sid}: {r}")
    twin.unacked[sid] = twin.unacked.get(sid, 0) - n
    twin.touched.add(sid)


def command(twin: Twin, fdp, clock: _Clock | None, trace: list | None) -> None:
    op = fdp.ConsumeIntInRange(0, N_OPS - 1)
    if op == OP_ACCEPT:
        sid = twin.pick(fdp.ConsumeIntInRange(*IDX_RANGE))
        twin.call("accept_stream", sid, allowed=(MuxError, ValueError))
        twin.touched.add(sid)
    elif op == OP_ACK:
        sid = twin.pick(fdp.ConsumeIntInRange(*IDX_RANGE))
        mode = fdp.ConsumeIntInRange(*ACK_MODE_RANGE)
        have = twin.unacked.get(sid, 0)
        exists = twin.call("send_window", sid)[0] == "ok"
        if mode == 3:
            r = twin.call("acknowledge_received_data", sid, have + 1, allowed=(MuxError, ValueError))
            if exists and r[0] == "ok":
                raise InvariantError(f"stream {sid}: acknowledging {have + 1} bytes of {have} received was accepted")
        elif exists:
            n = have if mode == 0 else have // 2 if mode == 1 else min(have, 1)
            _ack(twin, sid, n)
        twin.touched.add(sid)
    elif op == OP_SEND:
        sid = twin.pick(fdp.ConsumeIntInRange(*IDX_RANGE))
        n = fdp.ConsumeIntInRange(*SEND_RANGE)
        before = twin.call("send_window", sid)
        r = twin.call("send_data", sid, _PATTERN[:n])
        if r[0] == "ok" and before[0] == "ok" and r[1] != min(n, before[1]):
            raise InvariantError(f"send_data took {r[1]} of {n} bytes with a send window of {before[1]}")
        twin.touched.add(sid)
    elif op == OP_END:
        sid = twin.pick(fdp.ConsumeIntInRange(*IDX_RANGE))
        twin.call("end_stream", sid)
        twin.touched.add(sid)
    elif op == OP_RESET:
        sid = twin.pick(fdp.ConsumeIntInRange(*IDX_RANGE))
        twin.call("reset_stream", sid)
        twin.touched.add(sid)
    elif op == OP_OPEN:
        r = twin.call("open_stream")
        if r[0] == "ok":
            twin.learn(r[1])
            twin.unacked[r[1]] = 0
    elif op == OP_PING:
        twin.call("ping", allowed=(MuxError, ValueError))
    elif op == OP_GO_AWAY:
        twin.call("go_away", fdp.ConsumeIntInRange(*GO_AWAY_RANGE))
    elif op == OP_CLOCK:
        ms = fdp.ConsumeIntInRange(*CLOCK_MS_RANGE)
        if clock is not None:
            clock.now += ms / 1000.0
    elif op == OP_QUERY:
        sid = fdp.ConsumeIntInRange(*QUERY_RANGE)
        if twin.check_streams([sid]) and sid not in twin._known_set:
            raise InvariantError(f"stream {sid} exists, but the application never heard of it")
    elif op == OP_SYNTH:
        idx = fdp.ConsumeIntInRange(*IDX_RANGE)
        length = fdp.ConsumeIntInRange(*SYNTH_LEN_RANGE)
        flags = fdp.ConsumeIntInRange(*SYNTH_FLAGS_RANGE)
        pieces = fdp.ConsumeIntInRange(*SYNTH_PIECES_RANGE)
        sid = twin.next_peer_id() if idx % (len(twin.known) + 1) == len(twin.known) else twin.pick(idx)
        frame = HEADER.pack(0, 0, flags, sid, length) + _ZEROS[:length]
        step = -(-len(frame) // pieces)
        for pos in range(0, len(frame), step):
            events = twin.receive(frame[pos : pos + step])
            if trace is not None:
                trace.extend(events)
            if twin.dead:
                return
    elif op == OP_FLUSH:
        twin.drain_mode = fdp.ConsumeIntInRange(*DRAIN_RANGE)
    elif op == OP_MISUSE:
        misuse(twin, fdp)
    twin.drain()


def misuse(twin: Twin, fdp) -> None:
    """Calls outside the happy path: both engines must refuse (or accept) them alike."""
    case = fdp.ConsumeIntInRange(*MISUSE_RANGE)
    sid = twin.pick(fdp.ConsumeIntInRange(*IDX_RANGE))
    bad = (MuxError, ValueError, TypeError)
    if case == 0:
        twin.call("receive_data", memoryview(b"\0" * 24)[::2], allowed=bad)
    elif case == 1:
        twin.receive(bytearray(_STRAY_PING_ACKS[:12]))
    elif case == 2:
        twin.call("send_data", sid, memoryview(_PATTERN[:64])[::2], allowed=bad)
    elif case == 3:
        twin.call("send_data", sid, array.array("H", _PATTERN[:64]), allowed=bad)
    elif case == 4:
        twin.call("send_data", sid, memoryview(_PATTERN[:64]).cast("B", (8, 8)), allowed=bad)
    elif case == 5:
        twin.call("acknowledge_received_data", sid, -1, allowed=bad)
    elif case == 6:
        twin.call("ping", fdp.ConsumeIntInRange(*OPAQUE_RANGE), allowed=bad)
    elif case == 7:
        twin.call("ping", (-1, MAX_U32 + 1, MAX_U32)[fdp.ConsumeIntInRange(0, 2)], allowed=bad)
    elif case == 8:
        twin.call("go_away", (-1, MAX_U32 + 1, MAX_U32)[fdp.ConsumeIntInRange(0, 2)], allowed=bad)
    elif case == 9:
        # Ids that are not stream ids (see fuzz/crashes-found/api_differences.py).
        for other in (str(sid), float(sid), [sid], None, sid + (1 << 40), -sid, 0):
            twin.call("send_window", other, allowed=bad)
            twin.call("acknowledge_received_data", other, 0, allowed=bad)
            twin.call("send_data", other, b"x", allowed=bad)
            twin.call("end_stream", other, allowed=bad)
            twin.call("reset_stream", other, allowed=bad)
    elif case == 10:
        twin.call("accept_stream", sid, allowed=bad)
        twin.call("send_data", sid, b"", allowed=bad)
    elif case == 11:
        twin.receive(memoryview(_STRAY_PING_ACKS).cast("B", (2, 12)))  # 2-D, C-contiguous
    elif case == 12:
        twin.call("send_data", sid, "text", allowed=bad)
        twin.call("send_data", sid, 12, allowed=bad)
    elif case == 13:
        twin.call("receive_data", "text", allowed=bad)
        twin.call("receive_data", None, allowed=bad)
    twin.touched.add(sid)


def TestOneInput(data: bytes) -> None:
    play(data, True)
    play(data, False)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

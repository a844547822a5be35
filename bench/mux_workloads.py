"""Multiplexer workloads shared by ``bench/test_mux_engine.py`` (pytest-benchmark)
and ``bench/report_mux.py`` (one-process comparison table).

Three implementations do the same work:

* ``compiled``: ``fastnat._mux.Session`` (the Cython engine);
* ``python``: ``fastnat._mux_py.Session`` (its pure-Python twin);
* ``h2``: ``h2.connection.H2Connection``, the reference Python multiplexer,
  carrying the same payloads in HTTP/2 DATA frames on open streams.

Four workloads, each one round of work on a fresh, fully set-up connection
(the setup is not timed):

* ``decode_bulk``: ``receive_data`` of 16 MiB in 64 KiB Data frames on one
  stream, fed in 256 KiB reads (so about one frame in four straddles two reads,
  as it would from a socket);
* ``decode_small``: ``receive_data`` of 20,000 Data frames of 64 bytes spread
  round-robin over 100 streams, fed in reads of about 1,000 frames each
  (1,000.5 frames' worth of bytes, so reads end mid-frame);
* ``encode_bulk``: ``send_data`` of 16 MiB in 64 KiB pieces on one stream,
  ``data_to_send`` after every 4 pieces (one 256 KiB write);
* ``encode_small``: ``send_data`` of 20,000 pieces of 64 bytes over 100 streams,
  ``data_to_send`` after every 1,000.

Fairness: every implementation gets the same payload bytes, the same number
of frames, the same reads or writes per round; flow control never blocks
(yamux windows of 1 GiB / 2^32-1; h2's stream and connection windows raised
to 2^31-1 and its maximum frame size to 64 KiB, so a 64 KiB piece is one
frame for everyone); the timed part is a loop inside a function, calling
only the implementation; the first round is a warm-up.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from fastnat import _mux_py
from fastnat.frames import HEADER, MAX_UINT32
from fastnat.mux_config import MuxConfig

try:
    from fastnat import _mux as _compiled
except ImportError:  # pragma: no cover - a pure-Python install
    _compiled = None

try:
    import h2.config
    import h2.connection
    import h2.events
    from h2.settings import SettingCodes
except ImportError:  # pragma: no cover
    h2 = None

IMPLEMENTATIONS = ("compiled", "python", "h2")
WORKLOADS = ("decode_bulk", "decode_small", "encode_bulk", "encode_small")

BULK_FRAME = 64 * 1024
BULK_TOTAL = 16 * 1024 * 1024
BULK_READ = 256 * 1024
BULK_FRAMES_PER_WRITE = 4
SMALL_FRAME = 64
SMALL_STREAMS = 100
SMALL_FRAMES = 20_000
SMALL_FRAMES_PER_CALL = 1_000

# The payload every implementation carries (not compressible, not all zeros).
_PAYLOAD = os.urandom(BULK_FRAME)
_SMALL_PAYLOADS = [_PAYLOAD[i * SMALL_FRAME : (i + 1) * SMALL_FRAME] for i in range(SMALL_STREAMS)]

# yamux: windows large enough that a round never waits for a window update.
_YAMUX_CONFIG = MuxConfig(initial_stream_window=1 << 30, max_stream_window=1 << 30)
# h2: the largest windows and a 64 KiB frame size, so one 64 KiB piece is one frame.
_H2_WINDOW = 2**31 - 1
_H2_HEADERS = [(":method", "POST"), (":path", "/bench"), (":scheme", "http"), (":authority", "bench")]


def available(impl: str) -> str | None:
    """None if ``impl`` can run here, else why not."""
    if impl == "compiled" and _compiled is None:
        return "the compiled engine fastnat._mux is not built"
    if impl == "h2" and h2 is None:
        return "h2 is not installed"
    if impl not in IMPLEMENTATIONS:
        return f"unknown implementation {impl!r}"
    return None


def _engine(impl: str):
    return _compiled if impl == "compiled" else _mux_py


@dataclasses.dataclass
class Workload:
    """One round of one workload for one implementation."""

    name: str
    impl: str
    payload_bytes: int  # application bytes carried per round
    frames: int  # Data frames per round
    calls: int  # receive_data calls (decode) or data_to_send writes (encode) per round
    setup: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]  # pytest-benchmark pedantic shape
    run: Callable[..., Any]  # the timed function
    verify: Callable[[], None]  # one untimed round that checks the result

    def rates(self, seconds: float) -> dict[str, float]:
        return {
            "MB/s": self.payload_bytes / seconds / 1e6,
            "frames/s": self.frames / seconds,
        }


# ------------------------------------------------------------------- wire helpers


def _chunks(wire: bytes, size: int) -> list[bytes]:
    return [wire[i : i + size] for i in range(0, len(wire), size)]


def _yamux_data_wire(pieces: list[tuple[int, bytes]]) -> bytes:
    pack = HEADER.pack
    return b"".join(pack(0, 0, 0, sid, len(p)) + p for sid, p in pieces)


def _h2_pump(a, b) -> None:
    while True:
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return
        if out_a:
            b.receive_data(out_a)
        if out_b:
            a.receive_data(out_b)


def _h2_pair(nstreams: int):
    """A connected h2 client and server, settings exchanged, windows raised,
    ``nstreams`` client streams open (headers sent, not ended)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    for conn in (client, server):
        conn.initiate_connection()
        conn.update_settings(
            {
                SettingCodes.INITIAL_WINDOW_SIZE: _H2_WINDOW,
                SettingCodes.MAX_FRAME_SIZE: BULK_FRAME,
                SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
            }
        )
        conn.increment_flow_control_window(_H2_WINDOW - 65535)
    _h2_pump(client, server)
    for i in range(nstreams):
        client.send_headers(1 + 2 * i, _H2_HEADERS)
    _h2_pump(client, server)
    return client, server


def _yamux_receiver(impl: str, nstreams: int):
    """An accepting-side session with ``nstreams`` peer streams (1, 3, ...) accepted."""
    session = _engine(impl).Session(False, _YAMUX_CONFIG)
    session.receive_data(b"".join(HEADER.pack(0, 1, 1, 1 + 2 * i, 0) for i in range(nstreams)))
    for i in range(nstreams):
        session.accept_stream(1 + 2 * i)
    session.data_to_send()
    return session


def _yamux_sender(impl: str, nstreams: int):
    """A dialling-side session with ``nstreams`` streams open and accepted by
    the peer, each with a send window of 2^32-1."""
    session = _engine(impl).Session(True, _YAMUX_CONFIG)
    ids = [session.open_stream() for _ in range(nstreams)]
    session.data_to_send()
    session.receive_data(b"".join(HEADER.pack(0, 1, 2, sid, MAX_UINT32 - 256 * 1024) for sid in ids))
    assert all(session.send_window(sid) == MAX_UINT32 for sid in ids)
    return session, ids


# ----------------------------------------------------------------------- decode


def _decode(name: str, impl: str, pieces: list[tuple[int, bytes]], nstreams: int, read_size: Callable[[int], int]) -> Workload:
    payload_bytes = sum(len(p) for _, p in pieces)
    if impl == "h2":
        template, _ = _h2_pair(nstreams)
        for sid, p in pieces:
            template.send_data(sid, p)
        wire = template.data_to_send()
        assert len(wire) == payload_bytes + 9 * len(pieces)
        frame_overhead = 9

        def make():
            return _h2_pair(nstreams)[1]

        def count(receiver, chunks):
            got = 0
            for chunk in chunks:
                for ev in receiver.receive_data(chunk):
                    if isinstance(ev, h2.events.DataReceived):
                        got += len(ev.data)
            return got

    else:
        wire = _yamux_data_wire(pieces)
        frame_overhead = 12

        def make():
            return _yamux_receiver(impl, nstreams)

        def count(receiver, chunks):
            got = 0
            for chunk in chunks:
                for ev in receiver.receive_data(chunk):
                    got += len(ev.data)
            return got

    chunks = _chunks(wire, read_size(len(pieces[0][1]) + frame_overhead))

    def setup():
        return (make(), chunks), {}

    def run(receiver, chunks):
        receive = receiver.receive_data
        for chunk in chunks:
            receive(chunk)

    def verify():
        receiver = make()
        got = count(receiver, chunks)
        assert got == payload_bytes, (impl, name, got, payload_bytes)

    return Workload(name, impl, payload_bytes, len(pieces), len(chunks), setup, run, verify)


def decode_bulk(impl: str) -> Workload:
    pieces = [(1, _PAYLOAD)] * (BULK_TOTAL // BULK_FRAME)
    return _decode("decode_bulk", impl, pieces, 1, lambda frame_len: BULK_READ)


def decode_small(impl: str) -> Workload:
    pieces = [(1 + 2 * (i % SMALL_STREAMS), _SMALL_PAYLOADS[i % SMALL_STREAMS]) for i in range(SMALL_FRAMES)]
    # About SMALL_FRAMES_PER_CALL frames per read, ending mid-frame.
    return _decode("decode_small", impl, pieces, SMALL_STREAMS,
                   lambda frame_len: SMALL_FRAMES_PER_CALL * frame_len + frame_len // 2)


# ----------------------------------------------------------------------- encode


def _encode(name: str, impl: str, pieces: list[tuple[int, bytes]], nstreams: int, per_write: int) -> Workload:
    payload_bytes = sum(len(p) for _, p in pieces)
    # Stream ids are 1, 3, 5, ... for every implementation (yamux dialling side, h2 client).
    batches = [pieces[i : i + per_write] for i in range(0, len(pieces), per_write)]

    if impl == "h2":

        def make():
            return _h2_pair(nstreams)[0]

        overhead = 9
    else:

        def make():
            session, ids = _yamux_sender(impl, nstreams)
            assert ids == [1 + 2 * i for i in range(nstreams)]
            return session

        overhead = 12

    def setup():
        return (make(), batches), {}

    def run(sender, batches):
        send = sender.send_data
        flush = sender.data_to_send
        for batch in batches:
            for sid, p in batch:
                send(sid, p)
            flush()

    def verify():
        sender = make()
        total = 0
        for batch in batches:
            for sid, p in batch:
                taken = sender.send_data(sid, p)
                assert taken in (None, len(p)), (impl, taken)  # h2 returns None
            total += len(sender.data_to_send())
        assert total == payload_bytes + overhead * len(pieces), (impl, name, total)

    return Workload(name, impl, payload_bytes, len(pieces), len(batches), setup, run, verify)


def encode_bulk(impl: str) -> Workload:
    pieces = [(1, _PAYLOAD)] * (BULK_TOTAL // BULK_FRAME)
    return _encode("encode_bulk", impl, pieces, 1, BULK_FRAMES_PER_WRITE)


def encode_small(impl: str) -> Workload:
    pieces = [(1 + 2 * (i % SMALL_STREAMS), _SMALL_PAYLOADS[i % SMALL_STREAMS]) for i in range(SMALL_FRAMES)]
    return _encode("encode_small", impl, pieces, SMALL_STREAMS, SMALL_FRAMES_PER_CALL)


# Throughput of the benchmarks run in this process, for bench/conftest.py's summary.
RESULTS: list[tuple[str, str, dict[str, float]]] = []

FACTORIES: dict[str, Callable[[str], Workload]] = {
    "decode_bulk": decode_bulk,
    "decode_small": decode_small,
    "encode_bulk": encode_bulk,
    "encode_small": encode_small,
}

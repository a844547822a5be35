"""The engine allocates for a partial frame only what has arrived of it."""

from __future__ import annotations

import tracemalloc

from fastnat.frames import FrameType, encode_frame
from fastnat.mux_config import MuxConfig

WINDOW = 16 * 1024 * 1024


def test_a_header_does_not_allocate_the_announced_payload(engine):
    config = MuxConfig(initial_stream_window=WINDOW, max_stream_window=WINDOW)
    server = engine.Session(False, config)
    server.receive_data(encode_frame(FrameType.WINDOW_UPDATE, 0x1, 1, 0))  # the peer opens stream 1
    server.accept_stream(1)  # grants the peer a 16 MiB window
    server.data_to_send()
    header = encode_frame(FrameType.DATA, 0, 1, WINDOW)  # announces 16 MiB, sends 12 bytes
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        server.receive_data(header + b"x" * 1000)
        grown = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert grown < 256 * 1024, f"{grown} bytes allocated for a frame of which 1,000 bytes arrived"
    # and the frame still completes correctly as the rest arrives
    events = []
    rest = WINDOW - 1000
    chunk = b"y" * (1 << 20)
    while rest:
        piece = chunk[: min(rest, len(chunk))]
        events += server.receive_data(piece)
        rest -= len(piece)
    assert len(events) == 1
    data = events[0].data
    assert len(data) == WINDOW and bytes(data[:1000]) == b"x" * 1000 and bytes(data[-10:]) == b"y" * 10

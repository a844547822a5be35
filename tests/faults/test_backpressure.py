"""A server whose handler never reads one connection, while its client
pushes data into it: only that stream stops (its window runs out, the
forwarder stops reading that client), and another client of the same server
moves 50 MiB at a rate not far below an unloaded run's, measured in the
same test. The stalled connection stays open, and what it could push is
bounded by windows and buffers."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from fleet.transfer import CHUNK, MODE_STALL, header

import fastnat

from .support import CONNECT_TIMEOUT, ENGINE_AND_API, HANG, SERVER_PORT, one_transfer
from .test_forwarder_faults import setup

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

MiB = 1024 * 1024
SIZE = 50 * MiB
# The loaded transfer may take this many times the unloaded one (plus a
# second): generous, for a shared machine; a stalled stream that held up the
# session would stop it outright.
SLOWDOWN = 3.0
# What a stalled stream can take before its client blocks: the server's
# window and receive buffers, the forwarder's, the kernel's socket buffers.
# Far below this; above it, something buffers without bound.
STALL_BOUND = 32 * MiB
# The pusher counts as blocked when it has made no progress for this long.
STILL = 0.5


class Pusher(threading.Thread):
    """Writes into one connection as fast as it can until it is shut down."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(name="fault-pusher", daemon=True)
        self.sock = sock
        self.pushed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        piece = bytes(CHUNK)
        try:
            while True:
                self.sock.sendall(piece)
                self.pushed += len(piece)
        except OSError as exc:
            self.error = exc

    def blocked(self, timeout: float) -> int:
        """Wait (bounded) until it stops making progress; what it pushed."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if self.pushed != last:
                last, since = self.pushed, time.monotonic()
            elif time.monotonic() - since > STILL:
                return last
            assert self.is_alive(), f"the pusher stopped: {self.error!r}"
            time.sleep(0.05)
        raise AssertionError(f"the stalled connection took {self.pushed} bytes and kept going for {timeout} s")


@ENGINE_AND_API
def test_a_handler_that_never_reads_slows_only_its_stream(nat_engine: str, fleet, monkeypatch, api: str) -> None:
    _url, _forwarder, server = setup(fleet, monkeypatch, "backpressure", api)
    start = time.monotonic()
    unloaded = one_transfer(api, "backpressure", "unloaded", SIZE, 0)
    unloaded_time = time.monotonic() - start
    assert unloaded.ok, unloaded

    sock = fastnat.nat_openconn("backpressure", SERVER_PORT, timeout=CONNECT_TIMEOUT)
    pusher = Pusher(sock)
    try:
        sock.sendall(header(MODE_STALL, "stalled", 0, 0))
        server.wait_event(lambda e: e["event"] == "stalled", 5, "the handler to stall")
        pusher.start()
        pushed = pusher.blocked(10.0)
        assert pushed < STALL_BOUND, pushed

        start = time.monotonic()
        loaded = one_transfer(api, "backpressure", "loaded", SIZE, 0)
        loaded_time = time.monotonic() - start
        assert loaded.ok, loaded
        # the stalled stream is still there, still stalled
        assert pusher.is_alive() and pusher.pushed == pushed, (pusher.pushed, pushed, pusher.error)
    finally:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the pusher's sendall
        if pusher.ident is not None:
            pusher.join(HANG)
        sock.close()
    assert not pusher.is_alive()
    assert loaded_time < SLOWDOWN * unloaded_time + 1.0, (loaded_time, unloaded_time)
    print(f"\n[{nat_engine}/{api}] 50 MiB in {unloaded_time:.2f} s alone, {loaded_time:.2f} s beside a stalled "
          f"stream that took {pushed / MiB:.1f} MiB (ratio {loaded_time / unloaded_time:.2f})")

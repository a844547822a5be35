"""1 GiB on one stream to and from a peer process, SHA-256 checked."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import pytest

from fastnat.aio import MuxSession

from .payload import DataSource
from .support import LOOPBACK

GiB = 1 << 30

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_one_gib_on_one_stream(aio_engine: str, peers: Any, arun: Any, direction: str) -> None:
    peer = peers("--listen")
    port = peer.wait_event("listening")["port"]
    seed = 1234

    async def main() -> None:
        session = await MuxSession.connect(LOOPBACK, port)
        calls: list[Any] = []
        session.set_error_callback(lambda *a: calls.append(a))
        try:
            ready = await peer.event(lambda m: m.get("event") == "ready", 10, "ready")
            assert ready["engine"] == ("_mux" if aio_engine == "compiled" else "_mux_py"), ready
            stream = await session.open_stream()
            started = time.monotonic()
            h = hashlib.sha256()
            n = 0
            if direction == "upload":
                stream.write(b"sink\n")
                for chunk in DataSource(seed).chunks(GiB):
                    stream.write(chunk)
                    h.update(chunk)
                    await stream.drain()
                stream.write_eof()
                line = await asyncio.wait_for(stream.readline(), 60)
                count, digest = line.decode().split()
                assert int(count) == GiB
                assert digest == h.hexdigest()
            else:
                stream.write(b"send %d %d\n" % (GiB, seed))
                stream.write_eof()
                while data := await stream.read(1 << 20):
                    h.update(data)
                    n += len(data)
                assert n == GiB
                report = await peer.stream_report(stream.stream_id, 10)
                assert report["error"] == "" and report["written"] == GiB, report
                assert h.hexdigest() == report["written_sha256"]
                assert h.hexdigest() == DataSource(seed).sha256(GiB)
            elapsed = time.monotonic() - started
            print(f"1 GiB {direction} ({aio_engine}) in {elapsed:.1f} s: {GiB / elapsed / 1e6:.0f} MB/s")
            stream.close()
            await asyncio.wait_for(stream.wait_closed(), 10)
            assert calls == []
        finally:
            session.close()
            await asyncio.wait_for(session.wait_closed(), 5)

    arun(main(), timeout=200)

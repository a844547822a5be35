"""Plain asyncio protocols over StreamTransport, unchanged: a small line
protocol, asyncio's own StreamReaderProtocol, flow control callbacks, and a
BufferedProtocol."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fastnat.aio import StreamTransport

from .payload import DataSource, sha256
from .support import KiB, LOOPBACK, MiB, session_pair, wait_until

pytestmark = pytest.mark.timeout(30)


class LineServer(asyncio.Protocol):
    """Answers each line with the line upper-cased; "QUIT" closes; at EOF it
    writes "EOF-SEEN" and lets the transport close (eof_received -> None)."""

    def __init__(self) -> None:
        self.buf = b""
        self.made: list[Any] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.types: set[type] = set()
        self.calls: list[str] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.made.append(transport)
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        self.types.add(type(data))
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line == b"QUIT":
                self.transport.write(b"BYE\n")
                self.transport.close()
                return
            self.transport.write(line.upper() + b"\n")

    def eof_received(self) -> None:
        self.calls.append("eof")
        self.transport.write(b"EOF-SEEN\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)
        else:  # pragma: no cover - reported by the test
            self.calls.append("lost twice")


class Collector(asyncio.Protocol):
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.data = bytearray()
        self.eof: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.paused = 0
        self.resumed = 0
        self.calls: list[str] = []
        self.types: set[type] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        self.types.add(type(data))
        self.data += data

    def eof_received(self) -> bool:
        self.calls.append("eof")
        self.eof.set_result(None)
        return True

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")
        self.lost.set_result(exc)

    async def lines(self, n: int, timeout: float = 5) -> list[bytes]:
        await wait_until(lambda: self.data.count(b"\n") >= n, timeout, f"{n} lines")
        return bytes(self.data).split(b"\n")[:n]


def test_line_protocol_over_stream_transports(aio_engine: str, loop_kind: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            client_proto = Collector()
            transport = pair.client.open_transport()
            assert isinstance(transport, StreamTransport) and isinstance(transport, asyncio.Transport)
            transport.attach(client_proto)
            transport.writelines([b"hello\nwor", b"ld\n"])
            server_proto = LineServer()
            server_transport = await asyncio.wait_for(pair.server.accept_transport(), 5)
            server_transport.attach(server_proto)
            assert await client_proto.lines(2) == [b"HELLO", b"WORLD"]
            assert server_proto.types == {bytes} and client_proto.types == {bytes}
            assert server_proto.made == [server_transport]
            assert server_transport.get_protocol() is server_proto
            assert server_transport.can_write_eof()
            # extra info, as a TCP transport gives it
            assert server_transport.get_extra_info("peername") == pair.client.get_extra_info("sockname")
            assert server_transport.get_extra_info("sockname") == pair.listener.sockets[0].getsockname()
            assert server_transport.get_extra_info("stream_id") == transport.get_extra_info("stream_id")
            assert server_transport.get_extra_info("session") is pair.server
            # half-close from the client: the server answers and its transport closes
            transport.write_eof()
            await asyncio.wait_for(client_proto.eof, 5)
            assert bytes(client_proto.data).endswith(b"EOF-SEEN\n")
            assert await asyncio.wait_for(server_proto.lost, 5) is None
            assert server_proto.calls == ["made", "eof", "lost"]
            assert server_transport.is_closing()
            transport.close()
            assert await asyncio.wait_for(client_proto.lost, 5) is None
            assert client_proto.calls == ["made", "eof", "lost"]
            assert pair.errors == []

    arun(main(), timeout=15)


@pytest.mark.parametrize("data_first", [False, True], ids=["attached-first", "data-first"])
def test_protocol_closes_its_transport_inside_data_received(aio_engine: str, arun: Any, data_first: bool) -> None:
    """A protocol that closes its transport from data_received ("QUIT"):
    the reply written before close() goes out, then a FIN. data-first: the
    data arrived before the protocol was attached (or while reading was
    paused), so it is delivered from the transport's buffer."""

    async def main() -> None:
        async with session_pair() as pair:
            client_proto = Collector()
            transport = pair.client.open_transport()
            transport.attach(client_proto)
            server_proto = LineServer()
            accepted = asyncio.create_task(pair.server.accept_transport())
            if data_first:
                transport.write(b"one\nQUIT\nnever answered\n")
                server_transport = await asyncio.wait_for(accepted, 5)
                await asyncio.sleep(0.05)
                server_transport.attach(server_proto)
            else:
                transport.write(b"x")  # the SYN goes out with it
                server_transport = await asyncio.wait_for(accepted, 5)
                server_transport.attach(server_proto)
                await asyncio.sleep(0.05)
                transport.write(b"\none\nQUIT\nnever answered\n")
            await asyncio.wait_for(client_proto.eof, 5)
            assert bytes(client_proto.data).endswith(b"ONE\nBYE\n")
            assert await asyncio.wait_for(server_proto.lost, 5) is None
            assert server_proto.calls == ["made", "lost"]
            transport.close()
            assert await asyncio.wait_for(client_proto.lost, 5) is None

    arun(main(), timeout=15)


def test_data_that_arrives_before_attach_is_delivered(aio_engine: str, arun: Any) -> None:
    async def main() -> None:
        async with session_pair() as pair:
            stream = await pair.client.open_stream()
            stream.write(b"early bytes\n")
            stream.write_eof()
            server_transport = await asyncio.wait_for(pair.server.accept_transport(), 5)
            await asyncio.sleep(0.05)  # data and FIN are in before the protocol
            proto = Collector()
            server_transport.attach(proto)
            with pytest.raises(RuntimeError):
                server_transport.attach(Collector())
            await asyncio.wait_for(proto.eof, 5)
            assert bytes(proto.data) == b"early bytes\n"
            server_transport.close()
            stream.close()

    arun(main(), timeout=10)


def test_asyncio_stream_pair_over_a_bare_transport(aio_engine: str, arun: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with session_pair() as pair:
            transport = pair.client.open_transport()
            reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(reader)
            transport.attach(protocol)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            peer = await asyncio.wait_for(pair.server.accept_stream(), 5)
            payload = DataSource(61).data(2 * MiB)
            writer.write(payload)
            writer.write_eof()
            got = await asyncio.wait_for(peer.reader.read(-1), 10)
            assert sha256(got) == sha256(payload)
            peer.write(b"done\n")
            peer.close()
            assert await reader.readline() == b"done\n"
            assert await reader.read() == b""
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 5)

    arun(main(), timeout=15)


def test_protocol_flow_control_and_pause_reading(aio_engine: str, loop_kind: str, arun: Any) -> None:
    """The receiving protocol pauses reading: no data_received while paused,
    the sender's protocol gets pause_writing() once its window is used up;
    resume_reading() brings the data and resume_writing()."""

    async def main() -> None:
        async with session_pair() as pair:
            sender = Collector()
            transport = pair.client.open_transport()
            transport.attach(sender)
            receiver = Collector()
            server_transport = await asyncio.wait_for(pair.server.accept_transport(), 5)
            server_transport.attach(receiver)
            server_transport.pause_reading()
            assert not server_transport.is_reading()
            payload = DataSource(62).data(4 * MiB)
            transport.write(payload)
            assert sender.paused == 1  # more than the window: the protocol is paused at once
            await asyncio.sleep(0.2)
            assert len(receiver.data) == 0, "data_received while reading is paused"
            assert sender.resumed == 0
            assert transport.get_write_buffer_size() >= 4 * MiB - 256 * KiB
            server_transport.resume_reading()
            assert server_transport.is_reading()
            await wait_until(lambda: len(receiver.data) == len(payload), 10, "all the data")
            await wait_until(lambda: sender.resumed == 1, 5, "resume_writing")
            assert sha256(bytes(receiver.data)) == sha256(payload)
            assert transport.get_write_buffer_size() == 0
            transport.close()
            server_transport.close()
            assert await asyncio.wait_for(sender.lost, 5) is None

    arun(main(), timeout=20)


def test_buffered_protocol_over_a_stream_transport(aio_engine: str, arun: Any) -> None:
    """asyncio transports drive a BufferedProtocol (get_buffer/buffer_updated)
    as well as a Protocol; MuxSession itself is one over TCP."""

    class Sink(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(64 * KiB)
            self.data = bytearray()
            self.eof = asyncio.get_running_loop().create_future()

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def get_buffer(self, sizehint: int) -> memoryview:
            return memoryview(self.buf)

        def buffer_updated(self, nbytes: int) -> None:
            self.data += self.buf[:nbytes]

        def eof_received(self) -> bool:
            self.eof.set_result(None)
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            pass

    async def main() -> None:
        async with session_pair() as pair:
            stream = await pair.client.open_stream()
            payload = DataSource(63).data(1 * MiB + 3)
            stream.write(payload)
            stream.write_eof()
            sink = Sink()
            (await asyncio.wait_for(pair.server.accept_transport(), 5)).attach(sink)
            await asyncio.wait_for(sink.eof, 3)
            assert sha256(bytes(sink.data)) == sha256(payload)
            stream.close()

    arun(main(), timeout=10)

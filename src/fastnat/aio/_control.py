"""Reading and writing control messages over asyncio streams."""

from __future__ import annotations

import asyncio
from typing import Any

from fastnat.errors import ControlProtocolError
from fastnat.protocol import (
    MAX_MESSAGE_SIZE,
    HelloReplyReader,
    MessageReader,
    decode_message_body,
    decode_message_length,
)
from fastnat.tls import can_half_close

__all__ = ["FirstMessage", "HandshakeBuffer", "read_message"]


async def read_message(reader: asyncio.StreamReader, max_size: int = MAX_MESSAGE_SIZE) -> Any:
    """Read one length-prefixed message; ``None`` at a clean end of stream.

    Raises :class:`ControlProtocolError` for an oversized or undecodable
    message, or for a stream that ends inside one.
    """
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ControlProtocolError("the stream ended inside a message header") from None
    length = decode_message_length(header, max_size)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ControlProtocolError(f"the stream ended inside a message of {length} bytes") from None
    return decode_message_body(body)


class FirstMessage(asyncio.Protocol):
    """Reads one control message from a stream transport, then pauses it.

    ``message`` resolves with the decoded message; bytes that followed it are
    kept in ``rest`` for whoever takes the transport over next (with
    ``set_protocol`` and ``resume_reading``).
    """

    _fastnat_accepts_views = True  # copies into its MessageReader

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._reader = MessageReader(max_size)
        self.transport: asyncio.Transport | None = None
        self.message: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.rest = bytearray()
        self.eof = False  # the peer ended its side after the message
        self.error: Exception | None = None  # what closed the stream, if it closed (None: cleanly)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: Any) -> None:
        if self.message.done():
            self.rest += data
            return
        try:
            messages = self._reader.feed(bytes(data), limit=1)
        except ControlProtocolError as exc:
            self.message.set_exception(exc)
            return
        if messages:
            self.rest += self._reader.take_rest()
            self.message.set_result(messages[0])
            if self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        if not self.message.done():
            self.message.set_exception(ConnectionResetError("the stream ended before its first message"))
        else:
            self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        if not self.message.done():
            self.message.set_exception(exc or ConnectionResetError("the stream closed before its first message"))


class HandshakeBuffer(asyncio.Protocol):
    """Holds a fresh connection to a forwarder during its handshake.

    Buffers what arrives; :meth:`read_hello_reply` and :meth:`read_message`
    parse from it with a deadline. Whatever is left over after the handshake
    (``take_rest``) belongs to the protocol that takes the transport over.
    """

    def __init__(self) -> None:
        self.half_close = True  # False on TLS, which cannot half-close
        self.buffer = bytearray()
        self.error: BaseException | None = None
        self.eof = False  # the peer half-closed; whoever takes over must know
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.half_close = can_half_close(transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return self.half_close  # the other direction stays open (not over TLS)

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc or ConnectionResetError("the forwarder closed the connection")
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _more(self, deadline: float) -> None:
        if self.error is not None:
            raise self.error
        if self.eof:
            raise ConnectionResetError("the peer ended the connection during the handshake")
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        await asyncio.wait_for(self.waiter, max(0.0, deadline - loop.time()))

    async def read_hello_reply(self, timeout: float) -> tuple[Any, bytes]:
        """The forwarder's hello reply, and the bytes that followed it (also kept buffered)."""
        parser = HelloReplyReader()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.buffer:
                reply = parser.feed(bytes(self.buffer))
                self.buffer.clear()
                if reply is not None:
                    self.buffer += parser.rest
                    return reply, parser.rest
            await self._more(deadline)

    async def read_message(self, timeout: float, max_size: int = MAX_MESSAGE_SIZE) -> Any:
        """One length-prefixed message from the buffer; what follows stays buffered."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if len(self.buffer) >= 4:
                length = decode_message_length(bytes(self.buffer[:4]), max_size)
                if len(self.buffer) >= 4 + length:
                    body = bytes(self.buffer[4 : 4 + length])
                    del self.buffer[: 4 + length]
                    return decode_message_body(body)
            await self._more(deadline)

    def take_rest(self) -> bytes:
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest

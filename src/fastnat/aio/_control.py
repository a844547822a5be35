"""Reading and writing control messages over asyncio streams."""

from __future__ import annotations

import asyncio
from typing import Any

from fastnat.errors import ControlProtocolError
from fastnat.protocol import MAX_MESSAGE_SIZE, MessageReader, decode_message_body, decode_message_length

__all__ = ["read_message", "FirstMessage"]


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
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.message.done():
            self.message.set_exception(exc or ConnectionResetError("the stream closed before its first message"))

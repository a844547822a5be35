"""``fastnat expose``: publish a local TCP service under a server id.

Each client that reaches the id's port through a forwarder is relayed to the
local service (``--to host:port``), optionally preceded by a PROXY protocol
header carrying the client's real address.
"""

from __future__ import annotations

import asyncio
import logging

from fastnat.aio._control import HandshakeBuffer
from fastnat.aio.server import Registration, get_registration
from fastnat.aio.stream import StreamTransport
from fastnat.proxy_protocol import proxy_v1_header
from fastnat.splice import Relays, Splice

__all__ = ["Exposure", "expose"]

log = logging.getLogger("fastnat.expose")

# Connecting to the local service should be immediate; a service that does
# not accept within this time gets the client's stream reset.
LOCAL_CONNECT_TIMEOUT = 5.0


class Exposure:
    """A running ``expose``: counters, and :meth:`close`."""

    def __init__(self, registration: Registration, port: int, target: tuple[str, int], proxy_protocol: bool) -> None:
        self.registration = registration
        self.port = port
        self.target = target
        self.proxy_protocol = proxy_protocol
        self.connections_total = 0
        self.connections_active = 0
        self.failures = 0
        self._relays = Relays()

    def handle(self, stream: StreamTransport, initial: bytes) -> None:
        self._relays.spawn(self._relay(stream, initial))

    async def _relay(self, stream: StreamTransport, initial: bytes) -> None:
        loop = asyncio.get_running_loop()
        client = stream.get_extra_info("peername")
        try:
            local, holder = await asyncio.wait_for(loop.create_connection(HandshakeBuffer, *self.target), LOCAL_CONNECT_TIMEOUT)
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
            self.failures += 1
            log.warning("client %s: the local service %s:%d is unreachable: %s", client, *self.target, exc)
            stream.abort()
            return
        if self.proxy_protocol:
            try:
                local.write(proxy_v1_header(client, local.get_extra_info("peername")))
            except ValueError as exc:
                log.warning("no PROXY header for client %s: %s", client, exc)
                local.abort()
                stream.abort()
                return
        self.connections_total += 1
        self.connections_active += 1
        splice = Splice(stream, local, initial_a=initial, initial_b=holder.take_rest(), eof_b=holder.eof)
        stream.resume_reading()
        local.resume_reading()
        try:
            await self._relays.run(splice)
        finally:
            self.connections_active -= 1

    async def close(self) -> None:
        """Deregister (the id too, if this was its last port) and end every relayed connection."""
        await self.registration.remove_port(self.port)
        await self._relays.close()


async def expose(
    server_id: str,
    port: int,
    target: tuple[str, int],
    *,
    forwarder: tuple[str, int] | None = None,
    secret: bytes | None = None,
    proxy_protocol: bool = False,
    persist: bool = True,
    redundancy: int = 1,
) -> Exposure:
    """Publish ``target`` as ``port`` of ``server_id``; returns once registered."""
    registration = await get_registration(
        server_id, forwarder=forwarder, secret=secret, persist=persist, redundancy=redundancy
    )
    exposure = Exposure(registration, port, target, proxy_protocol)
    try:
        await registration.add_port(port, exposure.handle)
    except BaseException:
        if not registration.ports:
            await registration.close()
        raise
    return exposure

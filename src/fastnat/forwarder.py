"""The forwarder: a public relay between NAT'd servers and their clients.

One listening port serves both roles, told apart by the hello (see
:mod:`fastnat.protocol`):

* a **server** (role ``S``) dials out to the forwarder; its TCP connection
  becomes a multiplexer session (the forwarder is the accepting side). Over
  the first stream it opens, the control stream, it registers ids and ports.
* a **client** (role ``C``) sends one request. For ``client_init`` the
  forwarder opens a stream on the server's session, sends the ``open``
  request (port, client address) as the stream's first message, waits for the
  server to accept, answers ``CONFIRMED``, and from then on splices the
  client's TCP connection and the stream both ways.

A server id belongs to the session holding it; with a secret configured, a
``reg_serv`` must prove knowledge of it (HMAC over the connection's nonce).
Bad input on one connection closes that connection with one log line; the
forwarder keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import logging
import os
import secrets as _secrets
import ssl as ssl_module
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastnat.aio._control import FirstMessage, read_message
from fastnat.aio.session import MuxSession
from fastnat.aio.stream import MuxStream, StreamTransport
from fastnat.errors import ControlProtocolError, MuxError, ProtocolError, StreamLimitError
from fastnat.mux_config import MuxConfig
from fastnat.protocol import (
    HELLO_SIZE,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    ROLE_CLIENT,
    ROLE_REGISTRY,
    ROLE_SERVER,
    SUPPORTED_VERSIONS,
    HelloStatus,
    MessageReader,
    Request,
    Status,
    check_registration_proof,
    encode_hello_reply,
    encode_reply,
    encode_request,
    parse_hello,
    parse_reply,
    parse_request,
)
from fastnat.discovery import Registry, open_registry
from fastnat.discovery.store import StoreFull
from fastnat.locate import ForwarderAddress, server_key
from fastnat.ratelimit import AddressCounts
from fastnat.server_quota import ServerQuota
from fastnat.settings import FORWARDER_KEY, get_settings
from fastnat.splice import Splice
from fastnat.tls import SHUTDOWN_TIMEOUT

__all__ = ["Forwarder", "ForwarderLimits", "load_secrets"]

log = logging.getLogger("fastnat.forwarder")

# The first byte of a TLS connection (a handshake record): a TLS client at a
# plain forwarder is told apart from other bad input by it.
_TLS_HANDSHAKE_RECORD = b"\x16"


def _tls_failure(exc: BaseException) -> str:
    """Why a client's TLS handshake failed, from the forwarder's side."""
    if isinstance(exc, TimeoutError):
        return "no handshake in time"
    if isinstance(exc, ConnectionError):
        return "the client hung up during the handshake (does it trust this certificate?)"
    reason = getattr(exc, "reason", None)
    if reason:
        text = str(reason).replace("_", " ").lower()
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
            text += " (a client without TLS?)"
        return text
    return str(exc) or type(exc).__name__


# The test string the forwarder sends back to a caller of ``bidirectional``.
_ECHO_PROBE_SIZE = 16
# ``stats`` lists per-server counters for at most this many servers (the
# busiest first): an entry is about 250 bytes and a reply must fit in one
# 64 KiB control message.
STATS_MAX_SERVERS = 100
# Who sees ``stats``' per-server part (ids, ports, and each server's public
# address, which is where its NAT is): "local", callers on the forwarder's own
# host (a loopback address, or the very address they dialled); "all"; or
# "none". Totals are anyone's: they say how busy the forwarder is, and
# nothing about whom.
STATS_DETAIL_POLICIES = ("local", "all", "none")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def stats_detail_allowed(policy: str, peer_ip: str, local_ip: str | None = None) -> bool:
    """Whether a ``stats`` caller at ``peer_ip``, connected to ``local_ip``,
    sees the per-server part under ``policy``."""
    if policy == "all":
        return True
    if policy != "local":
        return False
    peer = _ip(peer_ip)
    if peer is None:
        return False
    # A connection from this host to one of its own addresses comes from that address.
    return peer.is_loopback or (local_ip is not None and peer == _ip(local_ip))


@dataclasses.dataclass(frozen=True, slots=True)
class ForwarderLimits:
    """The forwarder's limits. The seed allowed 5 servers and 4 clients per
    server; these defaults suit one modern machine."""

    # Server ids registered at this forwarder. Each holds a session (a TCP
    # connection, its buffers and bookkeeping, tens of KiB): 10,000 fits a
    # small machine's memory and file-descriptor budget.
    max_servers: int = 10_000
    # Concurrent clients per server id: each is a relayed TCP connection and
    # a stream. 1,024 keeps one popular server from taking all descriptors.
    max_clients_per_server: int = 1_024
    # Connections that have not finished their handshake (hello and first
    # request, or hello and first registration). Bounds what a flood of idle
    # connections costs.
    max_pending_handshakes: int = 1_024
    # A peer that connects and does not finish its handshake in this time is
    # dropped. 10 s is ample on any link.
    handshake_timeout: float = 10.0
    # How long a server may take to accept a client's stream.
    open_timeout: float = 10.0
    # Control messages are capped at this size (see protocol.MAX_MESSAGE_SIZE).
    max_message_size: int = 64 * 1024
    # Ports one id may register: a server exposes a handful of services.
    max_ports_per_server: int = 256
    # ``bidirectional`` dials back to the caller with this timeout.
    dial_back_timeout: float = 3.0
    # Concurrent connections from one IP address (servers, clients, stats
    # askers; a registry connection counts at the registry instead). One
    # address may be a NAT gateway with many users, and a popular server's
    # 1,024 clients may share one: 2,048 leaves room for that while one
    # address cannot take the descriptors meant for everyone.
    max_connections_per_ip: int = 2_048
    # Of max_pending_handshakes, how many one IP address may hold. A
    # handshake takes one round trip (plus the server's accept), so even a
    # busy address has few pending; 256 keeps one address from taking the
    # whole handshake budget and locking everyone else out.
    max_handshakes_per_ip: int = 256
    # Bytes per second relayed for one server id, both directions together,
    # shared by all its clients (None: no limit). Enforced by pausing
    # reading (see fastnat.server_quota): nothing is buffered or dropped.
    server_byte_rate: int | None = None
    # Bytes relayed for one server id since it registered, both directions
    # together (None: no cap). At the cap its relayed connections are closed
    # and new clients refused until the id registers anew.
    server_byte_cap: int | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in _OPTIONAL_LIMITS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ForwarderLimits.{field.name} must be a positive number, got {value!r}")
            if field.name in _OPTIONAL_LIMITS and not isinstance(value, int):
                raise ValueError(f"ForwarderLimits.{field.name} must be a whole number of bytes, got {value!r}")


# The limits that are off (None) by default.
_OPTIONAL_LIMITS = frozenset({"server_byte_rate", "server_byte_cap"})


def load_secrets(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Read a file of per-id secrets: one ``id secret`` pair per line; ``#`` starts a comment."""
    table: dict[str, bytes] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'id secret'")
        table[parts[0]] = parts[1].strip().encode()
    return table


def _primary_ip() -> str:
    """This host's address on its default route (a UDP connect sends no packet);
    127.0.0.1 when it has none."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never reached, only routed
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class _Counters:
    """Counters in total and per server id, for ``stats``."""

    def __init__(self) -> None:
        self.sessions_total = 0
        self.clients_total = 0
        self.clients_active = 0
        self.bytes_client_to_server = 0
        self.bytes_server_to_client = 0
        self.refusals: collections.Counter[str] = collections.Counter()
        self.per_server: dict[str, dict[str, int]] = {}

    def server(self, server_id: str) -> dict[str, int]:
        entry = self.per_server.get(server_id)
        if entry is None:
            entry = self.per_server[server_id] = {
                "clients_active": 0,
                "clients_total": 0,
                "bytes_client_to_server": 0,
                "bytes_server_to_client": 0,
                "refusals": 0,
            }
        return entry

    def refuse(self, reason: str, server_id: str | None = None) -> None:
        self.refusals[reason] += 1
        if server_id is not None and server_id in self.per_server:
            self.per_server[server_id]["refusals"] += 1


class _ServerLink:
    """One server's session and the ids and ports it holds."""

    def __init__(self, forwarder: Forwarder, session: MuxSession, nonce: bytes, peer: tuple[str, int]) -> None:
        self.forwarder = forwarder
        self.session = session
        self.nonce = nonce
        self.peer = peer
        self.ids: dict[str, set[int]] = {}
        self.clients: collections.Counter[str] = collections.Counter()
        self.task: asyncio.Task[None] | None = None
        # Counted among the forwarder's pending handshakes until it registers an id.
        self.pending = True
        self.ip_slot = False  # counted in the forwarder's connections per address

    def handshake_over(self) -> None:
        if self.pending:
            self.pending = False
            self.forwarder._handshake_done(self.peer[0])

    def __repr__(self) -> str:
        return f"<server link {self.peer[0]}:{self.peer[1]} ids={sorted(self.ids)}>"

    async def run(self) -> None:
        fwd = self.forwarder
        limits = fwd.limits
        session = self.session
        try:
            try:
                control = await asyncio.wait_for(session.accept_stream(), limits.handshake_timeout)
            except (TimeoutError, asyncio.TimeoutError):
                fwd._drop(self.peer, "server opened no control stream in time", "handshake_timeout")
                return
            # Streams the server opens after its control stream are not ours to take.
            extra = asyncio.get_running_loop().create_task(self._refuse_extra_streams())
            try:
                await self._serve_control(control)
            finally:
                extra.cancel()
        except ConnectionError as exc:
            if isinstance(session._error, ProtocolError):
                fwd._drop(self.peer, f"a server broke the multiplexer protocol: {session._error}")
            else:
                log.info("server %s:%d disconnected: %s", self.peer[0], self.peer[1], exc)
            # The session's streams keep this exception; its traceback holds
            # the frames that awaited them, whose locals hold the session: a
            # cycle that kept each gone server's session (and its buffers)
            # alive until the next full collection.
            exc.__traceback__ = None
        except ControlProtocolError as exc:
            fwd._drop(self.peer, f"bad control message from a server: {exc}")
        except Exception:
            log.exception("server link %r failed", self)
        finally:
            fwd._server_gone(self)
            session.close()

    async def _refuse_extra_streams(self) -> None:
        try:
            async for stream in self.session:
                stream.abort()
        except ConnectionError:
            pass

    async def _serve_control(self, control: MuxStream) -> None:
        fwd = self.forwarder
        limits = fwd.limits
        registered_in_time = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.handshake_timeout
        while True:
            if not registered_in_time:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    fwd._drop(self.peer, "server registered no id in time", "handshake_timeout")
                    return
                try:
                    message = await asyncio.wait_for(read_message(control.reader, limits.max_message_size), remaining)
                except (TimeoutError, asyncio.TimeoutError):
                    fwd._drop(self.peer, "server registered no id in time", "handshake_timeout")
                    return
            else:
                message = await read_message(control.reader, limits.max_message_size)
            if message is None:
                return  # the server closed its control stream: it is leaving
            request = parse_request(message)
            if request.request == "reg_serv":
                await fwd._drop_dead_holder(request.value["server"], self, request.value.get("proof"))
            status, value = self._handle(request)
            control.write(encode_reply(request.id, status, value))
            await control.drain()
            if status == Status.OK and request.request == "reg_serv" and not registered_in_time:
                registered_in_time = True
                self.handshake_over()

    def _handle(self, request: Request) -> tuple[str, Any]:
        fwd = self.forwarder
        name, value = request.request, request.value
        if name == "reg_serv":
            return fwd._register(self, value["server"], value.get("proof"))
        if name == "dereg_serv":
            server_id = value["server"]
            if server_id not in self.ids:
                return Status.NOT_REGISTERED, f"{server_id!r} is not registered by this session"
            fwd._deregister(self, server_id)
            return Status.OK, None
        if name in ("reg_port", "dereg_port"):
            server_id, port = value["server"], value["port"]
            ports = self.ids.get(server_id)
            if ports is None:
                return Status.NOT_REGISTERED, f"{server_id!r} is not registered by this session"
            if name == "reg_port":
                if port not in ports and len(ports) >= fwd.limits.max_ports_per_server:
                    fwd.counters.refuse("ports_full", server_id)
                    return Status.FULL, f"at most {fwd.limits.max_ports_per_server} ports per server"
                ports.add(port)
            else:
                if port not in ports:
                    return Status.NOT_REGISTERED, f"port {port} is not registered for {server_id!r}"
                ports.discard(port)
            return Status.OK, None
        if name == "externaladdr":
            return Status.OK, {"ip": self.peer[0], "port": self.peer[1]}
        if name == "stats":
            local = self.session.get_extra_info("sockname")
            detail = stats_detail_allowed(fwd.stats_detail, self.peer[0], local[0] if local else None)
            return Status.OK, fwd.stats(detail=detail)
        raise ControlProtocolError(f"request {name!r} is not for a server's control stream")


class _Handshake(asyncio.Protocol):
    """A new connection, until its role is known and its handshake done."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.fwd = forwarder
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("?", 0)
        self.buffer = bytearray()
        self.role: bytes | None = None
        self.reader: MessageReader | None = None
        self.nonce = b""
        self.timer: asyncio.TimerHandle | None = None
        self.pending = False  # counted in the forwarder's pending handshakes
        self.lost = False
        self.busy = False  # a request is being served
        self.eof = False  # the client half-closed while its request was served
        self.hello_reply = b""  # held back to go out with the client's reply
        self.ip_slot = False  # counted in the forwarder's connections per address
        self.dropped = False  # closed for cause (logged once)
        # TLS: the accepted TCP connection's socket passes to a TLS transport
        # (connect_accepted_socket), which calls connection_made again once
        # its handshake is done; the TCP transport's connection_lost is not
        # this connection's end.
        self.tls_handshake: asyncio.Task[None] | None = None
        self.tls_up = False  # the TLS transport is made (handshake done)
        self.tcp_handed_over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.tls_handshake is not None:
            self.transport = transport  # type: ignore[assignment]  # the TLS transport, handshake done
            self.tls_up = True
            return
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        fwd = self.fwd
        if not peer:
            # Reset by the peer before we got to it: nothing to serve, and no
            # address to give a server as its client's.
            transport.abort()
            return
        self.peer = (peer[0], peer[1])
        if fwd._closing:
            transport.close()
            return
        if fwd._pending_handshakes >= fwd.limits.max_pending_handshakes:
            fwd.counters.refuse("handshakes_full")
            log.warning("refusing %s:%d: %d handshakes pending", *self.peer, fwd._pending_handshakes)
            if fwd.ssl is None:  # over TLS there is no channel to say BUSY on yet
                self.transport.write(encode_hello_reply(HelloStatus.BUSY, 0, bytes(NONCE_SIZE)))
            transport.close()
            return
        ip = self.peer[0]
        if not fwd._ip_connections.acquire(ip):
            self._refuse_ip(HelloStatus.IP_CONNECTIONS, "ip_connections_full", f"{fwd.limits.max_connections_per_ip} connections open from it")
            return
        self.ip_slot = True
        if not fwd._ip_handshakes.acquire(ip):
            self._refuse_ip(HelloStatus.IP_HANDSHAKES, "ip_handshakes_full", f"{fwd.limits.max_handshakes_per_ip} handshakes pending from it")
            return
        fwd._pending_handshakes += 1
        self.pending = True
        # The TLS handshake, if any, counts against the same timeout.
        self.timer = asyncio.get_running_loop().call_later(fwd.limits.handshake_timeout, self._timed_out)
        if fwd.ssl is not None:
            # Here, before the transport reads anything (uvloop starts reading
            # right after connection_made, whatever pause_reading says).
            sock = transport.get_extra_info("socket").dup()
            self.tcp_handed_over = True
            # Nothing written, nothing read: close() lets the descriptor go at
            # once; the duplicate keeps the connection.
            transport.close()
            self.tls_handshake = fwd._spawn(self._start_tls(sock))
            fwd._tls_handshakes.add(self.tls_handshake)
            self.tls_handshake.add_done_callback(fwd._tls_handshakes.discard)

    async def _start_tls(self, sock: Any) -> None:
        """Run the TLS handshake on the accepted connection's socket; a
        failure is one log line."""
        fwd = self.fwd
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self, sock, ssl=fwd.ssl, ssl_handshake_timeout=fwd.limits.handshake_timeout,
                ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
            )
        except asyncio.CancelledError:
            if not self.tls_up:
                sock.close()  # dropped (timed out, or the forwarder is closing)
        except OSError as exc:  # TimeoutError included
            sock.close()
            self._close(f"TLS handshake failed: {_tls_failure(exc)}", "tls_failed")

    def _refuse_ip(self, status: int, reason: str, why: str) -> None:
        """Refuse a connection at a per-address limit: the hello reply says which."""
        assert self.transport is not None
        self.fwd.counters.refuse(reason)
        log.warning("refusing %s:%d: %s", *self.peer, why)
        self.transport.write(encode_hello_reply(status, 0, bytes(NONCE_SIZE)))
        self.transport.close()

    def release_ip_slot(self) -> None:
        """The connection is over (or counted elsewhere): uncount it for its address."""
        if self.ip_slot:
            self.ip_slot = False
            self.fwd._ip_connections.release(self.peer[0])

    def _timed_out(self) -> None:
        self.timer = None
        self._close(f"no handshake within {self.fwd.limits.handshake_timeout:g} s", "handshake_timeout")

    def _close(self, reason: str, counter: str = "bad_input") -> None:
        if self.dropped:
            return
        self.dropped = True
        self.fwd._drop(self.peer, reason, counter)
        if self.transport is not None and not self.transport.is_closing():
            if self.hello_reply:  # the hello was fine: say so before hanging up
                self.transport.write(self.hello_reply)
                self.hello_reply = b""
            self.transport.abort()
        self._finish()

    def _finish(self) -> None:
        if self.tls_handshake is not None and not self.tls_up:
            self.tls_handshake.cancel()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pending:
            self.pending = False
            self.fwd._handshake_done(self.peer[0])

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except ControlProtocolError as exc:
            self._close(str(exc))

    def _received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.busy:
            self.buffer += data  # bytes a client sent ahead; relayed after CONFIRMED
            return
        if self.role is None:
            self.buffer += data
            if self.buffer[:1] == _TLS_HANDSHAKE_RECORD:
                raise ControlProtocolError("not a fastnat hello but a TLS handshake: this forwarder does not serve TLS (see --tls-cert)")
            if len(self.buffer) < HELLO_SIZE:
                head = bytes(self.buffer[:4])
                if head != b"FNAT"[: len(head)]:
                    raise ControlProtocolError(f"not a fastnat hello (starts with {head!r})")
                return
            hello = parse_hello(bytes(self.buffer[:HELLO_SIZE]))
            rest = bytes(self.buffer[HELLO_SIZE:])
            self.buffer.clear()
            if hello.version not in SUPPORTED_VERSIONS:
                self.transport.write(encode_hello_reply(HelloStatus.VERSION_UNSUPPORTED, 0, bytes(NONCE_SIZE)))
                self._close(f"protocol version {hello.version} (this forwarder speaks {list(SUPPORTED_VERSIONS)})", "version")
                return
            if hello.role == ROLE_REGISTRY and self.fwd.registry_service is not None:
                self._finish()
                self.release_ip_slot()  # the registry counts its connections per address itself
                self.busy = True
                self.fwd.registry_service.serve_connection(self.transport, rest, self.peer)
                return
            if hello.role not in (ROLE_SERVER, ROLE_CLIENT):
                self.transport.write(encode_hello_reply(HelloStatus.BAD_ROLE, 0, bytes(NONCE_SIZE)))
                self._close(f"unknown role {hello.role!r}")
                return
            self.role = hello.role
            self.nonce = _secrets.token_bytes(NONCE_SIZE)
            hello_reply = encode_hello_reply(HelloStatus.OK, PROTOCOL_VERSION, self.nonce)
            if self.role == ROLE_SERVER:
                self.transport.write(hello_reply)
                self._become_server(rest)
                return
            if rest:
                # A client that sent its request with its hello gets both
                # answers in one write (one syscall and one wake-up saved).
                self.hello_reply = hello_reply
            else:
                self.transport.write(hello_reply)
            self.reader = MessageReader(self.fwd.limits.max_message_size)
            data = rest
        assert self.reader is not None
        messages = self.reader.feed(data, limit=1)
        if not messages:
            return
        request = parse_request(messages[0])
        # Whatever came after the request is the client's first data.
        self.buffer += self.reader.take_rest()
        self.busy = True
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self.fwd._serve_client(self, request))

    def _become_server(self, rest: bytes) -> None:
        assert self.transport is not None
        fwd = self.fwd
        self.busy = True
        session = MuxSession.from_transport(
            self.transport,
            client=False,
            config=fwd.mux_config,
            initial_data=rest,
            **fwd.session_options,
        )
        link = _ServerLink(fwd, session, self.nonce, self.peer)
        # The pending handshake passes to the link, which releases it once
        # the server registers an id (or fails to in time); so does the
        # connection's count for its address, released when the link ends.
        self.pending = False
        link.ip_slot, self.ip_slot = self.ip_slot, False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        fwd._server_connected(link)

    def reply(self, data: bytes) -> None:
        """Write a reply to the client (after the hello reply, if held back)."""
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return
        transport.write(self.hello_reply + data)
        self.hello_reply = b""

    def eof_received(self) -> bool:
        if self.busy:
            self.eof = True  # relayed as a FIN once the splice runs
            return not self.tls_up  # a TLS connection cannot half-close: it ends here
        return False  # nothing asked yet: the connection is over

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tcp_handed_over:
            self.tcp_handed_over = False  # the TCP transport's end: TLS goes on
            return
        self.lost = True
        self._finish()
        self.release_ip_slot()


class Forwarder:
    """A forwarder on ``host:port`` (port 0 picks a free one).

    ``secret`` (bytes) demands proof of it from every ``reg_serv``;
    ``secrets`` maps ids to their own secrets (see :func:`load_secrets`).
    ``stats_detail`` says who sees the per-server part of ``stats`` (see
    :data:`STATS_DETAIL_POLICIES`).
    ``ssl``: a server ``ssl.SSLContext`` (see :func:`fastnat.tls.server_context`)
    to serve every role (servers, clients, the hosted registry) over TLS;
    the TLS handshake counts against ``limits.handshake_timeout``.
    """

    def __init__(
        self,
        host: str | None = "0.0.0.0",
        port: int = 0,
        *,
        limits: ForwarderLimits | None = None,
        secret: bytes | str | None = None,
        secrets: Mapping[str, bytes | str] | None = None,
        mux_config: MuxConfig | None = None,
        ssl: Any = None,
        registry: str | Registry | None = None,
        advertise: str | None = None,
        host_registry: bool = True,
        stats_detail: str = "local",
        **session_options: Any,
    ) -> None:
        if stats_detail not in STATS_DETAIL_POLICIES:
            raise ValueError(f"stats_detail must be one of {', '.join(STATS_DETAIL_POLICIES)}, got {stats_detail!r}")
        self.stats_detail = stats_detail
        self.host = host
        self.requested_port = port
        self.limits = limits or ForwarderLimits()
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.secrets = None if secrets is None else {k: (v.encode() if isinstance(v, str) else v) for k, v in secrets.items()}
        self.mux_config = mux_config
        if ssl is not None and not isinstance(ssl, ssl_module.SSLContext):
            raise TypeError(f"ssl must be a server ssl.SSLContext (fastnat.tls.server_context), not {type(ssl).__name__}")
        self.ssl = ssl
        # The keepalive of the servers' sessions: the process's settings (as
        # on the server's end of the same session) unless given here.
        settings = get_settings()
        session_options.setdefault("keepalive_interval", settings.keepalive_interval)
        session_options.setdefault("keepalive_timeout", settings.keepalive_timeout)
        self.session_options = session_options
        self.counters = _Counters()
        self._server: asyncio.Server | None = None
        self._servers: dict[str, _ServerLink] = {}
        self._links: set[_ServerLink] = set()
        self._splices: set[Splice] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tls_handshakes: set[asyncio.Task[None]] = set()
        self._pending_handshakes = 0
        self._ip_connections = AddressCounts(self.limits.max_connections_per_ip)
        self._ip_handshakes = AddressCounts(self.limits.max_handshakes_per_ip)
        # Per server id, when a byte rate limit or byte cap is set.
        self._quotas: dict[str, ServerQuota] = {}
        self._closing = False
        # Discovery: the registry service this forwarder hosts on its own
        # port (the embedded default), and where it advertises itself.
        self._host_registry = host_registry
        self.registry_service: Any = None
        self._registry_arg = registry
        self._registry: Registry | None = None
        self._advertise_arg = advertise
        self.advertised: ForwarderAddress | None = None
        self._advertised_now = False
        self._advertiser: asyncio.Task[None] | None = None
        self._advertise_wakeup: asyncio.Event | None = None

    # ------------------------------------------------------------- running

    async def start(self) -> None:
        """Start listening."""
        loop = asyncio.get_running_loop()
        if self._host_registry:
            from fastnat.discovery.service import RegistryService

            # Writes to the hosted registry need the same secrets as registrations.
            self.registry_service = RegistryService(secret=self.secret, secrets=self.secrets)
        # Plain TCP: each connection starts its own TLS handshake (start_tls),
        # so that the handshake is bounded and counted like the rest.
        self._server = await loop.create_server(lambda: _Handshake(self), self.host, self.requested_port)
        log.info(
            "forwarder listening on %s%s", ", ".join(f"{a[0]}:{a[1]}" for a in self.addresses), " (TLS)" if self.ssl else ""
        )
        self._start_advertising()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    @property
    def port(self) -> int:
        """The port it listens on (after :meth:`start`)."""
        return self.addresses[0][1]

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            pass

    def close(self) -> None:
        """Stop listening; close every server session and relayed connection."""
        if self._closing:
            return
        self._closing = True
        if self._advertiser is not None:
            self._advertiser.cancel()
        if self.registry_service is not None:
            self.registry_service.close()
        if self._server is not None:
            self._server.close()
        for handshake in list(self._tls_handshakes):
            handshake.cancel()
        for splice in list(self._splices):
            splice.close()
        for link in list(self._links):
            link.session.close()

    async def wait_closed(self) -> None:
        if self._advertiser is not None:
            await asyncio.gather(self._advertiser, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        for link in list(self._links):
            await link.session.wait_closed()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def __aenter__(self) -> Forwarder:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    # ---------------------------------------------------------- discovery

    def _advertised_address(self) -> ForwarderAddress:
        port = self.port
        text = self._advertise_arg
        if text:
            host, sep, port_text = text.rpartition(":")
            if sep and port_text.isdigit() and not text.endswith("]") and text.count(":") == 1:
                return ForwarderAddress(host, int(port_text), int(port_text))
            return ForwarderAddress(text.strip("[]"), port, port)
        bound = self.addresses[0][0]
        if bound not in ("0.0.0.0", "::", ""):
            return ForwarderAddress(bound, port, port)
        return ForwarderAddress(_primary_ip(), port, port)

    def _start_advertising(self) -> None:
        registry = self._registry_arg
        if isinstance(registry, str):
            registry = open_registry(registry, secret=self.secret)
        elif registry is None and self.registry_service is not None:
            from fastnat.discovery.memory import MemoryRegistry

            registry = MemoryRegistry(store=self.registry_service.store)
        self._registry = registry
        if registry is None:
            return
        self.advertised = self._advertised_address()
        self._advertise_wakeup = asyncio.Event()
        self._advertiser = asyncio.get_running_loop().create_task(self._advertise_forever())

    @property
    def full(self) -> bool:
        """True when no more server ids fit: the forwarder stops advertising itself."""
        return len(self._servers) >= self.limits.max_servers

    def _advertisement_changed(self) -> None:
        if self._advertise_wakeup is not None and self._advertised_now != (not self.full):
            self._advertise_wakeup.set()

    async def _advertise_forever(self) -> None:
        """Announce ``__NAT__FORWARDER__`` every announce_interval while there
        is room; withdraw it while full and when closing."""
        registry, address = self._registry, self.advertised
        assert registry is not None and address is not None and self._advertise_wakeup is not None
        value = address.advertisement()
        settings = get_settings()
        try:
            while True:
                for server_id in self._servers:
                    self._list_server(server_id, listed=True)  # renew before the TTL runs out
                try:
                    if self.full:
                        if self._advertised_now:
                            await registry.withdraw(FORWARDER_KEY, value)
                            self._advertised_now = False
                            log.info("full: no longer advertised in %s", registry.url)
                    else:
                        await registry.announce(FORWARDER_KEY, value, settings.announce_ttl)
                        if not self._advertised_now:
                            log.info("advertised as %s in %s", value, registry.url)
                        self._advertised_now = True
                except (OSError, ValueError) as exc:
                    log.warning("advertising in %s failed: %s", registry.url, exc)
                self._advertise_wakeup.clear()
                try:
                    await asyncio.wait_for(self._advertise_wakeup.wait(), settings.announce_interval)
                except (TimeoutError, asyncio.TimeoutError):
                    pass
        finally:
            if self._advertised_now:
                self._advertised_now = False
                try:
                    await asyncio.wait_for(asyncio.shield(registry.withdraw(FORWARDER_KEY, value)), 2)
                except (OSError, ValueError, TimeoutError, asyncio.TimeoutError, asyncio.CancelledError):
                    pass
            if self._registry_arg is not None and isinstance(self._registry_arg, str):
                await registry.close()

    def _list_server(self, server_id: str, *, listed: bool) -> None:
        """List (or unlist) a server id held here in the registry this forwarder
        hosts, as ``__NAT_SRV__<id>``: so one forwarder is a complete
        deployment even for a server that named the forwarder and no registry."""
        if self.registry_service is None or self.advertised is None:
            return
        key, value = server_key(server_id), self.advertised.server_value()
        store = self.registry_service.store
        if not listed:
            store.withdraw(key, value)
            return
        try:
            store.announce(key, value, get_settings().announce_ttl)
        except StoreFull as exc:
            log.warning("cannot list %r in the hosted registry: %s", server_id, exc)

    # ---------------------------------------------------------------- stats

    def stats(self, *, detail: bool = True) -> dict[str, Any]:
        """Counters, as the ``stats`` request returns them; ``detail=False``
        leaves out the per-server part (see :data:`STATS_DETAIL_POLICIES`)."""
        c = self.counters
        per_server = {}
        busiest = sorted(
            self._servers.items(), key=lambda item: (-c.server(item[0])["clients_active"], item[0])
        )[:STATS_MAX_SERVERS] if detail else []
        for server_id, link in busiest:
            entry = dict(c.server(server_id))
            entry["ports"] = sorted(link.ids.get(server_id, ()))
            entry["address"] = f"{link.peer[0]}:{link.peer[1]}"
            per_server[server_id] = entry
        return {
            "servers": len(self._servers),
            "sessions": len(self._links),
            "sessions_total": c.sessions_total,
            "clients_active": c.clients_active,
            "clients_total": c.clients_total,
            "bytes_client_to_server": c.bytes_client_to_server,
            "bytes_server_to_client": c.bytes_server_to_client,
            "pending_handshakes": self._pending_handshakes,
            "connections": self._ip_connections.total,
            "addresses": len(self._ip_connections),
            "refusals": dict(c.refusals),
            "per_server": per_server,
            "per_server_omitted": len(self._servers) - len(per_server),
            # Memory blocks the interpreter holds (cheap: a counter). Flat
            # under a steady load unless something leaks; bench/soak.py
            # watches it beside the resident set, which also counts what the
            # C allocator keeps after a peak.
            "python_blocks": sys.getallocatedblocks(),
        }

    # ------------------------------------------------------------ internals

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _drop(self, peer: tuple[str, int], reason: str, counter: str = "bad_input") -> None:
        log.warning("closing connection from %s:%s: %s", peer[0], peer[1], reason)
        self.counters.refuse(counter)

    def _handshake_done(self, ip: str) -> None:
        self._pending_handshakes -= 1
        self._ip_handshakes.release(ip)

    def _server_connected(self, link: _ServerLink) -> None:
        self._links.add(link)
        self.counters.sessions_total += 1
        link.task = self._spawn(link.run())

    def _server_gone(self, link: _ServerLink) -> None:
        link.handshake_over()
        if link.ip_slot:
            link.ip_slot = False
            self._ip_connections.release(link.peer[0])
        for server_id in list(link.ids):
            self._deregister(link, server_id)
        if link in self._links:
            self._links.discard(link)

    async def _drop_dead_holder(self, server_id: str, claimant: _ServerLink, proof: Any) -> None:
        """Before ``server_id`` is refused to ``claimant`` as taken, make sure
        its holder is alive: a server whose host lost its connection (a crash
        and a reboot behind a NAT, a partition that swallowed its goodbye)
        comes back as a new session while the old one still looks open here,
        and would be refused until the old one's next keepalive. The holder is
        pinged (within its keepalive timeout); one that does not answer is
        dropped now, and the id is free for the claimant."""
        holder = self._servers.get(server_id)
        if holder is None or holder is claimant:
            return
        if self._proof_problem(claimant, server_id, proof) is not None:
            return  # refused anyway: a claim without the secret costs the holder nothing
        try:
            await holder.session.ping()
        except (ConnectionError, TimeoutError) as exc:
            log.warning("%r: its session from %s:%d does not answer (%s); dropped for the one from %s:%d",
                        server_id, holder.peer[0], holder.peer[1], exc, claimant.peer[0], claimant.peer[1])
            holder.session._die("ping", exc)
            self._server_gone(holder)

    def _secret_for(self, server_id: str) -> bytes | None:
        if self.secrets is not None and server_id in self.secrets:
            return self.secrets[server_id]
        return self.secret

    def _proof_problem(self, link: _ServerLink, server_id: str, proof: Any) -> str | None:
        """Why ``link`` may not register ``server_id`` with ``proof``, or None."""
        if self.secret is None and self.secrets is None:
            return None
        secret = self._secret_for(server_id)
        if secret is None:
            return "no secret is known for this id"
        if not check_registration_proof(secret, link.nonce, server_id, proof):
            return "wrong or missing proof"
        return None

    def _register(self, link: _ServerLink, server_id: str, proof: Any) -> tuple[str, Any]:
        why = self._proof_problem(link, server_id, proof)
        if why is not None:
            log.warning("refused reg_serv %r from %s:%d: %s", server_id, link.peer[0], link.peer[1], why)
            self.counters.refuse("auth_failed")
            return Status.AUTH_FAILED, f"registration of {server_id!r} refused: {why}"
        holder = self._servers.get(server_id)
        if holder is not None and holder is not link:
            self.counters.refuse("id_taken")
            return Status.ID_TAKEN, f"{server_id!r} is held by another session"
        if holder is None:
            if len(self._servers) >= self.limits.max_servers:
                self.counters.refuse("servers_full")
                return Status.FULL, f"this forwarder holds its maximum of {self.limits.max_servers} servers"
            self._servers[server_id] = link
            link.ids[server_id] = set()
            self.counters.server(server_id)
            self._list_server(server_id, listed=True)
            if self.limits.server_byte_rate is not None or self.limits.server_byte_cap is not None:
                self._quotas[server_id] = ServerQuota(server_id, self.limits.server_byte_rate, self.limits.server_byte_cap)
            self._advertisement_changed()
            log.info("registered %r from %s:%d", server_id, link.peer[0], link.peer[1])
        return Status.OK, None

    def _deregister(self, link: _ServerLink, server_id: str) -> None:
        link.ids.pop(server_id, None)
        if self._servers.get(server_id) is link:
            del self._servers[server_id]
            self.counters.per_server.pop(server_id, None)
            self._list_server(server_id, listed=False)
            quota = self._quotas.pop(server_id, None)
            if quota is not None:
                quota.close()
            self._advertisement_changed()
            log.info("deregistered %r", server_id)

    async def _serve_client(self, hs: _Handshake, request: Request) -> None:
        """Serve a client's one request; for client_init, relay until done."""
        transport = hs.transport
        assert transport is not None
        keep = False
        try:
            name = request.request
            if name == "client_init":
                keep = await self._client_init(hs, request)
            elif name == "externaladdr":
                hs.reply(encode_reply(request.id, Status.OK, {"ip": hs.peer[0], "port": hs.peer[1]}))
            elif name == "bidirectional":
                reachable = await self._dial_back(hs.peer[0], request.value["ip"], request.value["port"])
                hs.reply(encode_reply(request.id, Status.OK, {"reachable": reachable, "seen": hs.peer[0]}))
            elif name == "stats":
                hs._finish()  # its handshake is over: the asker is not one of the pending
                local = transport.get_extra_info("sockname")
                detail = stats_detail_allowed(self.stats_detail, hs.peer[0], local[0] if local else None)
                hs.reply(encode_reply(request.id, Status.OK, self.stats(detail=detail)))
            else:
                hs._close(f"request {name!r} is not for a client connection")
                return
        except Exception:
            log.exception("serving %s from %s:%d failed", request.request, *hs.peer)
            transport.abort()
        finally:
            hs._finish()
            hs.release_ip_slot()  # served (and, for client_init, relayed until the end)
            if not keep and not transport.is_closing():
                transport.close()

    async def _client_init(self, hs: _Handshake, request: Request) -> bool:
        """Connect the client to the server; True once the splice runs."""
        transport = hs.transport
        assert transport is not None
        server_id, port = request.value["server"], request.value["port"]
        link = self._servers.get(server_id)

        def answer(status: str, reason: str, detail: str) -> bool:
            self.counters.refuse(reason, server_id)
            hs.reply(encode_reply(request.id, status, detail))
            return False

        if link is None:
            return answer(Status.NO_SERVER, "no_server", f"no server {server_id!r} is registered here")
        if port not in link.ids.get(server_id, ()):
            return answer(Status.FAILED, "no_port", f"{server_id!r} does not listen on port {port}")
        if link.clients[server_id] >= self.limits.max_clients_per_server:
            return answer(Status.BSY_SERVER, "busy", f"{server_id!r} has its maximum of {self.limits.max_clients_per_server} clients")
        quota = self._quotas.get(server_id)
        if quota is not None and quota.exhausted:
            return answer(
                Status.BSY_SERVER, "server_byte_cap",
                f"limit server_byte_cap: {server_id!r} has relayed its cap of {quota.cap} bytes",
            )
        if hs.lost or transport.is_closing():
            return False  # the client left while we looked
        open_request = encode_request(0, "open", {"server": server_id, "port": port, "client": [hs.peer[0], hs.peer[1]]})
        link.clients[server_id] += 1
        per = self.counters.server(server_id)
        try:
            try:
                stream = link.session.open_transport()
            except StreamLimitError as exc:
                return answer(
                    Status.BSY_SERVER, "session_streams_full",
                    f"limit max_streams_per_session: the session of {server_id!r} has its maximum of streams ({exc})",
                )
            except (ConnectionError, MuxError) as exc:
                return answer(Status.FAILED, "server_gone", f"the server's session is gone ({exc})")
            opener = FirstMessage(self.limits.max_message_size)
            stream.attach(opener)
            stream.write(open_request)
            try:
                async with asyncio.timeout(self.limits.open_timeout):
                    message = await opener.message
                reply = parse_reply(message)
            except (TimeoutError, asyncio.TimeoutError):
                stream.abort()
                return answer(Status.FAILED, "open_timeout", f"{server_id!r} did not accept within {self.limits.open_timeout:g} s")
            except (ConnectionError, ControlProtocolError) as exc:
                stream.abort()
                return answer(Status.FAILED, "refused", f"{server_id!r} did not accept: {exc}")
            if reply.status != Status.ACCEPTED:
                stream.close()
                return answer(Status.FAILED, "refused", f"{server_id!r} refused the connection ({reply.value})")
            if hs.lost or transport.is_closing():
                stream.abort()
                return False
            hs.reply(encode_reply(request.id, Status.CONFIRMED, None))
            self.counters.clients_total += 1
            self.counters.clients_active += 1
            per["clients_total"] += 1
            per["clients_active"] += 1
            splice = Splice(
                transport,
                stream,
                initial_a=bytes(hs.buffer),
                initial_b=bytes(opener.rest),
                eof_a=hs.eof,
                eof_b=opener.eof,
                error_b=opener.error,
                on_bytes=lambda direction, n: self._count_bytes(server_id, direction, n),
                meter=quota,
            )
            hs.buffer.clear()
            splice.resume_reading()
            self._splices.add(splice)
            if quota is not None:
                quota.add(splice)
            hs._finish()
            try:
                await splice.done
            finally:
                if quota is not None:
                    quota.discard(splice)
                self._splices.discard(splice)
                self.counters.clients_active -= 1
                per["clients_active"] -= 1
            return True
        finally:
            link.clients[server_id] -= 1
            if link.clients[server_id] <= 0:
                del link.clients[server_id]

    def _count_bytes(self, server_id: str, direction: str, n: int) -> None:
        key = "bytes_client_to_server" if direction == "a>b" else "bytes_server_to_client"
        setattr(self.counters, key, getattr(self.counters, key) + n)
        entry = self.counters.per_server.get(server_id)
        if entry is not None:
            entry[key] += n

    async def _dial_back(self, seen_ip: str, claimed_ip: str, port: int) -> bool:
        """The seed's bidirectional check: is ``seen_ip:port`` reachable from here?

        Only the address the request came from is ever dialled, never one
        the caller names; ``claimed_ip`` only decides whether to try.
        """
        if claimed_ip != seen_ip:
            return False  # an address translator is in the way
        probe = _secrets.token_bytes(_ECHO_PROBE_SIZE)
        timeout = self.limits.dial_back_timeout
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(seen_ip, port), timeout)
        except (OSError, TimeoutError, asyncio.TimeoutError):
            return False
        try:
            writer.write(probe)
            await asyncio.wait_for(writer.drain(), timeout)
            echoed = await asyncio.wait_for(reader.readexactly(len(probe)), timeout)
            return echoed == probe
        except (OSError, TimeoutError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), timeout)
            except (OSError, TimeoutError, asyncio.TimeoutError):
                pass


"""The Seattle NAT layer's functions, with their original names and signatures.

Blocking, for ordinary threaded code. ``nat_openconn`` returns a real
``socket.socket`` whose bytes are the server's; ``nat_waitforconn`` calls
``function(remoteip, remoteport, sock, thiscommhandle, listencommhandle)`` in a
worker thread for each client, with ``sock`` a socket-like stream
(:class:`fastnat.blocking.StreamSocket`). Servers run on fastnat's background
event loop thread.

Forwarders: the call's arguments, else ``FASTNAT_FORWARDERS``, else
:func:`fastnat.configure`. Errors are :mod:`fastnat.errors` classes, which
subclass ``OSError`` (the seed raised ``EnvironmentError``).
"""

from __future__ import annotations

import itertools
import logging
import random
import socket
import ssl as ssl_module
import threading
import time
from collections.abc import Callable
from typing import Any

from fastnat.aio.client import combine_failures
from fastnat.aio.server import Registration, get_registration
from fastnat.aio.stream import StreamTransport
from fastnat.blocking import _make_socket, run_in_loop, StreamSocket
from fastnat.errors import ControlProtocolError, ForwarderUnreachableError, NATLayerError
from fastnat.protocol import (
    MAX_MESSAGE_SIZE,
    ROLE_CLIENT,
    HelloReplyReader,
    Reply,
    Status,
    decode_message_body,
    decode_message_length,
    encode_hello,
    encode_request,
    hello_error,
    parse_reply,
    reply_error,
    validate_port,
    validate_server_id,
)
from fastnat.locate import (
    cached_forwarders,
    forget_server,
    forwarders_for_client,
    forwarders_for_server,
    remember_working,
)
from fastnat.settings import choose_forwarders, get_settings, registry_url, static_forwarders
from fastnat.tls import client_tls, closed_during_hello, connect_failure

__all__ = [
    "nat_openconn",
    "nat_waitforconn",
    "nat_stopcomm",
    "nat_waitforconn_alive",
    "nat_check_bi_directional",
    "getmy_external_ip",
    "behind_nat",
    "nat_getmyid",
    "NATListenHandle",
]

log = logging.getLogger("fastnat.natlayer")

# How long the forwarder's dial-back probe may take once it has connected
# to the temporary listener of nat_check_bi_directional.
_PROBE_WAIT = 5.0
# How often the listener's thread looks whether the check is over.
_PROBE_POLL = 0.1


# ------------------------------------------------------------------ client


def _recv_exactly(
    sock: socket.socket, n: int, deadline: float, where: str, closed: str = "the forwarder closed the connection"
) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ForwarderUnreachableError(f"{where}: no answer in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(chunks))
        except TimeoutError:
            raise ForwarderUnreachableError(f"{where}: no answer in time") from None
        except ConnectionResetError:
            raise ForwarderUnreachableError(f"{where}: {closed}") from None
        except OSError as exc:
            raise ForwarderUnreachableError(f"{where}: {exc.strerror or exc}") from exc
        if not chunk:
            raise ForwarderUnreachableError(f"{where}: {closed}")
        chunks += chunk
    return bytes(chunks)


def _client_request(
    host: str,
    port: int,
    name: str,
    value: Any,
    timeout: float,
    source: tuple[str, int] | None = None,
    ssl: Any = None,
) -> tuple[socket.socket, Reply]:
    """One client request on a fresh connection; reads exactly the hello
    reply and the reply, so the socket holds nothing but what follows.
    With TLS (``ssl``, see :func:`fastnat.tls.client_tls`) the socket is an
    ``ssl.SSLSocket`` whose handshake is done."""
    where = f"forwarder {host}:{port}"
    context = client_tls(ssl)
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout, source_address=source)
        if context is not None:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock = context.wrap_socket(sock, server_hostname=host)  # closes the socket if the handshake fails
    except TimeoutError:
        what = "connection and TLS handshake" if context is not None else "connection"
        raise ForwarderUnreachableError(f"{where}: no {what} within {timeout:g} s") from None
    except (OSError, ssl_module.SSLError) as exc:
        raise ForwarderUnreachableError(f"{where}: {connect_failure(exc, context is not None)}") from exc
    closed = closed_during_hello(context is not None)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(encode_hello(ROLE_CLIENT) + encode_request(1, name, value))
        parser = HelloReplyReader()
        head = _recv_exactly(sock, HelloReplyReader.max_size() - 255, deadline, where, closed)
        try:
            hello = parser.feed(head)
            if hello is None:
                hello = parser.feed(_recv_exactly(sock, head[-1], deadline, where))
        except ControlProtocolError as exc:
            raise ControlProtocolError(f"{where}: {exc}") from None
        assert hello is not None
        error = hello_error(hello, where)
        if error is not None:
            raise error
        length = decode_message_length(_recv_exactly(sock, 4, deadline, where), MAX_MESSAGE_SIZE)
        reply = parse_reply(decode_message_body(_recv_exactly(sock, length, deadline, where)))
    except BaseException:
        sock.close()
        raise
    return sock, reply


def _client_candidates(server_id: str, host: str | None, port: int | None, fresh: bool = False) -> list[tuple[str, int]]:
    """Forwarders to try for ``server_id``: explicit; else the ones that
    worked before; else (or ``fresh``) registry-listed and static ones (see
    :mod:`fastnat.locate`)."""
    if host is not None:
        return choose_forwarders(host, port)
    cached = [] if fresh else cached_forwarders(server_id)
    if cached:
        return cached
    if registry_url():
        return run_in_loop(forwarders_for_client(server_id, fresh=True), get_settings().request_timeout)
    return static_forwarders() or choose_forwarders()


def _any_forwarders(host: str | None, port: int | None) -> list[tuple[str, int]]:
    """Forwarders for a request any forwarder answers (externaladdr, bidirectional)."""
    if host is not None or not registry_url():
        return choose_forwarders(host, port)
    found = run_in_loop(forwarders_for_server(), get_settings().request_timeout)
    return [f.client_address for f in found]


def nat_openconn(
    destmac: str,
    destport: int,
    localip: str | None = None,
    localport: int | None = None,
    timeout: float = 5,
    forwarderIP: str | None = None,  # noqa: N803 - the seed's name
    forwarderPort: int | None = None,  # noqa: N803
    usetimeoutsock: bool = False,
    *,
    ssl: Any = None,
) -> socket.socket:
    """Open a connection to port ``destport`` of the server ``destmac``.

    Returns a connected ``socket.socket``: the handshake is done, and the
    bytes are the server's. ``timeout`` bounds the connect and the handshake;
    with ``usetimeoutsock`` the socket keeps it as its timeout, otherwise it is
    blocking. Every forwarder configured is tried; one error names them all.
    ``ssl``: TLS to the forwarder, an ``ssl.SSLContext``, a CA file path,
    True (the system's CAs) or False; None takes the configured default
    (:mod:`fastnat.tls`). Over TLS the socket is an ``ssl.SSLSocket``, which
    cannot half-close: ``shutdown`` ends TLS on it, so close it instead.
    """
    context = client_tls(ssl)
    validate_server_id(destmac)
    validate_port(destport)
    source = (localip or "", localport or 0) if (localip or localport) else None
    failures: list[tuple[str, BaseException]] = []
    tried: set[tuple[str, int]] = set()
    from_cache = forwarderIP is None and bool(cached_forwarders(destmac))
    for fresh in ((False, True) if from_cache else (False,)):
        if fresh:
            forget_server(destmac)  # what worked before failed: look again
            try:
                candidates = _client_candidates(destmac, forwarderIP, forwarderPort, fresh=True)
            except NATLayerError as exc:
                failures.append(("lookup", exc))
                break
        else:
            candidates = _client_candidates(destmac, forwarderIP, forwarderPort)
        for host, port in candidates:
            if (host, port) in tried:
                continue
            tried.add((host, port))
            where = f"forwarder {host}:{port}"
            try:
                sock, reply = _client_request(
                    host, port, "client_init", {"server": destmac, "port": destport}, timeout, source, context or False
                )
            except NATLayerError as exc:
                failures.append((where, exc))
                continue
            if reply.status == Status.CONFIRMED:
                remember_working(destmac, (host, port))
                sock.settimeout(timeout if usetimeoutsock else None)
                return sock
            sock.close()
            failures.append((where, reply_error(reply, f"{destmac!r} port {destport} via {where}")))
    forget_server(destmac)
    raise combine_failures(f"nat_openconn to {destmac!r} port {destport}", failures)


def _simple_request(
    name: str, value: Any, host: str | None, port: int | None, timeout: float = 5.0, ssl: Any = None
) -> Any:
    failures: list[tuple[str, BaseException]] = []
    for fhost, fport in _any_forwarders(host, port):
        where = f"forwarder {fhost}:{fport}"
        try:
            sock, reply = _client_request(fhost, fport, name, value, timeout, ssl=ssl)
        except NATLayerError as exc:
            failures.append((where, exc))
            continue
        sock.close()
        if reply.status == Status.OK:
            return reply.value
        failures.append((where, reply_error(reply, f"{name} at {where}")))
    raise combine_failures(name, failures)


def getmy_external_ip(forwarderIP: str | None = None, forwarderPort: int | None = None, *, ssl: Any = None) -> str:  # noqa: N803
    """The IP address a forwarder sees this host connect from (``ssl`` as for :func:`nat_openconn`)."""
    return str(_simple_request("externaladdr", None, forwarderIP, forwarderPort, ssl=ssl)["ip"])


def behind_nat(forwarderIP: str | None = None, forwarderPort: int | None = None, *, ssl: Any = None) -> bool:  # noqa: N803
    """True when the address a forwarder sees differs from this host's own."""
    failures: list[tuple[str, BaseException]] = []
    for host, port in _any_forwarders(forwarderIP, forwarderPort):
        where = f"forwarder {host}:{port}"
        try:
            sock, reply = _client_request(host, port, "externaladdr", None, 5.0, ssl=ssl)
        except NATLayerError as exc:
            failures.append((where, exc))
            continue
        try:
            local_ip = sock.getsockname()[0]
        finally:
            sock.close()
        if reply.status != Status.OK:
            failures.append((where, reply_error(reply, f"externaladdr at {where}")))
            continue
        return bool(reply.value["ip"] != local_ip)
    raise combine_failures("behind_nat", failures)


def nat_getmyid() -> str:
    """An id for this host, as the seed made it: its IP address, ``#``, a random number."""
    ip = "127.0.0.1"
    forwarders = static_forwarders()
    if forwarders:
        ip = _local_ip_towards(forwarders[0][0])
    return f"{ip}#{random.randrange(1, 2**31)}"


def _local_ip_towards(host: str) -> str:
    """The local address used to reach ``host``; a UDP connect sends no packet."""
    try:
        info = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(info[0], socket.SOCK_DGRAM) as probe:
            probe.connect(info[4])
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def nat_check_bi_directional(
    localip: str,
    port: int,
    forwarderIP: str | None = None,  # noqa: N803
    forwarderCltPort: int | None = None,  # noqa: N803
    *,
    ssl: Any = None,
) -> bool:
    """True if this host needs the NAT layer: a forwarder cannot connect
    back to ``localip:port`` (listened on meanwhile) and echo a test string.
    ``ssl`` is for the request to the forwarder; the probe is plain TCP."""
    context = client_tls(ssl)
    if forwarderIP is not None or not registry_url():
        choose_forwarders(forwarderIP, forwarderCltPort)  # fail early when none is configured
    listener = socket.socket(socket.AF_INET6 if ":" in localip else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((localip, port))
    listener.listen(1)
    listener.settimeout(_PROBE_POLL)
    stop = threading.Event()

    def echo_one() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(_PROBE_WAIT)
                try:
                    data = conn.recv(64)
                    conn.sendall(data)
                except OSError:
                    pass

    thread = threading.Thread(target=echo_one, name="fastnat-bidirectional-probe", daemon=True)
    thread.start()
    try:
        value = _simple_request("bidirectional", {"ip": localip, "port": port}, forwarderIP, forwarderCltPort, ssl=context or False)
    finally:
        stop.set()
        listener.close()
        thread.join(_PROBE_WAIT + _PROBE_POLL + 1)
    return not bool(value["reachable"])


# ------------------------------------------------------------------ server


class NATListenHandle:
    """What ``nat_waitforconn`` returns; pass it to ``nat_stopcomm``."""

    def __init__(self, registration: Registration, server_id: str, port: int, errdel: Any) -> None:
        self.registration = registration
        self.server_id = server_id
        self.port = port
        self.errdel = errdel
        self.stopped = False

    @property
    def alive(self) -> bool:
        return not self.stopped and self.registration.alive

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else ("alive" if self.alive else "down")
        return f"<NATListenHandle {self.server_id!r} port {self.port} {state}>"


class NATCommHandle:
    """The ``thiscommhandle`` given to a connection's function: closes that connection."""

    def __init__(self, sock: StreamSocket) -> None:
        self.sock = sock

    def close(self) -> None:
        self.sock.close()


_handles_lock = threading.Lock()
_handles: list[NATListenHandle] = []
_thread_names = itertools.count(1)


def nat_waitforconn(
    localmac: str,
    localport: int,
    function: Callable[..., Any],
    forwarderIP: str | None = None,  # noqa: N803
    forwarderPort: int | None = None,  # noqa: N803
    forwarderCltPort: int | None = None,  # noqa: N803
    errdel: Callable[[Any, str, BaseException], Any] | None = None,
    persist: bool = True,
    *,
    redundancy: int = 1,
    ssl: Any = None,
) -> NATListenHandle:
    """Accept connections to ``localport`` of server id ``localmac`` through a forwarder.

    ``function(remoteip, remoteport, sock, thiscommhandle, listencommhandle)``
    runs in its own thread for each client; an exception in it is logged and
    closes that one stream. Registering a second port for the same id reuses
    the session. ``errdel(session, where, exception)`` is called at each
    failure of the forwarder link; with ``persist`` the link is re-made.
    ``forwarderCltPort`` is accepted for compatibility: a fastnat forwarder
    serves clients and servers on one port. With no forwarder named, one is
    found in the registry (or the configured list); ``redundancy=N`` holds
    the registration at N forwarders at once, all of them announced.
    ``ssl``: TLS to the forwarders, as for :func:`nat_openconn`; it applies
    when the id's session is first made.
    """
    context = client_tls(ssl)
    validate_server_id(localmac)
    validate_port(localport)
    if not callable(function):
        raise TypeError("function must be callable")
    forwarder = None
    if forwarderIP is not None:
        if forwarderPort is None:
            raise ValueError("forwarderIP was given without forwarderPort")
        forwarder = (forwarderIP, int(forwarderPort))
    handle_box: list[NATListenHandle] = []

    def on_stream(transport: StreamTransport, initial: bytes) -> None:
        sock = _make_socket(transport, initial)
        remote = transport.get_extra_info("peername") or ("", 0)
        listen = handle_box[0] if handle_box else None

        def run() -> None:
            try:
                function(remote[0], remote[1], sock, NATCommHandle(sock), listen)
            except Exception:
                log.exception("nat_waitforconn function for %r port %d failed; closing its stream", localmac, localport)
                sock.close()

        threading.Thread(target=run, name=f"fastnat-conn-{next(_thread_names)}", daemon=True).start()

    async def register() -> Registration:
        registration = await get_registration(
            localmac, forwarder=forwarder, persist=persist, redundancy=redundancy, ssl=context or False
        )
        if errdel is not None:
            registration.error_delegates.append(errdel)
        try:
            await registration.add_port(localport, on_stream)
        except BaseException:
            if errdel is not None and errdel in registration.error_delegates:
                registration.error_delegates.remove(errdel)
            if not registration.ports:
                await registration.close()
            raise
        return registration

    registration = run_in_loop(register(), get_settings().request_timeout * 3)
    handle = NATListenHandle(registration, localmac, localport, errdel)
    handle_box.append(handle)
    with _handles_lock:
        _handles.append(handle)
    return handle


def nat_stopcomm(handle: Any) -> bool:
    """Stop listening: deregister the port, then the id when its last port
    goes, then close the session. Calling it twice is harmless.

    Also accepts the ``thiscommhandle`` of a connection (closes it).
    """
    if isinstance(handle, NATCommHandle):
        handle.close()
        return True
    if not isinstance(handle, NATListenHandle):
        raise TypeError(f"nat_stopcomm needs a handle from nat_waitforconn, not {type(handle).__name__}")
    if handle.stopped:
        return False
    handle.stopped = True
    with _handles_lock:
        if handle in _handles:
            _handles.remove(handle)
    registration = handle.registration

    async def stop() -> None:
        if handle.errdel is not None and handle.errdel in registration.error_delegates:
            registration.error_delegates.remove(handle.errdel)
        await registration.remove_port(handle.port)

    run_in_loop(stop(), get_settings().request_timeout * 3)
    return True


def nat_waitforconn_alive() -> bool:
    """True when every active ``nat_waitforconn`` is connected to its
    forwarder and registered there (and there is at least one)."""
    with _handles_lock:
        handles = list(_handles)
    return bool(handles) and all(h.alive for h in handles)

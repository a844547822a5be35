"""TLS on the links to a forwarder: building contexts, and reading what a caller gave.

A forwarder serves TLS with :func:`server_context` (a certificate chain and
its key). Servers and clients dial it with a client context that verifies
the forwarder's certificate and its name (the host dialled: a DNS name, or
an IP address matched against the certificate's IP entries), TLS 1.2 or
later. What a caller gives as ``ssl=`` is read by :func:`client_tls`:

* an :class:`ssl.SSLContext`: used as it is;
* a path: a CA file (PEM) or directory that signs the forwarder's certificate;
* ``True``: the system's CA store;
* ``False``: plain TCP, whatever is configured;
* ``None``: the process default, :func:`fastnat.configure`\\ ``(tls=...)``,
  else ``FASTNAT_TLS_CA=path``, else ``FASTNAT_TLS=1`` (the system's CAs),
  else plain TCP.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any

__all__ = [
    "TLS_CA_ENV",
    "TLS_ENV",
    "SHUTDOWN_TIMEOUT",
    "TLSConfigError",
    "client_context",
    "client_tls",
    "describe_tls_error",
    "server_context",
]

TLS_CA_ENV = "FASTNAT_TLS_CA"
TLS_ENV = "FASTNAT_TLS"

# The oldest protocol either side accepts: TLS 1.0 and 1.1 are deprecated
# (RFC 8996).
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# Closing a TLS connection waits for the peer's close_notify, one round trip;
# asyncio waits 30 s by default, which lets a peer that never answers hold a
# descriptor that long. 5 s is many round trips on any link.
SHUTDOWN_TIMEOUT = 5.0


class TLSConfigError(ValueError):
    """A certificate, key or CA file that cannot be used (the message says which and why)."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        return exc.strerror
    reason = getattr(exc, "reason", None)
    return str(reason).replace("_", " ").lower() if reason else (str(exc) or type(exc).__name__)


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A server context from a PEM certificate chain and its private key
    (``key`` may be omitted when ``cert`` holds both)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    for what, path in (("certificate", cert), ("key", key)):
        if path is not None and not os.access(path, os.R_OK):
            raise TLSConfigError(f"cannot read the TLS {what} file {os.fspath(path)!r}")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"the TLS key {os.fspath(key or cert)!r} does not belong to the certificate {os.fspath(cert)!r}") from None
        raise TLSConfigError(
            f"cannot load the TLS certificate {os.fspath(cert)!r} and key {os.fspath(key or cert)!r} "
            f"(PEM files expected): {_reason(exc)}"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"cannot load the TLS certificate {os.fspath(cert)!r}: {_reason(exc)}") from None
    return context


# CA path (None: the system store) -> its context. A context is immutable
# once made here and is shared by every connection: loading a CA store costs
# milliseconds, a connection should not pay it.
_contexts: dict[str | None, ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def client_context(ca: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A client context that verifies the peer's certificate and host name
    against ``ca`` (a PEM file or a directory of them), or the system's CA
    store when ``ca`` is None."""
    key = None if ca is None else os.path.abspath(os.fspath(ca))
    with _contexts_lock:
        context = _contexts.get(key)
        if context is not None:
            return context
        if key is not None and not os.access(key, os.R_OK):
            raise TLSConfigError(f"cannot read the TLS CA file {os.fspath(ca)!r}")  # type: ignore[arg-type]
        try:
            if key is None:
                context = ssl.create_default_context()
            elif os.path.isdir(key):
                context = ssl.create_default_context(capath=key)
            else:
                context = ssl.create_default_context(cafile=key)
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(f"cannot load the TLS CA file {os.fspath(ca)!r} (PEM expected): {_reason(exc)}") from None  # type: ignore[arg-type]
        context.minimum_version = MINIMUM_VERSION
        _contexts[key] = context
        return context


def _env_default() -> ssl.SSLContext | None:
    ca = os.environ.get(TLS_CA_ENV, "").strip()
    if ca:
        return client_context(ca)
    flag = os.environ.get(TLS_ENV, "").strip().lower()
    if flag in ("", "0", "no", "false", "off"):
        return None
    if flag in ("1", "yes", "true", "on"):
        return client_context()
    raise TLSConfigError(f"{TLS_ENV} must be 1 or 0, got {flag!r}")


def client_tls(value: Any = None) -> ssl.SSLContext | None:
    """The client context for ``value`` (see the module's docstring); None means plain TCP."""
    if value is None:
        from fastnat.settings import get_settings

        configured = get_settings().tls
        if configured is not None:
            return client_tls(configured)
        return _env_default()
    if isinstance(value, ssl.SSLContext):
        return value
    if value is True:
        return client_context()
    if value is False:
        return None
    if isinstance(value, (str, os.PathLike)):
        if not os.fspath(value):
            raise TLSConfigError("the TLS CA path is empty")
        return client_context(value)
    raise TypeError(f"ssl must be an ssl.SSLContext, a CA file path, True or False, not {type(value).__name__}")


def describe_tls_error(exc: BaseException) -> str:
    """What went wrong in a client's TLS handshake, in one phrase."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or _reason(exc)
        return f"TLS certificate verification failed: {detail}"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, EOFError)):
        return "the connection closed during the TLS handshake (does the forwarder serve TLS?)"
    return f"TLS handshake failed: {_reason(exc)}"


def connect_failure(exc: BaseException, tls: bool) -> str:
    """Why dialling a forwarder or registry failed, in one phrase (``tls``:
    whether the dial used TLS, so that a reset means a failed handshake)."""
    if isinstance(exc, ssl.SSLError) or (tls and isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, EOFError))):
        return describe_tls_error(exc)
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int) and errno:
        return os.strerror(errno)  # "Connection refused", not asyncio's "Connect call failed (...)"
    return str(exc) or type(exc).__name__


def closed_during_hello(tls: bool) -> str:
    """The phrase for a connection that closed before the hello reply; without
    TLS, the likely cause is a forwarder that serves TLS."""
    if tls:
        return "the connection closed during the hello"
    return "the connection closed during the hello (if the forwarder serves TLS, connect with TLS: ssl= or --tls-ca)"


def connect_options(context: ssl.SSLContext | None, host: str, timeout: float) -> dict[str, Any]:
    """Keywords of ``loop.create_connection`` for TLS to ``host`` (none for plain TCP).

    The host dialled is the name checked: a DNS name against the
    certificate's DNS entries, an IP address against its IP entries.
    """
    if context is None:
        return {}
    return {
        "ssl": context,
        "server_hostname": host,
        "ssl_handshake_timeout": timeout,
        "ssl_shutdown_timeout": SHUTDOWN_TIMEOUT,
    }


def can_half_close(transport: Any) -> bool:
    """False for a TLS transport: asyncio's (and uvloop's) TLS transports
    cannot send an end of stream and keep the other direction open; a
    protocol's ``eof_received`` returning True has no effect on them, and
    ``write_eof`` raises. A relay closes such a transport instead of
    half-closing it."""
    return transport is None or transport.get_extra_info("sslcontext") is None

"""Exceptions raised by fastnat.

The multiplexer's errors derive from :class:`MuxError`. They are defined here,
in pure Python, so that ``except`` clauses and ``isinstance`` checks work the
same whichever engine (compiled or pure Python) is running.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MuxError",
    "ProtocolError",
    "StreamClosedError",
    "StreamLimitError",
    "SessionClosedError",
    "NATLayerError",
    "NoForwarderError",
    "ForwarderUnreachableError",
    "ForwarderBusyError",
    "ControlProtocolError",
    "ProtocolVersionError",
    "ServerNotFoundError",
    "ServerBusyError",
    "ServerRefusedError",
    "IdTakenError",
    "AuthenticationError",
    "NotRegisteredError",
    "RegistryUnavailableError",
]


class MuxError(Exception):
    """Base class of the multiplexer's errors."""


class ProtocolError(MuxError):
    """The peer broke the yamux protocol; the session is dead.

    The engine has queued a Go Away frame with the protocol-error code (send
    it with ``data_to_send()``), and every later command raises this again.
    ``events`` holds the events decoded from the same input before the
    offending frame, so that nothing the peer sent correctly is lost.
    """

    def __init__(self, message: str, events: list[Any] | None = None) -> None:
        super().__init__(message)
        self.events: list[Any] = events if events is not None else []


class StreamClosedError(MuxError):
    """The stream does not exist (never opened, reset, or closed both ways)
    or this side has already ended it."""


class StreamLimitError(MuxError):
    """A configured limit (concurrent streams, stream ids, pending pings) is reached."""


class SessionClosedError(MuxError):
    """No new streams: a Go Away was sent or received."""


# ---------------------------------------------------------------- NAT layer
#
# The NAT layer's errors subclass OSError, as the Seattle NAT layer raised
# EnvironmentError (an alias of OSError): ``except EnvironmentError:`` still
# catches them. Each says what happened and where.


class NATLayerError(OSError):
    """Base class of the NAT layer's errors.

    ``failures`` lists ``(where, exception)`` for every forwarder tried when
    an operation tried several.
    """

    def __init__(self, *args: Any, failures: list[tuple[str, BaseException]] | None = None) -> None:
        super().__init__(*args)
        self.failures: list[tuple[str, BaseException]] = failures or []


class NoForwarderError(NATLayerError):
    """No forwarder is configured and none was given."""


class ForwarderUnreachableError(NATLayerError):
    """The forwarder could not be reached, or the link to it was lost."""


class ForwarderBusyError(NATLayerError):
    """The forwarder is at a limit (handshakes, servers) and turned us away."""


class ControlProtocolError(NATLayerError):
    """The peer does not speak fastnat's control protocol (or broke it)."""


class ProtocolVersionError(ControlProtocolError):
    """The forwarder speaks none of the protocol versions this side speaks."""


class ServerNotFoundError(NATLayerError):
    """No server with that id is registered at the forwarder (``NO_SERVER``)."""


class ServerBusyError(NATLayerError):
    """The server has as many clients as the forwarder allows (``BSY_SERVER``)."""


class ServerRefusedError(NATLayerError):
    """The server does not listen on that port, or refused the connection (``FAILED``)."""


class IdTakenError(NATLayerError):
    """Another session holds that server id at the forwarder (``ID_TAKEN``)."""


class AuthenticationError(NATLayerError):
    """The forwarder demands proof of the id's secret and it was wrong or missing (``AUTH_FAILED``)."""


class NotRegisteredError(NATLayerError):
    """The id or port is not registered by this session (``NOT_REGISTERED``)."""


class RegistryUnavailableError(ForwarderUnreachableError):
    """The registry (``fastnat://`` service or Redis) could not be reached, or
    the link to it was lost. A :class:`ForwarderUnreachableError`, as the
    built-in registry is usually hosted by a forwarder, so that code catching
    that error also catches this one."""

"""Process-wide settings of the NAT layer, and where forwarders come from.

Forwarders are chosen, in order: the arguments of the call; else the
``FASTNAT_FORWARDERS`` environment variable (``host:port,host:port``); else
:func:`configure`\\ ``(forwarders=[...])``. With none of them, the call fails
with :class:`fastnat.errors.NoForwarderError`, which says how to set one.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable
from typing import Any

from fastnat.errors import NoForwarderError
from fastnat.mux_config import MuxConfig

__all__ = ["configure", "get_settings", "parse_forwarders", "choose_forwarders", "Settings", "FORWARDERS_ENV"]

FORWARDERS_ENV = "FASTNAT_FORWARDERS"
SECRET_ENV = "FASTNAT_SECRET"

# The forwarder's port when an address names none: fastnat's registered-
# nowhere default, the same for both roles.
DEFAULT_FORWARDER_PORT = 12_345


@dataclasses.dataclass
class Settings:
    """What :func:`configure` sets."""

    forwarders: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    # Secret for proving ownership of server ids (bytes), if the forwarders demand it.
    secret: bytes | None = None
    mux_config: MuxConfig | None = None
    # Keepalive of the server->forwarder session (hashicorp/yamux's defaults).
    keepalive_interval: float = 30.0
    keepalive_timeout: float = 10.0
    # Reconnecting a persistent server: exponential backoff from the first
    # delay, doubling up to the cap, with +-50% jitter so that many servers
    # cut off together do not return together.
    reconnect_initial_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    # How long a server waits for the forwarder to answer a control request.
    request_timeout: float = 10.0


_lock = threading.Lock()
_settings = Settings()


def get_settings() -> Settings:
    return _settings


def configure(
    *,
    forwarders: Iterable[str | tuple[str, int]] | None = None,
    secret: bytes | str | None = None,
    mux_config: MuxConfig | None = None,
    **options: Any,
) -> None:
    """Set process-wide defaults of the NAT layer.

    ``forwarders``: addresses (``"host:port"`` or ``(host, port)``) used when a
    call names none and ``FASTNAT_FORWARDERS`` is unset. ``secret``: the
    secret proving this process's server ids. Other keywords set the fields of
    :class:`Settings`.
    """
    with _lock:
        if forwarders is not None:
            _settings.forwarders = [_parse_one(f) for f in forwarders]
        if secret is not None:
            _settings.secret = secret.encode() if isinstance(secret, str) else secret
        if mux_config is not None:
            _settings.mux_config = mux_config
        for name, value in options.items():
            if not hasattr(_settings, name) or name.startswith("_"):
                raise TypeError(f"configure() got an unknown setting {name!r}")
            setattr(_settings, name, value)


def _parse_one(entry: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(entry, tuple):
        host, port = entry
    else:
        text = entry.strip()
        if text.startswith("["):  # [ipv6]:port
            host, _, port_text = text[1:].partition("]")
            port_text = port_text.lstrip(":")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                host, port_text = text, ""
        try:
            port = int(port_text) if port_text else DEFAULT_FORWARDER_PORT
        except ValueError:
            raise ValueError(f"bad forwarder address {entry!r}: the port is not a number") from None
    if not host:
        raise ValueError(f"bad forwarder address {entry!r}: no host")
    if not 0 < int(port) < 65536:
        raise ValueError(f"bad forwarder address {entry!r}: port out of range")
    return str(host), int(port)


def parse_forwarders(text: str) -> list[tuple[str, int]]:
    """Parse ``"host:port,host:port"``."""
    return [_parse_one(part) for part in text.split(",") if part.strip()]


def choose_forwarders(host: str | None = None, port: int | None = None) -> list[tuple[str, int]]:
    """The forwarders to try, in order (see the module's docstring)."""
    if host is not None:
        if port is None:
            raise ValueError("forwarderIP was given without forwarderPort")
        return [(host, int(port))]
    env = os.environ.get(FORWARDERS_ENV, "").strip()
    if env:
        return parse_forwarders(env)
    if _settings.forwarders:
        return list(_settings.forwarders)
    raise NoForwarderError(
        "no forwarder is configured: pass forwarderIP and forwarderPort, set "
        f"{FORWARDERS_ENV}=host:port[,host:port...], or call fastnat.configure(forwarders=['host:port'])"
    )


def secret_from_env() -> bytes | None:
    value = os.environ.get(SECRET_ENV)
    return value.encode() if value else None

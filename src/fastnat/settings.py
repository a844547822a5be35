"""Process-wide settings of the NAT layer, and where forwarders come from.

Forwarders are chosen, in order: the arguments of the call; else a registry
(``FASTNAT_REGISTRY`` or :func:`configure`\\ ``(registry=...)``), where
forwarders advertise themselves and servers their forwarders; else a static
list, the ``FASTNAT_FORWARDERS`` environment variable (``host:port,...``) or
:func:`configure`\\ ``(forwarders=[...])``, which needs no registry at all.
With none of them, the call fails with
:class:`fastnat.errors.NoForwarderError`, which says how to set one.
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
REGISTRY_ENV = "FASTNAT_REGISTRY"
SECRET_ENV = "FASTNAT_SECRET"

# The seed's registry keys and value formats.
FORWARDER_KEY = "__NAT__FORWARDER__"  # value: "ip*serverport*clientport"
SERVER_KEY_PREFIX = "__NAT_SRV__"  # key: prefix + id, value: "forwarderip*clientport"

# The forwarder's port when an address names none: fastnat's registered-
# nowhere default, the same for both roles.
DEFAULT_FORWARDER_PORT = 12_345


@dataclasses.dataclass
class Settings:
    """What :func:`configure` sets."""

    forwarders: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    # Registry URL (memory://, fastnat://host:port, redis://host:port/db).
    registry: str | None = None
    # The seed's timing: values live 180 s and are announced again every 60 s.
    announce_ttl: float = 180.0
    announce_interval: float = 60.0
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
    # TLS to the forwarders and to fastnats:// registries: an ssl.SSLContext,
    # a CA file path, True (the system's CAs) or None (FASTNAT_TLS_CA /
    # FASTNAT_TLS, else plain TCP). See fastnat.tls.
    tls: Any = None


# Timings a deployment may set without code (the command line, tests).
_TIMING_ENV = {
    "announce_ttl": "FASTNAT_ANNOUNCE_TTL",
    "announce_interval": "FASTNAT_ANNOUNCE_INTERVAL",
    "keepalive_interval": "FASTNAT_KEEPALIVE_INTERVAL",
    "keepalive_timeout": "FASTNAT_KEEPALIVE_TIMEOUT",
}


def _from_env() -> Settings:
    settings = Settings()
    for field, name in _TIMING_ENV.items():
        text = os.environ.get(name, "").strip()
        if text:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{name} must be a number of seconds, got {text!r}") from None
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {text!r}")
            setattr(settings, field, value)
    return settings


_lock = threading.Lock()
_settings = _from_env()


def get_settings() -> Settings:
    return _settings


def configure(
    *,
    forwarders: Iterable[str | tuple[str, int]] | None = None,
    registry: str | None = None,
    secret: bytes | str | None = None,
    mux_config: MuxConfig | None = None,
    tls: Any = None,
    **options: Any,
) -> None:
    """Set process-wide defaults of the NAT layer.

    ``forwarders``: addresses (``"host:port"`` or ``(host, port)``) used when a
    call names none and ``FASTNAT_FORWARDERS`` is unset. ``registry``: a
    registry URL (see :func:`fastnat.discovery.open_registry`). ``secret``: the
    secret proving this process's server ids. ``tls``: TLS to forwarders and
    ``fastnats://`` registries by default (a CA file path, an
    ``ssl.SSLContext``, True for the system's CAs, False for plain TCP; see
    :mod:`fastnat.tls`). Other keywords set the fields of :class:`Settings`.
    """
    if tls is not None:
        from fastnat.tls import client_tls

        client_tls(tls)  # a CA file that cannot be read fails here, not at the first connection
    with _lock:
        if tls is not None:
            _settings.tls = tls
        if forwarders is not None:
            _settings.forwarders = [_parse_one(f) for f in forwarders]
        if registry is not None:
            if "://" not in registry:
                raise ValueError(f"a registry URL looks like fastnat://host:port or fastnats://host:port, got {registry!r}")
            _settings.registry = registry or None
        if secret is not None:
            _settings.secret = secret.encode() if isinstance(secret, str) else secret
        if mux_config is not None:
            _settings.mux_config = mux_config
        for name, value in options.items():
            if not hasattr(_settings, name) or name.startswith("_"):
                raise TypeError(f"configure() got an unknown setting {name!r}")
            setattr(_settings, name, value)


def split_host_port(text: str) -> tuple[str, str]:
    """``"host:port"`` or ``"[v6]:port"`` as ``(host, port_text)``; the port
    text is empty when there is none."""
    text = text.strip()
    if text.startswith("["):  # [ipv6]:port
        host, _, port_text = text[1:].partition("]")
        return host, port_text.lstrip(":")
    host, sep, port_text = text.rpartition(":")
    return (host, port_text) if sep else (text, "")


def _parse_one(entry: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(entry, tuple):
        host, port = entry
    else:
        host, port_text = split_host_port(entry)
        try:
            port = int(port_text) if port_text else DEFAULT_FORWARDER_PORT
        except ValueError:
            raise ValueError(f"bad forwarder address {entry!r}: the port is not a number") from None
    if not host:
        raise ValueError(f"bad forwarder address {entry!r}: no host")
    if not 0 < int(port) < 65536:
        raise ValueError(f"bad forwarder address {entry!r}: port out of range")
    return str(host), int(port)


def parse_address(entry: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"`` (or ``(host, port)``) as ``(host, port)``; ValueError if malformed."""
    return _parse_one(entry)


def parse_forwarders(text: str) -> list[tuple[str, int]]:
    """Parse ``"host:port,host:port"``."""
    return [_parse_one(part) for part in text.split(",") if part.strip()]


def registry_url() -> str | None:
    """The configured registry URL: ``FASTNAT_REGISTRY``, else :func:`configure`."""
    env = os.environ.get(REGISTRY_ENV, "").strip()
    return env or _settings.registry


def static_forwarders() -> list[tuple[str, int]]:
    """``FASTNAT_FORWARDERS``, else the list given to :func:`configure`."""
    env = os.environ.get(FORWARDERS_ENV, "").strip()
    if env:
        return parse_forwarders(env)
    return list(_settings.forwarders)


def no_forwarder_error() -> NoForwarderError:
    return NoForwarderError(
        "no forwarder is configured: pass forwarderIP and forwarderPort, set "
        f"{FORWARDERS_ENV}=host:port[,host:port...] or {REGISTRY_ENV}=fastnat://host:port, or call "
        "fastnat.configure(forwarders=['host:port']) or fastnat.configure(registry='fastnat://host:port')"
    )


def choose_forwarders(host: str | None = None, port: int | None = None) -> list[tuple[str, int]]:
    """The forwarders to try without a registry: the explicit one, else the
    static list; :class:`NoForwarderError` when there is none."""
    if host is not None:
        if port is None:
            raise ValueError("forwarderIP was given without forwarderPort")
        return [(host, int(port))]
    found = static_forwarders()
    if found:
        return found
    raise no_forwarder_error()


def secret_from_env() -> bytes | None:
    value = os.environ.get(SECRET_ENV)
    return value.encode() if value else None


def process_secret() -> bytes | None:
    """This process's secret: ``configure(secret=...)``, else ``FASTNAT_SECRET``."""
    return _settings.secret or secret_from_env()

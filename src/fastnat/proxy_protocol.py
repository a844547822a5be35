"""The PROXY protocol, version 1 (text), as HAProxy specifies it.

``fastnat expose --proxy-protocol`` puts this header in front of every
relayed connection, so that the local service sees the real client address:

    PROXY TCP4 <client ip> <destination ip> <client port> <destination port>\\r\\n
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["proxy_v1_header", "MAX_HEADER_LENGTH"]

# The specification's bound on a v1 header, CRLF included.
MAX_HEADER_LENGTH = 107


def _address(value: Any, what: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    if not isinstance(value, (tuple, list)) or len(value) < 2:
        raise ValueError(f"{what} must be (ip, port), got {value!r}")
    ip_text, port = value[0], value[1]
    if not isinstance(ip_text, str):
        raise ValueError(f"{what} ip must be a string, got {ip_text!r}")
    try:
        ip = ipaddress.ip_address(ip_text.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        raise ValueError(f"{what} ip {ip_text!r} is not an IP address") from None
    if type(port) is not int or not 0 <= port <= 65535:
        raise ValueError(f"{what} port must be an integer from 0 to 65535, got {port!r}")
    return ip, port


def proxy_v1_header(source: Any, destination: Any) -> bytes:
    """The header for a connection from ``source`` to ``destination`` (each ``(ip, port)``).

    Mixed families are written as TCP6, the IPv4 address mapped
    (``::ffff:a.b.c.d``). ValueError for anything that is not an address.
    """
    src_ip, src_port = _address(source, "source")
    dst_ip, dst_port = _address(destination, "destination")
    if src_ip.version != dst_ip.version:
        src_ip = _as_v6(src_ip)
        dst_ip = _as_v6(dst_ip)
    family = "TCP4" if src_ip.version == 4 else "TCP6"
    header = f"PROXY {family} {src_ip.compressed} {dst_ip.compressed} {src_port} {dst_port}\r\n".encode("ascii")
    assert len(header) <= MAX_HEADER_LENGTH
    return header


def _as_v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if ip.version == 6:
        return ip  # type: ignore[return-value]
    return ipaddress.IPv6Address(f"::ffff:{ip}")

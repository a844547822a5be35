#!/usr/bin/env python3
"""Coverage-guided fuzz target for the PROXY protocol v1 header writer (``fastnat.proxy_protocol``).

Run it (from the repository root, with fastnat installed, plus
``pip install atheris``) as CI does, together with the other targets::

    fuzz/run.sh 60                  # every target, 60 s each
    fuzz/run.sh 60 proxy            # this one only

or by hand, libFuzzer flags after the script; new inputs are written into the
FIRST corpus directory, so give a scratch one before the committed seeds::

    mkdir -p /tmp/proxy-corpus
    python fuzz/fuzz_proxy.py /tmp/proxy-corpus fuzz/corpus/proxy -max_total_time=60

Replay inputs (a crash file, or every seed) without fuzzing::

    python fuzz/fuzz_proxy.py path/to/crash-file
    python fuzz/make_corpus.py --check proxy

What is fuzzed
--------------
``fastnat expose --proxy-protocol`` writes ``proxy_v1_header(client,
local_peername)`` in front of each relayed connection. The client address
comes from the forwarder's ``open`` message (the network), so the writer must
never let what it is given shape the header: it either writes a valid PROXY v1
line for exactly those addresses, or raises ``ValueError``. fastnat has no
PROXY protocol parser (the header is only written), so the target checks the
header with a parser of its own, which reads the addresses with the C
library's ``inet_pton``.

What one input does
-------------------
Read with ``atheris.FuzzedDataProvider`` as in ``fuzz_mux.py`` (decisions from
the back, bytes from the front; ``fuzz/make_corpus.py`` writes seeds in that
layout). For the source and the destination each: the container (a tuple
``(ip, port)``; a list; an IPv6 socket address ``(ip, port, flowinfo,
scope_id)``; too short; not a sequence), the ip (an IPv4 or IPv6 address
written canonically, exploded, IPv4-mapped or IPv4-embedded, with a zone
``%...`` of any characters; dotted quads of arbitrary integers with an
arbitrary separator; a valid address with bytes of any content before or
after it; any text; not a string) and the port (0-65535, any 64-bit integer,
a bool, a float, a string, None, a huge integer).

Crashes (any of these stops the input with an exception)
--------------------------------------------------------
* ``proxy_v1_header`` raises anything but ``ValueError`` (an
  ``AssertionError`` from its length check included);
* it refuses an input that is certainly valid (both addresses well-formed
  IPv4/IPv6 text, an optional zone, ports that are ``int`` 0-65535);
* the header it writes is not a valid PROXY v1 line: it must be ASCII, start
  with ``PROXY ``, end with ``\\r\\n``, hold no other CR or LF, be at most 107
  bytes, and be exactly six fields separated by single spaces: ``TCP4`` with
  two IPv4 addresses or ``TCP6`` with two IPv6 addresses (canonical text, no
  zone), two decimal ports 0-65535 without leading zeros;
* the header does not say what it was given: the addresses (``inet_pton``'s
  bytes) must be those of the inputs without their zones (an IPv4 address
  mapped to ``::ffff:a.b.c.d`` when the other one is IPv6), the ports the
  input ports.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

import atheris

with atheris.instrument_imports(include=["fastnat"]):
    import fastnat.proxy_protocol as pp

# --------------------------------------------------------------------- grammar
# Shared with fuzz/make_corpus.py, which writes seeds in this layout.

(
    HOST_V4,  # str(IPv4Address(n))
    HOST_V6,  # str(IPv6Address(n)), compressed
    HOST_V6_EXPLODED,
    HOST_V4_MAPPED,  # "::ffff:a.b.c.d"
    HOST_V4_EMBEDDED,  # "::a.b.c.d" and other x:...:a.b.c.d forms
    HOST_QUAD,  # four arbitrary integers joined by an arbitrary separator
    HOST_DECORATED,  # a valid address with bytes before and after
    HOST_TEXT,  # any text
    HOST_NOT_STR,  # None, int, bytes, an ip_address object, float
) = range(9)
HOST_RANGE = (0, 8)
ZONE_RANGE = (0, 2)  # no zone; a zone of fuzzed text; "%" alone
TEXT_RANGE = (0, 64)  # bytes of fuzzed text
(
    PORT_OK,  # 0-65535
    PORT_ANY,  # any 64-bit integer
    PORT_BOOL,
    PORT_FLOAT,
    PORT_STR,
    PORT_NONE,
    PORT_HUGE,  # beyond 64 bits
) = range(7)
PORT_RANGE = (0, 6)
(
    BOX_TUPLE,
    BOX_LIST,
    BOX_SOCKADDR6,  # (ip, port, flowinfo, scope_id)
    BOX_SHORT,  # (ip,)
    BOX_NOT_SEQ,  # the ip alone, or a dict
) = range(5)
BOX_RANGE = (0, 4)
SEPARATORS = (".", " ", "\r\n", "..", ",", "\x00", "\u0660", "")  # \u0660: ARABIC-INDIC DIGIT ZERO
QUAD_RANGE = (-(2**40), 2**40)
MAX_HEADER = pp.MAX_HEADER_LENGTH


class InvariantError(AssertionError):
    """proxy_v1_header wrote something it must not."""


def text(fdp) -> str:
    raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(*TEXT_RANGE))
    return raw.decode("utf-8", "surrogateescape")


def host(fdp) -> tuple[object, bool]:
    """(host, certainly valid)."""
    kind = fdp.ConsumeIntInRange(*HOST_RANGE)
    valid = True
    if kind == HOST_V4:
        value = str(ipaddress.IPv4Address(fdp.ConsumeIntInRange(0, 2**32 - 1)))
    elif kind in (HOST_V6, HOST_V6_EXPLODED):
        ip = ipaddress.IPv6Address(fdp.ConsumeIntInRange(0, 2**64 - 1) << 64 | fdp.ConsumeIntInRange(0, 2**64 - 1))
        value = ip.exploded if kind == HOST_V6_EXPLODED else str(ip)
    elif kind == HOST_V4_MAPPED:
        value = "::ffff:" + str(ipaddress.IPv4Address(fdp.ConsumeIntInRange(0, 2**32 - 1)))
    elif kind == HOST_V4_EMBEDDED:
        prefix = ipaddress.IPv6Address(fdp.ConsumeIntInRange(0, 2**64 - 1) << 64).exploded.rsplit(":", 2)[0]
        value = prefix + ":" + str(ipaddress.IPv4Address(fdp.ConsumeIntInRange(0, 2**32 - 1)))
    elif kind == HOST_QUAD:
        sep = SEPARATORS[fdp.ConsumeIntInRange(0, len(SEPARATORS) - 1)]
        value = sep.join(str(fdp.ConsumeIntInRange(*QUAD_RANGE)) for _ in range(4))
        valid = False
    elif kind == HOST_DECORATED:
        inner, _ = host(fdp)
        value = f"{text(fdp)}{inner}{text(fdp)}"
        valid = False
    elif kind == HOST_TEXT:
        value = text(fdp)
        valid = False
    else:
        choice = fdp.ConsumeIntInRange(0, 4)
        value = (None, 16909060, b"1.2.3.4", ipaddress.ip_address("1.2.3.4"), 1.5)[choice]
        return value, False
    if kind <= HOST_V4_EMBEDDED:
        zone = fdp.ConsumeIntInRange(*ZONE_RANGE)
        if zone == 1:
            value += "%" + text(fdp)
        elif zone == 2:
            value += "%"
    return value, valid


def port(fdp) -> tuple[object, bool]:
    kind = fdp.ConsumeIntInRange(*PORT_RANGE)
    if kind == PORT_OK:
        return fdp.ConsumeIntInRange(0, 65535), True
    if kind == PORT_ANY:
        return fdp.ConsumeIntInRange(-(2**63), 2**63 - 1), False
    if kind == PORT_BOOL:
        return bool(fdp.ConsumeIntInRange(0, 1)), False
    if kind == PORT_FLOAT:
        return float(fdp.ConsumeIntInRange(-70000, 70000)), False
    if kind == PORT_STR:
        return str(fdp.ConsumeIntInRange(0, 65535)), False
    if kind == PORT_NONE:
        return None, False
    return 2**64 + fdp.ConsumeIntInRange(0, 2**32), False


def address(fdp) -> tuple[object, bool]:
    box = fdp.ConsumeIntInRange(*BOX_RANGE)
    ip, ip_ok = host(fdp)
    number, port_ok = port(fdp)
    if box == BOX_TUPLE:
        return (ip, number), ip_ok and port_ok
    if box == BOX_LIST:
        return [ip, number], ip_ok and port_ok
    if box == BOX_SOCKADDR6:
        return (ip, number, fdp.ConsumeIntInRange(0, 2**20), fdp.ConsumeIntInRange(0, 2**32 - 1)), ip_ok and port_ok
    if box == BOX_SHORT:
        return (ip,), False
    return (ip if fdp.ConsumeIntInRange(0, 1) else {"ip": ip, "port": number}), False


def packed(host_text: str) -> tuple[int, bytes] | None:
    """(family, bytes) of an address written as text, by the C library."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return family, socket.inet_pton(family, host_text)
        except (OSError, ValueError):
            continue
    return None


def _port_field(field: bytes) -> int:
    if not field.isdigit() or (len(field) > 1 and field[:1] == b"0") or int(field) > 65535:
        raise InvariantError(f"port field {field!r}")
    return int(field)


def check_header(header: object, source, destination) -> None:
    if type(header) is not bytes:
        raise InvariantError(f"proxy_v1_header returned a {type(header).__name__}")
    if not header.startswith(b"PROXY ") or not header.endswith(b"\r\n") or len(header) > MAX_HEADER:
        raise InvariantError(f"not a PROXY v1 line: {header!r}")
    line = header[:-2]
    if b"\r" in line or b"\n" in line or not line.isascii():
        raise InvariantError(f"CR, LF or non-ASCII inside the header: {header!r}")
    fields = line.split(b" ")
    if len(fields) != 6 or not all(fields):
        raise InvariantError(f"{len(fields)} fields (or an empty one) in {header!r}")
    family = {b"TCP4": socket.AF_INET, b"TCP6": socket.AF_INET6}.get(fields[1])
    if family is None:
        raise InvariantError(f"protocol {fields[1]!r} in {header!r}")
    addresses = []
    for field in fields[2:4]:
        try:
            raw = socket.inet_pton(family, field.decode("ascii"))
        except (OSError, ValueError):
            raise InvariantError(f"{field!r} is not a {fields[1].decode()} address: {header!r}") from None
        if field.decode() != str(ipaddress.ip_address(raw)):
            raise InvariantError(f"{field!r} is not written canonically: {header!r}")
        addresses.append(raw)
    ports = [_port_field(f) for f in fields[4:6]]
    # The addresses and ports must be the ones given.
    given = [packed(a[0].split("%", 1)[0]) for a in (source, destination)]
    if given[0] is None or given[1] is None:
        # fastnat's parser (ipaddress) accepted what the C library does not:
        # the header is still well-formed; compare with ipaddress' reading.
        given = [_ipaddress_packed(a[0].split("%", 1)[0]) for a in (source, destination)]
    if given[0][0] != given[1][0]:
        given = [(socket.AF_INET6, b"\0" * 10 + b"\xff\xff" + raw if fam == socket.AF_INET else raw) for fam, raw in given]
    if [fam for fam, _ in given] != [family, family] or [raw for _, raw in given] != addresses:
        raise InvariantError(f"{header!r} does not carry the addresses of {source!r} -> {destination!r}")
    if ports != [source[1], destination[1]]:
        raise InvariantError(f"{header!r} does not carry the ports of {source!r} -> {destination!r}")


def _ipaddress_packed(text_: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(text_)
    return (socket.AF_INET if ip.version == 4 else socket.AF_INET6), ip.packed


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    source, source_ok = address(fdp)
    destination, destination_ok = address(fdp)
    try:
        header = pp.proxy_v1_header(source, destination)
    except ValueError as exc:
        if type(exc) is not ValueError:
            raise
        if source_ok and destination_ok:
            raise InvariantError(f"refused valid addresses {source!r} -> {destination!r}: {exc}") from None
        return
    check_header(header, source, destination)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

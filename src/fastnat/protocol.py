"""fastnat's control protocol, sans-IO: hellos, requests and replies.

Every connection to a forwarder starts with a hello from the dialler::

    b"FNAT" | version u8 | role u8 (b"S" server, b"C" client, b"R" registry)

and the forwarder's answer::

    b"FNAT" | status u8 | version u8 | nonce (16 bytes) | count u8 | versions (count bytes)

``status`` 0 means go on with ``version``; otherwise the forwarder closes the
connection, and ``versions`` names the versions it speaks. The nonce is fresh
per connection; a server proves it holds an id's secret with
HMAC-SHA256(secret, nonce || id).

After the hellos, requests and replies are messages: a big-endian u32 length,
then that many bytes of UTF-8 JSON, at most :data:`MAX_MESSAGE_SIZE`. A
request is ``{"id": int, "request": str, "value": ...}`` and a reply
``{"id": int, "status": str, "value": ...}``, the fields of the Seattle NAT
layer. Everything is validated field by field; anything else raises
:class:`ControlProtocolError`, and the connection it came from is closed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import math
import re
import struct
from typing import Any, ClassVar

from fastnat.discovery.base import validate_key, validate_max_values, validate_ttl, validate_value
from fastnat.errors import (
    AuthenticationError,
    ControlProtocolError,
    ForwarderBusyError,
    IdTakenError,
    NATLayerError,
    NotRegisteredError,
    ProtocolVersionError,
    ServerBusyError,
    ServerNotFoundError,
    ServerRefusedError,
)

__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "ROLE_SERVER",
    "ROLE_CLIENT",
    "ROLE_REGISTRY",
    "REGISTRY_REQUESTS",
    "NONCE_SIZE",
    "HELLO_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_ID_LENGTH",
    "HelloStatus",
    "Status",
    "REQUESTS",
    "ControlProtocolError",
    "Hello",
    "HelloReply",
    "Request",
    "Reply",
    "encode_hello",
    "parse_hello",
    "encode_hello_reply",
    "HelloReplyReader",
    "MessageReader",
    "decode_message_length",
    "decode_message_body",
    "encode_message",
    "encode_request",
    "encode_reply",
    "parse_request",
    "parse_reply",
    "validate_server_id",
    "validate_port",
    "registration_proof",
    "check_registration_proof",
    "registry_write_proof",
    "check_registry_write_proof",
    "reply_error",
    "hello_error",
]

MAGIC = b"FNAT"
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
ROLE_SERVER = b"S"
ROLE_CLIENT = b"C"
# A connection to the registry service (:mod:`fastnat.discovery.service`):
# after the hellos, any number of announce/lookup/withdraw requests.
ROLE_REGISTRY = b"R"
_ROLES = (ROLE_SERVER, ROLE_CLIENT, ROLE_REGISTRY)
# 128 bits: a nonce never repeats in practice, so a registration proof
# captured on one connection cannot be replayed on another.
NONCE_SIZE = 16
HELLO_SIZE = len(MAGIC) + 2
_HELLO_REPLY_FIXED = len(MAGIC) + 2 + NONCE_SIZE + 1
# Control messages carry ids, ports, addresses and counters: 64 KiB is far
# above any legitimate message and small enough that a hostile peer cannot
# make the forwarder buffer much before it is cut off.
MAX_MESSAGE_SIZE = 64 * 1024
# A server id becomes part of a registry key; 255 characters is room for any
# naming scheme (the seed's ids were "ip#number") and keeps keys short.
MAX_ID_LENGTH = 255
# A request id is the caller's, echoed in the reply; 32 bits is plenty.
_MAX_REQUEST_ID = 0xFFFFFFFF
# Registration proofs are hex-encoded HMAC-SHA256 digests.
_PROOF_LENGTH = 64

_LENGTH = struct.Struct(">I")
# Peer-supplied text quoted in an error (and so in a log line) is cut to this
# many characters: enough to recognise it, and a 64 KiB field cannot flood a log.
_SHOWN_LENGTH = 80
# An IPv6 zone (``fe80::1%eth0``) names an interface: Linux interface names
# are at most 15 characters, and a numeric zone id fits as well.
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class HelloStatus:
    """Status byte of the forwarder's hello reply.

    Values are never reused: a new refusal gets a new value. The ``IP_*``
    refusals name a per-address limit (the role is not known yet when they
    are sent, so they cannot be a reply status).
    """

    OK = 0
    VERSION_UNSUPPORTED = 1
    BAD_ROLE = 2
    BUSY = 3  # the forwarder's max_pending_handshakes, or a registry's max_connections
    IP_CONNECTIONS = 4  # max_connections_per_ip: too many connections from this address
    IP_HANDSHAKES = 5  # max_handshakes_per_ip: too many pending handshakes from this address

    NAMES = {0: "OK", 1: "VERSION_UNSUPPORTED", 2: "BAD_ROLE", 3: "BUSY", 4: "IP_CONNECTIONS", 5: "IP_HANDSHAKES"}
    # What each refusal at a limit means, for error messages: the limit's name first.
    LIMITS: ClassVar[dict[int, str]] = {
        BUSY: "max_pending_handshakes: too many connections are in their handshake",
        IP_CONNECTIONS: "max_connections_per_ip: too many connections from this address",
        IP_HANDSHAKES: "max_handshakes_per_ip: too many pending handshakes from this address",
    }


class Status:
    """Reply statuses. The first four are the seed's client statuses."""

    CONFIRMED = "CONFIRMED"
    NO_SERVER = "NO_SERVER"
    BSY_SERVER = "BSY_SERVER"
    FAILED = "FAILED"
    OK = "OK"
    ID_TAKEN = "ID_TAKEN"
    AUTH_FAILED = "AUTH_FAILED"
    NOT_REGISTERED = "NOT_REGISTERED"
    FULL = "FULL"
    ACCEPTED = "ACCEPTED"
    REFUSED = "REFUSED"
    BAD_REQUEST = "BAD_REQUEST"

    ALL = frozenset(
        {
            CONFIRMED,
            NO_SERVER,
            BSY_SERVER,
            FAILED,
            OK,
            ID_TAKEN,
            AUTH_FAILED,
            NOT_REGISTERED,
            FULL,
            ACCEPTED,
            REFUSED,
            BAD_REQUEST,
        }
    )


# ------------------------------------------------------------------- hellos


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    version: int
    role: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class HelloReply:
    status: int
    version: int
    nonce: bytes
    versions: tuple[int, ...]

    @property
    def status_name(self) -> str:
        return HelloStatus.NAMES.get(self.status, f"status {self.status}")


def encode_hello(role: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    """The dialler's hello."""
    if role not in _ROLES:
        raise ValueError(f"role must be one of {', '.join(map(repr, _ROLES))}, not {role!r}")
    if not 0 <= version <= 255:
        raise ValueError(f"version must fit in a byte, got {version}")
    return MAGIC + bytes((version,)) + role


def parse_hello(data: bytes) -> Hello:
    """Parse the dialler's hello (exactly :data:`HELLO_SIZE` bytes).

    The role is not checked here: the forwarder answers an unknown one with
    ``BAD_ROLE``.
    """
    if len(data) != HELLO_SIZE:
        raise ControlProtocolError(f"a hello is {HELLO_SIZE} bytes, got {len(data)}")
    if data[:4] != MAGIC:
        raise ControlProtocolError(f"not a fastnat hello (starts with {bytes(data[:4])!r})")
    return Hello(version=data[4], role=bytes(data[5:6]))


def encode_hello_reply(
    status: int,
    version: int,
    nonce: bytes,
    versions: tuple[int, ...] = SUPPORTED_VERSIONS,
) -> bytes:
    """The forwarder's answer to a hello."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    if len(versions) > 255:
        raise ValueError("too many versions")
    return MAGIC + bytes((status, version)) + nonce + bytes((len(versions),)) + bytes(versions)


class HelloReplyReader:
    """Incremental parser of the forwarder's hello reply.

    ``feed(data)`` returns the :class:`HelloReply` once complete, and keeps
    the bytes after it in :attr:`rest` (a client's first reply may follow in
    the same read).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.rest = b""

    def feed(self, data: bytes) -> HelloReply | None:
        buffer = self._buffer
        buffer += data
        if len(buffer) >= 4 and buffer[:4] != MAGIC:
            raise ControlProtocolError(f"not a fastnat forwarder (answered {bytes(buffer[:4])!r})")
        if len(buffer) < _HELLO_REPLY_FIXED:
            return None
        count = buffer[_HELLO_REPLY_FIXED - 1]
        end = _HELLO_REPLY_FIXED + count
        if len(buffer) < end:
            return None
        reply = HelloReply(
            status=buffer[4],
            version=buffer[5],
            nonce=bytes(buffer[6 : 6 + NONCE_SIZE]),
            versions=tuple(buffer[_HELLO_REPLY_FIXED:end]),
        )
        self.rest = bytes(buffer[end:])
        buffer.clear()
        return reply

    @staticmethod
    def max_size() -> int:
        return _HELLO_REPLY_FIXED + 255


# ----------------------------------------------------------------- messages


def encode_message(obj: Any) -> bytes:
    """Length-prefixed UTF-8 JSON; ValueError if it exceeds the size cap."""
    # A lone surrogate (a peer may send "\ud800") has no UTF-8 form: it can
    # only be inside a JSON string, where backslashreplace writes the same
    # \udXXX escape that decodes back to it.
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8", "backslashreplace")
    if len(body) > MAX_MESSAGE_SIZE:
        raise ValueError(f"message of {len(body)} bytes exceeds the {MAX_MESSAGE_SIZE}-byte cap")
    return _LENGTH.pack(len(body)) + body


class MessageReader:
    """Incremental reader of length-prefixed JSON messages.

    ``feed(data)`` returns the complete messages (decoded JSON values) and
    buffers at most one partial message. A length above ``max_size`` raises
    at once, before its body is read.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buffer = bytearray()
        self._max_size = max_size
        # An error met after good messages in the same feed: those are
        # returned first, and the error is raised by the next feed.
        self._error: ControlProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes, limit: int | None = None) -> list[Any]:
        """Add ``data``; return the messages it completes (at most ``limit``,
        leaving the bytes after them buffered for :meth:`take_rest`).

        Bad input raises :class:`ControlProtocolError`; when good messages
        came before it, they are returned and the error is raised by the
        next call (with ``b""`` to just collect it).
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        buffer += data
        messages: list[Any] = []
        offset = 0
        try:
            while len(buffer) - offset >= 4 and (limit is None or len(messages) < limit):
                length = decode_message_length(bytes(buffer[offset : offset + 4]), self._max_size)
                if len(buffer) - offset - 4 < length:
                    break
                body = bytes(buffer[offset + 4 : offset + 4 + length])
                messages.append(_decode_json(body))
                offset += 4 + length
        except ControlProtocolError as exc:
            if not messages:
                raise
            self._error = exc
            buffer.clear()
            return messages
        if offset:
            del buffer[:offset]
        return messages

    def take_rest(self) -> bytes:
        """Bytes buffered after the last complete message (raw data that follows)."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


def decode_message_length(header: bytes, max_size: int = MAX_MESSAGE_SIZE) -> int:
    """The body length announced by a 4-byte message header; raises above ``max_size``."""
    (length,) = _LENGTH.unpack(header)
    if length > max_size:
        raise ControlProtocolError(f"message of {length} bytes announced; the cap is {max_size}")
    return int(length)


def decode_message_body(body: bytes) -> Any:
    """Decode a message body (UTF-8 JSON); ControlProtocolError if it is not."""
    return _decode_json(body)


def _decode_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ControlProtocolError(f"message is not valid UTF-8 JSON ({exc.__class__.__name__}: {exc})") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    # 1e999 would be inf: refused like Infinity (encode_message cannot write it back).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


# ------------------------------------------------------ requests and replies

# Request names and the shape of their values.
REQUESTS = frozenset(
    {
        "reg_serv",
        "dereg_serv",
        "reg_port",
        "dereg_port",
        "client_init",
        "externaladdr",
        "bidirectional",
        "stats",
        "open",  # forwarder -> server, first message of a stream carrying a client
        # registry connections (role R)
        "announce",
        "lookup",
        "withdraw",
    }
)
# The requests of a registry connection, and only those.
REGISTRY_REQUESTS = frozenset({"announce", "lookup", "withdraw"})


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    id: int
    request: str
    value: Any

    def encode(self) -> bytes:
        return encode_message({"id": self.id, "request": self.request, "value": self.value})


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    id: int
    status: str
    value: Any = None

    def encode(self) -> bytes:
        return encode_message({"id": self.id, "status": self.status, "value": self.value})


def encode_request(request_id: int, request: str, value: Any = None) -> bytes:
    req = Request(request_id, request, value)
    _check_request(req)
    return req.encode()


def encode_reply(request_id: int, status: str, value: Any = None) -> bytes:
    return Reply(request_id, status, value).encode()


def _fields(obj: Any, kind: str, names: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ControlProtocolError(f"a {kind} must be a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if keys != set(names):
        missing = sorted(set(names) - keys)
        extra = keys - set(names)
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {_shown_names(extra)}")
        raise ControlProtocolError(f"{kind} fields: {'; '.join(parts)}")
    request_id = obj["id"]
    if type(request_id) is not int or not 0 <= request_id <= _MAX_REQUEST_ID:
        raise ControlProtocolError(f"{kind} id must be an integer between 0 and {_MAX_REQUEST_ID}")
    return obj


def parse_request(obj: Any) -> Request:
    """Validate a decoded request message."""
    fields = _fields(obj, "request", ("id", "request", "value"))
    name = fields["request"]
    if not isinstance(name, str) or name not in REQUESTS:
        raise ControlProtocolError(f"unknown request {_shown(name)}")
    req = Request(fields["id"], name, fields["value"])
    _check_request(req)
    return req


def parse_reply(obj: Any) -> Reply:
    """Validate a decoded reply message."""
    fields = _fields(obj, "reply", ("id", "status", "value"))
    status = fields["status"]
    if not isinstance(status, str) or status not in Status.ALL:
        raise ControlProtocolError(f"unknown status {_shown(status)}")
    return Reply(fields["id"], status, fields["value"])


def _check_request(req: Request) -> None:
    value = req.value
    name = req.request
    try:
        if name in ("reg_serv",):
            v = _object(value, required=("server",), optional=("proof",))
            validate_server_id(v["server"])
            _validate_proof(v)
        elif name == "dereg_serv":
            validate_server_id(_object(value, required=("server",))["server"])
        elif name in ("reg_port", "dereg_port", "client_init"):
            v = _object(value, required=("server", "port"))
            validate_server_id(v["server"])
            validate_port(v["port"])
        elif name == "bidirectional":
            v = _object(value, required=("ip", "port"))
            _validate_ip(v["ip"])
            validate_port(v["port"])
        elif name == "open":
            v = _object(value, required=("server", "port", "client"))
            validate_server_id(v["server"])
            validate_port(v["port"])
            client = v["client"]
            if not (isinstance(client, list) and len(client) == 2):
                raise ValueError("client must be [ip, port]")
            _validate_ip(client[0])
            validate_port(client[1], allow_zero=True)
        elif name in ("externaladdr", "stats"):
            if value is not None:
                raise ValueError("takes no value (null)")
        elif name == "announce":
            v = _object(value, required=("key", "value", "ttl"), optional=("proof",))
            validate_key(v["key"])
            validate_value(v["value"])
            validate_ttl(v["ttl"])
            _validate_proof(v)
        elif name == "lookup":
            v = _object(value, required=("key", "max_values"))
            validate_key(v["key"])
            validate_max_values(v["max_values"])
        elif name == "withdraw":
            v = _object(value, required=("key", "value"), optional=("proof",))
            validate_key(v["key"])
            validate_value(v["value"])
            _validate_proof(v)
    except ValueError as exc:
        raise ControlProtocolError(f"{name}: {exc}") from None


def _object(value: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"value must be an object with {', '.join(required)}")
    keys = set(value)
    missing = set(required) - keys
    if missing:
        raise ValueError(f"value lacks {', '.join(sorted(missing))}")
    extra = keys - set(required) - set(optional)
    if extra:
        raise ValueError(f"value has unexpected {_shown_names(extra)}")
    return value


def _shown(value: Any) -> str:
    """``repr(value)`` for an error message, cut to :data:`_SHOWN_LENGTH` characters.

    repr escapes newlines and other control characters, so a peer's text
    cannot forge log lines.
    """
    text = repr(value)
    return text if len(text) <= _SHOWN_LENGTH else text[: _SHOWN_LENGTH - 3] + "..."


def _shown_names(names: Any) -> str:
    """Peer-supplied field names, quoted (see :func:`_shown`), in a stable order."""
    return ", ".join(sorted(_shown(name) for name in names))


def _validate_proof(value: dict[str, Any]) -> None:
    proof = value.get("proof")
    if proof is not None and (not isinstance(proof, str) or len(proof) != _PROOF_LENGTH or not _is_hex(proof)):
        raise ValueError(f"proof must be {_PROOF_LENGTH} hex digits")


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def validate_server_id(server_id: Any) -> str:
    """A server id: 1 to 255 printable characters without spaces; ValueError otherwise."""
    if not isinstance(server_id, str):
        raise ValueError(f"server id must be a string, not {type(server_id).__name__}")
    if not 1 <= len(server_id) <= MAX_ID_LENGTH:
        raise ValueError(f"server id must be 1 to {MAX_ID_LENGTH} characters, got {len(server_id)}")
    if not server_id.isprintable() or any(c.isspace() for c in server_id):
        raise ValueError(f"server id {server_id!r} has spaces or unprintable characters")
    return server_id


def validate_port(port: Any, *, allow_zero: bool = False) -> int:
    """A TCP port number; ValueError otherwise."""
    low = 0 if allow_zero else 1
    if type(port) is not int or not low <= port <= 65535:
        raise ValueError(f"port must be an integer between {low} and 65535, got {port!r}")
    return port


def _validate_ip(ip: Any) -> str:
    if not isinstance(ip, str):
        raise ValueError(f"ip must be a string, not {type(ip).__name__}")
    address, _, zone = ip.partition("%")
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{_shown(ip)} is not an IP address") from None
    # ipaddress takes any text after "%" as a zone, newlines included; a zone
    # is an interface name or number, and only an IPv6 address has one.
    if "%" in ip and (parsed.version != 6 or not _ZONE.fullmatch(zone)):
        raise ValueError(f"{_shown(ip)} is not an IP address (bad zone)")
    return ip


# ------------------------------------------------------------ id ownership


def registration_proof(secret: bytes, nonce: bytes, server_id: str) -> str:
    """HMAC-SHA256(secret, nonce || id), hex: what ``reg_serv`` carries."""
    return hmac.new(secret, nonce + server_id.encode(), hashlib.sha256).hexdigest()


def check_registration_proof(secret: bytes, nonce: bytes, server_id: str, proof: Any) -> bool:
    """Constant-time check of a registration proof."""
    return _same_proof(registration_proof(secret, nonce, server_id), proof)


def registry_write_proof(secret: bytes, nonce: bytes, request: str, key: str, value: str) -> str:
    """HMAC-SHA256(secret, nonce || request || 0 || key || 0 || value), hex: what an
    ``announce`` or ``withdraw`` carries to a registry that demands proof.

    The request name is inside, so a proof to announce cannot withdraw; keys
    and values are printable, so the zero bytes separate them unambiguously.
    """
    message = nonce + b"\0".join(part.encode("utf-8", "surrogatepass") for part in (request, key, value))
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def check_registry_write_proof(secret: bytes, nonce: bytes, request: str, key: str, value: str, proof: Any) -> bool:
    """Constant-time check of a registry write proof."""
    return _same_proof(registry_write_proof(secret, nonce, request, key, value), proof)


def _same_proof(expected: str, proof: Any) -> bool:
    # A proof is hex: anything else is wrong (and a lone surrogate cannot be encoded).
    if not isinstance(proof, str) or not proof.isascii():
        return False
    return hmac.compare_digest(expected.encode(), proof.encode())


# ------------------------------------------------------- statuses as errors

_STATUS_ERRORS: dict[str, type[NATLayerError]] = {
    Status.NO_SERVER: ServerNotFoundError,
    Status.BSY_SERVER: ServerBusyError,
    Status.FAILED: ServerRefusedError,
    Status.REFUSED: ServerRefusedError,
    Status.ID_TAKEN: IdTakenError,
    Status.AUTH_FAILED: AuthenticationError,
    Status.NOT_REGISTERED: NotRegisteredError,
    Status.FULL: ForwarderBusyError,
    Status.BAD_REQUEST: ControlProtocolError,
}


def reply_error(reply: Reply, where: str) -> NATLayerError:
    """The exception for a reply that is not a success."""
    cls = _STATUS_ERRORS.get(reply.status, NATLayerError)
    detail = f": {reply.value}" if reply.value else ""
    return cls(f"{where}: {reply.status}{detail}")


def hello_error(reply: HelloReply, where: str) -> NATLayerError | None:
    """The exception for a hello reply that refuses us, or None."""
    if reply.status == HelloStatus.OK:
        if reply.version not in SUPPORTED_VERSIONS:
            return ProtocolVersionError(f"{where}: the forwarder chose version {reply.version}, which this side does not speak")
        return None
    if reply.status == HelloStatus.VERSION_UNSUPPORTED:
        return ProtocolVersionError(
            f"{where}: the forwarder speaks protocol versions {list(reply.versions)}, "
            f"this fastnat speaks {list(SUPPORTED_VERSIONS)}"
        )
    limit = HelloStatus.LIMITS.get(reply.status)
    if limit is not None:
        return ForwarderBusyError(f"{where}: the forwarder refused the connection at its limit {limit}")
    return ControlProtocolError(f"{where}: the forwarder refused the hello ({reply.status_name})")

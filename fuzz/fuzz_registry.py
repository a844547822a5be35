#!/usr/bin/env python3
"""Coverage-guided fuzz target for the built-in registry's wire protocol (role ``R``).

Run it (from the repository root, with fastnat installed, plus
``pip install atheris``) as CI does, together with the other targets::

    fuzz/run.sh 60                  # every target, 60 s each
    fuzz/run.sh 60 registry         # this one only

or by hand, libFuzzer flags after the script; new inputs are written into the
FIRST corpus directory, so give a scratch one before the committed seeds::

    mkdir -p /tmp/registry-corpus
    python fuzz/fuzz_registry.py /tmp/registry-corpus fuzz/corpus/registry -dict=fuzz/control.dict -max_total_time=60

Replay inputs (a crash file, or every seed) without fuzzing::

    python fuzz/fuzz_registry.py path/to/crash-file
    python fuzz/make_corpus.py --check registry

Why a target of its own
-----------------------
The registry (``fastnat.discovery.service``) frames and parses with the
control protocol's functions (``parse_hello``, ``MessageReader``,
``parse_request``; ``HelloReplyReader``, ``read_message``, ``parse_reply`` on
the client side), which ``fuzz_control.py`` fuzzes. What is its own, and
fuzzed here, is what it does with them: the service's connection
(``_RegistryConnection``: the hello read in pieces, requests answered one at a
time, a bad one answered ``BAD_REQUEST`` and the connection dropped, write
back-pressure, timers, the store behind it) and the client
(``ServiceRegistry``: the hello reply and reply read from a fresh or reused
connection, the errors it maps them to, its retry on a stale connection).

What one input does
-------------------
Read with ``atheris.FuzzedDataProvider`` as in ``fuzz_mux.py``: decisions from
the back (``ConsumeIntInRange``), wire bytes from the front
(``ConsumeBytes``); ``fuzz/make_corpus.py`` writes seeds in that layout. The
first decision picks the side.

Service side: a ``RegistryService`` with a fake clock, and one connection on a
fake transport, either accepted by a standalone ``RegistryServer`` (the
connection reads the hello) or handed over by a forwarder that read the hello
(``serve_connection``; the first chunk is the bytes that followed the hello).
Options: small store caps (3 keys, 2 values a key) or the defaults; a 64-byte
message cap or the protocol's; the connection cap already reached; a transport
that pushes back on every write (``pause_writing``; the harness reads the
output, ``resume_writing``, before it delivers more). Between the chunks the
wire arrives in, a command: the clock moves (values expire), the pending timer
fires (hello timeout, idle timeout, or the abort after a close), the peer ends
its side (``eof_received``), or the connection is lost.

The same events drive a model of the documented behaviour (module docstring of
``fastnat.discovery.service``): the hello reply (OK, BUSY, VERSION_UNSUPPORTED,
BAD_ROLE), then one reply per request in order, ``announce``/``withdraw`` ->
OK, ``lookup`` -> OK with the live values (insertion order, renewals keep
their place), a cap reached -> FULL and the connection stays, anything else ->
BAD_REQUEST (id of the request when it has a valid one, else 0) and the
connection is closed with one WARNING log line.

Client side: ``ServiceRegistry`` makes one to three calls (announce, lookup
with ``max_values`` 1-4, withdraw); each connection it makes reads its bytes
from the input (the service's hello reply and replies), then its end, which
the input says is seen at once (the connection is not reused) or only when
read (a stale connection, retried once on a new one); once the input is used
up connecting fails.

Crashes (any of these stops the input with an exception)
--------------------------------------------------------
* service: an exception escapes ``data_received``, ``resume_writing``,
  ``eof_received``, ``connection_lost`` or a timer (asyncio would log it and
  drop the connection without the reply, the log line or the counters); its
  output is not a hello reply followed by well-formed replies, or differs from
  the model's (status, id, value, order, hello status, nonce); it writes after
  it closed, or does not close (or closes) when the model does; more or fewer
  WARNING lines than connections dropped for cause, counters that disagree;
  the connection is still counted after ``connection_lost``; the store's
  bookkeeping (value count, empty keys) breaks; answering a backlog of
  requests makes no progress;
* client: a call raises anything but ``ValueError`` (a FULL answer),
  ``ControlProtocolError`` (a service that breaks the protocol) or
  ``RegistryUnavailableError`` (no connection, closed connection); a lookup
  returns anything but a list of at most ``max_values`` strings; the first
  call's outcome differs from the model's reading of the bytes; the requests it
  writes are not a registry hello and well-formed registry requests;
* a hang or runaway memory: libFuzzer's ``-timeout`` and ``-rss_limit_mb``.

Nested JSON close to the recursion limit decodes or not depending on the stack
depth (see ``fuzz_control.py``); the model decodes on a shallower stack than
the service, so for such messages a BAD_REQUEST with id 0, or a client's
``ControlProtocolError`` naming ``RecursionError``, is accepted.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import atheris

with atheris.instrument_imports(include=["fastnat"]):
    import fastnat.discovery.service as service_mod
    import fastnat.discovery.store as store_mod
    import fastnat.errors
    import fastnat.protocol as proto

ControlProtocolError = fastnat.errors.ControlProtocolError
RegistryUnavailableError = fastnat.errors.RegistryUnavailableError
Status = proto.Status
HelloStatus = proto.HelloStatus

# --------------------------------------------------------------------- grammar
# Shared with fuzz/make_corpus.py, which writes seeds in this layout.

SIDE_SERVICE, SIDE_CLIENT = range(2)
SIDE_RANGE = (0, 1)
OPT_HANDOVER = 0x01  # the connection comes from a forwarder that read the hello
OPT_SMALL_STORE = 0x02  # 3 keys, 2 values a key
OPT_SMALL_MESSAGES = 0x04  # requests of at most 64 bytes
OPT_AT_CAP = 0x08  # the connection cap is reached already
OPT_PAUSE_WRITES = 0x10  # every write pushes back (pause_writing)
OPT_RANGE = (0, 31)
SIZE_REST, SIZE_TINY, SIZE_SMALL, SIZE_LARGE = range(4)  # SIZE_REST = 0: what an exhausted script reads
SIZE_RANGES = {SIZE_TINY: (1, 8), SIZE_SMALL: (1, 256), SIZE_LARGE: (1, 8192)}
CMD_NONE, CMD_CLOCK, CMD_TIMER, CMD_EOF, CMD_LOST = range(5)
CMD_RANGE = (0, 4)
CLOCK_RANGE = (0, 100_000)  # seconds the clock moves
MAX_STEPS = 2048
SMALL_MESSAGE_SIZE = 64
SMALL_KEYS, SMALL_VALUES = 3, 2
CALLS_RANGE = (1, 3)
OP_ANNOUNCE, OP_LOOKUP, OP_WITHDRAW = range(3)
OP_RANGE = (0, 2)
MAX_VALUES_RANGE = (1, 4)
EOF_ON_READ, EOF_AT_ONCE = range(2)  # a connection's end: seen when read past, or at once (not reused)
EOF_RANGE = (0, 1)
DEEP = 100  # '[' and '{' in a body from which decoding may depend on the stack depth

PEER = ("192.0.2.7", 4242)
LOGGER = logging.getLogger(service_mod.__name__)


class InvariantError(AssertionError):
    """The service or the client broke one of its documented guarantees."""


class Divergence(AssertionError):
    """The service or the client did not do what the model says."""


def consume_chunk(fdp) -> tuple[bytes, bool]:
    """One chunk of the wire: (bytes, whether it was the rest)."""
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == SIZE_REST:
        return fdp.ConsumeBytes(fdp.remaining_bytes()), True
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(*SIZE_RANGES[kind])), False


def deep(body: bytes) -> bool:
    return body.count(b"[") + body.count(b"{") >= DEEP


class _Counting(logging.Handler):
    """Counts the service's log lines (and formats each: that must work too)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(message)

    def handleError(self, record: logging.LogRecord) -> None:
        raise InvariantError(f"a log line could not be formatted: {record.msg!r} {record.args!r}")


_log = _Counting()
LOGGER.addHandler(_log)
LOGGER.setLevel(logging.INFO)
LOGGER.propagate = False

# ------------------------------------------------------------------ service side


class FakeTransport:
    """What the connection sees of a socket transport."""

    def __init__(self, pause_writes: bool) -> None:
        self.protocol = None
        self.out = bytearray()
        self.closing = False
        self.aborted = False
        self.reading = True
        self.pause_writes = pause_writes
        self.write_paused = False

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def get_extra_info(self, name, default=None):
        return PEER if name == "peername" else default

    def write(self, data) -> None:
        if self.closing:
            raise InvariantError(f"write of {len(data)} bytes after the transport was closed")
        self.out += data
        if self.pause_writes and not self.write_paused:
            self.write_paused = True
            self.protocol.pause_writing()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading


class Clock:
    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ServiceModel:
    """What the documentation says the connection does with the same events."""

    def __init__(self, handover: bool, at_cap: bool, max_size: int, max_keys: int, max_values: int, clock: Clock):
        self.out: list[tuple] = []  # ("hello", status) or ("reply", id, status, value, id_may_be_0)
        self.closed = False
        self.drops = 0  # connections closed for cause: one WARNING each
        self.awaiting_hello = not handover
        self.hello = bytearray()
        self.stream = bytearray()
        self.max_size = max_size
        self.max_keys = max_keys
        self.max_values = max_values
        self.clock = clock
        self.store: dict[str, dict[str, float]] = {}
        if at_cap:
            self.out.append(("hello", HelloStatus.BUSY))
            self.drop()
        elif handover:
            self.out.append(("hello", HelloStatus.OK))

    def drop(self) -> None:
        self.closed = True
        self.drops += 1

    def bad_request(self, request_id: int, id_may_be_0: bool = False) -> None:
        self.out.append(("reply", request_id, Status.BAD_REQUEST, None, id_may_be_0))
        self.drop()

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        if self.awaiting_hello:
            self.hello += data
            if len(self.hello) < proto.HELLO_SIZE:
                if self.hello[:4] != proto.MAGIC[: len(self.hello[:4])]:
                    self.bad_request(0)
                return
            hello, data = bytes(self.hello[: proto.HELLO_SIZE]), bytes(self.hello[proto.HELLO_SIZE :])
            if hello[:4] != proto.MAGIC:
                self.bad_request(0)
                return
            if hello[4] not in proto.SUPPORTED_VERSIONS:
                self.out.append(("hello", HelloStatus.VERSION_UNSUPPORTED))
                self.drop()
                return
            if hello[5:6] != proto.ROLE_REGISTRY:
                self.out.append(("hello", HelloStatus.BAD_ROLE))
                self.drop()
                return
            self.awaiting_hello = False
            self.out.append(("hello", HelloStatus.OK))
        self.stream += data
        while not self.closed and len(self.stream) >= 4:
            length = int.from_bytes(self.stream[:4], "big")
            if length > self.max_size:
                self.bad_request(0)
                return
            if len(self.stream) - 4 < length:
                return
            body = bytes(self.stream[4 : 4 + length])
            del self.stream[: 4 + length]
            self.request(body)

    def request(self, body: bytes) -> None:
        try:
            message = proto.decode_message_body(body)
        except ControlProtocolError:
            self.bad_request(0)
            return
        request_id = message.get("id") if isinstance(message, dict) else None
        if type(request_id) is not int or not 0 <= request_id <= 0xFFFFFFFF:
            request_id = 0
        try:
            request = proto.parse_request(message)
        except ControlProtocolError:
            self.bad_request(request_id, deep(body))
            return
        if request.request not in proto.REGISTRY_REQUESTS:
            self.bad_request(request_id, deep(body))
            return
        value, now = request.value, self.clock.now
        if request.request == "announce":
            key, val = value["key"], value["value"]
            live = {v: e for v, e in self.store.get(key, {}).items() if e > now}
            if not live:
                others = sum(1 for k, values in self.store.items() if k != key and any(e > now for e in values.values()))
                if others >= self.max_keys:
                    self.out.append(("reply", request.id, Status.FULL, None, False))
                    return
            elif val not in live and len(live) >= self.max_values:
                self.out.append(("reply", request.id, Status.FULL, None, False))
                return
            live[val] = now + float(value["ttl"])
            self.store[key] = live
            self.out.append(("reply", request.id, Status.OK, None, False))
        elif request.request == "lookup":
            live = [v for v, e in self.store.get(value["key"], {}).items() if e > now]
            self.out.append(("reply", request.id, Status.OK, live[: value["max_values"]], False))
        else:
            values = self.store.get(value["key"])
            if values is not None:
                values.pop(value["value"], None)
                if not values:
                    del self.store[value["key"]]
            self.out.append(("reply", request.id, Status.OK, None, False))

    def timer(self) -> None:
        if self.closed:
            return  # the abort after a close: nothing to see
        if self.awaiting_hello:
            self.drop()  # no hello in time
        else:
            self.closed = True  # idle: closed, an INFO line


def check_output(out: bytes, expected: list[tuple]) -> None:
    """The bytes written must be exactly the model's hello reply and replies."""
    pos = 0
    if expected and expected[0][0] == "hello":
        reader = proto.HelloReplyReader()
        try:
            hello = reader.feed(out)
        except ControlProtocolError as exc:
            raise InvariantError(f"the service's hello reply does not parse: {exc}") from None
        status = expected[0][1]
        if hello is None:
            raise Divergence(f"no (complete) hello reply; expected status {status}")
        good_nonce = len(hello.nonce) == proto.NONCE_SIZE and (
            hello.nonce != bytes(proto.NONCE_SIZE) if status == HelloStatus.OK else hello.nonce == bytes(proto.NONCE_SIZE)
        )
        if (
            hello.status != status
            or hello.version != (proto.PROTOCOL_VERSION if status == HelloStatus.OK else 0)
            or hello.versions != proto.SUPPORTED_VERSIONS
            or not good_nonce
        ):
            raise Divergence(f"hello reply {hello!r}; expected status {status}")
        pos = len(out) - len(reader.rest)
        expected = expected[1:]
    reader = proto.MessageReader()
    try:
        messages = reader.feed(out[pos:])
    except ControlProtocolError as exc:
        raise InvariantError(f"the service wrote a reply that does not decode: {exc}") from None
    if reader.buffered:
        raise InvariantError(f"{reader.buffered} bytes of a partial reply written")
    if len(messages) != len(expected) or any(e[0] != "reply" for e in expected):
        got = [(m.get("id"), m.get("status")) if isinstance(m, dict) else m for m in messages]
        want = [e[1:3] if e[0] == "reply" else e for e in expected]
        raise Divergence(f"the service answered {got}; the model {want}")
    for message, (_, request_id, status, value, id_may_be_0) in zip(messages, expected):
        try:
            reply = proto.parse_reply(message)
        except ControlProtocolError as exc:
            raise InvariantError(f"the service wrote a bad reply {message!r}: {exc}") from None
        if reply.status != status or (reply.id != request_id and not (id_may_be_0 and reply.id == 0)):
            raise Divergence(f"reply {reply.id} {reply.status}; the model says {request_id} {status}")
        if status == Status.BAD_REQUEST:
            if not isinstance(reply.value, str) or not 0 < len(reply.value) <= 300:
                raise InvariantError(f"BAD_REQUEST reason {reply.value!r}")
        elif status == Status.FULL:
            if not isinstance(reply.value, str) or not reply.value:
                raise InvariantError(f"FULL reason {reply.value!r}")
        elif reply.value != value:
            raise Divergence(f"reply {reply.id}: {reply.value!r}; the model says {value!r}")


def fire_timer(connection) -> None:
    timer = connection.timer
    if timer is None or timer.cancelled():
        return
    callback, args = timer._callback, timer._args  # asyncio.TimerHandle internals (CPython 3.8+)
    timer.cancel()
    callback(*args)


async def play_service(fdp) -> None:
    opts = fdp.ConsumeIntInRange(*OPT_RANGE)
    handover = bool(opts & OPT_HANDOVER)
    small_store = bool(opts & OPT_SMALL_STORE)
    max_size = SMALL_MESSAGE_SIZE if opts & OPT_SMALL_MESSAGES else proto.MAX_MESSAGE_SIZE
    at_cap = bool(opts & OPT_AT_CAP)
    max_keys, max_values = (
        (SMALL_KEYS, SMALL_VALUES) if small_store else (store_mod.DEFAULT_MAX_KEYS, store_mod.DEFAULT_MAX_VALUES_PER_KEY)
    )
    clock = Clock()
    store = store_mod.TTLStore(max_keys=max_keys, max_values_per_key=max_values, clock=clock)
    limits = service_mod.RegistryLimits(max_connections=1 if at_cap else 1024, max_message_size=max_size)
    service = service_mod.RegistryService(limits, store=store)
    blocker = object()
    if at_cap:
        service._connections.add(blocker)  # another connection holds the only place
    model = ServiceModel(handover, at_cap, max_size, max_keys, max_values, clock)
    transport = FakeTransport(bool(opts & OPT_PAUSE_WRITES))
    _log.warnings.clear()

    lost = False
    if handover:
        transport.reading = False  # the forwarder paused it to read the hello
        first, _ = consume_chunk(fdp)
        service.serve_connection(transport, first, PEER)
        connection = transport.protocol
        model.feed(first)
    else:
        connection = service_mod._RegistryConnection(service, hello_done=False)
        transport.set_protocol(connection)
        connection.connection_made(transport)
    drain(connection, transport)
    check_state(model, transport, "at the start")

    steps = 0
    while fdp.remaining_bytes() and steps < MAX_STEPS and not lost:
        steps += 1
        chunk, rest = consume_chunk(fdp)
        if not transport.closing and transport.reading:
            connection.data_received(chunk)
            model.feed(chunk)
            drain(connection, transport)
        if rest:
            break
        command = fdp.ConsumeIntInRange(*CMD_RANGE)
        if command == CMD_CLOCK:
            clock.now += fdp.ConsumeIntInRange(*CLOCK_RANGE)
        elif command == CMD_TIMER:
            was_closed = model.closed
            fire_timer(connection)
            model.timer()
            if not was_closed:
                drain(connection, transport)
        elif command == CMD_EOF and not transport.closing:
            if connection.eof_received():
                raise InvariantError("eof_received asked to keep the transport open")
            # What asyncio does when eof_received returns False: close, and
            # (nothing is left to send) connection_lost at once.
            transport.close()
            connection.connection_lost(None)
            model.closed = lost = True
        elif command == CMD_LOST:
            transport.closing = True
            connection.connection_lost(ConnectionResetError("reset by the fuzzer"))
            model.closed = lost = True
        check_state(model, transport, f"after step {steps}")

    if not lost:
        connection.connection_lost(None)
    check_output(bytes(transport.out), model.out)
    if len(_log.warnings) != model.drops:
        raise Divergence(f"{len(_log.warnings)} WARNING lines ({_log.warnings}); {model.drops} drops expected")
    drops = sum(n for name, n in service.counters.items() if name.startswith("dropped_"))
    if drops != model.drops:
        raise Divergence(f"dropped_* counters {dict(service.counters)}; {model.drops} drops expected")
    service._connections.discard(blocker)
    if service._connections or connection.counted or connection.timer is not None:
        raise InvariantError("the connection is still counted or timed after connection_lost")
    live = sum(len(values) for values in store._data.values())
    if store.value_count != live or any(not values for values in store._data.values()) or len(store) > max_keys:
        raise InvariantError(f"store bookkeeping: value_count {store.value_count}, {live} values held")
    global last_summary
    answers = ", ".join(f"hello {e[1]}" if e[0] == "hello" else f"{e[2]} {e[1]}" for e in model.out)
    last_summary = f"service: {answers or 'nothing written'}; {'closed' if model.closed else 'open'}, {model.drops} drop(s)"


def drain(connection, transport: FakeTransport) -> None:
    """The peer reads what was written: resume_writing until nothing is held back."""
    for _ in range(100_000):
        if not transport.write_paused or transport.closing:
            return
        transport.write_paused = False
        before = len(transport.out)
        connection.resume_writing()
        if transport.write_paused and len(transport.out) == before:
            raise InvariantError("resume_writing made no progress")
    raise InvariantError("the backlog of requests was never answered")


def check_state(model: ServiceModel, transport: FakeTransport, where: str) -> None:
    if model.closed != transport.closing:
        raise Divergence(f"{where}: the transport is {'closing' if transport.closing else 'open'}; the model says "
                         f"{'closed' if model.closed else 'open'}")


# ------------------------------------------------------------------ client side


class FakeWriter:
    def __init__(self, log: list[bytes]) -> None:
        self.log = log
        self.closed = False
        self.transport = self

    def write(self, data: bytes) -> None:
        if self.closed:
            raise InvariantError("the client wrote on a connection it closed")
        self.log.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name, default=None):
        return default


class _LazyEOFReader(asyncio.StreamReader):
    """A StreamReader whose peer closes the connection once its bytes are read
    (the next read after them sees the end instead of waiting)."""

    async def _wait_for_data(self, func_name: str) -> None:  # asyncio.StreamReader internals
        self.feed_eof()


def expected_first_call(segment: bytes, op: int, max_values: int):
    """The outcome of the first call on the first connection: the value
    returned, or the exception class."""
    # The client reads the fixed part of the hello reply, then the versions.
    fixed = proto.HelloReplyReader.max_size() - 255
    if len(segment) < fixed:
        return RegistryUnavailableError  # the connection closed during the hello
    if segment[:4] != proto.MAGIC:
        return ControlProtocolError
    reader = proto.HelloReplyReader()
    hello = reader.feed(segment)
    if hello is None:
        return RegistryUnavailableError
    if hello.status in (HelloStatus.BUSY, HelloStatus.IP_CONNECTIONS):  # the registry's own connection caps
        return RegistryUnavailableError
    error = proto.hello_error(hello, "fuzz")
    if isinstance(error, fastnat.errors.ForwarderBusyError):  # any other limit: unavailable too
        return RegistryUnavailableError
    if error is not None:
        return type(error)
    rest = reader.rest
    if not rest:
        return RegistryUnavailableError  # closed before the reply
    if len(rest) < 4:
        return ControlProtocolError
    length = int.from_bytes(rest[:4], "big")
    if length > proto.MAX_MESSAGE_SIZE or len(rest) - 4 < length:
        return ControlProtocolError
    try:
        reply = proto.parse_reply(proto.decode_message_body(rest[4 : 4 + length]))
    except ControlProtocolError:
        return ControlProtocolError
    if reply.id != 1:
        return ControlProtocolError
    if reply.status == Status.FULL:
        return ValueError
    if reply.status != Status.OK:
        return ControlProtocolError
    if op != OP_LOOKUP:
        return None
    values = reply.value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values) or len(values) > max_values:
        return ControlProtocolError
    return values


async def play_client(fdp) -> None:
    calls = []
    for _ in range(fdp.ConsumeIntInRange(*CALLS_RANGE)):
        op = fdp.ConsumeIntInRange(*OP_RANGE)
        calls.append((op, fdp.ConsumeIntInRange(*MAX_VALUES_RANGE) if op == OP_LOOKUP else 0))
    registry = service_mod.ServiceRegistry("fastnat://192.0.2.7:4242", timeout=5.0)
    segments: list[bytes] = []
    writes: list[list[bytes]] = []

    async def connect() -> None:
        if not fdp.remaining_bytes():
            raise RegistryUnavailableError("fuzz: connection refused")
        segment, _ = consume_chunk(fdp)
        segments.append(segment)
        writes.append([])
        reader = _LazyEOFReader()
        reader.feed_data(segment)
        if fdp.ConsumeIntInRange(*EOF_RANGE) == EOF_AT_ONCE:
            reader.feed_eof()
        registry._reader, registry._writer = reader, FakeWriter(writes[-1])

    registry._connect = connect
    outcomes: list[str] = []
    for n, (op, max_values) in enumerate(calls):
        try:
            if op == OP_ANNOUNCE:
                result = await registry.announce("k", "v", 30)
            elif op == OP_LOOKUP:
                result = await registry.lookup("k", max_values)
            else:
                result = await registry.withdraw("k", "v")
        except (ValueError, ControlProtocolError, RegistryUnavailableError) as exc:
            result = exc
            if type(exc) is ValueError and not str(exc):
                raise InvariantError("a FULL answer without a message") from None
        if op == OP_LOOKUP and not isinstance(result, BaseException):
            if not isinstance(result, list) or not all(type(v) is str for v in result) or len(result) > max_values:
                raise InvariantError(f"lookup(max_values={max_values}) returned {result!r}")
        elif not isinstance(result, BaseException) and result is not None:
            raise InvariantError(f"{('announce', 'lookup', 'withdraw')[op]} returned {result!r}")
        if n == 0 and segments:
            expected = expected_first_call(segments[0], op, max_values)
            if isinstance(result, BaseException):
                if type(result) is not expected and not (
                    isinstance(result, ControlProtocolError) and "RecursionError" in str(result)
                ):
                    raise Divergence(f"first call raised {result!r}; the model says {expected!r}")
            elif isinstance(expected, type) or result != expected:
                raise Divergence(f"first call returned {result!r}; the model says {expected!r}")
        outcomes.append(type(result).__name__ if isinstance(result, BaseException) else repr(result))
    await registry.close()
    check_requests(writes)
    global last_summary
    last_summary = f"client: {len(segments)} connection(s); " + ", ".join(
        f"{('announce', 'lookup', 'withdraw')[op]} -> {outcome}" for (op, _), outcome in zip(calls, outcomes)
    )


def check_requests(writes: list[list[bytes]]) -> None:
    """What the client wrote: on each connection a registry hello, then requests."""
    last_id = 0
    for log in writes:
        data = b"".join(log)
        if proto.parse_hello(data[: proto.HELLO_SIZE]) != proto.Hello(proto.PROTOCOL_VERSION, proto.ROLE_REGISTRY):
            raise InvariantError(f"the client said hello with {data[:6]!r}")
        reader = proto.MessageReader()
        messages = reader.feed(data[proto.HELLO_SIZE :])
        if reader.buffered or not messages:
            raise InvariantError("the client wrote a partial request")
        for message in messages:
            request = proto.parse_request(message)
            if request.request not in proto.REGISTRY_REQUESTS or request.id <= last_id:
                raise InvariantError(f"the client sent {request!r} after request {last_id}")
            last_id = request.id


# ------------------------------------------------------------------- driver

_loop = asyncio.new_event_loop()
last_summary = ""  # what the last input did, for fuzz/make_corpus.py


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(*SIDE_RANGE) == SIDE_SERVICE:
        _loop.run_until_complete(play_service(fdp))
    else:
        _loop.run_until_complete(play_client(fdp))


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

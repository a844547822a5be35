#!/usr/bin/env python3
"""Coverage-guided fuzz target for the control protocol's parsers (``fastnat.protocol``).

Run it (from the repository root, with fastnat installed, plus
``pip install atheris``) as CI does, together with the other targets::

    fuzz/run.sh 60                  # every target, 60 s each
    fuzz/run.sh 60 control          # this one only

or by hand, libFuzzer flags after the script; new inputs are written into the
FIRST corpus directory, so give a scratch one before the committed seeds::

    mkdir -p /tmp/control-corpus
    python fuzz/fuzz_control.py /tmp/control-corpus fuzz/corpus/control -dict=fuzz/control.dict -max_total_time=60

Replay inputs (a crash file, or every seed) without fuzzing::

    python fuzz/fuzz_control.py path/to/crash-file
    python fuzz/make_corpus.py --check control

What is parsed
--------------
Every byte a forwarder, a server, a client or the registry service reads
before the multiplexer takes over goes through these: the dialler's hello
(``parse_hello``), the forwarder's hello reply (``HelloReplyReader``), the
length-prefixed JSON messages (``MessageReader``, ``decode_message_length``,
``decode_message_body``, and the asyncio readers of ``fastnat.aio._control``
and ``fastnat.aio.client`` built on them), then the field checks of
``parse_request`` / ``parse_reply`` and the validators they use
(``validate_server_id``, ``validate_port``, the registry's ``validate_key`` ...),
and ``check_registration_proof``. The registry service's own connection
handling (one request at a time, its replies, its store) and its client have a
target of their own, ``fuzz_registry.py``; the framing and field parsing they
share with the forwarder is fuzzed here.

What one input does
-------------------
Read with ``atheris.FuzzedDataProvider``: decisions from the back
(``ConsumeIntInRange``), wire bytes from the front (``ConsumeBytes``), as in
``fuzz_mux.py``; ``fuzz/make_corpus.py`` writes seeds in that layout. The
decisions: the mode (bare messages; a dialler's 6-byte hello then requests,
what a forwarder reads; a forwarder's hello reply then replies, what a
client reads), the message size cap of the readers (64 KiB, 0, 40, 1024), how
many messages ``MessageReader.feed`` may return (no limit, 1, 2, 0 then drained,
or chosen per chunk), and the chunks the wire arrives in (1-8, 1-256, 1-8192
bytes, or the rest).

The wire is then parsed, each way independently:

* ``parse_hello`` on the first 6 bytes; ``HelloReplyReader`` fed the chunks
  and fed everything at once, against a model of the layout;
* the message stream (what follows the hello or hello reply) framed by a
  model of the layout (u32 length, body), each body decoded with
  ``decode_message_body``; ``MessageReader.feed`` given everything at once, and
  given the chunks with the chosen ``limit`` then drained; ``take_rest``;
* ``read_message`` on an ``asyncio.StreamReader``; ``HandshakeBuffer`` (its
  ``read_hello_reply`` and ``read_message``); ``FirstMessage`` (chunks as
  ``bytes`` or ``memoryview``); ``fastnat.aio.client.read_hello_reply``;
* each decoded message through ``parse_request`` and ``parse_reply``; every
  value in it (strings, numbers, lists, objects ...) through
  ``validate_server_id``, ``validate_port`` (with and without ``allow_zero``),
  the registry validators, and as the proof (and, when it is a valid id, the
  id) of ``check_registration_proof``; the first bytes of the wire, decoded
  with ``surrogateescape`` and as Latin-1, as server ids too.

Crashes (any of these stops the input with an exception)
--------------------------------------------------------
* an exception other than the documented ones escapes: ``ControlProtocolError``
  from the parsers and readers (and ``ConnectionResetError`` from
  ``HandshakeBuffer`` at the end of its input), ``ValueError`` from the
  validators and from ``encode_*`` (only its size cap, when re-encoding),
  nothing at all from ``check_registration_proof`` (a ``bool``) and
  ``reply_error`` / ``hello_error`` (an error object or None). A TypeError,
  KeyError, AttributeError, RecursionError, UnicodeError... is a bug;
* two readers disagree: with the model, or with each other (messages, the
  point of failure, the bytes left over); chunking changes what
  ``MessageReader`` or ``HelloReplyReader`` yield; ``feed`` returns more than
  ``limit`` messages; ``take_rest`` is not exactly the bytes after the
  messages returned;
* a round trip breaks: a hello that parses (with a known role) is not what
  ``encode_hello`` writes; a hello reply is not what ``encode_hello_reply``
  writes; a request or reply that parses does not re-encode with
  ``encode_request`` / ``encode_reply`` into a message that parses back equal
  (same types, same values, same key order);
* a ``ControlProtocolError`` from ``parse_request`` cannot be sent back in a
  ``BAD_REQUEST`` reply (the registry service does that with its text);
* a validator accepts what it documents as invalid: a server id that is not
  1-255 printable, space-free characters (or cannot be encoded in UTF-8); a
  port that is not an ``int`` in range; a registration proof accepted for the
  wrong id or nonce, or refused when right;
* a hang or runaway memory: libFuzzer's ``-timeout`` and ``-rss_limit_mb``.

Decoding nested JSON near the recursion limit fails or not depending on how
deep the stack already is (``_decode_json`` turns that ``RecursionError`` into
a ``ControlProtocolError``), so readers that run at different stack depths may
disagree on such a message: that, and only that, is not a crash. The model
decodes 16 frames deeper than the field checks run, so that checking what it
decoded never hits the limit for the harness's sake.
"""

from __future__ import annotations

import asyncio
import sys

import atheris

with atheris.instrument_imports(include=["fastnat"]):
    import fastnat.aio._control as aio_control
    import fastnat.aio.client as aio_client
    import fastnat.discovery.base as registry_base
    import fastnat.errors
    import fastnat.protocol as proto
    import fastnat.settings

ControlProtocolError = fastnat.errors.ControlProtocolError
NATLayerError = fastnat.errors.NATLayerError

# --------------------------------------------------------------------- grammar
# Shared with fuzz/make_corpus.py, which writes seeds in this layout.

MODE_MESSAGES, MODE_HELLO, MODE_HELLO_REPLY = range(3)
MODE_RANGE = (0, 2)
MAX_SIZES = (proto.MAX_MESSAGE_SIZE, 0, 40, 1024)
MAX_SIZE_RANGE = (0, len(MAX_SIZES) - 1)
LIMIT_NONE, LIMIT_ONE, LIMIT_TWO, LIMIT_ZERO, LIMIT_PER_CHUNK = range(5)
LIMIT_RANGE = (0, 4)
CHUNK_LIMITS = (None, 0, 1, 2)  # LIMIT_PER_CHUNK: one of these after each chunk
CHUNK_LIMIT_RANGE = (0, len(CHUNK_LIMITS) - 1)
VIEWS_RANGE = (0, 1)  # FirstMessage gets memoryviews (as from a StreamTransport) or bytes
SIZE_REST, SIZE_TINY, SIZE_SMALL, SIZE_LARGE = range(4)  # SIZE_REST = 0: what an exhausted script reads
SIZE_RANGES = {SIZE_TINY: (1, 8), SIZE_SMALL: (1, 256), SIZE_LARGE: (1, 8192)}
MAX_CHUNKS = 2048

SECRET = b"fuzz secret"
NONCE = bytes(range(proto.NONCE_SIZE))
OTHER_NONCE = bytes(range(1, proto.NONCE_SIZE + 1))
VALID_ID = "srv#1"
MAX_VALUES_CHECKED = 48  # values of one message given to the validators
MAX_MESSAGES_CHECKED = 32
DEPTH_PAD = 16  # extra frames under which the model decodes (see the docstring)

_HELLO_REPLY_FIXED = len(proto.MAGIC) + 2 + proto.NONCE_SIZE + 1


class InvariantError(AssertionError):
    """A parser broke one of its documented guarantees."""


class Divergence(AssertionError):
    """Two ways of parsing the same bytes disagreed."""


class Input:
    __slots__ = ("chunks", "limit_kind", "limits", "max_size", "mode", "views")

    def __init__(self, data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        self.mode = fdp.ConsumeIntInRange(*MODE_RANGE)
        self.max_size = MAX_SIZES[fdp.ConsumeIntInRange(*MAX_SIZE_RANGE)]
        self.limit_kind = fdp.ConsumeIntInRange(*LIMIT_RANGE)
        self.views = bool(fdp.ConsumeIntInRange(*VIEWS_RANGE))
        self.chunks: list[bytes] = []
        self.limits: list[int | None] = []
        while fdp.remaining_bytes() and len(self.chunks) < MAX_CHUNKS:
            kind = fdp.ConsumeIntInRange(0, 3)
            if kind == SIZE_REST:
                self.chunks.append(fdp.ConsumeBytes(fdp.remaining_bytes()))
            else:
                self.chunks.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(*SIZE_RANGES[kind])))
            if self.limit_kind == LIMIT_PER_CHUNK:
                self.limits.append(CHUNK_LIMITS[fdp.ConsumeIntInRange(*CHUNK_LIMIT_RANGE)])
            else:
                self.limits.append({LIMIT_NONE: None, LIMIT_ONE: 1, LIMIT_TWO: 2, LIMIT_ZERO: 0}[self.limit_kind])
            if kind == SIZE_REST:
                break


# --------------------------------------------------------------------- helpers


def same(a, b) -> bool:
    """Structural equality of decoded JSON (types, values, key order), iterative:
    comparing deep values must not hit the recursion limit."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if type(x) is list:
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y))
        elif type(x) is dict:
            if list(x) != list(y):
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif x != y:
            return False
    return True


def depth_dependent(exc: BaseException | None) -> bool:
    """A decoding failure that depends on the stack depth (see the docstring)."""
    return isinstance(exc, ControlProtocolError) and "RecursionError" in str(exc)


def at_depth(n: int, fn, *args):
    """``fn(*args)`` called ``n`` frames deeper."""
    if n:
        return at_depth(n - 1, fn, *args)
    return fn(*args)


def skip(chunks: list[bytes], limits: list, n: int) -> tuple[list[bytes], list]:
    """The chunks (and their limits) after the first ``n`` bytes."""
    out, out_limits = [], []
    for chunk, limit in zip(chunks, limits):
        if n >= len(chunk):
            n -= len(chunk)
            continue
        out.append(chunk[n:])
        out_limits.append(limit)
        n = 0
    return out, out_limits


class Stream:
    """The model's view of a message stream: the messages, and how it ends."""

    __slots__ = ("ends", "error", "length", "messages", "tail_start")

    def __init__(self, stream: bytes, max_size: int) -> None:
        self.messages: list = []
        self.ends: list[int] = []  # offset after each message
        self.error: BaseException | None = None  # what stops the stream, if anything
        self.length = len(stream)
        pos = 0
        while len(stream) - pos >= 4:
            length = int.from_bytes(stream[pos : pos + 4], "big")
            if length > max_size:
                self.error = ControlProtocolError(f"length {length} above {max_size}")
                break
            if len(stream) - pos - 4 < length:
                break
            try:
                message = at_depth(DEPTH_PAD, proto.decode_message_body, stream[pos + 4 : pos + 4 + length])
            except ControlProtocolError as exc:
                self.error = exc
                break
            pos += 4 + length
            self.messages.append(message)
            self.ends.append(pos)
        self.tail_start = pos

    def compare(
        self, what: str, got: list, error: BaseException | None, *, partial_tail_fails: bool
    ) -> None:
        """``got`` (messages, then ``error`` or None) must be what the model read:
        ``partial_tail_fails`` for readers that fail on a stream ending inside
        a message (others end with None or ``ConnectionResetError``).
        Depth-dependent decoding failures end the comparison."""
        for i, message in enumerate(got):
            if i >= len(self.messages):
                if i == len(self.messages) and depth_dependent(self.error):
                    return
                raise Divergence(f"{what}: message #{i} {_short(message)} beyond the model's {len(self.messages)}")
            if not same(message, self.messages[i]):
                raise Divergence(f"{what}: message #{i} is {_short(message)}, the model read {_short(self.messages[i])}")
        if len(got) < len(self.messages):
            if depth_dependent(error):
                return
            raise Divergence(f"{what}: {len(got)} messages then {error!r}; the model read {len(self.messages)}")
        if self.error is not None:
            if not isinstance(error, ControlProtocolError) and not depth_dependent(self.error):
                raise Divergence(f"{what}: ended with {error!r}; the model failed with {self.error!r}")
        elif partial_tail_fails and self.tail_start < self.length:
            if not isinstance(error, ControlProtocolError):
                raise Divergence(f"{what}: a stream ending inside a message ended with {error!r}")
        elif error is not None and not isinstance(error, ConnectionResetError):
            raise Divergence(f"{what}: failed with {error!r} on a well-formed stream")


def _short(obj) -> str:
    text = repr(obj) if not isinstance(obj, (list, dict)) or len(obj) < 20 else f"<{type(obj).__name__} of {len(obj)}>"
    return text if len(text) < 200 else text[:200] + "..."


def hello_reply_model(wire: bytes):
    """(reply, consumed), None if incomplete, or the exception the reader must raise."""
    if len(wire) >= 4 and wire[:4] != proto.MAGIC:
        return ControlProtocolError("bad magic")
    if len(wire) < _HELLO_REPLY_FIXED:
        return None
    end = _HELLO_REPLY_FIXED + wire[_HELLO_REPLY_FIXED - 1]
    if len(wire) < end:
        return None
    reply = proto.HelloReply(wire[4], wire[5], bytes(wire[6 : 6 + proto.NONCE_SIZE]), tuple(wire[_HELLO_REPLY_FIXED:end]))
    return reply, end


# --------------------------------------------------------------------- hellos


def check_hello(wire: bytes) -> None:
    head = wire[: proto.HELLO_SIZE]
    try:
        hello = proto.parse_hello(head)
    except ControlProtocolError:
        if len(head) == proto.HELLO_SIZE and head[:4] == proto.MAGIC:
            raise InvariantError(f"parse_hello refused {head!r}") from None
        return
    if len(head) != proto.HELLO_SIZE or head[:4] != proto.MAGIC:
        raise InvariantError(f"parse_hello accepted {head!r}")
    if hello.version != head[4] or hello.role != head[5:6] or type(hello.role) is not bytes:
        raise InvariantError(f"parse_hello({head!r}) -> {hello!r}")
    try:
        again = proto.encode_hello(hello.role, hello.version)
    except ValueError:
        if hello.role in (proto.ROLE_SERVER, proto.ROLE_CLIENT, proto.ROLE_REGISTRY):
            raise
        return
    if again != head:
        raise InvariantError(f"encode_hello{(hello.role, hello.version)!r} -> {again!r}, parsed from {head!r}")
    if len(wire) != proto.HELLO_SIZE:
        try:
            proto.parse_hello(wire)
        except ControlProtocolError:
            pass
        else:
            raise InvariantError(f"parse_hello accepted {len(wire)} bytes")


def check_hello_reply_object(reply) -> None:
    error = proto.hello_error(reply, "fuzz")
    ok = reply.status == proto.HelloStatus.OK and reply.version in proto.SUPPORTED_VERSIONS
    if (error is None) != ok or (error is not None and not isinstance(error, NATLayerError)):
        raise InvariantError(f"hello_error({reply!r}) -> {error!r}")
    str(error)
    reply.status_name  # noqa: B018 - must not raise
    again = proto.encode_hello_reply(reply.status, reply.version, reply.nonce, reply.versions)
    return again


def read_hello_reply_chunked(inp: Input):
    """HelloReplyReader fed the chunks, against the model; returns the message
    chunks that follow, or None when the stream stops at the hello reply."""
    wire = b"".join(inp.chunks)
    expected = hello_reply_model(wire)
    # Everything at once.
    try:
        whole = proto.HelloReplyReader().feed(wire)
    except ControlProtocolError as exc:
        if not isinstance(expected, ControlProtocolError):
            raise Divergence(f"HelloReplyReader raised {exc!r} on a good reply") from None
    else:
        if isinstance(expected, BaseException) or (whole is None) != (expected is None):
            raise Divergence(f"HelloReplyReader -> {whole!r}, the model says {expected!r}")
    # In the chunks.
    reader = proto.HelloReplyReader()
    reply = None
    fed = 0
    for i, chunk in enumerate(inp.chunks):
        fed += len(chunk)
        try:
            reply = reader.feed(chunk)
        except ControlProtocolError:
            if not isinstance(expected, ControlProtocolError) or fed < 4:
                raise Divergence(f"HelloReplyReader raised after {fed} bytes, the model says {expected!r}") from None
            return None
        if reply is not None:
            break
    if isinstance(expected, BaseException):
        raise Divergence(f"HelloReplyReader never raised, the model says {expected!r}")
    if reply is None:
        if expected is not None:
            raise Divergence(f"HelloReplyReader incomplete after {fed} bytes, the model read {expected!r}")
        return None
    expected_reply, end = expected
    if reply != expected_reply or reply != whole:
        raise Divergence(f"HelloReplyReader -> {reply!r} in chunks, {whole!r} at once, the model read {expected_reply!r}")
    if reader.rest != wire[end:fed]:
        raise Divergence(f"HelloReplyReader.rest is {reader.rest!r}, expected {wire[end:fed]!r}")
    if type(reply.nonce) is not bytes or len(reply.nonce) != proto.NONCE_SIZE:
        raise InvariantError(f"nonce {reply.nonce!r}")
    if check_hello_reply_object(reply) != wire[:end]:
        raise InvariantError(f"encode_hello_reply does not give back {wire[:end]!r}")
    return skip(inp.chunks, inp.limits, end)


# ------------------------------------------------------------------- messages


def read_messages(model: Stream, stream: bytes, chunks: list[bytes], limits: list, max_size: int) -> None:
    # Everything at once, no limit: the good messages, then (on bad input)
    # the error, raised by the next feed.
    reader = proto.MessageReader(max_size)
    got, error = [], None
    try:
        got = at_depth(DEPTH_PAD, reader.feed, stream)
        if got:
            at_depth(DEPTH_PAD, reader.feed, b"")
    except ControlProtocolError as exc:
        error = exc
        if model.error is None and not depth_dependent(exc):
            raise Divergence(f"MessageReader.feed(everything) raised {exc!r}; the model read a good stream") from None
    model.compare("MessageReader.feed(everything)", got, error, partial_tail_fails=False)
    if error is None and model.error is None and reader.buffered != len(stream) - model.tail_start:
        raise InvariantError(f"{reader.buffered} bytes buffered, {len(stream) - model.tail_start} expected")
    # In the chunks, with the limits; then drained.
    reader = proto.MessageReader(max_size)
    got, error, fed = [], None, 0
    for chunk, limit in zip(chunks, limits):
        fed += len(chunk)
        try:
            out = at_depth(DEPTH_PAD, reader.feed, chunk, limit)
        except ControlProtocolError as exc:
            error = exc
            break
        if limit is not None and len(out) > limit:
            raise InvariantError(f"feed(limit={limit}) returned {len(out)} messages")
        got += out
        # Once every good message is out, bad input may have been met (and
        # its error held for the next feed): nothing is buffered then.
        error_may_be_held = model.error is not None and len(got) == len(model.ends)
        if len(got) <= len(model.ends) and not error_may_be_held:
            # Everything after the messages returned stays buffered (for take_rest()).
            start = model.ends[len(got) - 1] if got else 0
            if reader.buffered != fed - start:
                raise InvariantError(f"after {len(got)} messages {reader.buffered} bytes buffered, {fed - start} expected")
    if error is None:
        while True:
            try:
                out = at_depth(DEPTH_PAD, reader.feed, b"", 1)
            except ControlProtocolError as exc:
                error = exc
                break
            if not out:
                break
            got += out
    model.compare("MessageReader.feed(chunks)", got, error, partial_tail_fails=False)
    if error is None and model.error is None:
        rest = reader.take_rest()
        if rest != stream[model.tail_start :] or reader.buffered:
            raise InvariantError(f"take_rest() -> {rest!r}, expected {stream[model.tail_start:]!r}")


async def read_async(inp: Input, model: Stream, stream: bytes, chunks: list[bytes], reply_chunks) -> None:
    """The asyncio readers of fastnat.aio: each on the same bytes."""
    await check_read_message(model, stream, inp.max_size)
    await check_handshake_buffer(model, stream, chunks, reply_chunks, inp.max_size)
    if reply_chunks is not None:
        await check_client_hello_reply(b"".join(reply_chunks))
    check_first_message(model, stream, chunks, inp.max_size, inp.views)


async def check_read_message(model: Stream, stream: bytes, max_size: int) -> None:
    """fastnat.aio._control.read_message on a StreamReader."""
    reader = asyncio.StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    got, error = [], None
    while True:
        try:
            message = await aio_control.read_message(reader, max_size)
        except ControlProtocolError as exc:
            error = exc
            break
        if message is None:
            break
        got.append(message)
    model.compare("read_message", got, error, partial_tail_fails=True)


async def check_handshake_buffer(model: Stream, stream: bytes, chunks, reply_chunks, max_size: int) -> None:
    """HandshakeBuffer: the hello reply first when there is one, then messages."""
    holder = aio_control.HandshakeBuffer()
    for chunk in reply_chunks if reply_chunks is not None else chunks:
        holder.data_received(chunk)
    holder.eof_received()
    if reply_chunks is not None:
        wire = b"".join(reply_chunks)
        expected = hello_reply_model(wire)
        try:
            reply, rest = await holder.read_hello_reply(5.0)
        except (ControlProtocolError, ConnectionResetError) as exc:
            if (expected is None and type(exc) is ConnectionResetError) or (
                isinstance(expected, ControlProtocolError) and isinstance(exc, ControlProtocolError)
            ):
                return
            raise Divergence(f"HandshakeBuffer.read_hello_reply raised {exc!r}; the model says {expected!r}") from None
        if not isinstance(expected, tuple) or reply != expected[0] or rest != wire[expected[1] :]:
            raise Divergence(f"HandshakeBuffer.read_hello_reply -> {reply!r}, {rest!r}; the model says {expected!r}")
    got, error = [], None
    while True:
        try:
            got.append(await holder.read_message(5.0, max_size))
        except (ControlProtocolError, ConnectionResetError) as exc:
            error = exc
            break
    model.compare("HandshakeBuffer.read_message", got, error, partial_tail_fails=False)
    complete = type(error) is ConnectionResetError and model.error is None and len(got) == len(model.messages)
    if complete and holder.take_rest() != stream[model.tail_start :]:
        raise Divergence("HandshakeBuffer.take_rest() is not what followed the messages")


async def check_client_hello_reply(wire: bytes) -> None:
    """fastnat.aio.client.read_hello_reply on a StreamReader."""
    expected = hello_reply_model(wire)
    reader = asyncio.StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    try:
        reply = await aio_client.read_hello_reply(reader, "fuzz")
    except ControlProtocolError:
        if isinstance(expected, tuple):
            raise
        return
    if not isinstance(expected, tuple) or reply != expected[0]:
        raise Divergence(f"aio.client.read_hello_reply -> {reply!r}; the model says {expected!r}")
    if await reader.read() != wire[expected[1] :]:
        raise Divergence("aio.client.read_hello_reply read beyond the hello reply")


def check_first_message(model: Stream, stream: bytes, chunks, max_size: int, views: bool) -> None:
    """FirstMessage, fed the chunks as a transport would."""
    first = aio_control.FirstMessage(max_size)
    transport = _PausableTransport()
    first.connection_made(transport)
    for chunk in chunks:
        first.data_received(memoryview(chunk) if views else chunk)
    first.eof_received()
    first.connection_lost(None)
    exc = first.message.exception()
    if model.messages:
        if exc is not None:
            if depth_dependent(exc):
                return
            raise Divergence(f"FirstMessage failed with {exc!r}; the model read {_short(model.messages[0])}")
        if not same(first.message.result(), model.messages[0]):
            raise Divergence(f"FirstMessage read {_short(first.message.result())}, the model {_short(model.messages[0])}")
        if bytes(first.rest) != stream[model.ends[0] :] or not transport.paused or not first.eof:
            raise Divergence(f"FirstMessage kept {len(first.rest)} bytes (paused: {transport.paused}, eof: {first.eof})")
    elif model.error is not None:
        if not isinstance(exc, ControlProtocolError) and not depth_dependent(model.error):
            raise Divergence(f"FirstMessage: {exc!r}; the model failed with {model.error!r}")
    elif type(exc) is not ConnectionResetError:
        raise Divergence(f"FirstMessage: {exc!r} on a stream without a complete message")


class _PausableTransport:
    paused = False

    def pause_reading(self) -> None:
        self.paused = True


# ----------------------------------------------------- requests, replies, fields


def check_message(message) -> None:
    """``parse_request`` and ``parse_reply`` on one decoded message, with round trips."""
    try:
        request = proto.parse_request(message)
    except ControlProtocolError as exc:
        # The registry service answers BAD_REQUEST with this text.
        reason = str(exc)
        _encode_or_cap(proto.encode_reply, 0, proto.Status.BAD_REQUEST, reason)
        _encode_or_cap(proto.encode_reply, 0, proto.Status.BAD_REQUEST, reason[:300])
    else:
        if type(request.id) is not int or not 0 <= request.id <= 0xFFFFFFFF or request.request not in proto.REQUESTS:
            raise InvariantError(f"parse_request accepted {request!r}")
        body = _encode_or_cap(proto.encode_request, request.id, request.request, request.value)
        if body is not None:
            again = proto.parse_request(_decode_again(body))
            if again.id != request.id or again.request != request.request or not same(again.value, request.value):
                raise InvariantError(f"request {_short(request)} re-encoded parses as {_short(again)}")
    try:
        reply = proto.parse_reply(message)
    except ControlProtocolError:
        pass
    else:
        if type(reply.id) is not int or reply.status not in proto.Status.ALL:
            raise InvariantError(f"parse_reply accepted {reply!r}")
        body = _encode_or_cap(proto.encode_reply, reply.id, reply.status, reply.value)
        if body is not None:
            again = proto.parse_reply(_decode_again(body))
            if again.id != reply.id or again.status != reply.status or not same(again.value, reply.value):
                raise InvariantError(f"reply {_short(reply)} re-encoded parses as {_short(again)}")
        error = proto.reply_error(reply, "fuzz")
        if not isinstance(error, NATLayerError):
            raise InvariantError(f"reply_error -> {error!r}")
        str(error)


def _encode_or_cap(encode, *args):
    try:
        body = encode(*args)
    except ValueError as exc:
        if type(exc) is ValueError and "exceeds the" in str(exc):
            return None  # the documented size cap (numbers such as 1e15 grow when re-encoded)
        raise
    if type(body) is not bytes or proto.decode_message_length(body[:4]) != len(body) - 4:
        raise InvariantError(f"{encode.__name__} wrote {body[:40]!r}...")
    return body


def _decode_again(body: bytes):
    return proto.decode_message_body(body[4:])


def values_of(message) -> list:
    """Up to MAX_VALUES_CHECKED values in ``message``, breadth first (iterative)."""
    out, queue = [], [message]
    while queue and len(out) < MAX_VALUES_CHECKED:
        value = queue.pop(0)
        out.append(value)
        if type(value) is list:
            queue.extend(value[:8])
        elif type(value) is dict:
            queue.extend(list(value)[:4])
            queue.extend(list(value.values())[:8])
    return out


def check_values(values: list) -> None:
    ids = [VALID_ID]
    for value in values:
        try:
            server_id = proto.validate_server_id(value)
        except ValueError:
            pass
        else:
            if (
                server_id is not value
                or not 1 <= len(server_id) <= proto.MAX_ID_LENGTH
                or not server_id.isprintable()
                or any(c.isspace() for c in server_id)
            ):
                raise InvariantError(f"validate_server_id accepted {value!r}")
            server_id.encode("utf-8")  # a registry key, and part of the proof's HMAC
            registry_base.validate_key(fastnat.settings.SERVER_KEY_PREFIX + server_id)
            if len(ids) < 4:
                ids.append(server_id)
        for allow_zero in (False, True):
            try:
                port = proto.validate_port(value, allow_zero=allow_zero)
            except ValueError:
                continue
            if type(port) is not int or port != value or not (0 if allow_zero else 1) <= port <= 65535:
                raise InvariantError(f"validate_port(allow_zero={allow_zero}) accepted {value!r}")
        for validate in (
            registry_base.validate_key,
            registry_base.validate_value,
            registry_base.validate_ttl,
            registry_base.validate_max_values,
        ):
            try:
                validate(value)
            except ValueError:
                pass
    for server_id in ids:
        proof = proto.registration_proof(SECRET, NONCE, server_id)
        if not _proof_ok(server_id, proof) or _proof_ok(server_id, proof, OTHER_NONCE):
            raise InvariantError(f"the proof for {server_id!r} is not bound to its nonce")
        if server_id != VALID_ID and _proof_ok(VALID_ID, proof):
            raise InvariantError(f"the proof for {server_id!r} is accepted for {VALID_ID!r}")
        for value in values:
            if _proof_ok(server_id, value) and value != proof:
                raise InvariantError(f"proof {value!r} accepted for {server_id!r}")


def _proof_ok(server_id: str, proof, nonce: bytes = NONCE) -> bool:
    result = proto.check_registration_proof(SECRET, nonce, server_id, proof)
    if type(result) is not bool:
        raise InvariantError(f"check_registration_proof returned {result!r}")
    return result


# ------------------------------------------------------------------- driver

_loop = asyncio.new_event_loop()


def TestOneInput(data: bytes) -> None:
    inp = Input(data)
    wire = b"".join(inp.chunks)
    check_hello(wire)
    reply_chunks = None
    if inp.mode == MODE_HELLO:
        chunks, limits = skip(inp.chunks, inp.limits, proto.HELLO_SIZE)
    elif inp.mode == MODE_HELLO_REPLY:
        reply_chunks = inp.chunks
        after = read_hello_reply_chunked(inp)
        if after is None:  # no hello reply (yet): nothing more is read
            _loop.run_until_complete(check_handshake_buffer(Stream(b"", 0), b"", [], reply_chunks, inp.max_size))
            _loop.run_until_complete(check_client_hello_reply(wire))
            return
        chunks, limits = after
    else:
        chunks, limits = inp.chunks, inp.limits
    stream = b"".join(chunks)
    model = Stream(stream, inp.max_size)
    read_messages(model, stream, chunks, limits, inp.max_size)
    _loop.run_until_complete(read_async(inp, model, stream, chunks, reply_chunks))
    for message in model.messages[:MAX_MESSAGES_CHECKED]:
        check_message(message)
        check_values(values_of(message))
    head = wire[:300]
    check_values([head.decode("utf-8", "surrogateescape"), head.decode("latin-1"), head.decode("utf-8", "replace")])


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

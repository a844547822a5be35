# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled yamux engine: the twin of :mod:`fastnat._mux_py`.

Same class, same behaviour, same events; ``fastnat._mux_py`` is the readable
reference. What this one adds is speed on the hot path:

* headers are parsed from the caller's buffer with pointer arithmetic;
* a Data frame that lies whole in the chunk is delivered as a memoryview
  slice of it, made directly from the chunk's view (no copy, no slice object);
* a frame split across chunks is reassembled in one buffer that is reused
  from frame to frame unless the application still holds a view of it;
* outgoing frames are written into one reusable buffer, so one
  ``data_to_send()`` or ``flush()`` is one write and no call allocates a
  large fresh object (on glibc that means fresh pages and page faults).

The event classes are defined here as extension types; ``fastnat.events``
exports them, and the pure engine builds these same classes when the
extension is present, so ``isinstance`` holds whichever engine runs.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_IsContiguous, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.long cimport PyLong_CheckExact
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.string cimport memcpy

from operator import index as _index

from fastnat.errors import ProtocolError, SessionClosedError, StreamClosedError, StreamLimitError
from fastnat.mux_config import MuxConfig

cdef extern from "Python.h":
    ctypedef struct PyByteArrayObject:
        Py_ssize_t ob_exports
    object PyMemoryView_FromObject(object obj)
    Py_buffer* PyMemoryView_GET_BUFFER(object view)

cdef extern from *:
    """
    /* A memoryview of bytes [offset, offset + length) of ``base``, which must
       be a 1-D, C-contiguous memoryview of one-byte items. The new view shares
       base's managed buffer (as ``base[offset:offset+length]`` would) but is
       made without a slice object: PyMemoryView_FromObject on a memoryview
       copies its Py_buffer into a fresh, unshared object, whose bounds we then
       narrow. Flags (contiguity) stay true for a narrower 1-D byte view. */
    static PyObject *fastnat_view_slice(PyObject *base, Py_ssize_t offset, Py_ssize_t length)
    {
        PyObject *result = PyMemoryView_FromObject(base);
        if (result == NULL)
            return NULL;
        Py_buffer *view = PyMemoryView_GET_BUFFER(result);
        view->buf = (char *)view->buf + offset;
        view->len = length;
        view->shape[0] = length;
        return result;
    }
    """
    object fastnat_view_slice(object base, Py_ssize_t offset, Py_ssize_t length)

# --------------------------------------------------------------------- constants

cdef enum:
    HEADER_SIZE = 12
    T_DATA = 0
    T_WINDOW_UPDATE = 1
    T_PING = 2
    T_GO_AWAY = 3
    F_SYN = 0x1
    F_ACK = 0x2
    F_FIN = 0x4
    F_RST = 0x8
    GO_AWAY_PROTOCOL_ERROR = 1

cdef int64_t INITIAL_WINDOW = 256 * 1024
cdef int64_t MAX_U32 = 0xFFFFFFFF
# A reassembly buffer larger than this is not kept for the next frame: typical
# frames (64-256 KiB) reuse one buffer, while a session that once received a
# 16 MiB frame does not hold 16 MiB for the rest of its life.
cdef Py_ssize_t RETAIN_FRAME_BUFFER = 1024 * 1024
# The output buffer starts at this size and, once drained, is replaced by a
# new one of this size if it grew past OUTPUT_SHRINK_ABOVE: bursts do not pin
# memory, steady traffic never reallocates.
cdef Py_ssize_t OUTPUT_INITIAL = 64 * 1024
cdef Py_ssize_t OUTPUT_SHRINK_ABOVE = 4 * 1024 * 1024


cdef inline Py_ssize_t _exports(object bytearray_obj):
    return (<PyByteArrayObject*>bytearray_obj).ob_exports


cdef inline void _write_header(char* p, uint8_t frame_type, unsigned int flags, uint32_t stream_id,
                               uint32_t length) noexcept nogil:
    p[0] = 0
    p[1] = <char>frame_type
    p[2] = <char>((flags >> 8) & 0xFF)
    p[3] = <char>(flags & 0xFF)
    p[4] = <char>((stream_id >> 24) & 0xFF)
    p[5] = <char>((stream_id >> 16) & 0xFF)
    p[6] = <char>((stream_id >> 8) & 0xFF)
    p[7] = <char>(stream_id & 0xFF)
    p[8] = <char>((length >> 24) & 0xFF)
    p[9] = <char>((length >> 16) & 0xFF)
    p[10] = <char>((length >> 8) & 0xFF)
    p[11] = <char>(length & 0xFF)


cdef inline uint32_t _u32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


# ------------------------------------------------------------------------ events

@cython.auto_pickle(False)
cdef class Event:
    """Base class of everything ``Session.receive_data`` returns."""

    _fields = ()

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        for f in self._fields:
            if getattr(self, f) != getattr(other, f):
                return False
        return True

    def __ne__(self, other):
        result = self.__eq__(other)
        if result is NotImplemented:
            return result
        return not result

    __hash__ = None

    def __repr__(self):
        parts = []
        for f in self._fields:
            value = getattr(self, f)
            if f == "data":
                parts.append(f"data=<{len(value)} bytes>")
            else:
                parts.append(f"{f}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


@cython.auto_pickle(False)
cdef class StreamOpened(Event):
    """The peer opened a stream (SYN). Accept it with ``accept_stream`` or refuse it with ``reset_stream``."""
    cdef readonly uint32_t stream_id
    _fields = ("stream_id",)

    def __init__(self, uint32_t stream_id):
        self.stream_id = stream_id


@cython.auto_pickle(False)
cdef class StreamAccepted(Event):
    """The peer accepted a stream this side opened (ACK)."""
    cdef readonly uint32_t stream_id
    _fields = ("stream_id",)

    def __init__(self, uint32_t stream_id):
        self.stream_id = stream_id


# Events hold ints and a memoryview of a byte buffer, which cannot lead back
# to the event: they can never be part of a reference cycle, so they stay out
# of the cyclic garbage collector, which otherwise costs a third of the time
# spent per small frame.
@cython.no_gc
@cython.auto_pickle(False)
cdef class DataReceived(Event):
    """Payload of one Data frame, as a memoryview.

    A frame that lay whole in the chunk given to ``receive_data`` is a slice
    of that chunk (no copy), valid while the chunk is unchanged; a frame split
    across chunks is reassembled in a session buffer, valid until the next
    ``receive_data`` call. Acknowledge ``len(data)`` once consumed.
    """
    cdef readonly uint32_t stream_id
    cdef readonly object data
    _fields = ("stream_id", "data")

    def __init__(self, uint32_t stream_id, data):
        self.stream_id = stream_id
        self.data = data


@cython.auto_pickle(False)
cdef class StreamEnded(Event):
    """The peer half-closed the stream (FIN): it will send no more data."""
    cdef readonly uint32_t stream_id
    _fields = ("stream_id",)

    def __init__(self, uint32_t stream_id):
        self.stream_id = stream_id


@cython.auto_pickle(False)
cdef class StreamReset(Event):
    """The peer reset the stream, or refused a stream this side opened (RST)."""
    cdef readonly uint32_t stream_id
    _fields = ("stream_id",)

    def __init__(self, uint32_t stream_id):
        self.stream_id = stream_id


@cython.auto_pickle(False)
cdef class WindowUpdated(Event):
    """The peer granted ``delta`` more bytes of send window on the stream."""
    cdef readonly uint32_t stream_id
    cdef readonly uint32_t delta
    _fields = ("stream_id", "delta")

    def __init__(self, uint32_t stream_id, uint32_t delta):
        self.stream_id = stream_id
        self.delta = delta


@cython.auto_pickle(False)
cdef class PingReceived(Event):
    """The peer pinged; the engine has already queued the reply."""
    cdef readonly uint32_t opaque
    _fields = ("opaque",)

    def __init__(self, uint32_t opaque):
        self.opaque = opaque


@cython.auto_pickle(False)
cdef class PingAcknowledged(Event):
    """The peer answered a ping this side sent."""
    cdef readonly uint32_t opaque
    _fields = ("opaque",)

    def __init__(self, uint32_t opaque):
        self.opaque = opaque


@cython.auto_pickle(False)
cdef class GoAwayReceived(Event):
    """The peer will accept no new streams. ``code``: 0 normal, 1 protocol error, 2 internal error."""
    cdef readonly uint32_t code
    _fields = ("code",)

    def __init__(self, uint32_t code):
        self.code = code


cdef inline DataReceived _data_event(uint32_t stream_id, object data):
    cdef DataReceived ev = DataReceived.__new__(DataReceived)
    ev.stream_id = stream_id
    ev.data = data
    return ev


# ----------------------------------------------------------------------- streams

@cython.final
@cython.auto_pickle(False)
cdef class _Stream:
    """Bookkeeping of one stream (see ``fastnat._mux_py._Stream``)."""
    cdef uint32_t stream_id
    cdef bint inbound
    cdef bint accepted
    cdef bint local_closed
    cdef bint remote_closed
    cdef int64_t send_window
    cdef int64_t recv_window
    cdef int64_t window
    cdef int64_t unacked
    cdef int64_t credit
    cdef double epoch


cdef _Stream _new_stream(uint32_t stream_id, bint inbound, int64_t window, double epoch):
    cdef _Stream s = _Stream.__new__(_Stream)
    s.stream_id = stream_id
    s.inbound = inbound
    s.accepted = False
    s.local_closed = False
    s.remote_closed = False
    s.send_window = INITIAL_WINDOW
    s.recv_window = INITIAL_WINDOW
    s.window = window
    s.unacked = 0
    s.credit = 0
    s.epoch = epoch
    return s


# ----------------------------------------------------------------------- session

@cython.final
@cython.auto_pickle(False)
cdef class Session:
    """One yamux session, dialling side (``client=True``, odd stream ids) or
    accepting side (even stream ids). See ``fastnat._mux_py.Session``."""

    cdef bint _client
    cdef object _config
    cdef object _clock
    cdef dict _streams
    cdef int64_t _next_id
    cdef Py_ssize_t _pending_accept
    # config, copied to C
    cdef int64_t _initial_window
    cdef int64_t _max_window
    cdef Py_ssize_t _accept_backlog
    cdef Py_ssize_t _max_streams
    cdef Py_ssize_t _max_frame
    cdef Py_ssize_t _max_pings
    # output: bytes [0, _out_len) of the bytearray _out are queued
    cdef object _out
    cdef Py_ssize_t _out_len
    cdef Py_ssize_t _out_cap
    cdef bint _local_go_away
    cdef bint _remote_go_away
    cdef object _error
    cdef dict _pings
    cdef int64_t _next_ping
    cdef object _rtt
    # receive state between calls
    cdef unsigned char _header[HEADER_SIZE]
    cdef Py_ssize_t _header_have
    cdef int64_t _payload_left
    cdef object _payload_buf
    cdef Py_ssize_t _payload_have
    cdef Py_ssize_t _payload_size
    cdef _Stream _payload_stream
    cdef bint _payload_fin
    cdef object _frame_buf

    def __init__(self, client, config=None, *, clock=None):
        if config is None:
            config = MuxConfig()
        elif not isinstance(config, MuxConfig):
            raise TypeError(f"config must be a MuxConfig, not {type(config).__name__}")
        self._client = bool(client)
        self._config = config
        self._clock = clock
        self._streams = {}
        self._next_id = 1 if self._client else 2
        self._pending_accept = 0
        self._initial_window = config.initial_stream_window
        self._max_window = config.max_stream_window
        self._accept_backlog = config.accept_backlog
        self._max_streams = config.max_streams
        self._max_frame = config.max_frame_size
        self._max_pings = config.max_outstanding_pings
        self._out = PyByteArray_FromStringAndSize(NULL, OUTPUT_INITIAL)
        self._out_len = 0
        self._out_cap = OUTPUT_INITIAL
        self._local_go_away = False
        self._remote_go_away = False
        self._error = None
        self._pings = {}
        self._next_ping = 0
        self._rtt = None
        self._header_have = 0
        self._payload_left = 0
        self._payload_buf = None
        self._payload_have = 0
        self._payload_size = 0
        self._payload_stream = None
        self._payload_fin = False
        self._frame_buf = None

    # ---------------------------------------------------------------- queries

    @property
    def client(self):
        """True on the dialling side."""
        return self._client

    @property
    def config(self):
        return self._config

    @property
    def stream_count(self):
        """Streams this session tracks (open in at least one direction)."""
        return len(self._streams)

    @property
    def pending_accept_count(self):
        """Streams the peer opened that are neither accepted nor refused yet."""
        return self._pending_accept

    @property
    def rtt(self):
        """The round-trip time of the last answered ping, if a clock was given."""
        return self._rtt

    @property
    def bytes_to_send(self):
        """How many bytes are queued for the peer."""
        return self._out_len

    @property
    def go_away_sent(self):
        """True once this side queued a Go Away (itself or after a protocol error)."""
        return self._local_go_away

    @property
    def go_away_received(self):
        """True once the peer sent a Go Away."""
        return self._remote_go_away

    @property
    def error(self):
        """Why the session failed, if the peer broke the protocol."""
        return self._error

    def send_window(self, stream_id):
        """Bytes ``send_data`` may send on the stream now."""
        return self._get(stream_id).send_window

    def receive_window(self, stream_id):
        """Bytes the peer may send on the stream now (the credit it holds)."""
        return self._get(stream_id).recv_window

    # ----------------------------------------------------------------- output

    cdef char* _reserve(self, Py_ssize_t n) except NULL:
        """Room for n more queued bytes; returns where to write them."""
        cdef Py_ssize_t need = self._out_len + n
        cdef Py_ssize_t size = self._out_cap
        if need > size:
            size = size * 2
            if size < need:
                size = need
            PyByteArray_Resize(self._out, size)
            self._out_cap = size
        return PyByteArray_AS_STRING(self._out) + self._out_len

    cdef int _queue(self, uint8_t frame_type, unsigned int flags, uint32_t stream_id,
                    uint32_t length) except -1:
        cdef char* p = self._reserve(HEADER_SIZE)
        _write_header(p, frame_type, flags, stream_id, length)
        self._out_len += HEADER_SIZE
        return 0

    cdef int _drained(self) except -1:
        """Forget the queued bytes; keep the buffer unless someone holds a view of it."""
        self._out_len = 0
        if _exports(self._out) > 0 or self._out_cap > OUTPUT_SHRINK_ABOVE:
            self._out = PyByteArray_FromStringAndSize(NULL, OUTPUT_INITIAL)
            self._out_cap = OUTPUT_INITIAL
        return 0

    def data_to_send(self):
        """Take every queued frame, as one bytes object for one write."""
        if self._out_len == 0:
            return b""
        data = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(self._out), self._out_len)
        self._drained()
        return data

    def flush(self, write):
        """Hand every queued frame to ``write`` as one memoryview, without a copy.

        ``write`` must have finished with the view when it returns. If it
        raises, the frames stay queued. Returns the number of bytes.
        """
        cdef Py_ssize_t n = self._out_len
        if n == 0:
            return 0
        view = fastnat_view_slice(PyMemoryView_FromObject(self._out), 0, n)
        try:
            write(view)
        except BaseException:
            # The frames stay queued. If the writer kept a slice of the view,
            # the buffer cannot grow any more: queue into a copy instead.
            try:
                view.release()
            except BufferError:
                pass
            if _exports(self._out) > 0:
                self._out = PyByteArray_FromStringAndSize(PyByteArray_AS_STRING(self._out), self._out_cap)
            raise
        finally:
            try:
                view.release()
            except BufferError:
                pass  # the writer holds an export of the view; _drained sees it
        self._drained()
        return n

    # --------------------------------------------------------------- commands

    def open_stream(self):
        """Open a stream and queue its SYN; returns the new stream id."""
        self._check_alive()
        if self._local_go_away or self._remote_go_away:
            side = "this side" if self._local_go_away else "the peer"
            raise SessionClosedError(f"cannot open a stream: {side} sent Go Away")
        if len(self._streams) >= self._max_streams:
            raise StreamLimitError(f"cannot open a stream: {self._max_streams} streams are open (max_streams)")
        cdef int64_t stream_id = self._next_id
        if stream_id > MAX_U32:
            raise StreamLimitError("cannot open a stream: stream ids are exhausted")
        self._next_id = stream_id + 2
        cdef _Stream stream = _new_stream(<uint32_t>stream_id, False, self._initial_window, self._now())
        stream.recv_window = self._initial_window
        self._streams[stream_id] = stream
        self._queue(T_WINDOW_UPDATE, F_SYN, <uint32_t>stream_id, <uint32_t>(self._initial_window - INITIAL_WINDOW))
        return stream_id

    def accept_stream(self, stream_id):
        """Accept a stream the peer opened: queue its ACK (and a larger window)."""
        self._check_alive()
        cdef _Stream stream = self._get(stream_id)
        if not stream.inbound:
            raise ValueError(f"stream {stream_id} was opened by this side; only the peer's streams are accepted")
        if not stream.accepted:
            self._accept(stream)

    cdef int _accept(self, _Stream stream) except -1:
        stream.accepted = True
        self._pending_accept -= 1
        cdef int64_t delta = stream.window - INITIAL_WINDOW
        stream.recv_window += delta
        stream.epoch = self._now()
        self._queue(T_WINDOW_UPDATE, F_ACK, stream.stream_id, <uint32_t>delta)
        return 0

    def send_data(self, stream_id, data):
        """Queue as much of ``data`` as the stream's send window allows; returns how many bytes it took."""
        self._check_alive()
        cdef _Stream stream = self._get(stream_id)
        if stream.local_closed:
            raise StreamClosedError(f"stream {stream_id}: this side has already ended it")
        if stream.inbound and not stream.accepted:
            self._accept(stream)
        cdef Py_buffer buf
        if PyBytes_CheckExact(data):
            # The common case, without the buffer protocol's bookkeeping.
            return self._queue_data(stream, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        try:
            PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        except BufferError:
            raise TypeError("send_data needs a C-contiguous bytes-like object") from None
        except TypeError:
            raise TypeError(f"send_data needs a bytes-like object, not {type(data).__name__}") from None
        try:
            return self._queue_data(stream, <const char*>buf.buf, buf.len)
        finally:
            PyBuffer_Release(&buf)

    cdef Py_ssize_t _queue_data(self, _Stream stream, const char* data, Py_ssize_t n) except -1:
        """Queue Data frames for up to n bytes, within the send window; returns how many."""
        cdef Py_ssize_t pos, size
        cdef Py_ssize_t frame = self._max_frame
        cdef char* p
        if n > stream.send_window:
            n = <Py_ssize_t>stream.send_window
        if n <= 0:
            return 0
        # One reservation for every frame's header and payload.
        p = self._reserve(n + HEADER_SIZE * ((n + frame - 1) // frame))
        stream.send_window -= n
        pos = 0
        while pos < n:
            size = n - pos
            if size > frame:
                size = frame
            _write_header(p, T_DATA, 0, stream.stream_id, <uint32_t>size)
            memcpy(p + HEADER_SIZE, data + pos, size)
            p += HEADER_SIZE + size
            pos += size
        self._out_len += n + HEADER_SIZE * ((n + frame - 1) // frame)
        return n

    def acknowledge_received_data(self, stream_id, n):
        """Tell the engine the application consumed ``n`` bytes of the stream."""
        self._check_alive()
        n = _index(n)
        if n < 0:
            raise ValueError(f"cannot acknowledge a negative amount ({n})")
        cdef _Stream stream = self._find(stream_id)
        if stream is None:
            return
        if n > stream.unacked:
            raise ValueError(
                f"stream {stream_id}: acknowledging {n} bytes but only {stream.unacked} were received and not acknowledged"
            )
        cdef int64_t count = n
        stream.unacked -= count
        if stream.remote_closed:
            return
        stream.credit += count
        if stream.credit >= stream.window // 2:
            self._send_window_update(stream)

    cdef int _send_window_update(self, _Stream stream) except -1:
        cdef int64_t delta = stream.credit
        cdef int64_t grown
        cdef double now
        stream.credit = 0
        if self._clock is not None:
            now = self._clock()
            # Auto-tuning: half a window was used up in less than two round
            # trips, so the window, not the consumer, limits this stream.
            if (self._rtt is not None and stream.window < self._max_window
                    and now - stream.epoch < 2.0 * <double>self._rtt):
                grown = stream.window * 2
                if grown > self._max_window:
                    grown = self._max_window
                delta += grown - stream.window
                stream.window = grown
            stream.epoch = now
        stream.recv_window += delta
        self._queue(T_WINDOW_UPDATE, 0, stream.stream_id, <uint32_t>delta)
        return 0

    def end_stream(self, stream_id):
        """Half-close the stream (FIN): this side sends no more data on it."""
        self._check_alive()
        cdef _Stream stream = self._get(stream_id)
        if stream.local_closed:
            raise StreamClosedError(f"stream {stream_id}: this side has already ended it")
        if stream.inbound and not stream.accepted:
            self._accept(stream)
        stream.local_closed = True
        self._queue(T_WINDOW_UPDATE, F_FIN, stream.stream_id, 0)
        if stream.remote_closed:
            self._forget(stream)

    def reset_stream(self, stream_id):
        """Reset the stream (RST), or refuse a stream the peer opened; a stream already gone is left alone."""
        self._check_alive()
        cdef _Stream stream = self._find(stream_id)
        if stream is None:
            return
        self._forget(stream)
        self._queue(T_WINDOW_UPDATE, F_RST, stream.stream_id, 0)

    def ping(self, opaque=None):
        """Queue a ping; returns its opaque value, echoed in ``PingAcknowledged``."""
        self._check_alive()
        pings = self._pings
        if len(pings) >= self._max_pings:
            raise StreamLimitError(f"{len(pings)} pings are awaiting an answer (max_outstanding_pings)")
        if opaque is None:
            opaque = self._next_ping
            while opaque in pings:
                opaque = (opaque + 1) & MAX_U32
            self._next_ping = (opaque + 1) & MAX_U32
        elif not 0 <= _index(opaque) <= MAX_U32:
            raise ValueError(f"ping opaque value must fit in 32 bits, got {opaque}")
        elif opaque in pings:
            raise ValueError(f"a ping with opaque value {opaque} is already awaiting an answer")
        pings[opaque] = self._now() if self._clock is not None else None
        self._queue(T_PING, F_SYN, 0, <uint32_t>opaque)
        return opaque

    def go_away(self, code=0):
        """Queue a Go Away: the peer may open no more streams, nor may this side. A second call does nothing."""
        self._check_alive()
        code = _index(code)
        if not 0 <= code <= MAX_U32:
            raise ValueError(f"go away code must fit in 32 bits, got {code}")
        if self._local_go_away:
            return
        self._local_go_away = True
        self._queue(T_GO_AWAY, 0, 0, <uint32_t>code)

    # ---------------------------------------------------------------- helpers

    cdef double _now(self) except? -1.0:
        if self._clock is None:
            return 0.0
        return self._clock()

    cdef int _check_alive(self) except -1:
        if self._error is not None:
            raise ProtocolError(f"the session failed earlier: {self._error}")
        return 0

    cdef _Stream _find(self, stream_id):
        """The stream with this id, or None; a non-integer id is a TypeError."""
        key = stream_id
        if not PyLong_CheckExact(key):
            try:
                key = _index(stream_id)
            except TypeError:
                raise TypeError(f"stream ids are ints, not {type(stream_id).__name__}") from None
        cdef PyObject* found = PyDict_GetItem(self._streams, key)
        if found == NULL:
            return None
        return <_Stream>found

    cdef _Stream _get(self, stream_id):
        cdef _Stream stream = self._find(stream_id)
        if stream is None:
            raise StreamClosedError(self._why_missing(_index(stream_id)))
        return stream

    def _why_missing(self, stream_id):
        ours = (stream_id & 1) == (1 if self._client else 0)
        if stream_id <= 0 or stream_id > MAX_U32:
            return f"no stream {stream_id}: stream ids are between 1 and {MAX_U32}"
        if ours and stream_id >= self._next_id:
            return f"no stream {stream_id}: this side never opened it"
        return f"stream {stream_id} is closed (ended both ways, reset or refused) or was never opened"

    cdef int _forget(self, _Stream stream) except -1:
        del self._streams[stream.stream_id]
        if stream.inbound and not stream.accepted:
            self._pending_accept -= 1
        return 0

    cdef object _fail(self, str message, list events):
        """Record a protocol error, queue Go Away, return the exception to raise."""
        self._error = message
        self._queue(T_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR)
        self._local_go_away = True
        self._header_have = 0
        self._payload_left = 0
        self._payload_buf = None
        self._payload_stream = None
        return ProtocolError(message, events)

    # ------------------------------------------------------------------ input

    def receive_data(self, data):
        """Feed bytes read from the connection; returns the events they complete.

        Any chunking of the same byte stream yields the same events. On a
        protocol violation a Go Away is queued and ProtocolError is raised,
        carrying the events decoded before the bad frame.
        """
        self._check_alive()
        cdef list events = []
        cdef object view
        try:
            view = PyMemoryView_FromObject(data)
        except TypeError:
            raise TypeError(f"receive_data needs a bytes-like object, not {type(data).__name__}") from None
        cdef Py_buffer* pb = PyMemoryView_GET_BUFFER(view)
        if not PyBuffer_IsContiguous(pb, b'C'):
            raise TypeError("receive_data needs a C-contiguous bytes-like object")
        if pb.ndim != 1 or pb.itemsize != 1 or pb.format == NULL or pb.format[0] != b'B' or pb.format[1] != 0:
            view = view.cast("B")
            pb = PyMemoryView_GET_BUFFER(view)
        cdef const unsigned char* p = <const unsigned char*>pb.buf
        cdef Py_ssize_t n = pb.len
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t take
        cdef const unsigned char* h
        cdef uint8_t frame_type
        cdef unsigned int flags
        cdef uint32_t stream_id, length
        cdef _Stream stream
        cdef PyObject* found
        while pos < n:
            if self._payload_left:
                pos = self._continue_payload(p, pos, n, events)
                continue
            if self._header_have or n - pos < HEADER_SIZE:
                take = HEADER_SIZE - self._header_have
                if take > n - pos:
                    take = n - pos
                memcpy(self._header + self._header_have, p + pos, take)
                self._header_have += take
                pos += take
                if self._header_have < HEADER_SIZE:
                    break
                self._header_have = 0
                h = self._header
            else:
                h = p + pos
                pos += HEADER_SIZE
            if h[0] != 0:
                raise self._fail(f"frame with version {h[0]}; yamux version 0 is the only one", events)
            frame_type = h[1]
            flags = (<unsigned int>h[2] << 8) | h[3]
            stream_id = _u32(h + 4)
            length = _u32(h + 8)
            if frame_type == T_DATA and flags == 0 and stream_id != 0:
                # Hot path: plain Data on an open stream.
                found = PyDict_GetItem(self._streams, stream_id)
                if found != NULL:
                    stream = <_Stream>found
                    if not stream.remote_closed and length <= stream.recv_window:
                        stream.recv_window -= length
                        if length and n - pos >= length:
                            stream.unacked += length
                            events.append(_data_event(stream_id, fastnat_view_slice(view, pos, length)))
                            pos += length
                        elif length:
                            pos = self._begin_payload(stream, False, length, p, pos, n, events)
                        continue
            if frame_type == T_DATA or frame_type == T_WINDOW_UPDATE:
                stream = self._stream_frame(frame_type, flags, stream_id, length, events)
                if frame_type == T_DATA and length:
                    if stream is not None and n - pos >= length:
                        stream.unacked += length
                        events.append(_data_event(stream_id, fastnat_view_slice(view, pos, length)))
                        pos += length
                        if flags & F_FIN:
                            self._remote_end(stream, events)
                    else:
                        pos = self._begin_payload(stream, flags & F_FIN, length, p, pos, n, events)
                elif stream is not None and flags & F_FIN:
                    self._remote_end(stream, events)
            elif frame_type == T_PING:
                self._ping_frame(flags, stream_id, length, events)
            elif frame_type == T_GO_AWAY:
                if stream_id != 0:
                    raise self._fail(f"Go Away on stream {stream_id}; it belongs on stream 0", events)
                self._remote_go_away = True
                events.append(GoAwayReceived(length))
            else:
                raise self._fail(f"frame of unknown type {frame_type}", events)
        return events

    cdef _Stream _stream_frame(self, uint8_t frame_type, unsigned int flags, uint32_t stream_id,
                               uint32_t length, list events):
        """Handle a Data or Window Update header up to its payload. Returns the
        stream, or None when the frame is for a stream that is gone."""
        kind = "Data" if frame_type == T_DATA else "Window Update"
        cdef _Stream stream
        cdef PyObject* found
        if stream_id == 0:
            raise self._fail(f"{kind} frame on stream 0, which belongs to the session", events)
        if flags & F_SYN:
            # A new stream starts with the spec's window both ways: check the
            # frame against it before the stream exists, so that a bad frame
            # does not report StreamOpened.
            if frame_type == T_DATA and length > INITIAL_WINDOW:
                raise self._fail(
                    f"stream {stream_id}: Data frame of {length} bytes exceeds the receive window of {INITIAL_WINDOW}",
                    events,
                )
            if frame_type == T_WINDOW_UPDATE and INITIAL_WINDOW + length > MAX_U32:
                raise self._fail(
                    f"stream {stream_id}: window update of {length} would take the send window past 2^32-1",
                    events,
                )
            stream = self._peer_opened(stream_id, events)
            if stream is None:
                return None
        else:
            found = PyDict_GetItem(self._streams, stream_id)
            if found == NULL:
                return None
            stream = <_Stream>found
        if flags & F_ACK and not stream.inbound and not stream.accepted:
            stream.accepted = True
            events.append(StreamAccepted(stream_id))
        if flags & F_RST:
            self._forget(stream)
            events.append(StreamReset(stream_id))
            return None
        if frame_type == T_DATA:
            if stream.remote_closed and (length or flags & F_FIN):
                raise self._fail(f"stream {stream_id}: data after the peer's FIN", events)
            if length > stream.recv_window:
                raise self._fail(
                    f"stream {stream_id}: Data frame of {length} bytes exceeds the receive window of {stream.recv_window}",
                    events,
                )
            stream.recv_window -= length
        else:
            if flags & F_FIN and stream.remote_closed:
                raise self._fail(f"stream {stream_id}: second FIN from the peer", events)
            if length:
                if stream.send_window + length > MAX_U32:
                    raise self._fail(
                        f"stream {stream_id}: window update of {length} would take the send window past 2^32-1",
                        events,
                    )
                stream.send_window += length
                events.append(WindowUpdated(stream_id, length))
        return stream

    cdef _Stream _peer_opened(self, uint32_t stream_id, list events):
        """A SYN arrived: create the stream, or refuse it with RST."""
        if (stream_id & 1) == (1 if self._client else 0):
            side = "odd" if self._client else "even"
            raise self._fail(f"SYN on stream {stream_id}: {side} ids are this side's to open", events)
        if stream_id in self._streams:
            raise self._fail(f"SYN on stream {stream_id}, which is already open", events)
        if (self._local_go_away or self._pending_accept >= self._accept_backlog
                or len(self._streams) >= self._max_streams):
            self._queue(T_WINDOW_UPDATE, F_RST, stream_id, 0)
            return None
        cdef _Stream stream = _new_stream(stream_id, True, self._initial_window, 0.0)
        self._streams[stream_id] = stream
        self._pending_accept += 1
        events.append(StreamOpened(stream_id))
        return stream

    cdef int _remote_end(self, _Stream stream, list events) except -1:
        stream.remote_closed = True
        events.append(StreamEnded(stream.stream_id))
        if stream.local_closed:
            self._forget(stream)
        return 0

    cdef Py_ssize_t _begin_payload(self, _Stream stream, bint fin, Py_ssize_t length,
                                   const unsigned char* p, Py_ssize_t pos, Py_ssize_t n,
                                   list events) except -1:
        """Start reassembling (or discarding) a Data payload that continues in later chunks."""
        self._payload_left = length
        self._payload_stream = stream
        self._payload_fin = fin
        self._payload_have = 0
        self._payload_size = length
        if stream is None:
            self._payload_buf = None
        else:
            # Reuse the last frame's buffer unless a view of it is still
            # alive. A new one starts at what this chunk holds and grows as
            # the payload arrives: a 12-byte header must not make the engine
            # allocate a whole window's worth up front.
            buf = self._frame_buf
            if buf is None or _exports(buf) > 0:
                buf = PyByteArray_FromStringAndSize(NULL, min(length, n - pos))
            self._payload_buf = buf
        return self._continue_payload(p, pos, n, events)

    cdef Py_ssize_t _continue_payload(self, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n,
                                      list events) except -1:
        cdef Py_ssize_t take = n - pos
        if take > self._payload_left:
            take = <Py_ssize_t>self._payload_left
        buf = self._payload_buf
        cdef Py_ssize_t need, grow
        if buf is not None:
            need = self._payload_have + take
            if len(buf) < need:
                grow = 2 * len(buf)
                if grow < need:
                    grow = need
                if grow > self._payload_size:
                    grow = self._payload_size
                PyByteArray_Resize(buf, grow)
            memcpy(PyByteArray_AS_STRING(buf) + self._payload_have, p + pos, take)
            self._payload_have += take
        self._payload_left -= take
        cdef _Stream stream
        cdef Py_ssize_t size
        if self._payload_left == 0:
            stream = self._payload_stream
            size = self._payload_size
            self._payload_buf = None
            self._payload_stream = None
            if stream is not None and buf is not None:
                self._frame_buf = buf if size <= RETAIN_FRAME_BUFFER else None
                # The stream may have been reset locally while its frame arrived.
                if <PyObject*>stream == PyDict_GetItem(self._streams, stream.stream_id):
                    stream.unacked += size
                    events.append(_data_event(stream.stream_id, fastnat_view_slice(PyMemoryView_FromObject(buf), 0, size)))
                    if self._payload_fin:
                        self._remote_end(stream, events)
        return pos + take

    cdef int _ping_frame(self, unsigned int flags, uint32_t stream_id, uint32_t opaque, list events) except -1:
        if stream_id != 0:
            raise self._fail(f"Ping on stream {stream_id}; it belongs on stream 0", events)
        if flags & F_SYN:
            self._queue(T_PING, F_ACK, 0, opaque)
            events.append(PingReceived(opaque))
        elif flags & F_ACK:
            if opaque in self._pings:
                sent = self._pings.pop(opaque)
                if sent is not None and self._clock is not None:
                    self._rtt = self._clock() - sent
                events.append(PingAcknowledged(opaque))
        else:
            raise self._fail("Ping with neither SYN nor ACK", events)
        return 0

"""Receive buffers for ``asyncio.BufferedProtocol``: one allocation, reused.

Reading into a preallocated buffer (``recv_into``) avoids what a fresh bytes
object per read costs: on glibc, a 128 KiB or larger allocation is served by
mmap, and every read then faults in fresh pages. The catch is that a view of
the buffer handed on (to a protocol, or to a transport's write, which under
uvloop keeps a view of what it has not sent yet) must not see its bytes
overwritten. :class:`ReadBuffer` therefore reuses the buffer only while no
view of it is alive, and otherwise starts a new one.
"""

from __future__ import annotations

import asyncio
import weakref

__all__ = ["ReadBuffer", "loop_read_buffer"]


class ReadBuffer:
    """A receive buffer of ``size`` bytes for ``get_buffer``/``buffer_updated``."""

    __slots__ = ("_size", "_buffer", "_view", "replaced")

    def __init__(self, size: int) -> None:
        self._size = size
        self._buffer = bytearray(size)
        self._view: memoryview | None = None
        self.replaced = 0  # how often a live view forced a new buffer

    def get(self) -> memoryview:
        """The buffer to read into: the same one unless a view of it is still alive."""
        self._view = None  # drop our own view of the last read first
        buffer = self._buffer
        try:
            buffer.append(0)  # resizing fails while any view of the buffer is alive
        except BufferError:
            buffer = self._buffer = bytearray(self._size)
            self.replaced += 1
        else:
            del buffer[-1]
        view = self._view = memoryview(buffer)
        return view

    def filled(self, nbytes: int) -> memoryview:
        """The first ``nbytes`` of the buffer last returned by :meth:`get`."""
        view = self._view
        assert view is not None, "filled() before get()"
        return view[:nbytes]


# One receive buffer per event loop and size serves every connection of the
# loop that reads through it (sessions, splice ends): a read is consumed
# before the loop runs anything else, so no two connections need it at the
# same time, and ReadBuffer replaces it if a view outlives the read. A buffer
# per connection would cost 256 KiB of memory per idle connection (a
# forwarder holding 1,000 servers: 256 MB), and glibc keeps such memory once
# it was touched, even after the connection is gone.
_loop_buffers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, ReadBuffer]] = (
    weakref.WeakKeyDictionary()
)


def loop_read_buffer(size: int, loop: asyncio.AbstractEventLoop | None = None) -> ReadBuffer:
    """The shared receive buffer of ``size`` bytes of ``loop`` (default: the running one)."""
    loop = loop or asyncio.get_running_loop()
    buffers = _loop_buffers.get(loop)
    if buffers is None:
        buffers = _loop_buffers[loop] = {}
    buffer = buffers.get(size)
    if buffer is None:
        buffer = buffers[size] = ReadBuffer(size)
    return buffer

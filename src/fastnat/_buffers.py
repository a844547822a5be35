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

__all__ = ["ReadBuffer"]


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

"""Deterministic test data, cheap to make in any amount, shared by the tests
and ``peer_proc.py``.

``DataSource(seed).chunks(n)`` yields ``n`` bytes in chunks of up to 1 MiB:
one random 1 MiB block (from ``random.Random(seed)``) whose first 8 bytes are
replaced by the chunk's index, so chunks differ and a lost, repeated or
reordered chunk changes the SHA-256.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

CHUNK = 1 << 20


class DataSource:
    def __init__(self, seed: int, chunk: int = CHUNK) -> None:
        self.seed = seed
        self.chunk = chunk
        self._block = random.Random(seed).randbytes(chunk)

    def chunks(self, n: int) -> Iterator[bytes]:
        block = self._block
        index = 0
        while n > 0:
            size = min(n, self.chunk)
            head = index.to_bytes(8, "big")
            data = (head + block[8:size]) if size >= 8 else head[:size]
            yield data
            n -= size
            index += 1

    def data(self, n: int) -> bytes:
        return b"".join(self.chunks(n))

    def sha256(self, n: int) -> str:
        h = hashlib.sha256()
        for c in self.chunks(n):
            h.update(c)
        return h.hexdigest()


def sha256(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()

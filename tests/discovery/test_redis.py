"""The Redis backend, looked at from inside Redis: the layout (a sorted set
per key scored by expiry in Redis's milliseconds, an index of keys), exact
per-value expiry without relying on trimming, keys that Redis drops by
itself, one round trip per operation, namespaces, URL options.

The contract itself (over every backend) is in ``test_contract.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from fastnat.discovery import open_registry
from fastnat.errors import RegistryUnavailableError

from .support import LOOPBACK, RedisServer, closed_port, in_ci, run_async

try:
    import redis
except ImportError:  # pragma: no cover - depends on the install
    if in_ci():
        raise  # CI installs the test extra: a missing package is an error there
    pytest.skip("the Redis tests need the redis package (pip install 'fastnat[test]')", allow_module_level=True)

from fastnat.discovery.redis import INDEX_SUFFIX, RedisRegistry


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain redis-py client, to look inside."""
    client = redis.Redis(host=LOOPBACK, port=redis_server.port, decode_responses=True, socket_timeout=5)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex}:"


def with_registry(url: str, body: Callable[[RedisRegistry], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        reg = open_registry(url)
        assert isinstance(reg, RedisRegistry)
        try:
            return await body(reg)
        finally:
            await reg.close()

    return run_async(main())


def redis_ms(raw: redis.Redis) -> int:
    seconds, micros = raw.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_layout(redis_server: RedisServer, raw: redis.Redis, prefix: str) -> None:
    async def body(reg: RedisRegistry) -> None:
        before = redis_ms(raw)
        await reg.announce("k", "v", 10)
        await reg.announce("k", "w", 20)
        after = redis_ms(raw)
        scores = dict(raw.zrange(prefix + "k", 0, -1, withscores=True))
        assert set(scores) == {"v", "w"}
        assert before + 10_000 <= scores["v"] <= after + 10_000
        assert before + 20_000 <= scores["w"] <= after + 20_000
        # the key lives as long as its longest-lived value, the index knows it
        assert 19_000 < raw.pttl(prefix + "k") <= 20_000
        assert raw.zscore(prefix + INDEX_SUFFIX, prefix + "k") == scores["w"]
        assert set(raw.keys(prefix + "*")) == {prefix + "k", prefix + INDEX_SUFFIX}

    with_registry(f"{redis_server.url}?prefix={prefix}", body)


def test_expiry_does_not_wait_for_trimming(redis_server: RedisServer, raw: redis.Redis, prefix: str) -> None:
    """An expired value is invisible at once, although still stored until a
    script trims it."""

    async def body(reg: RedisRegistry) -> None:
        await reg.announce("k", "short", 0.2)
        await reg.announce("k", "long", 30)
        await asyncio.sleep(0.3)
        assert "short" in raw.zrange(prefix + "k", 0, -1), "nothing has trimmed it yet"
        assert await reg.lookup("k") == ["long"]
        assert raw.zrange(prefix + "k", 0, -1) == ["long"], "the lookup trimmed it"

    with_registry(f"{redis_server.url}?prefix={prefix}", body)


def test_redis_drops_expired_keys_by_itself(redis_server: RedisServer, raw: redis.Redis, prefix: str) -> None:
    async def body(reg: RedisRegistry) -> None:
        await reg.announce("a", "v", 0.2)
        await reg.announce("b", "v", 0.3)
        assert raw.exists(prefix + "a", prefix + "b", prefix + INDEX_SUFFIX) == 3
        await asyncio.sleep(0.45)
        # no lookup, no announce: Redis expired the keys and the index itself
        assert raw.keys(prefix + "*") == []

    with_registry(f"{redis_server.url}?prefix={prefix}", body)


def test_withdraw_keeps_the_key_expiry_and_index_in_step(
    redis_server: RedisServer, raw: redis.Redis, prefix: str
) -> None:
    async def body(reg: RedisRegistry) -> None:
        await reg.announce("k", "long", 30)
        await reg.announce("k", "short", 5)
        await reg.withdraw("k", "long")
        assert 4_000 < raw.pttl(prefix + "k") <= 5_000
        assert raw.zscore(prefix + INDEX_SUFFIX, prefix + "k") == raw.zscore(prefix + "k", "short")
        await reg.withdraw("k", "short")
        assert raw.exists(prefix + "k") == 0
        assert raw.zscore(prefix + INDEX_SUFFIX, prefix + "k") is None
        await reg.withdraw("k", "short")  # nothing there: fine

    with_registry(f"{redis_server.url}?prefix={prefix}", body)


def test_namespaces_are_separate(redis_server: RedisServer, prefix: str) -> None:
    async def main() -> None:
        one = open_registry(f"{redis_server.url}?prefix={prefix}one:&max_keys=1")
        two = open_registry(f"{redis_server.url}?prefix={prefix}two:&max_keys=1")
        try:
            await one.announce("k", "from-one", 30)
            await two.announce("k", "from-two", 30)  # its own key cap
            assert await one.lookup("k") == ["from-one"]
            assert await two.lookup("k") == ["from-two"]
            with pytest.raises(ValueError, match="maximum of 1 keys"):
                await one.announce("other", "v", 30)
        finally:
            await one.close()
            await two.close()

    run_async(main())


class CommandCounter:
    """A TCP relay in front of Redis that counts the commands clients send."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.commands: list[str] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, LOOPBACK, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            buffer = b""
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    if count:
                        buffer = self._count(buffer + data)
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    def _count(self, buffer: bytes) -> bytes:
        """Parse whole RESP commands (arrays of bulk strings) off ``buffer``."""
        while buffer.startswith(b"*"):
            end = buffer.find(b"\r\n")
            if end < 0:
                return buffer
            n, pos, args = int(buffer[1:end]), end + 2, []
            for _ in range(n):
                end = buffer.find(b"\r\n", pos)
                if end < 0:
                    return buffer
                length = int(buffer[pos + 1 : end])
                if len(buffer) < end + 2 + length + 2:
                    return buffer
                args.append(buffer[end + 2 : end + 2 + length])
                pos = end + 2 + length + 2
            self.commands.append(args[0].decode().upper())
            buffer = buffer[pos:]
        return buffer

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


def test_one_round_trip_per_operation(redis_server: RedisServer, prefix: str) -> None:
    async def main() -> None:
        counter = CommandCounter(redis_server.port)
        port = await counter.start()
        reg = open_registry(f"redis://{LOOPBACK}:{port}/0?prefix={prefix}")
        try:
            # the first calls connect and load the scripts
            await reg.announce("k", "v", 30)
            await reg.lookup("k")
            await reg.withdraw("k", "v")
            calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("announce", lambda: reg.announce("k", "v", 30)),
                ("lookup", lambda: reg.lookup("k")),
                ("withdraw", lambda: reg.withdraw("k", "v")),
            ]
            for name, call in calls:
                counter.commands.clear()
                await call()
                await asyncio.sleep(0.01)
                assert counter.commands == ["EVALSHA"], f"{name} sent {counter.commands}"
        finally:
            await reg.close()
            await counter.close()

    run_async(main())


# ------------------------------------------------------------ URLs


@pytest.mark.parametrize(
    "query",
    ["max_keys=0", "max_keys=many", "max_values_per_key=-3", "timeout=-1", "timeout=soon", "prefix=a%0Ab"],
)
def test_bad_url_options(query: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        open_registry(f"redis://{LOOPBACK}:6379/0?{query}")


def test_password_is_not_shown() -> None:
    port = closed_port()

    async def main() -> None:
        reg = open_registry(f"redis://user:hunter2@{LOOPBACK}:{port}/0?timeout=1")
        try:
            assert "hunter2" not in repr(reg) and "hunter2" not in reg.url
            with pytest.raises(RegistryUnavailableError) as info:
                await reg.lookup("k")
            assert "hunter2" not in str(info.value)
            assert f"{LOOPBACK}:{port}" in str(info.value)
        finally:
            await reg.close()

    run_async(main())


def test_other_options_go_to_redis(redis_server: RedisServer, prefix: str) -> None:
    async def body(reg: RedisRegistry) -> None:
        assert reg._client.connection_pool.max_connections == 3
        await asyncio.gather(*(reg.announce(f"k{i % 5}", f"v{i}", 30) for i in range(60)))
        assert len(await reg.lookup("k0")) == 12

    with_registry(f"{redis_server.url}?prefix={prefix}&max_connections=3", body)


def test_many_tasks_share_a_few_connections(redis_server: RedisServer, raw: redis.Redis, prefix: str) -> None:
    async def body(reg: RedisRegistry) -> None:
        start = time.monotonic()
        results = await asyncio.gather(*(reg.lookup("nothing") for _ in range(500)))
        assert results == [[]] * 500
        assert time.monotonic() - start < 5
        clients = [c for c in raw.client_list() if c.get("cmd") == "evalsha"]
        assert 1 <= len(clients) <= 16, clients

    with_registry(f"{redis_server.url}?prefix={prefix}", body)


def test_a_redis_password_guards_the_registry(start_redis: Callable[..., RedisServer]) -> None:
    """Redis's own access control protects a Redis registry: without the
    password in the URL nothing can be read or written; with it, everything."""
    server = start_redis()
    assert server.command("CONFIG", "SET", "requirepass", "redis-s3cret").startswith(b"+OK")
    guarded = f"redis://:redis-s3cret@{LOOPBACK}:{server.port}/0"
    open_url = f"redis://{LOOPBACK}:{server.port}/0"

    async def main() -> None:
        owner, stranger = open_registry(guarded), open_registry(open_url)
        try:
            await owner.announce("k", "v", 30)
            for attempt in (stranger.announce("k", "forged", 30), stranger.withdraw("k", "v"), stranger.lookup("k")):
                with pytest.raises(RegistryUnavailableError, match="(?i)auth") as info:
                    await attempt
                assert "redis-s3cret" not in str(info.value)
            assert await owner.lookup("k") == ["v"]
        finally:
            await owner.close()
            await stranger.close()

    run_async(main())

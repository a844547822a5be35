"""The registry contract, over every backend (``memory``, ``service``,
``service-process``, ``redis``; see ``conftest.py``).

A value expires ``ttl`` seconds after its last announce; lookup returns live
values only; withdraw removes one at once; caps (keys, values per key, sizes)
and bad input raise ``ValueError`` with a message; many tasks may use
registries at once. The network backends also fail fast, with an error that
names the registry, when it cannot be reached.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from typing import Any

import pytest

from fastnat.discovery import open_registry
from fastnat.discovery.base import MAX_KEY_LENGTH, MAX_LOOKUP, MAX_TTL, MAX_VALUE_LENGTH, Registry
from fastnat.discovery.memory import MemoryRegistry
from fastnat.discovery.service import ServiceRegistry
from fastnat.errors import ForwarderUnreachableError, NATLayerError, RegistryUnavailableError

from .conftest import Backend, make_backend
from .support import CAP_KEYS, CAP_VALUES, LOOPBACK, closed_port, run_async

TTL = 0.3
# How far the clocks of two processes (ours, Redis's wall clock) and the
# registries' rounding (Redis keeps milliseconds) may disagree.
EPSILON = 0.005
# The first lookup that misses an expired value comes at most this long after
# its expiry: one poll interval and a round trip, generous for a loaded machine.
SLACK = 0.25
POLL = 0.01


async def watch_expiry(
    registry: Registry, key: str, value: str, earliest: float, latest: float, *, others: frozenset[str] = frozenset()
) -> float:
    """Poll ``key`` until ``value`` is gone; return when that was first seen.

    The value's expiry lies in ``[earliest, latest]`` (the announce was sent
    after ``earliest - ttl`` and answered before ``latest - ttl``). So a
    lookup that starts after ``latest`` must miss it, and one that ends
    before ``earliest`` must see it. ``others`` must be present throughout.
    """
    while True:
        start = time.monotonic()
        values = await registry.lookup(key)
        end = time.monotonic()
        present = value in values
        assert others <= set(values), f"{sorted(others - set(values))} vanished from {key!r}: {values}"
        if present:
            assert start < latest + EPSILON, (
                f"{value!r} still there {start - latest:.3f} s after its TTL ran out (lookup {values})"
            )
        else:
            assert end >= earliest - EPSILON, f"{value!r} expired {earliest - end:.3f} s before its TTL ran out"
            return end
        assert end < latest + 2.0, "bounded wait"
        await asyncio.sleep(POLL)


# ------------------------------------------------------------ basics


def test_announce_lookup_withdraw(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        reg = b.client()
        assert await reg.lookup("nothing-here") == []
        for value in ("10.0.0.1*1224*1225", "10.0.0.2*1224*1225", "10.0.0.3*1224*1225"):
            await reg.announce("__NAT__FORWARDER__", value, 30)
        await reg.announce("__NAT_SRV__server#1", "10.0.0.1*1225", 30)
        assert sorted(await reg.lookup("__NAT__FORWARDER__")) == [
            "10.0.0.1*1224*1225",
            "10.0.0.2*1224*1225",
            "10.0.0.3*1224*1225",
        ]
        assert await reg.lookup("__NAT_SRV__server#1") == ["10.0.0.1*1225"]
        # announcing again does not duplicate
        await reg.announce("__NAT_SRV__server#1", "10.0.0.1*1225", 30)
        assert await reg.lookup("__NAT_SRV__server#1") == ["10.0.0.1*1225"]
        await reg.withdraw("__NAT__FORWARDER__", "10.0.0.2*1224*1225")
        assert sorted(await reg.lookup("__NAT__FORWARDER__")) == ["10.0.0.1*1224*1225", "10.0.0.3*1224*1225"]
        # withdrawing what is not there is not an error
        await reg.withdraw("__NAT__FORWARDER__", "10.0.0.2*1224*1225")
        await reg.withdraw("never-announced", "x")
        await reg.withdraw("__NAT_SRV__server#1", "10.0.0.1*1225")
        assert await reg.lookup("__NAT_SRV__server#1") == []
        assert sorted(await reg.lookup("__NAT__FORWARDER__")) == ["10.0.0.1*1224*1225", "10.0.0.3*1224*1225"]

    backend.run(body)


def test_clients_share_one_view(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        one, two = b.client(), b.client()
        await one.announce("shared", "from-one", 30)
        await two.announce("shared", "from-two", 30)
        assert sorted(await one.lookup("shared")) == ["from-one", "from-two"]
        assert sorted(await two.lookup("shared")) == ["from-one", "from-two"]
        await two.withdraw("shared", "from-one")
        assert await one.lookup("shared") == ["from-two"]

    backend.run(body)


# ------------------------------------------------------------ expiry


def test_expiry_is_exact(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        reg = b.client()
        await reg.lookup("warm-up")  # connected: the timings below are requests only
        t0 = time.monotonic()
        await reg.announce("k", "v", TTL)
        t1 = time.monotonic()
        assert await reg.lookup("k") == ["v"]
        gone = await watch_expiry(reg, "k", "v", t0 + TTL, t1 + TTL)
        assert gone - (t1 + TTL) < SLACK, f"gone {gone - t1:.3f} s after the announce, its TTL is {TTL}"
        # and it stays gone
        await asyncio.sleep(0.05)
        assert await reg.lookup("k") == []

    backend.run(body)


def test_values_expire_on_their_own(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        reg = b.client()
        await reg.announce("k", "long", 30)
        await reg.announce("k", "other-long", 30)
        t0 = time.monotonic()
        await reg.announce("k", "short", TTL)
        t1 = time.monotonic()
        await watch_expiry(reg, "k", "short", t0 + TTL, t1 + TTL, others=frozenset({"long", "other-long"}))
        assert sorted(await reg.lookup("k")) == ["long", "other-long"]

    backend.run(body)


def test_reannounce_extends(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        reg = b.client()
        await reg.lookup("warm-up")
        t0 = time.monotonic()
        await reg.announce("k", "v", TTL)
        await asyncio.sleep(0.2)
        r0 = time.monotonic()
        await reg.announce("k", "v", TTL)
        r1 = time.monotonic()
        assert r0 < t0 + TTL - 0.02, "the loop stalled; the renewal came too late to test anything"
        # past the first announce's expiry, before the second's: still there
        await asyncio.sleep(max(0.0, t0 + TTL + 0.03 - time.monotonic()))
        gone = await watch_expiry(reg, "k", "v", r0 + TTL, r1 + TTL)
        assert gone >= t0 + TTL + 0.03 - EPSILON
        assert gone - (r1 + TTL) < SLACK

    backend.run(body)


def test_reannounce_with_a_shorter_ttl_shortens(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        reg = b.client()
        await reg.announce("k", "v", 60)
        r0 = time.monotonic()
        await reg.announce("k", "v", 0.2)
        r1 = time.monotonic()
        gone = await watch_expiry(reg, "k", "v", r0 + 0.2, r1 + 0.2)
        assert gone - (r1 + 0.2) < SLACK

    backend.run(body)


# ------------------------------------------------------------ caps


def test_key_cap(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        reg = b.client()
        for i in range(CAP_KEYS):
            await reg.announce(f"key{i}", "v", 30)
        with pytest.raises(ValueError, match=rf"maximum of {CAP_KEYS} keys"):
            await reg.announce("one-too-many", "v", 30)
        assert await reg.lookup("one-too-many") == []
        # existing keys still take renewals and new values
        await reg.announce("key0", "v", 30)
        await reg.announce("key0", "v2", 30)
        assert sorted(await reg.lookup("key0")) == ["v", "v2"]
        # a withdrawn key frees its place
        await reg.withdraw("key1", "v")
        await reg.announce("newcomer", "v", 30)
        with pytest.raises(ValueError):
            await reg.announce("one-too-many", "v", 30)
        # so does an expired one (nobody touches it meanwhile)
        await reg.announce("key2", "v", 0.15)
        await asyncio.sleep(0.25)
        await reg.announce("after-expiry", "v", 30)
        assert await reg.lookup("after-expiry") == ["v"]
        assert await reg.lookup("key2") == []

    backend.run(body)


def test_values_per_key_cap(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        reg = b.client()
        for i in range(CAP_VALUES):
            await reg.announce("crowded", f"v{i}", 30)
        with pytest.raises(ValueError, match=rf"maximum of {CAP_VALUES} values"):
            await reg.announce("crowded", "one-too-many", 30)
        assert len(await reg.lookup("crowded")) == CAP_VALUES
        await reg.announce("crowded", "v0", 30)  # a renewal is not a new value
        await reg.announce("elsewhere", "one-too-many", 30)  # other keys are not affected
        await reg.withdraw("crowded", "v1")
        await reg.announce("crowded", "newcomer", 30)
        with pytest.raises(ValueError):
            await reg.announce("crowded", "one-too-many", 30)
        await reg.announce("crowded", "v2", 0.15)
        await asyncio.sleep(0.25)
        await reg.announce("crowded", "after-expiry", 30)
        values = await reg.lookup("crowded")
        assert len(values) == CAP_VALUES and "after-expiry" in values and "v2" not in values

    backend.run(body)


def test_size_limits(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        reg = b.client()
        longest_key = "k" * MAX_KEY_LENGTH
        longest_value = "v" * MAX_VALUE_LENGTH
        await reg.announce(longest_key, longest_value, 30)
        assert await reg.lookup(longest_key) == [longest_value]
        # characters of every UTF-8 length, and JSON's special ones
        wide_key = ('ключ-🔑-"\\-é' * MAX_KEY_LENGTH)[:MAX_KEY_LENGTH]
        wide_value = ('🌍€"\\/ ñ' * MAX_VALUE_LENGTH)[:MAX_VALUE_LENGTH]
        await reg.announce(wide_key, wide_value, 30)
        await reg.announce(wide_key, "plain", 30)
        assert sorted(await reg.lookup(wide_key)) == sorted([wide_value, "plain"])
        await reg.withdraw(wide_key, wide_value)
        assert await reg.lookup(wide_key) == ["plain"]
        with pytest.raises(ValueError, match=str(MAX_KEY_LENGTH)):
            await reg.announce("k" * (MAX_KEY_LENGTH + 1), "v", 30)
        with pytest.raises(ValueError, match=str(MAX_VALUE_LENGTH)):
            await reg.announce("k", "v" * (MAX_VALUE_LENGTH + 1), 30)
        with pytest.raises(ValueError):
            await reg.lookup("k" * (MAX_KEY_LENGTH + 1))
        await reg.announce("k", "v", MAX_TTL)  # the longest TTL is fine
        assert await reg.lookup("k") == ["v"]

    backend.run(body)


def test_max_values(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        reg = b.client()
        everything = {f"v{i}" for i in range(CAP_VALUES)}
        for value in sorted(everything):
            await reg.announce("k", value, 30)
        assert set(await reg.lookup("k")) == everything  # the default (50) is above the count
        for n in (1, 3, CAP_VALUES - 1):
            values = await reg.lookup("k", n)
            assert len(values) == n and len(set(values)) == n and set(values) <= everything
        assert set(await reg.lookup("k", CAP_VALUES)) == everything
        assert set(await reg.lookup("k", max_values=MAX_LOOKUP)) == everything

    backend.run(body)


# ------------------------------------------------------------ bad input

BAD_CALLS: list[tuple[str, str, tuple[Any, ...]]] = [
    ("announce", "empty key", ("", "v", 10)),
    ("announce", "key not a string", (5, "v", 10)),
    ("announce", "key None", (None, "v", 10)),
    ("announce", "key bytes", (b"k", "v", 10)),
    ("announce", "key with a newline", ("a\nb", "v", 10)),
    ("announce", "key with a NUL", ("a\x00b", "v", 10)),
    ("announce", "key too long", ("k" * (MAX_KEY_LENGTH + 1), "v", 10)),
    ("announce", "empty value", ("k", "", 10)),
    ("announce", "value not a string", ("k", 1, 10)),
    ("announce", "value unprintable", ("k", "\x1b[31m", 10)),
    ("announce", "value too long", ("k", "v" * (MAX_VALUE_LENGTH + 1), 10)),
    ("announce", "ttl zero", ("k", "v", 0)),
    ("announce", "ttl negative", ("k", "v", -1)),
    ("announce", "ttl nan", ("k", "v", math.nan)),
    ("announce", "ttl infinite", ("k", "v", math.inf)),
    ("announce", "ttl above the maximum", ("k", "v", MAX_TTL * 2)),
    ("announce", "ttl a bool", ("k", "v", True)),
    ("announce", "ttl a string", ("k", "v", "10")),
    ("announce", "ttl None", ("k", "v", None)),
    ("lookup", "empty key", ("",)),
    ("lookup", "key not a string", (["k"],)),
    ("lookup", "max_values zero", ("k", 0)),
    ("lookup", "max_values negative", ("k", -1)),
    ("lookup", "max_values above the maximum", ("k", MAX_LOOKUP + 1)),
    ("lookup", "max_values a float", ("k", 2.0)),
    ("lookup", "max_values a bool", ("k", True)),
    ("lookup", "max_values a string", ("k", "3")),
    ("withdraw", "empty key", ("", "v")),
    ("withdraw", "value too long", ("k", "v" * (MAX_VALUE_LENGTH + 1))),
    ("withdraw", "value None", ("k", None)),
]


def test_bad_input(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        reg = b.client()
        await reg.announce("k", "good", 30)
        for method, what, args in BAD_CALLS:
            with pytest.raises(ValueError) as info:
                await getattr(reg, method)(*args)
            assert str(info.value), f"{method} with {what}: ValueError without a message"
            assert not isinstance(info.value, OSError)
        # nothing was stored, and the registry (and its connection) still works
        assert await reg.lookup("k") == ["good"]
        await reg.announce("k", "better", 30)
        assert sorted(await reg.lookup("k")) == ["better", "good"]

    backend.run(body)


# ------------------------------------------------------------ concurrency


def test_concurrent_use(backend: Backend) -> None:
    """Many tasks announce, look up and withdraw at once, through several clients."""

    async def body(b: Backend) -> None:
        clients = [b.client() for _ in range(3)]
        keys = [f"c{i}" for i in range(CAP_VALUES)]
        values = {f"v{j}" for j in range(CAP_VALUES)}
        n = len(keys) * len(values)

        async def announce(i: int) -> None:
            await clients[i % 3].announce(keys[i % len(keys)], f"v{i // len(keys)}", 30)

        async def lookup(i: int) -> list[str]:
            return await clients[i % 3].lookup(keys[i % len(keys)], CAP_VALUES)

        results = await asyncio.gather(*(announce(i) for i in range(n)), *(lookup(i) for i in range(n)))
        for seen in results[n:]:
            assert len(seen) == len(set(seen)) and set(seen) <= values
        finals = await asyncio.gather(*(lookup(i) for i in range(len(keys))))
        assert all(set(f) == values for f in finals), finals
        # every key is at its cap: renewals from every client at once still succeed
        await asyncio.gather(*(announce(i) for i in range(n)))
        await asyncio.gather(*(clients[i % 3].withdraw(keys[i % len(keys)], f"v{i // len(keys)}") for i in range(n)))
        finals = await asyncio.gather(*(lookup(i) for i in range(len(keys))))
        assert finals == [[] for _ in keys]

    backend.run(body, timeout=30)


# ------------------------------------------------------------ unreachable


def _url(scheme: str, port: int, query: str = "") -> str:
    path = "/0" if scheme == "redis" else ""
    return f"{scheme}://{LOOPBACK}:{port}{path}{query}"


@pytest.fixture(params=["fastnat", "redis"])
def network_scheme(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        from .conftest import require_redis_package

        require_redis_package()
    return str(request.param)


def test_unreachable_registry_fails_fast(network_scheme: str) -> None:
    port = closed_port()

    async def main() -> None:
        reg = open_registry(_url(network_scheme, port, "?timeout=3"))
        try:
            for method, args in (("announce", ("k", "v", 10)), ("lookup", ("k",)), ("withdraw", ("k", "v"))):
                start = time.monotonic()
                with pytest.raises(RegistryUnavailableError) as info:
                    await getattr(reg, method)(*args)
                assert time.monotonic() - start < 2.0, "a refused connection must fail at once"
                error = info.value
                assert isinstance(error, ForwarderUnreachableError) and isinstance(error, NATLayerError)
                assert isinstance(error, OSError)
                assert "registry" in str(error) and f"{LOOPBACK}:{port}" in str(error), str(error)
        finally:
            await reg.close()

    run_async(main())


def test_silent_registry_times_out(network_scheme: str) -> None:
    """A peer that accepts and never answers: an error within the timeout, no hang."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(16)  # never accepted: the kernel completes the connections
        port = listener.getsockname()[1]

        async def main() -> None:
            reg = open_registry(_url(network_scheme, port, "?timeout=0.3"))
            try:
                start = time.monotonic()
                with pytest.raises(RegistryUnavailableError) as info:
                    await reg.lookup("k")
                elapsed = time.monotonic() - start
                assert 0.25 <= elapsed < 2.0, elapsed
                assert f"{LOOPBACK}:{port}" in str(info.value)
            finally:
                await reg.close()

        run_async(main())


@pytest.mark.parametrize("kind", ["service-process", "redis"])
def test_registry_restart(kind: str, request: pytest.FixtureRequest) -> None:
    """The registry goes away: calls fail fast; it comes back on the same
    port: the same client object works again (it reconnects). (The in-process
    service: ``test_service.py::test_client_reconnects_after_restart``.)"""
    network_backend = make_backend(kind, request)

    async def body(b: Backend) -> None:
        reg = b.client()
        await reg.announce("k", "v", 30)
        assert await reg.lookup("k") == ["v"]
        await asyncio.to_thread(stop_backend)
        start = time.monotonic()
        with pytest.raises(RegistryUnavailableError):
            await reg.lookup("k")
        assert time.monotonic() - start < 3.0
        await asyncio.to_thread(restart_backend)
        assert await reg.lookup("k") == []  # no persistence: a fresh registry
        await reg.announce("k", "again", 30)
        assert await reg.lookup("k") == ["again"]

    if network_backend.kind == "service-process":
        start_proc = request.getfixturevalue("registry_process")
        proc = network_backend.proc  # type: ignore[attr-defined]

        def stop_backend() -> None:
            proc.stop()

        def restart_backend() -> None:
            network_backend.proc = start_proc(  # type: ignore[attr-defined]
                "--max-keys", str(CAP_KEYS), "--max-values-per-key", str(CAP_VALUES), port=proc.port
            )

    else:
        server = request.getfixturevalue("start_redis")()
        network_backend.server = server  # type: ignore[attr-defined]

        def stop_backend() -> None:
            server.stop()

        def restart_backend() -> None:
            server.start(server.port)

    network_backend.run(body)


# ------------------------------------------------------------ URLs


def test_open_registry_dispatches_by_scheme() -> None:
    async def main() -> None:
        memory = open_registry("memory://dispatch")
        assert isinstance(memory, MemoryRegistry)
        service = open_registry("fastnat://127.0.0.1:7")
        assert isinstance(service, ServiceRegistry) and (service.host, service.port) == ("127.0.0.1", 7)
        assert isinstance(open_registry("fastnat://[::1]:7"), ServiceRegistry)
        for reg in (memory, service):
            await reg.close()

    run_async(main())


@pytest.mark.parametrize(
    "url",
    [
        "fastnat://nohost",
        "fastnat://:7",
        "fastnat://host:0",
        "fastnat://host:99999",
        "fastnat://host:7/path",
        "fastnat://user:pw@host:7",
        "fastnat://host:7?bogus=1",
        "fastnat://host:7?timeout=-1",
        "fastnat://host:7?timeout=soon",
        "ftp://host:7",
        "no-scheme",
    ],
)
def test_bad_registry_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        open_registry(url)

"""The client's cache of working forwarders, per server id (as the seed kept
it): after the forwarder it names fails, ``nat_openconn`` drops the entry
and finds the server through the registry again."""

from __future__ import annotations

import pytest
from nat.support import raw_stats

import fastnat
from fastnat import locate
from fastnat.errors import ServerNotFoundError, ForwarderUnreachableError

from .support import FAST, aio_echo, forwarders_listed, run_aio, seed_echo, server_entries, wait_until

pytestmark = pytest.mark.timeout(60)


def echo(ip, port, sock, this, listen) -> None:
    with sock:
        while data := sock.recv(65536):
            sock.sendall(data)


def client_echo(api: str, server_id: str, data: bytes) -> tuple[bytes, int]:
    if api == "seed":
        return seed_echo(server_id, 80, data)
    return run_aio(lambda: aio_echo(server_id, 80, data))


@pytest.mark.parametrize("api", ["seed", "aio"])
def test_cache_dropped_when_its_forwarder_dies(fleet, monkeypatch, api: str) -> None:
    url = fleet.registry().url
    fwds = [fleet.forwarder("--registry", url, settings=FAST) for _ in range(2)]
    wait_until(lambda: forwarders_listed(url) == {f.advertisement for f in fwds}, 5, "forwarders advertised")
    server = fleet.server("cachy", url, "--no-persist", settings=FAST)
    (where,) = server.forwarders()
    first = next(f for f in fwds if f.port == where[1])
    second = next(f for f in fwds if f is not first)

    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    assert client_echo(api, "cachy", b"one") == (b"one", first.port)
    assert locate.cached_forwarders("cachy") == [first.address]

    first.kill()
    # the server does not persist: it withdraws its entry and stays away
    wait_until(lambda: not server_entries(url, "cachy"), 3, "the server's entry withdrawn")
    # the cached forwarder fails, the entry goes, and a fresh lookup finds
    # nothing: one error names both (the server is nowhere to be found)
    with pytest.raises(ServerNotFoundError, match=rf"{first.port}.*not announced"):
        client_echo(api, "cachy", b"two")
    assert locate.cached_forwarders("cachy") == []

    # the server comes back (a new process) at the live forwarder ...
    fleet.server("cachy", url, settings=FAST)
    assert fleet.servers[-1].forwarders() == [second.address]
    # ... and the client finds it through the registry alone (no cache, no list)
    assert client_echo(api, "cachy", b"three") == (b"three", second.port)
    assert locate.cached_forwarders("cachy") == [second.address]


def test_cached_forwarder_that_lost_the_server(fleet, monkeypatch) -> None:
    """The cached forwarder is alive but no longer holds the server: its
    NO_SERVER answer sends the client to the registry, which names the new one."""
    url = fleet.registry().url
    small = fleet.forwarder("--registry", url, "--max-servers", "1", settings=FAST)
    wait_until(lambda: forwarders_listed(url) == {small.advertisement}, 5, "the small forwarder advertised")
    roamer = fleet.server("roamer", url, settings=FAST)
    assert roamer.forwarders() == [small.address]
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    assert seed_echo("roamer", 80, b"one") == (b"one", small.port)
    assert locate.cached_forwarders("roamer") == [small.address]

    big = fleet.forwarder("--registry", url, settings=FAST)
    roamer.stop()  # gone from the small forwarder, which has room again
    wait_until(lambda: small.advertisement in forwarders_listed(url), 3, "the small forwarder advertised again")
    # fill the small forwarder up, so that the server's next start goes to the big one
    holder = fastnat.nat_waitforconn("holder", 80, echo, forwarderIP=small.host, forwarderPort=small.port)
    try:
        wait_until(lambda: forwarders_listed(url) == {big.advertisement}, 3, "only the big forwarder listed")
        fleet.server("roamer", url, settings=FAST)
        assert fleet.servers[-1].forwarders() == [big.address]

        assert locate.cached_forwarders("roamer") == [small.address]  # stale, and alive
        assert seed_echo("roamer", 80, b"two") == (b"two", big.port)
        assert locate.cached_forwarders("roamer") == [big.address]
        assert raw_stats(small.port)["refusals"].get("no_server") == 1  # it was asked first
    finally:
        fastnat.nat_stopcomm(holder)


def test_cached_forwarder_needs_no_registry(fleet, monkeypatch) -> None:
    """While the forwarder it remembers works, a client needs no registry:
    with the registry dead (refusing) or hung (SIGSTOP: connections accepted,
    never answered) ``nat_openconn`` still connects at once. A cache of the
    forwarders that worked is what spares the lookup; the registry is for
    when they fail. (Today every call looks the id up first, so a hung
    registry costs every connection the registry client's 5 s timeout.)"""
    import os
    import signal
    import time

    registry = fleet.registry()
    url = registry.url
    fwd = fleet.forwarder("--registry", url, settings=FAST)
    wait_until(lambda: forwarders_listed(url) == {fwd.advertisement}, 5, "the forwarder advertised")
    fleet.server("steady", url, settings=FAST)
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    assert seed_echo("steady", 80, b"one") == (b"one", fwd.port)
    assert locate.cached_forwarders("steady") == [fwd.address]

    timings = {}
    os.kill(registry.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert seed_echo("steady", 80, b"hung") == (b"hung", fwd.port)
        timings["hung"] = time.monotonic() - start
    finally:
        os.kill(registry.pid, signal.SIGCONT)
    registry.kill()
    start = time.monotonic()
    assert seed_echo("steady", 80, b"dead") == (b"dead", fwd.port)
    timings["dead"] = time.monotonic() - start
    assert all(t < 1.0 for t in timings.values()), (
        f"connecting through the cached, working forwarder took {timings} (seconds): "
        "nat_openconn waits for the registry's lookup before it uses its cache"
    )

"""The registry (the built-in service, or a real redis-server) is killed with
SIGKILL and started again on the same port, with nothing kept (Redis runs
without persistence): clients that located the server before keep reaching
it meanwhile through the forwarder they cached, and once the registry is
back the server's announcement and the forwarder's advertisement reappear
within an announce interval (plus the margin of a busy machine)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
from fleet.support import forwarders_listed, server_entries, wait_until

from fastnat import locate

from .support import FAULT, MARGIN, one_transfer

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

ANNOUNCE_INTERVAL = float(FAULT["announce_interval"])
SERVER_ID = "registry-fault"


def registry_of(kind: str, fleet, request: pytest.FixtureRequest) -> tuple[str, Callable[[], None], Callable[[], None]]:  # type: ignore[no-untyped-def]
    """A registry of this test alone: its URL, how to kill it, how to start it again."""
    if kind == "service":
        registry = fleet.registry()
        return registry.url, registry.kill, lambda: fleet.registry(port=registry.port)
    redis = request.getfixturevalue("start_redis")()
    return redis.url, lambda: redis.stop(signal.SIGKILL), lambda: redis.start(redis.port)


@pytest.mark.parametrize("kind", ["service", "redis"])
def test_registry_killed_and_restarted(kind: str, fleet, monkeypatch, request: pytest.FixtureRequest) -> None:
    url, kill, restart = registry_of(kind, fleet, request)
    forwarder = fleet.forwarder("--registry", url, settings=FAULT)
    wait_until(lambda: forwarder.advertisement in forwarders_listed(url), 5, "the forwarder advertised")
    server = fleet.server(SERVER_ID, url, "--handler", "transfer", settings=FAULT)
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    assert one_transfer("seed", SERVER_ID, "located").ok
    assert locate.cached_forwarders(SERVER_ID) == [forwarder.address]

    kill()
    killed = time.monotonic()
    # Down for a few announce intervals: the server's and the forwarder's
    # announcements fail meanwhile. Clients of both APIs still get through
    # the forwarder they cached, and the server keeps its registration.
    while time.monotonic() < killed + 3 * ANNOUNCE_INTERVAL:
        for api in ("seed", "aio"):
            transfer = one_transfer(api, SERVER_ID, f"{api}-down")
            assert transfer.ok, transfer
    assert not [e for e in server.events if e["event"] in ("errdel", "links")], server.events
    assert server.alive() and forwarder.alive()

    restart()
    restarted = time.monotonic()
    bound = ANNOUNCE_INTERVAL + MARGIN
    wait_until(lambda: server_entries(url, SERVER_ID) == {forwarder.server_value}, bound, "the server announced again")
    announced = time.monotonic() - restarted
    wait_until(lambda: forwarder.advertisement in forwarders_listed(url), bound, "the forwarder advertised again")
    # a client that knows nothing yet finds the server through the new registry
    locate.forget_server(SERVER_ID)
    assert one_transfer("aio", SERVER_ID, "fresh").ok
    print(f"\n[{kind}] the server's announcement was back {announced:.2f} s after the registry restarted")

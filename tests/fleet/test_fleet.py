"""A fleet: three forwarders in their own processes sharing one registry (the
built-in registry service, ``python -m fastnat registry``, or a real
``redis-server``). Servers in their own processes register with no forwarder
named; clients find them with no forwarder named. The forwarder a server is
on is killed with SIGKILL: the server comes back on another forwarder and is
reachable again within a bound, and the stale entries (the dead forwarder's
advertisement, a dead server's entry) are gone after their TTL.

Timings of every process are shortened (:data:`support.FAST`): TTL 2 s,
re-announced every 0.5 s, reconnect from 0.2 s.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import fastnat
from fastnat import locate

from .support import (
    FAST,
    TTL,
    aio_echo,
    forwarders_listed,
    run_aio,
    seed_echo,
    server_entries,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

# A server whose forwarder died is back and reachable within this many
# seconds (it notices the loss at once on SIGKILL, then waits 0.1-0.3 s and
# may meet the dead forwarder's stale advertisement first).
BACK_WITHIN = 8.0
# Stale values are gone at most this long after their TTL (the announce
# interval is 0.5 s, and the machine is shared).
SLACK = 1.5

REGISTRIES = [pytest.param("service", id="service"), pytest.param("redis", id="redis")]


def echo_until_ok(call, timeout: float, what: str):
    """Retry ``call()`` (an echo) until it succeeds; its result and the failures seen."""
    failures: list[str] = []

    def attempt():
        try:
            return call()
        except OSError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)
            return None

    return wait_until(attempt, timeout, f"{what} (failures: {failures[-3:]})"), failures


@pytest.mark.parametrize("registry_url", REGISTRIES, indirect=True)
def test_fleet_sigkill_persist_and_stale_entries(nat_engine: str, fleet, registry_url: str, monkeypatch) -> None:
    url = registry_url
    fwds = [fleet.forwarder("--registry", url, settings=FAST) for _ in range(3)]
    by_port = {f.port: f for f in fwds}
    wait_until(lambda: forwarders_listed(url) == {f.advertisement for f in fwds}, 5, "the three forwarders advertised")

    # two servers, one per API, with nothing but the registry URL
    alpha = fleet.server("fleet-alpha", url, "--api", "seed", settings=FAST)
    beta = fleet.server("fleet-beta", url, "--api", "aio", settings=FAST)
    for server, sid in ((alpha, "fleet-alpha"), (beta, "fleet-beta")):
        (where,) = server.forwarders()
        assert where[1] in by_port, (where, fwds)
        assert server_entries(url, sid) == {by_port[where[1]].server_value}

    # clients with nothing but the registry URL
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    alpha_fwd = by_port[alpha.forwarders()[0][1]]
    beta_fwd = by_port[beta.forwarders()[0][1]]
    assert seed_echo("fleet-alpha", 80, b"a1") == (b"a1", alpha_fwd.port)
    assert run_aio(lambda: aio_echo("fleet-beta", 80, b"b1")) == (b"b1", beta_fwd.port)
    assert locate.cached_forwarders("fleet-alpha") == [alpha_fwd.address]

    # kill alpha's forwarder
    dead = [alpha_fwd]
    killed = alpha_fwd.kill()
    # nothing withdrew its advertisement: it is still listed, until its TTL
    assert alpha_fwd.advertisement in forwarders_listed(url)

    # alpha (seed API) comes back on another forwarder, reachable by a client
    # that names none (its cache pointed at the dead one)
    (got, via), failures = echo_until_ok(lambda: seed_echo("fleet-alpha", 80, b"a2"), BACK_WITHIN, "alpha back")
    times = [time.monotonic() - killed]
    assert got == b"a2" and via != alpha_fwd.port and via in by_port, (got, via)
    assert locate.cached_forwarders("fleet-alpha") == [("127.0.0.1", via)]  # the dead one was dropped
    alpha.wait_event(lambda e: e["event"] == "errdel", 5, "errdel for the lost link")
    wait_until(lambda: alpha.forwarders() == [("127.0.0.1", via)], 5, "alpha to report its new forwarder")
    assert server_entries(url, "fleet-alpha") == {by_port[via].server_value}

    # beta (asyncio API) moves too: it was on the same forwarder, or its own is killed now
    if beta_fwd is not alpha_fwd:
        dead.append(beta_fwd)
        beta_fwd.kill()
    (got, via), _ = echo_until_ok(lambda: run_aio(lambda: aio_echo("fleet-beta", 80, b"b2")), BACK_WITHIN, "beta back")
    times.append(time.monotonic() - dead[-1].killed_at)
    assert got == b"b2" and via in by_port and by_port[via] not in dead, (got, via)
    beta.wait_event(lambda e: e["event"] == "errdel", 5, "errdel for beta's lost link")
    wait_until(lambda: beta.forwarders() == [("127.0.0.1", via)], 5, "beta to report its new forwarder")
    assert server_entries(url, "fleet-beta") == {by_port[via].server_value}
    # alpha is reachable still (it moved again if it was on beta's forwarder)
    (got, _), _ = echo_until_ok(lambda: seed_echo("fleet-alpha", 80, b"a3"), BACK_WITHIN, "alpha reachable")
    assert got == b"a3"
    assert all(t < BACK_WITHIN for t in times), times

    # a server killed outright cannot withdraw anything: its entry expires
    beta_value = server_entries(url, "fleet-beta")
    assert len(beta_value) == 1
    beta_killed = beta.kill()
    assert server_entries(url, "fleet-beta") == beta_value  # until its TTL

    # stale entries are gone after their TTL
    live = {f.advertisement for f in fwds if f not in dead}
    wait_until(
        lambda: forwarders_listed(url) == live,
        max(0.0, dead[-1].killed_at + TTL + SLACK - time.monotonic()),
        "the dead forwarders' advertisements to expire",
    )
    for sid in ("fleet-alpha", "fleet-beta"):
        assert not server_entries(url, sid) & {f.server_value for f in dead}
    wait_until(
        lambda: not server_entries(url, "fleet-beta"),
        max(0.0, beta_killed + TTL + SLACK - time.monotonic()),
        "the dead server's entry to expire",
    )
    with pytest.raises(fastnat.errors.ServerNotFoundError):
        fastnat.nat_openconn("fleet-beta", 80)
    # the survivor still serves
    assert seed_echo("fleet-alpha", 80, b"a4")[0] == b"a4"
    print(
        f"back {', '.join(f'{t:.2f}' for t in times)} s after the SIGKILLs; alpha's client failures meanwhile: {len(failures)}"
    )


def test_frozen_forwarder_detected_by_keepalive(nat_engine: str, fleet, monkeypatch) -> None:
    """A forwarder that hangs (SIGSTOP: its sockets stay open, nothing says it
    died) is noticed by the server's keepalive (0.5 s interval, 0.5 s
    timeout), which moves to the other forwarder; the frozen forwarder's
    advertisement expires, since it cannot renew it; a client whose cache
    names the frozen forwarder waits no longer than its own timeout."""
    url = fleet.registry().url
    fwds = [fleet.forwarder("--registry", url, settings=FAST) for _ in range(2)]
    wait_until(lambda: forwarders_listed(url) == {f.advertisement for f in fwds}, 5, "forwarders advertised")
    server = fleet.server("frosty", url, settings=FAST)
    (where,) = server.forwarders()
    frozen = next(f for f in fwds if f.port == where[1])
    other = next(f for f in fwds if f is not frozen)
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    assert seed_echo("frosty", 80, b"before") == (b"before", frozen.port)

    frozen_at = time.monotonic()
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        lost = server.wait_event(lambda e: e["event"] == "errdel", 4, "the keepalive to notice")
        assert "keepalive" in lost["error"], lost
        # keepalive 0.5 + 0.5 s; allow a busy machine
        assert lost["t"] - frozen_at < 2.5, lost["t"] - frozen_at
        # then 0.1-0.3 s before reconnecting; the frozen forwarder is still
        # advertised, and when it is tried first it costs the server's
        # connect timeout (5 s, not configurable through settings) before
        # the other one is tried
        moved = server.wait_event(
            lambda e: e["event"] == "links" and e["forwarders"] == [["127.0.0.1", other.port]], 8, "the move"
        )
        assert moved["t"] - lost["t"] < 6.5, moved["t"] - lost["t"]
        assert server_entries(url, "frosty") == {other.server_value}
        start = time.monotonic()
        assert seed_echo("frosty", 80, b"after", timeout=1.0) == (b"after", other.port)
        assert time.monotonic() - start < 2.5  # the frozen one costs its 1 s timeout at most
        assert locate.cached_forwarders("frosty") == [other.address]
        wait_until(
            lambda: forwarders_listed(url) == {other.advertisement},
            max(0.0, frozen_at + TTL + SLACK - time.monotonic()),
            "the frozen forwarder's advertisement to expire",
        )
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    # thawed, it announces itself again
    wait_until(lambda: frozen.advertisement in forwarders_listed(url), 3, "the thawed forwarder advertised again")
    assert seed_echo("frosty", 80, b"still")[0] == b"still"
    print(
        f"keepalive noticed {lost['t'] - frozen_at:.2f} s after the freeze; moved {moved['t'] - lost['t']:.2f} s later"
    )

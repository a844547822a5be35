"""``redundancy=2``: a server held at two of three forwarders at once, both
announced under its key; one of them is killed with SIGKILL while clients
keep connecting, and no client connection fails.

"No failed client connection" means, precisely (times are
``time.monotonic()``; the kill *begins* when SIGKILL is sent and the
forwarder is *dead* once it is reaped):

* no call to ``nat_openconn`` / ``fastnat.aio.open_connection`` fails, ever:
  not before the kill, not while it happens, not after it. Whatever the
  client had cached, the other announced forwarder is tried at once.
* every connection whose attempt starts once the forwarder is dead succeeds
  whole (connect, echo of its own payload, end of stream) with no wait: each
  takes less than :data:`NO_WAIT` seconds, far below a client's 5 s timeout,
  the 2 s TTL of the stale entries and the server's reconnect delay. At least
  :data:`MIN_BEFORE_RELINK` of them per client complete before the server has
  re-registered anywhere new, so the failover owes nothing to
  re-registration.
* a connection *in flight* is one already established through the killed
  forwarder before it was dead and still open when the kill began: it may
  break (its bytes were crossing the killed process). These are counted and
  reported separately; no other connection may break.

Both client APIs run at once (``nat_openconn`` on one thread,
``fastnat.aio.open_connection`` on a loop of another); they share the
process's cache of working forwarders.
"""

from __future__ import annotations

import time

import pytest

from fastnat import locate

from .support import FAST, ClientLoop, forwarders_listed, server_entries, wait_until

pytestmark = pytest.mark.timeout(90)

NO_WAIT = 1.0
MIN_BEFORE_RELINK = 3
# After the kill, the clients go on for this long.
WINDOW = 1.0
# The server's timings: it re-registers 0.5 to 1.5 s after losing a link,
# so that the window above sees the failover alone first.
SERVER = {**FAST, "reconnect_initial_delay": 1.0, "reconnect_max_delay": 2.0}

REGISTRIES = [pytest.param("service", id="service"), pytest.param("redis", id="redis")]


@pytest.mark.parametrize("registry_url", REGISTRIES, indirect=True)
def test_redundancy_2_failover_without_failed_connection(
    nat_engine: str, fleet, registry_url: str, monkeypatch
) -> None:
    url = registry_url
    fwds = [fleet.forwarder("--registry", url, settings=FAST) for _ in range(3)]
    by_port = {f.port: f for f in fwds}
    wait_until(lambda: forwarders_listed(url) == {f.advertisement for f in fwds}, 5, "the three forwarders advertised")
    server = fleet.server("twin", url, "--redundancy", "2", settings=SERVER)
    held = server.forwarders()
    assert len(held) == 2 and len(set(held)) == 2 and all(p in by_port for _, p in held), held
    assert server_entries(url, "twin") == {by_port[p].server_value for _, p in held}  # both announced

    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    clients = [ClientLoop("seed", "twin"), ClientLoop("aio", "twin")]
    for client in clients:
        client.start()
    try:
        wait_until(lambda: all(c.successes() >= 3 for c in clients), 10, "both clients to get through")
        cached = locate.cached_forwarders("twin")
        assert len(cached) == 1 and cached[0] in held, (cached, held)
        victim = by_port[cached[0][1]]  # the forwarder the clients use now
        survivor = next(by_port[p] for _, p in held if p != victim.port)
        kill_began = time.monotonic()
        dead_at = victim.kill()
        time.sleep(WINDOW)
    finally:
        for client in clients:
            client.finish()

    # the server noticed, and later re-registered at the third forwarder
    lost = server.wait_event(
        lambda e: e["event"] == "links" and e["forwarders"] == [["127.0.0.1", survivor.port]], 5, "the loss"
    )
    relinked = server.wait_event(
        lambda e: e["event"] == "links" and len(e["forwarders"]) == 2 and e["t"] > lost["t"], 10, "re-registration"
    )
    assert victim.port not in {p for _, p in relinked["forwarders"]}
    wait_until(
        lambda: server_entries(url, "twin") == {by_port[p].server_value for _, p in relinked["forwarders"]},
        5,
        "the registry to list the server's two forwarders again",
    )

    report = []
    for client in clients:
        before = [a for a in client.attempts if a.end < kill_began]
        in_flight = [
            a for a in client.attempts if a.connected is not None and a.connected < dead_at and a.end >= kill_began
        ]
        after = [a for a in client.attempts if a.start >= dead_at]
        before_relink = [a for a in after if a.end < relinked["t"]]
        report.append(
            f"{client.kind}: {len(before)} before, {len(in_flight)} in flight "
            f"({sum(not a.ok for a in in_flight)} broke), {len(after)} after the kill "
            f"({len(before_relink)} before the server re-registered, slowest "
            f"{max((a.duration for a in after), default=0) * 1000:.0f} ms)"
        )
        connect_failures = [a for a in client.attempts if a.connect_failed]
        assert not connect_failures, f"{client.kind}: connections could not be made: {connect_failures[:5]}"
        broken = [a for a in client.attempts if not a.ok and a not in in_flight]
        assert not broken, f"{client.kind}: connections broke that were not in flight at the kill: {broken[:5]}"
        assert all(a.via == victim.port for a in in_flight if not a.ok), in_flight
        slow_after = [a for a in after if a.duration >= NO_WAIT]
        assert not slow_after, f"{client.kind}: connections after the kill waited: {slow_after[:5]}"
        assert len(before_relink) >= MIN_BEFORE_RELINK, report[-1]
        assert all(a.via == survivor.port for a in before_relink)
        assert all(a.via in (survivor.port, *(p for _, p in relinked["forwarders"])) for a in after)
    print("; ".join(report))

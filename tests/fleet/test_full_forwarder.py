"""A full forwarder (``--max-servers``) withdraws its advertisement, and
announces itself again when a server leaves (gracefully or by dying)."""

from __future__ import annotations

import time

import pytest
from nat.support import raw_stats

import fastnat
from fastnat.errors import NATLayerError

from .support import FAST, forwarders_listed, seed_echo, server_entries, wait_until

pytestmark = pytest.mark.timeout(60)

# The forwarder withdraws / announces at once when it fills up / has room
# (not at its next announce, 0.5 s away): allow for a busy machine.
PROMPT = 2.0


def echo(ip, port, sock, this, listen) -> None:
    with sock:
        while data := sock.recv(65536):
            sock.sendall(data)


def test_full_forwarder_withdraws_and_announces_again(nat_engine: str, fleet, monkeypatch) -> None:
    fwd = fleet.forwarder("--max-servers", "1", settings=FAST)  # with its embedded registry
    url = fwd.url
    wait_until(lambda: forwarders_listed(url) == {fwd.advertisement}, 5, "the forwarder advertised")

    first = fleet.server("first", url, settings=FAST)
    assert first.forwarders() == [fwd.address]
    wait_until(lambda: not forwarders_listed(url), PROMPT, "the full forwarder to withdraw its advertisement")
    # and it stays withdrawn across its announce intervals
    time.sleep(1.0)
    assert not forwarders_listed(url)

    # a newcomer finds no forwarder to register at
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    with pytest.raises(NATLayerError, match="no forwarder"):
        fastnat.nat_waitforconn("second", 80, echo)

    # the server leaves by dying: the forwarder has room and says so
    first.kill()
    wait_until(lambda: forwarders_listed(url) == {fwd.advertisement}, PROMPT, "the forwarder advertised again")

    handle = fastnat.nat_waitforconn("second", 80, echo)
    try:
        assert handle.registration.forwarder_addresses == [fwd.address]
        wait_until(lambda: not forwarders_listed(url), PROMPT, "the forwarder full again")
        # a full forwarder still relays to the servers it holds
        assert server_entries(url, "second") == {fwd.server_value}
        assert seed_echo("second", 80, b"still served") == (b"still served", fwd.port)
    finally:
        fastnat.nat_stopcomm(handle)
    # the server leaves gracefully
    wait_until(lambda: forwarders_listed(url) == {fwd.advertisement}, PROMPT, "advertised again after nat_stopcomm")


REGISTRIES = [pytest.param("service", id="service"), pytest.param("redis", id="redis")]


@pytest.mark.parametrize("registry_url", REGISTRIES, indirect=True)
def test_full_forwarder_in_a_fleet_sends_newcomers_elsewhere(fleet, registry_url: str) -> None:
    url = registry_url
    small = fleet.forwarder("--registry", url, "--max-servers", "1", settings=FAST)
    wait_until(lambda: forwarders_listed(url) == {small.advertisement}, 5, "the small forwarder advertised")
    first = fleet.server("occupant", url, settings=FAST)
    assert first.forwarders() == [small.address]
    wait_until(lambda: not forwarders_listed(url), PROMPT, "the full forwarder to withdraw its advertisement")

    big = fleet.forwarder("--registry", url, settings=FAST)
    wait_until(lambda: forwarders_listed(url) == {big.advertisement}, 5, "the big forwarder advertised")
    # newcomers all go to the forwarder with room (the full one is not listed)
    others = [fleet.server(f"newcomer-{n}", url, settings=FAST) for n in range(2)]
    assert all(s.forwarders() == [big.address] for s in others)
    # not one of them even tried the full forwarder: it was not listed
    assert raw_stats(small.port)["refusals"].get("servers_full", 0) == 0

    first.stop()  # nat_stopcomm: deregisters, the forwarder has room again
    wait_until(
        lambda: forwarders_listed(url) == {small.advertisement, big.advertisement},
        PROMPT,
        "the small forwarder advertised again",
    )

"""A forwarder dies (SIGKILL) or hangs (SIGSTOP, then SIGCONT) in the middle
of 20 checked transfers: nothing lost, nothing hung.

The forwarder and the server run in their own processes (the server runs
the test's engine and API: ``nat_waitforconn`` or ``fastnat.aio.start_server``),
the clients in this process with the same API (``nat_openconn``, blocking,
no timeout on the data; or ``fastnat.aio.open_connection``). Each transfer
uploads, then downloads, and is checked end to end (sha256 on both sides).
Afterwards the server is registered again and a fresh client gets through.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from fleet.support import forwarders_listed, wait_until
from fleet.transfer import Transfer
from nat.support import raw_stats

from .support import (
    ENGINE_AND_API,
    FAULT,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MARGIN,
    Bounds,
    check_outcomes,
    one_transfer,
    server_outcomes,
    start_batch,
    wait_linked,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

APIS = ["seed", "aio"]
KiB = 1024
# 20 transfers started 30 ms apart, uploading 0.5 to 2 MiB in 64 KiB pieces
# 30 ms apart (0.25 to 1 s each), then downloading as much: at the fault
# (0.6 s in) some are done, most are under way, the last are connecting.
COUNT = 20
STARTS = [0.03 * i for i in range(COUNT)]
FAULT_AT = 0.6
# A server that lost its forwarder is registered again within this many
# seconds of the forwarder's return (reconnects from 0.2 s, doubling to 1 s).
BACK_WITHIN = 8.0
# How long the forwarder stays frozen: past the server's keepalive.
FROZEN_FOR = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + 1.0


def make_transfers(prefix: str) -> list[Transfer]:
    return [Transfer(f"{prefix}{i}", (i % 4 + 1) * 512 * KiB, (i % 4 + 1) * 512 * KiB, pause=0.03) for i in range(COUNT)]


def setup(fleet, monkeypatch, server_id: str, api: str):  # type: ignore[no-untyped-def]
    url = fleet.registry().url
    forwarder = fleet.forwarder("--registry", url, settings=FAULT)
    wait_until(lambda: forwarder.advertisement in forwarders_listed(url), 5, "the forwarder advertised")
    server = fleet.server(server_id, url, "--api", api, "--handler", "transfer", settings=FAULT)
    assert server.forwarders() == [forwarder.address]
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    return url, forwarder, server


@pytest.mark.parametrize("api", APIS)
def test_sigkill_forwarder_mid_transfers(nat_engine: str, fleet, monkeypatch, api: str) -> None:
    url, forwarder, server = setup(fleet, monkeypatch, "killed-fwd", api)
    transfers = make_transfers("k")
    batch = start_batch(api, "killed-fwd", transfers, STARTS)
    time.sleep(FAULT_AT)
    fault = time.monotonic()
    forwarder.kill()
    batch.wait()
    bound = KEEPALIVE_TIMEOUT + MARGIN
    outcomes = server_outcomes(server, {t.tag for t in transfers}, bound)
    # A killed forwarder's kernel ends its connections: with a FIN where
    # nothing was left unread, which a client sees as a clean end of stream
    # (its length prefix tells it the transfer is cut short).
    summary = check_outcomes(transfers, outcomes, Bounds(fault, bound, fault, bound, clean_eof=True))
    assert summary["failed"], f"the kill interrupted nothing: {summary}"
    lost = server.wait_event(lambda e: e["event"] == "errdel" and e["t"] > fault, bound, "the server to notice")
    assert lost["t"] - fault < bound, lost

    back = fleet.forwarder("--registry", url, settings=FAULT)
    returned = time.monotonic()
    linked = wait_linked(server, lambda f: f == [[back.host, back.port]], fault, BACK_WITHIN, "re-registered")
    fresh = one_transfer(api, "killed-fwd", "after")
    assert fresh.ok, fresh
    print(f"\n[{nat_engine}/{api}] {summary}; registered again {linked['t'] - returned:.2f} s after the restart")


@ENGINE_AND_API
def test_sigstop_forwarder_mid_transfers(nat_engine: str, fleet, monkeypatch, api: str) -> None:
    """A hung forwarder (its sockets stay open). The server's keepalive
    notices it; every server handler fails then. A client's connection to
    the forwarder is plain TCP with nothing to notice a hang: it fails once
    the forwarder runs again and finds the server's session dead, with a
    reset (never a clean end of stream), within the same bound."""
    _url, forwarder, server = setup(fleet, monkeypatch, "frozen-fwd", api)
    transfers = make_transfers("s")
    batch = start_batch(api, "frozen-fwd", transfers, STARTS)
    time.sleep(FAULT_AT)
    stopped = time.monotonic()
    os.kill(forwarder.pid, signal.SIGSTOP)
    try:
        noticed = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + MARGIN
        lost = server.wait_event(lambda e: e["event"] == "errdel" and e["t"] > stopped, noticed, "the keepalive")
        assert "keepalive" in lost["error"], lost
        # every server handler has failed while the forwarder is still frozen
        server_outcomes(server, {t.tag for t in transfers}, noticed)
        time.sleep(max(0.0, stopped + FROZEN_FOR - time.monotonic()))
    finally:
        os.kill(forwarder.pid, signal.SIGCONT)
    resumed = time.monotonic()
    batch.wait()
    bound = KEEPALIVE_TIMEOUT + MARGIN
    # (a client that connected during the freeze may have got through after it)
    outcomes = server_outcomes(server, {t.tag for t in transfers}, bound)
    summary = check_outcomes(transfers, outcomes, Bounds(resumed, bound, stopped, noticed, clean_eof=False))
    assert summary["server_failed"], f"the freeze interrupted nothing: {summary}"
    # the forwarder, thawed, drops the dead session and takes the server's new one
    linked = wait_linked(server, lambda f: f == [[forwarder.host, forwarder.port]], lost["t"], BACK_WITHIN, "re-registered")
    wait_until(lambda: raw_stats(forwarder.port)["sessions"] == 1, bound, "the dead session dropped")
    fresh = one_transfer(api, "frozen-fwd", "after")
    assert fresh.ok, fresh
    print(f"\n[{nat_engine}/{api}] {summary}; noticed {lost['t'] - stopped:.2f} s after the freeze, "
          f"registered again {linked['t'] - resumed:.2f} s after the thaw")

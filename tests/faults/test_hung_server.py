"""A server that hangs (SIGSTOP: its connection stays open, nothing says it
died) while registered at a forwarder.

* The forwarder's own keepalive, with the timings of its process's settings
  (``FASTNAT_KEEPALIVE_*`` / ``fastnat.configure``), drops the hung server's
  session and its id.
* A new server claiming the id of a session that does not answer gets it at
  once (the forwarder pings the holder, within its keepalive timeout, instead
  of refusing the id until that session's next keepalive); a holder that
  answers keeps its id.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from fleet.support import forwarders_listed, wait_until
from nat.support import raw_stats

from .support import FAULT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MARGIN, one_transfer, wait_linked

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]


def start(fleet, monkeypatch, forwarder_settings):  # type: ignore[no-untyped-def]
    url = fleet.registry().url
    forwarder = fleet.forwarder("--registry", url, settings=forwarder_settings)
    wait_until(lambda: forwarder.advertisement in forwarders_listed(url), 5, "the forwarder advertised")
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    return url, forwarder


def test_the_forwarder_drops_a_hung_server_after_its_keepalive(fleet, monkeypatch) -> None:
    url, forwarder = start(fleet, monkeypatch, FAULT)
    server = fleet.server("hung", url, "--handler", "transfer", settings=FAULT)
    assert "hung" in raw_stats(forwarder.port)["per_server"]
    frozen = time.monotonic()
    os.kill(server.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: "hung" not in raw_stats(forwarder.port)["per_server"],
                   KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + MARGIN, "the forwarder to drop the hung server")
        dropped = time.monotonic() - frozen
    finally:
        os.kill(server.pid, signal.SIGCONT)
    # thawed, the server finds its session gone and registers again
    thawed = time.monotonic()
    wait_linked(server, lambda f: f == [[forwarder.host, forwarder.port]], thawed, 5 + MARGIN, "registered again")
    assert one_transfer("seed", "hung", "thawed").ok
    print(f"\ndropped {dropped:.2f} s after the freeze")


def test_a_hung_holder_gives_its_id_to_a_new_server(fleet, monkeypatch) -> None:
    # The forwarder's keepalive would notice the hung holder only after 30 s.
    url, _forwarder = start(fleet, monkeypatch, {**FAULT, "keepalive_interval": 30.0})
    holder = fleet.server("claimed", url, settings=FAULT)
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        claimed = time.monotonic()
        newcomer = fleet.server("claimed", url, "--handler", "transfer", settings=FAULT, wait=False)
        event = newcomer.wait_event(lambda e: e["event"] in ("ready", "error"), KEEPALIVE_TIMEOUT + MARGIN, "ready")
        assert event["event"] == "ready", event
        took = event["t"] - claimed
        assert one_transfer("aio", "claimed", "newcomer").ok
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    # a holder that answers keeps its id
    third = fleet.server("claimed", url, settings=FAULT, wait=False)
    refused = third.wait_event(lambda e: e["event"] in ("ready", "error"), 10, "an answer")
    assert refused["event"] == "error" and refused["type"] == "IdTakenError", refused
    assert one_transfer("seed", "claimed", "still").ok
    print(f"\nthe new server had the id {took:.2f} s after it asked")


def test_a_claim_without_the_secret_costs_a_hung_holder_nothing(fleet, monkeypatch) -> None:
    """With a secret, only a claimant that proves it can take a hung holder's
    id: a claim with a wrong secret is refused and leaves the holder alone."""
    url = fleet.registry().url
    forwarder = fleet.forwarder("--registry", url, "--secret", "hold-s3cret", settings={**FAULT, "keepalive_interval": 30.0})
    wait_until(lambda: forwarder.advertisement in forwarders_listed(url), 5, "the forwarder advertised")
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    holder = fleet.server("guarded", url, "--handler", "transfer", settings={**FAULT, "secret": "hold-s3cret"})
    before = raw_stats(forwarder.port)["per_server"]["guarded"]["address"]
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        intruder = fleet.server("guarded", url, settings={**FAULT, "secret": "wrong"}, wait=False)
        refused = intruder.wait_event(lambda e: e["event"] in ("ready", "error"), KEEPALIVE_TIMEOUT + MARGIN, "an answer")
        assert refused["event"] == "error" and refused["type"] == "AuthenticationError", refused
        assert raw_stats(forwarder.port)["per_server"]["guarded"]["address"] == before
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    assert one_transfer("seed", "guarded", "still the holder's").ok

"""A server that hangs (SIGSTOP: its connection stays open, nothing says it
died) while registered at a forwarder.

* The forwarder's own keepalive, with the timings of its process's settings
  (``FASTNAT_KEEPALIVE_*`` / ``fastnat.configure``), drops the hung server's
  session and its id.
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


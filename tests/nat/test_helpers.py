"""The seed's helpers on loopback: the forwarder can dial back, so no NAT
layer is needed; the external address is 127.0.0.1; nothing is behind a NAT."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time

import pytest

import fastnat
from fastnat import aio

from .support import LOOPBACK, free_port, raw_request

# every test here is bounded (longer ones say so)
pytestmark = pytest.mark.timeout(60)


def test_external_ip_and_behind_nat(forwarder) -> None:
    assert fastnat.getmy_external_ip(LOOPBACK, forwarder.port) == LOOPBACK
    assert fastnat.behind_nat(LOOPBACK, forwarder.port) is False
    ip, port = asyncio.run(aio.external_address(forwarder.address))
    assert ip == LOOPBACK and 0 < port < 65536
    fastnat.configure(forwarders=[forwarder.address])
    assert fastnat.getmy_external_ip() == LOOPBACK
    assert fastnat.behind_nat() is False
    assert re.fullmatch(r"127\.0\.0\.1#\d+", fastnat.nat_getmyid())
    assert fastnat.nat_getmyid() != fastnat.nat_getmyid()


def test_check_bi_directional_says_no_nat_needed(forwarder) -> None:
    """The forwarder dials back to 127.0.0.1 and gets its probe echoed:
    False, no NAT layer needed (forwarder from fastnat.configure)."""
    fastnat.configure(forwarders=[forwarder.address])
    assert fastnat.nat_check_bi_directional(LOOPBACK, free_port()) is False


def test_check_bi_directional_returns_promptly(forwarder) -> None:
    """A loopback probe takes milliseconds: the call must not outlive it
    (explicit forwarder this time)."""
    started = time.monotonic()
    assert fastnat.nat_check_bi_directional(LOOPBACK, free_port(), LOOPBACK, forwarder.port) is False
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"nat_check_bi_directional took {elapsed:.2f} s on loopback"


def test_check_bidirectional_asyncio(forwarder) -> None:
    async def main() -> bool:
        return await asyncio.wait_for(aio.check_bidirectional(LOOPBACK, free_port(), forwarder.address), 10)

    started = time.monotonic()
    assert asyncio.run(main()) is False
    assert time.monotonic() - started < 2.0


def test_bidirectional_dials_only_the_caller(forwarder) -> None:
    """The forwarder dials back only to the address the request came from:
    claiming another address (here 127.0.0.2, where something listens)
    gets ``reachable: false`` and no connection there."""
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.2", port))
    except OSError:
        pytest.skip("127.0.0.2 is not usable here")
    listener.listen(4)
    listener.settimeout(0.5)
    dialled: list[object] = []

    def watch() -> None:
        try:
            conn, addr = listener.accept()
            dialled.append(addr)
            conn.close()
        except OSError:
            pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        reply = raw_request(forwarder.port, "bidirectional", {"ip": "127.0.0.2", "port": port})
    finally:
        watcher.join(5)
        listener.close()
    assert reply["status"] == "OK"
    assert reply["value"]["reachable"] is False
    assert dialled == [], f"the forwarder dialled an address the caller named: {dialled}"


def test_bidirectional_to_nothing_is_unreachable(forwarder) -> None:
    started = time.monotonic()
    reply = raw_request(forwarder.port, "bidirectional", {"ip": LOOPBACK, "port": free_port()})
    assert reply["status"] == "OK" and reply["value"]["reachable"] is False
    assert time.monotonic() - started < 4  # bounded by the dial-back timeout


def test_bidirectional_to_a_mute_listener_is_unreachable(forwarder) -> None:
    """Something listens but does not echo: unreachable, within the dial-back timeout."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(4)
        started = time.monotonic()
        reply = raw_request(forwarder.port, "bidirectional", {"ip": LOOPBACK, "port": listener.getsockname()[1]}, timeout=10)
        elapsed = time.monotonic() - started
    assert reply["value"]["reachable"] is False
    assert elapsed < 8

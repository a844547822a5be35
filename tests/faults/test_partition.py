"""A network partition between a NAT'd server and its forwarder: the link
is taken down for longer than the keepalive, then brought up again, and the
server comes back (registered at the forwarder, reachable by a client).

The world (network namespaces of this test, see ``tests/e2e/netns.py``)::

    public host 10.232.0.1          router (NAT)                server host
    forwarder + its registry  ---   wan 10.232.0.2              192.168.232.2
    the client                      lan 192.168.232.1  -------  server_proc.py

The router masquerades the server host and forwards nothing inward but
replies. The partition is the router's WAN link set down, then up. Every
fastnat process is the real one, run in its namespace with ``ip netns exec``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.netns import Network, NsProcess, require_namespaces, sweep_stale
from fleet.support import SERVER_SCRIPT, child_env
from nat.conftest import _default_engine

from .support import FAULT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MARGIN

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(120)]

PUBLIC, WAN = "10.232.0.1", "10.232.0.2"
LAN, SERVER = "192.168.232.1", "192.168.232.2"
FWD_PORT = 12345
REGISTRY = f"fastnat://{PUBLIC}:{FWD_PORT}"
SERVER_ID = "partitioned"
FORWARDER_READY = re.compile(r"^fastnat forwarder listening on (\S+):(\d+)$")
# How long the link stays down: past the server's keepalive, and long
# enough for a reconnect to fail.
PARTITION = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + 0.5
# The server is registered again within this many seconds of the link's
# return (its reconnects are at most 1 s apart, with jitter).
BACK_WITHIN = 5.0

_ECHO = """
import socket, sys
import fastnat
try:
    sock = fastnat.nat_openconn(sys.argv[1], 80, timeout=3)
    with sock:
        sock.settimeout(5)
        sock.sendall(b"through")
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(1024):
            got += chunk
    print(got.decode())
except OSError as exc:
    print(f"failed: {type(exc).__name__}: {exc}")
"""


class Server:
    """``server_proc.py`` in the server host; its JSON events as they come."""

    def __init__(self, proc: NsProcess) -> None:
        self.proc = proc

    def event(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.wait_line(re.compile(r"^\{"), max(0.1, deadline - time.monotonic()))
            event = json.loads(line.string)
            if predicate(event):
                return dict(event)
            if time.monotonic() > deadline:
                raise AssertionError(f"no event {what} within {timeout} s: {self.proc.describe()}")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Network, str, str, str, str]]:
    """The namespaces, the forwarder running; (network, public, router, server host, router's WAN device)."""
    require_namespaces()
    sweep_stale()
    net = Network(tmp_path)
    try:
        public, router, host = net.ns("public"), net.ns("router"), net.ns("server")
        wan, lan = net.dev("wan"), net.dev("lan")
        net.veth(public, net.dev("pub"), router, wan)
        net.address(public, net.dev("pub"), f"{PUBLIC}/24")
        net.address(router, wan, f"{WAN}/24")
        net.veth(router, lan, host, net.dev("srv"))
        net.address(router, lan, f"{LAN}/24")
        net.address(host, net.dev("srv"), f"{SERVER}/24")
        net.default_route(host, LAN)
        net.nat_router(router, wan, lan, "192.168.232.0/24")
        env = child_env(_default_engine(), None, FAULT)
        forwarder = net.start(public, [sys.executable, "-m", "fastnat", "-v", "forwarder", "--host", PUBLIC,
                                       "--port", str(FWD_PORT)], env, "forwarder")
        forwarder.wait_line(FORWARDER_READY)
        yield net, public, router, host, wan
    finally:
        problems = net.destroy()
        if problems:
            pytest.fail("the test network was not removed cleanly: " + "; ".join(problems), pytrace=False)


def echo(public: str) -> str:
    """A client in the public host, with nothing but the registry: what came back."""
    result = subprocess.run(["ip", "netns", "exec", public, sys.executable, "-c", _ECHO, SERVER_ID],
                            capture_output=True, text=True, timeout=30, env=child_env(_default_engine(), REGISTRY), check=False)
    assert result.returncode == 0, result
    return result.stdout.strip()


def test_partition_then_the_server_comes_back(world: tuple[Network, str, str, str, str]) -> None:
    net, public, router, host, wan = world
    env = child_env(_default_engine(), REGISTRY, FAULT)
    server = Server(net.start(host, [sys.executable, str(SERVER_SCRIPT), "--id", SERVER_ID, "--no-stdin"], env, "server"))
    server.event(lambda e: e["event"] == "ready", 20, "ready")
    assert echo(public) == "through"

    net.exec(router, "ip", "link", "set", wan, "down")
    cut = time.monotonic()
    try:
        lost = server.event(lambda e: e["event"] == "errdel", KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + MARGIN, "lost")
        assert "keepalive" in lost["error"], lost
        assert lost["t"] - cut < KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + MARGIN, lost
        time.sleep(max(0.0, cut + PARTITION - time.monotonic()))
    finally:
        net.exec(router, "ip", "link", "set", wan, "up")
    healed = time.monotonic()
    back = server.event(lambda e: e["event"] == "links" and e["forwarders"] == [[PUBLIC, FWD_PORT]], BACK_WITHIN,
                        "registered again")
    assert echo(public) == "through"
    print(f"\nkeepalive noticed the partition after {lost['t'] - cut:.2f} s; "
          f"registered again {back['t'] - healed:.2f} s after the link came back")


def test_partition_server_host_replaced_meanwhile(world: tuple[Network, str, str, str, str]) -> None:
    """During the partition the server host is replaced (a new machine at the
    same address, as after a crash and a reboot): the old connection ends
    without a word reaching the forwarder. Once the link is back, a server
    started on the new host takes the id: the forwarder must not keep it for
    the dead session until that session's next keepalive (30 s by default)."""
    net, public, router, host, wan = world
    env = child_env(_default_engine(), REGISTRY, FAULT)
    command = [sys.executable, str(SERVER_SCRIPT), "--id", SERVER_ID, "--no-stdin"]
    first = net.start(host, command, env, "server-1")
    Server(first).event(lambda e: e["event"] == "ready", 20, "ready")
    assert echo(public) == "through"

    net.exec(router, "ip", "link", "set", wan, "down")
    try:
        first.kill()
        # the old host goes (its link with it), a new one comes at the same address
        net.exec(router, "ip", "link", "del", net.dev("lan"))
        new_host, lan = net.ns("server2"), net.dev("lan2")
        net.veth(router, lan, new_host, net.dev("srv2"))
        net.address(router, lan, f"{LAN}/24")
        net.address(new_host, net.dev("srv2"), f"{SERVER}/24")
        net.default_route(new_host, LAN)
        net.nat_router(router, wan, lan, "192.168.232.0/24")
    finally:
        net.exec(router, "ip", "link", "set", wan, "up")
    healed = time.monotonic()
    second = Server(net.start(new_host, command, env, "server-2"))
    ready = second.event(lambda e: e["event"] in ("ready", "error"), BACK_WITHIN, "the new server registered")
    assert ready["event"] == "ready", ready
    assert echo(public) == "through"
    print(f"\nthe new server registered {ready['t'] - healed:.2f} s after the link came back")

"""A real NAT, end to end: fastnat's command line across network namespaces.

The world of these tests (every address is one the test assigns, inside its
own namespaces)::

                         10.231.0.0/24 ("the internet", a bridge in ns inet)
        +--------------------+-------------------------+
        |                    |                         |
    public host          router 1 (NAT)            router 2 (NAT)
    10.231.0.1           wan 10.231.0.2            wan 10.231.0.3
    fastnat forwarder    lan 192.168.230.1         lan 192.168.231.1
                             |                         |
                         server host               client host
                         192.168.230.2             192.168.231.2
                         http.server, expose       connect --listen

Both routers masquerade their LAN behind their WAN address and forward
nothing inward but replies: no port forwarding. The public host has no route
to either private subnet. Every fastnat process is the real command
(``python -m fastnat``) run in its namespace with ``ip netns exec``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netns import Network, NsProcess, require_namespaces, sweep_stale, wait_until

pytestmark = pytest.mark.e2e

PUBLIC = "10.231.0.1"
R1_WAN, R2_WAN = "10.231.0.2", "10.231.0.3"
R1_LAN, SERVER = "192.168.230.1", "192.168.230.2"
R2_LAN, CLIENT = "192.168.231.1", "192.168.231.2"
FWD_PORT = 12345
HTTP_PORT = 8000
SERVICE_PORT = 80
TUNNEL_PORT = 9000
FILE_NAME = "payload.bin"
FILE_SIZE = 64 * 1024 * 1024
ID = "web-behind-nat"

FORWARDER_READY = re.compile(r"^fastnat forwarder listening on (\S+):(\d+)$")
EXPOSE_READY = re.compile(r"^fastnat: (\S+) port (\d+) -> (\S+):(\d+), through (.+)$")
LISTEN_READY = re.compile(r"^fastnat: listening on (\S+):(\d+) -> (\S+) port (\d+)$")

# Bounds (seconds).
DIAL_TIMEOUT = 3.0
DOWNLOAD_TIMEOUT = 60.0
RECOVERY_BOUND = 30.0


@dataclasses.dataclass
class World:
    net: Network
    public: str
    server: str
    client: str
    engine: str
    file_sha256: str
    forwarder: NsProcess

    @property
    def registry(self) -> str:
        return f"fastnat://{PUBLIC}:{FWD_PORT}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTNAT_")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.engine == "python":
            env["FASTNAT_NO_EXTENSIONS"] = "1"
        env.update(extra)
        return env

    def fastnat(self, ns: str, args: list[str], name: str, **env: str) -> NsProcess:
        return self.net.start(ns, [sys.executable, "-m", "fastnat", *args], self.env(**env), name)

    def run_fastnat(self, ns: str, args: list[str], timeout: float = 30.0, **env: str):  # type: ignore[no-untyped-def]
        import subprocess

        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "fastnat", *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env(**env))

    def start_forwarder(self) -> NsProcess:
        proc = self.fastnat(self.public, ["forwarder", "--host", PUBLIC, "--port", str(FWD_PORT)], "forwarder")
        found = proc.wait_line(FORWARDER_READY)
        assert (found.group(1), int(found.group(2))) == (PUBLIC, FWD_PORT), found.group(0)
        return proc

    def status(self, ns: str | None = None) -> dict:  # type: ignore[type-arg]
        """``fastnat status --json`` asked from ``ns`` (default: the forwarder's own host)."""
        result = self.run_fastnat(ns or self.public, ["status", "--json", "--forwarder", f"{PUBLIC}:{FWD_PORT}"])
        assert result.returncode == 0, result
        return json.loads(result.stdout)  # type: ignore[no-any-return]


_DIAL = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except OSError as exc:
    print(f"failed: {type(exc).__name__}: {exc}")
"""

_DOWNLOAD = """
import hashlib, sys, time, urllib.request
start = time.monotonic()
digest, size = hashlib.sha256(), 0
with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as answer:
    while True:
        chunk = answer.read(1 << 20)
        if not chunk:
            break
        digest.update(chunk)
        size += len(chunk)
print(size, digest.hexdigest(), round(time.monotonic() - start, 3))
"""

_PROXY_SERVICE = """
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(8)
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        line = b""
        while not line.endswith(b"\\r\\n") and len(line) < 200:
            chunk = conn.recv(1)
            if not chunk:
                break
            line += chunk
        conn.sendall(line)
"""


def dial(world: World, ns: str, host: str, port: int) -> str:
    import subprocess

    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _DIAL, host, str(port), str(DIAL_TIMEOUT)],
                            capture_output=True, text=True, timeout=DIAL_TIMEOUT + 10)
    assert result.returncode == 0, result
    return result.stdout.strip()


def download(world: World, ns: str, url: str) -> tuple[int, str, float]:
    import subprocess

    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _DOWNLOAD, url, "20"],
                            capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT)
    assert result.returncode == 0, f"download of {url} in {ns} failed: {result.stderr[-2000:]}"
    size, digest, seconds = result.stdout.split()
    return int(size), digest, float(seconds)


def _engines() -> list[pytest.param]:  # type: ignore[valid-type]
    """The default (compiled) engine, and the pure one (``FASTNAT_NO_EXTENSIONS=1``
    in every fastnat process). A pure-Python run of the suite (that variable
    set here) has only the pure one."""
    pure = pytest.param("python", id="python")
    if os.environ.get("FASTNAT_NO_EXTENSIONS", "") not in ("", "0"):
        return [pure]
    return [pytest.param("compiled", id="compiled", marks=pytest.mark.compiled), pure]


_ENGINE_OF = "import fastnat.mux; print(fastnat.mux.Session.__module__)"


@pytest.fixture(scope="module", params=_engines())
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_namespaces()
    sweep_stale()
    base = tmp_path_factory.mktemp(f"e2e-{request.param}")
    www = base / "www"
    www.mkdir()
    digest = hashlib.sha256()
    with open(www / FILE_NAME, "wb") as out:
        for _ in range(FILE_SIZE // (1 << 20)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            out.write(chunk)
    logs = base / "logs"
    logs.mkdir()
    net = Network(logs)
    try:
        inet = net.ns("inet")
        public, r1, r2 = net.ns("public"), net.ns("router1"), net.ns("router2")
        server, client = net.ns("server"), net.ns("client")
        bridge = net.dev("br")
        net.exec(inet, "ip", "link", "add", bridge, "type", "bridge")
        net.exec(inet, "ip", "link", "set", bridge, "up")
        for ns, host_dev, switch_dev, cidr in (
            (public, net.dev("pub"), net.dev("ip"), f"{PUBLIC}/24"),
            (r1, net.dev("r1w"), net.dev("i1"), f"{R1_WAN}/24"),
            (r2, net.dev("r2w"), net.dev("i2"), f"{R2_WAN}/24"),
        ):
            net.veth(ns, host_dev, inet, switch_dev)
            net.exec(inet, "ip", "link", "set", switch_dev, "master", bridge)
            net.address(ns, host_dev, cidr)
        for router, wan, lan, host, host_dev, lan_ip, host_ip, subnet in (
            (r1, net.dev("r1w"), net.dev("r1l"), server, net.dev("srv"), R1_LAN, SERVER, "192.168.230.0/24"),
            (r2, net.dev("r2w"), net.dev("r2l"), client, net.dev("cli"), R2_LAN, CLIENT, "192.168.231.0/24"),
        ):
            net.veth(router, lan, host, host_dev)
            net.address(router, lan, f"{lan_ip}/24")
            net.address(host, host_dev, f"{host_ip}/24")
            net.default_route(host, lan_ip)
            net.nat_router(router, wan, lan, subnet)
        # The real local service of the server host.
        http = net.start(server, [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", "0.0.0.0",
                                  "--directory", str(www)], {**os.environ, "PYTHONUNBUFFERED": "1"}, "http.server")
        placeholder = World(net, public, server, client, request.param, digest.hexdigest(), http)
        # The fastnat processes of this world run the engine they are meant to.
        engine = net.start(public, [sys.executable, "-c", _ENGINE_OF], placeholder.env(), "engine")
        expected = {"compiled": "fastnat._mux", "python": "fastnat._mux_py"}[request.param]
        chosen = engine.wait_line(re.compile(r"^fastnat\._mux\w*$")).group(0)
        assert chosen == expected, f"the fastnat processes of this world would run {chosen}, not {expected}"
        wait_until(lambda: dial(placeholder, server, SERVER, HTTP_PORT) == "connected", 15, "http.server to listen")
        placeholder.forwarder = placeholder.start_forwarder()
        yield placeholder
    finally:
        problems = net.destroy()
        if problems:
            pytest.fail("the test network was not removed cleanly: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def exposed(world: World) -> Iterator[tuple[NsProcess, NsProcess]]:
    """``fastnat expose`` of the http.server on the server host, and
    ``fastnat connect --listen`` on the client host, both through the registry
    the forwarder hosts. Stopped (SIGTERM, exit 0) afterwards."""
    expose = world.fastnat(world.server, ["expose", ID, str(SERVICE_PORT), "--to", f"127.0.0.1:{HTTP_PORT}"],
                           "expose", FASTNAT_REGISTRY=world.registry)
    found = expose.wait_line(EXPOSE_READY)
    assert found.group(5) == f"{PUBLIC}:{FWD_PORT}", found.group(0)
    tunnel = world.fastnat(world.client, ["connect", ID, str(SERVICE_PORT), "--listen", f"127.0.0.1:{TUNNEL_PORT}"],
                           "connect", FASTNAT_REGISTRY=world.registry)
    tunnel.wait_line(LISTEN_READY)
    try:
        yield expose, tunnel
    finally:
        codes = {p.name: p.stop(signal.SIGTERM) for p in (tunnel, expose) if p.alive()}
        for p in (tunnel, expose):
            p.kill()
    assert all(code == 0 for code in codes.values()), codes


# --------------------------------------------------------------- tests


def test_the_client_cannot_dial_the_server_host(world: World) -> None:
    # The service is up: the server host itself reaches it.
    assert dial(world, world.server, SERVER, HTTP_PORT) == "connected"
    # The client host cannot reach it, neither at its private address ...
    direct = dial(world, world.client, SERVER, HTTP_PORT)
    assert direct.startswith("failed:"), direct
    # ... nor at its router's public address (no port forwarding) ...
    via_router = dial(world, world.client, R1_WAN, HTTP_PORT)
    assert via_router.startswith("failed:"), via_router
    # ... and neither can the public host.
    from_public = dial(world, world.public, SERVER, HTTP_PORT)
    assert from_public.startswith("failed:"), from_public
    # Both NATed hosts do reach the public host, through their routers.
    assert dial(world, world.client, PUBLIC, FWD_PORT) == "connected"
    assert dial(world, world.server, PUBLIC, FWD_PORT) == "connected"


def test_download_64_mib_through_fastnat(world: World, exposed: tuple[NsProcess, NsProcess]) -> None:
    size, digest, seconds = download(world, world.client, f"http://127.0.0.1:{TUNNEL_PORT}/{FILE_NAME}")
    assert size == FILE_SIZE
    assert digest == world.file_sha256
    print(f"\n[{world.engine}] 64 MiB through two NATs and a forwarder in {seconds:.2f} s "
          f"({FILE_SIZE / seconds / 1e6:.0f} MB/s)")
    stats = world.status()
    entry = stats["per_server"][ID]
    # The forwarder sees the server host only as its router's public address.
    assert entry["address"].rsplit(":", 1)[0] == R1_WAN, entry
    assert entry["ports"] == [SERVICE_PORT]
    assert entry["bytes_server_to_client"] >= FILE_SIZE, entry
    # Asked from elsewhere (the client's host, behind its NAT), the forwarder
    # gives its totals only: who is registered, and from where, stays private.
    elsewhere = world.status(world.client)
    assert elsewhere["servers"] == stats["servers"] and elsewhere["per_server"] == {}, elsewhere
    assert elsewhere["per_server_omitted"] == stats["servers"], elsewhere


def _check(world: World, ns: str) -> dict[str, str]:
    result = world.run_fastnat(ns, ["check"], FASTNAT_REGISTRY=world.registry)
    assert result.returncode == 0, result
    assert "Traceback" not in result.stderr, result.stderr
    fields = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def test_check_says_the_server_host_needs_nat(world: World) -> None:
    fields = _check(world, world.server)
    assert fields["external address"] == R1_WAN, fields
    assert fields["local address"] == SERVER, fields
    assert fields["NAT layer needed"].split()[0] == "yes", fields


def test_check_says_the_client_host_needs_nat(world: World) -> None:
    fields = _check(world, world.client)
    assert fields["external address"] == R2_WAN, fields
    assert fields["NAT layer needed"].split()[0] == "yes", fields


def test_check_says_the_public_host_does_not(world: World) -> None:
    fields = _check(world, world.public)
    assert fields["external address"] == PUBLIC, fields
    assert fields["local address"] == PUBLIC, fields
    assert fields["NAT layer needed"].split()[0] == "no", fields


def test_proxy_protocol_shows_the_clients_public_address(world: World) -> None:
    """Through ``--proxy-protocol`` the service learns where the client came
    from as the internet saw it: its router's public address."""
    service = world.net.start(world.server, [sys.executable, "-c", _PROXY_SERVICE, "8001"],
                              {**os.environ, "PYTHONUNBUFFERED": "1"}, "proxy-service")
    service.wait_line(re.compile("^ready$"))
    expose = world.fastnat(world.server, ["expose", "pp", "81", "--to", "127.0.0.1:8001", "--proxy-protocol"],
                           "expose-pp", FASTNAT_REGISTRY=world.registry)
    tunnel = world.fastnat(world.client, ["connect", "pp", "81", "--listen", "127.0.0.1:9001"], "connect-pp",
                           FASTNAT_REGISTRY=world.registry)
    try:
        expose.wait_line(EXPOSE_READY)
        tunnel.wait_line(LISTEN_READY)
        import subprocess

        fetch = ("import socket; s = socket.create_connection(('127.0.0.1', 9001), timeout=10); "
                 "s.shutdown(socket.SHUT_WR); print(s.recv(200).decode().strip())")
        result = subprocess.run(["ip", "netns", "exec", world.client, sys.executable, "-c", fetch],
                                capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result
        fields = result.stdout.split()
        assert fields[:3] == ["PROXY", "TCP4", R2_WAN], result.stdout
    finally:
        for proc in (tunnel, expose, service):
            proc.kill()


def test_forwarder_restart_the_service_comes_back(world: World, exposed: tuple[NsProcess, NsProcess]) -> None:
    expose, tunnel = exposed
    url = f"http://127.0.0.1:{TUNNEL_PORT}/{FILE_NAME}"
    wait_until(lambda: ID in world.status()["per_server"], 10, "the expose to be registered")
    # Stop the forwarder as an operator would, and start it again on the same address.
    assert world.forwarder.stop(signal.SIGTERM) == 0, world.forwarder.describe()
    assert dial(world, world.client, PUBLIC, FWD_PORT).startswith("failed:")
    world.forwarder = world.start_forwarder()
    restarted = time.monotonic()

    def registered() -> bool:
        return ID in world.status()["per_server"]

    wait_until(registered, RECOVERY_BOUND, "the expose to register again at the restarted forwarder")
    registered_after = time.monotonic() - restarted

    def downloads() -> tuple[int, str, float] | None:
        try:
            return download(world, world.client, url)
        except AssertionError:
            return None

    left = RECOVERY_BOUND - (time.monotonic() - restarted)
    size, digest, seconds = wait_until(downloads, max(left, 1.0), "a download through the restarted forwarder", 0.5)
    back_after = time.monotonic() - restarted - seconds
    assert (size, digest) == (FILE_SIZE, world.file_sha256)
    assert expose.alive() and tunnel.alive(), (expose.describe(), tunnel.describe())
    print(f"\n[{world.engine}] re-registered {registered_after:.2f} s after the forwarder restarted; "
          f"downloads again after {back_after:.2f} s")

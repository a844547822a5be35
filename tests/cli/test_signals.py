"""SIGINT and SIGTERM stop every long-running command cleanly: exit 0, and
``expose`` deregisters its id and withdraws its announcement before it goes."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable

import pytest

from .support import (
    FASTNAT,
    LISTEN_READY,
    LOOPBACK,
    REGISTRY_READY,
    Processes,
    Service,
    clean_env,
    connected,
    echo,
    free_port,
    lookup,
    registry_url,
    status_json,
    wait_until,
)

SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]
SERVER_KEY = "__NAT_SRV__"
FORWARDER_KEY = "__NAT__FORWARDER__"
# A clean stop is quick; this bounds it.
STOP_BOUND = 8.0


def refused(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=2):
            return False
    except OSError:
        return True


@pytest.mark.parametrize("sig", SIGNALS)
def test_forwarder_stops(procs: Processes, sig: int) -> None:
    proc, port = procs.forwarder()
    assert not refused((LOOPBACK, port))
    proc.send_signal(sig)
    assert proc.wait(STOP_BOUND) == 0, proc.stderr()
    assert "Traceback" not in proc.stderr(), proc.stderr()
    assert refused((LOOPBACK, port)), "the forwarder's port is still open after it stopped"


@pytest.mark.parametrize("sig", SIGNALS)
def test_registry_stops(procs: Processes, sig: int) -> None:
    proc = procs.start(["registry", "--host", LOOPBACK, "--port", "0"])
    port = int(proc.wait_line(REGISTRY_READY).group(2))
    assert lookup(registry_url(port), "anything") == []
    proc.send_signal(sig)
    assert proc.wait(STOP_BOUND) == 0, proc.stderr()
    assert "Traceback" not in proc.stderr(), proc.stderr()
    assert refused((LOOPBACK, port))


@pytest.mark.parametrize("sig", SIGNALS)
def test_expose_deregisters_and_withdraws(procs: Processes, forwarder: int, services: Callable[..., Service],
                                          sig: int) -> None:
    service = services(echo)
    url = registry_url(forwarder)
    proc = procs.expose("web", 80, service.address, forwarder)
    # Registered and announced while it runs...
    stats = status_json(forwarder)
    assert "web" in stats["per_server"] and stats["per_server"]["web"]["ports"] == [80], stats
    assert stats["servers"] == 1
    announced = lookup(url, SERVER_KEY + "web")
    assert announced, "expose is not announced in the forwarder's registry"
    proc.send_signal(sig)
    assert proc.wait(STOP_BOUND) == 0, proc.stderr()
    assert "Traceback" not in proc.stderr(), proc.stderr()
    # ... and neither once it has exited: at once, not after a TTL.
    stats = status_json(forwarder)
    assert "web" not in stats["per_server"] and stats["servers"] == 0, stats
    assert lookup(url, SERVER_KEY + "web") == [], "expose left its announcement in the registry"


@pytest.mark.parametrize("sig", SIGNALS)
def test_expose_stops_with_a_connection_in_flight(procs: Processes, forwarder: int,
                                                  services: Callable[..., Service], sig: int) -> None:
    service = services(echo)
    proc = procs.expose("web", 80, service.address, forwarder)
    tunnel = procs.start(["connect", "web", "80", "--listen", f"{LOOPBACK}:{free_port()}"],
                         clean_env(FASTNAT_REGISTRY=registry_url(forwarder)))
    found = tunnel.wait_line(LISTEN_READY)
    with connected((found.group(1), int(found.group(2))), timeout=10) as conn:
        conn.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        proc.send_signal(sig)
        assert proc.wait(STOP_BOUND) == 0, proc.stderr()
        # The relayed connection ends with expose.
        conn.settimeout(10)
        try:
            rest = conn.recv(1)
        except ConnectionResetError:
            rest = b""
        assert rest == b""
    assert "Traceback" not in proc.stderr(), proc.stderr()
    assert status_json(forwarder)["servers"] == 0


@pytest.mark.parametrize("sig", SIGNALS)
def test_connect_listen_stops(procs: Processes, forwarder: int, services: Callable[..., Service], sig: int) -> None:
    service = services(echo)
    procs.expose("web", 80, service.address, forwarder)
    proc = procs.start(["connect", "web", "80", "--listen", f"{LOOPBACK}:{free_port()}"],
                       clean_env(FASTNAT_REGISTRY=registry_url(forwarder)))
    found = proc.wait_line(LISTEN_READY)
    address = (found.group(1), int(found.group(2)))
    with connected(address, timeout=10) as conn:  # one connection open while it stops
        conn.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        proc.send_signal(sig)
        assert proc.wait(STOP_BOUND) == 0, proc.stderr()
    assert "Traceback" not in proc.stderr(), proc.stderr()
    assert refused(address), "the --listen port is still open after connect stopped"
    wait_until(lambda: status_json(forwarder)["clients_active"] == 0, 5, "the relayed client to end")


@pytest.mark.parametrize("sig", SIGNALS)
def test_connect_stdio_stops(procs: Processes, forwarder: int, services: Callable[..., Service], sig: int) -> None:
    """netcat mode, connected to a silent service, input still open: a signal ends it with exit 0."""
    service = services(lambda conn: recv_all_quietly(conn))
    procs.expose("quiet", 80, service.address, forwarder)
    proc = subprocess.Popen(FASTNAT + ["connect", "quiet", "80", "--forwarder", f"{LOOPBACK}:{forwarder}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
                            start_new_session=True)
    try:
        wait_until(lambda: status_json(forwarder)["clients_active"] == 1, 10, "connect to be relayed")
        time.sleep(0.2)
        proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=STOP_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"connect did not stop within {STOP_BOUND} s of {sig!r}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0, f"exit {proc.returncode}, stderr {err!r}"
    assert b"Traceback" not in err and b"Fatal Python error" not in err, err


def recv_all_quietly(conn: socket.socket) -> None:
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


@pytest.mark.parametrize("sig", SIGNALS)
def test_forwarder_withdraws_its_advertisement_from_an_outside_registry(procs: Processes, sig: int) -> None:
    registry = procs.start(["registry", "--host", LOOPBACK, "--port", "0"])
    url = registry_url(int(registry.wait_line(REGISTRY_READY).group(2)))
    proc, port = procs.forwarder("--registry", url)
    advertised = wait_until(lambda: lookup(url, FORWARDER_KEY), 10, "the forwarder's advertisement")
    assert any(value.startswith(f"{LOOPBACK}*") and value.endswith(f"*{port}") for value in advertised), advertised
    proc.send_signal(sig)
    assert proc.wait(STOP_BOUND) == 0, proc.stderr()
    assert lookup(url, FORWARDER_KEY) == [], "the forwarder left its advertisement behind"


def test_expose_through_an_outside_registry_withdraws(procs: Processes, services: Callable[..., Service]) -> None:
    """Forwarder and registry apart: expose's announcement lives in the
    registry process, and SIGTERM takes it out of there too."""
    registry = procs.start(["registry", "--host", LOOPBACK, "--port", "0"])
    url = registry_url(int(registry.wait_line(REGISTRY_READY).group(2)))
    _, port = procs.forwarder("--registry", url)
    wait_until(lambda: lookup(url, FORWARDER_KEY), 10, "the forwarder's advertisement")
    service = services(echo)
    proc = procs.expose("web", 80, service.address, port, env=clean_env(FASTNAT_REGISTRY=url))
    assert lookup(url, SERVER_KEY + "web") == [f"{LOOPBACK}*{port}"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_BOUND) == 0, proc.stderr()
    assert lookup(url, SERVER_KEY + "web") == []
    assert status_json(port)["servers"] == 0

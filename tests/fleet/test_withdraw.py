"""A stopped server withdraws its announcements at once: once
``nat_stopcomm`` (or the asyncio server's ``close()`` / ``wait_closed()``)
returns, a lookup of ``__NAT_SRV__<id>`` no longer lists it, although the
values were announced with the default TTL of 180 s (only a withdraw can
remove them this early). A port stopped while another remains keeps the
announcement."""

from __future__ import annotations

import time

import pytest

import fastnat
from fastnat import aio
from fastnat.discovery import open_registry
from fastnat.settings import SERVER_KEY_PREFIX

from .support import aio_echo, close_loop_registries, forwarders_listed, run_aio, seed_echo, server_entries, wait_until

pytestmark = pytest.mark.timeout(60)

REGISTRIES = [pytest.param("service", id="service"), pytest.param("redis", id="redis")]


def echo(ip, port, sock, this, listen) -> None:
    with sock:
        while data := sock.recv(65536):
            sock.sendall(data)


@pytest.fixture
def two_forwarders(fleet, registry_url: str):
    fwds = [fleet.forwarder("--registry", registry_url) for _ in range(2)]
    wait_until(lambda: forwarders_listed(registry_url) == {f.advertisement for f in fwds}, 5, "forwarders advertised")
    return fwds


@pytest.mark.parametrize("registry_url", REGISTRIES, indirect=True)
def test_nat_stopcomm_withdraws_at_once(registry_url: str, two_forwarders, monkeypatch) -> None:
    url = registry_url
    values = {f.server_value for f in two_forwarders}
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    assert fastnat.settings.get_settings().announce_ttl == 180.0

    # one forwarder, two ports: the announcement goes with the last port
    h80 = fastnat.nat_waitforconn("leaver", 80, echo)
    h81 = fastnat.nat_waitforconn("leaver", 81, echo)
    (entry,) = server_entries(url, "leaver")
    assert entry in values
    assert fastnat.nat_stopcomm(h80)
    assert server_entries(url, "leaver") == {entry}
    assert seed_echo("leaver", 81, b"81 still")[0] == b"81 still"
    assert fastnat.nat_stopcomm(h81)
    assert server_entries(url, "leaver") == set()  # no wait
    assert not fastnat.nat_stopcomm(h81)  # harmless again

    # redundancy=2: both announcements go
    handle = fastnat.nat_waitforconn("leaver2", 80, echo, redundancy=2)
    assert server_entries(url, "leaver2") == values
    fastnat.nat_stopcomm(handle)
    assert server_entries(url, "leaver2") == set()
    with pytest.raises(fastnat.errors.ServerNotFoundError):
        fastnat.nat_openconn("leaver2", 80)


@pytest.mark.parametrize("registry_url", REGISTRIES, indirect=True)
def test_aio_close_withdraws_at_once(registry_url: str, two_forwarders, monkeypatch) -> None:
    url = registry_url
    values = {f.server_value for f in two_forwarders}
    monkeypatch.setenv("FASTNAT_REGISTRY", url)

    async def main() -> None:
        registry = open_registry(url)
        key = SERVER_KEY_PREFIX + "aio-leaver"

        async def handle(reader, writer) -> None:
            writer.write(await reader.read())
            writer.close()

        try:
            server = await aio.start_server(handle, "aio-leaver", 80, redundancy=2)
            try:
                assert set(await registry.lookup(key)) == values
                assert (await aio_echo("aio-leaver", 80, b"x"))[0] == b"x"
            finally:
                server.close()
                await server.wait_closed()
            assert await registry.lookup(key) == []  # no wait
        finally:
            await registry.close()
            await close_loop_registries()

    run_aio(main)


@pytest.mark.parametrize("api", ["seed", "aio"])
@pytest.mark.parametrize("registry_url", [pytest.param("service", id="service")], indirect=True)
def test_server_process_stopped_withdraws(fleet, registry_url: str, two_forwarders, api: str) -> None:
    """SIGTERM makes server_proc.py call nat_stopcomm / close(): its entry is
    gone by the time it has exited (default TTL 180 s in that process)."""
    server = fleet.server("proc-leaver", registry_url, "--api", api, "--redundancy", "2")
    assert server_entries(registry_url, "proc-leaver") == {f.server_value for f in two_forwarders}
    assert server.stop() == 0
    assert server.events[-1]["event"] == "stopped"
    assert server_entries(registry_url, "proc-leaver") == set()


@pytest.mark.parametrize("case", ["missing-link", "lost-link"])
def test_stop_leaves_no_reconnecting_task(fleet, monkeypatch, case: str) -> None:
    """``nat_stopcomm`` stops everything of the registration, including a
    supervisor waiting to make a link again: the link that ``redundancy=2``
    could not make (one forwarder only), or the link lost when its forwarder
    died. Nothing of it is left on fastnat's loop once it returns (with the
    default settings such a task would sleep up to 45 s: 30 s, +50% jitter)."""
    from nat.conftest import background_tasks

    url = fleet.registry().url
    fwd = fleet.forwarder("--registry", url)
    wait_until(lambda: forwarders_listed(url) == {fwd.advertisement}, 5, "the forwarder advertised")
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    # a supervisor sleeps 1.5 to 4.5 s before each new try
    fastnat.configure(reconnect_initial_delay=3.0)
    handle = fastnat.nat_waitforconn("half", 80, echo, redundancy=2 if case == "missing-link" else 1)
    assert handle.registration.forwarder_addresses == [fwd.address]
    if case == "lost-link":
        fwd.kill()
        # its supervisor has dropped the link and withdrawn its entry: it now waits to reconnect
        wait_until(lambda: not handle.registration.links and not server_entries(url, "half"), 3, "the link dropped")
    fastnat.nat_stopcomm(handle)
    assert server_entries(url, "half") == set()
    deadline = time.monotonic() + 1.0
    while background_tasks() and time.monotonic() < deadline:
        time.sleep(0.02)
    left = background_tasks()
    if left:
        pytest.fail(f"nat_stopcomm returned, and 1 s later fastnat's loop still runs {left}", pytrace=False)

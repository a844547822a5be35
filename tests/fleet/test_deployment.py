"""One forwarder, with the registry it hosts on its own port, is a complete
deployment: ``FASTNAT_REGISTRY=fastnat://<forwarder>`` is all a server and a
client need; neither names a forwarder.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import fastnat
from fastnat import aio, locate
from fastnat.blocking import loop_thread

from .support import aio_echo, forwarders_listed, run_aio, seed_echo, server_entries, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("server_api", ["seed", "aio"])
def test_single_forwarder_embedded_registry(nat_engine: str, fleet, monkeypatch, server_api: str) -> None:
    fwd = fleet.forwarder(plain=True)  # `python -m fastnat forwarder`, nothing else
    url = fwd.url
    # it advertises itself in the registry it hosts
    wait_until(lambda: forwarders_listed(url) == {fwd.advertisement}, 5, f"{fwd} advertised in its own registry")

    # a server in its own process, with nothing but the registry URL
    server = fleet.server("solo", url, "--api", server_api)
    assert server.forwarders() == [fwd.address]
    assert server.events[0]["engine"] == nat_engine
    assert server_entries(url, "solo") == {fwd.server_value}  # __NAT_SRV__solo -> ip*clientport

    # clients with nothing but the registry URL
    monkeypatch.setenv("FASTNAT_REGISTRY", url)
    assert seed_echo("solo", 80, b"hello from the seed API") == (b"hello from the seed API", fwd.port)
    assert locate.cached_forwarders("solo") == [fwd.address]
    assert run_aio(lambda: aio_echo("solo", 80, b"hello from asyncio")) == (b"hello from asyncio", fwd.port)

    # an unknown id is an error naming the registry, at once
    with pytest.raises(fastnat.errors.ServerNotFoundError, match="nobody"):
        fastnat.nat_openconn("nobody", 80)


def test_single_forwarder_configured_in_process(nat_engine: str, fleet) -> None:
    """The same with ``fastnat.configure(registry=...)``, server and clients in this process."""
    fwd = fleet.forwarder(plain=True)
    wait_until(lambda: forwarders_listed(fwd.url) == {fwd.advertisement}, 5, f"{fwd} advertised")
    fastnat.configure(registry=fwd.url)

    def echo(ip, port, sock, this, listen) -> None:
        with sock:
            while data := sock.recv(65536):
                sock.sendall(data)

    handle = fastnat.nat_waitforconn("inproc", 80, echo)
    try:
        assert handle.registration.forwarder_addresses == [fwd.address]
        assert server_entries(fwd.url, "inproc") == {fwd.server_value}
        assert seed_echo("inproc", 80, b"seed") == (b"seed", fwd.port)
        assert run_aio(lambda: aio_echo("inproc", 80, b"aio")) == (b"aio", fwd.port)
    finally:
        fastnat.nat_stopcomm(handle)

    async def aio_server_and_client() -> tuple[bytes, int]:
        async def handle_client(reader: asyncio.StreamReader, writer) -> None:
            writer.write(await reader.read())
            await writer.drain()
            writer.close()

        server = await aio.start_server(handle_client, "inproc-aio", 80)
        try:
            assert server.registration.forwarder_addresses == [fwd.address]
            return await aio_echo("inproc-aio", 80, b"all asyncio")
        finally:
            server.close()
            await server.wait_closed()

    assert run_aio(aio_server_and_client) == (b"all asyncio", fwd.port)


def test_aio_loop_leaves_no_registry_connection(fleet, monkeypatch) -> None:
    """An asyncio program that finds a server through the registry and ends
    its loop leaves nothing open: ``asyncio.run(main())`` three times must
    not leave three registry connections behind."""
    import gc

    from nat.conftest import _open_fds

    fwd = fleet.forwarder(plain=True)
    wait_until(lambda: forwarders_listed(fwd.url) == {fwd.advertisement}, 5, f"{fwd} advertised")
    fleet.server("leaky", fwd.url, "--api", "aio")
    monkeypatch.setenv("FASTNAT_REGISTRY", fwd.url)
    before = _open_fds()
    try:
        for n in range(3):
            assert asyncio.run(aio_echo("leaky", 80, b"run %d" % n)) == (b"run %d" % n, fwd.port)
        gc.collect()

        def leaked() -> dict[int, str]:
            return {fd: target for fd, target in _open_fds().items() if before.get(fd) != target}

        deadline = time.monotonic() + 2.0
        while leaked() and time.monotonic() < deadline:
            time.sleep(0.02)
        if leaked():
            left = [loop for loop in locate._registries if loop is not loop_thread.get_loop()]
            pytest.fail(
                f"after 3 runs of asyncio.run(open_connection(...)) with FASTNAT_REGISTRY set, "
                f"{len(leaked())} descriptors stay open ({leaked()}) and fastnat.locate._registries "
                f"holds {len(left)} registry clients of loops that have ended: nothing closes them",
                pytrace=False,
            )
    finally:
        # free what the program above could not (the transports close their sockets when collected)
        for loop in [loop for loop in locate._registries if loop is not loop_thread.get_loop()]:
            del locate._registries[loop]
        gc.collect()


def test_server_naming_only_the_forwarder_is_listed_in_its_registry(nat_engine: str, fleet, monkeypatch) -> None:
    """A server that names a forwarder and no registry can still be found
    through that forwarder's registry: the forwarder lists the ids it holds
    (and unlists them when they leave)."""
    fwd = fleet.forwarder(plain=True)
    monkeypatch.delenv("FASTNAT_REGISTRY", raising=False)
    fastnat.configure(registry=None)

    def echo(ip, port, sock, this, listen) -> None:
        with sock:
            while data := sock.recv(65536):
                sock.sendall(data)

    handle = fastnat.nat_waitforconn("direct", 80, echo, forwarderIP=fwd.host, forwarderPort=fwd.port)
    try:
        assert handle.registration.forwarder_addresses == [fwd.address]
        wait_until(lambda: server_entries(fwd.url, "direct") == {fwd.server_value}, 5, "the id listed by its forwarder")
        monkeypatch.setenv("FASTNAT_REGISTRY", fwd.url)
        assert seed_echo("direct", 80, b"found") == (b"found", fwd.port)
    finally:
        fastnat.nat_stopcomm(handle)
    wait_until(lambda: server_entries(fwd.url, "direct") == set(), 5, "the id unlisted when it left")


def test_a_forwarder_with_a_secret_guards_its_registry(nat_engine: str, fleet) -> None:
    """``fastnat forwarder --secret``: servers that know the secret register and
    announce as before; anyone else can look entries up but can neither
    withdraw a server's entry nor advertise a forwarder of their own (which
    would draw servers and clients to it)."""
    from fastnat.discovery.service import ServiceRegistry
    from fastnat.errors import AuthenticationError
    from fastnat.settings import FORWARDER_KEY, SERVER_KEY_PREFIX

    fwd = fleet.forwarder("--secret", "fleet-s3cret", plain=True)
    wait_until(lambda: forwarders_listed(fwd.url) == {fwd.advertisement}, 5, f"{fwd} advertised")
    fleet.server("guarded", fwd.url, settings={"secret": "fleet-s3cret"})
    assert server_entries(fwd.url, "guarded") == {fwd.server_value}

    async def attack() -> list[str]:
        rogue = ServiceRegistry(fwd.url)
        refused = []
        try:
            for write in (
                rogue.withdraw(SERVER_KEY_PREFIX + "guarded", fwd.server_value),
                rogue.announce(FORWARDER_KEY, "127.0.0.1*9*9", 60),
                rogue.announce(SERVER_KEY_PREFIX + "guarded", "127.0.0.1*9", 60),
            ):
                try:
                    await write
                except AuthenticationError as exc:
                    refused.append(str(exc))
        finally:
            await rogue.close()
        return refused

    assert len(run_aio(attack)) == 3
    assert server_entries(fwd.url, "guarded") == {fwd.server_value}
    assert forwarders_listed(fwd.url) == {fwd.advertisement}

"""A registry with a secret: announce and withdraw must prove it; lookups stay open.

Real registry services on loopback, real connections (the client and raw
ones that send exactly the bytes an attacker would).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from fastnat.discovery.service import RegistryServer, RegistryService, ServiceRegistry
from fastnat.errors import AuthenticationError
from fastnat.protocol import HelloStatus, Status, registry_write_proof
from fastnat.settings import FORWARDER_KEY, SERVER_KEY_PREFIX

from .support import LOOPBACK, RawConnection, run_async

SECRET = b"registry-s3cret"


def serve_with(body, **service_options) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with RegistryServer(LOOPBACK, 0, RegistryService(**service_options)) as server:
            await body(server)

    run_async(main())


def test_writes_need_the_secret_and_lookups_do_not(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fastnat.discovery.service")

    async def body(server: RegistryServer) -> None:
        owner = ServiceRegistry(server.url, secret=SECRET)
        stranger = ServiceRegistry(server.url)  # no secret here (and none configured)
        liar = ServiceRegistry(server.url, secret=b"guess")
        try:
            await owner.announce("k", "v", 30)
            assert await stranger.lookup("k") == ["v"]
            with pytest.raises(AuthenticationError, match="no secret is configured here"):
                await stranger.announce("k", "forged", 30)
            with pytest.raises(AuthenticationError, match="not the registry's"):
                await liar.withdraw("k", "v")
            with pytest.raises(AuthenticationError):
                await liar.announce(FORWARDER_KEY, "6.6.6.6*1*1", 30)
            # the refusals changed nothing, and the connections stay usable
            assert await stranger.lookup("k") == ["v"]
            assert await liar.lookup(FORWARDER_KEY) == []
            await owner.withdraw("k", "v")
            assert await stranger.lookup("k") == []
            assert server.service.counters["auth_failed"] == 3
        finally:
            for client in (owner, stranger, liar):
                await client.close()

    serve_with(body, secret=SECRET)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3 and all("wrong or missing proof" in line for line in refused), refused


def test_a_proof_is_bound_to_its_connection_and_its_request() -> None:
    """A proof captured on one connection is useless on another, and a proof
    to announce cannot withdraw."""

    async def body(server: RegistryServer) -> None:
        first = await RawConnection.open(server.port)
        second = await RawConnection.open(server.port)
        try:
            nonce = (await first.hello_reply()).nonce
            assert (await second.hello_reply()).status == HelloStatus.OK
            announce = registry_write_proof(SECRET, nonce, "announce", "k", "v")
            second.send({"id": 1, "request": "announce", "value": {"key": "k", "value": "v", "ttl": 30, "proof": announce}})
            assert (await second.reply())["status"] == Status.AUTH_FAILED
            first.send({"id": 2, "request": "announce", "value": {"key": "k", "value": "v", "ttl": 30, "proof": announce}})
            assert await first.reply() == {"id": 2, "status": "OK", "value": None}
            first.send({"id": 3, "request": "withdraw", "value": {"key": "k", "value": "v", "proof": announce}})
            assert (await first.reply())["status"] == Status.AUTH_FAILED
            first.send({"id": 4, "request": "lookup", "value": {"key": "k", "max_values": 5}})
            assert await first.reply() == {"id": 4, "status": "OK", "value": ["v"]}
        finally:
            await first.close()
            await second.close()

    serve_with(body, secret=SECRET)


def test_per_id_secrets_guard_their_own_keys() -> None:
    """With per-id secrets, ``__NAT_SRV__<id>`` takes that id's secret (and not
    the shared one); other keys take the shared secret."""

    async def body(server: RegistryServer) -> None:
        alice = ServiceRegistry(server.url, secret=b"alice-key")
        shared = ServiceRegistry(server.url, secret=SECRET)
        try:
            await alice.announce(SERVER_KEY_PREFIX + "alice", "1.2.3.4*5", 30)
            with pytest.raises(AuthenticationError):
                await shared.withdraw(SERVER_KEY_PREFIX + "alice", "1.2.3.4*5")
            with pytest.raises(AuthenticationError):
                await alice.announce(SERVER_KEY_PREFIX + "bob", "1.2.3.4*5", 30)
            with pytest.raises(AuthenticationError):
                await alice.announce(FORWARDER_KEY, "1.2.3.4*5*5", 30)
            await shared.announce(FORWARDER_KEY, "1.2.3.4*5*5", 30)
            await shared.announce(SERVER_KEY_PREFIX + "bob", "1.2.3.4*5", 30)  # bob has no own secret
            assert await shared.lookup(SERVER_KEY_PREFIX + "alice") == ["1.2.3.4*5"]
        finally:
            await alice.close()
            await shared.close()

    serve_with(body, secret=SECRET, secrets={"alice": b"alice-key"})


def test_per_id_secrets_alone_close_the_other_keys() -> None:
    """Per-id secrets and no shared one: keys without a secret cannot be written."""

    async def body(server: RegistryServer) -> None:
        alice = ServiceRegistry(server.url, secret=b"alice-key")
        try:
            await alice.announce(SERVER_KEY_PREFIX + "alice", "1.2.3.4*5", 30)
            with pytest.raises(AuthenticationError):
                await alice.announce(FORWARDER_KEY, "1.2.3.4*5*5", 30)
        finally:
            await alice.close()

    serve_with(body, secrets={"alice": b"alice-key"})


def test_the_process_secret_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client given no secret proves the process's (FASTNAT_SECRET), and a
    client of a registry without a secret sends proofs that are ignored."""
    monkeypatch.setenv("FASTNAT_SECRET", SECRET.decode())

    async def body(server: RegistryServer) -> None:
        client = ServiceRegistry(server.url)
        try:
            await client.announce("k", "v", 30)
            await client.withdraw("k", "v")
            assert await client.lookup("k") == []
        finally:
            await client.close()

    serve_with(body, secret=SECRET)
    serve_with(body)


@pytest.mark.parametrize("status", [HelloStatus.BUSY, HelloStatus.IP_CONNECTIONS, HelloStatus.IP_HANDSHAKES])
def test_a_registry_at_a_limit_is_unavailable(status: int) -> None:
    """Whatever limit a registry (or the forwarder hosting it) answers the
    hello with, the client says the registry is unavailable, naming it once
    (found by fuzz/fuzz_registry.py: a forwarder's own limit used to come out
    with the registry named twice)."""
    from fastnat.errors import RegistryUnavailableError
    from fastnat.protocol import NONCE_SIZE, encode_hello_reply

    async def main() -> None:
        async def refuse(reader, writer) -> None:  # type: ignore[no-untyped-def]
            writer.write(encode_hello_reply(status, 0, bytes(NONCE_SIZE)))
            writer.close()

        server = await asyncio.start_server(refuse, LOOPBACK, 0)
        url = f"fastnat://{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
        client = ServiceRegistry(url)
        try:
            with pytest.raises(RegistryUnavailableError) as info:
                await client.lookup("k")
            assert str(info.value).count("registry fastnat://") == 1, info.value
            assert "limit" in str(info.value), info.value
        finally:
            await client.close()
            server.close()
            await server.wait_closed()

    run_async(main())

"""Relayed transfers through a forwarder that serves TLS, for both engines:
the blocking NAT API (SSLSocket client, uvloop background loop), the asyncio
API (asyncio's own loop), and the registry the forwarder hosts on its TLS
port (``fastnats://``)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import pytest
from nat.support import ForwarderProcess

import fastnat
from fastnat.aio import open_connection, start_server
from fastnat.discovery import open_registry
from fastnat.errors import NATLayerError
from fastnat.tls import client_context

from .support import hash_handler, hash_stream, payload, send_and_check


def test_blocking_transfer_through_a_tls_forwarder(nat_engine: str, forwarders: Callable[..., ForwarderProcess], tls_files) -> None:
    fwd = forwarders(*tls_files.forwarder_args())
    handle = fastnat.nat_waitforconn("tls-srv", 80, hash_handler, fwd.host, fwd.port, ssl=tls_files.ca)
    try:
        sock = fastnat.nat_openconn("tls-srv", 80, forwarderIP=fwd.host, forwarderPort=fwd.port, ssl=tls_files.ca)
        with sock:
            assert isinstance(sock, ssl.SSLSocket)
            assert sock.version() in ("TLSv1.2", "TLSv1.3")
            send_and_check(sock)
    finally:
        fastnat.nat_stopcomm(handle)


def test_asyncio_transfer_through_a_tls_forwarder(nat_engine: str, forwarders: Callable[..., ForwarderProcess], tls_files) -> None:
    fwd = forwarders(*tls_files.forwarder_args())
    context = client_context(tls_files.ca)

    async def main() -> None:
        server = await start_server(hash_stream, "tls-aio", 81, forwarder=fwd.address, ssl=context, persist=False)
        async with server:
            reader, writer = await open_connection("tls-aio", 81, forwarder=fwd.address, ssl=tls_files.ca)
            assert writer.get_extra_info("ssl_object") is not None
            data, expected = payload()
            writer.write(data)
            assert await asyncio.wait_for(reader.readexactly(32), 20) == expected
            assert await asyncio.wait_for(reader.read(1), 10) == b""
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())


def test_registration_and_lookup_through_the_tls_hosted_registry(
    nat_engine: str, forwarders: Callable[..., ForwarderProcess], tls_files
) -> None:
    """No forwarder is named: the server finds one in the registry the
    forwarder hosts on its TLS port, announces itself there, and the client
    looks it up there; configure(tls=CA) is the default of every link."""
    fwd = forwarders(*tls_files.forwarder_args())
    url = f"fastnats://{fwd.host}:{fwd.port}"
    fastnat.configure(registry=url, tls=tls_files.ca)
    handle = fastnat.nat_waitforconn("tls-reg", 82, hash_handler)
    try:
        with fastnat.nat_openconn("tls-reg", 82) as sock:
            assert isinstance(sock, ssl.SSLSocket)
            send_and_check(sock)

        async def look() -> list[str]:
            registry = open_registry(url)
            try:
                return await registry.lookup("__NAT_SRV__tls-reg")
            finally:
                await registry.close()

        assert asyncio.run(look()) == [f"{fwd.host}*{fwd.port}"]
    finally:
        fastnat.nat_stopcomm(handle)


@pytest.mark.parametrize("how", ["configure", "env"])
def test_the_default_comes_from_configure_or_the_environment(
    how: str, forwarders: Callable[..., ForwarderProcess], tls_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    fwd = forwarders(*tls_files.forwarder_args())
    if how == "configure":
        fastnat.configure(tls=tls_files.ca)
    else:
        monkeypatch.setenv("FASTNAT_TLS_CA", tls_files.ca)
    assert fastnat.getmy_external_ip(fwd.host, fwd.port) == "127.0.0.1"
    # ssl=False is plain TCP whatever the default: the TLS forwarder says no.
    with pytest.raises(NATLayerError, match="closed during the hello"):
        fastnat.getmy_external_ip(fwd.host, fwd.port, ssl=False)

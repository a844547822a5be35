"""What goes wrong with TLS says what went wrong, soon, on both sides: the
caller gets an error naming the cause, the forwarder logs one line and goes
on serving everyone else."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Callable

import pytest
from nat.support import ForwarderProcess, recv_until_eof

import fastnat
from fastnat.aio import external_address
from fastnat.errors import NATLayerError

# Every failure here is reported well within this (the client's timeout is
# 5 s; none of them should wait for it).
REPORTED_WITHIN = 4.0


def _ask(api: str, fwd: ForwarderProcess, tls: object) -> str:
    if api == "blocking":
        return fastnat.getmy_external_ip(fwd.host, fwd.port, ssl=tls)
    return asyncio.run(external_address(fwd.address, ssl=tls))[0]


CASES = [
    # (id, forwarder serves, client trusts, error pattern, forwarder log pattern)
    ("plain-client-to-tls-forwarder", "cert", False,
     r"closed during the hello \(if the forwarder serves TLS", r"TLS handshake failed: .*\(a client without TLS\?\)"),
    ("tls-client-to-plain-forwarder", None, "ca",
     r"closed during the TLS handshake \(does the forwarder serve TLS\?\)", r"a TLS handshake: this forwarder does not serve TLS"),
    ("unknown-ca", "cert", "other_ca",
     r"TLS certificate verification failed: unable to get local issuer certificate", r"TLS handshake failed"),
    ("hostname-mismatch", "wrong_name", "ca",
     r"TLS certificate verification failed: IP address mismatch, certificate is not valid for '127\.0\.0\.1'", r"TLS handshake failed"),
]


@pytest.mark.parametrize("api", ["blocking", "asyncio"])
@pytest.mark.parametrize(("serves", "trusts", "error", "logged"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_tls_failure_is_named_and_the_forwarder_goes_on(
    api: str, serves: str | None, trusts: object, error: str, logged: str,
    forwarders: Callable[..., ForwarderProcess], tls_files,
) -> None:
    args = {
        None: [],
        "cert": tls_files.forwarder_args(),
        "wrong_name": ["--tls-cert", tls_files.wrong_name_cert, "--tls-key", tls_files.wrong_name_key],
    }[serves]
    fwd = forwarders(*args)
    tls = getattr(tls_files, trusts) if isinstance(trusts, str) else trusts
    started = time.monotonic()
    with pytest.raises(NATLayerError, match=error) as caught:
        _ask(api, fwd, tls)
    assert time.monotonic() - started < REPORTED_WITHIN
    assert f"forwarder {fwd.address}" in str(caught.value)
    lines = fwd.wait_log(r"closing connection from", 5.0)
    time.sleep(0.2)  # a second line would come now
    lines = [line for line in fwd.log_lines() if "closing connection from" in line]
    assert len(lines) == 1 and " WARNING " in lines[0], lines
    assert re.search(logged, lines[0]), lines[0]
    # The forwarder serves the next caller that does it right.
    right = tls_files.ca if serves == "cert" else False
    if serves != "wrong_name":
        assert _ask(api, fwd, right) == "127.0.0.1"
    assert fwd.alive()


def test_a_client_that_never_starts_tls_is_dropped_at_the_handshake_timeout(
    forwarders: Callable[..., ForwarderProcess], tls_files
) -> None:
    fwd = forwarders("--handshake-timeout", "1", *tls_files.forwarder_args())
    with socket.create_connection(fwd.tuple, timeout=10) as sock:
        peer = sock.getsockname()
        started = time.monotonic()
        assert recv_until_eof(sock) == b""
        elapsed = time.monotonic() - started
    assert 0.8 < elapsed < 3.0, f"closed after {elapsed:.2f} s"
    lines = fwd.wait_log(rf"closing connection from {peer[0]}:{peer[1]}: no handshake within 1 s")
    assert len(lines) == 1
    assert _ask("blocking", fwd, tls_files.ca) == "127.0.0.1"


def test_a_server_that_does_not_trust_the_forwarder_fails_to_register(
    forwarders: Callable[..., ForwarderProcess], tls_files
) -> None:
    fwd = forwarders(*tls_files.forwarder_args())
    with pytest.raises(NATLayerError, match=r"TLS certificate verification failed"):
        fastnat.nat_waitforconn("tls-untrusting", 80, lambda *a: None, fwd.host, fwd.port, persist=False, ssl=tls_files.other_ca)

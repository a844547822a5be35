"""The command line with TLS: a forwarder with --tls-cert/--tls-key, expose
and connect with --tls-ca through the registry it hosts (fastnats://), and
one-line errors for what a user can get wrong."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable

import pytest
from tls.support import hash_conn, send_and_check

from .support import (
    FASTNAT,
    LISTEN_READY,
    LOOPBACK,
    RUN_TIMEOUT,
    Processes,
    Service,
    assert_user_error,
    clean_env,
    connected,
    free_port,
    run,
)


def test_expose_and_connect_through_a_tls_forwarder(procs: Processes, services: Callable[..., Service], tls_files) -> None:
    _, fwd_port = procs.forwarder(*tls_files.forwarder_args())
    env = clean_env(FASTNAT_REGISTRY=f"fastnats://{LOOPBACK}:{fwd_port}")
    service = services(hash_conn)
    procs.expose("tls-web", 80, service.address, fwd_port, "--tls-ca", tls_files.ca, env=env)
    tunnel = procs.start(["connect", "tls-web", "80", "--listen", f"{LOOPBACK}:{free_port()}", "--tls-ca", tls_files.ca], env)
    found = tunnel.wait_line(LISTEN_READY)
    with connected((found.group(1), int(found.group(2)))) as conn:
        send_and_check(conn)
    # netcat mode (nat_openconn, an SSLSocket): stdin's end is not a half-close over TLS.
    result = subprocess.run([*FASTNAT, "connect", "tls-web", "80", "--tls-ca", tls_files.ca], env=env,
                            input=bytes(8), capture_output=True, timeout=RUN_TIMEOUT, check=False)
    assert (result.returncode, result.stdout) == (0, hashlib.sha256().digest()), result  # a payload of 0 bytes
    status = run(["status", "--json", "--forwarder", f"{LOOPBACK}:{fwd_port}", "--tls-ca", tls_files.ca])
    assert status.returncode == 0, status
    assert '"clients_total": 2' in status.stdout
    assert not service.errors


def test_status_without_tls_at_a_tls_forwarder_says_so(procs: Processes, tls_files) -> None:
    _, fwd_port = procs.forwarder(*tls_files.forwarder_args())
    assert_user_error(run(["status", "--forwarder", f"{LOOPBACK}:{fwd_port}"]), "serves TLS", "--tls-ca")
    assert_user_error(
        run(["status", "--forwarder", f"{LOOPBACK}:{fwd_port}", "--tls-ca", tls_files.other_ca]),
        "certificate verification failed",
    )


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["forwarder", "--tls-cert", "{cert}"], ["--tls-cert needs --tls-key"]),
        (["forwarder", "--tls-key", "{key}"], ["--tls-key needs --tls-cert"]),
        (["forwarder", "--tls-cert", "{cert}", "--tls-key", "{wrong_name_key}"], ["does not belong to the certificate"]),
        (["forwarder", "--tls-cert", "{missing}", "--tls-key", "{key}"], ["cannot read the TLS certificate file"]),
        (["forwarder", "--tls-cert", "{ca_dir}", "--tls-key", "{key}"], ["cannot load the TLS certificate"]),
        (["registry", "--tls-cert", "{cert}", "--tls-key", "{missing}"], ["cannot read the TLS key file"]),
        (["status", "--forwarder", "127.0.0.1:1", "--tls-ca", "{missing}"], ["cannot read the TLS CA file"]),
        (["connect", "x", "80", "--forwarder", "127.0.0.1:1", "--tls-ca", "{key}"], ["cannot load the TLS CA file"]),
    ],
    ids=["cert-without-key", "key-without-cert", "mismatched-key", "missing-cert", "cert-is-a-directory",
         "registry-missing-key", "missing-ca", "ca-not-a-certificate"],
)
def test_tls_mistakes_are_one_line(args: list[str], needles: list[str], tls_files, tmp_path) -> None:
    names = {**vars(tls_files), "missing": str(tmp_path / "missing.pem"), "ca_dir": str(tmp_path)}
    argv = [a.format(**names) for a in args]
    if argv[0] in ("forwarder", "registry"):
        argv += ["--host", LOOPBACK, "--port", "0"]
    result = run(argv, timeout=20)
    assert_user_error(result, *needles)


def test_a_mistake_in_the_environment_is_one_line(tls_files) -> None:
    result = run(["status", "--forwarder", "127.0.0.1:1"], env=clean_env(FASTNAT_TLS="maybe"))
    assert_user_error(result, "FASTNAT_TLS must be 1 or 0")

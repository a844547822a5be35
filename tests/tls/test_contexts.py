"""fastnat.tls: what a caller gives becomes one context (or plain TCP), and
certificate files that cannot be used fail at once with a message naming them."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

import fastnat
from fastnat.forwarder import Forwarder
from fastnat.tls import TLSConfigError, client_context, client_tls, server_context


def test_a_client_context_verifies_the_certificate_and_the_name(tls_files) -> None:
    context = client_tls(tls_files.ca)
    assert context is client_context(tls_files.ca)  # loaded once, shared
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    system = client_tls(True)
    assert system is not None and system is not context and system.verify_mode == ssl.CERT_REQUIRED
    mine = ssl.create_default_context()
    assert client_tls(mine) is mine
    assert client_tls(False) is None


def test_the_default_is_configure_then_the_environment(tls_files, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTNAT_TLS_CA", raising=False)
    monkeypatch.delenv("FASTNAT_TLS", raising=False)
    assert client_tls(None) is None  # plain TCP unless something says TLS
    monkeypatch.setenv("FASTNAT_TLS", "1")
    assert client_tls(None) is client_context()
    monkeypatch.setenv("FASTNAT_TLS_CA", tls_files.ca)
    assert client_tls(None) is client_context(tls_files.ca)
    fastnat.configure(tls=False)
    assert client_tls(None) is None  # configure() beats the environment
    fastnat.configure(tls=tls_files.other_ca)
    assert client_tls(None) is client_context(tls_files.other_ca)


def test_bad_input_fails_at_once_and_says_what(tls_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(TLSConfigError, match="cannot read the TLS CA file .*missing.pem"):
        fastnat.configure(tls=missing)
    with pytest.raises(TLSConfigError, match="cannot load the TLS CA file"):
        client_tls(tls_files.key)
    with pytest.raises(TypeError, match="ssl must be"):
        client_tls(42)
    monkeypatch.setenv("FASTNAT_TLS", "maybe")
    with pytest.raises(TLSConfigError, match="FASTNAT_TLS must be 1 or 0"):
        client_tls(None)
    with pytest.raises(TLSConfigError, match="does not belong to the certificate"):
        server_context(tls_files.cert, tls_files.wrong_name_key)
    with pytest.raises(TLSConfigError, match="cannot read the TLS key file"):
        server_context(tls_files.cert, missing)
    with pytest.raises(TypeError, match="server ssl.SSLContext"):
        Forwarder("127.0.0.1", 0, ssl=tls_files.ca)
    assert server_context(tls_files.cert, tls_files.key).minimum_version >= ssl.TLSVersion.TLSv1_2

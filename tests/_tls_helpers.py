"""Certificates for the TLS tests, made by a throwaway CA (``trustme``).

``tls_files`` (a session fixture) writes them once per run: the CA, a
certificate for 127.0.0.1 and localhost signed by it, another CA that signs
nothing of ours, and a certificate for a name no test dials.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from discovery.support import skip_or_fail


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    ca: str  # the CA that signed cert
    cert: str  # for 127.0.0.1 and localhost
    key: str
    other_ca: str  # a CA that signed nothing here
    wrong_name_cert: str  # signed by ca, for forwarder.example only
    wrong_name_key: str

    def forwarder_args(self) -> list[str]:
        return ["--tls-cert", self.cert, "--tls-key", self.key]


def make_tls_files(directory: Path) -> TLSFiles:
    try:
        import trustme
    except ImportError:
        skip_or_fail("the TLS tests need the trustme package (pip install 'fastnat[test]')")
    ca, other = trustme.CA(), trustme.CA()
    good = ca.issue_cert("127.0.0.1", "localhost")
    wrong = ca.issue_cert("forwarder.example")
    paths = {name: directory / f"{name}.pem" for name in ("ca", "cert", "key", "other_ca", "wrong_cert", "wrong_key")}
    ca.cert_pem.write_to_path(paths["ca"])
    other.cert_pem.write_to_path(paths["other_ca"])
    good.private_key_pem.write_to_path(paths["key"])
    wrong.private_key_pem.write_to_path(paths["wrong_key"])
    for cert, name in ((good, "cert"), (wrong, "wrong_cert")):
        paths[name].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return TLSFiles(
        ca=str(paths["ca"]), cert=str(paths["cert"]), key=str(paths["key"]), other_ca=str(paths["other_ca"]),
        wrong_name_cert=str(paths["wrong_cert"]), wrong_name_key=str(paths["wrong_key"]),
    )


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSFiles]:
    yield make_tls_files(tmp_path_factory.mktemp("tls"))

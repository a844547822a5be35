"""Fixtures of the TLS tests: the NAT layer's (forwarder processes, both
engines, leak checks), plus certificates made for the run (``tls_files``).
The command line's TLS tests are in tests/cli/test_tls.py."""

from __future__ import annotations

from _tls_helpers import tls_files  # noqa: F401 - a fixture
from nat.conftest import _no_leaks, _warm_up, forwarders, nat_engine  # noqa: F401 - fixtures

"""The ``e2e`` marker, and the real-NAT world its tests run in."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end test in real network namespaces with NAT routers (needs root, ip and iptables; "
        "skips without them, fails instead when $CI is set)",
    )

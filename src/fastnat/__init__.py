"""fastnat: reach TCP servers behind NATs and firewalls through relays.

The Seattle NAT layer's functions (blocking) are importable from here;
the asyncio API is :mod:`fastnat.aio`; the relay is
:class:`fastnat.forwarder.Forwarder`.
"""

from __future__ import annotations

try:
    from fastnat._version import version as __version__
except ImportError:  # a source tree that was never built
    __version__ = "0.0.0+unknown"

from fastnat import errors
from fastnat.natlayer import (
    behind_nat,
    getmy_external_ip,
    nat_check_bi_directional,
    nat_getmyid,
    nat_openconn,
    nat_stopcomm,
    nat_waitforconn,
    nat_waitforconn_alive,
)
from fastnat.settings import configure

__all__ = [
    "__version__",
    "configure",
    "errors",
    "nat_openconn",
    "nat_waitforconn",
    "nat_stopcomm",
    "nat_waitforconn_alive",
    "nat_check_bi_directional",
    "getmy_external_ip",
    "behind_nat",
    "nat_getmyid",
]

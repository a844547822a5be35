"""fastnat: reach TCP servers behind NATs and firewalls through relays."""

from __future__ import annotations

try:
    from fastnat._version import version as __version__
except ImportError:  # a source tree that was never built
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]

"""Event loops that fastnat creates itself use uvloop when it is installed.

An application that runs its own loop keeps it: fastnat works on whatever loop
is running. Only where fastnat makes the loop (the blocking API's background
thread, the command line, :func:`run`) does it pick uvloop, unless
``FASTNAT_NO_UVLOOP`` is set.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["new_event_loop", "run", "uvloop_available"]

T = TypeVar("T")


def uvloop_available() -> bool:
    """True when uvloop is importable and not disabled by ``FASTNAT_NO_UVLOOP``."""
    if os.environ.get("FASTNAT_NO_UVLOOP", "") not in ("", "0"):
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when available, else asyncio's default."""
    if uvloop_available():
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Like :func:`asyncio.run`, on a loop from :func:`new_event_loop`; the
    registry clients the program used are closed before the loop ends."""

    async def main_then_close() -> T:
        from fastnat.locate import close_registries

        try:
            return await main
        finally:
            await close_registries()

    with asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
        return runner.run(main_then_close())

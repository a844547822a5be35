"""Which multiplexer engine this process uses: compiled or pure Python.

The compiled extension ``fastnat._mux`` is used unless it is missing, the
interpreter is not CPython, or ``FASTNAT_NO_EXTENSIONS`` is set (to anything
but ``""`` or ``"0"``) when fastnat is first imported.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

__all__ = ["NO_EXTENSIONS_ENV", "compiled_module", "fallback_reason"]

NO_EXTENSIONS_ENV = "FASTNAT_NO_EXTENSIONS"


def _choose() -> tuple[ModuleType | None, str | None]:
    if os.environ.get(NO_EXTENSIONS_ENV, "") not in ("", "0"):
        return None, f"{NO_EXTENSIONS_ENV} is set"
    if sys.implementation.name != "cpython":
        return None, f"the interpreter is {sys.implementation.name}, not CPython"
    try:
        from fastnat import _mux
    except ImportError as exc:
        return None, f"the compiled extension is not installed ({exc})"
    return _mux, None


compiled_module, fallback_reason = _choose()

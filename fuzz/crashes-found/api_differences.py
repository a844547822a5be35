#!/usr/bin/env python3
"""Where the two engines differed on calls with stream ids or data of odd types.

Found while writing the differential fuzz target, through the commands (not
reachable through ``receive_data``). FIXED in commit cbba7cb ("Engines: reject
non-int stream ids before touching state, ..."): every case now gives the same
result in both engines; the script stays as a regression check, and the fuzz
target's misuse commands (``misuse()`` case 9, 12, 13 in fuzz/fuzz_mux.py)
exercise the same calls.

    python fuzz/crashes-found/api_differences.py

prints one line per case and exits 1 if any case differs.

What it was, before cbba7cb:

1. A float stream id equal to a live stream's id (``1.0``): both engines found
   the stream (dict lookup by hash), then the pure engine passed the float to
   ``struct.pack`` and raised ``struct.error`` AFTER it had changed the stream:
   ``end_stream`` left it half-closed with no FIN queued, ``send_data``
   consumed send window with no Data queued, ``reset_stream`` forgot the
   stream with no RST queued. The compiled engine accepted the call and queued
   the frame.
2. An unhashable stream id (a list): the pure engine raised ``TypeError:
   unhashable type``; the compiled engine (``PyDict_GetItem`` swallows the
   error) raised ``StreamClosedError`` from ``send_window``/``end_stream`` and
   silently did nothing in ``acknowledge_received_data`` and ``reset_stream``.
3. ``send_data`` with a non-buffer (str, int): both raised ``TypeError`` with
   different messages ("memoryview: a bytes-like object is required, not
   'str'" vs "a bytes-like object is required, not 'str'").
"""

from __future__ import annotations

import sys

from fastnat import _mux, _mux_py

CASES = [
    ("end_stream(1.0)", lambda s: s.end_stream(1.0)),
    ("send_data(1.0, b'abc')", lambda s: s.send_data(1.0, b"abc")),
    ("reset_stream(1.0)", lambda s: s.reset_stream(1.0)),
    ("send_window([1])", lambda s: s.send_window([1])),
    ("acknowledge_received_data([1], 0)", lambda s: s.acknowledge_received_data([1], 0)),
    ("reset_stream([1])", lambda s: s.reset_stream([1])),
    ("send_data(1, 'text')", lambda s: s.send_data(1, "text")),
]


def outcome(engine, call):
    session = engine.Session(True)
    session.open_stream()
    session.data_to_send()
    try:
        result = ("returned", call(session))
    except Exception as exc:  # noqa: BLE001 - the point is to see what each raises
        result = (f"raised {type(exc).__name__}", str(exc))
    state = {"queued": session.data_to_send().hex(), "streams": session.stream_count}
    if session.stream_count:
        state["send_window(1)"] = session.send_window(1)
    return result, state


def main() -> int:
    differ = 0
    for name, call in CASES:
        pure, compiled = outcome(_mux_py, call), outcome(_mux, call)
        same = pure == compiled
        differ += not same
        print(f"{'same' if same else 'DIFFERENT'}: {name}\n    pure:     {pure}\n    compiled: {compiled}")
    print(f"{differ} of {len(CASES)} cases differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

"""Differential tests: the compiled engine and the pure twin, fed the same
input and the same commands, must produce the same events, the same bytes and
the same errors (type and message)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _mux_helpers import PROTOCOL_ERRORS, SYN, FakeClock, data_frame, ev_key, ping_frame, wu_frame
from _mux_strategies import chunkings, configs, pair_configs, pair_ops, peer_streams, run_pair
from fastnat import _mux_py
from fastnat.errors import ProtocolError
from fastnat.frames import MAX_UINT32

pytestmark = pytest.mark.compiled

DIFF = settings(
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _compiled():
    from fastnat import _mux  # deselected with the compiled marker on a pure install

    return _mux


def _outcome(fn: Any, *args: Any) -> tuple[Any, ...]:
    """What a call did: its result, or its exception's type and message (and
    a ProtocolError's events)."""
    try:
        result = fn(*args)
    except ProtocolError as exc:
        return ("raised", "ProtocolError", str(exc), [ev_key(e) for e in exc.events])
    except Exception as exc:  # noqa: BLE001 - every difference counts
        return ("raised", type(exc).__name__, str(exc))
    if isinstance(result, list):
        return ("events", [ev_key(e) for e in result])
    return ("ok", result)


def _state(s: Any) -> tuple[Any, ...]:
    return (
        s.stream_count,
        s.pending_accept_count,
        s.bytes_to_send,
        s.go_away_sent,
        s.go_away_received,
        s.error,
        s.rtt,
    )


def _assert_same(trace_c: list[Any], trace_p: list[Any]) -> None:
    for i, (c, p) in enumerate(zip(trace_c, trace_p)):
        assert c == p, f"step {i}: compiled {c!r} != python {p!r}"
    assert len(trace_c) == len(trace_p)


# --------------------------------------------------------------- byte streams


def _feed_trace(engine: Any, client: bool, config: Any, chunks: list[bytes]) -> list[Any]:
    s = engine.Session(client, config)
    trace = []
    for chunk in chunks:
        trace.append(_outcome(s.receive_data, chunk))
        trace.append(s.data_to_send())
        trace.append(_state(s))
        for sid in range(0, 8):
            trace.append(_outcome(s.send_window, sid))
            trace.append(_outcome(s.receive_window, sid))
    return trace


@DIFF
@given(data=st.data())
def test_same_events_bytes_and_errors_for_any_input(data):
    client = data.draw(st.booleans(), label="client")
    config = data.draw(configs, label="config")
    stream = data.draw(peer_streams(hostile=data.draw(st.booleans())), label="stream")
    chunks = data.draw(chunkings(stream), label="chunks")
    _assert_same(
        _feed_trace(_compiled(), client, config, chunks),
        _feed_trace(_mux_py, client, config, chunks),
    )


@DIFF
@given(data=st.binary(max_size=200), client=st.booleans())
def test_same_behaviour_on_random_bytes(data, client):
    _assert_same(
        _feed_trace(_compiled(), client, None, [data]),
        _feed_trace(_mux_py, client, None, [data]),
    )


@pytest.mark.parametrize(("setup", "bad", "words"), [pytest.param(s, b, w, id=n) for n, s, b, w in PROTOCOL_ERRORS])
def test_same_protocol_error_messages(setup, bad, words):
    traces = []
    for engine in (_compiled(), _mux_py):
        traces.append(_feed_trace(engine, False, None, [setup, ping_frame(1) + bad, b"", ping_frame(2)]))
    _assert_same(*traces)
    errors = [t for t in traces[0] if isinstance(t, tuple) and t[:2] == ("raised", "ProtocolError")]
    assert words in errors[0][2]  # the bad frame's own error
    assert all("failed earlier" in e[2] for e in errors[1:])


# ----------------------------------------------------- commands and input mixed

_ids = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 0, -1, MAX_UINT32, MAX_UINT32 + 1])
_amounts = st.sampled_from([0, 1, 10, 1000, 200_000, -1, 10**12])
_command = st.one_of(
    st.tuples(st.just("open_stream")),
    st.tuples(st.just("accept_stream"), _ids),
    st.tuples(st.just("send_data"), _ids, st.sampled_from([0, 1, 100, 5000, 300_000])),
    st.tuples(st.just("acknowledge_received_data"), _ids, _amounts),
    st.tuples(st.just("end_stream"), _ids),
    st.tuples(st.just("reset_stream"), _ids),
    st.tuples(st.just("ping"), st.sampled_from([None, None, 0, 1, 2, -1, MAX_UINT32, MAX_UINT32 + 1])),
    st.tuples(st.just("go_away"), st.sampled_from([0, 1, 2, -1, MAX_UINT32 + 1])),
    st.tuples(st.just("send_window"), _ids),
    st.tuples(st.just("receive_window"), _ids),
    st.tuples(st.just("tick"), st.sampled_from([0.001, 0.1, 1.0])),
)
_few_ids = st.sampled_from([1, 2, 3, 4, 5, 6])
_frames_in = st.one_of(
    st.builds(lambda sid, f: wu_frame(sid, 0, f), _few_ids, st.sampled_from([SYN, 2, 4, 8])),
    st.builds(lambda sid, n: data_frame(sid, bytes(n)), _few_ids, st.sampled_from([1, 500, 100_000])),
    st.builds(lambda o: ping_frame(o, 2), st.integers(0, 3)),
    peer_streams(hostile=False, max_frames=4),
)
_steps = st.lists(st.one_of(_command, _command, st.tuples(st.just("recv"), _frames_in)), max_size=30)


def _command_trace(engine: Any, client: bool, config: Any, steps: list[Any]) -> list[Any]:
    clock = FakeClock()
    s = engine.Session(client, config, clock=clock)
    trace = []
    for step in steps:
        name, args = step[0], list(step[1:])
        if name == "tick":
            clock.advance(args[0])
            continue
        if name == "recv":
            name = "receive_data"
        elif name == "send_data":
            args[1] = bytes(range(256)) * (args[1] // 256) + bytes(args[1] % 256)
        trace.append((name, _outcome(getattr(s, name), *args)))
        trace.append(s.data_to_send())
        trace.append(_state(s))
    return trace


@DIFF
@given(client=st.booleans(), config=configs, steps=_steps)
def test_same_behaviour_for_commands_and_input(client, config, steps):
    _assert_same(
        _command_trace(_compiled(), client, config, steps),
        _command_trace(_mux_py, client, config, steps),
    )


@settings(DIFF, max_examples=80)
@given(config_a=pair_configs, config_b=pair_configs, ops=pair_ops())
def test_same_transcript_for_connected_pairs(config_a, config_b, ops):
    compiled = run_pair(_compiled(), config_a, config_b, ops, check=False)
    python = run_pair(_mux_py, config_a, config_b, ops, check=False)
    _assert_same(compiled.transcript, python.transcript)


# ------------------------------------------------------------ odd arguments


ODD_IDS = [1.0, "1", [1], None, True, 2**70, -1]
CALLS = ["send_window", "receive_window", "accept_stream", "send_data", "end_stream", "reset_stream", "acknowledge"]


@pytest.mark.parametrize("stream_id", ODD_IDS, ids=repr)
def test_same_behaviour_for_odd_stream_id_arguments(stream_id):
    """Whatever a stream id argument that is not a plain int does, both
    engines do the same (same result or exception and message, same bytes queued,
    same state left behind)."""
    mismatches = []
    for call in CALLS:
        traces = []
        for engine in (_compiled(), _mux_py):
            s = engine.Session(False)
            s.receive_data(wu_frame(1, 0, SYN))
            s.data_to_send()
            fn = {
                "send_data": lambda sid: s.send_data(sid, b"x"),
                "acknowledge": lambda sid: s.acknowledge_received_data(sid, 0),
            }.get(call) or getattr(s, call)
            outcome = _outcome(fn, stream_id)
            traces.append([outcome, s.data_to_send(), _state(s), _outcome(s.send_window, 1)])
        if traces[0] != traces[1]:
            mismatches.append(f"{call}({stream_id!r}): compiled {traces[0]!r} != python {traces[1]!r}")
    assert not mismatches, "\n".join(mismatches)

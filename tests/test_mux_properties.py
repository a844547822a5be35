"""Property tests of the engine (hypothesis), run against both engines."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _mux_strategies import chunkings, configs, feed, pair_configs, pair_ops, peer_streams, run_pair

PROPERTY = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _chunking_invariant(engine, data, hostile):
    client = data.draw(st.booleans(), label="client")
    config = data.draw(configs, label="config")
    stream = data.draw(peer_streams(hostile), label="stream")
    chunks = data.draw(chunkings(stream), label="chunks")
    assert b"".join(chunks) == stream
    whole = feed(engine.Session(client, config), [stream])
    pieces = feed(engine.Session(client, config), chunks)
    assert pieces[0] == whole[0]  # events, data compared as bytes
    assert pieces[1] == whole[1]  # everything the session queued in reply
    assert pieces[2] == whole[2]  # the protocol error, if any
    if len(stream) <= 600:  # and one byte at a time
        assert feed(engine.Session(client, config), [stream[i : i + 1] for i in range(len(stream))]) == whole


@PROPERTY
@given(data=st.data())
def test_any_chunking_gives_the_same_events(engine, data):
    _chunking_invariant(engine, data, hostile=False)


@PROPERTY
@given(data=st.data())
def test_any_chunking_gives_the_same_events_hostile(engine, data):
    _chunking_invariant(engine, data, hostile=True)


@settings(PROPERTY, max_examples=120)
@given(config_a=pair_configs, config_b=pair_configs, ops=pair_ops())
def test_pair_delivers_every_byte_once_in_order(engine, config_a, config_b, ops):
    run = run_pair(engine, config_a, config_b, ops)
    # run_pair checked: windows within [0, 2^32-1] after every operation,
    # every byte arrived once and in order (a prefix on reset streams),
    # and at rest each side's send window is the other's receive window.
    assert all(not w for w in run.wire)


@settings(PROPERTY, max_examples=40)
@given(ops=pair_ops())
def test_pair_with_default_config(engine, ops):
    from fastnat.mux_config import MuxConfig

    run_pair(engine, MuxConfig(), MuxConfig(), ops)

"""Conformance suite of the yamux engine, run against both engines.

Peer input is built by hand with ``fastnat.frames.encode_frame``; round trips
use two connected sessions of the same engine.
"""

from __future__ import annotations

import tracemalloc

import pytest

from _mux_helpers import (
    ACK,
    DATA,
    FIN,
    KIB,
    PROTOCOL_ERRORS,
    RST,
    SYN,
    WINDOW,
    WU,
    FakeClock,
    Frame,
    data_frame,
    frame,
    go_away_frame,
    keys,
    make_pair,
    parse_frames,
    ping_frame,
    wu_frame,
)
from fastnat import events as E
from fastnat.errors import (
    MuxError,
    ProtocolError,
    SessionClosedError,
    StreamClosedError,
    StreamLimitError,
)
from fastnat.frames import MAX_UINT32
from fastnat.mux_config import MuxConfig

MIB = 1024 * KIB


def inbound(engine, *stream_ids, config=None, accept=False):
    """An accepting-side session that has received SYNs for ``stream_ids``."""
    s = engine.Session(False, config)
    for sid in stream_ids:
        assert keys(s.receive_data(wu_frame(sid, 0, SYN))) == [("StreamOpened", sid)]
        if accept:
            s.accept_stream(sid)
    s.data_to_send()
    return s


def outbound(engine, n=1, config=None, acked=True, **kw):
    """A dialling session with ``n`` streams it opened (and the peer accepted)."""
    s = engine.Session(True, config, **kw)
    ids = [s.open_stream() for _ in range(n)]
    if acked:
        for sid in ids:
            s.receive_data(wu_frame(sid, 0, ACK))
    s.data_to_send()
    return s, ids


# ---------------------------------------------------------------- stream ids


def test_client_ids_are_odd_and_increase_by_two(engine):
    s = engine.Session(True)
    assert s.client is True
    assert [s.open_stream() for _ in range(5)] == [1, 3, 5, 7, 9]
    assert s.stream_count == 5


def test_server_ids_are_even_and_increase_by_two(engine):
    s = engine.Session(False)
    assert s.client is False
    assert [s.open_stream() for _ in range(5)] == [2, 4, 6, 8, 10]


def test_ids_are_not_reused_after_a_stream_is_gone(engine):
    s = engine.Session(True)
    a = s.open_stream()
    s.reset_stream(a)
    assert s.stream_count == 0
    assert s.open_stream() == 3


# ------------------------------------------------------------------- SYN


def test_open_stream_queues_a_syn_window_update(engine):
    s = engine.Session(True)
    sid = s.open_stream()
    assert s.data_to_send() == wu_frame(1, 0, SYN)
    assert sid == 1
    assert s.send_window(sid) == WINDOW
    assert s.receive_window(sid) == WINDOW
    assert s.stream_count == 1


def test_syn_on_window_update_opens_a_pending_stream(engine):
    s = engine.Session(False)
    evs = s.receive_data(wu_frame(1, 0, SYN))
    assert keys(evs) == [("StreamOpened", 1)]
    assert isinstance(evs[0], E.StreamOpened)
    assert s.stream_count == 1
    assert s.pending_accept_count == 1
    assert s.data_to_send() == b""  # receiving alone does not accept
    assert s.send_window(1) == WINDOW
    assert s.receive_window(1) == WINDOW


def test_syn_with_a_window_delta_riding_on_it(engine):
    s = engine.Session(False)
    evs = s.receive_data(wu_frame(1, 1000, SYN))
    assert keys(evs) == [("StreamOpened", 1), ("WindowUpdated", 1, 1000)]
    assert s.send_window(1) == WINDOW + 1000
    assert s.send_data(1, b"x" * (WINDOW + 5000)) == WINDOW + 1000


def test_syn_on_data_with_data_riding_on_it(engine):
    s = engine.Session(False)
    evs = s.receive_data(data_frame(1, b"hello", SYN))
    assert keys(evs) == [("StreamOpened", 1), ("DataReceived", 1, b"hello")]
    assert s.receive_window(1) == WINDOW - 5
    assert s.pending_accept_count == 1


def test_syn_data_fin_in_one_frame(engine):
    s = engine.Session(False)
    evs = s.receive_data(data_frame(1, b"hi", SYN | FIN))
    assert keys(evs) == [("StreamOpened", 1), ("DataReceived", 1, b"hi"), ("StreamEnded", 1)]
    assert s.stream_count == 1
    s.end_stream(1)  # accepts and ends: both sides ended, forgotten
    assert [(f.type, f.flags, f.stream_id) for f in parse_frames(s.data_to_send())] == [
        (WU, ACK, 1),
        (WU, FIN, 1),
    ]
    assert s.stream_count == 0
    assert s.pending_accept_count == 0


def test_empty_syn_data_frame_opens(engine):
    s = engine.Session(False)
    assert keys(s.receive_data(frame(DATA, SYN, 3, 0))) == [("StreamOpened", 3)]


# ------------------------------------------------------------------- ACK


def test_accept_stream_queues_ack_once(engine):
    s = inbound(engine, 1)
    s.accept_stream(1)
    assert s.data_to_send() == wu_frame(1, 0, ACK)
    assert s.pending_accept_count == 0
    s.accept_stream(1)  # already accepted: nothing more
    assert s.data_to_send() == b""
    assert s.stream_count == 1


def test_ack_gives_stream_accepted_once(engine):
    s, (sid,) = outbound(engine, acked=False)
    assert keys(s.receive_data(wu_frame(sid, 0, ACK))) == [("StreamAccepted", sid)]
    assert keys(s.receive_data(wu_frame(sid, 0, ACK))) == []
    assert s.data_to_send() == b""


def test_ack_with_window_delta_and_ack_on_data(engine):
    s, (a, b) = outbound(engine, 2, acked=False)
    evs = s.receive_data(wu_frame(a, 4096, ACK) + data_frame(b, b"payload", ACK))
    assert keys(evs) == [
        ("StreamAccepted", a),
        ("WindowUpdated", a, 4096),
        ("StreamAccepted", b),
        ("DataReceived", b, b"payload"),
    ]
    assert s.send_window(a) == WINDOW + 4096


def test_round_trip_open_accept(engine):
    p = make_pair(engine)
    sid = p.a.open_stream()
    assert keys(p.a_to_b()) == [("StreamOpened", sid)]
    p.b.accept_stream(sid)
    assert keys(p.b_to_a()) == [("StreamAccepted", sid)]
    assert p.a.stream_count == p.b.stream_count == 1


# ------------------------------------------------------------------- FIN


def test_fin_both_ways_forgets_the_stream(engine):
    p = make_pair(engine)
    sid = p.a.open_stream()
    assert p.a.send_data(sid, b"request") == 7
    p.a.end_stream(sid)
    assert keys(p.a_to_b()) == [("StreamOpened", sid), ("DataReceived", sid, b"request"), ("StreamEnded", sid)]
    assert p.a.stream_count == 1 and p.b.stream_count == 1  # half-closed, not gone
    with pytest.raises(StreamClosedError):
        p.a.send_data(sid, b"more")
    assert p.b.send_data(sid, b"reply") == 5  # implicit accept
    assert p.a.stream_count == 1
    p.b.end_stream(sid)
    assert p.b.stream_count == 0
    assert keys(p.b_to_a()) == [("StreamAccepted", sid), ("DataReceived", sid, b"reply"), ("StreamEnded", sid)]
    assert p.a.stream_count == 0
    assert p.a.pending_accept_count == p.b.pending_accept_count == 0


def test_fin_on_data_frame_and_on_window_update(engine):
    s = inbound(engine, 1, 3, accept=True)
    evs = s.receive_data(data_frame(1, b"last", FIN) + wu_frame(3, 0, FIN))
    assert keys(evs) == [("DataReceived", 1, b"last"), ("StreamEnded", 1), ("StreamEnded", 3)]
    assert s.stream_count == 2
    s.end_stream(1)
    s.end_stream(3)
    assert s.stream_count == 0


def test_local_fin_first_then_peer_fin(engine):
    s, (sid,) = outbound(engine)
    s.end_stream(sid)
    assert s.data_to_send() == wu_frame(sid, 0, FIN)
    assert s.stream_count == 1
    # the stream still receives until the peer ends it
    assert keys(s.receive_data(data_frame(sid, b"tail"))) == [("DataReceived", sid, b"tail")]
    assert keys(s.receive_data(wu_frame(sid, 0, FIN))) == [("StreamEnded", sid)]
    assert s.stream_count == 0


# ------------------------------------------------------------------- RST


def test_rst_from_peer(engine):
    s, (sid,) = outbound(engine)
    evs = s.receive_data(wu_frame(sid, 0, RST))
    assert keys(evs) == [("StreamReset", sid)]
    assert isinstance(evs[0], E.StreamReset)
    assert s.stream_count == 0
    with pytest.raises(StreamClosedError):
        s.send_data(sid, b"x")
    assert s.data_to_send() == b""  # nothing answers a reset


def test_rst_on_data_frame(engine):
    s = inbound(engine, 1, accept=True)
    assert keys(s.receive_data(frame(DATA, RST, 1, 0))) == [("StreamReset", 1)]
    assert s.stream_count == 0


def test_refusing_an_opened_stream(engine):
    p = make_pair(engine)
    sid = p.a.open_stream()
    p.a_to_b()
    p.b.reset_stream(sid)
    assert p.b.data_to_send() == wu_frame(sid, 0, RST)
    assert p.b.stream_count == 0 and p.b.pending_accept_count == 0
    assert keys(p.a.receive_data(wu_frame(sid, 0, RST))) == [("StreamReset", sid)]
    assert p.a.stream_count == 0


def test_peer_refuses_with_ack_and_rst(engine):
    s, (sid,) = outbound(engine, acked=False)
    assert keys(s.receive_data(wu_frame(sid, 0, ACK | RST))) == [("StreamAccepted", sid), ("StreamReset", sid)]
    assert s.stream_count == 0


def test_reset_of_a_pending_stream(engine):
    s = inbound(engine, 1, 3)
    assert s.pending_accept_count == 2
    s.reset_stream(3)
    assert s.data_to_send() == wu_frame(3, 0, RST)
    assert s.pending_accept_count == 1
    assert s.stream_count == 1


def test_peer_resets_a_pending_stream(engine):
    s = inbound(engine, 1)
    assert keys(s.receive_data(wu_frame(1, 0, RST))) == [("StreamReset", 1)]
    assert s.pending_accept_count == 0
    assert s.stream_count == 0


def test_local_reset_of_an_open_stream(engine):
    s, (sid,) = outbound(engine)
    s.reset_stream(sid)
    assert s.data_to_send() == wu_frame(sid, 0, RST)
    assert s.stream_count == 0
    s.reset_stream(sid)  # gone: nothing more
    assert s.data_to_send() == b""


# ------------------------------------------------------------------ ping


def test_ping_syn_is_answered_by_the_engine(engine):
    s = engine.Session(False)
    evs = s.receive_data(ping_frame(0xDEADBEEF))
    assert keys(evs) == [("PingReceived", 0xDEADBEEF)]
    assert isinstance(evs[0], E.PingReceived)
    assert s.data_to_send() == ping_frame(0xDEADBEEF, ACK)


def test_ping_round_trip(engine):
    p = make_pair(engine)
    opaque = p.a.ping()
    assert p.a.data_to_send() == ping_frame(opaque, SYN)
    assert keys(p.b.receive_data(ping_frame(opaque, SYN))) == [("PingReceived", opaque)]
    reply = p.b.data_to_send()
    assert reply == ping_frame(opaque, ACK)
    evs = p.a.receive_data(reply)
    assert keys(evs) == [("PingAcknowledged", opaque)]
    assert isinstance(evs[0], E.PingAcknowledged)
    # the same answer again, or one to a ping never sent, is ignored
    assert p.a.receive_data(reply) == []
    assert p.a.receive_data(ping_frame(12345, ACK)) == []
    assert p.a.data_to_send() == b""


def test_ping_opaque_values(engine):
    s = engine.Session(True)
    first = s.ping()
    second = s.ping()
    assert first != second
    assert s.ping(77) == 77
    with pytest.raises(ValueError):
        s.ping(77)  # in flight
    with pytest.raises(ValueError):
        s.ping(-1)
    with pytest.raises(ValueError):
        s.ping(MAX_UINT32 + 1)
    assert s.ping(MAX_UINT32) == MAX_UINT32
    assert [f.length for f in parse_frames(s.data_to_send())] == [first, second, 77, MAX_UINT32]
    assert keys(s.receive_data(ping_frame(77, ACK))) == [("PingAcknowledged", 77)]
    assert s.ping(77) == 77  # answered: may be reused


def test_max_outstanding_pings(engine):
    s = engine.Session(True, MuxConfig(max_outstanding_pings=2))
    a = s.ping()
    s.ping()
    with pytest.raises(StreamLimitError):
        s.ping()
    before = s.bytes_to_send
    with pytest.raises(StreamLimitError):
        s.ping(999)
    assert s.bytes_to_send == before
    s.receive_data(ping_frame(a, ACK))
    s.ping()
    with pytest.raises(StreamLimitError):
        s.ping()


def test_answering_pings_is_not_limited(engine):
    s = engine.Session(False, MuxConfig(max_outstanding_pings=1))
    chunk = b"".join(ping_frame(i) for i in range(100))
    assert len(s.receive_data(chunk)) == 100
    assert [f.length for f in parse_frames(s.data_to_send())] == list(range(100))


# --------------------------------------------------------------- go away


def test_go_away_received(engine):
    s, (sid,) = outbound(engine)
    evs = s.receive_data(go_away_frame(2))
    assert keys(evs) == [("GoAwayReceived", 2)]
    assert isinstance(evs[0], E.GoAwayReceived)
    assert s.go_away_received is True
    assert s.go_away_sent is False
    with pytest.raises(SessionClosedError):
        s.open_stream()
    assert s.stream_count == 1
    assert s.send_data(sid, b"still open") == 10  # streams already open carry on
    assert parse_frames(s.data_to_send()) == [Frame(DATA, 0, sid, 10, b"still open")]


def test_go_away_sent(engine):
    s, (sid,) = outbound(engine)
    s.go_away()
    assert s.data_to_send() == go_away_frame(0)
    assert s.go_away_sent is True
    s.go_away(2)  # a second one queues nothing
    assert s.data_to_send() == b""
    with pytest.raises(SessionClosedError):
        s.open_stream()
    # inbound SYNs are refused with RST, no event
    assert s.receive_data(wu_frame(2, 0, SYN)) == []
    assert s.receive_data(data_frame(4, b"early data", SYN)) == []
    assert s.data_to_send() == wu_frame(2, 0, RST) + wu_frame(4, 0, RST)
    assert s.stream_count == 1
    assert s.pending_accept_count == 0
    # the open stream carries on
    assert s.send_data(sid, b"x") == 1
    assert keys(s.receive_data(data_frame(sid, b"y"))) == [("DataReceived", sid, b"y")]


def test_go_away_code(engine):
    s = engine.Session(True)
    with pytest.raises(ValueError):
        s.go_away(-1)
    with pytest.raises(ValueError):
        s.go_away(MAX_UINT32 + 1)
    assert s.data_to_send() == b""
    s.go_away(2)
    assert s.data_to_send() == go_away_frame(2)


def test_go_away_round_trip(engine):
    p = make_pair(engine)
    p.b.go_away(0)
    assert keys(p.b_to_a()) == [("GoAwayReceived", 0)]
    with pytest.raises(SessionClosedError):
        p.a.open_stream()
    with pytest.raises(SessionClosedError):
        p.b.open_stream()


# -------------------------------------------------------------- life cycle


def test_send_data_accepts_an_unaccepted_inbound_stream(engine):
    s = inbound(engine, 1)
    assert s.send_data(1, b"hi") == 2
    assert s.data_to_send() == wu_frame(1, 0, ACK) + data_frame(1, b"hi")
    assert s.pending_accept_count == 0


def test_end_stream_accepts_an_unaccepted_inbound_stream(engine):
    s = inbound(engine, 1)
    s.end_stream(1)
    assert s.data_to_send() == wu_frame(1, 0, ACK) + wu_frame(1, 0, FIN)
    assert s.pending_accept_count == 0
    assert s.stream_count == 1


def test_empty_send_data(engine):
    s, (sid,) = outbound(engine)
    assert s.send_data(sid, b"") == 0
    assert s.data_to_send() == b""


def test_send_data_accepts_any_bytes_like(engine):
    import array

    s, (sid,) = outbound(engine)
    assert s.send_data(sid, bytearray(b"ab")) == 2
    assert s.send_data(sid, memoryview(b"xcdx")[1:3]) == 2
    arr = array.array("H", [1, 2])
    assert s.send_data(sid, arr) == 4
    assert b"".join(f.payload for f in parse_frames(s.data_to_send())) == b"abcd" + arr.tobytes()
    with pytest.raises(TypeError):
        s.send_data(sid, "text")
    with pytest.raises(TypeError):
        s.send_data(sid, memoryview(b"abcdef")[::2])  # not contiguous
    assert s.data_to_send() == b""
    assert s.send_window(sid) == WINDOW - 8


def test_stream_closed_errors(engine):
    s, (sid,) = outbound(engine)
    for bad in (99, 2, 0, -1, MAX_UINT32 + 1):
        with pytest.raises(StreamClosedError):
            s.send_data(bad, b"x")
        with pytest.raises(StreamClosedError):
            s.end_stream(bad)
        with pytest.raises(StreamClosedError):
            s.accept_stream(bad)
        with pytest.raises(StreamClosedError):
            s.send_window(bad)
        with pytest.raises(StreamClosedError):
            s.receive_window(bad)
    s.end_stream(sid)
    s.data_to_send()
    with pytest.raises(StreamClosedError):
        s.send_data(sid, b"x")
    with pytest.raises(StreamClosedError):
        s.end_stream(sid)
    assert s.data_to_send() == b""
    assert issubclass(StreamClosedError, MuxError)


def test_errors_on_a_reset_stream(engine):
    s, (sid,) = outbound(engine)
    s.reset_stream(sid)
    s.data_to_send()
    with pytest.raises(StreamClosedError):
        s.send_data(sid, b"x")
    with pytest.raises(StreamClosedError):
        s.end_stream(sid)
    s.reset_stream(sid)
    s.acknowledge_received_data(sid, 10)  # gone: nothing, even beyond what was received
    assert s.data_to_send() == b""


def test_reset_and_acknowledge_on_never_opened_streams_are_noops(engine):
    s = engine.Session(True)
    s.reset_stream(5)
    s.reset_stream(2)
    s.acknowledge_received_data(7, 100)
    assert s.data_to_send() == b""
    assert s.stream_count == 0


def test_accept_stream_on_an_outbound_stream(engine):
    s, (sid,) = outbound(engine, acked=False)
    with pytest.raises(ValueError):
        s.accept_stream(sid)
    assert s.data_to_send() == b""


def test_acknowledge_validation(engine):
    s = inbound(engine, 1, accept=True)
    s.receive_data(data_frame(1, b"abcdef"))
    with pytest.raises(ValueError):
        s.acknowledge_received_data(1, 7)
    with pytest.raises(ValueError):
        s.acknowledge_received_data(1, -1)
    with pytest.raises(TypeError):
        s.acknowledge_received_data(1, 1.5)
    s.acknowledge_received_data(1, 4)
    with pytest.raises(ValueError):
        s.acknowledge_received_data(1, 3)  # only 2 left
    s.acknowledge_received_data(1, 2)
    s.acknowledge_received_data(1, 0)
    assert s.data_to_send() == b""  # far below half a window


@pytest.mark.parametrize("bad_id", [1.0, "1", [1], None, b"\x01"], ids=repr)
def test_stream_ids_must_be_ints(engine, bad_id):
    s = inbound(engine, 1)
    calls = [
        lambda: s.send_data(bad_id, b"x"),
        lambda: s.end_stream(bad_id),
        lambda: s.reset_stream(bad_id),
        lambda: s.accept_stream(bad_id),
        lambda: s.acknowledge_received_data(bad_id, 0),
        lambda: s.send_window(bad_id),
        lambda: s.receive_window(bad_id),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="stream ids are ints"):
            call()
    # nothing happened to stream 1
    assert s.data_to_send() == b""
    assert s.stream_count == 1 and s.pending_accept_count == 1
    assert s.send_window(1) == WINDOW


def test_int_like_stream_ids(engine):
    class Id:
        def __init__(self, n):
            self.n = n

        def __index__(self):
            return self.n

    s = inbound(engine, 1)
    assert s.send_data(Id(1), b"x") == 1
    assert s.send_window(True) == WINDOW - 1
    s.end_stream(Id(1))
    assert s.data_to_send() == wu_frame(1, 0, ACK) + data_frame(1, b"x") + wu_frame(1, 0, FIN)


def test_session_config_type(engine):
    with pytest.raises(TypeError):
        engine.Session(True, {"accept_backlog": 1})
    s = engine.Session(True, None)
    assert s.config == MuxConfig()
    cfg = MuxConfig(accept_backlog=3)
    assert engine.Session(False, cfg).config is cfg


# ------------------------------------------------------------------ windows


def test_initial_windows_are_256_kib_both_sides(engine):
    p = make_pair(engine)
    sid = p.a.open_stream()
    p.a_to_b()
    assert p.a.send_window(sid) == p.a.receive_window(sid) == WINDOW
    assert p.b.send_window(sid) == p.b.receive_window(sid) == WINDOW
    p.b.accept_stream(sid)
    p.b_to_a()
    assert p.a.send_window(sid) == p.a.receive_window(sid) == WINDOW
    assert p.b.send_window(sid) == p.b.receive_window(sid) == WINDOW


def test_larger_initial_window_rides_on_syn(engine):
    cfg = MuxConfig(initial_stream_window=MIB)
    p = make_pair(engine, cfg)
    sid = p.a.open_stream()
    assert p.a.data_to_send() == wu_frame(sid, MIB - WINDOW, SYN)
    assert p.a.receive_window(sid) == MIB
    evs = p.b.receive_data(wu_frame(sid, MIB - WINDOW, SYN))
    assert keys(evs) == [("StreamOpened", sid), ("WindowUpdated", sid, MIB - WINDOW)]
    assert p.b.send_window(sid) == MIB
    # the peer may now send a whole MiB before any update
    assert p.b.send_data(sid, bytes(2 * MIB)) == MIB
    got = p.b_to_a()
    assert sum(len(e.data) for e in got if isinstance(e, E.DataReceived)) == MIB
    assert p.a.receive_window(sid) == 0


def test_larger_initial_window_rides_on_ack(engine):
    cfg = MuxConfig(initial_stream_window=MIB)
    s = inbound(engine, 1, config=cfg)
    assert s.receive_window(1) == WINDOW  # the peer assumes 256 KiB until the ACK
    s.accept_stream(1)
    assert s.data_to_send() == wu_frame(1, MIB - WINDOW, ACK)
    assert s.receive_window(1) == MIB
    assert keys(s.receive_data(data_frame(1, bytes(MIB)))) == [("DataReceived", 1, bytes(MIB))]
    assert s.receive_window(1) == 0


def test_larger_initial_window_rides_on_implicit_ack(engine):
    cfg = MuxConfig(initial_stream_window=WINDOW + 100)
    s = inbound(engine, 1, config=cfg)
    s.send_data(1, b"z")
    assert s.data_to_send() == wu_frame(1, 100, ACK) + data_frame(1, b"z")


def test_send_data_takes_what_the_window_allows(engine):
    s, (sid,) = outbound(engine)
    assert s.send_data(sid, bytes(300 * KIB)) == WINDOW
    assert s.send_window(sid) == 0
    out = s.data_to_send()
    assert sum(f.length for f in parse_frames(out)) == WINDOW
    assert s.send_data(sid, b"more") == 0
    assert s.data_to_send() == b""
    assert keys(s.receive_data(wu_frame(sid, 10))) == [("WindowUpdated", sid, 10)]
    assert s.send_window(sid) == 10
    assert s.send_data(sid, b"0123456789abc") == 10
    assert parse_frames(s.data_to_send()) == [Frame(DATA, 0, sid, 10, b"0123456789")]


def test_send_data_splits_into_max_frame_size(engine):
    s, (sid,) = outbound(engine, config=MuxConfig(max_frame_size=1000))
    payload = bytes(range(256)) * 10  # 2560 bytes
    assert s.send_data(sid, payload) == 2560
    frames = parse_frames(s.data_to_send())
    assert [(f.type, f.flags, f.stream_id, f.length) for f in frames] == [
        (DATA, 0, sid, 1000),
        (DATA, 0, sid, 1000),
        (DATA, 0, sid, 560),
    ]
    assert b"".join(f.payload for f in frames) == payload


def test_default_max_frame_size_is_64_kib(engine):
    s, (sid,) = outbound(engine)
    s.send_data(sid, bytes(200 * KIB))
    assert [f.length for f in parse_frames(s.data_to_send())] == [64 * KIB] * 3 + [8 * KIB]


def test_receiving_alone_sends_no_window_update(engine):
    s = inbound(engine, 1, accept=True)
    s.receive_data(data_frame(1, bytes(WINDOW)))
    assert s.receive_window(1) == 0
    assert s.data_to_send() == b""


def test_window_update_after_half_the_window_is_acknowledged(engine):
    s = inbound(engine, 1, accept=True)
    half = WINDOW // 2
    s.receive_data(data_frame(1, bytes(half - 1)))
    s.acknowledge_received_data(1, 1000)
    s.acknowledge_received_data(1, half - 1001)
    assert s.data_to_send() == b""  # half - 1 acknowledged: not yet
    assert s.receive_window(1) == WINDOW - (half - 1)
    s.receive_data(data_frame(1, b"x"))
    s.acknowledge_received_data(1, 1)
    assert s.data_to_send() == wu_frame(1, half)
    assert s.receive_window(1) == WINDOW
    # credit starts again from zero
    s.receive_data(data_frame(1, bytes(10)))
    s.acknowledge_received_data(1, 10)
    assert s.data_to_send() == b""


def test_window_update_carries_all_acknowledged_credit(engine):
    s = inbound(engine, 1, accept=True)
    s.receive_data(data_frame(1, bytes(200 * KIB)))
    s.acknowledge_received_data(1, 200 * KIB)
    assert s.data_to_send() == wu_frame(1, 200 * KIB)


def test_flow_control_round_trip(engine):
    p = make_pair(engine)
    sid = p.a.open_stream()
    p.pump()
    p.b.accept_stream(sid)
    p.pump()
    total = 3 * MIB
    payload = bytes(range(256)) * (total // 256)
    sent = 0
    received = bytearray()
    for _ in range(200):
        if sent < total:
            sent += p.a.send_data(sid, payload[sent:])
        for ev in p.a_to_b():
            if isinstance(ev, E.DataReceived):
                received += ev.data
                p.b.acknowledge_received_data(sid, len(ev.data))
        p.b_to_a()
        assert 0 <= p.a.send_window(sid) <= WINDOW
        if len(received) == total:
            break
    assert bytes(received) == payload
    assert any(isinstance(e, E.WindowUpdated) for e in p.events_a)


def test_no_window_update_after_the_peers_fin(engine):
    s = inbound(engine, 1, accept=True)
    s.receive_data(data_frame(1, bytes(WINDOW), FIN))
    s.acknowledge_received_data(1, WINDOW)
    assert s.data_to_send() == b""
    assert s.stream_count == 1  # this side has not ended it


def test_ack_credit_on_an_unended_stream_after_local_fin_still_flows(engine):
    s = inbound(engine, 1, accept=True)
    s.end_stream(1)
    s.data_to_send()
    s.receive_data(data_frame(1, bytes(WINDOW // 2)))
    s.acknowledge_received_data(1, WINDOW // 2)
    assert s.data_to_send() == wu_frame(1, WINDOW // 2)


def _tuned_pair(engine, clock, rtt, max_window=MIB):
    cfg = MuxConfig(max_stream_window=max_window)
    p = make_pair(engine, cfg, cfg, clock=clock)
    opaque = p.a.ping()
    p.a_to_b()
    clock.advance(rtt)
    p.b_to_a()
    assert keys(p.events_a) == [("PingAcknowledged", opaque)]
    assert p.a.rtt == pytest.approx(rtt)
    sid = p.a.open_stream()
    p.a_to_b()
    p.b.accept_stream(sid)
    p.b_to_a()
    return p, sid


def _deliver(p, sid, n):
    """b sends n bytes to a, a receives them (does not acknowledge)."""
    assert p.b.send_data(sid, bytes(n)) == n
    got = sum(len(e.data) for e in p.b_to_a() if isinstance(e, E.DataReceived))
    assert got == n


def test_auto_tuning_grows_the_window_when_the_consumer_keeps_up(engine):
    clock = FakeClock()
    rtt = 0.1
    p, sid = _tuned_pair(engine, clock, rtt)
    clock.advance(0.05)
    _deliver(p, sid, WINDOW // 2)
    p.a.acknowledge_received_data(sid, WINDOW // 2)
    # half of 256 KiB in under 2 rtt: the window doubles to 512 KiB
    assert p.a.data_to_send() == wu_frame(sid, WINDOW // 2 + WINDOW)
    assert p.a.receive_window(sid) == 2 * WINDOW
    p.b.receive_data(wu_frame(sid, WINDOW // 2 + WINDOW))
    assert p.b.send_window(sid) == 2 * WINDOW
    clock.advance(0.1)
    _deliver(p, sid, WINDOW)
    p.a.acknowledge_received_data(sid, WINDOW)
    # and again, to the 1 MiB maximum
    assert p.a.data_to_send() == wu_frame(sid, WINDOW + 2 * WINDOW)
    assert p.a.receive_window(sid) == MIB
    p.b.receive_data(wu_frame(sid, 3 * WINDOW))
    clock.advance(0.01)
    _deliver(p, sid, MIB // 2)
    p.a.acknowledge_received_data(sid, MIB // 2)
    # at the maximum: no more growth
    assert p.a.data_to_send() == wu_frame(sid, MIB // 2)
    assert p.a.receive_window(sid) == MIB


def test_auto_tuning_leaves_a_slow_consumer_alone(engine):
    clock = FakeClock()
    rtt = 0.1
    p, sid = _tuned_pair(engine, clock, rtt)
    _deliver(p, sid, WINDOW // 2)
    clock.advance(2 * rtt + 0.01)
    p.a.acknowledge_received_data(sid, WINDOW // 2)
    assert p.a.data_to_send() == wu_frame(sid, WINDOW // 2)
    assert p.a.receive_window(sid) == WINDOW
    # the next half window is timed from this update: fast now, so it grows
    p.b.receive_data(wu_frame(sid, WINDOW // 2))
    clock.advance(rtt)
    _deliver(p, sid, WINDOW // 2)
    p.a.acknowledge_received_data(sid, WINDOW // 2)
    assert p.a.data_to_send() == wu_frame(sid, WINDOW // 2 + WINDOW)


def test_auto_tuning_on_an_accepted_stream(engine):
    clock = FakeClock()
    cfg = MuxConfig(max_stream_window=MIB)
    s = engine.Session(False, cfg, clock=clock)
    s.ping(5)
    s.data_to_send()
    clock.advance(0.2)
    s.receive_data(ping_frame(5, ACK))
    assert s.rtt == pytest.approx(0.2)
    clock.advance(100)  # the stream arrives much later; it is timed from its accept
    s.receive_data(wu_frame(1, 0, SYN))
    s.accept_stream(1)
    s.data_to_send()
    clock.advance(0.1)
    s.receive_data(data_frame(1, bytes(WINDOW // 2)))
    s.acknowledge_received_data(1, WINDOW // 2)
    assert s.data_to_send() == wu_frame(1, WINDOW // 2 + WINDOW)


def test_without_a_clock_the_window_never_grows(engine):
    s = inbound(engine, 1, accept=True, config=MuxConfig(max_stream_window=MIB))
    s.ping(1)
    s.receive_data(ping_frame(1, ACK))
    assert s.rtt is None
    s.data_to_send()
    for _ in range(8):
        s.receive_data(data_frame(1, bytes(WINDOW // 2)))
        s.acknowledge_received_data(1, WINDOW // 2)
        assert s.data_to_send() == wu_frame(1, WINDOW // 2)
        assert s.receive_window(1) == WINDOW


def test_with_a_clock_but_no_rtt_the_window_does_not_grow(engine):
    clock = FakeClock()
    s = engine.Session(False, MuxConfig(max_stream_window=MIB), clock=clock)
    s.receive_data(wu_frame(1, 0, SYN))
    s.accept_stream(1)
    s.data_to_send()
    assert s.rtt is None
    s.receive_data(data_frame(1, bytes(WINDOW // 2)))
    s.acknowledge_received_data(1, WINDOW // 2)
    assert s.data_to_send() == wu_frame(1, WINDOW // 2)


def test_window_update_may_reach_exactly_2_32_minus_1(engine):
    s, (sid,) = outbound(engine)
    evs = s.receive_data(wu_frame(sid, MAX_UINT32 - WINDOW))
    assert keys(evs) == [("WindowUpdated", sid, MAX_UINT32 - WINDOW)]
    assert s.send_window(sid) == MAX_UINT32


def test_largest_initial_window(engine):
    cfg = MuxConfig(initial_stream_window=MAX_UINT32, max_stream_window=MAX_UINT32)
    p = make_pair(engine, cfg, cfg)
    sid = p.a.open_stream()
    assert p.a.receive_window(sid) == MAX_UINT32
    p.a_to_b()
    assert p.b.send_window(sid) == MAX_UINT32
    p.b.accept_stream(sid)
    assert p.b.receive_window(sid) == MAX_UINT32
    p.b_to_a()
    assert p.a.send_window(sid) == MAX_UINT32


# ------------------------------------------------------------ protocol errors

GOAWAY_PROTOCOL_ERROR = go_away_frame(1)


@pytest.mark.parametrize(
    ("setup", "bad", "words"), [pytest.param(s, b, w, id=n) for n, s, b, w in PROTOCOL_ERRORS]
)
def test_protocol_error(engine, setup, bad, words):
    s = engine.Session(False)
    setup_events = s.receive_data(setup)
    s.data_to_send()
    # a good frame in the same chunk, before the bad one: its event is kept
    with pytest.raises(ProtocolError) as info:
        s.receive_data(ping_frame(42) + bad + ping_frame(43))
    exc = info.value
    assert isinstance(exc, MuxError)
    assert words in str(exc)
    # Events of frames before the bad one are kept; nothing after it is decoded.
    # (A bad frame that is itself a SYN may report its StreamOpened first: the
    # reference engine checks the window after opening the stream.)
    got = keys(exc.events)
    if bad[1] in (DATA, WU) and bad[2:4] == b"\x00\x01" and not setup:
        assert got in ([("PingReceived", 42)], [("PingReceived", 42), ("StreamOpened", 1)])
    else:
        assert got == [("PingReceived", 42)]
    assert isinstance(exc.events[0], E.PingReceived)
    assert s.error is not None and words in s.error
    assert s.go_away_sent is True
    # the ping answered before the bad frame, then Go Away (protocol error)
    assert s.data_to_send() == ping_frame(42, ACK) + GOAWAY_PROTOCOL_ERROR
    assert s.data_to_send() == b""
    _assert_dead(s)
    del setup_events


def _assert_dead(s):
    """Every command raises ProtocolError; output still works."""
    commands = [
        lambda: s.receive_data(b""),
        lambda: s.receive_data(ping_frame(1)),
        s.open_stream,
        lambda: s.send_data(1, b"x"),
        lambda: s.end_stream(1),
        lambda: s.reset_stream(1),
        lambda: s.accept_stream(1),
        lambda: s.acknowledge_received_data(1, 0),
        s.ping,
        s.go_away,
    ]
    for command in commands:
        with pytest.raises(ProtocolError) as info:
            command()
        assert "failed earlier" in str(info.value)
    assert s.data_to_send() == b""
    assert s.flush(lambda v: None) == 0


def test_protocol_error_header_split_across_calls(engine):
    s = engine.Session(False)
    bad = frame(9, 0, 0, 0)
    assert s.receive_data(ping_frame(1) + bad[:5]) != []
    with pytest.raises(ProtocolError) as info:
        s.receive_data(bad[5:])
    assert info.value.events == []
    assert s.data_to_send() == ping_frame(1, ACK) + GOAWAY_PROTOCOL_ERROR
    _assert_dead(s)


def test_protocol_error_after_data_events_keeps_the_data(engine):
    s = inbound(engine, 1, accept=True)
    with pytest.raises(ProtocolError) as info:
        s.receive_data(data_frame(1, b"good") + frame(DATA, 0, 0, 0))
    assert keys(info.value.events) == [("DataReceived", 1, b"good")]


def test_protocol_error_keeps_previously_queued_output(engine):
    s, (sid,) = outbound(engine)
    s.send_data(sid, b"queued")
    with pytest.raises(ProtocolError):
        s.receive_data(frame(7, 0, 0, 0))
    assert s.data_to_send() == data_frame(sid, b"queued") + GOAWAY_PROTOCOL_ERROR


def test_protocol_error_after_a_go_away_was_sent(engine):
    s = engine.Session(True)
    s.go_away(0)
    with pytest.raises(ProtocolError):
        s.receive_data(frame(7, 0, 0, 0))
    # the protocol-error Go Away is queued even though a normal one went before
    assert s.data_to_send() == go_away_frame(0) + GOAWAY_PROTOCOL_ERROR


def test_protocol_error_on_the_dialling_side(engine):
    s = engine.Session(True)
    with pytest.raises(ProtocolError, match="SYN on stream 1"):
        s.receive_data(wu_frame(1, 0, SYN))
    assert s.data_to_send() == GOAWAY_PROTOCOL_ERROR


# --------------------------------------------------- frames for gone streams


def _gone_after_reset(engine):
    s = inbound(engine, 1, accept=True)
    s.reset_stream(1)
    s.data_to_send()
    return s


def _gone_after_both_fins(engine):
    s = inbound(engine, 1, accept=True)
    s.receive_data(wu_frame(1, 0, FIN))
    s.end_stream(1)
    assert s.stream_count == 0
    s.data_to_send()
    return s


def _gone_after_peer_reset(engine):
    s = inbound(engine, 1, accept=True)
    s.receive_data(wu_frame(1, 0, RST))
    return s


def _gone_after_refusal(engine):
    s = inbound(engine, 1)
    s.reset_stream(1)
    s.data_to_send()
    return s


GONE = [_gone_after_reset, _gone_after_both_fins, _gone_after_peer_reset, _gone_after_refusal]


@pytest.mark.parametrize("make", GONE, ids=lambda f: f.__name__[1:])
def test_frames_for_a_gone_stream_are_dropped(engine, make):
    s = make(engine)
    assert s.stream_count == 0
    chunk = (
        data_frame(1, b"in flight")
        + wu_frame(1, 1000)
        + wu_frame(1, MAX_UINT32)  # would overflow a live stream's window
        + frame(DATA, 0, 1, 0)
        + data_frame(1, b"fin", FIN)
        + wu_frame(1, 0, FIN)
        + wu_frame(1, 0, ACK)
        + wu_frame(1, 0, RST)
        + data_frame(1, bytes(WINDOW + 1))  # beyond any window: discarded anyway
        + ping_frame(9)
    )
    assert keys(s.receive_data(chunk)) == [("PingReceived", 9)]
    assert s.data_to_send() == ping_frame(9, ACK)
    assert s.stream_count == 0
    assert s.error is None


@pytest.mark.parametrize("make", GONE, ids=lambda f: f.__name__[1:])
def test_split_data_frame_for_a_gone_stream_is_discarded(engine, make):
    s = make(engine)
    stream = data_frame(1, bytes(range(256)) * 400) + ping_frame(3) + data_frame(1, b"tail")
    for i in range(0, len(stream), 97):
        evs = s.receive_data(stream[i : i + 97])
        assert all(isinstance(e, E.PingReceived) for e in evs)
    assert s.data_to_send() == ping_frame(3, ACK)
    assert s.stream_count == 0


def test_frames_for_never_opened_streams_are_dropped(engine):
    s = engine.Session(False)
    evs = s.receive_data(data_frame(5, b"x") + wu_frame(7, 10) + wu_frame(2, 0, FIN) + data_frame(4, b"y"))
    assert evs == []
    assert s.data_to_send() == b""
    assert s.stream_count == 0


def test_reset_while_a_data_frame_is_arriving(engine):
    s = inbound(engine, 1, 3, accept=True)
    stream = data_frame(1, b"a" * 1000, FIN) + data_frame(3, b"b" * 10)
    assert s.receive_data(stream[:500]) == []
    s.reset_stream(1)
    s.data_to_send()
    assert keys(s.receive_data(stream[500:])) == [("DataReceived", 3, b"b" * 10)]
    assert s.stream_count == 1
    assert s.data_to_send() == b""


# ------------------------------------------------------------------- limits


def test_accept_backlog(engine):
    s = engine.Session(False, MuxConfig(accept_backlog=2))
    assert keys(s.receive_data(wu_frame(1, 0, SYN) + wu_frame(3, 0, SYN))) == [
        ("StreamOpened", 1),
        ("StreamOpened", 3),
    ]
    # beyond the backlog: refused, no event, its data discarded
    assert s.receive_data(data_frame(5, b"early", SYN)) == []
    assert s.data_to_send() == wu_frame(5, 0, RST)
    assert s.pending_accept_count == 2
    assert s.stream_count == 2
    s.accept_stream(1)
    s.data_to_send()
    assert keys(s.receive_data(wu_frame(7, 0, SYN))) == [("StreamOpened", 7)]
    assert s.receive_data(wu_frame(9, 0, SYN)) == []
    assert s.data_to_send() == wu_frame(9, 0, RST)
    # refusing a pending stream frees a place too
    s.reset_stream(3)
    s.data_to_send()
    assert keys(s.receive_data(wu_frame(11, 0, SYN))) == [("StreamOpened", 11)]
    assert s.stream_count == 3


def test_max_streams_inbound(engine):
    s = engine.Session(False, MuxConfig(max_streams=2))
    s.receive_data(wu_frame(1, 0, SYN))
    s.accept_stream(1)
    sid = s.open_stream()
    s.data_to_send()
    assert s.stream_count == 2
    assert s.receive_data(wu_frame(3, 0, SYN)) == []
    assert s.data_to_send() == wu_frame(3, 0, RST)
    with pytest.raises(StreamLimitError):
        s.open_stream()
    assert s.data_to_send() == b""
    s.reset_stream(sid)
    s.data_to_send()
    assert keys(s.receive_data(wu_frame(5, 0, SYN))) == [("StreamOpened", 5)]


def test_max_streams_outbound(engine):
    s = engine.Session(True, MuxConfig(max_streams=3))
    ids = [s.open_stream() for _ in range(3)]
    with pytest.raises(StreamLimitError):
        s.open_stream()
    assert issubclass(StreamLimitError, MuxError)
    s.receive_data(wu_frame(ids[0], 0, RST))
    assert s.open_stream() == 7


def test_no_state_leaks_over_10000_streams(engine):
    p = make_pair(engine)
    a, b = p.a, p.b
    baseline = 0
    endings = 6
    total = 10_000
    done = 0
    while done < total:
        batch = []
        for _ in range(100):
            sid = a.open_stream()
            batch.append(sid)
            a.send_data(sid, b"req")
        for ev in p.a_to_b():
            pass
        for i, sid in enumerate(batch):
            way = (done + i) % endings
            if way == 0:  # both FINs
                b.send_data(sid, b"resp")
                b.end_stream(sid)
                a.end_stream(sid)
            elif way == 1:  # refused by the acceptor
                b.reset_stream(sid)
            elif way == 2:  # reset by the dialler after accept
                b.accept_stream(sid)
                a.reset_stream(sid)
            elif way == 3:  # acceptor FINs first then dialler FINs
                b.end_stream(sid)
            elif way == 4:  # dialler FINs, acceptor resets
                a.end_stream(sid)
                b.accept_stream(sid)
                b.reset_stream(sid)
            else:  # dialler resets before the acceptor decides
                a.reset_stream(sid)
        p.pump()
        for i, sid in enumerate(batch):
            if (done + i) % endings == 3:
                a.end_stream(sid)
        p.pump()
        done += len(batch)
        p.events_a.clear()  # the helper's record, not the sessions' state
        p.events_b.clear()
        assert a.stream_count == 0, done
        assert b.stream_count == 0, done
        assert b.pending_accept_count == 0
        if done == 1000:
            tracemalloc.start()
            baseline = tracemalloc.get_traced_memory()[0]
    grown = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    # 9,000 more streams came and went: the sessions hold no more than before
    assert grown < 64 * KIB, grown
    assert a.open_stream() == 2 * total + 1


# ------------------------------------------------------------ data delivery


def test_data_is_a_zero_copy_slice_of_a_bytes_chunk(engine):
    s = inbound(engine, 1, 3, accept=True)
    chunk = data_frame(1, b"first") + data_frame(3, b"second") + data_frame(1, b"third")
    evs = s.receive_data(chunk)
    assert keys(evs) == [("DataReceived", 1, b"first"), ("DataReceived", 3, b"second"), ("DataReceived", 1, b"third")]
    for ev in evs:
        assert isinstance(ev, E.DataReceived)
        assert type(ev.data) is memoryview
        assert ev.data.obj is chunk
        assert ev.data.readonly
        assert ev.data.format == "B" and ev.data.ndim == 1


def test_data_is_a_view_of_a_bytearray_chunk(engine):
    s = inbound(engine, 1, accept=True)
    chunk = bytearray(data_frame(1, b"abcdef"))
    (ev,) = s.receive_data(chunk)
    assert ev.data.obj is chunk
    chunk[12] = ord("X")
    assert bytes(ev.data) == b"Xbcdef"  # no copy was made
    assert not ev.data.readonly


def test_data_of_a_memoryview_chunk(engine):
    s = inbound(engine, 1, accept=True)
    buf = bytearray(b"junk" + data_frame(1, b"abc") + b"junk")
    view = memoryview(buf)[4:-4]
    (ev,) = s.receive_data(view)
    assert bytes(ev.data) == b"abc"
    buf[4 + 12] = ord("Z")
    assert bytes(ev.data) == b"Zbc"


def test_receive_data_accepts_other_formats_and_rejects_non_contiguous(engine):
    import array

    s = inbound(engine, 1, accept=True)
    raw = data_frame(1, b"abcd")
    arr = array.array("I")
    arr.frombytes(raw)
    assert keys(s.receive_data(arr)) == [("DataReceived", 1, b"abcd")]
    with pytest.raises(TypeError):
        s.receive_data(memoryview(raw + raw)[::2])
    with pytest.raises(TypeError):
        s.receive_data("text")
    assert s.error is None


def test_split_frame_is_reassembled_at_every_split(engine):
    payload = bytes(range(256)) * 3
    stream = data_frame(1, payload, FIN) + ping_frame(5)
    for cut in range(1, len(stream)):
        s = inbound(engine, 1, accept=True)
        evs = s.receive_data(stream[:cut]) + s.receive_data(stream[cut:])
        assert keys(evs) == [("DataReceived", 1, payload), ("StreamEnded", 1), ("PingReceived", 5)], cut
        for ev in evs:
            if isinstance(ev, E.DataReceived):
                assert type(ev.data) is memoryview


def test_reassembled_frames_stay_intact_while_held(engine):
    s = inbound(engine, 1, accept=True)
    held = []
    for i in range(20):
        payload = bytes([i]) * 5000
        f = data_frame(1, payload)
        held += s.receive_data(f[:3000])
        held += s.receive_data(f[3000:])
    assert [bytes(e.data) for e in held] == [bytes([i]) * 5000 for i in range(20)]


def test_one_byte_at_a_time(engine):
    s = engine.Session(False)
    stream = data_frame(1, b"hello", SYN) + ping_frame(7) + data_frame(1, b"world", FIN) + go_away_frame(0)
    evs = []
    for i in range(len(stream)):
        evs += s.receive_data(stream[i : i + 1])
    assert keys(evs) == [
        ("StreamOpened", 1),
        ("DataReceived", 1, b"hello"),
        ("PingReceived", 7),
        ("DataReceived", 1, b"world"),
        ("StreamEnded", 1),
        ("GoAwayReceived", 0),
    ]


def test_empty_receive(engine):
    s = engine.Session(False)
    assert s.receive_data(b"") == []
    assert s.receive_data(bytearray()) == []


def test_flush_hands_everything_in_one_call(engine):
    s, (sid,) = outbound(engine)
    s.send_data(sid, b"abc")
    s.ping(3)
    s.end_stream(sid)
    expected = data_frame(sid, b"abc") + ping_frame(3) + wu_frame(sid, 0, FIN)
    assert s.bytes_to_send == len(expected)
    calls = []
    n = s.flush(lambda view: calls.append(bytes(view)))
    assert n == len(expected)
    assert calls == [expected]
    assert s.bytes_to_send == 0
    assert s.data_to_send() == b""
    assert s.flush(calls.append) == 0
    assert len(calls) == 1  # nothing queued: write is not called


def test_flush_passes_a_memoryview(engine):
    s, (sid,) = outbound(engine)
    s.send_data(sid, b"xyz")
    seen = []

    def write(view):
        seen.append((type(view), len(view), view.nbytes, bytes(view)))

    s.flush(write)
    assert seen == [(memoryview, 15, 15, data_frame(sid, b"xyz"))]


def test_flush_keeps_the_frames_queued_if_write_raises(engine):
    s, (sid,) = outbound(engine)
    s.send_data(sid, b"abc")

    def broken(view):
        raise ConnectionResetError("gone")

    with pytest.raises(ConnectionResetError):
        s.flush(broken)
    assert s.bytes_to_send == 15
    s.send_data(sid, b"def")
    assert s.data_to_send() == data_frame(sid, b"abc") + data_frame(sid, b"def")


def test_flush_is_safe_when_write_keeps_a_slice(engine):
    s, (sid,) = outbound(engine)
    kept = []
    s.send_data(sid, b"A" * 100)
    s.flush(lambda view: kept.append(view[12:]))
    # the next frames must not overwrite what the writer kept
    s.send_data(sid, b"B" * 100)
    s.ping(1)
    s.flush(lambda view: kept.append(view[:]))
    s.send_data(sid, b"C" * 100)
    out = s.data_to_send()
    assert bytes(kept[0]) == b"A" * 100
    assert bytes(kept[1]) == data_frame(sid, b"B" * 100) + ping_frame(1)
    assert out == data_frame(sid, b"C" * 100)


def test_flush_is_safe_when_write_keeps_a_slice_and_raises(engine):
    """A writer that keeps the unsent part and raises (as a non-blocking writer
    might): the frames stay queued, later commands work, the kept part is intact."""
    s, (sid,) = outbound(engine)
    s.receive_data(wu_frame(sid, MIB))
    s.send_data(sid, b"A" * 100)
    kept = []

    def partial(view):
        kept.append(view[50:])
        raise BlockingIOError

    with pytest.raises(BlockingIOError):
        s.flush(partial)
    snapshot = bytes(kept[0])
    assert s.send_data(sid, b"B" * (300 * KIB)) == 300 * KIB
    s.ping(1)
    out = s.data_to_send()
    assert out.startswith(data_frame(sid, b"A" * 100))
    assert out.endswith(ping_frame(1))
    assert sum(f.length for f in parse_frames(out) if f.type == DATA) == 100 + 300 * KIB
    assert bytes(kept[0]) == snapshot


def test_data_to_send_keeps_no_reference(engine):
    s, (sid,) = outbound(engine)
    s.send_data(sid, b"one")
    first = s.data_to_send()
    s.send_data(sid, b"two")
    second = s.data_to_send()
    assert type(first) is bytes and type(second) is bytes
    assert first == data_frame(sid, b"one")
    assert second == data_frame(sid, b"two")


def test_data_to_send_coalesces_frames_from_many_calls(engine):
    s = engine.Session(True)
    a = s.open_stream()
    b = s.open_stream()
    s.send_data(a, b"1")
    s.send_data(b, b"22")
    s.ping(4)
    s.end_stream(a)
    s.reset_stream(b)
    s.go_away(0)
    out = s.data_to_send()
    assert type(out) is bytes
    assert out == (
        wu_frame(a, 0, SYN)
        + wu_frame(b, 0, SYN)
        + data_frame(a, b"1")
        + data_frame(b, b"22")
        + ping_frame(4)
        + wu_frame(a, 0, FIN)
        + wu_frame(b, 0, RST)
        + go_away_frame(0)
    )


def test_large_output_is_one_bytes(engine):
    s, ids = outbound(engine, 40)
    for sid in ids:
        s.send_data(sid, bytes([sid]) * WINDOW)
    out = s.data_to_send()
    assert len(out) == 40 * (WINDOW + 4 * 12)
    frames = parse_frames(out)
    assert len(frames) == 160
    assert all(f.payload == bytes([f.stream_id]) * f.length for f in frames)
    assert s.data_to_send() == b""


# -------------------------------------------------------------------- events


def test_events_are_the_shared_classes(engine):
    s = engine.Session(False)
    s.ping(1)
    chunk = (
        data_frame(1, b"x", SYN)
        + wu_frame(1, 5)
        + wu_frame(1, 0, FIN)
        + wu_frame(3, 0, SYN)
        + wu_frame(3, 0, RST)
        + ping_frame(8)
        + ping_frame(1, ACK)
        + go_away_frame(0)
    )
    evs = s.receive_data(chunk)
    expected = [
        E.StreamOpened,
        E.DataReceived,
        E.WindowUpdated,
        E.StreamEnded,
        E.StreamOpened,
        E.StreamReset,
        E.PingReceived,
        E.PingAcknowledged,
        E.GoAwayReceived,
    ]
    assert [type(e) for e in evs] == expected
    assert all(isinstance(e, E.Event) for e in evs)
    s2 = engine.Session(True)
    s2.open_stream()
    (acc,) = s2.receive_data(wu_frame(1, 0, ACK))
    assert type(acc) is E.StreamAccepted


def test_event_equality_and_repr(engine):
    s = engine.Session(False)
    evs = s.receive_data(data_frame(1, b"hello", SYN) + wu_frame(1, 9) + ping_frame(3) + go_away_frame(2))
    assert evs == [
        E.StreamOpened(1),
        E.DataReceived(1, memoryview(b"hello")),
        E.WindowUpdated(1, 9),
        E.PingReceived(3),
        E.GoAwayReceived(2),
    ]
    assert evs[0] != E.StreamOpened(3)
    assert evs[0] != E.StreamAccepted(1)
    assert evs[1] != E.DataReceived(1, memoryview(b"hellO"))
    assert evs[2] != E.WindowUpdated(1, 8)
    assert [repr(e) for e in evs] == [
        "StreamOpened(stream_id=1)",
        "DataReceived(stream_id=1, data=<5 bytes>)",
        "WindowUpdated(stream_id=1, delta=9)",
        "PingReceived(opaque=3)",
        "GoAwayReceived(code=2)",
    ]
    assert evs[1].stream_id == 1 and bytes(evs[1].data) == b"hello"
    with pytest.raises(TypeError):
        hash(evs[0])

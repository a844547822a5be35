"""fastnat's engines against Go's hashicorp/yamux, over real loopback TCP.

Each test runs for both engines (``engine``: compiled, python) and, where the
side matters, with fastnat dialling (yamux client, odd stream ids) and
accepting (server, even ids). The Go side is ``yamux_peer.go``; see its header
for the command protocol, and ``mux_driver.py`` for how the engine is pumped.

Run: ``python -m pytest tests/interop -q`` (needs Debian's ``golang-go`` and
``golang-github-hashicorp-yamux-dev``; without them the tests are skipped, or
fail when ``CI`` is set). ``FASTNAT_GO`` names another ``go`` binary.
``-m "not slow"`` leaves out the 16 x 64 MiB echo; ``-m "not interop"`` leaves
out the whole directory; ``--no-compiled`` runs the pure-Python engine only.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

import pytest

from fastnat.errors import SessionClosedError
from fastnat.mux_config import MuxConfig

from .go_peer import GoPeer
from .mux_driver import MuxDriver

KiB = 1024
MiB = 1024 * KiB
SPEC_WINDOW = 256 * KiB
T = 15.0  # seconds: the deadline of any single wait in the small tests

Link = Callable[..., tuple[MuxDriver, GoPeer]]


def sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def ours(dials: bool) -> int:
    """Parity of the stream ids fastnat opens: odd when it dials."""
    return 1 if dials else 0


def assert_clean(report: dict, **expected: object) -> None:
    assert report["error"] == "", f"the Go side failed: {report}"
    for key, value in expected.items():
        assert report[key] == value, f"{key}: expected {value!r}, got {report[key]!r} in {report}"


def go_opens(d: MuxDriver, peer: GoPeer, k: int, *action: object) -> list[int]:
    """Have Go open ``k`` streams running ``action``; wait until fastnat saw their SYNs."""
    reply = peer.call("open", k, *action, driver=d)
    assert reply["ok"], reply
    ids = reply["ids"]
    assert len(ids) == k, reply
    d.run_until(lambda: all(i in d.streams for i in ids), T, f"the SYNs of streams {ids}")
    return ids


def wait_all_closed(d: MuxDriver, peer: GoPeer) -> None:
    """Both sides forgot every stream: nothing leaks after ends and resets."""
    d.run_until(lambda: d.session.stream_count == 0, T, "fastnat to forget every stream")
    deadline = time.monotonic() + T
    while True:
        stats = peer.call("stats", driver=d)
        if stats["streams"] == 0:
            return
        assert time.monotonic() < deadline, f"the Go side still has {stats['streams']} streams"
        d.run_for(0.02)


# ---------------------------------------------------------------- streams


@pytest.mark.timeout(60)
def test_streams_in_both_directions(link: Link, fastnat_dials: bool) -> None:
    d, peer = link(fastnat_dials, inbound_mode="echo")

    # fastnat opens; Go echoes. More than one window each way.
    payload = os.urandom(300 * KiB + 7)
    sid = d.open_stream()
    assert sid % 2 == ours(fastnat_dials)
    d.write(sid, b"echo\n" + payload, end=True)
    assert d.read_to_eof(sid, T) == payload
    assert d.streams[sid].accepted
    report = peer.wait_stream(sid, T, d)
    digest = sha(payload)
    assert_clean(report, origin="remote", action="echo", read=len(payload), read_sha256=digest)
    assert_clean(report, written=len(payload), written_sha256=digest)

    # Go opens; fastnat echoes, acknowledging only what it has sent back.
    size = 300 * KiB + 3
    reply = peer.call("open", 3, "echo-check", size, 11, driver=d)
    assert reply["ok"], reply
    ids = reply["ids"]
    assert len(ids) == 3 and all(i % 2 != ours(fastnat_dials) for i in ids), ids
    for i in ids:
        report = peer.wait_stream(i, T, d)
        assert_clean(report, origin="local", match=True, read=size, written=size)
        st = d.streams[i]
        assert st.inbound and st.received == size and st.sent == size
        assert st.hasher.hexdigest() == report["written_sha256"]
    assert sorted(d.opened_by_peer) == sorted(ids)
    wait_all_closed(d, peer)


# ---------------------------------------------------------------- bulk

N_BULK = 16
BULK_SIZE = 64 * MiB
BULK_STRIDE = 4099  # each stream's data starts at its own odd offset of one buffer


@pytest.fixture(scope="module")
def bulk_data() -> tuple[list[memoryview], list[str]]:
    """Different 64 MiB payloads (windows of one random buffer) and their SHA-256."""
    n = N_BULK // 2
    base = memoryview(os.urandom(BULK_SIZE + n * BULK_STRIDE))
    payloads = [base[i * BULK_STRIDE : i * BULK_STRIDE + BULK_SIZE] for i in range(n)]
    return payloads, [sha(p) for p in payloads]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_bulk_echo_16_concurrent_streams_of_64_mib(
    link: Link, fastnat_dials: bool, bulk_data: tuple[list[memoryview], list[str]]
) -> None:
    """16 streams at once, each carrying 64 MiB there and back: 8 opened by
    fastnat and echoed by Go, 8 opened by Go and echoed by fastnat (which
    acknowledges data only once it has sent it back). Every stream's data is
    different; SHA-256 is compared on both ends."""
    payloads, digests = bulk_data
    d, peer = link(fastnat_dials, inbound_mode="echo")
    # A ping gives the engine a round-trip time, which enables window auto-tuning.
    d.ping()
    d.run_until(lambda: d.pings_acknowledged, T, "the ping's answer")

    theirs = go_opens(d, peer, N_BULK // 2, "echo-check", BULK_SIZE, 1000)
    mine = []
    for payload in payloads:
        sid = d.open_stream(mode="hash")
        d.write(sid, b"echo\n")
        d.write(sid, payload, end=True)
        mine.append(sid)
    reports = {sid: peer.wait_stream(sid, 140, d) for sid in mine + theirs}

    for sid, digest in zip(mine, digests):
        st = d.streams[sid]
        assert st.remote_ended and not st.reset, st
        assert st.received == BULK_SIZE and st.hasher.hexdigest() == digest, f"stream {sid}: the echo differs"
        assert_clean(reports[sid], read=BULK_SIZE, read_sha256=digest, written=BULK_SIZE, written_sha256=digest)
    for sid in theirs:
        report = reports[sid]
        assert_clean(report, match=True, read=BULK_SIZE, written=BULK_SIZE)
        st = d.streams[sid]
        assert st.received == BULK_SIZE and st.sent == BULK_SIZE, st
        assert st.hasher.hexdigest() == report["written_sha256"], f"stream {sid}: fastnat received other data"
    assert len({r["written_sha256"] for r in reports.values()}) == N_BULK  # no two streams alike
    wait_all_closed(d, peer)


# ---------------------------------------------------------------- half-close


@pytest.mark.timeout(60)
@pytest.mark.parametrize("opener", ["fastnat", "go"])
def test_half_close_fastnat_ends_first_and_still_reads(link: Link, fastnat_dials: bool, opener: str) -> None:
    """fastnat sends and ends its side; only then does Go send (1 MiB: more than
    one window, so fastnat must keep granting window after its FIN)."""
    d, peer = link(fastnat_dials)
    payload = os.urandom(300 * KiB)
    action = ["sink-send", MiB, 5]
    if opener == "fastnat":
        sid = d.open_stream()
        d.write(sid, " ".join(map(str, action)).encode() + b"\n")
    else:
        (sid,) = go_opens(d, peer, 1, *action)
    d.write(sid, payload, end=True)
    d.flush_out(T)
    assert d.streams[sid].local_ended  # Go sends only once it has seen this end
    data = d.read_to_eof(sid, T)
    assert len(data) == MiB
    report = peer.wait_stream(sid, T, d)
    assert_clean(report, read=len(payload), read_sha256=sha(payload), written=MiB, written_sha256=sha(data))
    wait_all_closed(d, peer)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("opener", ["fastnat", "go"])
def test_half_close_go_ends_first_and_still_reads(link: Link, fastnat_dials: bool, opener: str) -> None:
    """Go sends 1 MiB and ends its side; fastnat reads it all, sees the end, and
    only then sends 1 MiB back, which Go still reads."""
    d, peer = link(fastnat_dials)
    action = ["send", MiB, 9]
    if opener == "fastnat":
        sid = d.open_stream()
        d.write(sid, " ".join(map(str, action)).encode() + b"\n")
    else:
        (sid,) = go_opens(d, peer, 1, *action)
    data = d.read_to_eof(sid, T)
    st = d.streams[sid]
    assert len(data) == MiB and st.remote_ended and not st.local_ended
    assert peer.stream_report(sid) is None  # Go still waits for fastnat's data
    payload = os.urandom(MiB + 1)
    d.write(sid, payload, end=True)
    report = peer.wait_stream(sid, T, d)
    assert_clean(report, written=MiB, written_sha256=sha(data), read=len(payload), read_sha256=sha(payload))
    wait_all_closed(d, peer)


# ---------------------------------------------------------------- refused streams


@pytest.mark.timeout(60)
def test_go_refuses_a_stream_beyond_its_accept_backlog(link: Link, fastnat_dials: bool) -> None:
    d, peer = link(fastnat_dials, go_backlog=2, accept_paused=True)
    payloads = [os.urandom(1000 + i) for i in range(3)]
    ids = []
    for payload in payloads:
        sid = d.open_stream()
        d.write(sid, b"echo\n" + payload, end=True)
        ids.append(sid)
    d.run_until(lambda: d.streams[ids[2]].reset, T, "Go to refuse the third stream")
    d.run_for(0.1)
    for sid in ids[:2]:
        st = d.streams[sid]
        assert not st.reset and not st.accepted, st  # waiting in Go's backlog
    assert peer.call("accept", "resume", driver=d)["ok"]
    for sid, payload in zip(ids[:2], payloads):
        assert d.read_to_eof(sid, T) == payload
        assert_clean(peer.wait_stream(sid, T, d), read=len(payload), read_sha256=sha(payload))
    assert peer.stream_report(ids[2]) is None
    wait_all_closed(d, peer)


@pytest.mark.timeout(60)
def test_go_refuses_a_stream_opened_after_its_go_away(link: Link, fastnat_dials: bool) -> None:
    d, peer = link(fastnat_dials, inbound_mode="echo")
    early = d.open_stream()
    first = os.urandom(100 * KiB)
    d.write(early, b"echo\n" + first)
    assert d.read_exactly(early, len(first), T) == first

    # The driver does not pump while Go sends its Go Away, so fastnat opens the
    # next stream before it reads the Go Away: Go refuses that SYN with RST.
    assert peer.call("goaway")["ok"]
    late = d.open_stream()
    d.write(late, b"echo\nlate", end=True)
    d.run_until(lambda: d.go_away_codes and d.streams[late].reset, T, "the Go Away and the refusal")
    assert d.go_away_codes == [0]
    assert d.session.go_away_received
    with pytest.raises(SessionClosedError):
        d.session.open_stream()

    # A stream opened before the Go Away carries on.
    second = os.urandom(300 * KiB)
    d.write(early, second, end=True)
    assert d.read_to_eof(early, T) == second
    report = peer.wait_stream(early, T, d)
    assert_clean(report, read=len(first) + len(second), read_sha256=sha(first + second))

    # Go Away forbids the receiver's new streams, not the sender's: Go may still
    # open streams, and fastnat (which sent no Go Away) accepts them.
    reply = peer.call("open", 1, "echo-check", 1000, 3, driver=d)
    assert reply["ok"], reply
    assert_clean(peer.wait_stream(reply["ids"][0], T, d), match=True)
    wait_all_closed(d, peer)


@pytest.mark.timeout(60)
def test_fastnat_refuses_a_go_stream_with_reset(link: Link, fastnat_dials: bool) -> None:
    d, peer = link(fastnat_dials, on_open="refuse")
    reply = peer.call("open", 1, "send", 1000, 1, driver=d)
    assert reply["ok"], reply
    (sid,) = reply["ids"]
    report = peer.wait_stream(sid, T, d)
    assert report["kind"] == "reset", report  # yamux.ErrConnectionReset
    # (Go's data may have come in the same read as its SYN, before the refusal.)
    assert d.streams[sid].local_reset and d.session.stream_count == 0

    # The session is unharmed: the next stream is accepted and works.
    d.on_open, d.inbound_mode = "accept", "echo"
    reply = peer.call("open", 1, "echo-check", 100 * KiB, 2, driver=d)
    assert reply["ok"], reply
    assert_clean(peer.wait_stream(reply["ids"][0], T, d), match=True)
    wait_all_closed(d, peer)


@pytest.mark.timeout(60)
def test_fastnat_refuses_go_streams_beyond_its_accept_backlog(link: Link, fastnat_dials: bool) -> None:
    d, peer = link(fastnat_dials, config=MuxConfig(accept_backlog=2), on_open="hold", inbound_mode="echo")
    reply = peer.call("open", 3, "echo-check", 1000, 4, driver=d)
    assert reply["ok"], reply
    ids = reply["ids"]
    d.run_until(lambda: len(d.opened_by_peer) == 2, T, "two streams from Go")
    refused = [i for i in ids if i not in d.opened_by_peer]
    assert len(refused) == 1, (ids, d.opened_by_peer)
    assert peer.wait_stream(refused[0], T, d)["kind"] == "reset"
    assert d.session.pending_accept_count == 2
    for sid in d.opened_by_peer:
        d.accept(sid)
    for sid in d.opened_by_peer:
        assert_clean(peer.wait_stream(sid, T, d), match=True)
    wait_all_closed(d, peer)


# ---------------------------------------------------------------- ping


@pytest.mark.timeout(60)
def test_ping_both_ways(link: Link, fastnat_dials: bool) -> None:
    d, peer = link(fastnat_dials)
    opaques = [d.ping() for _ in range(3)] + [d.session.ping(0xFFFFFFFF)]
    d.run_until(lambda: len(d.pings_acknowledged) == 4, T, "four ping answers")
    assert sorted(d.pings_acknowledged) == sorted(opaques)
    assert d.session.rtt is not None and d.session.rtt >= 0

    for _ in range(2):
        reply = peer.call("ping", driver=d)
        assert reply["ok"] and reply["rtt_ns"] > 0, reply
    assert d.pings_received == [0, 1]  # Go numbers its pings from 0
    d.run_for(0.05)
    assert len(d.pings_acknowledged) == 4  # nothing unexpected came back


# ---------------------------------------------------------------- go away


@pytest.mark.timeout(60)
def test_go_away_from_fastnat(link: Link, fastnat_dials: bool) -> None:
    d, peer = link(fastnat_dials)
    # Streams from both sides, open before the Go Away.
    mine = d.open_stream()
    first = os.urandom(10 * KiB)
    d.write(mine, b"echo\n" + first)
    assert d.read_exactly(mine, len(first), T) == first
    (theirs,) = go_opens(d, peer, 1, "sink-send", 200 * KiB, 8)

    d.go_away(0)
    d.flush_out(T)
    with pytest.raises(SessionClosedError):
        d.session.open_stream()
    reply = peer.call("open", 1, "echo-check", 1000, 1, driver=d)
    assert not reply["ok"] and reply["kind"] == "goaway" and reply["ids"] == [], reply

    # Both streams carry on to their ends.
    d.write(mine, b"after", end=True)
    assert d.read_to_eof(mine, T) == b"after"
    d.write(theirs, b"request", end=True)
    data = d.read_to_eof(theirs, T)
    assert len(data) == 200 * KiB
    assert_clean(peer.wait_stream(mine, T, d), read=len(first) + 5)
    assert_clean(peer.wait_stream(theirs, T, d), read=7, written_sha256=sha(data))
    wait_all_closed(d, peer)


@pytest.mark.timeout(60)
def test_fastnat_refuses_a_syn_that_crosses_its_go_away(link: Link, fastnat_dials: bool) -> None:
    d, peer = link(fastnat_dials)
    # Queue the Go Away but hold it back, so that Go still opens a stream.
    d.hold_output = True
    d.go_away(0)
    reply = peer.call("open", 1, "send", 1000, 1)  # not pumping: Go cannot see the Go Away yet
    assert reply["ok"], reply
    (sid,) = reply["ids"]
    # fastnat reads the SYN (and the data behind it) and queues the refusal.
    d.run_until(lambda: d.session.bytes_to_send >= 24, T, "the RST behind the Go Away")
    d.run_for(0.05)
    assert sid not in d.streams and d.session.stream_count == 0
    d.hold_output = False
    assert peer.wait_stream(sid, T, d)["kind"] == "reset"
    reply = peer.call("open", 1, "send", 1000, 1, driver=d)
    assert reply["kind"] == "goaway", reply


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", [1, 2])
def test_go_away_with_an_error_code_ends_the_go_session(link: Link, fastnat_dials: bool, code: int) -> None:
    d, peer = link(fastnat_dials)
    d.go_away(code)
    peer.wait_event("session-closed", T, d)
    d.run_until(lambda: d.eof, T, "Go to close the connection")
    assert d.session.error is None  # closing the connection is no protocol error


# ---------------------------------------------------------------- windows


BIG_WINDOW = 4 * MiB


@pytest.mark.timeout(60)
@pytest.mark.parametrize("opener", ["fastnat", "go"])
def test_windows_larger_than_256_kib_fastnat_to_go(link: Link, fastnat_dials: bool, opener: str) -> None:
    """Go (MaxStreamWindowSize 4 MiB) advertises its window on SYN or ACK; fastnat
    uses all of it while Go reads nothing."""
    config = MuxConfig(initial_stream_window=BIG_WINDOW, max_stream_window=16 * MiB)
    d, peer = link(fastnat_dials, config=config, go_window=BIG_WINDOW)
    if opener == "fastnat":
        sid = d.open_stream()
        line = b"wait sink\n"
        d.write(sid, line)
        d.run_until(lambda: d.streams[sid].accepted, T, "Go's ACK")
        assert d.session.send_window(sid) == BIG_WINDOW - len(line)
    else:
        (sid,) = go_opens(d, peer, 1, "wait", "sink")
        assert d.session.send_window(sid) == BIG_WINDOW
    payload = os.urandom(6 * MiB)
    d.write(sid, payload, end=True)
    d.run_until(lambda: d.session.send_window(sid) == 0, T, "fastnat to fill Go's window")
    d.run_for(0.2)
    st = d.streams[sid]
    assert st.sent == BIG_WINDOW > SPEC_WINDOW, st  # Go granted no more while reading nothing
    assert peer.call("release", driver=d)["ok"]
    answer = d.read_line(sid, T)
    assert answer == f"{len(payload)} {sha(payload)}\n".encode()
    assert d.read_to_eof(sid, T) == b""
    assert_clean(peer.wait_stream(sid, T, d), read=len(payload))
    wait_all_closed(d, peer)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("opener", ["fastnat", "go"])
def test_windows_larger_than_256_kib_go_to_fastnat(link: Link, fastnat_dials: bool, opener: str) -> None:
    """fastnat (initial window 4 MiB) advertises it on SYN or ACK; Go sends the
    whole 4 MiB before fastnat acknowledges a single byte."""
    config = MuxConfig(initial_stream_window=BIG_WINDOW, max_stream_window=16 * MiB)
    d, peer = link(fastnat_dials, config=config, go_window=BIG_WINDOW, on_open="hold")
    size = 8 * MiB
    if opener == "fastnat":
        sid = d.open_stream()
        assert d.session.receive_window(sid) == BIG_WINDOW  # advertised on the SYN
        d.write(sid, f"send {size} 3\n".encode(), end=True)
        st = d.streams[sid]
    else:
        (sid,) = go_opens(d, peer, 1, "send", size, 3)
        st = d.streams[sid]
        # Until fastnat's ACK, Go has the spec's window; the ACK carries the rest.
        # (A frame being received counts against the window before it is delivered.)
        before = d.session.receive_window(sid)
        assert before <= SPEC_WINDOW - st.received
        d.accept(sid)
        assert d.session.receive_window(sid) == before + BIG_WINDOW - SPEC_WINDOW
        d.end(sid)  # Go drains to the end after sending
    d.run_until(lambda: st.received >= BIG_WINDOW, T, "Go to fill fastnat's window")
    d.run_for(0.3)
    assert st.received == BIG_WINDOW > SPEC_WINDOW and st.acked == 0, st
    assert d.session.receive_window(sid) == 0
    data = d.read_to_eof(sid, T)
    assert len(data) == size
    report = peer.wait_stream(sid, T, d)
    assert_clean(report, written=size, written_sha256=sha(data))
    wait_all_closed(d, peer)

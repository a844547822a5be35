#!/usr/bin/env python3
"""Write the seed corpora of the fuzz targets into ``fuzz/corpus/<target>/``.

    python fuzz/make_corpus.py                    # (re)write every corpus, then replay each seed
    python fuzz/make_corpus.py control proxy      # only these targets
    python fuzz/make_corpus.py --check            # only replay the committed seeds (of every target)
    python fuzz/make_corpus.py --check registry

Targets: ``mux`` (``fuzz_mux.py``), ``control`` (``fuzz_control.py``),
``registry`` (``fuzz_registry.py``), ``proxy`` (``fuzz_proxy.py``).

Every input is laid out as its target reads it: the wire bytes at the front,
the script (options, chunk sizes, commands) at the back, where
``FuzzedDataProvider.ConsumeIntInRange`` takes it from, last byte first
(:class:`Layout`). The ``mux`` seeds are valid yamux frame sequences (some end
in one deliberate protocol error); the ``control`` seeds valid hellos, hello
replies, requests and replies of every kind, in one piece or in pieces, and a
few malformed ones; the ``registry`` seeds sessions with the registry service
(announce, lookup, withdraw, caps, expiry, timers, back-pressure, bad hellos
and requests) and answers to its client; the ``proxy`` seeds address pairs of
every family and a few that must be refused. After writing, every seed is
replayed through its target, which must not crash, and a summary of what each
one reached is printed.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import pathlib
import struct
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TARGETS = ("mux", "control", "registry", "proxy")
fm = fc = fr = fp = None  # the target modules, imported when needed (fuzz_mux needs the compiled engine)

DATA, WU, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8
_HEADER = struct.Struct(">BBHII")  # yamux: version, type, flags, stream id, length


class Layout:
    """Builds one input: wire bytes in front, the script behind them, reversed."""

    def __init__(self) -> None:
        self.wire = bytearray()
        self.script: list[int] = []  # bytes in the order the target consumes them

    def int(self, lo: int, hi: int, value: int) -> None:
        """Encode ``value`` as FuzzedDataProvider.ConsumeIntInRange(lo, hi) reads it."""
        assert lo <= value <= hi, (lo, value, hi)
        span, nbytes = hi - lo, 0
        while nbytes < 8 and span >> (8 * nbytes):
            nbytes += 1
        self.script += (value - lo).to_bytes(nbytes, "big") if nbytes else b""

    def bytes(self, data: bytes) -> None:
        """Bytes FuzzedDataProvider.ConsumeBytes takes from the front."""
        self.wire += data

    def build(self) -> bytes:
        return bytes(self.wire) + bytes(reversed(self.script))


def frame(frame_type: int, flags: int, stream_id: int, length: int | None = None, payload: bytes = b"") -> bytes:
    if length is None:
        length = len(payload)
    return _HEADER.pack(0, frame_type, flags, stream_id, length) + payload


class Seed(Layout):
    """One input of fuzz_mux.py."""

    def __init__(self, opts: int = 0, preopen: int = 0, preping: int = 0) -> None:
        super().__init__()
        self.int(0, 255, opts)
        self.int(*fm.PREOPEN_RANGE, preopen)
        self.int(*fm.PREPING_RANGE, preping)
        self.closed = False

    def chunk(self, data: bytes, *commands: tuple[int, ...]) -> Seed:
        """One receive_data call with ``data``, then the commands (up to 3)."""
        assert not self.closed and data and len(commands) <= fm.MAX_COMMANDS
        for kind in (fm.SIZE_TINY, fm.SIZE_SMALL, fm.SIZE_LARGE):
            lo, hi = fm.SIZE_RANGES[kind]
            if len(data) <= hi:
                break
        else:
            raise ValueError(f"chunk of {len(data)} bytes is too large for one step")
        self.int(0, 3, kind)
        self.int(lo, hi, len(data))
        self.wire += data
        self.int(0, fm.MAX_COMMANDS, len(commands))
        for cmd in commands:
            self.command(*cmd)
        return self

    def pieces(self, data: bytes, size: int) -> Seed:
        """``data`` split into receive_data calls of ``size`` bytes (headers split too)."""
        for pos in range(0, len(data), size):
            self.chunk(data[pos : pos + size])
        return self

    def rest(self, data: bytes) -> Seed:
        """A last chunk taking whatever is left: no commands after it."""
        self.int(0, 3, fm.SIZE_REST)
        self.wire += data
        self.closed = True
        return self

    def command(self, op: int, *args: int) -> None:
        self.int(0, fm.N_OPS - 1, op)
        ranges = {
            fm.OP_ACCEPT: [fm.IDX_RANGE],
            fm.OP_ACK: [fm.IDX_RANGE, fm.ACK_MODE_RANGE],
            fm.OP_SEND: [fm.IDX_RANGE, fm.SEND_RANGE],
            fm.OP_END: [fm.IDX_RANGE],
            fm.OP_RESET: [fm.IDX_RANGE],
            fm.OP_OPEN: [],
            fm.OP_PING: [],
            fm.OP_GO_AWAY: [fm.GO_AWAY_RANGE],
            fm.OP_CLOCK: [fm.CLOCK_MS_RANGE],
            fm.OP_QUERY: [fm.QUERY_RANGE],
            fm.OP_SYNTH: [fm.IDX_RANGE, fm.SYNTH_LEN_RANGE, fm.SYNTH_FLAGS_RANGE, fm.SYNTH_PIECES_RANGE],
            fm.OP_FLUSH: [fm.DRAIN_RANGE],
            fm.OP_MISUSE: [fm.MISUSE_RANGE, fm.IDX_RANGE],
        }[op]
        if op == fm.OP_MISUSE and args and args[0] == 6:
            ranges = ranges + [fm.OPAQUE_RANGE]
        elif op == fm.OP_MISUSE and args and args[0] in (7, 8):
            ranges = ranges + [(0, 2)]
        assert len(args) == len(ranges), (op, args)
        for (lo, hi), value in zip(ranges, args):
            self.int(lo, hi, value)

def mux_seeds() -> dict[str, bytes]:
    assert fm.HEADER.format == _HEADER.format
    AUTO = fm.OPT_AUTO_ACCEPT | fm.OPT_AUTO_ACK
    out: dict[str, bytes] = {}

    # Dialling side: this side opens 1 and 3 and pings; the peer accepts,
    # sends data (one frame split across tiny reads), pings, ends, resets, goes away.
    s = Seed(fm.OPT_AUTO_ACK, preopen=2, preping=1)
    s.chunk(frame(WU, ACK, 1, 0) + frame(WU, ACK, 3, 65536) + frame(DATA, 0, 1, payload=b"hello"),
            (fm.OP_ACK, 0, 0), (fm.OP_SEND, 0, 100))
    s.pieces(frame(DATA, 0, 3, payload=bytes(range(100))), 7)
    s.chunk(frame(PING, ACK, 0, 0) + frame(PING, SYN, 0, 7), (fm.OP_END, 0), (fm.OP_FLUSH, fm.DRAIN_FLUSH_HOLD))
    s.chunk(frame(DATA, FIN, 1, payload=b"bye") + frame(WU, RST, 3, 0) + frame(DATA, 0, 3, payload=b"late"),
            (fm.OP_QUERY, 1), (fm.OP_OPEN,))
    s.chunk(frame(GO_AWAY, 0, 0, 0), (fm.OP_OPEN,), (fm.OP_PING,), (fm.OP_GO_AWAY, 0))
    out["client_lifecycle"] = s.build()

    # Accepting side: the peer opens 1 (window update), 3 (data on the SYN), 5
    # (SYN+FIN); data, half-closes both ways, a reset, a frame for a gone stream.
    s = Seed(AUTO | (1 << fm.OPT_CHUNK_TYPE_SHIFT))
    s.chunk(frame(WU, SYN, 1, 0) + frame(DATA, SYN, 3, payload=b"first") + frame(DATA, SYN | FIN, 5, payload=b"only"),
            (fm.OP_SEND, 0, 1000), (fm.OP_END, 2), (fm.OP_SEND, 1, 10))
    s.pieces(frame(DATA, 0, 1, payload=b"x" * 300), 3)
    s.chunk(frame(WU, FIN, 1, 0) + frame(WU, 0, 3, 4096) + frame(DATA, 0, 3, payload=b"more"),
            (fm.OP_END, 0), (fm.OP_RESET, 1))
    s.chunk(frame(DATA, 0, 3, payload=b"in flight") + frame(PING, SYN, 0, 1) + frame(GO_AWAY, 0, 0, 0),
            (fm.OP_QUERY, 3), (fm.OP_OPEN,))
    s.rest(frame(WU, SYN, 7, 0) + frame(DATA, 0, 7, payload=b"refused"))
    out["server_lifecycle"] = s.build()

    # Flow control on the accepting side with windows larger than 256 KiB and a
    # clock: the peer advertises a larger window on its SYN, the ping gives an
    # RTT, then synthetic 300 KB frames are consumed fast enough to auto-tune.
    s = Seed(AUTO | fm.OPT_CLOCK | 2, preping=1)
    s.chunk(frame(WU, SYN, 1, 262144), (fm.OP_CLOCK, 20))
    s.chunk(frame(PING, ACK, 0, 0), (fm.OP_SEND, 0, 1 << 18), (fm.OP_SYNTH, 0, 300_000, 0, 3), (fm.OP_ACK, 0, 0))
    s.chunk(frame(WU, 0, 1, 100_000), (fm.OP_SYNTH, 0, 400_000, 0, 4), (fm.OP_ACK, 0, 1), (fm.OP_ACK, 0, 0))
    s.chunk(frame(PING, SYN, 0, 9), (fm.OP_CLOCK, 200), (fm.OP_SYNTH, 0, 500_000, 0, 2), (fm.OP_ACK, 0, 0))
    s.chunk(frame(DATA, FIN, 1, payload=b"end"), (fm.OP_ACK, 0, 3), (fm.OP_END, 0))
    out["server_flow_autotune"] = s.build()

    # Flow control on the dialling side, 4 MiB windows: the peer's ACK grants
    # more, its data arrives reassembled from pieces, acknowledged by halves.
    s = Seed(fm.OPT_CLOCK | 3 | (2 << fm.OPT_CHUNK_TYPE_SHIFT), preopen=1, preping=1)
    s.chunk(frame(WU, ACK, 1, 1 << 20) + frame(PING, ACK, 0, 0),
            (fm.OP_SYNTH, 0, 1 << 19, 0, 4), (fm.OP_ACK, 0, 1), (fm.OP_ACK, 0, 1))
    s.chunk(frame(DATA, 0, 1, payload=b"abc" * 50), (fm.OP_ACK, 0, 0), (fm.OP_SEND, 0, 1 << 18), (fm.OP_SEND, 0, 1 << 18))
    s.chunk(frame(WU, 0, 1, 1 << 18) + frame(DATA, SYN, 2, payload=b"peer stream"),
            (fm.OP_ACCEPT, 1), (fm.OP_SEND, 1, 5000), (fm.OP_ACK, 1, 0))
    s.chunk(frame(DATA, FIN, 2, payload=b"done") + frame(WU, FIN, 1, 0), (fm.OP_END, 1), (fm.OP_END, 0))
    out["client_flow_large_windows"] = s.build()

    # Backlog and limits (accept_backlog 2, max_streams 4, 16-byte frames,
    # 2 pings): SYNs beyond the backlog are refused with RST, refused data is
    # discarded, after go away SYNs are refused.
    s = Seed(1, preping=2)
    s.chunk(b"".join(frame(WU, SYN, i, 0) for i in (1, 3, 5, 7)), (fm.OP_ACCEPT, 0), (fm.OP_RESET, 1), (fm.OP_PING,))
    s.chunk(frame(DATA, SYN, 9, payload=b"accepted later") + frame(DATA, SYN, 11, payload=b"refused, discarded"),
            (fm.OP_SEND, 0, 100), (fm.OP_OPEN,), (fm.OP_GO_AWAY, 0))
    s.chunk(frame(WU, SYN, 13, 0) + frame(PING, ACK, 0, 1) + frame(PING, ACK, 0, 5), (fm.OP_OPEN,), (fm.OP_PING,))
    out["server_backlog_limits"] = s.build()

    # Output drained every way (flush, a writer that keeps the view, a writer
    # that fails), and calls outside the happy path between frames.
    s = Seed(AUTO | fm.OPT_FLUSH, preopen=1, preping=1)
    s.chunk(frame(WU, ACK, 2, 0) + frame(WU, ACK, 1, 0) + frame(DATA, SYN, 2, payload=b"hi"),
            (fm.OP_FLUSH, fm.DRAIN_FLUSH_HOLD), (fm.OP_SEND, 0, 300), (fm.OP_MISUSE, 6, 0, 0))
    s.chunk(frame(PING, SYN, 0, 3) + frame(DATA, 0, 1, payload=b"x" * 40),
            (fm.OP_SEND, 1, 70_000), (fm.OP_FLUSH, fm.DRAIN_FLUSH_RAISE), (fm.OP_MISUSE, 2, 1))
    s.chunk(frame(PING, ACK, 0, 0), (fm.OP_MISUSE, 3, 1), (fm.OP_MISUSE, 4, 0), (fm.OP_MISUSE, 5, 1))
    s.chunk(frame(WU, 0, 1, 5), (fm.OP_MISUSE, 7, 0, 0), (fm.OP_MISUSE, 8, 0, 1), (fm.OP_MISUSE, 9, 1))
    s.chunk(frame(DATA, 0, 2, payload=b"y" * 9), (fm.OP_MISUSE, 10, 0), (fm.OP_MISUSE, 11, 0),
            (fm.OP_FLUSH, fm.DRAIN_FLUSH_HOLD))
    s.chunk(frame(DATA, FIN, 2, payload=b"z"), (fm.OP_FLUSH, fm.DRAIN_FLUSH_HOLD_RAISE), (fm.OP_SEND, 1, 100),
            (fm.OP_MISUSE, 1, 0))
    s.chunk(frame(PING, SYN, 0, 4), (fm.OP_MISUSE, 0, 0), (fm.OP_SEND, 1, 200_000), (fm.OP_MISUSE, 12, 1))
    s.chunk(frame(WU, 0, 1, 7), (fm.OP_MISUSE, 13, 0), (fm.OP_PING,))
    out["client_flush_and_misuse"] = s.build()

    # Every frame split across reads of 1-5 bytes (partial headers and payloads).
    wire = (frame(WU, SYN, 1, 0) + frame(DATA, 0, 1, payload=b"0123456789" * 3) + frame(PING, SYN, 0, 77)
            + frame(DATA, SYN | FIN, 3, payload=b"abcdef") + frame(WU, 0, 1, 10) + frame(DATA, FIN, 1, payload=b"!"))
    s = Seed(AUTO | (3 << fm.OPT_CHUNK_TYPE_SHIFT))
    pos, sizes = 0, [1, 2, 3, 5, 4, 1, 12, 13, 11]
    i = 0
    while pos < len(wire):
        n = sizes[i % len(sizes)]
        s.chunk(wire[pos : pos + n])
        pos, i = pos + n, i + 1
    out["split_everywhere"] = s.build()

    # One protocol error each, after a little valid traffic (peer opens stream 1).
    opened = frame(WU, SYN, 1, 0) + frame(DATA, 0, 1, payload=b"ok")
    errors = {
        "bad_version": _HEADER.pack(1, DATA, 0, 1, 0),
        "unknown_type": frame(7, 0, 1, 0),
        "data_on_stream0": frame(DATA, 0, 0, payload=b"zz"),
        "window_update_on_stream0": frame(WU, 0, 0, 5),
        "ping_on_stream": frame(PING, SYN, 5, 1),
        "go_away_on_stream": frame(GO_AWAY, 0, 1, 0),
        "ping_without_flags": frame(PING, 0, 0, 3),
        "syn_wrong_parity": frame(WU, SYN, 2, 0),
        "syn_in_use": frame(DATA, SYN, 1, payload=b"again"),
        "data_after_fin": frame(WU, FIN, 1, 0) + frame(DATA, 0, 1, payload=b"late"),
        "second_fin": frame(WU, FIN, 1, 0) + frame(WU, FIN, 1, 0),
        "beyond_window": frame(DATA, 0, 1, 262_143) + b"partial",
        "window_overflow": frame(WU, 0, 1, 0xFFFFFFFF),
    }
    for name, bad in errors.items():
        s = Seed(AUTO)
        s.chunk(opened, (fm.OP_SEND, 0, 10))
        s.rest(bad)
        out[f"error_{name}"] = s.build()
    return out


def mux_replay(name: str, data: bytes) -> str:
    parts = []
    for client in (True, False):
        trace: list = []
        twin = fm.play(data, client, trace)
        kinds = collections.Counter(ev[0] for ev in trace)
        ended = f"ProtocolError({twin.pure.error!r})" if twin.pure.error else "ok"
        summary = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        parts.append(f"  {'client' if client else 'server'}: {ended}; {summary}")
    return f"{name} ({len(data)} bytes)\n" + "\n".join(parts)


# ------------------------------------------------------------------- control


def message(obj) -> bytes:
    """A message as the control protocol frames it (json.dumps directly, so
    that seeds can hold what fastnat's encoders refuse)."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    return len(body).to_bytes(4, "big") + body


def raw(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def split(data: bytes, *sizes: int) -> list[bytes]:
    """``data`` cut in pieces of ``sizes`` (repeated), the last piece what is left."""
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos : pos + n])
        pos, i = pos + n, i + 1
    return out


def sized(layout: Layout, ranges: dict, chunk: bytes) -> None:
    """A chunk as (kind, size, bytes), the smallest kind it fits in."""
    assert chunk
    for kind in (1, 2, 3):
        lo, hi = ranges[kind]
        if len(chunk) <= hi:
            layout.int(0, 3, kind)
            layout.int(lo, hi, len(chunk))
            layout.bytes(chunk)
            return
    raise ValueError(f"chunk of {len(chunk)} bytes")


def control_input(mode: int, chunks: list[bytes], *, max_size: int = 0, limit: int = 0, views: int = 0,
                  chunk_limits: list[int] | None = None) -> bytes:
    s = Layout()
    s.int(*fc.MODE_RANGE, mode)
    s.int(*fc.MAX_SIZE_RANGE, max_size)
    s.int(*fc.LIMIT_RANGE, limit)
    s.int(*fc.VIEWS_RANGE, views)
    for i, chunk in enumerate(chunks):
        sized(s, fc.SIZE_RANGES, chunk)
        if limit == fc.LIMIT_PER_CHUNK:
            s.int(*fc.CHUNK_LIMIT_RANGE, (chunk_limits or [0])[i % len(chunk_limits or [0])])
    return s.build()


def control_seeds() -> dict[str, bytes]:
    p = fc.proto
    nonce = bytes(range(16))
    ok = p.encode_hello_reply(p.HelloStatus.OK, 1, nonce)
    proof = p.registration_proof(b"secret", nonce, "srv#1")
    out: dict[str, bytes] = {}
    m = fc.MODE_MESSAGES
    h = fc.MODE_HELLO
    r = fc.MODE_HELLO_REPLY

    # What a forwarder reads: hellos, then requests.
    out["client_init"] = control_input(h, [p.encode_hello(p.ROLE_CLIENT) + p.encode_request(1, "client_init", {"server": "srv#1", "port": 80})])
    server = (p.encode_hello(p.ROLE_SERVER) + p.encode_request(1, "reg_serv", {"server": "srv#1", "proof": proof})
              + p.encode_request(2, "reg_port", {"server": "srv#1", "port": 443})
              + p.encode_request(3, "dereg_port", {"server": "srv#1", "port": 443})
              + p.encode_request(4, "dereg_serv", {"server": "srv#1"})
              + p.encode_request(5, "reg_serv", {"server": "other", "proof": None}))
    out["server_session_pieces"] = control_input(h, split(server, 5, 1, 30), limit=fc.LIMIT_ONE)
    registry = (p.encode_hello(p.ROLE_REGISTRY) + p.encode_request(1, "announce", {"key": "__NAT_SRV__srv#1", "value": "1.2.3.4*80", "ttl": 180})
                + p.encode_request(2, "lookup", {"key": "__NAT__FORWARDER__", "max_values": 50})
                + p.encode_request(3, "withdraw", {"key": "k", "value": "v"})
                + p.encode_request(4, "announce", {"key": "k", "value": "v", "ttl": 0.5}))
    out["registry_session"] = control_input(h, split(registry, 7, 60), limit=fc.LIMIT_PER_CHUNK, chunk_limits=[0, 1, 2, 3])
    out["client_misc"] = control_input(h, split(
        p.encode_hello(p.ROLE_CLIENT) + p.encode_request(7, "externaladdr") + p.encode_request(8, "stats")
        + p.encode_request(9, "bidirectional", {"ip": "::1", "port": 9}), 40), limit=fc.LIMIT_TWO)
    out["open_on_a_stream"] = control_input(m, [p.encode_request(0, "open", {"server": "srv#1", "port": 80, "client": ["2001:db8::1", 0]}) + b"client bytes"], views=1)
    out["unicode_ids"] = control_input(h, [p.encode_hello(p.ROLE_CLIENT) + p.encode_request(1, "client_init", {"server": "caf\u00e9#\U0001F600", "port": 1})
                                           + raw(b'{"id":2,"request":"dereg_serv","value":{"server":"\\u00e9\\ud83d\\ude00"}}')])
    out["bad_hello_http"] = control_input(h, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
    out["hello_unknown_role_version"] = control_input(h, [b"FNAT\x09X" + p.encode_request(1, "stats")])
    out["hello_in_bytes"] = control_input(h, split(p.encode_hello(p.ROLE_SERVER) + p.encode_request(1, "dereg_serv", {"server": "a"}), 1), limit=fc.LIMIT_ZERO)

    # What a client reads: hello replies, then replies.
    every = b"".join(p.encode_reply(i, status, value) for i, (status, value) in enumerate([
        (p.Status.CONFIRMED, None), (p.Status.NO_SERVER, "no server"), (p.Status.BSY_SERVER, "busy"),
        (p.Status.FAILED, "failed"), (p.Status.OK, {"ip": "1.2.3.4", "port": 5}), (p.Status.ID_TAKEN, "taken"),
        (p.Status.AUTH_FAILED, "auth"), (p.Status.NOT_REGISTERED, "not"), (p.Status.FULL, "full"),
        (p.Status.ACCEPTED, None), (p.Status.REFUSED, "refused"), (p.Status.BAD_REQUEST, "bad")]))
    out["replies_every_status"] = control_input(r, split(ok + every, 3, 17, 200), limit=fc.LIMIT_ONE)
    out["confirmed_then_data"] = control_input(r, [ok + p.encode_reply(1, p.Status.CONFIRMED) + b"\x00\x00\x00\x05hello from the server"])
    out["lookup_reply"] = control_input(r, [ok[:10], ok[10:] + p.encode_reply(3, p.Status.OK, ["1.2.3.4*1*2", "5.6.7.8*3*4"])])
    out["stats_reply"] = control_input(r, [ok + p.encode_reply(1, p.Status.OK, {"servers": 2, "counters": {"a": 1, "b": [1.5, -2, None, True]}})])
    out["hello_version_unsupported"] = control_input(r, [p.encode_hello_reply(p.HelloStatus.VERSION_UNSUPPORTED, 0, bytes(16), (1, 2, 7))])
    out["hello_busy"] = control_input(r, split(p.encode_hello_reply(p.HelloStatus.BUSY, 0, bytes(16)), 2))
    out["hello_bad_role_and_unknown"] = control_input(r, [p.encode_hello_reply(p.HelloStatus.BAD_ROLE, 0, bytes(16), ()), p.encode_hello_reply(9, 3, nonce)])
    out["hello_reply_not_fnat"] = control_input(r, [b"SSH-2.0-OpenSSH_9.6\r\n"])

    # Malformed messages, one kind each.
    out["oversized_length"] = control_input(m, [message({"id": 1, "request": "stats", "value": None}) + b"\x7f\xff\xff\xff{"], max_size=0)
    out["cap_40"] = control_input(m, [message({"id": 1, "request": "stats", "value": None}) + message({"id": 2, "request": "lookup", "value": {"key": "k", "max_values": 1}})], max_size=2)
    out["cap_0_empty_body"] = control_input(m, [raw(b"") + raw(b"")], max_size=1)
    out["not_utf8"] = control_input(m, [raw(b'{"id":1,"request":"\xff\xfe","value":null}')])
    out["not_json"] = control_input(m, [raw(b'{"id":1,'), raw(b"[1,2")])
    out["nan_infinity"] = control_input(m, [raw(b'{"id":1,"status":"OK","value":NaN}'), raw(b'{"id":2,"status":"OK","value":-Infinity}')])
    out["huge_float"] = control_input(m, [raw(b'{"id":1,"status":"OK","value":1e999}') + raw(b'{"id":2,"status":"OK","value":[1e15,-0.0,1E-400]}')])
    out["lone_surrogates"] = control_input(m, [raw(b'{"id":1,"request":"stats","value":null,"\\ud800":1}'),
                                               raw(b'{"id":2,"status":"FAILED","value":"\\udfff"}')], limit=fc.LIMIT_ONE)
    out["deep_nesting"] = control_input(m, [raw(b'{"id":1,"status":"OK","value":' + b"[" * 60 + b"]" * 60 + b"}"), raw(b"[" * 3000 + b"]" * 3000)])
    out["bad_fields"] = control_input(m, [
        message({"id": 1.0, "request": "stats", "value": None}), message({"id": -1, "request": "stats", "value": None}),
        message({"id": 4294967296, "status": "OK", "value": None}), message({"id": 1, "request": "nope", "value": None}),
        message({"id": 1, "request": "stats"}), message([1, 2, 3]), message({"id": True, "status": "OK", "value": 1})])
    out["bad_values"] = control_input(m, split(b"".join(message({"id": i, "request": name, "value": value}) for i, (name, value) in enumerate([
        ("reg_serv", {"server": "has space", "proof": "ab"}), ("reg_serv", {"server": "x" * 256}),
        ("reg_port", {"server": "s", "port": 0}), ("client_init", {"server": "s", "port": True}),
        ("bidirectional", {"ip": "1.2.3.256", "port": 1}), ("open", {"server": "s", "port": 1, "client": ["fe80::1%eth0", 65536]}),
        ("announce", {"key": "k", "value": "v\n", "ttl": 86401}), ("lookup", {"key": "", "max_values": 1001}),
        ("withdraw", {"key": "k", "value": "v", "more": 1}), ("stats", 0)])), 64), limit=fc.LIMIT_PER_CHUNK, chunk_limits=[1, 0, 2])
    out["partial_tail"] = control_input(m, [p.encode_request(1, "stats") + b"\x00\x00\x00\x10{\"id\""])
    return out


def control_replay(name: str, data: bytes) -> str:
    inp = fc.Input(data)
    fc.TestOneInput(data)
    wire = b"".join(inp.chunks)
    if inp.mode == fc.MODE_HELLO_REPLY:
        found = fc.hello_reply_model(wire)
        stream = wire[found[1]:] if isinstance(found, tuple) else b""
    else:
        stream = wire[fc.proto.HELLO_SIZE:] if inp.mode == fc.MODE_HELLO else wire
    model = fc.Stream(stream, inp.max_size)
    kinds = []
    for msg in model.messages:
        for parse in (fc.proto.parse_request, fc.proto.parse_reply):
            try:
                parsed = parse(msg)
            except fc.ControlProtocolError:
                continue
            kinds.append(getattr(parsed, "request", None) or parsed.status)
            break
        else:
            kinds.append("bad")
    ended = f"; then {model.error}" if model.error else ""
    mode = ("messages", "hello", "hello reply")[inp.mode]
    return f"{name} ({len(data)} bytes, {mode}, {len(inp.chunks)} chunks): {', '.join(kinds) or 'no message'}{ended}"


# ------------------------------------------------------------------- registry


def registry_service_input(opts: int, steps: list[tuple], first: bytes | None = None) -> bytes:
    """``steps``: (chunk, command[, clock seconds]); ``first``: what follows the hello in a hand-over."""
    s = Layout()
    s.int(*fr.SIDE_RANGE, fr.SIDE_SERVICE)
    s.int(*fr.OPT_RANGE, opts)
    if opts & fr.OPT_HANDOVER:
        sized(s, fr.SIZE_RANGES, first)
    for chunk, command, *arg in steps:
        sized(s, fr.SIZE_RANGES, chunk)
        s.int(*fr.CMD_RANGE, command)
        if command == fr.CMD_CLOCK:
            s.int(*fr.CLOCK_RANGE, arg[0])
    return s.build()


def registry_client_input(calls: list[tuple[int, int]], connections: list[bytes]) -> bytes:
    s = Layout()
    s.int(*fr.SIDE_RANGE, fr.SIDE_CLIENT)
    s.int(*fr.CALLS_RANGE, len(calls))
    for op, max_values in calls:
        s.int(*fr.OP_RANGE, op)
        if op == fr.OP_LOOKUP:
            s.int(*fr.MAX_VALUES_RANGE, max_values)
    for data in connections:
        eof = fr.EOF_ON_READ
        if isinstance(data, tuple):
            data, eof = data
        sized(s, fr.SIZE_RANGES, data)
        s.int(*fr.EOF_RANGE, eof)
    return s.build()


def registry_seeds() -> dict[str, bytes]:
    p = fr.proto
    hello = p.encode_hello(p.ROLE_REGISTRY)
    ok = p.encode_hello_reply(p.HelloStatus.OK, 1, bytes(range(1, 17)))
    none, clock, timer, eof, lost = fr.CMD_NONE, fr.CMD_CLOCK, fr.CMD_TIMER, fr.CMD_EOF, fr.CMD_LOST

    def req(i, name, **value):
        return p.encode_request(i, name, value)

    def ann(i, key, value, ttl=30):
        return req(i, "announce", key=key, value=value, ttl=ttl)

    def look(i, key, n=5):
        return req(i, "lookup", key=key, max_values=n)

    def wd(i, key, value):
        return req(i, "withdraw", key=key, value=value)

    out: dict[str, bytes] = {}
    small = fr.OPT_SMALL_STORE
    out["service_session"] = registry_service_input(0, [
        (hello + ann(1, "k", "a") + ann(2, "k", "b"), none), (look(3, "k"), none),
        (ann(4, "k", "a", 60) + wd(5, "k", "b") + look(6, "k"), none), (wd(7, "nope", "x") + look(8, "nope"), none)])
    out["service_hello_in_bytes"] = registry_service_input(0, [(hello[i:i + 1], none) for i in range(6)] + [(ann(1, "k", "v"), none)])
    out["service_expiry"] = registry_service_input(small, [
        (hello + ann(1, "k", "short", 5) + ann(2, "k", "long", 500), clock, 10), (look(3, "k") + ann(4, "k", "short", 5), clock, 1000),
        (look(5, "k") + ann(6, "k2", "v", 1) + ann(7, "k3", "v", 1), clock, 2), (ann(8, "k4", "v") + look(9, "k4"), none)])
    out["service_caps"] = registry_service_input(small, [
        (hello + ann(1, "a", "1") + ann(2, "a", "2") + ann(3, "a", "3") + ann(4, "b", "1") + ann(5, "c", "1"), none),
        (ann(6, "d", "1") + ann(7, "a", "1") + look(8, "a", 1), none), (wd(9, "a", "1") + ann(10, "a", "3"), none)])
    pipelined = ann(1, "x", "y") + ann(2, "k", "v") + look(3, "k")
    out["service_handover_pieces"] = registry_service_input(fr.OPT_HANDOVER, [(piece, none) for piece in split(pipelined[20:], 9)],
                                                            first=pipelined[:20])
    out["service_backpressure"] = registry_service_input(fr.OPT_PAUSE_WRITES | fr.OPT_HANDOVER, [
        (b"".join(look(i, "k", 1) for i in range(2, 7)), none), (wd(7, "k", "v") + ann(8, "k", "w"), timer)], first=ann(1, "k", "v"))
    out["service_bad_request_after_good"] = registry_service_input(0, [
        (hello + ann(1, "k", "v") + message({"id": 7, "request": "stats", "value": None}) + look(8, "k"), none)])
    out["service_bad_requests"] = registry_service_input(0, [
        (hello + raw(b'{"id":3,"request":"announce","value":{"key":"k","value":"v","ttl":1,"\\ud800":0}}'), none)])
    out["service_oversized"] = registry_service_input(fr.OPT_SMALL_MESSAGES, [(hello + look(1, "k") + ann(2, "k" * 60, "v"), none)])
    out["service_not_json"] = registry_service_input(0, [(hello + raw(b"\xff{"), none)])
    out["service_bad_hellos"] = registry_service_input(0, [(b"GET / HTTP/1.0\r\n\r\n", none)])
    out["service_client_role"] = registry_service_input(0, [(p.encode_hello(p.ROLE_CLIENT) + look(1, "k"), none)])
    out["service_bad_version"] = registry_service_input(0, [(b"FNAT\x07R", none)])
    out["service_at_cap"] = registry_service_input(fr.OPT_AT_CAP, [(hello + look(1, "k"), timer), (look(2, "k"), lost)])
    out["service_hello_timeout"] = registry_service_input(0, [(b"FNA", timer)])
    out["service_idle_then_abort"] = registry_service_input(0, [(hello + ann(1, "k", "v"), timer), (look(2, "k"), timer)])
    out["service_eof"] = registry_service_input(0, [(hello + ann(1, "k", "v") + look(2, "k")[:7], eof)])

    full = p.encode_reply(1, p.Status.FULL, "the registry holds its maximum of 3 keys")
    out["client_lookup"] = registry_client_input([(fr.OP_LOOKUP, 3)], [ok + p.encode_reply(1, p.Status.OK, ["a", "b", "c"])])
    out["client_three_calls"] = registry_client_input([(fr.OP_ANNOUNCE, 0), (fr.OP_LOOKUP, 2), (fr.OP_WITHDRAW, 0)], [
        ok + p.encode_reply(1, p.Status.OK) + p.encode_reply(2, p.Status.OK, ["x"]) + p.encode_reply(3, p.Status.OK)])
    out["client_reconnects"] = registry_client_input([(fr.OP_ANNOUNCE, 0), (fr.OP_LOOKUP, 4)], [
        (ok + p.encode_reply(1, p.Status.OK), fr.EOF_AT_ONCE), ok + p.encode_reply(2, p.Status.OK, [])])
    out["client_stale_connection"] = registry_client_input([(fr.OP_ANNOUNCE, 0), (fr.OP_WITHDRAW, 0), (fr.OP_LOOKUP, 1)], [
        ok + p.encode_reply(1, p.Status.OK), ok + p.encode_reply(3, p.Status.OK), (ok + p.encode_reply(5, p.Status.OK, ["v"]), fr.EOF_AT_ONCE)])
    out["client_cut_mid_reply"] = registry_client_input([(fr.OP_ANNOUNCE, 0), (fr.OP_WITHDRAW, 0)], [
        ok + p.encode_reply(1, p.Status.OK) + p.encode_reply(2, p.Status.OK)[:3], (ok + p.encode_reply(3, p.Status.OK), fr.EOF_AT_ONCE)])
    out["client_full"] = registry_client_input([(fr.OP_ANNOUNCE, 0), (fr.OP_LOOKUP, 1)], [ok + full + p.encode_reply(2, p.Status.OK, ["a", "b"])])
    out["client_wrong_id"] = registry_client_input([(fr.OP_LOOKUP, 1)], [ok + p.encode_reply(2, p.Status.OK, ["a"])])
    out["client_bad_request"] = registry_client_input([(fr.OP_WITHDRAW, 0)], [ok + p.encode_reply(1, p.Status.BAD_REQUEST, "no")])
    out["client_busy"] = registry_client_input([(fr.OP_LOOKUP, 2), (fr.OP_LOOKUP, 2)], [
        p.encode_hello_reply(p.HelloStatus.BUSY, 0, bytes(16)), p.encode_hello_reply(p.HelloStatus.VERSION_UNSUPPORTED, 0, bytes(16), (2,))])
    out["client_not_a_registry"] = registry_client_input([(fr.OP_ANNOUNCE, 0)], [b"HTTP/1.1 400 Bad Request\r\n\r\n"])
    out["client_garbled_reply"] = registry_client_input([(fr.OP_LOOKUP, 4), (fr.OP_LOOKUP, 4)], [
        ok + raw(b'{"id":1,"status":"OK","value":["a",1]}'), ok + raw(b'{"id":2,"status":"OK","value":1e999}')])
    return out


def registry_replay(name: str, data: bytes) -> str:
    fr.TestOneInput(data)
    return f"{name} ({len(data)} bytes): {fr.last_summary}"


# ------------------------------------------------------------------- proxy


def proxy_input(*addresses: tuple) -> bytes:
    """Each address: (box, host, port), with host (kind, *args) and port (kind, *args)
    as fuzz_proxy.host() and port() read them (``text`` arguments are str)."""
    s = Layout()

    def text(value: str) -> None:
        data = value.encode("utf-8", "surrogateescape")
        s.int(*fp.TEXT_RANGE, len(data))
        s.bytes(data)

    def host(spec) -> None:
        kind, *args = spec
        s.int(*fp.HOST_RANGE, kind)
        zone = None
        if kind == fp.HOST_V4:
            s.int(0, 2**32 - 1, args[0])
            zone = args[1:]
        elif kind in (fp.HOST_V6, fp.HOST_V6_EXPLODED):
            s.int(0, 2**64 - 1, args[0] >> 64)
            s.int(0, 2**64 - 1, args[0] & (2**64 - 1))
            zone = args[1:]
        elif kind == fp.HOST_V4_MAPPED:
            s.int(0, 2**32 - 1, args[0])
            zone = args[1:]
        elif kind == fp.HOST_V4_EMBEDDED:
            s.int(0, 2**64 - 1, args[0])
            s.int(0, 2**32 - 1, args[1])
            zone = args[2:]
        elif kind == fp.HOST_QUAD:
            s.int(0, len(fp.SEPARATORS) - 1, fp.SEPARATORS.index(args[0]))
            for number in args[1]:
                s.int(*fp.QUAD_RANGE, number)
        elif kind == fp.HOST_DECORATED:
            host(args[0])
            text(args[1])
            text(args[2])
        elif kind == fp.HOST_TEXT:
            text(args[0])
        else:
            s.int(0, 4, args[0])
        if zone is not None:
            if not zone:
                s.int(*fp.ZONE_RANGE, 0)
            elif zone[0] == "%":
                s.int(*fp.ZONE_RANGE, 2)
            else:
                s.int(*fp.ZONE_RANGE, 1)
                text(zone[0])

    def port(spec) -> None:
        kind, *args = spec
        s.int(*fp.PORT_RANGE, kind)
        bounds = {fp.PORT_OK: (0, 65535), fp.PORT_ANY: (-(2**63), 2**63 - 1), fp.PORT_BOOL: (0, 1),
                  fp.PORT_FLOAT: (-70000, 70000), fp.PORT_STR: (0, 65535), fp.PORT_HUGE: (0, 2**32)}
        if kind in bounds:
            s.int(*bounds[kind], args[0])

    for box, host_spec, port_spec, *extra in addresses:
        s.int(*fp.BOX_RANGE, box)
        host(host_spec)
        port(port_spec)
        if box == fp.BOX_SOCKADDR6:
            s.int(0, 2**20, extra[0])
            s.int(0, 2**32 - 1, extra[1])
        elif box == fp.BOX_NOT_SEQ:
            s.int(0, 1, extra[0])
    return s.build()


def proxy_seeds() -> dict[str, bytes]:
    T, L, S6, SHORT, NS = fp.BOX_TUPLE, fp.BOX_LIST, fp.BOX_SOCKADDR6, fp.BOX_SHORT, fp.BOX_NOT_SEQ
    v4, v6, v6x, mapped, emb = fp.HOST_V4, fp.HOST_V6, fp.HOST_V6_EXPLODED, fp.HOST_V4_MAPPED, fp.HOST_V4_EMBEDDED
    port = (fp.PORT_OK, 443)
    a, b = 0xC0000201, 0x0A000001  # 192.0.2.1, 10.0.0.1
    v6a = 0x20010DB8 << 96 | 1  # 2001:db8::1
    return {
        "tcp4": proxy_input((T, (v4, a), (fp.PORT_OK, 51234)), (T, (v4, b), port)),
        "tcp4_extremes": proxy_input((L, (v4, 0), (fp.PORT_OK, 0)), (L, (v4, 2**32 - 1), (fp.PORT_OK, 65535))),
        "tcp6": proxy_input((S6, (v6, v6a), port, 0, 0), (S6, (v6, 1), (fp.PORT_OK, 8080), 5, 2)),
        "tcp6_exploded_longest": proxy_input((T, (v6x, 2**128 - 1), (fp.PORT_OK, 65535)), (T, (v6x, 2**128 - 2), (fp.PORT_OK, 65535))),
        "mixed_families": proxy_input((T, (v4, a), port), (S6, (v6, v6a), port, 0, 0)),
        "mapped_and_embedded": proxy_input((T, (mapped, a), port), (T, (emb, 0x20010DB8 << 32, b), port)),
        "zones": proxy_input((S6, (v6, 0xFE80 << 112 | 1, "eth0 \r\nPROXY TCP4 6.6.6.6"), port, 0, 3), (T, (v6, 1, "%"), port)),
        "quads": proxy_input((T, (fp.HOST_QUAD, ".", (1, 2, 3, 256)), port), (T, (fp.HOST_QUAD, " ", (1, 2, 3, 4)), port)),
        "quad_negative": proxy_input((T, (fp.HOST_QUAD, ".", (-1, 0, 0, 1)), port), (T, (v4, b), port)),
        "injection": proxy_input((T, (fp.HOST_DECORATED, (v4, a), "", " 6.6.6.6 1 2\r\n"), port), (T, (v4, b), port)),
        "injection_crlf_front": proxy_input((T, (v4, a), port), (T, (fp.HOST_DECORATED, (v6, 1), "\r\n", ""), port)),
        "text_hosts": proxy_input((T, (fp.HOST_TEXT, "localhost"), port), (T, (fp.HOST_TEXT, "\u0661.\u0662.\u0663.\u0664"), port)),
        "ports_out_of_range": proxy_input((T, (v4, a), (fp.PORT_ANY, -1)), (T, (v4, b), (fp.PORT_ANY, 65536))),
        "ports_not_int": proxy_input((T, (v4, a), (fp.PORT_BOOL, 1)), (T, (v4, b), (fp.PORT_STR, 80))),
        "ports_float_none_huge": proxy_input((T, (v4, a), (fp.PORT_FLOAT, 80)), (L, (v4, b), (fp.PORT_HUGE, 5))),
        "not_addresses": proxy_input((SHORT, (v4, a), port), (NS, (fp.HOST_NOT_STR, 3), port, 0)),
        "hosts_not_str": proxy_input((T, (fp.HOST_NOT_STR, 0), port), (T, (fp.HOST_NOT_STR, 2), port)),
    }


def proxy_replay(name: str, data: bytes) -> str:
    fdp = fp.atheris.FuzzedDataProvider(data)
    source, destination = fp.address(fdp)[0], fp.address(fdp)[0]
    fp.TestOneInput(data)
    try:
        result = fp.pp.proxy_v1_header(source, destination)
    except ValueError as exc:
        result = f"ValueError: {exc}"
    return f"{name} ({len(data)} bytes): {source!r} -> {destination!r}: {result!r}"


# ------------------------------------------------------------------- driver


def load(target: str):
    global fm, fc, fr, fp
    module = importlib.import_module(f"fuzz_{target}")
    if target == "mux":
        fm = module
        return mux_seeds, mux_replay
    if target == "control":
        fc = module
        return control_seeds, control_replay
    if target == "registry":
        fr = module
        return registry_seeds, registry_replay
    fp = module
    return proxy_seeds, proxy_replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only replay the committed seeds")
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"{', '.join(TARGETS)} (default: all)")
    args = parser.parse_args()
    for target in args.targets:
        if target not in TARGETS:
            parser.error(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    for target in args.targets or TARGETS:
        make, replay = load(target)
        corpus_dir = HERE / "corpus" / target
        if args.check:
            corpus = {p.name: p.read_bytes() for p in sorted(corpus_dir.iterdir())}
        else:
            corpus = make()
            assert len(corpus) < 50, f"{target}: keep the corpus small ({len(corpus)} seeds)"
            corpus_dir.mkdir(parents=True, exist_ok=True)
            for old in corpus_dir.iterdir():
                old.unlink()
            for name, data in corpus.items():
                (corpus_dir / name).write_bytes(data)
        for name, data in corpus.items():
            print(replay(name, data))
        print(f"{len(corpus)} seeds in {corpus_dir.relative_to(HERE.parent)}, {sum(map(len, corpus.values()))} bytes\n")


if __name__ == "__main__":
    main()

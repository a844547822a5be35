#!/usr/bin/env python3
"""Write the seed corpus of ``fuzz/fuzz_mux.py`` into ``fuzz/corpus/mux/``.

    python fuzz/make_corpus.py            # (re)write the seeds, then replay each one
    python fuzz/make_corpus.py --check    # only replay the committed seeds

Each seed is a valid yamux frame sequence (some end in one deliberate protocol
error) laid out as the fuzz target reads its input: the wire bytes at the front,
the script (options, chunk sizes, commands) at the back, where
``FuzzedDataProvider.ConsumeIntInRange`` takes it from, last byte first.
After writing, every seed is replayed through the target in both roles, which
must not crash, and a summary of what each one reached is printed.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fuzz_mux as fm  # noqa: E402

CORPUS = HERE / "corpus" / "mux"
HEADER = fm.HEADER
DATA, WU, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8


def frame(frame_type: int, flags: int, stream_id: int, length: int | None = None, payload: bytes = b"") -> bytes:
    if length is None:
        length = len(payload)
    return HEADER.pack(0, frame_type, flags, stream_id, length) + payload


class Seed:
    """Builds one input: wire bytes in front, the script behind them, reversed."""

    def __init__(self, opts: int = 0, preopen: int = 0, preping: int = 0) -> None:
        self.wire = bytearray()
        self.script: list[int] = []  # bytes in the order the target consumes them
        self.int(0, 255, opts)
        self.int(*fm.PREOPEN_RANGE, preopen)
        self.int(*fm.PREPING_RANGE, preping)
        self.closed = False

    def int(self, lo: int, hi: int, value: int) -> None:
        """Encode ``value`` as FuzzedDataProvider.ConsumeIntInRange(lo, hi) reads it."""
        assert lo <= value <= hi, (lo, value, hi)
        span, nbytes = hi - lo, 0
        while nbytes < 8 and span >> (8 * nbytes):
            nbytes += 1
        self.script += (value - lo).to_bytes(nbytes, "big") if nbytes else b""

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

    def build(self) -> bytes:
        return bytes(self.wire) + bytes(reversed(self.script))


AUTO = fm.OPT_AUTO_ACCEPT | fm.OPT_AUTO_ACK


def seeds() -> dict[str, bytes]:
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
        "bad_version": HEADER.pack(1, DATA, 0, 1, 0),
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


def replay(name: str, data: bytes) -> str:
    parts = []
    for client in (True, False):
        trace: list = []
        twin = fm.play(data, client, trace)
        kinds = collections.Counter(ev[0] for ev in trace)
        ended = f"ProtocolError({twin.pure.error!r})" if twin.pure.error else "ok"
        summary = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        parts.append(f"  {'client' if client else 'server'}: {ended}; {summary}")
    return f"{name} ({len(data)} bytes)\n" + "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only replay the seeds in fuzz/corpus/mux")
    args = parser.parse_args()
    if args.check:
        corpus = {p.name: p.read_bytes() for p in sorted(CORPUS.iterdir())}
    else:
        corpus = seeds()
        CORPUS.mkdir(parents=True, exist_ok=True)
        for old in CORPUS.iterdir():
            old.unlink()
        for name, data in corpus.items():
            (CORPUS / name).write_bytes(data)
    for name, data in corpus.items():
        print(replay(name, data))
    print(f"{len(corpus)} seeds in {CORPUS.relative_to(HERE.parent)}, {sum(map(len, corpus.values()))} bytes")


if __name__ == "__main__":
    main()

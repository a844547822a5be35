#!/usr/bin/env python3
"""Memory of idle streams, and a forwarder under a crowd of idle connections (issue 7).

    python bench/report_memory.py                       # both parts, about 1 minute
    python bench/report_memory.py --part streams        # idle streams only
    python bench/report_memory.py --servers 1000 --clients 10000 --json memory.json

**Idle streams** (target: at most 2 KiB per stream, engine and asyncio layer
together). In a fresh process per engine (compiled; pure with
FASTNAT_NO_EXTENSIONS=1), two sessions over a loopback socket pair open
--streams streams, the other side accepting each; nothing is sent on them.
Reported per stream and per side: the growth of the resident set (everything,
C allocations included) and of what tracemalloc traces (Python objects, the
compiled engine's included), for streams as asyncio transports
(``open_transport``, what the forwarder holds) and as ``MuxStream`` reader /
writer pairs (``open_stream``, what an application holds).

**A crowded forwarder** (target: a new client's round trip within 2x of an idle
forwarder's). A forwarder process (``python -m fastnat forwarder``), a probe
server process (an echo server registered as ``probe``) and the driver as the
client, all on 127.0.0.1. The driver measures a new client (connect, then 64-byte
round trips) against the idle forwarder; then a load process registers
--servers servers and opens --clients client connections to them that stay
idle, and the driver measures again; then the load goes away and it measures
once more. The crowded figures are compared with the mean of the two idle ones.
The forwarder's resident set is reported at each step.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pathlib
import re
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import net_bench as nb  # noqa: E402
from procs import ProcessGroup  # noqa: E402

HERE = pathlib.Path(__file__).resolve()
STREAM_TARGET = 2048  # bytes per idle stream (issue 7)
CROWD_TARGET = 2.0  # crowded / idle round trip (issue 7)
PROBE_ID, PROBE_PORT = "probe", 7
MESSAGE = b"x" * 64
# Bounds (seconds).
START_TIMEOUT = 30.0
LOAD_TIMEOUT = 300.0
# Concurrent registrations and connections of the load process: below the
# forwarder's default limit of 1,024 pending handshakes.
LOAD_BATCH = 200


def rss_of(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# ------------------------------------------------------------ idle streams


async def _idle_streams(kind: str, n: int, trace: bool) -> dict[str, Any]:
    import socket
    import tracemalloc

    import fastnat.mux
    from fastnat.aio.session import MuxSession

    a, b = socket.socketpair()
    opener = await MuxSession.from_socket(a, client=True)
    acceptor = await MuxSession.from_socket(b, client=False)
    await opener.ping()
    gc.collect()
    rss_before = rss_of()
    if trace:
        tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0] if trace else 0
    opened: list[Any] = []
    accepted: list[Any] = []

    async def accept_all() -> None:
        for _ in range(n):
            accepted.append(await (acceptor.accept_transport() if kind == "transport" else acceptor.accept_stream()))

    accepting = asyncio.get_running_loop().create_task(accept_all())
    for i in range(n):
        opened.append(opener.open_transport() if kind == "transport" else await opener.open_stream())
        if i % 128 == 127:
            await opener.ping()  # keep within the peer's accept backlog
    await asyncio.wait_for(accepting, 60)
    await opener.ping()
    await acceptor.ping()
    assert opener.stream_count == acceptor.stream_count == len(accepted) == n
    gc.collect()
    per_side = 2 * n
    result = {"engine": fastnat.mux.IMPLEMENTATION, "kind": kind, "streams": n,
              "rss_per_stream": (rss_of() - rss_before) / per_side}
    if trace:
        result["traced_per_stream"] = (tracemalloc.get_traced_memory()[0] - traced_before) / per_side
        tracemalloc.stop()
    opener.close()
    acceptor.close()
    return result


def child_streams(kind: str, n: int, trace: bool) -> None:
    emit({"event": "result", **asyncio.run(_idle_streams(kind, n, trace))})


def report_streams(args: argparse.Namespace, out: dict[str, Any]) -> None:
    rows = []
    with ProcessGroup("streams") as group:
        for engine in ("compiled", "pure"):
            env = dict(os.environ)
            env.pop("FASTNAT_NO_EXTENSIONS", None)
            if engine == "pure":
                env["FASTNAT_NO_EXTENSIONS"] = "1"
            for kind in ("transport", "stream"):
                got = {}
                # tracemalloc costs memory of its own: the resident set is
                # measured in a run without it.
                for trace in (False, True):
                    proc = group.start(f"{engine}-{kind}", [sys.executable, HERE, "--child-streams", kind, args.streams,
                                                            *(["--trace"] if trace else [])], env=env)
                    got[trace] = proc.expect_json("result", START_TIMEOUT + 60)
                    proc.stop()
                rows.append({"engine": got[False]["engine"], "kind": kind, "streams": args.streams,
                             "rss_per_stream": got[False]["rss_per_stream"],
                             "traced_per_stream": got[True]["traced_per_stream"]})
    out["streams"] = rows
    print(f"\n**Idle streams**: {args.streams:,} streams on one session pair, bytes per stream and side\n")
    print("| engine | stream as | resident set | traced by tracemalloc | ≤ 2 KiB |")
    print("|---|---|---:|---:|---|")
    for r in rows:
        worst = max(r["rss_per_stream"], r["traced_per_stream"])
        print(f"| {r['engine']} | {'asyncio transport' if r['kind'] == 'transport' else 'MuxStream (reader, writer)'} "
              f"| {r['rss_per_stream']:,.0f} | {r['traced_per_stream']:,.0f} | "
              f"{'met' if worst <= STREAM_TARGET else '**not met**'} |")


# ------------------------------------------------------- crowded forwarder


async def _probe_server(forwarder: str) -> None:
    from fastnat.aio import start_server

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
        finally:
            writer.close()

    server = await start_server(echo, PROBE_ID, PROBE_PORT, forwarder=forwarder)
    emit({"event": "ready"})
    await _until_stdin_eof()
    server.close()


async def _until_stdin_eof() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


async def _load(forwarder: str, servers: int, clients: int) -> None:
    import resource

    from fastnat.aio import open_connection, start_server

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: list[Any] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # idle until the client goes

    started = time.monotonic()
    registered: list[Any] = []
    for first in range(0, servers, LOAD_BATCH):
        batch = range(first, min(first + LOAD_BATCH, servers))
        registered += await asyncio.gather(*(start_server(hold, f"idle-{i}", 1, forwarder=forwarder) for i in batch))
    connected: list[Any] = []
    for first in range(0, clients, LOAD_BATCH):
        batch = range(first, min(first + LOAD_BATCH, clients))
        connected += await asyncio.gather(*(open_connection(f"idle-{i % servers}", 1, forwarder=forwarder)
                                            for i in batch))
    emit({"event": "ready", "servers": len(registered), "clients": len(connected),
          "seconds": round(time.monotonic() - started, 1)})
    await _until_stdin_eof()
    for _, writer in connected:
        writer.close()
    for server in registered:
        server.close()


async def _measure(forwarder: str, round_trips: int, connects: int) -> dict[str, float]:
    from fastnat.aio import open_connection

    connect_times = []
    for _ in range(connects):
        t0 = time.perf_counter()
        reader, writer = await open_connection(PROBE_ID, PROBE_PORT, forwarder=forwarder)
        connect_times.append(time.perf_counter() - t0)
        writer.write(MESSAGE)
        await reader.readexactly(len(MESSAGE))
        writer.close()
    reader, writer = await open_connection(PROBE_ID, PROBE_PORT, forwarder=forwarder)
    rtts = []
    for i in range(round_trips + round_trips // 10):
        t0 = time.perf_counter()
        writer.write(MESSAGE)
        await reader.readexactly(len(MESSAGE))
        if i >= round_trips // 10:  # the first tenth warms up
            rtts.append(time.perf_counter() - t0)
    writer.close()
    rtts.sort()
    return {"connect_p50": statistics.median(connect_times) * 1e6,
            "rtt_p50": rtts[len(rtts) // 2] * 1e6, "rtt_p99": rtts[int(len(rtts) * 0.99)] * 1e6}


def report_crowd(args: argparse.Namespace, out: dict[str, Any]) -> None:
    from fastnat.aio import run

    with ProcessGroup("crowd") as group:
        fwd = group.start("forwarder", [sys.executable, "-m", "fastnat", "-q", "forwarder", "--host", "127.0.0.1", "--port", "0",
                                        "--max-servers", str(args.servers + 10),
                                        "--max-clients-per-server", str(args.clients)])
        found = fwd.expect_regex(r"^fastnat forwarder listening on (\S+):(\d+)$", START_TIMEOUT)
        forwarder = f"{found.group(1)}:{found.group(2)}"
        probe = group.start("probe", [sys.executable, HERE, "--child-probe", forwarder])
        probe.expect_json("ready", START_TIMEOUT)
        steps: list[dict[str, Any]] = []

        def measure(label: str) -> None:
            figures = run(_measure(forwarder, args.round_trips, args.connects))
            steps.append({"step": label, "forwarder_rss": rss_of(fwd.pid), **figures})
            nb.stderr_log(f"{label}: {figures}\n")

        measure("idle")
        for cycle in range(args.cycles):
            load = group.start("load", [sys.executable, HERE, "--child-load", forwarder, args.servers, args.clients])
            ready = load.expect_json("ready", LOAD_TIMEOUT)
            nb.stderr_log(f"load: {ready}\n")
            again = f" (cycle {cycle + 1})" if args.cycles > 1 else ""
            measure(f"{ready['servers']:,} servers, {ready['clients']:,} idle clients{again}")
            load.stop()
            time.sleep(1.0)  # the forwarder lets go of the load's connections
            measure(f"idle again{again}")
    out["crowd"] = steps
    idle = [steps[0], steps[2]]
    crowded = steps[1]  # the first cycle's; later cycles show whether memory comes back
    print(f"\n**A crowded forwarder**: a new client (connect; {args.round_trips:,} 64-byte round trips after "
          f"{args.round_trips // 10:,}) through an idle forwarder and one holding {args.servers:,} servers and "
          f"{args.clients:,} idle clients\n")
    print("| forwarder | connect p50 (µs) | round trip p50 (µs) | round trip p99 (µs) | forwarder RSS (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for s in steps:
        print(f"| {s['step']} | {s['connect_p50']:,.0f} | {s['rtt_p50']:,.1f} | {s['rtt_p99']:,.1f} | "
              f"{s['forwarder_rss'] / 2**20:,.1f} |")
    print("\n| crowded / idle (mean of both idle runs) | ratio | target |")
    print("|---|---:|---|")
    for key, label in (("rtt_p50", "round trip p50"), ("rtt_p99", "round trip p99"), ("connect_p50", "connect p50")):
        ratio = crowded[key] / statistics.mean(s[key] for s in idle)
        target = f"≤ {CROWD_TARGET:.1f}x: {'met' if ratio <= CROWD_TARGET else '**not met**'}" if key != "connect_p50" else "(shown)"
        print(f"| {label} | {ratio:.2f}x | {target} |")
    per_client = (crowded["forwarder_rss"] - steps[0]["forwarder_rss"]) / (args.servers + args.clients)
    print(f"\nForwarder memory per held connection (servers and clients): {per_client:,.0f} bytes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "streams", "crowd"), default="all")
    parser.add_argument("--streams", type=int, default=10_000, help="idle streams per session (default 10,000)")
    parser.add_argument("--servers", type=int, default=1_000, help="servers of the crowd (default 1,000)")
    parser.add_argument("--clients", type=int, default=10_000, help="idle clients of the crowd (default 10,000)")
    parser.add_argument("--round-trips", type=int, default=2_000, help="round trips per measurement (default 2,000)")
    parser.add_argument("--cycles", type=int, default=1,
                        help="times the crowd comes and goes (more than 1: does the forwarder's memory come back?)")
    parser.add_argument("--connects", type=int, default=50, help="new connections per measurement (default 50)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--child-streams", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-probe", metavar="FORWARDER", help=argparse.SUPPRESS)
    parser.add_argument("--child-load", nargs=3, metavar=("FORWARDER", "SERVERS", "CLIENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_streams:
        child_streams(args.child_streams[0], int(args.child_streams[1]), args.trace)
        return 0
    from fastnat.aio import run

    if args.child_probe:
        run(_probe_server(args.child_probe))
        return 0
    if args.child_load:
        forwarder, servers, clients = args.child_load
        run(_load(forwarder, int(servers), int(clients)))
        return 0

    nb.exit_on_sigterm()
    print("```")
    print(f"$ {nb.command_line()}")
    for line in nb.machine_info():
        print(line)
    print("```")
    out: dict[str, Any] = {}
    started = time.monotonic()
    if args.part in ("all", "streams"):
        report_streams(args, out)
    if args.part in ("all", "crowd"):
        report_crowd(args, out)
    print(f"\nMeasured in {time.monotonic() - started:.0f} s.")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

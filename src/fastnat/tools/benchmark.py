"""``fastnat bench``: relay throughput and latency on this machine, against direct TCP.

Starts a forwarder and a server (each in its own process) on loopback; the
client, in this process, moves bulk data and makes 64-byte round trips once
through the relay and once over a direct TCP connection to the same server
process, in interleaved rounds. Medians are reported, with relay/direct
ratios: on a shared machine absolute figures move, ratios much less.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from fastnat.aio._loop import run
from fastnat.aio.client import open_connection
from fastnat.aio.server import start_server

__all__ = ["run_benchmark", "serve_peer", "BENCH_ID", "BENCH_PORT"]

BENCH_ID = "fastnat-bench"
BENCH_PORT = 1
# Bytes of payload per write: large enough that per-call costs vanish.
_CHUNK = 256 * 1024
_RTT_SIZE = 64
# How long a helper process may take to start and say it is ready.
_START_TIMEOUT = 30.0


# ------------------------------------------------------------- the server side


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """First byte ``S``: count bytes to EOF and answer the count. ``E``: echo to EOF."""
    try:
        mode = await reader.readexactly(1)
        if mode == b"S":
            total = 0
            while data := await reader.read(1 << 20):
                total += len(data)
            writer.write(f"{total}\n".encode())
        else:
            while data := await reader.read(1 << 20):
                writer.write(data)
                await writer.drain()
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve_peer(forwarder: str) -> None:
    """The benchmark's server process: the same handler through the relay
    and on a direct TCP port; prints ``ready PORT`` and runs until stdin closes."""
    relay = await start_server(_handle, BENCH_ID, BENCH_PORT, forwarder=forwarder, persist=False)
    direct = await asyncio.start_server(_handle, "127.0.0.1", 0)
    print(f"ready {direct.sockets[0].getsockname()[1]}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # the parent closes our stdin to stop us
    relay.close()
    await relay.wait_closed()
    direct.close()
    await direct.wait_closed()


# ------------------------------------------------------------- the client side


Opener = Callable[[], Any]


async def _bulk(open_: Opener, size: int) -> float:
    reader, writer = await open_()
    chunk = b"\0" * _CHUNK
    start = time.perf_counter()
    writer.write(b"S")
    sent = 0
    while sent < size:
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
    writer.write_eof()
    answer = await reader.readline()
    elapsed = time.perf_counter() - start
    writer.close()
    if int(answer or b"-1") != sent:
        raise RuntimeError(f"the server counted {answer!r} bytes, {sent} were sent")
    return sent / elapsed / 1e6


async def _round_trips(open_: Opener, count: int) -> list[float]:
    reader, writer = await open_()
    writer.write(b"E")
    message = b"x" * _RTT_SIZE
    times = []
    for i in range(count + count // 10):  # the first tenth warms up
        start = time.perf_counter()
        writer.write(message)
        await reader.readexactly(_RTT_SIZE)
        if i >= count // 10:
            times.append((time.perf_counter() - start) * 1e6)
    writer.write_eof()
    writer.close()
    return times


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        yield proc
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _read_line(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(_START_TIMEOUT):
            raise RuntimeError(f"the {what} did not start within {_START_TIMEOUT:g} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the {what} exited at start (code {proc.poll()})")
    return line.strip()


def run_benchmark(*, size_mib: int = 256, round_trips: int = 2000, rounds: int = 3, progress: TextIO | None = None) -> dict[str, Any]:
    """Run the benchmark; returns medians per path and the ratios."""
    env = dict(os.environ)
    progress = progress or sys.stderr
    with _process([sys.executable, "-m", "fastnat", "-q", "forwarder", "--host", "127.0.0.1", "--port", "0", "--no-embedded-registry"], env) as fwd:
        forwarder = _read_line(fwd, "forwarder").rsplit(" ", 1)[1]
        with _process([sys.executable, "-m", "fastnat", "-q", "_bench-peer", "--forwarder", forwarder], env) as peer:
            direct_port = int(_read_line(peer, "server").split()[1])
            return run(_measure(forwarder, direct_port, size_mib << 20, round_trips, rounds, progress))


async def _measure(forwarder: str, direct_port: int, size: int, count: int, rounds: int, progress: TextIO) -> dict[str, Any]:
    paths: dict[str, Opener] = {
        "relay": lambda: open_connection(BENCH_ID, BENCH_PORT, forwarder=forwarder),
        "direct": lambda: asyncio.open_connection("127.0.0.1", direct_port),
    }
    bulk: dict[str, list[float]] = {p: [] for p in paths}
    rtts: dict[str, list[float]] = {p: [] for p in paths}
    steps = rounds * len(paths) * 2
    done = 0
    await _bulk(paths["relay"], 8 << 20)  # warm-up
    for round_number in range(rounds):
        order = list(paths) if round_number % 2 == 0 else list(reversed(paths))
        for name in order:
            progress.write(f"\r  round {round_number + 1}/{rounds}: {name} bulk ({done}/{steps})   ")
            progress.flush()
            bulk[name].append(await _bulk(paths[name], size))
            done += 1
            progress.write(f"\r  round {round_number + 1}/{rounds}: {name} round trips ({done}/{steps})   ")
            progress.flush()
            rtts[name] += await _round_trips(paths[name], count)
            done += 1
    progress.write("\r" + " " * 60 + "\r")
    progress.flush()
    result: dict[str, Any] = {}
    for name in paths:
        ordered = sorted(rtts[name])
        result[name] = {
            "bulk_mb_s": statistics.median(bulk[name]),
            "rtt_p50_us": ordered[len(ordered) // 2],
            "rtt_p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        }
    relay, direct = result["relay"], result["direct"]
    result["ratios"] = {
        "bulk": relay["bulk_mb_s"] / direct["bulk_mb_s"],
        "rtt_p50": relay["rtt_p50_us"] / direct["rtt_p50_us"],
        "rtt_p99": relay["rtt_p99_us"] / direct["rtt_p99_us"],
    }
    result["settings"] = {"size_mib": size >> 20, "round_trips": count, "rounds": rounds}
    return result


def format_table(result: dict[str, Any]) -> str:
    relay, direct, ratios = result["relay"], result["direct"], result["ratios"]
    rows = [
        ("bulk, client to server", "MB/s", relay["bulk_mb_s"], direct["bulk_mb_s"], ratios["bulk"]),
        ("64-byte round trip, p50", "us", relay["rtt_p50_us"], direct["rtt_p50_us"], ratios["rtt_p50"]),
        ("64-byte round trip, p99", "us", relay["rtt_p99_us"], direct["rtt_p99_us"], ratios["rtt_p99"]),
    ]
    lines = [
        f"{'workload':<26} {'unit':<5} {'through fastnat':>16} {'direct TCP':>12} {'ratio':>7}",
        "-" * 70,
    ]
    for label, unit, a, b, ratio in rows:
        lines.append(f"{label:<26} {unit:<5} {a:>16,.1f} {b:>12,.1f} {ratio:>6.2f}x")
    s = result["settings"]
    lines.append(f"({s['rounds']} rounds, medians; {s['size_mib']} MiB per bulk transfer, {s['round_trips']} round trips per round)")
    return "\n".join(lines)

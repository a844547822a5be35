#!/usr/bin/env python3
"""Soak: a forwarder under churn for a given time; every transfer checked, its memory watched.

    python bench/soak.py --duration 600              # the 10-minute run of the README
    python bench/soak.py --duration 20 --interval 2  # a short run (CI)
    python bench/soak.py --engine python --json soak.json

Processes, all on 127.0.0.1 (started and always reaped by bench/procs.py):

* the forwarder under test: ``python -m fastnat forwarder``;
* a churn process keeping --servers servers registered, each with a random
  lifetime (--lifetime MIN MAX seconds), then gone: most leave cleanly
  (``NATServer.close()``, or ``nat_stopcomm`` for the --blocking-share of them
  registered with the blocking ``nat_waitforconn``), --abort-share of the
  asyncio ones abruptly (their session's TCP connection aborted: an RST, no
  deregistration); each is replaced by a new id. The same process runs
  --clients client loops (``fastnat.aio.open_connection``), each transferring
  to a random live server, back to back;
* a group process holding --group-size servers, SIGKILLed every --kill-every
  seconds and started again with the same ids (a server host that dies, and
  ids that must be free again at once).

A transfer: the client sends sizes (up, down; each log-uniform up to
--max-size) and ``up`` random bytes; the server answers the SHA-256 of what it
received, ``down`` random bytes and their SHA-256; the client checks both
digests and the end of the stream. A transfer that fails is *expected* only
when its server was deliberately taken down after the transfer began
(classified by how: left cleanly, aborted, process killed); a wrong digest
(corruption), a failure nobody caused, or a transfer stuck longer than
TRANSFER_TIMEOUT is an error, and the script exits with status 1.

Every --interval seconds the driver samples the forwarder's resident set
(``/proc/PID/statm``) and its ``stats`` counters (servers, sessions, clients,
bytes relayed), and prints a row. At the end the churn stops, every server
leaves cleanly, and the forwarder must be back to no servers, sessions and
clients within IDLE_TIMEOUT (else exit 1).

Memory rule ("flat after warm-up"): of the samples taken after the warm-up
(--warmup seconds, default a fifth of the run), the median resident set of the
last third may exceed the median of the first third by at most
max(LEAK_FLOOR, LEAK_FRACTION of it); more is reported as a leak (exit 1). The
same rule holds for the interpreter's memory blocks (``python_blocks`` in the
forwarder's stats), with BLOCKS_FLOOR: a leak of Python objects shows there
whatever the C allocator does with freed memory. The least-squares slope over
the same samples is reported beside each. Medians of thirds, not single
samples: both move with the transfers in flight at the moment of a sample.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import pathlib
import random
import statistics
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import net_bench as nb
from procs import HarnessError, Proc, ProcessGroup
from report_memory import rss_of

HERE = pathlib.Path(__file__).resolve()
MiB = 1024 * 1024
PORT = 80  # the NAT port every soak server registers
HEADER = struct.Struct(">QQ")  # a transfer's sizes: bytes up, bytes down
DIGEST_SIZE = hashlib.sha256().digest_size
CHUNK = 64 * 1024  # reads and writes of the transfers
# A header asking for more than this is corruption (the sizes are at most --max-size).
MAX_TRANSFER = 1 << 30
# Bounds, seconds.
START_TIMEOUT = 30.0
TRANSFER_TIMEOUT = 60.0  # a transfer of at most a few MiB on loopback; longer is a hang
CALL_TIMEOUT = 60.0  # a command to the churn process
STOP_TIMEOUT = 120.0  # the churn process winding down: in-flight transfers, then every server leaves
IDLE_TIMEOUT = 15.0  # the forwarder letting go of everything after the churn stopped
REGISTER_RETRY = 5.0  # a killed group's ids: the forwarder may not have seen the RST yet
# Memory rule: growth allowed from the first to the last third after warm-up.
# 4 MiB: the resident set of a forwarder relaying a few MiB transfers moves by
# 1-3 MiB between samples; 5%: the same in proportion for bigger forwarders.
LEAK_FLOOR = 4 * MiB
LEAK_FRACTION = 0.05
# The interpreter's memory blocks (the forwarder's ``python_blocks``): they
# move by a few thousand with the connections in flight at a sample.
BLOCKS_FLOOR = 5_000
MIN_JUDGED_SAMPLES = 6  # fewer samples after warm-up: too short to judge

EXPECTED = {"clean": "server left cleanly", "abort": "server aborted its session",
            "killed": "server process killed"}
ERRORS = ("corrupt", "unexplained", "hang", "registration failed", "server saw corruption")

log = logging.getLogger("soak")


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ verdicts


def memory_verdict(samples: list[tuple[float, int]], warmup: float, floor: float = LEAK_FLOOR,
                   fraction: float = LEAK_FRACTION, unit: str = "MiB") -> dict[str, Any]:
    """Judge ``(seconds, value)`` samples taken under load by the rule of the
    module docstring: the resident set (``unit="MiB"``, values in bytes) or a
    count (``unit="blocks"``)."""
    post = [(t, r) for t, r in samples if t >= warmup]
    if len(post) < MIN_JUDGED_SAMPLES:
        return {"flat": None, "verdict": f"too short to judge ({len(post)} samples after warm-up,"
                                          f" {MIN_JUDGED_SAMPLES} needed)", "samples": len(post)}
    third = len(post) // 3
    base = statistics.median(r for _, r in post[:third])
    end = statistics.median(r for _, r in post[-third:])
    limit = max(floor, fraction * base)
    growth = end - base
    mean_t = statistics.fmean(t for t, _ in post)
    mean_r = statistics.fmean(r for _, r in post)
    var_t = sum((t - mean_t) ** 2 for t, _ in post)
    slope = sum((t - mean_t) * (r - mean_r) for t, r in post) / var_t if var_t else 0.0
    flat = growth <= limit
    scale, per, digits = (MiB, "KiB", 1) if unit == "MiB" else (1, unit, 0)
    per_minute = slope * 60 / (1024 if unit == "MiB" else 1)
    return {
        "flat": flat, "samples": len(post), "base": base, "end": end, "growth": growth, "limit": limit,
        "slope_per_min": per_minute, "unit": per,
        "verdict": (f"{'flat' if flat else 'LEAK'}: {growth / scale:+,.{digits}f} {unit} from the first to the last"
                    f" third after warm-up (limit {limit / scale:,.{digits}f} {unit}); slope {per_minute:+,.0f} {per}/min"),
    }


def explain(server_id: str, started: float, downs: dict[str, list[tuple[float, str]]]) -> str | None:
    """The expected class of a failed transfer to ``server_id`` begun at
    ``started``: how its server was taken down after that, or None."""
    for when, how in downs.get(server_id, ()):
        if when >= started:
            return EXPECTED[how]
    return None


def random_sizes(rng: random.Random, max_size: int) -> tuple[int, int]:
    """Bytes up and down: log-uniform from 1 to ``max_size``, one in ten empty."""
    def one() -> int:
        return 0 if rng.random() < 0.1 else int(2 ** rng.uniform(0, math.log2(max_size)))
    return one(), one()


# ------------------------------------------------------------------ the transfer


class Corrupt(Exception):
    """A transfer's bytes are not the bytes sent."""


async def read_hashed(reader: asyncio.StreamReader, n: int) -> Any:
    """Read exactly ``n`` bytes (in pieces, never all in memory); their sha256."""
    digest = hashlib.sha256()
    left = n
    while left:
        chunk = await reader.read(min(left, CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", left)
        digest.update(chunk)
        left -= len(chunk)
    return digest


async def serve_transfer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counters: Counter[str]) -> None:
    """The server's side of a transfer (asyncio)."""
    try:
        up, down = HEADER.unpack(await reader.readexactly(HEADER.size))
        if up > MAX_TRANSFER or down > MAX_TRANSFER:
            counters["server saw corruption"] += 1
            return
        digest = await read_hashed(reader, up)
        payload = random.randbytes(down)
        writer.write(digest.digest())
        writer.write(payload)
        writer.write(hashlib.sha256(payload).digest())
        await writer.drain()
        counters["served"] += 1
    except (OSError, asyncio.IncompleteReadError):
        counters["server side cut"] += 1  # the client's side says whether that was expected
    finally:
        writer.close()


def serve_transfer_blocking(sock: Any, counters: Counter[str]) -> None:
    """The server's side of a transfer (a ``nat_waitforconn`` function, in its own thread)."""
    def exactly(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = sock.recv(min(n - len(out), CHUNK))
            if not chunk:
                raise ConnectionError("the client's stream ended early")
            out += chunk
        return bytes(out)

    try:
        up, down = HEADER.unpack(exactly(HEADER.size))
        if up > MAX_TRANSFER or down > MAX_TRANSFER:
            counters["server saw corruption"] += 1
            return
        digest = hashlib.sha256()
        left = up
        while left:
            chunk = sock.recv(min(left, CHUNK))
            if not chunk:
                raise ConnectionError("the client's stream ended early")
            digest.update(chunk)
            left -= len(chunk)
        payload = random.randbytes(down)
        sock.sendall(digest.digest() + payload + hashlib.sha256(payload).digest())
        counters["served"] += 1
    except OSError:
        counters["server side cut"] += 1
    finally:
        sock.close()


async def client_transfer(forwarder: str, server_id: str, up: int, down: int, rng: random.Random) -> None:
    """One checked transfer to ``server_id``; Corrupt on wrong bytes."""
    from fastnat.aio import open_connection

    reader, writer = await open_connection(server_id, PORT, forwarder=forwarder)
    try:
        payload = rng.randbytes(up)
        writer.write(HEADER.pack(up, down))
        writer.write(payload)
        await writer.drain()
        echoed = await reader.readexactly(DIGEST_SIZE)
        if echoed != hashlib.sha256(payload).digest():
            raise Corrupt(f"{server_id}: the server received other bytes than the {up:,} sent")
        digest = await read_hashed(reader, down)
        if await reader.readexactly(DIGEST_SIZE) != digest.digest():
            raise Corrupt(f"{server_id}: the {down:,} bytes received are not the bytes the server sent")
        extra = await reader.read(1)
        if extra:
            raise Corrupt(f"{server_id}: bytes after the end of the transfer")
    finally:
        writer.close()


# ------------------------------------------------------------------ the churn process


@dataclass
class Slot:
    """A server of the churn process."""

    server_id: str
    kind: str  # "aio" | "blocking"
    expires: float
    handle: Any = None


@dataclass
class Churn:
    """The churn process's state: its servers, its clients, what happened."""

    forwarder: str
    servers: int
    clients: int
    lifetime: tuple[float, float]
    blocking_share: float
    abort_share: float
    max_size: int
    rng: random.Random = field(default_factory=random.Random)
    slots: dict[str, Slot] = field(default_factory=dict)
    live: list[str] = field(default_factory=list)  # ids clients may pick
    downs: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    server_counters: Counter[str] = field(default_factory=Counter)  # touched by handler threads too: += on a Counter under the GIL
    failures: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    stopping: bool = False
    next_id: int = 0
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def error(self, kind: str, text: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < 20:  # enough to diagnose; the counts are complete
            self.examples.append(f"{kind}: {text}")
        log.error("%s: %s", kind, text)

    def went_down(self, server_id: str, how: str) -> None:
        if server_id in self.live:
            self.live.remove(server_id)
        self.downs.setdefault(server_id, []).append((time.monotonic(), how))

    def report(self) -> dict[str, Any]:
        server_errors = self.server_counters["server saw corruption"]
        errors = Counter(self.errors)
        if server_errors:
            errors["server saw corruption"] = server_errors
        return {"counters": dict(self.counters), "server": dict(self.server_counters),
                "failures": dict(self.failures), "errors": dict(errors), "examples": list(self.examples),
                "live": len(self.live), "servers": len(self.slots)}

    # ---------------------------------------------------------- servers

    async def start_server(self) -> None:
        from fastnat.aio import start_server
        from fastnat.natlayer import nat_waitforconn

        self.next_id += 1
        server_id = f"soak-{self.next_id}"
        kind = "blocking" if self.rng.random() < self.blocking_share else "aio"
        slot = Slot(server_id, kind, time.monotonic() + self.rng.uniform(*self.lifetime))
        try:
            if kind == "aio":
                slot.handle = await start_server(lambda r, w: serve_transfer(r, w, self.server_counters),
                                                 server_id, PORT, forwarder=self.forwarder, persist=False)
            else:
                host, port = self.forwarder.rsplit(":", 1)
                slot.handle = await asyncio.to_thread(
                    nat_waitforconn, server_id, PORT,
                    lambda ip, p, sock, this, listen: serve_transfer_blocking(sock, self.server_counters),
                    host, int(port), persist=False)
        except Exception as exc:  # noqa: BLE001 - every failure to register is reported
            self.error("registration failed", f"{server_id} ({kind}): {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)  # do not spin on a forwarder that refuses
            return
        self.slots[server_id] = slot
        self.live.append(server_id)
        self.counters[f"servers started ({kind})"] += 1

    async def leave(self, slot: Slot) -> None:
        from fastnat.natlayer import nat_stopcomm

        how = "abort" if slot.kind == "aio" and self.rng.random() < self.abort_share else "clean"
        self.went_down(slot.server_id, how)
        try:
            if slot.kind == "blocking":
                await asyncio.to_thread(nat_stopcomm, slot.handle)
            else:
                if how == "abort":
                    session = slot.handle.registration.session
                    if session is not None and session._transport is not None:
                        session._transport.abort()  # an RST: no deregistration, no Go Away
                slot.handle.close()
                await asyncio.wait_for(slot.handle.wait_closed(), CALL_TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            self.error("unexplained", f"{slot.server_id} leaving ({how}): {type(exc).__name__}: {exc}")
        self.slots.pop(slot.server_id, None)
        self.counters[f"servers left ({how})"] += 1

    async def churn_forever(self) -> None:
        while not self.stopping:
            while len(self.slots) < self.servers and not self.stopping:
                await self.start_server()
            now = time.monotonic()
            for slot in [s for s in self.slots.values() if s.expires <= now and s.server_id in self.live]:
                self.spawn(self.leave(slot))
            await asyncio.sleep(0.05)

    # ---------------------------------------------------------- clients

    async def client_forever(self) -> None:
        while not self.stopping:
            if not self.live:
                await asyncio.sleep(0.05)
                continue
            server_id = self.rng.choice(self.live)
            up, down = random_sizes(self.rng, self.max_size)
            started = time.monotonic()
            try:
                await asyncio.wait_for(client_transfer(self.forwarder, server_id, up, down, self.rng), TRANSFER_TIMEOUT)
            except Corrupt as exc:
                self.error("corrupt", str(exc))
            except TimeoutError:
                expected = explain(server_id, started, self.downs)
                if expected is None:
                    self.error("hang", f"{server_id}: no end after {TRANSFER_TIMEOUT:g} s ({up:,} up, {down:,} down)")
                else:
                    self.failures[expected] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is classified
                expected = explain(server_id, started, self.downs)
                if expected is None:
                    self.error("unexplained", f"{server_id}: {type(exc).__name__}: {exc} ({up:,} up, {down:,} down)")
                else:
                    self.failures[expected] += 1
            else:
                self.counters["transfers ok"] += 1
                self.counters["bytes checked"] += up + down

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def stop(self, workers: list[asyncio.Task[Any]]) -> None:
        """Let the transfers in flight end, then every server leaves cleanly."""
        self.stopping = True
        await asyncio.wait(workers, timeout=TRANSFER_TIMEOUT + 5)
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=CALL_TIMEOUT)
        self.abort_share = 0.0
        await asyncio.gather(*(self.leave(slot) for slot in list(self.slots.values())))


def _stdin_lines() -> asyncio.Queue[str | None]:
    """stdin's lines (None at EOF), read by a thread into the running loop."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return lines


async def child_churn(args: argparse.Namespace) -> None:
    import fastnat.mux

    churn = Churn(args.child_churn, args.servers, args.clients, tuple(args.lifetime), args.blocking_share,
                  args.abort_share, args.max_size, rng=random.Random(args.seed))
    lines = _stdin_lines()
    workers = [asyncio.get_running_loop().create_task(churn.churn_forever())]
    workers += [asyncio.get_running_loop().create_task(churn.client_forever()) for _ in range(args.clients)]
    emit({"event": "ready", "engine": fastnat.mux.IMPLEMENTATION})
    while (line := await lines.get()) is not None:
        request = json.loads(line)
        cmd = request["cmd"]
        if cmd == "group_up":
            churn.live.extend(request["ids"])
        elif cmd == "group_down":
            for server_id in request["ids"]:
                churn.went_down(server_id, "killed")
        elif cmd == "stop":
            await churn.stop(workers)
        elif cmd != "sample":
            emit({"id": request["id"], "ok": False, "error": f"unknown command {cmd!r}"})
            continue
        emit({"id": request["id"], "ok": True, "result": churn.report()})
        if cmd == "stop":
            return
    await churn.stop(workers)  # the driver is gone


async def child_group(forwarder: str, size: int) -> None:
    """Hold ``size`` servers until stdin ends (or SIGKILL)."""
    from fastnat.aio import start_server
    from fastnat.errors import IdTakenError

    counters: Counter[str] = Counter()
    servers = []
    ids = [f"soak-group-{i}" for i in range(size)]
    retries = 0
    for server_id in ids:
        deadline = time.monotonic() + REGISTER_RETRY
        while True:
            try:
                servers.append(await start_server(lambda r, w: serve_transfer(r, w, counters), server_id, PORT,
                                                  forwarder=forwarder, persist=False))
                break
            except IdTakenError:
                if time.monotonic() > deadline:
                    raise
                retries += 1
                await asyncio.sleep(0.05)
    emit({"event": "ready", "ids": ids, "id_taken_retries": retries})
    await _stdin_lines().get()  # blocks until EOF: lines are not commands here
    for server in servers:
        server.close()
    await asyncio.gather(*(s.wait_closed() for s in servers))


# ------------------------------------------------------------------ the driver


@dataclass
class Sample:
    t: float
    rss: int
    stats: dict[str, Any]
    churn: dict[str, Any]


def forwarder_stats(forwarder: str) -> dict[str, Any]:
    from fastnat.aio import run
    from fastnat.aio.client import _simple_request

    return run(_simple_request(forwarder, "stats", None, 5.0))


def start_group(group: ProcessGroup, forwarder: str, args: argparse.Namespace, env: dict[str, str]) -> tuple[Proc, dict[str, Any]]:
    proc = group.start("server group", [sys.executable, HERE, "--child-group", forwarder, "--group-size", args.group_size],
                       env=env)
    return proc, proc.expect_json("ready", START_TIMEOUT)


def print_report(samples: list[Sample], args: argparse.Namespace, verdicts: dict[str, dict[str, Any]]) -> None:
    print("| time (s) | forwarder RSS (MiB) | Python blocks | servers | clients active | transfers/s | relayed MB/s |"
          " failures (expected) | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    prev = None
    for s in samples:
        rate = mbps = "–"
        if prev is not None and s.t > prev.t:
            dt = s.t - prev.t
            done = s.churn["counters"].get("transfers ok", 0) - prev.churn["counters"].get("transfers ok", 0)
            relayed = (s.stats["bytes_client_to_server"] + s.stats["bytes_server_to_client"]
                       - prev.stats["bytes_client_to_server"] - prev.stats["bytes_server_to_client"])
            rate, mbps = f"{done / dt:,.1f}", f"{relayed / dt / 1e6:,.1f}"
        mark = " (end of warm-up)" if prev is not None and prev.t < args.warmup <= s.t else ""
        print(f"| {s.t:,.0f}{mark} | {s.rss / MiB:,.1f} | {s.stats['python_blocks']:,} | {s.stats['servers']} |"
              f" {s.stats['clients_active']} |"
              f" {rate} | {mbps} | {sum(s.churn['failures'].values()):,} | {sum(s.churn['errors'].values()):,} |")
        prev = s
    print()
    print(f"Resident set: {verdicts['rss']['verdict']}.")
    print(f"Python blocks: {verdicts['blocks']['verdict']}.")


def drive(args: argparse.Namespace) -> int:
    engine = "pure" if args.engine == "python" else "compiled"
    env = nb.python_env(engine)
    samples: list[Sample] = []
    problems: list[str] = []
    kills = retries = 0
    with ProcessGroup("soak") as group:
        forwarder = nb.start_forwarder(group, engine)
        fwd = next(p for p in group.procs if p.name == "forwarder")
        churn = group.start("churn", [
            sys.executable, HERE, "--child-churn", forwarder, "--servers", args.servers, "--clients", args.clients,
            "--lifetime", *args.lifetime, "--blocking-share", args.blocking_share, "--abort-share", args.abort_share,
            "--max-size", args.max_size, "--seed", args.seed], env=env)
        ready = churn.expect_json("ready", START_TIMEOUT)
        if ready["engine"] != ("python" if engine == "pure" else "compiled"):
            raise churn.fail(f"runs the {ready['engine']} engine, not the {args.engine} one")
        server_group, info = start_group(group, forwarder, args, env) if args.group_size else (None, {})
        if server_group is not None:
            churn.call("group_up", CALL_TIMEOUT, ids=info["ids"])
        started = time.monotonic()
        end = started + args.duration
        next_sample, next_kill = started, started + args.kill_every

        def sample() -> None:
            report = churn.call("sample", CALL_TIMEOUT)
            samples.append(Sample(time.monotonic() - started, rss_of(fwd.pid), forwarder_stats(forwarder), report))
            s = samples[-1]
            nb.stderr_log(f"{s.t:6.0f} s  forwarder RSS {s.rss / MiB:6.1f} MiB  servers {s.stats['servers']:3}"
                          f"  transfers {report['counters'].get('transfers ok', 0):,}  failures {report['failures']}"
                          f"  errors {report['errors']}\n")

        while True:
            now = time.monotonic()
            if now >= end:
                break
            time.sleep(max(0.0, min(next_sample, next_kill, end) - now))
            for proc in (fwd, churn):
                if proc.returncode is not None:
                    raise proc.fail(f"exited with code {proc.returncode}")
            now = time.monotonic()
            if server_group is not None and now >= next_kill and now < end:
                churn.call("group_down", CALL_TIMEOUT, ids=info["ids"])
                server_group.popen.kill()
                server_group.popen.wait(START_TIMEOUT)
                kills += 1
                server_group, info = start_group(group, forwarder, args, env)
                retries += info["id_taken_retries"]
                churn.call("group_up", CALL_TIMEOUT, ids=info["ids"])
                next_kill += args.kill_every
            if time.monotonic() >= next_sample:
                sample()
                next_sample += args.interval
        if samples[-1].t < args.duration - args.interval / 2:
            sample()  # the end of the run, unless a sample was just taken
        final = churn.call("stop", STOP_TIMEOUT)
        if server_group is not None:
            server_group.stop()
        deadline = time.monotonic() + IDLE_TIMEOUT
        while True:
            stats = forwarder_stats(forwarder)
            held = {k: stats[k] for k in ("servers", "sessions", "clients_active", "pending_handshakes") if stats[k]}
            if not held or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if held:
            problems.append(f"the forwarder still holds {held} {IDLE_TIMEOUT:g} s after everyone left")
        idle_rss = rss_of(fwd.pid)
    verdicts = {"rss": memory_verdict([(s.t, s.rss) for s in samples], args.warmup),
                "blocks": memory_verdict([(s.t, s.stats["python_blocks"]) for s in samples], args.warmup,
                                         floor=BLOCKS_FLOOR, unit="blocks")}
    counters = final["counters"]
    errors = final["errors"]
    if errors:
        problems.append(f"{sum(errors.values()):,} errors: {errors}")
    problems += [f"{what}: {v['verdict']}" for what, v in verdicts.items() if v["flat"] is False]
    if not counters.get("transfers ok"):
        problems.append("no transfer succeeded")

    print("```")
    print(f"$ {nb.command_line()}")
    for line in nb.machine_info():
        print(line)
    print(f"{args.duration:g} s, engine {args.engine}; {args.servers} servers (lifetime {args.lifetime[0]:g}-"
          f"{args.lifetime[1]:g} s, {args.blocking_share:.0%} blocking, {args.abort_share:.0%} of the asyncio ones"
          f" aborted), a group of {args.group_size} killed every {args.kill_every:g} s; {args.clients} clients,"
          f" transfers up to {nb._size(args.max_size)} each way; warm-up {args.warmup:g} s")
    print("```")
    print()
    print_report(samples, args, verdicts)
    started_servers = sum(v for k, v in counters.items() if k.startswith("servers started"))
    print(f"\nTransfers checked (SHA-256 both ways): {counters.get('transfers ok', 0):,} ok,"
          f" {counters.get('bytes checked', 0) / MiB:,.0f} MiB of payload; servers registered and gone:"
          f" {started_servers:,} in the churn process ({counters.get('servers left (clean)', 0):,} left cleanly,"
          f" {counters.get('servers left (abort)', 0):,} aborted) and {kills} kills of the group of"
          f" {args.group_size} ({retries} registrations retried after ID_TAKEN).")
    print("\n| outcome | transfers |")
    print("|---|---:|")
    print(f"| ok | {counters.get('transfers ok', 0):,} |")
    for label in EXPECTED.values():
        print(f"| failed, expected: {label} during the transfer | {final['failures'].get(label, 0):,} |")
    for kind in ERRORS:
        print(f"| **error**: {kind} | {errors.get(kind, 0):,} |")
    print(f"\nForwarder after everyone left: {'idle' if not held else held}, resident set {idle_rss / MiB:,.1f} MiB.")
    for example in final["examples"]:
        print(f"  {example}")
    print(f"\nVerdict: {'PASS' if not problems else 'FAIL: ' + '; '.join(problems)}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "command": nb.command_line(), "args": {k: v for k, v in vars(args).items() if not k.startswith("child")},
            "samples": [s.__dict__ for s in samples], "final": final, "kills": kills, "id_taken_retries": retries,
            "forwarder_idle_after": not held, "idle_rss": idle_rss, "memory": verdicts, "problems": problems,
        }, indent=2))
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of churn (default 600)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds not judged (default: a fifth of --duration)")
    parser.add_argument("--engine", choices=("compiled", "python"), default="compiled",
                        help="multiplexer engine of every process (default compiled)")
    parser.add_argument("--servers", type=int, default=40, help="servers the churn process keeps registered (default 40)")
    parser.add_argument("--lifetime", type=float, nargs=2, default=[5.0, 30.0], metavar=("MIN", "MAX"),
                        help="a server's lifetime, seconds, uniform (default 5 30)")
    parser.add_argument("--blocking-share", type=float, default=0.25,
                        help="share of servers registered with nat_waitforconn (default 0.25)")
    parser.add_argument("--abort-share", type=float, default=0.25,
                        help="share of asyncio servers that leave by aborting their session (default 0.25)")
    parser.add_argument("--group-size", type=int, default=8, help="servers of the killed group (default 8; 0: none)")
    parser.add_argument("--kill-every", type=float, default=30.0, help="seconds between kills of the group (default 30)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client loops (default 8)")
    parser.add_argument("--max-size", type=nb.parse_size, default=MiB, help="largest payload each way (default 1M)")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the churn (default: fresh)")
    parser.add_argument("--json", metavar="PATH", help="also write the samples and results as JSON")
    parser.add_argument("--child-churn", metavar="FORWARDER", help=argparse.SUPPRESS)
    parser.add_argument("--child-group", metavar="FORWARDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("duration", "interval", "kill_every", "max_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 < args.lifetime[0] <= args.lifetime[1]:
        parser.error("--lifetime needs 0 < MIN <= MAX")
    if args.servers < 1 or args.clients < 1 or args.group_size < 0:
        parser.error("--servers and --clients must be at least 1, --group-size at least 0")
    if args.warmup is None:
        args.warmup = args.duration / 5
    if args.seed is None:
        args.seed = random.randrange(2**32)  # printed with the command line's arguments, to replay a run
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    from fastnat.aio import run

    if args.child_churn:
        run(child_churn(args))
        return 0
    if args.child_group:
        run(child_group(args.child_group, args.group_size))
        return 0
    nb.exit_on_sigterm()
    try:
        return drive(args)
    except HarnessError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

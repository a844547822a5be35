"""Helpers of the fault tests: short timings, batches of checked transfers
run by clients of this process (blocking or asyncio API), and the check of
their outcomes against what the server process reported.

A fault test starts transfers, breaks something (a SIGKILL, a SIGSTOP, a
registry or a link taken away), and then asserts that nothing was lost and
nothing hung: every transfer that reports success delivered exactly the
bytes sent (sha256, checked on both sides), every failed one ended with an
error within a bound of the fault, and every server handler ended too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fleet.support import FAST, ServerProc, close_loop_registries
from fleet.transfer import Transfer, run_async, run_blocking

import fastnat
from fastnat import aio

# The processes' timings (tests/fleet's, with a keepalive timeout of 1 s): a
# ping every 0.5 s, a session without an answer for 1 s is dead.
FAULT = {**FAST, "keepalive_interval": 0.5, "keepalive_timeout": 1.0}
KEEPALIVE_INTERVAL = float(FAULT["keepalive_interval"])
KEEPALIVE_TIMEOUT = float(FAULT["keepalive_timeout"])
# What a bound adds for a shared 2-core machine (other test runs, process
# start-up, a Python engine in the server).
MARGIN = 2.0
# A client's connect and handshake (nat_openconn's and open_connection's timeout).
CONNECT_TIMEOUT = 2.0
# No transfer of a batch may run longer than this: past it, it hangs.
HANG = 30.0
SERVER_PORT = 80


# Tests that need not run every engine with every API run each engine once,
# each with one API (both engines and both APIs covered, in half the time).
ENGINE_AND_API = pytest.mark.parametrize(
    ("engine", "api"),
    [
        pytest.param("compiled", "seed", marks=pytest.mark.compiled, id="compiled-seed"),
        pytest.param("python", "aio", id="python-aio"),
    ],
    indirect=["engine"],
)


@dataclasses.dataclass
class Batch:
    """Transfers running concurrently in this process (threads or one loop)."""

    api: str
    transfers: list[Transfer]
    threads: list[threading.Thread]

    def wait(self, timeout: float = HANG) -> None:
        """Wait for every transfer to end; AssertionError naming those that hang."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = [t for t in self.transfers if not t.end]
        assert not hung, f"{len(hung)} transfer(s) still running after {timeout} s: {hung}"


def start_batch(api: str, server_id: str, transfers: list[Transfer], starts: list[float]) -> Batch:
    """Run ``transfers`` to ``server_id`` port 80, each ``starts[i]`` s from
    now: ``seed`` (``nat_openconn``, a thread each) or ``aio``
    (``fastnat.aio.open_connection``, all on one loop in a thread)."""
    origin = time.monotonic()
    if api == "seed":
        threads = []
        for transfer, offset in zip(transfers, starts):

            def run(transfer: Transfer = transfer, offset: float = offset) -> None:
                time.sleep(max(0.0, origin + offset - time.monotonic()))
                run_blocking(transfer, lambda: fastnat.nat_openconn(server_id, SERVER_PORT, timeout=CONNECT_TIMEOUT))

            threads.append(threading.Thread(target=run, name=f"fault-{transfer.tag}", daemon=True))
    else:

        async def one(transfer: Transfer, offset: float) -> None:
            await asyncio.sleep(max(0.0, origin + offset - time.monotonic()))
            await run_async(transfer, lambda: aio.open_connection(server_id, SERVER_PORT, timeout=CONNECT_TIMEOUT))

        async def main() -> None:
            try:
                await asyncio.wait_for(asyncio.gather(*(one(t, o) for t, o in zip(transfers, starts))), HANG)
            finally:
                await close_loop_registries()

        threads = [threading.Thread(target=asyncio.run, args=(main(),), name="fault-aio-batch", daemon=True)]
    for thread in threads:
        thread.start()
    return Batch(api, transfers, threads)


def one_transfer(api: str, server_id: str, tag: str, upload: int = 256 * 1024, download: int | None = None) -> Transfer:
    """One transfer (``download`` as large as ``upload`` by default), run to its end (bounded)."""
    transfer = Transfer(tag, upload, upload if download is None else download)
    start_batch(api, server_id, [transfer], [0.0]).wait()
    return transfer


def server_outcomes(server: ServerProc, tags: set[str], timeout: float) -> dict[str, dict[str, Any]]:
    """The ``transfer`` event of every tag the server began, waiting (bounded)
    until each begun one has ended; AssertionError if one never ends."""

    def ended() -> tuple[set[str], dict[str, dict[str, Any]]]:
        with server._cond:
            events = list(server.events)
        begun = {e["tag"] for e in events if e["event"] == "begin" and e["tag"] in tags}
        done = {e["tag"]: e for e in events if e["event"] == "transfer" and e["tag"] in tags}
        return begun, done

    deadline = time.monotonic() + timeout
    while True:
        begun, done = ended()
        if begun <= set(done):
            return done
        if time.monotonic() > deadline:
            raise AssertionError(f"server handlers still running {timeout} s on: {sorted(begun - set(done))}")
        time.sleep(0.05)


@dataclasses.dataclass
class Bounds:
    """When failures may end: clients within ``client`` s of ``client_from``,
    server handlers within ``server`` s of ``server_from`` (monotonic times);
    ``clean_eof``: whether a client may see its connection end cleanly (a
    killed process's kernel sends FIN) instead of an error."""

    client_from: float
    client: float
    server_from: float
    server: float
    clean_eof: bool


def check_outcomes(transfers: list[Transfer], server: dict[str, dict[str, Any]], bounds: Bounds) -> dict[str, int]:
    """Nothing lost, nothing hung; a summary (counts) for the report."""
    problems: list[str] = []
    for t in transfers:
        event = server.get(t.tag)
        if t.ok:
            # a success on both sides, with the same bytes
            if event is None or not event["ok"]:
                problems.append(f"{t.tag}: the client says success, the server {event}")
            elif (event["sha"], event["down_sha"]) != (t.sent_sha, t.down_sha):
                problems.append(f"{t.tag}: digests differ: client {t.sent_sha}/{t.down_sha}, server {event}")
            continue
        if not t.error:
            problems.append(f"{t.tag}: failed without an error: {t}")
        if t.eof and not bounds.clean_eof:
            problems.append(f"{t.tag}: a clean end of stream instead of an error: {t.error}")
        late = t.end - max(t.start, bounds.client_from)
        if late > bounds.client:
            problems.append(f"{t.tag}: the client's error came {late:.2f} s after the fault (bound {bounds.client} s): {t.error}")
        if t.end < bounds.client_from and t.end < bounds.server_from:
            problems.append(f"{t.tag}: failed before the fault: {t.error}")
        if event is not None and event["ok"] and event["sha"] != t.sent_sha:
            problems.append(f"{t.tag}: the server read {event['sha']}, the client sent {t.sent_sha or 'less'}")
    for tag, event in server.items():
        if event["ok"]:
            continue
        if event.get("eof"):
            problems.append(f"{tag}: the server's stream ended cleanly instead of failing: {event}")
        late = event["t"] - bounds.server_from
        if late > bounds.server:
            problems.append(f"{tag}: the server's error came {late:.2f} s after the fault (bound {bounds.server} s): {event}")
    assert not problems, "\n".join(problems)
    return {
        "ok": sum(t.ok for t in transfers),
        "failed": sum(t.failed for t in transfers),
        "clean_eof": sum(t.eof for t in transfers),
        "server_failed": sum(not e["ok"] for e in server.values()),
    }


def wait_linked(server: ServerProc, predicate: Callable[[list[list[Any]]], bool], after: float, timeout: float, what: str) -> dict[str, Any]:
    """The server's first ``links`` event after ``after`` whose forwarder list satisfies ``predicate``."""
    return server.wait_event(
        lambda e: e["event"] == "links" and e["t"] > after and predicate(e["forwarders"]), timeout, what
    )

"""A NAT server in its own process, for the fleet tests.

    python server_proc.py --id ID [--port PORT] [--api seed|aio] [--handler echo|transfer]
                          [--redundancy N] [--no-persist] [--no-stdin]

Registers ``ID`` port ``PORT`` with no forwarder named: forwarders come from
the registry in ``FASTNAT_REGISTRY`` (read by fastnat itself). ``--api seed``
uses ``fastnat.nat_waitforconn`` (the seed's blocking API), ``--api aio``
uses ``fastnat.aio.start_server`` on an asyncio loop. Timings are shortened
with ``FLEET_SETTINGS``, a JSON object of :class:`fastnat.settings.Settings`
fields applied with ``fastnat.configure`` (e.g. ``{"announce_ttl": 2,
"announce_interval": 0.5, "keepalive_interval": 0.5, "keepalive_timeout":
0.5, "reconnect_initial_delay": 0.2}``).

Every connection is echoed until the client's end of stream; with
``--handler transfer`` it runs the server side of a checked transfer
(``transfer.py``), which reports ``{"event": "transfer", "tag": ..., "ok":
...}`` (or ``"stalled"``) for each connection. One JSON object
per line on stdout, each with ``t`` (``time.monotonic()``, comparable between
processes of one machine):

* ``{"event": "ready", "engine": ..., "forwarders": [[host, port], ...]}``;
* ``{"event": "links", "forwarders": [...]}`` whenever the set of forwarders
  the id is registered at changes;
* ``{"event": "errdel", "where": ..., "error": ...}`` at each link failure;
* ``{"event": "error", "type": ..., "message": ...}`` if registering fails
  (exit status 3);
* ``{"event": "stopped"}`` after ``nat_stopcomm`` / ``close()``.

SIGTERM (or stdin closing, unless ``--no-stdin``: for a process started
without one) stops it cleanly and it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import transfer

import fastnat
from fastnat import aio, mux

_print_lock = threading.Lock()
POLL = 0.02


def emit(**event: object) -> None:
    event["t"] = time.monotonic()
    with _print_lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def addresses(registration: Any) -> list[list[object]]:
    return sorted([host, port] for host, port in registration.forwarder_addresses)


def errdel(session: object, where: str, exc: BaseException) -> None:
    emit(event="errdel", where=where, error=f"{type(exc).__name__}: {exc}")


def echo(remoteip: str, remoteport: int, sock: Any, thiscommhandle: object, listencommhandle: object) -> None:
    try:
        while data := sock.recv(256 * 1024):
            sock.sendall(data)
    except OSError:
        pass
    finally:
        sock.close()


def watch_stdin(stop: Any) -> None:
    def run() -> None:
        sys.stdin.read()
        stop()

    threading.Thread(target=run, daemon=True).start()


def serve_transfer(remoteip: str, remoteport: int, sock: Any, thiscommhandle: object, listencommhandle: object) -> None:
    transfer.serve_blocking(sock, emit)


def run_seed(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    function = serve_transfer if args.handler == "transfer" else echo
    try:
        handle = fastnat.nat_waitforconn(
            args.id, args.port, function, errdel=errdel, persist=not args.no_persist, redundancy=args.redundancy
        )
    except OSError as exc:
        emit(event="error", type=type(exc).__name__, message=str(exc))
        return 3
    seen = addresses(handle.registration)
    emit(event="ready", engine=mux.IMPLEMENTATION, forwarders=seen)
    if not args.no_stdin:
        watch_stdin(stop.set)
    while not stop.wait(POLL):
        now = addresses(handle.registration)
        if now != seen:
            seen = now
            emit(event="links", forwarders=now)
    fastnat.nat_stopcomm(handle)
    emit(event="stopped")
    return 0


async def run_aio(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def handle(reader: asyncio.StreamReader, writer: Any) -> None:
        if args.handler == "transfer":
            await transfer.serve_async(reader, writer, emit)
            return
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    try:
        server = await aio.start_server(
            handle, args.id, args.port, persist=not args.no_persist, error_callback=errdel, redundancy=args.redundancy
        )
    except OSError as exc:
        emit(event="error", type=type(exc).__name__, message=str(exc))
        return 3
    seen = addresses(server.registration)
    emit(event="ready", engine=mux.IMPLEMENTATION, forwarders=seen)
    if not args.no_stdin:
        watch_stdin(lambda: loop.call_soon_threadsafe(stop.set))
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), POLL)
        except TimeoutError:
            pass
        now = addresses(server.registration)
        if now != seen:
            seen = now
            emit(event="links", forwarders=now)
    server.close()
    await server.wait_closed()
    emit(event="stopped")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--api", choices=("seed", "aio"), default="seed")
    parser.add_argument("--handler", choices=("echo", "transfer"), default="echo")
    parser.add_argument("--redundancy", type=int, default=1)
    parser.add_argument("--no-persist", action="store_true")
    parser.add_argument("--no-stdin", action="store_true")
    args = parser.parse_args()
    options = json.loads(os.environ.get("FLEET_SETTINGS") or "{}")
    if options:
        fastnat.configure(**options)
    if args.api == "seed":
        return run_seed(args)
    return asyncio.run(run_aio(args))


if __name__ == "__main__":
    raise SystemExit(main())

"""A NAT server in its own process, for the end-to-end tests.

    python server_proc.py --id ID --port PORT [--forwarder HOST:PORT] [--secret S] [--no-persist]

Registers ``ID`` port ``PORT`` with ``fastnat.nat_waitforconn`` (the
forwarder from ``--forwarder``, else ``FASTNAT_FORWARDERS``) and echoes every
connection: what a client sends comes back, and the client's end of stream
closes the echo. It prints one JSON object per line on stdout:

* ``{"event": "ready", "engine": "compiled"|"python"}`` once registered;
* ``{"event": "error", "type": "IdTakenError", "message": ...}`` if
  registering fails (then it exits with status 3);
* ``{"event": "errdel", "where": ..., "error": ...}`` for each call of its
  error delegate.

SIGTERM (or stdin closing) stops it: ``nat_stopcomm``, then exit 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

import fastnat
from fastnat import mux

_print_lock = threading.Lock()


def emit(**event: object) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def echo(remoteip: str, remoteport: int, sock: object, thiscommhandle: object, listencommhandle: object) -> None:
    try:
        while True:
            data = sock.recv(256 * 1024)  # type: ignore[attr-defined]
            if not data:
                break
            sock.sendall(data)  # type: ignore[attr-defined]
    except OSError:
        pass
    finally:
        sock.close()  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--forwarder")
    parser.add_argument("--secret")
    parser.add_argument("--no-persist", action="store_true")
    args = parser.parse_args()
    if args.secret:
        fastnat.configure(secret=args.secret)
    host = port = None
    if args.forwarder:
        host, _, port_text = args.forwarder.rpartition(":")
        port = int(port_text)

    def errdel(session: object, where: str, exc: BaseException) -> None:
        emit(event="errdel", where=where, error=f"{type(exc).__name__}: {exc}")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        handle = fastnat.nat_waitforconn(
            args.id, args.port, echo, forwarderIP=host, forwarderPort=port, errdel=errdel, persist=not args.no_persist
        )
    except OSError as exc:
        emit(event="error", type=type(exc).__name__, message=str(exc), oserror=True)
        return 3
    emit(event="ready", engine=mux.IMPLEMENTATION)

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(0.1):
        pass
    fastnat.nat_stopcomm(handle)
    emit(event="stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

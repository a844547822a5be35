"""fastnat's command line. The only module that parses flags or configures logging."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from fastnat.aio._loop import run
from fastnat.forwarder import Forwarder, ForwarderLimits, load_secrets

__all__ = ["main"]

log = logging.getLogger("fastnat.cli")


def _forwarder_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("forwarder", help="run a forwarder (relay) in the foreground until SIGINT/SIGTERM")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=12345, help="port for servers and clients alike (default 12345)")
    p.add_argument("--secret", help="demand proof of this secret from servers registering an id")
    p.add_argument("--secrets-file", help="file of per-id secrets, one 'id secret' per line")
    defaults = ForwarderLimits()
    p.add_argument("--max-servers", type=int, default=defaults.max_servers, help="server ids this forwarder holds")
    p.add_argument(
        "--max-clients-per-server", type=int, default=defaults.max_clients_per_server, help="concurrent clients per id"
    )
    p.add_argument(
        "--max-pending-handshakes", type=int, default=defaults.max_pending_handshakes, help="unfinished handshakes"
    )
    p.add_argument(
        "--handshake-timeout", type=float, default=defaults.handshake_timeout, help="seconds to finish a handshake"
    )


async def _run_forwarder(args: argparse.Namespace) -> int:
    limits = ForwarderLimits(
        max_servers=args.max_servers,
        max_clients_per_server=args.max_clients_per_server,
        max_pending_handshakes=args.max_pending_handshakes,
        handshake_timeout=args.handshake_timeout,
    )
    secrets = load_secrets(args.secrets_file) if args.secrets_file else None
    forwarder = Forwarder(args.host, args.port, limits=limits, secret=args.secret, secrets=secrets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: a signal that arrives as soon as we say we are ready
    # must stop us cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await forwarder.start()
    print(f"fastnat forwarder listening on {args.host}:{forwarder.port}", flush=True)
    await stop.wait()
    log.info("stopping")
    forwarder.close()
    await forwarder.wait_closed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastnat", description="Reach TCP servers behind NATs through relays.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _forwarder_parser(sub)
    args = parser.parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "forwarder":
            return run(_run_forwarder(args))
    except (OSError, ValueError) as exc:
        print(f"fastnat: error: {exc}", file=sys.stderr)
        return 1
    return 2

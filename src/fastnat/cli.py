"""fastnat's command line. The only module that parses flags or configures logging."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

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
    p.add_argument(
        "--registry",
        help="registry URL to advertise this forwarder in (fastnat://host:port, redis://host:port/db); "
        "by default it advertises in the registry it hosts itself",
    )
    p.add_argument("--advertise", help="address clients and servers reach this forwarder at (HOST or HOST:PORT)")
    p.add_argument(
        "--no-embedded-registry",
        action="store_true",
        help="do not host the built-in registry service on this forwarder's port",
    )


def _registry_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("registry", help="run the built-in registry service alone, until SIGINT/SIGTERM")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=12346, help="port (default 12346)")


async def _run_until_signal(start: Any, stop_and_wait: Any, ready: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: a signal that arrives as soon as we say we are ready
    # must stop us cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await start()
    print(ready(), flush=True)
    await stop.wait()
    log.info("stopping")
    await stop_and_wait()
    return 0


async def _run_registry(args: argparse.Namespace) -> int:
    from fastnat.discovery.service import RegistryServer

    server = RegistryServer(args.host, args.port)

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    return await _run_until_signal(server.start, stop, lambda: f"fastnat registry listening on {args.host}:{server.port}")


async def _run_forwarder(args: argparse.Namespace) -> int:
    limits = ForwarderLimits(
        max_servers=args.max_servers,
        max_clients_per_server=args.max_clients_per_server,
        max_pending_handshakes=args.max_pending_handshakes,
        handshake_timeout=args.handshake_timeout,
    )
    secrets = load_secrets(args.secrets_file) if args.secrets_file else None
    forwarder = Forwarder(
        args.host,
        args.port,
        limits=limits,
        secret=args.secret,
        secrets=secrets,
        registry=args.registry,
        advertise=args.advertise,
        host_registry=not args.no_embedded_registry,
    )

    async def stop() -> None:
        forwarder.close()
        await forwarder.wait_closed()

    return await _run_until_signal(
        forwarder.start, stop, lambda: f"fastnat forwarder listening on {args.host}:{forwarder.port}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastnat", description="Reach TCP servers behind NATs through relays.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _forwarder_parser(sub)
    _registry_parser(sub)
    args = parser.parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "forwarder":
            return run(_run_forwarder(args))
        if args.command == "registry":
            return run(_run_registry(args))
    except (OSError, ValueError) as exc:
        print(f"fastnat: error: {exc}", file=sys.stderr)
        return 1
    return 2

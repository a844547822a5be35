"""fastnat's command line: the only module that parses flags or configures logging.

Every option can also come from a ``FASTNAT_*`` environment variable (named
in ``--help``). A user's mistake prints one line and exits 1; SIGINT and
SIGTERM stop a running command cleanly (deregistering, withdrawing
announcements) and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

from fastnat.aio._loop import run
from fastnat.errors import NATLayerError
from fastnat.discovery.service import RegistryLimits
from fastnat.forwarder import STATS_DETAIL_POLICIES, Forwarder, ForwarderLimits, load_secrets
from fastnat.mux_config import MuxConfig
from fastnat.settings import REGISTRY_ENV

__all__ = ["main"]

log = logging.getLogger("fastnat.cli")

DEFAULT_FORWARDER_PORT = 12345
DEFAULT_REGISTRY_PORT = 12346


def _env(name: str, default: Any = None) -> Any:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _port_number(text: str, *, allow_zero: bool, source: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number ({low}-65535){source}")
    return port


def _port(*, allow_zero: bool = False, env: str | None = None) -> Callable[[str], int]:
    """A port for argparse; ``env`` names the variable its default comes from
    (argparse converts a string default with this too, when it is used)."""
    source = f" (from the flag or ${env})" if env else ""

    def parse(text: str) -> int:
        return _port_number(text, allow_zero=allow_zero, source=source)

    return parse


def _address(*, allow_zero: bool = False) -> Callable[[str], tuple[str, int]]:
    """HOST:PORT for argparse; ``allow_zero`` for an address to listen on
    (port 0: any free port)."""

    def parse(text: str) -> tuple[str, int]:
        from fastnat.settings import split_host_port

        host, port_text = split_host_port(text)
        if not host or not port_text:
            raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
        return host, _port_number(port_text, allow_zero=allow_zero, source=f" in {text!r}")

    return parse


_BYTE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _positive_int(text: str) -> int:
    """A whole number above zero, for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above zero")
    return value


def _positive_number(text: str) -> float:
    """A finite number above zero, for argparse."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above zero")
    return value


def _byte_count(text: str) -> int:
    """Bytes, for argparse: a whole number with an optional K, M or G (KiB, MiB, GiB)."""
    digits, unit = (text[:-1], text[-1].upper()) if text[-1:].isalpha() else (text, "")
    if unit not in _BYTE_UNITS or not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count above zero (a whole number, optionally with K, M or G)")
    return int(digits) * _BYTE_UNITS[unit]


class _Parser(argparse.ArgumentParser):
    """Errors as one line (and exit code 2), not the usage text first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fastnat: error: {message} (see '{self.prog} --help')\n")


class _UserError(Exception):
    """A mistake of the user's: one line, exit code 1."""


# -------------------------------------------------------------------- parsers


def _add_nat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--forwarder",
        type=_address(),
        default=None,
        help="forwarder HOST:PORT to use (default: $FASTNAT_FORWARDERS, else a registry lookup)",
    )
    p.add_argument("--registry", default=_env("FASTNAT_REGISTRY"), help="registry URL (default: $FASTNAT_REGISTRY)")
    p.add_argument("--tls-ca", metavar="FILE", default=_env("FASTNAT_TLS_CA"),
                   help="connect to forwarders (and fastnats:// registries) with TLS, trusting the CA in FILE ($FASTNAT_TLS_CA)")
    p.add_argument("--tls", action="store_true",
                   help="connect to forwarders with TLS, trusting the system's CAs ($FASTNAT_TLS=1)")


def _add_tls_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", metavar="FILE", default=_env("FASTNAT_TLS_CERT"),
                   help="serve TLS with this PEM certificate chain ($FASTNAT_TLS_CERT; needs --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", default=_env("FASTNAT_TLS_KEY"),
                   help="the certificate's PEM private key ($FASTNAT_TLS_KEY)")


def _server_tls(args: argparse.Namespace) -> Any:
    """The server context of --tls-cert/--tls-key (both or neither), or None."""
    from fastnat.tls import server_context

    if bool(args.tls_cert) != bool(args.tls_key):
        given, missing = ("--tls-cert", "--tls-key") if args.tls_cert else ("--tls-key", "--tls-cert")
        raise _UserError(f"{given} needs {missing} too (TLS takes a certificate and its key)")
    return server_context(args.tls_cert, args.tls_key) if args.tls_cert else None


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastnat",
        description="Make TCP servers behind NATs reachable through relays (forwarders).",
        epilog="Run 'fastnat COMMAND --help' for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    defaults = ForwarderLimits()
    p = sub.add_parser("forwarder", help="run a forwarder (relay), hosting the built-in registry: a complete deployment")
    p.add_argument("--host", default=_env("FASTNAT_HOST", "0.0.0.0"), help="address to listen on ($FASTNAT_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=_port(allow_zero=True, env="FASTNAT_PORT"), default=_env("FASTNAT_PORT", str(DEFAULT_FORWARDER_PORT)),
                   help=f"port for servers, clients and the registry alike ($FASTNAT_PORT, default {DEFAULT_FORWARDER_PORT})")
    p.add_argument("--secret", default=_env("FASTNAT_SECRET"), help="demand proof of this secret from servers registering an id ($FASTNAT_SECRET)")
    p.add_argument("--secrets-file", default=_env("FASTNAT_SECRETS_FILE"), help="file of per-id secrets, one 'id secret' per line ($FASTNAT_SECRETS_FILE)")
    p.add_argument("--max-servers", type=int, default=defaults.max_servers, help=f"server ids this forwarder holds (default {defaults.max_servers})")
    p.add_argument("--max-clients-per-server", type=int, default=defaults.max_clients_per_server,
                   help=f"concurrent clients per id (default {defaults.max_clients_per_server})")
    p.add_argument("--max-pending-handshakes", type=int, default=defaults.max_pending_handshakes,
                   help=f"connections still in their handshake (default {defaults.max_pending_handshakes})")
    p.add_argument("--handshake-timeout", type=float, default=defaults.handshake_timeout,
                   help=f"seconds a new connection has to finish its handshake (default {defaults.handshake_timeout:g})")
    p.add_argument("--max-connections-per-ip", type=_positive_int, default=defaults.max_connections_per_ip,
                   help=f"concurrent connections from one IP address (default {defaults.max_connections_per_ip})")
    p.add_argument("--max-handshakes-per-ip", type=_positive_int, default=defaults.max_handshakes_per_ip,
                   help=f"pending handshakes from one IP address (default {defaults.max_handshakes_per_ip})")
    p.add_argument("--max-streams-per-session", type=_positive_int, default=MuxConfig().max_streams,
                   help=f"streams on one server's session, all its ids together (default {MuxConfig().max_streams})")
    p.add_argument("--server-byte-rate", type=_byte_count, default=None, metavar="BYTES",
                   help="bytes per second relayed for one server id, both directions together; K, M, G allowed (default: no limit)")
    p.add_argument("--server-byte-cap", type=_byte_count, default=None, metavar="BYTES",
                   help="bytes relayed for one server id since it registered, then its clients are cut off (default: no cap)")
    p.add_argument("--registry", default=_env("FASTNAT_REGISTRY"),
                   help="advertise in this registry URL instead of the one this forwarder hosts ($FASTNAT_REGISTRY)")
    p.add_argument("--advertise", default=_env("FASTNAT_ADVERTISE"),
                   help="address servers and clients reach this forwarder at, HOST or HOST:PORT ($FASTNAT_ADVERTISE; "
                   "default: the listening address, or this host's address on its default route)")
    p.add_argument("--no-embedded-registry", action="store_true", help="do not host the built-in registry service")
    p.add_argument("--stats-detail", choices=STATS_DETAIL_POLICIES, default="local", metavar="WHO",
                   help="who sees the per-server part of 'fastnat status' (ids, ports, server addresses): "
                   "callers on this host (local, the default), all, or none")
    _add_tls_server_options(p)

    p = sub.add_parser("registry", help="run the built-in registry service alone")
    p.add_argument("--host", default=_env("FASTNAT_HOST", "0.0.0.0"), help="address to listen on ($FASTNAT_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=_port(allow_zero=True, env="FASTNAT_REGISTRY_PORT"),
                   default=_env("FASTNAT_REGISTRY_PORT", str(DEFAULT_REGISTRY_PORT)),
                   help=f"port ($FASTNAT_REGISTRY_PORT, default {DEFAULT_REGISTRY_PORT})")
    p.add_argument("--secret", default=_env("FASTNAT_SECRET"),
                   help="demand proof of this secret for every announce and withdraw ($FASTNAT_SECRET)")
    p.add_argument("--secrets-file", default=_env("FASTNAT_SECRETS_FILE"),
                   help="per-id secrets for the ids' own keys, one 'id secret' per line ($FASTNAT_SECRETS_FILE)")
    registry_defaults = RegistryLimits()
    p.add_argument("--max-connections", type=_positive_int, default=registry_defaults.max_connections,
                   help=f"open connections (default {registry_defaults.max_connections})")
    p.add_argument("--max-connections-per-ip", type=_positive_int, default=registry_defaults.max_connections_per_ip,
                   help=f"open connections from one IP address (default {registry_defaults.max_connections_per_ip})")
    p.add_argument("--max-requests-per-ip", type=_positive_number, default=registry_defaults.max_requests_per_ip_per_second,
                   help=f"requests per second from one IP address; more wait (default {registry_defaults.max_requests_per_ip_per_second:g})")
    _add_tls_server_options(p)

    p = sub.add_parser("expose", help="publish a local TCP service under ID, reachable through forwarders")
    p.add_argument("id", help="the server id to publish under")
    p.add_argument("port", type=_port(), help="the port clients ask for")
    p.add_argument("--to", type=_address(), default=None, help="the local service, HOST:PORT (default 127.0.0.1:PORT)")
    p.add_argument("--proxy-protocol", action="store_true", help="send a PROXY protocol v1 header with the client's address first")
    p.add_argument("--secret", default=_env("FASTNAT_SECRET"), help="secret proving the id, if the forwarder demands one ($FASTNAT_SECRET)")
    p.add_argument("--redundancy", type=int, default=1, help="hold the id at this many forwarders at once (default 1)")
    p.add_argument("--no-persist", action="store_true", help="exit when the forwarder link is lost instead of reconnecting")
    _add_nat_options(p)

    p = sub.add_parser("connect", help="reach port PORT of ID: a local port (--listen) or standard input/output")
    p.add_argument("id", help="the server id")
    p.add_argument("port", type=_port(), help="the server's port")
    p.add_argument("--listen", type=_address(allow_zero=True), default=None, help="listen on HOST:PORT and carry each connection (like ssh -L)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to reach the server (default 5)")
    _add_nat_options(p)

    p = sub.add_parser("check", help="print the address a forwarder sees and whether this host needs the NAT layer")
    p.add_argument("--local-ip", default=None, help="local address to test (default: the one used to reach the forwarder)")
    p.add_argument("--port", type=_port(allow_zero=True), default=0, help="local port for the test listener (default: a free one)")
    _add_nat_options(p)

    p = sub.add_parser("status", help="a forwarder's counters (servers, clients, bytes, refusals)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_nat_options(p)

    p = sub.add_parser("bench", help="measure relay throughput and latency on this machine against direct TCP")
    p.add_argument("--size", type=int, default=256, help="MiB per bulk transfer (default 256)")
    p.add_argument("--round-trips", type=int, default=2000, help="64-byte round trips per round (default 2000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, relay and direct interleaved (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("_bench-peer")  # internal (the bench's server process): no help, so not listed
    p.add_argument("--forwarder", required=True)
    return parser


# ------------------------------------------------------------------- commands


async def _until_signal(start: Callable[[], Awaitable[Any]], stop: Callable[[], Awaitable[Any]], ready: Callable[[], str],
                        until: Callable[[], Awaitable[Any]] | None = None) -> int:
    """Start, print the ready line, wait for SIGINT/SIGTERM (or for ``until()``
    to end), stop. ``until`` is called only once started, so a failed start
    leaves no coroutine behind."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: a signal that arrives as soon as we say we are ready
    # must stop us cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await start()
    print(ready(), flush=True)
    waiters = [loop.create_task(stopping.wait())]
    if until is not None:
        waiters.append(asyncio.ensure_future(until()))
    done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    log.info("stopping")
    await stop()
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return 0


async def _forwarder(args: argparse.Namespace) -> int:
    limits = ForwarderLimits(
        max_servers=args.max_servers,
        max_clients_per_server=args.max_clients_per_server,
        max_pending_handshakes=args.max_pending_handshakes,
        handshake_timeout=args.handshake_timeout,
        max_connections_per_ip=args.max_connections_per_ip,
        max_handshakes_per_ip=args.max_handshakes_per_ip,
        server_byte_rate=args.server_byte_rate,
        server_byte_cap=args.server_byte_cap,
    )
    secrets = _load_secrets_file(args.secrets_file)
    forwarder = Forwarder(
        args.host, args.port, limits=limits, secret=args.secret, secrets=secrets, ssl=_server_tls(args),
        registry=args.registry, advertise=args.advertise, host_registry=not args.no_embedded_registry,
        stats_detail=args.stats_detail,
        mux_config=MuxConfig(max_streams=args.max_streams_per_session),
    )

    async def stop() -> None:
        forwarder.close()
        await forwarder.wait_closed()

    return await _until_signal(forwarder.start, stop, lambda: f"fastnat forwarder listening on {args.host}:{forwarder.port}")


def _load_secrets_file(path: str | None) -> dict[str, bytes] | None:
    try:
        return load_secrets(path) if path else None
    except (OSError, ValueError) as exc:
        raise _UserError(f"cannot read the secrets file: {exc}") from None


async def _registry(args: argparse.Namespace) -> int:
    from fastnat.discovery.service import RegistryServer, RegistryService

    limits = RegistryLimits(
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        max_requests_per_ip_per_second=args.max_requests_per_ip,
    )
    secret = args.secret.encode() if args.secret else None
    service = RegistryService(limits, secret=secret, secrets=_load_secrets_file(args.secrets_file))
    server = RegistryServer(args.host, args.port, service, ssl=_server_tls(args))

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    return await _until_signal(server.start, stop, lambda: f"fastnat registry listening on {args.host}:{server.port}")


def _configure_nat(args: argparse.Namespace) -> None:
    import fastnat

    if getattr(args, "registry", None):
        # A flag beats the environment (the flag's default is already
        # $FASTNAT_REGISTRY), but the library reads the environment first:
        # this process's copy of it gives way to the flag.
        os.environ.pop(REGISTRY_ENV, None)
        fastnat.configure(registry=args.registry)
    if getattr(args, "tls_ca", None):
        fastnat.configure(tls=args.tls_ca)
    elif getattr(args, "tls", False):
        fastnat.configure(tls=True)


async def _expose(args: argparse.Namespace) -> int:
    from fastnat.tools.expose import expose

    _configure_nat(args)
    target = args.to or ("127.0.0.1", args.port)
    secret = args.secret.encode() if args.secret else None
    exposure: Any = None

    async def start() -> None:
        nonlocal exposure
        exposure = await expose(
            args.id, args.port, target, forwarder=args.forwarder, secret=secret,
            proxy_protocol=args.proxy_protocol, persist=not args.no_persist, redundancy=args.redundancy,
        )

    async def stop() -> None:
        if exposure is not None:
            await exposure.close()

    async def lost() -> None:
        # Without persist, the command ends when its last forwarder link does.
        while exposure is None or exposure.registration.alive or exposure.registration.persist:
            await asyncio.sleep(0.5)
        raise _UserError("the forwarder link was lost (--no-persist)")

    def ready() -> str:
        where = ", ".join(f"{h}:{p}" for h, p in exposure.registration.forwarder_addresses)
        return f"fastnat: {args.id} port {args.port} -> {target[0]}:{target[1]}, through {where}"

    return await _until_signal(start, stop, ready, lost)


async def _connect_listen(args: argparse.Namespace) -> int:
    from fastnat.tools.tunnel import listen

    _configure_nat(args)
    tunnel: Any = None

    async def start() -> None:
        nonlocal tunnel
        tunnel = await listen(args.id, args.port, args.listen[0], args.listen[1], forwarder=args.forwarder, timeout=args.timeout)

    async def stop() -> None:
        if tunnel is not None:
            await tunnel.close()

    def ready() -> str:
        host, port = tunnel.address
        return f"fastnat: listening on {host}:{port} -> {args.id} port {args.port}"

    return await _until_signal(start, stop, ready)


def _connect_stdio(args: argparse.Namespace) -> int:
    import fastnat
    from fastnat.tools.tunnel import stdio

    _configure_nat(args)
    host, port = args.forwarder if args.forwarder else (None, None)
    sock = fastnat.nat_openconn(args.id, args.port, timeout=args.timeout, forwarderIP=host, forwarderPort=port)
    signal.signal(signal.SIGTERM, lambda *_: sock.shutdown(socket.SHUT_RDWR))
    try:
        stdio(sock)
    except KeyboardInterrupt:
        sock.close()
    return 0


def _check(args: argparse.Namespace) -> int:
    import fastnat
    from fastnat.natlayer import _local_ip_towards

    _configure_nat(args)
    host, port = args.forwarder if args.forwarder else (None, None)
    external = fastnat.getmy_external_ip(host, port)
    if args.local_ip:
        local_ip = args.local_ip
    else:
        target = host or _first_forwarder_host()
        local_ip = _local_ip_towards(target) if target else "127.0.0.1"
    test_port = args.port or _free_port(local_ip)
    needed = fastnat.nat_check_bi_directional(local_ip, test_port, host, port)
    print(f"external address: {external}")
    print(f"local address:    {local_ip}")
    if needed:
        print(f"NAT layer needed: yes (a forwarder could not connect back to {local_ip}:{test_port})")
    else:
        print(f"NAT layer needed: no (a forwarder connected back to {local_ip}:{test_port})")
    return 0


def _first_forwarder_host() -> str | None:
    from fastnat.settings import registry_url, static_forwarders

    found = static_forwarders()
    if found:
        return found[0][0]
    url = registry_url()
    if url and "://" in url:
        rest = url.split("://", 1)[1]
        return rest.rsplit(":", 1)[0].strip("[]") or None
    return None


def _free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as probe:
        probe.bind((ip, 0))
        return int(probe.getsockname()[1])


async def _status(args: argparse.Namespace) -> int:
    from fastnat.aio.client import _simple_request

    _configure_nat(args)
    stats = await _simple_request(args.forwarder, "stats", None, 5.0)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    print(_stats_table(stats))
    return 0


def _stats_table(stats: dict[str, Any]) -> str:
    lines = [
        f"servers            {stats['servers']}",
        f"sessions           {stats['sessions']} (total {stats['sessions_total']})",
        f"clients            {stats['clients_active']} active, {stats['clients_total']} total",
        f"bytes              {stats['bytes_client_to_server']:,} client->server, {stats['bytes_server_to_client']:,} server->client",
        f"pending handshakes {stats['pending_handshakes']}",
        "refusals           " + (", ".join(f"{k} {v}" for k, v in sorted(stats["refusals"].items())) or "none"),
    ]
    per_server = stats.get("per_server") or {}
    if per_server:
        lines.append("")
        lines.append(f"{'server':<24} {'ports':<14} {'clients':>8} {'total':>8} {'bytes in':>14} {'bytes out':>14} {'refused':>8}")
        for sid, e in sorted(per_server.items()):
            ports = ",".join(str(p) for p in e.get("ports", [])) or "-"
            lines.append(
                f"{sid:<24.24} {ports:<14.14} {e['clients_active']:>8} {e['clients_total']:>8} "
                f"{e['bytes_client_to_server']:>14,} {e['bytes_server_to_client']:>14,} {e['refusals']:>8}"
            )
        omitted = stats.get("per_server_omitted", 0)
        if omitted:
            lines.append(f"... and {omitted} more servers")
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    from fastnat.tools.benchmark import format_table, run_benchmark

    if args.size < 1 or args.round_trips < 10 or args.rounds < 1:
        raise _UserError("--size must be at least 1, --round-trips at least 10, --rounds at least 1")
    print(f"fastnat bench: forwarder, server and client on 127.0.0.1 ({args.rounds} rounds)...", file=sys.stderr)
    result = run_benchmark(size_mib=args.size, round_trips=args.round_trips, rounds=args.rounds)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _bench_peer(args: argparse.Namespace) -> int:
    from fastnat.tools.benchmark import serve_peer

    run(serve_peer(args.forwarder))
    return 0


# ----------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "forwarder":
            return run(_forwarder(args))
        if args.command == "registry":
            return run(_registry(args))
        if args.command == "expose":
            return run(_expose(args))
        if args.command == "connect":
            return run(_connect_listen(args)) if args.listen else _connect_stdio(args)
        if args.command == "check":
            return _check(args)
        if args.command == "status":
            return run(_status(args))
        if args.command == "bench":
            return _bench(args)
        if args.command == "_bench-peer":
            return _bench_peer(args)
    except (_UserError, NATLayerError, OSError, ValueError, RuntimeError) as exc:
        print(f"fastnat: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2

"""Network benchmarks between processes: topologies, workloads, interleaved rounds.

Shared by the reports (``bench/report_sessions.py``, ``bench/report_relay.py``)
and their pytest-benchmark wrappers (``bench/test_net_sessions.py``,
``bench/test_net_relay.py``). Every implementation is a *topology*: separate
processes (``bench/net_peer.py``, ``python -m fastnat forwarder``, the Go relay
of ``bench/go_relay/relay.go``) on 127.0.0.1, started and always reaped by
``bench/procs.py``. A client process measures; the figures it reports are
taken from its own clock.

Sessions suite (issue 3): per API (asyncio, blocking) and engine (compiled,
pure), one client process and one server process, joined both by plain TCP
connections (``direct``) and by one multiplexer session (``mux``); bulk
transfers over 1 connection / 1 stream and over 8 connections / 8 streams.

Relay suite (issues 4 and 7), all clients on asyncio streams over TCP:

* ``fastnat-compiled`` / ``fastnat-pure``: client -> ``python -m fastnat
  forwarder`` -> server registered with ``fastnat.aio.start_server`` (the
  three processes run the same engine: ``FASTNAT_NO_EXTENSIONS=1`` for pure);
* ``fastnat-compiled-tls``: ``fastnat-compiled`` with TLS on both links to the
  forwarder (``--tls-cert/--tls-key``; a CA made for the run with ``trustme``);
* ``direct``: the same client and server processes as ``fastnat-compiled``,
  over a plain TCP connection to the server's own listener (the ceiling);
* ``go-relay``: client -> Go relay -> Go server, hashicorp/yamux with its
  default config, one stream per client, the server dialled out to the relay;
* ``plain-relay``: client -> asyncio relay on uvloop that dials a fresh TCP
  connection to the server per client (no multiplexing) -> Python server.

Figures: MB/s are 10^6 bytes of payload per second; latencies in µs.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procs

HERE = Path(__file__).resolve().parent
NET_PEER = HERE / "net_peer.py"
START_TIMEOUT = 30.0
SERVER_ID = "bench-server"
NAT_PORT = 7000

MiB = 1024 * 1024

# ------------------------------------------------------------------ processes


def python_env(engine: str) -> dict[str, str]:
    """The environment of a Python helper running ``engine`` (compiled | pure)."""
    env = dict(os.environ)
    env.pop("FASTNAT_NO_EXTENSIONS", None)
    env.pop("FASTNAT_NO_UVLOOP", None)
    if engine == "pure":
        env["FASTNAT_NO_EXTENSIONS"] = "1"
    elif engine != "compiled":
        raise ValueError(f"unknown engine {engine!r}")
    return env


def peer_argv(role: str, *args: Any) -> list[str]:
    return [sys.executable, str(NET_PEER), role, *map(str, args)]


def _check_engine(proc: procs.Proc, ready: dict[str, Any], engine: str) -> None:
    want = "python" if engine == "pure" else "compiled"
    if ready.get("engine") != want:
        raise proc.fail(f"runs the {ready.get('engine')} engine, not the {want} one "
                        f"({ready.get('fallback_reason')})")


@dataclasses.dataclass
class Topology:
    """The processes of one implementation; ``targets`` are what its client can reach."""

    name: str
    group: procs.ProcessGroup
    client: procs.Proc
    targets: dict[str, dict[str, Any]]
    info: dict[str, Any]
    cleanup: list[Callable[[], Any]] = dataclasses.field(default_factory=list)  # after the processes end

    def close(self) -> None:
        self.group.close()
        for step in self.cleanup:
            step()


def _start(name: str, build: Callable[[procs.ProcessGroup], Topology]) -> Topology:
    group = procs.ProcessGroup(name)
    try:
        return build(group)
    except BaseException:
        group.close()
        raise


def start_forwarder(group: procs.ProcessGroup, engine: str, extra: list[str] | None = None) -> str:
    fwd = group.start("forwarder", [sys.executable, "-m", "fastnat", "forwarder", "--host", "127.0.0.1", "--port", "0",
                                    *(extra or [])],
                      env=python_env(engine), stops_at_eof=False)
    m = fwd.expect_regex(r"fastnat forwarder listening on (\S+):(\d+)", START_TIMEOUT)
    return f"{m.group(1)}:{m.group(2)}"


def make_tls_files(directory: Path) -> dict[str, str]:
    """A CA and a certificate for 127.0.0.1 signed by it, as PEM files in
    ``directory`` (made with trustme, a test dependency); HarnessError without it."""
    try:
        import trustme
    except ImportError:
        raise procs.HarnessError("the TLS variant needs the trustme package (pip install 'fastnat[test]')") from None
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {name: str(directory / f"{name}.pem") for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(files["ca"])
    cert.private_key_pem.write_to_path(files["key"])
    Path(files["cert"]).write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return files


def start_fastnat(engine: str, api: str = "asyncio", tls: bool = False) -> Topology:
    """client -> forwarder -> server, all on ``engine``; also direct TCP client -> server.

    ``api``: asyncio (``fastnat.aio.start_server`` / ``open_connection``) or
    blocking (``nat_waitforconn`` / ``nat_openconn``, blocking sockets).
    ``tls``: the forwarder serves TLS, the server and the client verify it."""
    role = {"asyncio": "aio", "blocking": "blocking"}[api]
    name = f"fastnat-{engine}" if api == "asyncio" else f"fastnat-{api}-{engine}"
    name += "-tls" if tls else ""

    def build(group: procs.ProcessGroup) -> Topology:
        env = python_env(engine)
        tls_args: list[str] = []
        server_tls: list[str] = []
        cleanup: list[Callable[[], Any]] = []
        if tls:
            directory = tempfile.TemporaryDirectory(prefix="fastnat-bench-tls-")
            cleanup.append(directory.cleanup)
            files = make_tls_files(Path(directory.name))
            tls_args = ["--tls-cert", files["cert"], "--tls-key", files["key"]]
            server_tls = ["--tls-ca", files["ca"]]
        forwarder = start_forwarder(group, engine, tls_args)
        server = group.start("server", peer_argv(f"{role}-server", "--forwarder", forwarder, "--server-id", SERVER_ID,
                                                 "--nat-port", NAT_PORT, *server_tls), env=env)
        ready = server.expect_json("ready", START_TIMEOUT)
        _check_engine(server, ready, engine)
        client = group.start("client", peer_argv(f"{role}-client"), env=env)
        cready = client.expect_json("ready", START_TIMEOUT)
        _check_engine(client, cready, engine)
        targets = {
            "fastnat": {"kind": "fastnat", "forwarder": forwarder, "server_id": SERVER_ID, "port": NAT_PORT,
                        "tls_ca": server_tls[1] if tls else None},
            "direct": {"kind": "tcp", "host": "127.0.0.1", "port": ready["tcp_port"]},
        }
        return Topology(name, group, client, targets, {"server": ready, "client": cready}, cleanup)

    return _start(name, build)


def start_go(binary: Path) -> Topology:
    """client -> Go relay -> Go server (hashicorp/yamux, default config)."""

    def build(group: procs.ProcessGroup) -> Topology:
        relay = group.start("go-relay", [binary, "-mode", "relay"])
        listening = relay.expect_json("listening", START_TIMEOUT)
        server = group.start("go-server", [binary, "-mode", "server", "-relay", listening["server_addr"]])
        server.expect_json("ready", START_TIMEOUT)
        relay.expect_json("server-connected", START_TIMEOUT)
        client = group.start("client", peer_argv("aio-client"), env=python_env("compiled"))
        cready = client.expect_json("ready", START_TIMEOUT)
        host, port = listening["client_addr"].rsplit(":", 1)
        return Topology("go", group, client, {"relay": {"kind": "tcp", "host": host, "port": int(port)}},
                        {"relay": listening, "client": cready})

    return _start("go", build)


def start_plain() -> Topology:
    """client -> plain asyncio relay (uvloop, a TCP connection per client) -> server."""

    def build(group: procs.ProcessGroup) -> Topology:
        env = python_env("compiled")
        server = group.start("server", peer_argv("aio-server"), env=env)
        ready = server.expect_json("ready", START_TIMEOUT)
        relay = group.start("plain-relay", peer_argv("plain-relay", "--upstream", f"127.0.0.1:{ready['tcp_port']}"),
                            env=env)
        rready = relay.expect_json("ready", START_TIMEOUT)
        client = group.start("client", peer_argv("aio-client"), env=env)
        cready = client.expect_json("ready", START_TIMEOUT)
        return Topology("plain", group, client, {"relay": {"kind": "tcp", "host": "127.0.0.1", "port": rready["port"]}},
                        {"server": ready, "relay": rready, "client": cready})

    return _start("plain", build)


def start_sessions(api: str, engine: str) -> Topology:
    """A client and a server process (``api``: asyncio | blocking), joined by
    plain TCP (target ``direct``) and by one multiplexer session (``mux``)."""
    role = {"asyncio": "aio", "blocking": "blocking"}[api]

    def build(group: procs.ProcessGroup) -> Topology:
        env = python_env(engine)
        server = group.start("server", peer_argv(f"{role}-server", "--session"), env=env)
        ready = server.expect_json("ready", START_TIMEOUT)
        _check_engine(server, ready, engine)
        client = group.start("client", peer_argv(f"{role}-client"), env=env)
        cready = client.expect_json("ready", START_TIMEOUT)
        _check_engine(client, cready, engine)
        targets = {
            "direct": {"kind": "tcp", "host": "127.0.0.1", "port": ready["tcp_port"]},
            "mux": {"kind": "mux", "host": "127.0.0.1", "port": ready["session_port"]},
        }
        return Topology(f"{api}-{engine}", group, client, targets, {"server": ready, "client": cready})

    return _start(f"{api}-{engine}", build)


# ------------------------------------------------------------------ workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    """One measurement: ``run(topology, target, warmup)`` returns its figures."""

    name: str
    label: str
    units: tuple[tuple[str, str, bool], ...]  # (figure, unit, higher is better)
    run: Callable[[Topology, str, bool], dict[str, float]]


def bulk(direction: str, size: int, streams: int = 1) -> Workload:
    arrow = "client→server" if direction == "up" else "server→client"
    label = f"bulk {arrow}, {_size(size)}" + (f", {streams} streams" if streams > 1 else "")

    def run(topo: Topology, target: str, warmup: bool) -> dict[str, float]:
        n = min(size, 64 * MiB) if warmup else size
        result = topo.client.call("bulk", 60 + n / 2e6, target=topo.targets[target], direction=direction,
                                  size=n, streams=streams, verify=warmup)
        return {"MB/s": result["bytes"] / result["seconds"] / 1e6, "seconds": result["seconds"]}

    name = f"bulk_{direction}" + (f"_{streams}" if streams > 1 else "")
    return Workload(name, label, (("MB/s", "MB/s", True),), run)


def rtt(count: int = 10_000, warmup_count: int = 1_000, message_size: int = 64) -> Workload:
    def run(topo: Topology, target: str, warmup: bool) -> dict[str, float]:
        n = min(count, 1_000) if warmup else count
        result = topo.client.call("rtt", 60 + n * 0.005, target=topo.targets[target], count=n, warmup=warmup_count,
                                  message_size=message_size)
        return {"p50 µs": result["p50_us"], "p99 µs": result["p99_us"], "mean µs": result["mean_us"]}

    label = f"{message_size}-byte round trip, {count:,} after {warmup_count:,} warm-up"
    return Workload("rtt", label, (("p50 µs", "µs", False), ("p99 µs", "µs", False)), run)


def cps(seconds: float = 5.0, loops: int = 4) -> Workload:
    def run(topo: Topology, target: str, warmup: bool) -> dict[str, float]:
        s = min(seconds, 0.5) if warmup else seconds
        result = topo.client.call("cps", 60 + s, target=topo.targets[target], loops=loops, seconds=s)
        if result["errors"]:
            raise procs.HarnessError(f"connections/s via {topo.name}/{target}: {result['errors']} failed connections "
                                     f"(of {result['connections']} good), e.g. {result['first_errors']}")
        return {"conn/s": result["per_second"]}

    label = f"connections/s: connect, 1-byte echo, close; {loops} loops, {seconds:g} s"
    return Workload("cps", label, (("conn/s", "conn/s", True),), run)


def _size(n: int) -> str:
    if n % (1024 * MiB) == 0:
        return f"{n // (1024 * MiB)} GiB"
    if n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n:,} B"


def parse_size(text: str) -> int:
    """``256M``, ``2G``, ``1048576``: bytes (binary multiples)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = {"K": 1024, "M": MiB, "G": 1024 * MiB}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * factor)


# ------------------------------------------------------------------ running


@dataclasses.dataclass(frozen=True)
class Impl:
    """An implementation: which topology, which of its targets."""

    name: str
    topology: str
    target: str


@dataclasses.dataclass
class Results:
    """samples[workload][impl] = one figures dict per round (same round index = same round)."""

    samples: dict[str, dict[str, list[dict[str, float]]]] = dataclasses.field(default_factory=dict)

    def add(self, workload: str, impl: str, figures: dict[str, float]) -> None:
        self.samples.setdefault(workload, {}).setdefault(impl, []).append(figures)

    def values(self, workload: str, impl: str, figure: str) -> list[float]:
        return [s[figure] for s in self.samples.get(workload, {}).get(impl, [])]

    def median(self, workload: str, impl: str, figure: str) -> float | None:
        values = self.values(workload, impl, figure)
        return statistics.median(values) if values else None

    def ratio(self, workload: str, impl: str, ref: str, figure: str,
              ref_workload: str | None = None) -> tuple[float, float, float] | None:
        """(ratio of the medians, min and max of the per-round ratios)."""
        a = self.values(workload, impl, figure)
        b = self.values(ref_workload or workload, ref, figure)
        if not a or not b:
            return None
        per_round = [x / y for x, y in zip(a, b)]
        return statistics.median(a) / statistics.median(b), min(per_round), max(per_round)


def run_rounds(
    topologies: dict[str, Topology],
    impls: list[Impl],
    workloads: list[Workload],
    rounds: int,
    log: Callable[[str], None] = lambda s: None,
    results: Results | None = None,
) -> Results:
    """One warm-up run of everything, then ``rounds`` rounds; in each round every
    workload runs once for every implementation, the order of the
    implementations rotating from round to round."""
    results = results or Results()
    for wl in workloads:
        log(f"warm-up {wl.name}: ")
        for impl in impls:
            wl.run(topologies[impl.topology], impl.target, True)
            log(".")
        log("\n")
    for r in range(rounds):
        log(f"round {r + 1}/{rounds}: ")
        for wl in workloads:
            k = r % len(impls)
            for impl in impls[k:] + impls[:k]:
                results.add(wl.name, impl.name, wl.run(topologies[impl.topology], impl.target, False))
            log(f"{wl.name} ")
        log("\n")
    return results


def close_all(topologies: dict[str, Topology]) -> None:
    for topo in topologies.values():
        topo.close()


# ------------------------------------------------------------------ reporting helpers


def fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "–"
    if digits is not None:
        return f"{value:,.{digits}f}"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:,.1f}"
    return f"{value:,.2f}"


def cell(values: list[float]) -> str:
    """``median (min–max)``."""
    if not values:
        return "–"
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def ratio_cell(r: tuple[float, float, float] | None) -> str:
    if r is None:
        return "–"
    return f"{r[0]:.2f}x ({r[1]:.2f}–{r[2]:.2f})"


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.splitlines()[0] if out else "?"


def machine_info(go: bool = False) -> list[str]:
    """Lines describing the machine and software, for the top of a report."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import fastnat
    import fastnat.mux

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    commit = _first_line(["git", "-C", str(HERE), "describe", "--always", "--dirty"])
    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"machine: {cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, load average"
        f" {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"python: {sys.executable}, CPython {platform.python_version()}, uvloop {uv}",
        f"fastnat: {getattr(fastnat, '__version__', '?')} (git {commit}), engine of this process:"
        f" {fastnat.mux.IMPLEMENTATION}",
    ]
    if go:
        gobin, _, missing = procs.find_go_toolchain()
        yamux = _first_line(["dpkg-query", "-W", "-f", "${Version}", "golang-github-hashicorp-yamux-dev"])
        lines.append(f"go: {procs.go_version(gobin) if gobin else missing}; hashicorp/yamux (Debian) {yamux}")
    return lines


def command_line() -> str:
    return "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def go_build_dir() -> Path:
    """Where the Go relay is built (its GOCACHE too), reused between runs."""
    return Path(tempfile.gettempdir()) / f"fastnat-bench-go-{os.getuid()}"


def exit_on_sigterm() -> None:
    """SIGTERM (and SIGINT, even where the shell ignores it) ends a report through
    its ``finally`` blocks, so that every helper process is stopped and reaped."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def stderr_log(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# Figures of the benchmarks run in this process, for bench/conftest.py's summary:
# (suite, workload, implementation, figures).
RESULTS: list[tuple[str, str, str, dict[str, float]]] = []

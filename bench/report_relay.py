#!/usr/bin/env python3
"""fastnat end to end against a Go relay, a plain relay and direct TCP (issues 4 and 7).

    python bench/report_relay.py                      # 5 rounds, 512 MiB bulk, about 5 minutes
    python bench/report_relay.py --size 2G            # the issue's 2 GiB transfers (much longer)
    python bench/report_relay.py --rounds 7 --json relay.json

Implementations, each its own processes on 127.0.0.1 (see bench/net_bench.py):

* fastnat compiled / pure: client -> `python -m fastnat forwarder` -> server
  registered with fastnat.aio.start_server (FASTNAT_NO_EXTENSIONS=1 in all three
  processes for pure);
* fastnat TLS (not in the default set, --impls fastnat-compiled,fastnat-tls,direct):
  fastnat compiled with TLS on both links to the forwarder;
* Go relay: client -> bench/go_relay/relay.go -> Go server that dialled out,
  hashicorp/yamux with its default config, one stream per client;
* plain relay: client -> asyncio relay on uvloop, one fresh TCP connection to
  the server per client, no multiplexing -> Python server;
* direct: the fastnat-compiled client and server processes over a plain TCP
  connection (the ceiling).

The client is the same Python program (asyncio streams on uvloop) for all of
them, the Python servers too. Workloads: bulk client->server and
server->client (one connection, --size bytes, clock from the first byte to the
last), 64-byte round trips (--rtt-count after --rtt-warmup on one connection:
p50, p99), connections per second (connect through the relay, 1-byte echo,
close; 4 concurrent loops for --cps-seconds). One untimed warm-up of
everything first (downloads checked byte for byte there), then --rounds
rounds, each running every workload on every implementation, the order of the
implementations rotating from round to round; figures are medians, with the
min-max range of the rounds. Ratios are ratios of the medians, with the range
of the same ratio taken round by round.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import net_bench as nb  # noqa: E402
import procs  # noqa: E402

IMPLS = {
    "fastnat-compiled": nb.Impl("fastnat-compiled", "fastnat-compiled", "fastnat"),
    "fastnat-pure": nb.Impl("fastnat-pure", "fastnat-pure", "fastnat"),
    # Not in the default set: fastnat compiled with TLS on both links to the forwarder.
    "fastnat-tls": nb.Impl("fastnat-tls", "fastnat-compiled-tls", "fastnat"),
    "go-relay": nb.Impl("go-relay", "go", "relay"),
    "plain-relay": nb.Impl("plain-relay", "plain", "relay"),
    "direct": nb.Impl("direct", "fastnat-compiled", "direct"),
    # Not in the default set: the seed's blocking API end to end, and its direct reference
    # (blocking sockets, a thread per connection, between the same two processes).
    "fastnat-blocking": nb.Impl("fastnat-blocking", "fastnat-blocking-compiled", "fastnat"),
    "direct-blocking": nb.Impl("direct-blocking", "fastnat-blocking-compiled", "direct"),
}
DEFAULT_IMPLS = ["fastnat-compiled", "fastnat-pure", "go-relay", "plain-relay", "direct"]
HEADERS = {
    "fastnat-compiled": "fastnat compiled",
    "fastnat-pure": "fastnat pure",
    "fastnat-tls": "fastnat compiled, TLS",
    "go-relay": "Go relay (yamux)",
    "plain-relay": "plain relay (uvloop)",
    "direct": "direct TCP",
    "fastnat-blocking": "fastnat blocking (nat_openconn)",
    "direct-blocking": "direct TCP, blocking",
}

# (label, workload, figure, implementation, reference, bound, "min" or "max")
C, P, GO, PLAIN = "fastnat-compiled", "fastnat-pure", "go-relay", "plain-relay"
TARGETS = [
    ("fastnat compiled bulk client→server vs Go relay", "bulk_up", "MB/s", C, GO, 2.0, "min"),
    ("fastnat compiled bulk server→client vs Go relay", "bulk_down", "MB/s", C, GO, 1.5, "min"),
    ("fastnat compiled bulk client→server vs plain relay", "bulk_up", "MB/s", C, PLAIN, 1.0, "min"),
    ("fastnat compiled bulk server→client vs plain relay", "bulk_down", "MB/s", C, PLAIN, 1.0, "min"),
    ("fastnat compiled 64-byte round trip p50 vs Go relay", "rtt", "p50 µs", C, GO, 0.75, "max"),
    ("fastnat compiled 64-byte round trip p99 vs Go relay", "rtt", "p99 µs", C, GO, 0.75, "max"),
    ("fastnat compiled connections/s vs Go relay", "cps", "conn/s", C, GO, 1.0, "min"),
    ("fastnat pure bulk client→server vs Go relay", "bulk_up", "MB/s", P, GO, 1.0, "min"),
    ("fastnat pure bulk server→client vs Go relay", "bulk_down", "MB/s", P, GO, 1.0, "min"),
]


def build_workloads(args: argparse.Namespace) -> list[nb.Workload]:
    return [
        nb.bulk("up", args.size),
        nb.bulk("down", args.size),
        nb.rtt(args.rtt_count, args.rtt_warmup),
        nb.cps(args.cps_seconds, args.cps_loops),
    ]


def start_topologies(impls: list[str], log) -> tuple[dict[str, nb.Topology], dict[str, str]]:
    """Start what ``impls`` need; returns (topologies, implementations skipped -> why)."""
    topologies: dict[str, nb.Topology] = {}
    skipped: dict[str, str] = {}
    try:
        needed = {IMPLS[i].topology for i in impls}
        if "fastnat-compiled" in needed:
            log("starting fastnat (compiled)\n")
            topologies["fastnat-compiled"] = nb.start_fastnat("compiled")
        if "fastnat-pure" in needed:
            log("starting fastnat (pure)\n")
            topologies["fastnat-pure"] = nb.start_fastnat("pure")
        if "fastnat-compiled-tls" in needed:
            log("starting fastnat (compiled, TLS)\n")
            try:
                topologies["fastnat-compiled-tls"] = nb.start_fastnat("compiled", tls=True)
            except procs.HarnessError as exc:
                skipped["fastnat-tls"] = str(exc)
        if "fastnat-blocking-compiled" in needed:
            log("starting fastnat (blocking API, compiled)\n")
            topologies["fastnat-blocking-compiled"] = nb.start_fastnat("compiled", api="blocking")
        if "go" in needed:
            log("building and starting the Go relay\n")
            try:
                binary = procs.build_go_relay(nb.go_build_dir())
            except procs.HarnessError as exc:
                skipped["go-relay"] = str(exc)
            else:
                topologies["go"] = nb.start_go(binary)
        if "plain" in needed:
            log("starting the plain relay\n")
            topologies["plain"] = nb.start_plain()
    except BaseException:
        nb.close_all(topologies)
        raise
    return topologies, skipped


def print_tables(results: nb.Results, impls: list[str], workloads: list[nb.Workload]) -> bool:
    """Print the tables; True when every target that could be checked is met."""
    rows = [(wl, figure, unit) for wl in workloads for figure, unit, _ in wl.units]
    print("| workload | unit | " + " | ".join(HEADERS[i] for i in impls) + " |")
    print("|---|---|" + "---:|" * len(impls))
    for wl, figure, unit in rows:
        label = wl.label if figure in ("MB/s", "conn/s") else f"{wl.label}: {figure.split()[0]}"
        cells = [nb.cell(results.values(wl.name, impl, figure)) for impl in impls]
        print(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    print()
    print("Median of the rounds (min–max of the rounds).")
    def reference(impl: str) -> str:
        return "direct-blocking" if impl == "fastnat-blocking" else "direct"

    others = [i for i in impls if not i.startswith("direct") and reference(i) in impls]
    if others:
        print()
        blocking = "; the blocking API against blocking sockets" if "fastnat-blocking" in others else ""
        print("Against direct TCP between the same client and server processes (throughput: share of direct;"
              f" latency: multiple of direct{blocking}):")
        print()
        print("| workload | " + " | ".join(f"{HEADERS[i]} / {HEADERS[reference(i)]}" for i in others) + " |")
        print("|---|" + "---:|" * len(others))
        for wl, figure, unit in rows:
            label = wl.label if figure in ("MB/s", "conn/s") else f"{wl.label}: {figure.split()[0]}"
            cells = [nb.ratio_cell(results.ratio(wl.name, impl, reference(impl), figure)) for impl in others]
            print(f"| {label} | " + " | ".join(cells) + " |")
    if "fastnat-tls" in impls and C in impls:
        print()
        print("TLS against plain TCP, fastnat compiled, same run (throughput: share of plain; latency: multiple of plain):")
        print()
        print("| workload | fastnat TLS / fastnat plain |")
        print("|---|---:|")
        for wl, figure, unit in rows:
            label = wl.label if figure in ("MB/s", "conn/s") else f"{wl.label}: {figure.split()[0]}"
            print(f"| {label} | {nb.ratio_cell(results.ratio(wl.name, 'fastnat-tls', C, figure))} |")
    print()
    print("Targets (issue 7; ratio of the medians, range of the per-round ratios):")
    print()
    print("| target | measured | required | |")
    print("|---|---:|---:|---|")
    all_met = True
    for label, workload, figure, impl, ref, bound, kind in TARGETS:
        r = results.ratio(workload, impl, ref, figure)
        if r is None:
            print(f"| {label} | not measured | {'≥' if kind == 'min' else '≤'} {bound:.2f}x | |")
            continue
        met = r[0] >= bound if kind == "min" else r[0] <= bound
        all_met &= met
        print(f"| {label} | {nb.ratio_cell(r)} | {'≥' if kind == 'min' else '≤'} {bound:.2f}x"
              f" | {'met' if met else '**not met**'} |")
    print()
    print("Memory (issue 7: 10,000 idle streams; a forwarder holding 1,000 servers and 10,000 idle clients): "
          "python bench/report_memory.py")
    return all_met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (median taken), default 5")
    parser.add_argument("--size", type=nb.parse_size, default=512 * nb.MiB,
                        help="bytes per bulk transfer (256M, 2G...), default 512M")
    parser.add_argument("--rtt-count", type=int, default=10_000, help="timed round trips per sample, default 10000")
    parser.add_argument("--rtt-warmup", type=int, default=1_000, help="untimed round trips first, default 1000")
    parser.add_argument("--cps-seconds", type=float, default=5.0, help="length of a connections/s sample, default 5")
    parser.add_argument("--cps-loops", type=int, default=4, help="concurrent connect loops, default 4")
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                        help=f"comma-separated, from {','.join(IMPLS)} (default: all but the blocking two)")
    parser.add_argument("--workloads", default="bulk_up,bulk_down,rtt,cps",
                        help="comma-separated subset of bulk_up,bulk_down,rtt,cps")
    parser.add_argument("--json", metavar="PATH", help="also write every sample as JSON")
    args = parser.parse_args()
    nb.exit_on_sigterm()
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for i in impls:
        if i not in IMPLS:
            parser.error(f"unknown implementation {i!r}")
    wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
    workloads = [wl for wl in build_workloads(args) if wl.name in wanted]

    print("```")
    print(f"$ {nb.command_line()}")
    for line in nb.machine_info(go="go-relay" in impls):
        print(line)
    print(f"{args.rounds} rounds after a warm-up, implementations interleaved; bulk {nb._size(args.size)},"
          f" {args.rtt_count:,} round trips after {args.rtt_warmup:,}, connections/s {args.cps_loops} loops x"
          f" {args.cps_seconds:g} s")
    print("```")
    sys.stdout.flush()

    topologies, skipped = start_topologies(impls, nb.stderr_log)
    try:
        for impl, why in skipped.items():
            print(f"{impl} skipped: {why}")
        impls = [i for i in impls if i not in skipped]
        (results, seconds) = nb.timed(lambda: nb.run_rounds(
            topologies, [IMPLS[i] for i in impls], workloads, args.rounds, nb.stderr_log))
    finally:
        nb.close_all(topologies)
    print()
    print_tables(results, impls, workloads)
    print()
    print(f"Measured in {seconds:.0f} s; load average afterwards"
          f" {' '.join(f'{x:.2f}' for x in __import__('os').getloadavg())}.")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"command": nb.command_line(), "implementations": impls, "samples": results.samples}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Multiplexer sessions between two processes against direct TCP (issue 3).

    python bench/report_sessions.py                   # 5 rounds, 512 MiB per transfer, about 2 minutes
    python bench/report_sessions.py --directions up   # client->server only
    python bench/report_sessions.py --rounds 7 --size 1G --json sessions.json

For each API (asyncio: fastnat.aio.MuxSession and its MuxStream reader/writer;
blocking: fastnat.blocking.BlockingSession and its socket-like StreamSocket)
and each engine (compiled; pure, FASTNAT_NO_EXTENSIONS=1 in both processes),
one client process and one server process on 127.0.0.1 (bench/net_peer.py),
joined in the same run both by plain TCP connections (the reference, in the
same style: asyncio streams for asyncio, blocking sockets with a thread each
for blocking) and by ONE multiplexer session. Workloads: --size bytes over 1
connection / 1 stream, and over --streams connections / --streams streams of
one session at once (--size in total, split evenly), in each direction asked
for; the clock runs in the client from the first byte to the last (upload:
to the server's acknowledgement).

One untimed warm-up of everything first (downloads checked byte for byte
there), then --rounds rounds in which every transfer runs once for every
implementation, the order rotating from round to round. Figures are medians
with the min-max range of the rounds; ratios are ratios of the medians with
the range of the per-round ratios. Targets (issue 3): 1 stream >= 45% of the
direct TCP rate, the 8-stream aggregate >= 60% of it (the direct rate of one
connection; the share of 8 direct connections is shown beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import net_bench as nb  # noqa: E402

TARGET_ONE = 0.45
TARGET_MANY = 0.60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (median taken), default 5")
    parser.add_argument("--size", type=nb.parse_size, default=512 * nb.MiB,
                        help="bytes per transfer (256M, 1G...), default 512M")
    parser.add_argument("--streams", type=int, default=8, help="streams (and connections) of the aggregate, default 8")
    parser.add_argument("--directions", default="up,down", help="up (client->server), down, or both (default)")
    parser.add_argument("--apis", default="asyncio,blocking", help="asyncio, blocking, or both (default)")
    parser.add_argument("--engines", default="compiled,pure", help="compiled, pure, or both (default)")
    parser.add_argument("--json", metavar="PATH", help="also write every sample as JSON")
    args = parser.parse_args()
    nb.exit_on_sigterm()
    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    apis = [a.strip() for a in args.apis.split(",") if a.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not set(directions) <= {"up", "down"} or not set(apis) <= {"asyncio", "blocking"} \
            or not set(engines) <= {"compiled", "pure"}:
        parser.error("unknown direction, API or engine")

    print("```")
    print(f"$ {nb.command_line()}")
    for line in nb.machine_info():
        print(line)
    print(f"{args.rounds} rounds after a warm-up, implementations interleaved; {nb._size(args.size)} per transfer,"
          f" 1 and {args.streams} streams")
    print("```")
    sys.stdout.flush()

    pairs = [(api, engine) for api in apis for engine in engines]
    impls = [nb.Impl(f"{api}-{engine}/{target}", f"{api}-{engine}", target)
             for api, engine in pairs for target in ("direct", "mux")]
    workloads = [wl for d in directions for wl in (nb.bulk(d, args.size, 1), nb.bulk(d, args.size, args.streams))]
    topologies: dict[str, nb.Topology] = {}
    try:
        for api, engine in pairs:
            nb.stderr_log(f"starting {api} / {engine}\n")
            topologies[f"{api}-{engine}"] = nb.start_sessions(api, engine)
        results, seconds = nb.timed(lambda: nb.run_rounds(topologies, impls, workloads, args.rounds, nb.stderr_log))
    finally:
        nb.close_all(topologies)

    met_all = True
    n = args.streams
    for d in directions:
        one, many = f"bulk_{d}", f"bulk_{d}_{n}"
        arrow = ("client → server (the dialling side sends)" if d == "up"
                 else "server → client (the accepting side sends)")
        print()
        print(f"**{arrow}**, {nb._size(args.size)} per transfer, MB/s: median (min–max) of {args.rounds} rounds")
        print()
        print(f"| API | engine | direct TCP, 1 conn | session, 1 stream | 1 stream / direct (≥ {TARGET_ONE:.2f})"
              f" | direct TCP, {n} conns | session, {n} streams | {n} streams / direct 1 conn (≥ {TARGET_MANY:.2f})"
              f" | {n} streams / {n} conns |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for api, engine in pairs:
            base = f"{api}-{engine}"
            direct, mux = f"{base}/direct", f"{base}/mux"
            r_one = results.ratio(one, mux, direct, "MB/s")
            r_many = results.ratio(many, mux, direct, "MB/s", ref_workload=one)
            r_conns = results.ratio(many, mux, direct, "MB/s")
            ok_one = r_one is not None and r_one[0] >= TARGET_ONE
            ok_many = r_many is not None and r_many[0] >= TARGET_MANY
            met_all &= ok_one and ok_many
            print(f"| {api} | {engine} | {nb.cell(results.values(one, direct, 'MB/s'))}"
                  f" | {nb.cell(results.values(one, mux, 'MB/s'))}"
                  f" | {nb.ratio_cell(r_one)} {'met' if ok_one else '**not met**'}"
                  f" | {nb.cell(results.values(many, direct, 'MB/s'))}"
                  f" | {nb.cell(results.values(many, mux, 'MB/s'))}"
                  f" | {nb.ratio_cell(r_many)} {'met' if ok_many else '**not met**'}"
                  f" | {nb.ratio_cell(r_conns)} |")
    print()
    print(f"Targets (issue 3): every row's 1-stream ratio ≥ {TARGET_ONE:.2f}"
          f" and {n}-stream ratio ≥ {TARGET_MANY:.2f}:"
          f" {'all met' if met_all else '**not all met**'}.")
    print()
    print(f"Measured in {seconds:.0f} s; load average afterwards"
          f" {' '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"command": nb.command_line(), "implementations": [i.name for i in impls], "samples": results.samples},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

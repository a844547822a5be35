#!/usr/bin/env python3
"""Profile the processes of one network benchmark with py-spy, while it runs.

    python bench/profile_net.py --impl fastnat-compiled --workload cps
    python bench/profile_net.py --impl fastnat-compiled --workload bulk_down --native
    python bench/profile_net.py --impl blocking-compiled/mux --workload bulk_up --seconds 10 --out /tmp/prof
    python bench/profile_net.py --impl go-relay --workload cps --cpu     # CPU time per connection, no py-spy

Starts the topology of ``--impl`` (a relay implementation of
``bench/report_relay.py``: fastnat-compiled, fastnat-pure, plain-relay, direct;
or a session one of ``bench/report_sessions.py``: asyncio-compiled/mux,
blocking-pure/direct, ...), keeps ``--workload`` (bulk_up, bulk_down, rtt, cps)
running for ``--seconds``, and meanwhile records every Python process of the
topology with ``py-spy record`` (``--native`` adds C frames, such as the
compiled engine's). Writes one collapsed-stack file per process into
``--out`` (open them with speedscope or flamegraph.pl) and prints, per
process, the functions that hold the most samples: by themselves (leaf) and
with what they call (inclusive). py-spy must be installed (``pip install
py-spy``) and allowed to read other processes (root, or ptrace permitted).
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import net_bench as nb  # noqa: E402
import procs  # noqa: E402

RELAY = {
    "fastnat-compiled": ("fastnat-compiled", "fastnat"),
    "fastnat-pure": ("fastnat-pure", "fastnat"),
    "go-relay": ("go", "relay"),
    "plain-relay": ("plain", "relay"),
    "direct": ("fastnat-compiled", "direct"),
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def start(impl: str) -> tuple[nb.Topology, str]:
    if impl in RELAY:
        topology, target = RELAY[impl]
        if topology == "plain":
            return nb.start_plain(), target
        if topology == "go":
            return nb.start_go(procs.build_go_relay(nb.go_build_dir())), target
        return nb.start_fastnat(topology.split("-", 1)[1]), target
    try:
        pair, target = impl.split("/")
        api, engine = pair.split("-")
    except ValueError:
        raise SystemExit(f"unknown implementation {impl!r}") from None
    return nb.start_sessions(api, engine), target


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def run_once(topo: nb.Topology, target: str, workload: str, seconds: float, streams: int) -> tuple[float, str]:
    """Run the workload once; (units of work done, unit name)."""
    t = topo.targets[target]
    if workload == "cps":
        r = topo.client.call("cps", 60 + seconds, target=t, loops=4, seconds=seconds)
        return r["connections"], "connection"
    if workload == "rtt":
        count = max(1000, int(seconds * 5000))
        topo.client.call("rtt", 60 + count * 0.01, target=t, count=count, warmup=0)
        return count, "round trip"
    size = max(64, int(seconds * 500)) * nb.MiB
    topo.client.call("bulk", 60 + size / 1e6, target=t, size=size, streams=streams,
                     direction="up" if workload == "bulk_up" else "down")
    return size / 1e6, "MB"


def cpu_report(topo: nb.Topology, target: str, args: argparse.Namespace) -> None:
    run_once(topo, target, args.workload, min(args.seconds, 1.0), args.streams)  # warm-up
    before = {p.name: cpu_seconds(p.pid) for p in topo.group.procs}
    start_time = time.perf_counter()
    units, unit = run_once(topo, target, args.workload, args.seconds, args.streams)
    elapsed = time.perf_counter() - start_time
    after = {p.name: cpu_seconds(p.pid) for p in topo.group.procs}
    print(f"# {args.impl}, {args.workload}: {units:,.0f} {unit}s in {elapsed:.2f} s; CPU time per {unit}"
          f" (clock ticks of 1/{CLOCK_TICKS} s, so small figures are coarse)")
    print()
    print(f"| process | CPU s | busy | µs per {unit} |")
    print("|---|---:|---:|---:|")
    total = 0.0
    for p in topo.group.procs:
        used = after[p.name] - before[p.name]
        total += used
        print(f"| {p.name} | {used:.2f} | {100 * used / elapsed:.0f}% | {1e6 * used / units:,.1f} |")
    print(f"| all | {total:.2f} | {100 * total / elapsed:.0f}% | {1e6 * total / units:,.1f} |")


def summarize(path: pathlib.Path, top: int) -> str:
    """Leaf and inclusive shares of the samples of one collapsed-stack file."""
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames and frames[0].startswith(("process ", "thread ")):
            frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        leaf[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "    (no samples)"
    out = [f"    {total} samples; leaf (self) share:"]
    out += [f"      {100 * n / total:5.1f}%  {frame}" for frame, n in leaf.most_common(top)]
    out.append("    inclusive share:")
    out += [f"      {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", required=True)
    parser.add_argument("--workload", choices=["bulk_up", "bulk_down", "rtt", "cps"], required=True)
    parser.add_argument("--seconds", type=float, default=8.0, help="how long to record, default 8")
    parser.add_argument("--streams", type=int, default=1, help="bulk: streams (connections) at once")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second, default 250")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--top", type=int, default=18, help="functions listed per process")
    parser.add_argument("--out", help="directory for the profiles (default: a new temporary one)")
    parser.add_argument("--cpu", action="store_true", help="CPU time per unit of work per process, no py-spy")
    parser.add_argument("--py-spy",
                        default=shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy"))
    args = parser.parse_args()
    nb.exit_on_sigterm()
    if args.cpu:
        topo, target = start(args.impl)
        try:
            cpu_report(topo, target, args)
        finally:
            topo.close()
        return 0
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="fastnat-profile-"))
    out.mkdir(parents=True, exist_ok=True)

    topo, target = start(args.impl)
    stop_at = 0.0
    errors: list[BaseException] = []

    def keep_running() -> None:
        try:
            while time.monotonic() < stop_at:
                if args.workload == "cps":
                    topo.client.call("cps", 60 + args.seconds, target=topo.targets[target], loops=4,
                                     seconds=max(0.5, stop_at - time.monotonic()))
                elif args.workload == "rtt":
                    topo.client.call("rtt", 120, target=topo.targets[target], count=20_000, warmup=0)
                else:
                    topo.client.call("bulk", 300, target=topo.targets[target], size=1024 * nb.MiB,
                                     direction="up" if args.workload == "bulk_up" else "down", streams=args.streams)
        except BaseException as exc:  # reported after the profiles
            errors.append(exc)

    try:
        python_procs = [p for p in topo.group.procs if "relay" != pathlib.Path(p.argv[0]).name]
        nb.stderr_log(f"profiles in {out}\n")
        stop_at = time.monotonic() + args.seconds + 3
        worker = threading.Thread(target=keep_running, daemon=True)
        worker.start()
        time.sleep(1.0)  # let the workload start
        spies = []
        for proc in python_procs:
            path = out / f"{proc.name}.txt"
            cmd = [args.py_spy, "record", "--pid", str(proc.pid), "--duration", str(int(args.seconds)),
                   "--rate", str(args.rate), "--format", "raw", "--output", str(path)]
            # --nonblocking: read the process without pausing it (less overhead); py-spy
            # can only unwind C frames of a paused process.
            cmd.append("--native" if args.native else "--nonblocking")
            spies.append((proc, path, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                       text=True)))
        for proc, path, spy in spies:
            try:
                _, err = spy.communicate(timeout=args.seconds + 60)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            if spy.returncode != 0 and not path.exists():
                print(f"{proc.name}: py-spy failed ({spy.returncode}): {err.strip()[-500:]}")
        worker.join(args.seconds + 120)
    finally:
        topo.close()
    print(f"# {args.impl}, {args.workload}, {args.seconds:g} s, profiles in {out}")
    for proc, path, _ in spies:
        print(f"\n## {proc.name} (pid {proc.pid}): {' '.join(proc.argv[1:4])}")
        print(summarize(path, args.top) if path.exists() else "    (no profile)")
    if errors:
        print(f"\nthe workload failed: {errors[0]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

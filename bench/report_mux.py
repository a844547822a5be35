#!/usr/bin/env python3
"""One-process comparison of the multiplexers, printed as a markdown table.

    python bench/report_mux.py            # 9 samples per figure, about 30 s
    python bench/report_mux.py --rounds 11 --json mux.json

Runs the workloads of ``bench/mux_workloads.py`` (the same ones as the
pytest-benchmark suite) for the compiled engine, the pure-Python engine and
h2, in ONE process: for each workload the three implementations are measured
in interleaved rounds (the order rotating every round), so that the load of a
shared machine falls on all of them alike. Each sample is the mean time of
enough consecutive rounds to last at least ``--min-sample`` seconds, every round
on a fresh, set-up connection (setup untimed, garbage collected before each
sample); the figure is the median of the samples. Absolute numbers are only
this machine at this moment: the ratios are what to quote.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import mux_workloads as mw  # noqa: E402

ROWS = [
    # workload, label, unit
    ("decode_bulk", "`receive_data`, 64 KiB Data frames, 1 stream, 256 KiB reads", "MB/s"),
    ("decode_small", "`receive_data`, 64-byte Data frames, 100 streams, ~1,000 frames per read", "frames/s"),
    ("encode_bulk", "`send_data` + `data_to_send`, 64 KiB pieces, 256 KiB writes", "MB/s"),
    ("encode_small", "`send_data` + `data_to_send`, 64-byte pieces, 100 streams, 1,000 per write", "frames/s"),
]

# (workload, unit, numerator, denominator, minimum ratio): the targets.
TARGETS = [
    ("decode_small", "frames/s", "compiled", "python", 3.0),
    ("decode_small", "frames/s", "compiled", "h2", 50.0),
    ("decode_bulk", "MB/s", "compiled", "h2", 20.0),
]
# The same ratios on the encode path, reported beside them.
ENCODE_RATIOS = [
    ("encode_small", "frames/s", "compiled", "python"),
    ("encode_small", "frames/s", "compiled", "h2"),
    ("encode_bulk", "MB/s", "compiled", "h2"),
]


def _time_round(wl: mw.Workload) -> float:
    args, kwargs = wl.setup()
    start = time.perf_counter()
    wl.run(*args, **kwargs)
    return time.perf_counter() - start


def _sample(wl: mw.Workload, repeat: int) -> float:
    gc.collect()
    total = 0.0
    for _ in range(repeat):
        total += _time_round(wl)
    return total / repeat


def measure(name: str, impls: list[str], rounds: int, min_sample: float, log) -> dict[str, dict]:
    workloads = {impl: mw.FACTORIES[name](impl) for impl in impls}
    repeat = {}
    for impl, wl in workloads.items():
        wl.verify()  # correctness, and a first warm-up
        _time_round(wl)  # warm-up
        once = min(_time_round(wl) for _ in range(2))
        repeat[impl] = max(1, math.ceil(min_sample / max(once, 1e-9)))
    samples: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(rounds):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for impl in order:
            samples[impl].append(_sample(workloads[impl], repeat[impl]))
        log(".")
    out = {}
    for impl, times in samples.items():
        median = statistics.median(times)
        wl = workloads[impl]
        out[impl] = {
            "median_s": median,
            "samples_s": times,
            "rounds_per_sample": repeat[impl],
            "payload_bytes": wl.payload_bytes,
            "frames": wl.frames,
            "calls": wl.calls,
            **wl.rates(median),
        }
    return out


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="samples per figure (median taken), default 9")
    parser.add_argument("--min-sample", type=float, default=0.1,
                        help="seconds of timed work per sample at least, default 0.1")
    parser.add_argument("--json", metavar="PATH", help="also write every sample and figure as JSON")
    args = parser.parse_args()

    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    impls = [impl for impl in mw.IMPLEMENTATIONS if mw.available(impl) is None]
    missing = {impl: mw.available(impl) for impl in mw.IMPLEMENTATIONS if impl not in impls}

    import fastnat

    try:
        import h2

        h2_version = h2.__version__
    except ImportError:
        h2_version = "not installed"
    print(f"$ {command}")
    print()
    print(
        f"<!-- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {sys.executable};"
        f" CPython {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs;"
        f" fastnat {getattr(fastnat, '__version__', '?')}; h2 {h2_version};"
        f" {args.rounds} samples per figure, median -->"
    )
    for impl, why in missing.items():
        print(f"<!-- {impl} skipped: {why} -->")
    sys.stdout.flush()

    results: dict[str, dict] = {}
    for name, _, _ in ROWS:
        sys.stderr.write(f"{name} ")
        sys.stderr.flush()
        results[name] = measure(name, impls, args.rounds, args.min_sample,
                                lambda s: (sys.stderr.write(s), sys.stderr.flush()))
        sys.stderr.write("\n")

    def ratio(name: str, unit: str, a: str, b: str) -> float | None:
        if a not in results[name] or b not in results[name]:
            return None
        return results[name][a][unit] / results[name][b][unit]

    print()
    header = ["workload", "unit"] + impls
    if "compiled" in impls and "python" in impls:
        header.append("compiled / python")
    if "compiled" in impls and "h2" in impls:
        header.append("compiled / h2")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
    for name, label, unit in ROWS:
        cells = [label, unit] + [_fmt(results[name][impl][unit]) for impl in impls]
        if "compiled / python" in header:
            cells.append(f"{ratio(name, unit, 'compiled', 'python'):.1f}x")
        if "compiled / h2" in header:
            cells.append(f"{ratio(name, unit, 'compiled', 'h2'):.1f}x")
        print("| " + " | ".join(cells) + " |")

    print()
    print(
        "Payload MB/s and Data frames/s, median of the samples. `receive_data` hands over a frame that lies"
        " whole in a read as a view of that read (no copy), so the 64 KiB decode figure is per-frame and"
        " per-read cost, not a memory copy; the frames that straddle two reads (about one in four) are"
        " copied once. On the encode path every implementation copies the payload into its output buffer"
        " and `data_to_send` copies it out again, so 64 KiB encode is bound by memory copies."
    )
    print()
    print("Targets (issue 2, decode path):")
    print()
    failed = False
    for name, unit, a, b, minimum in TARGETS:
        r = ratio(name, unit, a, b)
        if r is None:
            print(f"- {name} {a}/{b} ({unit}): not measured")
            continue
        ok = r >= minimum
        failed |= not ok
        print(f"- {name} {a}/{b} ({unit}): {r:.1f}x, target >= {minimum:g}x: {'met' if ok else 'NOT MET'}")
    print()
    print("Same ratios on the encode path (no target set):")
    print()
    for name, unit, a, b in ENCODE_RATIOS:
        r = ratio(name, unit, a, b)
        if r is not None:
            print(f"- {name} {a}/{b} ({unit}): {r:.1f}x")

    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps({"command": command, "implementations": impls, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

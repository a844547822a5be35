"""Benchmarks of the yamux engines against h2, the reference Python multiplexer.

    python -m pytest bench/ --benchmark-only
    python -m pytest bench/ --benchmark-only --benchmark-json=bench.json

Each workload (see ``bench/mux_workloads.py``) runs for the compiled engine,
the pure-Python engine and h2, on the same payloads and the same reads or
writes. A round is timed on a fresh, fully set-up connection (setup untimed,
one warm-up round first); rounds are calibrated to about half a second of
timed work per benchmark, at least 5. Throughput goes into
``benchmark.extra_info`` (``MB/s`` of payload, ``frames/s``), into the JSON
and into the summary table printed at the end.
"""

from __future__ import annotations

import gc
import time

import mux_workloads as mw
import pytest

TARGET_SECONDS = 0.5  # timed work per benchmark, spread over the rounds
MIN_ROUNDS, MAX_ROUNDS = 5, 300

IMPL_PARAMS = [
    pytest.param("compiled", marks=pytest.mark.compiled, id="compiled"),
    pytest.param("python", id="python"),
    pytest.param("h2", id="h2"),
]

def _workload(name: str, impl: str) -> mw.Workload:
    why = mw.available(impl)
    if why is not None:
        if impl == "compiled":
            pytest.fail(f"{why}; build it, or deselect with -m 'not compiled'")
        pytest.skip(why)
    return mw.FACTORIES[name](impl)


def _bench(benchmark, name: str, impl: str) -> None:
    wl = _workload(name, impl)
    wl.verify()  # correctness first, and a warm-up
    args, kwargs = wl.setup()
    start = time.perf_counter()
    wl.run(*args, **kwargs)
    once = time.perf_counter() - start
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_SECONDS / max(once, 1e-6))))
    del args, kwargs
    gc.collect()

    benchmark.group = name
    benchmark.extra_info.update(
        workload=name,
        implementation=impl,
        payload_bytes=wl.payload_bytes,
        frames=wl.frames,
        calls_per_round=wl.calls,
    )
    benchmark.pedantic(wl.run, setup=wl.setup, rounds=rounds, warmup_rounds=1, iterations=1)

    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    median = stats.stats.median
    rates = wl.rates(median)
    benchmark.extra_info.update({"MB/s": round(rates["MB/s"], 3), "frames/s": round(rates["frames/s"], 1)})
    mw.RESULTS.append((name, impl, {**rates, "rounds": rounds}))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_receive_bulk_64k(benchmark, impl: str) -> None:
    """receive_data: 16 MiB in 64 KiB Data frames, one stream, 256 KiB reads."""
    _bench(benchmark, "decode_bulk", impl)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_receive_small_64b_100_streams(benchmark, impl: str) -> None:
    """receive_data: 20,000 Data frames of 64 bytes over 100 streams, ~1,000 frames per read."""
    _bench(benchmark, "decode_small", impl)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_send_bulk_64k(benchmark, impl: str) -> None:
    """send_data + data_to_send: 16 MiB in 64 KiB pieces, one 256 KiB write per 4 pieces."""
    _bench(benchmark, "encode_bulk", impl)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_send_small_64b_100_streams(benchmark, impl: str) -> None:
    """send_data + data_to_send: 20,000 pieces of 64 bytes over 100 streams, one write per 1,000."""
    _bench(benchmark, "encode_small", impl)

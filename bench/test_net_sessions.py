"""pytest-benchmark wrapper of ``bench/report_sessions.py`` (issue 3), smaller.

    python -m pytest bench/test_net_sessions.py --benchmark-only
    python -m pytest bench/ --benchmark-only -k "sessions and asyncio"

Per API (asyncio, blocking) and engine (compiled, pure) one client and one
server process, joined by plain TCP (``direct``) and by one multiplexer
session (``mux``); bulk transfers of ``SIZE`` over 1 connection / stream and
over ``STREAMS`` at once, each way, ``ROUNDS`` rounds after a warm-up (see
``bench/net_bench.py``). The client's figure (``MB/s``, median of the rounds)
goes into ``benchmark.extra_info`` and into the summary printed at the end.
For ratios measured with the implementations interleaved, use the report.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import net_bench as nb
import pytest

SIZE = 64 * nb.MiB
STREAMS = 8
ROUNDS = 3

WORKLOADS = {
    "bulk_up": nb.bulk("up", SIZE, 1),
    f"bulk_up_{STREAMS}": nb.bulk("up", SIZE, STREAMS),
    "bulk_down": nb.bulk("down", SIZE, 1),
    f"bulk_down_{STREAMS}": nb.bulk("down", SIZE, STREAMS),
}


class _Pool:
    def __init__(self) -> None:
        self.topologies: dict[str, nb.Topology] = {}

    def get(self, api: str, engine: str) -> nb.Topology:
        key = f"{api}-{engine}"
        if key not in self.topologies:
            self.topologies[key] = nb.start_sessions(api, engine)
        return self.topologies[key]


@pytest.fixture(scope="module")
def pool() -> Iterator[_Pool]:
    p = _Pool()
    try:
        yield p
    finally:
        nb.close_all(p.topologies)


def _params() -> list[object]:
    params = []
    for workload in WORKLOADS:
        for api in ("asyncio", "blocking"):
            for engine in ("compiled", "pure"):
                for target in ("direct", "mux"):
                    marks = [pytest.mark.compiled] if engine == "compiled" else []
                    params.append(pytest.param(workload, api, engine, target, marks=marks,
                                               id=f"{workload}-{api}-{engine}-{target}"))
    return params


@pytest.mark.parametrize(("workload", "api", "engine", "target"), _params())
def test_sessions(benchmark, pool: _Pool, workload: str, api: str, engine: str, target: str) -> None:
    """A bulk transfer between two processes: plain TCP or one multiplexer session."""
    wl = WORKLOADS[workload]
    topo = pool.get(api, engine)
    wl.run(topo, target, True)  # warm-up (downloads checked byte for byte)
    samples: list[dict[str, float]] = []
    benchmark.group = f"sessions {workload} {api}"
    benchmark.extra_info.update(workload=wl.label, api=api, engine=engine, target=target, rounds=ROUNDS)
    benchmark.pedantic(lambda: samples.append(wl.run(topo, target, False)), rounds=ROUNDS, iterations=1)
    mbps = statistics.median(s["MB/s"] for s in samples)
    benchmark.extra_info["MB/s"] = round(mbps, 3)
    nb.RESULTS.append(("sessions", workload, f"{api}-{engine}/{target}", {"MB/s": mbps}))

"""pytest-benchmark wrapper of ``bench/report_relay.py`` (issues 4 and 7), smaller.

    python -m pytest bench/test_net_relay.py --benchmark-only
    python -m pytest bench/ --benchmark-only -k "relay and bulk"

Same processes and workloads as the report (see ``bench/net_bench.py``), at
sizes that keep the suite short: bulk transfers of ``BULK_SIZE``, ``RTT_COUNT``
round trips, ``CPS_SECONDS`` of connections, ``ROUNDS`` rounds after one
warm-up. The topologies start on first use and stop at the end of the module.
pytest-benchmark's own timing is the wall time of one measurement including
the command round trip to the client process; the figures measured by the
client go into ``benchmark.extra_info`` (``MB/s``, ``p50 µs``/``p99 µs``,
``conn/s``: the median of the rounds) and into the summary printed at the
end. Tests run one after the other here, so ratios between implementations
are less trustworthy than the report's, which interleaves them round by round.

The Go relay needs ``golang-go`` and ``golang-github-hashicorp-yamux-dev``; it
is skipped without them (a failure when ``CI`` is set).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from pathlib import Path

import net_bench as nb
import procs
import pytest

BULK_SIZE = 64 * nb.MiB
RTT_COUNT, RTT_WARMUP = 2_000, 200
CPS_SECONDS = 1.0
ROUNDS = 3

IMPLS = {
    "fastnat-compiled": nb.Impl("fastnat-compiled", "fastnat-compiled", "fastnat"),
    "fastnat-pure": nb.Impl("fastnat-pure", "fastnat-pure", "fastnat"),
    "go-relay": nb.Impl("go-relay", "go", "relay"),
    "plain-relay": nb.Impl("plain-relay", "plain", "relay"),
    "direct": nb.Impl("direct", "fastnat-compiled", "direct"),
}
WORKLOADS = {
    "bulk_up": nb.bulk("up", BULK_SIZE),
    "bulk_down": nb.bulk("down", BULK_SIZE),
    "rtt": nb.rtt(RTT_COUNT, RTT_WARMUP),
    "cps": nb.cps(CPS_SECONDS),
}


class _Pool:
    """Topologies started on first use, all stopped by ``close``."""

    def __init__(self, go_dir: Path) -> None:
        self.go_dir = go_dir
        self.topologies: dict[str, nb.Topology] = {}

    def get(self, name: str) -> nb.Topology:
        topo = self.topologies.get(name)
        if topo is None:
            if name == "fastnat-compiled":
                topo = nb.start_fastnat("compiled")
            elif name == "fastnat-pure":
                topo = nb.start_fastnat("pure")
            elif name == "plain":
                topo = nb.start_plain()
            elif name == "go":
                _go, _gopath, missing = procs.find_go_toolchain()
                if missing:
                    reason = f"the Go relay needs {missing}"
                    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
                        pytest.fail(f"{reason}; CI is set, so this is not skipped", pytrace=False)
                    pytest.skip(reason)
                topo = nb.start_go(procs.build_go_relay(self.go_dir))
            else:
                raise KeyError(name)
            self.topologies[name] = topo
        return topo

    def close(self) -> None:
        nb.close_all(self.topologies)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Pool]:
    p = _Pool(tmp_path_factory.mktemp("go_relay"))
    try:
        yield p
    finally:
        p.close()


def _params() -> list[object]:
    params = []
    for wl in WORKLOADS:
        for impl in IMPLS.values():
            marks = [pytest.mark.compiled] if impl.topology == "fastnat-compiled" else []
            params.append(pytest.param(wl, impl.name, marks=marks, id=f"{wl}-{impl.name}"))
    return params


@pytest.mark.parametrize(("workload", "impl"), _params())
def test_relay(benchmark, pool: _Pool, workload: str, impl: str) -> None:
    """One workload through one implementation (client and server in their own processes)."""
    spec = IMPLS[impl]
    wl = WORKLOADS[workload]
    topo = pool.get(spec.topology)
    wl.run(topo, spec.target, True)  # warm-up (downloads checked byte for byte)
    samples: list[dict[str, float]] = []
    benchmark.group = f"relay {workload}"
    benchmark.extra_info.update(workload=wl.label, implementation=impl, rounds=ROUNDS)
    benchmark.pedantic(lambda: samples.append(wl.run(topo, spec.target, False)), rounds=ROUNDS, iterations=1)
    figures = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    benchmark.extra_info.update({k: round(v, 3) for k, v in figures.items()})
    nb.RESULTS.append(("relay", workload, impl, figures))

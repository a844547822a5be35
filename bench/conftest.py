"""pytest-benchmark setup for ``bench/``.

Run the suite (10-20 s on a 2-core machine)::

    python -m pytest bench/ --benchmark-only

Add ``--benchmark-json=bench.json`` to keep the figures: each benchmark's
``extra_info`` carries its throughput (``MB/s``, ``frames/s``) and its shape
(payload bytes, frames, reads or writes per round). A throughput table is
also printed at the end of the run. Absolute timings on a shared machine are
noise; for the ratios between implementations use ``bench/report_mux.py``,
which measures all of them in one process, interleaved.

The compiled engine's cases carry the ``compiled`` marker: ``-m "not
compiled"`` (or ``FASTNAT_NO_EXTENSIONS=1``) deselects them on a pure-Python
install; otherwise a missing compiled engine is a failure, not a skip.

The process benchmarks (``test_net_sessions.py``: multiplexer sessions
against direct TCP between two processes; ``test_net_relay.py``: fastnat end
to end through a forwarder against a Go relay, a plain relay and direct TCP)
start helper processes, about a minute together; deselect them with
``-m "not net"`` or run them alone with ``-m net``. Their interleaved reports
are ``bench/report_sessions.py`` and ``bench/report_relay.py``.
"""

from __future__ import annotations

import os

import mux_workloads
import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "net: a benchmark between processes over loopback TCP (bench/net_bench.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.parent.name == "bench" and item.path.name.startswith("test_net_"):
            item.add_marker(pytest.mark.net)
    if os.environ.get("FASTNAT_NO_EXTENSIONS", "") in ("", "0"):
        return
    kept, dropped = [], []
    for item in items:
        in_bench = item.path.parent.name == "bench"
        (dropped if in_bench and item.get_closest_marker("compiled") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    _net_summary(terminalreporter)
    results = mux_workloads.RESULTS
    if not results:
        return
    tr = terminalreporter
    tr.write_sep("-", "multiplexer throughput (median round; ratios: bench/report_mux.py)")
    tr.write_line(f"{'workload':<14} {'implementation':<15} {'MB/s':>12} {'frames/s':>14} {'rounds':>7}")
    for workload, impl, info in sorted(results, key=lambda r: (r[0], r[1])):
        tr.write_line(
            f"{workload:<14} {impl:<15} {info['MB/s']:>12,.1f} {info['frames/s']:>14,.0f} {info['rounds']:>7}"
        )


def _net_summary(tr) -> None:
    """The figures of the process benchmarks (test_net_sessions.py, test_net_relay.py)."""
    import sys

    net_bench = sys.modules.get("net_bench")
    if net_bench is None or not net_bench.RESULTS:
        return
    tr.write_sep("-", "network benchmarks: client-side figures, median of the rounds "
                      "(interleaved ratios: bench/report_sessions.py, bench/report_relay.py)")
    tr.write_line(f"{'suite':<9} {'workload':<12} {'implementation':<28} figures")
    for suite, workload, impl, figures in net_bench.RESULTS:
        text = ", ".join(f"{value:,.1f} {key}" for key, value in figures.items() if key != "seconds")
        tr.write_line(f"{suite:<9} {workload:<12} {impl:<28} {text}")

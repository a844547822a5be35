"""The soak script (bench/soak.py): its rules, and a short run of it.

The short run starts a real forwarder, servers that come and go (clean,
aborted, a killed process) and clients checking every transfer; it must end
with exit status 0: no corrupt or unexplained transfer, the forwarder idle
again, memory judged flat.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENGINE_PARAMS

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import soak

MiB = 1024 * 1024


def test_a_flat_series_is_flat() -> None:
    # 30 MiB, moving by +-2 MiB from sample to sample: noise, not growth.
    samples = [(float(t), 30 * MiB + (2 * MiB if t % 2 else -2 * MiB)) for t in range(60)]
    verdict = soak.memory_verdict(samples, warmup=10)
    assert verdict["flat"] is True, verdict
    assert abs(verdict["growth"]) < MiB


def test_a_slow_leak_is_a_leak() -> None:
    # 1 MiB a minute for 10 minutes, sampled every 10 s, with the same noise.
    samples = [(t, int(30 * MiB + t / 60 * MiB + (MiB if t % 20 else -MiB))) for t in range(0, 600, 10)]
    verdict = soak.memory_verdict(samples, warmup=120)
    assert verdict["flat"] is False, verdict
    assert verdict["slope_per_min"] == pytest.approx(1024, rel=0.2) and verdict["unit"] == "KiB"
    assert verdict["verdict"].startswith("LEAK")


def test_growth_during_warm_up_is_not_judged() -> None:
    samples = [(float(t), (10 + min(t, 10) * 3) * MiB) for t in range(40)]  # +30 MiB, then flat
    assert soak.memory_verdict(samples, warmup=10)["flat"] is True
    assert soak.memory_verdict(samples, warmup=0)["flat"] is False


def test_a_leak_of_blocks_is_a_leak() -> None:
    # 100 blocks a second (a few objects per transfer) over 10 minutes, sampled every 10 s.
    samples = [(float(t), 90_000 + 100 * t + (1_500 if t % 20 else -1_500)) for t in range(0, 600, 10)]
    verdict = soak.memory_verdict(samples, warmup=120, floor=soak.BLOCKS_FLOOR, unit="blocks")
    assert verdict["flat"] is False and "blocks" in verdict["verdict"]
    flat = [(t, 90_000 + (1_500 if t % 20 else -1_500)) for t, _ in samples]
    assert soak.memory_verdict(flat, warmup=120, floor=soak.BLOCKS_FLOOR, unit="blocks")["flat"] is True


def test_too_few_samples_are_not_judged() -> None:
    verdict = soak.memory_verdict([(0.0, MiB), (1.0, 9 * MiB), (2.0, 90 * MiB)], warmup=0)
    assert verdict["flat"] is None and "too short" in verdict["verdict"]


def test_a_failure_is_expected_only_if_its_server_went_down_after_it_began() -> None:
    downs = {"a": [(5.0, "clean")], "b": [(1.0, "abort"), (9.0, "killed")]}
    assert soak.explain("a", 4.0, downs) == soak.EXPECTED["clean"]
    assert soak.explain("a", 6.0, downs) is None  # it was gone before: nobody explains that failure
    assert soak.explain("b", 2.0, downs) == soak.EXPECTED["killed"]
    assert soak.explain("c", 0.0, downs) is None


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_a_short_soak_passes(engine: str, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(BENCH / "soak.py"), "--duration", "12", "--interval", "1", "--engine", engine,
         "--servers", "8", "--lifetime", "1", "5", "--abort-share", "0.5", "--group-size", "3", "--kill-every", "4",
         "--clients", "4", "--max-size", "256K", "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=100,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    report = json.loads(out.read_text())
    final = report["final"]
    assert final["counters"]["transfers ok"] > 100
    assert final["errors"] == {} and report["problems"] == []
    assert report["kills"] >= 2 and report["forwarder_idle_after"]
    left = final["counters"]
    assert left.get("servers left (clean)", 0) > 0 and left.get("servers left (abort)", 0) > 0
    assert report["memory"]["rss"]["flat"] is True and report["memory"]["blocks"]["flat"] is True
    assert all(s["stats"]["python_blocks"] > 0 for s in report["samples"])
    assert "| time (s) | forwarder RSS (MiB) |" in result.stdout and "Verdict: PASS" in result.stdout

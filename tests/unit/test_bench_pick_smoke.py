"""The pick benchmark runs and prints its table (a smoke run: the figures are not checked)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench_pick.py"


def test_the_pick_benchmark_prints_every_strategy_in_every_state() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--nodes", "60"], capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.rstrip().endswith(("met", "MISSED"))]
    strategies = {row[-4] for row in rows}
    assert strategies == {"WeightedRandom", "RoundRobin", "LeastLoaded", "ConsistentHash"}, done.stdout
    assert len(rows) == 16, done.stdout
    assert "moved between the others" in done.stdout and "10x slower" in done.stdout

"""The benchmark command keeps working (a --quick run), and its structural claims hold.

Speed is not asserted here (machines are noisy); what the benchmark counts is: one ZooKeeper
read when one of 1,000 nodes changes, two when one joins.
"""

import json
import subprocess
import sys

from conftest import ROOT


def test_quick_benchmark_runs_and_one_node_change_costs_one_read(tmp_path, services):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "bench.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(ROOT), check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1. call path" in done.stdout and "5. distribution" in done.stdout
    results = json.loads(out.read_text())
    assert set(results["call_path_1_thread"]) == {"raw", "thriftprobe", "seed"}
    assert results["scale"]["nodes"] == 1000
    assert results["scale"]["zk_reads_one_node_changed"] == 1
    assert sum(results["scale"]["zk_reads_one_node_joined"].values()) == 2
    assert set(results["propagation"]) == {"join", "leave", "weight change", "switch off"}
    assert 0 <= results["distribution"]["p_value"] <= 1
    # Metrics: the on/off comparison ran, and the client recorded one lag per change it applied
    # (a join, a weight change and a switch-off per round; a removal carries no time).
    assert {"metrics on", "metrics off", "p50_on_over_off"} <= set(results["metrics_cost"])
    assert results["discovery_lag"]["n"] == 3 * results["propagation"]["join"]["n"]


def test_quick_asyncio_benchmark_runs_both_clients_side_by_side(services):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "bench_aio.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=str(ROOT), check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("thriftpy2.contrib.aio", "thriftprobe.aio"))]
    assert len(rows) == 2
    for row in rows:  # calls/s, p50 and p99 measured for each
        assert all(float(x) > 0 for x in row.split()[-3:]), row
    assert "throughput thriftprobe.aio / plain, per round: median" in done.stdout
    assert "p50        thriftprobe.aio / plain, per round: median" in done.stdout

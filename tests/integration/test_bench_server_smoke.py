"""The server benchmark keeps working (a --quick run), and its structural claims hold.

Speed is never asserted (machines are noisy). What is: every row of the throughput table is
there; idle connections cost no thread (threads <= workers + a small constant) and all stay
open; every slow connection is closed by the read timeout, not before it; oversized requests are
refused without the provider's memory growing by 10 MB, and the provider still answers after.
"""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_quick_server_benchmark_runs_and_its_structural_claims_hold(tmp_path):
    out = tmp_path / "bench_server.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "bench_server.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(ROOT), check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for title in ("1. throughput", "2. ", "3. ", "4. oversized"):
        assert "\n" + title in done.stdout, done.stdout
    r = json.loads(out.read_text())

    rows = r["throughput"]["rows"]
    assert set(rows) == {"1", "16", "64"}
    for conns, row in rows.items():
        assert set(row) == {"TThreadedServer", "core, linger 2 ms", "core, linger 0"}, conns
        for name, v in row.items():
            assert v["calls"] > 0 and v["calls_per_s"] > 0 and 0 < v["p50_ms"] <= v["p99_ms"], (conns, name)
            for key in ("throughput_x_threaded", "p50_x_threaded", "p99_x_threaded", "server_cpu_us_per_call"):
                assert v[key] > 0, (conns, name, key)
        assert row["TThreadedServer"]["throughput_x_threaded"] == 1.0
        assert all("goal_met" in v for name, v in row.items() if name != "TThreadedServer")

    idle = r["idle"]
    assert idle["server_connections_held"] == idle["idle_connections"] == idle["still_open_at_check"]
    assert idle["worker_threads"] <= idle["workers_option"]
    assert idle["threads_over_workers"] <= 4  # the main thread and the I/O thread
    for kind in ("warm", "cold"):
        assert idle["legit"][kind]["with"]["n"] > 0 and idle["legit"][kind]["without"]["n"] > 0

    slow = r["slowloris"]
    attack = slow["attack"]
    assert slow["opened"]["opened"] == slow["slow_connections"]
    assert attack["closed_by_server"]["silent"] > 0 and attack["closed_by_server"]["trickle"] > 0
    assert slow["closed_by_read_timeout"] >= slow["slow_connections"]  # the whole first wave at least
    assert set(slow["closed_reasons"]) <= {"read_timeout", "peer_closed"}, slow["closed_reasons"]
    assert attack["closed_after_s"]["min"] >= slow["read_timeout_s"] * 0.95  # not before the timeout
    assert slow["provider_threads_during"] <= slow["worker_threads_during"] + 4

    big = r["oversized"]
    n = big["count_each"]
    assert sum(big["client_saw"]["header"].values()) == n
    assert set(big["client_saw"]["header"]) <= {"closed without a reply", "connection reset"}, big["client_saw"]
    assert sum(big["client_saw"]["body"].values()) == n
    assert all(seen.startswith("TApplicationException type 7 ") for seen in big["client_saw"]["body"]), big
    assert big["ping_after"] == "pong"
    assert big["rss_growth_mb"] < 10

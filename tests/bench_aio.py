"""thriftprobe.aio against a plain thriftpy2.contrib.aio client, on one event loop.

    PYTHONPATH=. .venv/bin/python tests/bench_aio.py [--quick]

Needs the local servers (tests/services.sh start). One provider (thriftprobe's server) runs in
another process, pinned to another CPU than the client when there are two (as tests/bench.py
does). Two measures, each interleaved round by round (each round led by the other contender):

- 64 concurrent calls: 64 tasks on one loop, each calling echo in a loop; thriftprobe.aio with
  one client (its own pool), the plain client as a kept pool of 64 ``TAsyncClient`` connections
  made by ``thriftpy2.contrib.aio.rpc.make_client`` (a task takes one from a queue per call).
- a single call: one task, one call at a time; the p50 of its latency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import APPKEY, IDL, PAYLOAD, demo, pct, prepare, start_provider
from thriftpy2.contrib.aio.rpc import make_client

from thriftprobe import aio, config

CONCURRENCY = 64


async def concurrent(call: Callable[[], Awaitable[Any]], per_task: int) -> float:
    """Calls per second of CONCURRENCY tasks making ``per_task`` calls each."""

    async def worker() -> None:
        for _ in range(per_task):
            await call()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return CONCURRENCY * per_task / (time.perf_counter() - began)


async def single(call: Callable[[], Awaitable[Any]], n: int) -> List[float]:
    times = []
    for _ in range(n):
        began = time.perf_counter()
        await call()
        times.append(time.perf_counter() - began)
    return times


async def run(port: int, cfg: config.Config, rounds: int, per_task: int, singles: int) -> Dict[str, Any]:
    client = await aio.build_client(IDL, APPKEY, "Calculator", config=cfg, max_idle_per_node=CONCURRENCY)
    plain: "asyncio.Queue[Any]" = asyncio.Queue()
    for _ in range(CONCURRENCY):
        plain.put_nowait(await make_client(demo.Calculator, "127.0.0.1", port, timeout=3000))

    async def plain_call() -> Any:
        conn = await plain.get()
        try:
            return await conn.echo(PAYLOAD)
        finally:
            plain.put_nowait(conn)

    async def probe_call() -> Any:
        return await client.echo(PAYLOAD)

    contenders = {"thriftpy2.contrib.aio (pool of 64)": plain_call, "thriftprobe.aio": probe_call}
    throughput: Dict[str, List[float]] = {name: [] for name in contenders}
    latency: Dict[str, List[float]] = {name: [] for name in contenders}
    for call in contenders.values():  # warm up: connections, caches
        await concurrent(call, 20)
        await single(call, 200)
    names = list(contenders)
    p50_ratios: List[float] = []
    for r in range(rounds):
        p50s: Dict[str, float] = {}
        for name in names if r % 2 == 0 else names[::-1]:
            throughput[name].append(await concurrent(contenders[name], per_task))
            times = await single(contenders[name], singles)
            latency[name].extend(times)
            p50s[name] = pct(times, 0.5)
        p50_ratios.append(p50s[names[1]] / p50s[names[0]])
    # The machine is shared (and drifts): each round's two runs sit side by side, so the ratios
    # are taken round by round, and their median reported with their range.
    tput_ratios = [b / a for a, b in zip(throughput[names[0]], throughput[names[1]])]
    await client.close()
    while not plain.empty():
        plain.get_nowait().close()
    return {
        "ratios": {"throughput": sorted(tput_ratios), "p50": sorted(p50_ratios)},
        **{name: {
            "calls_per_s": statistics.median(throughput[name]),
            "p50_ms": pct(latency[name], 0.5) * 1000,
            "p99_ms": pct(latency[name], 0.99) * 1000,
        }
        for name in contenders},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, not for figures)")
    args = parser.parse_args()
    config_path, cfg, client_cpu, server_cpu, cpus = prepare("thriftprobe-bench-aio.yml")
    provider = start_provider(config_path, server_cpu)
    try:
        rounds, per_task, singles = (2, 20, 300) if args.quick else (10, 100, 2000)
        results = asyncio.run(run(provider.port, cfg, rounds, per_task, singles))
    finally:
        provider.terminate()
        provider.wait(15)
    ratios = results.pop("ratios")
    print("%-36s %14s %10s %10s" % ("client (medians of %d rounds)" % rounds, "64 tasks c/s", "p50 ms", "p99 ms"))
    for name, r in results.items():
        print("%-36s %14.0f %10.3f %10.3f" % (name, r["calls_per_s"], r["p50_ms"], r["p99_ms"]))
    for label, key, goal in (("throughput", "throughput", ">= 0.9x"), ("p50", "p50", "<= 1.10x")):
        values = ratios[key]
        print("%-10s thriftprobe.aio / plain, per round: median %.2fx (range %.2f-%.2f; goal %s)" % (
            label, statistics.median(values), values[0], values[-1], goal))
    print("python %s, %d CPU(s), client on CPU %s, provider on CPU %s" % (
        sys.version.split()[0], len(cpus), client_cpu, server_cpu))


if __name__ == "__main__":
    main()

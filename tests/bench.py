"""thriftprobe benchmarks: call path, threads, propagation, scale, distribution, metrics cost.

    bash tests/bench.sh [--quick] [--json out.json]

Needs the local servers (tests/services.sh start). Every comparison is measured side by side
in one run, interleaved round by round (each round led by another contender), so that machine
drift hits all contenders alike. The
provider runs in another process, pinned to another CPU than the clients (when there are two),
because this 2-vCPU machine is bimodal: a round trip takes ~0.03 ms when client and server
share a vCPU and ~0.12 ms across.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import thriftpy2
from kazoo.client import KazooClient
from scipy.stats import chisquare
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.rpc import make_client
from thriftpy2.transport import TBufferedTransportFactory, TSocket

from thriftprobe import build_client, config, metrics
from thriftprobe.consumer.balancer import WeightedRandom
from thriftprobe.consumer.table import NodeTable
from thriftprobe.node import Node, parse_znode_name, service_path
from thriftprobe.stores.appkeys import add_appkey
from thriftprobe.stores.mysql import create_schema

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported
from local_servers import MYSQL_PORT, REDIS_PORT, ZK_PORT

ROOT = Path(__file__).resolve().parents[1]
IDL = str(ROOT / "idl" / "demo.thrift")
ENV = "bench"
APPKEY = "bench.calc"
CONFIG_TEXT = f"""
mysql: {{bench: {{host: 127.0.0.1, port: {MYSQL_PORT}, username: root, database: thriftprobe_bench}}}}
redis: {{bench: {{host: 127.0.0.1, port: {REDIS_PORT}}}}}
zkserver: {{bench: {{host: 127.0.0.1, port: {ZK_PORT}, session_timeout: 4000}}}}
"""
PAYLOAD = "x" * 32
demo = thriftpy2.load(IDL, module_name="demo_thrift")


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the seed's per-call design, re-implemented from its description -------------------------------


class SeedStyleClient:
    """Per call: a new ZooKeeper session, list the appkey's children, read each node of the
    service, weighted-random pick among valid ones, a new socket, the call, close everything."""

    def __init__(self, zk_hosts: str, env: str, appkey: str, service_name: str, service: Any) -> None:
        self.zk_hosts, self.env, self.appkey, self.service_name, self.service = (
            zk_hosts, env, appkey, service_name, service)

    def echo(self, text: str) -> str:
        zk = KazooClient(hosts=self.zk_hosts)
        zk.start(10)
        try:
            folder = service_path(self.env, self.appkey)
            nodes = []
            for name in zk.get_children(folder):
                parsed = parse_znode_name(name)
                if parsed and parsed[0] == self.service_name:
                    nodes.append(json.loads(zk.get(folder + "/" + name)[0]))
        finally:
            zk.stop()
            zk.close()
        valid = [n for n in nodes if n["valid"] == 1 and n["weight"] > 0]
        point = random.randint(1, sum(n["weight"] for n in valid))
        for node in valid:
            point -= node["weight"]
            if point <= 0:
                break
        sock = TSocket(node["host"], node["port"], socket_timeout=3000)
        transport = TBufferedTransportFactory().get_transport(sock)
        transport.open()
        try:
            client = thriftpy2.thrift.TClient(self.service, TBinaryProtocolFactory().get_protocol(transport))
            return client.echo(text)  # type: ignore[no-any-return]
        finally:
            transport.close()


# -- measurements ------------------------------------------------------------------------------------


def time_calls(call: Callable[[], Any], n: int) -> List[float]:
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        began = clock()
        call()
        samples.append(clock() - began)
    return samples


def call_path(contenders: Dict[str, Callable[[], Any]], rounds: int, per_round: Dict[str, int]) -> Dict[str, Any]:
    samples: Dict[str, List[float]] = {name: [] for name in contenders}
    order = list(contenders.items())
    for r in range(rounds):
        # Each round starts with another contender: running first or after another is no edge.
        for name, call in order[r % len(order):] + order[:r % len(order)]:
            for _ in range(20):  # warm the path after the other contenders ran
                call()
            samples[name].extend(time_calls(call, per_round[name]))
    out = {}
    for name, s in samples.items():
        out[name] = {
            "calls": len(s),
            "calls_per_s": len(s) / sum(s),
            "p50_ms": statistics.median(s) * 1000,
            "p99_ms": pct(s, 0.99) * 1000,
        }
    return out


def threaded(make_calls: Dict[str, Callable[[int], Callable[[], Any]]], threads: int, rounds: int,
             per_thread: int) -> Dict[str, Any]:
    totals = {name: [0, 0.0] for name in make_calls}
    for _ in range(rounds):
        for name, make in make_calls.items():
            calls = [make(i) for i in range(threads)]
            barrier = threading.Barrier(threads + 1)

            def work(call: Callable[[], Any], barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                for _ in range(per_thread):
                    call()

            workers = [threading.Thread(target=work, args=(c,)) for c in calls]
            for w in workers:
                w.start()
            barrier.wait()
            began = time.perf_counter()
            for w in workers:
                w.join()
            totals[name][0] += threads * per_thread
            totals[name][1] += time.perf_counter() - began
    return {name: {"calls": c, "calls_per_s": c / t} for name, (c, t) in totals.items()}


def propagation(zk: KazooClient, client: Any, repeats: int) -> Dict[str, Any]:
    folder = service_path(ENV, APPKEY)
    table: NodeTable = client.table
    results: Dict[str, List[float]] = {"join": [], "leave": [], "weight change": [], "switch off": []}
    for i in range(repeats):
        port = 40000 + i
        node = Node("127.0.0.2", port, weight=1)
        path = folder + "/" + node.znode_name("Calculator")
        began = time.perf_counter()
        zk.create(path, node.to_json(), ephemeral=True)
        table.wait_for(lambda s, port=port: any(n.port == port for n in s.all_nodes), 5)
        results["join"].append(time.perf_counter() - began)
        began = time.perf_counter()
        zk.set(path, node.with_settings(7, True, 1).to_json())
        table.wait_for(lambda s, port=port: any(n.port == port and n.weight == 7 for n in s.all_nodes), 5)
        results["weight change"].append(time.perf_counter() - began)
        began = time.perf_counter()
        zk.set(path, node.with_settings(7, False, 2).to_json())
        table.wait_for(lambda s, port=port: any(n.port == port and not n.valid for n in s.all_nodes), 5)
        results["switch off"].append(time.perf_counter() - began)
        began = time.perf_counter()
        zk.delete(path)
        table.wait_for(lambda s, port=port: not any(n.port == port for n in s.all_nodes), 5)
        results["leave"].append(time.perf_counter() - began)
    return {k: {"p50_ms": statistics.median(v) * 1000, "p99_ms": pct(v, 0.99) * 1000, "n": len(v)}
            for k, v in results.items()}


def histogram_quantile(buckets: Sequence[tuple], q: float) -> float:
    """Prometheus's ``histogram_quantile``: ``buckets`` are (upper bound, cumulative count),
    ascending, +Inf last; linear interpolation inside the bucket the rank falls in."""
    total = buckets[-1][1]
    if not total:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower  # Prometheus answers the highest finite bound
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower


def discovery_lag(recorder: Any, exact: List[float]) -> Dict[str, Any]:
    """The discovery lag histogram of the benchmark's service, as a Prometheus would read it,
    beside the exact figures of the same observations."""
    buckets = sorted(
        (float(sample.labels["le"]), sample.value)
        for metric in recorder.registry.collect()
        for sample in metric.samples
        if sample.name == "thriftprobe_discovery_lag_seconds_bucket" and sample.labels["appkey"] == APPKEY
        and sample.labels["rpc_service"] == "Calculator"
    )
    return {
        "n": int(buckets[-1][1]) if buckets else 0,
        "histogram_p50_ms": histogram_quantile(buckets, 0.5) * 1000,
        "histogram_p99_ms": histogram_quantile(buckets, 0.99) * 1000,
        "exact_p50_ms": statistics.median(exact) * 1000 if exact else float("nan"),
        "exact_p99_ms": pct(exact, 0.99) * 1000 if exact else float("nan"),
        "exact_max_ms": max(exact) * 1000 if exact else float("nan"),
    }


class CountingZk:
    """Counts the reads a KazooClient sends, by wrapping the async calls every read goes through
    (kazoo's synchronous get/get_children/exists call these too)."""

    def __init__(self, zk: KazooClient) -> None:
        self.counts: Counter = Counter()
        for name in ("get_async", "get_children_async", "exists_async"):
            original = getattr(zk, name)

            def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(zk, name, counted)


def scale(cfg: config.Config, zk: KazooClient, nodes: int) -> Dict[str, Any]:
    appkey = "bench.scale"
    folder = service_path(ENV, appkey)
    zk.ensure_path(folder)
    for name in zk.get_children(folder):
        zk.delete(folder + "/" + name)
    transaction_size = 200
    for start in range(0, nodes, transaction_size):
        tx = zk.transaction()
        for i in range(start, min(nodes, start + transaction_size)):
            node = Node("10.%d.%d.%d" % (i // 65536, i // 256 % 256, i % 256), 9000, weight=1 + i % 100)
            tx.create(folder + "/" + node.znode_name("Calculator"), node.to_json(), ephemeral=True)
        tx.commit()
    began = time.perf_counter()
    client = build_client(IDL, appkey, "Calculator", config=cfg)
    startup = time.perf_counter() - began
    assert len(client.table.snapshot.all_nodes) == nodes, len(client.table.snapshot.all_nodes)
    client.close()
    gc.collect()
    tracemalloc.start()  # a second client, built under tracemalloc (which slows it), for its memory
    before = tracemalloc.take_snapshot()
    client = build_client(IDL, appkey, "Calculator", config=cfg)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    memory = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(client.table.snapshot.all_nodes) == nodes, len(client.table.snapshot.all_nodes)
    picker = WeightedRandom()
    snap = client.table.snapshot
    n = 200_000
    began = time.perf_counter()
    for _ in range(n):
        picker.pick(snap)
    pick_us = (time.perf_counter() - began) / n * 1e6
    # ZooKeeper reads caused by ONE node changing, counted on the client's own session.
    counter = CountingZk(client._registry.client)
    victim = snap.all_nodes[nodes // 2]
    path = folder + "/" + victim.znode_name("Calculator")
    zk.set(path, victim.with_settings(500, True, 1).to_json())
    client.table.wait_for(lambda s: any(m.host == victim.host and m.weight == 500 for m in s.all_nodes), 5)
    reads_change = sum(counter.counts.values())
    counter.counts.clear()
    joiner = Node("10.255.255.254", 9000)
    zk.create(folder + "/" + joiner.znode_name("Calculator"), joiner.to_json(), ephemeral=True)
    client.table.wait_for(lambda s: len(s.all_nodes) == nodes + 1, 5)
    reads_join = dict(counter.counts)
    client.close()
    for name in zk.get_children(folder):
        zk.delete(folder + "/" + name)
    return {
        "nodes": nodes,
        "startup_ms": startup * 1000,
        "pick_us": pick_us,
        "zk_reads_one_node_changed": reads_change,
        "zk_reads_one_node_joined": reads_join,
        "client_memory_kib": memory / 1024,
    }


def distribution(picks: int) -> Dict[str, Any]:
    table = NodeTable()
    weights = {"w1": 1, "w10": 10, "w100": 100}
    for i, (tag, weight) in enumerate(weights.items()):
        table.upsert(tag, Node(tag, 1000 + i, weight))
    picker = WeightedRandom()
    counts = Counter(picker.pick(table.snapshot).host for _ in range(picks))
    total = sum(weights.values())
    observed = [counts[t] for t in weights]
    expected = [picks * w / total for w in weights.values()]
    stat, p = chisquare(observed, expected)
    return {"picks": picks, "observed": dict(zip(weights, observed)), "chi2": stat, "p_value": p}


def metrics_cost(cfg: config.Config, rounds: int, per_round: int) -> Dict[str, Any]:
    """One call with metrics on (the default recorder) and off, side by side, interleaved."""
    on = build_client(IDL, APPKEY, "Calculator", config=cfg)
    off = build_client(IDL, APPKEY, "Calculator", config=cfg, metrics=False)
    assert on._instruments is not None and off._instruments is None
    try:
        out = call_path({"metrics on": lambda: on.echo(PAYLOAD), "metrics off": lambda: off.echo(PAYLOAD)},
                        rounds, {"metrics on": per_round, "metrics off": per_round})
    finally:
        on.close()
        off.close()
    out["p50_on_over_off"] = out["metrics on"]["p50_ms"] / out["metrics off"]["p50_ms"]
    return out


# -- orchestration -----------------------------------------------------------------------------------


def start_provider(config_path: str, cpu: int | None) -> subprocess.Popen:
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from demo import Calculator\n"
        "from thriftprobe import start_service\n"
        "svc = start_service(%r, %r, 'Calculator', Calculator('bench'), 0, config=%r, env=%r,"
        " bind_host='127.0.0.1', block=False)\n"
        "print('READY', svc.port, flush=True)\n"
        "svc.serve_forever()\n" % (str(ROOT / "tests"), IDL, APPKEY, config_path, ENV)
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line.startswith("READY"):
        raise SystemExit("provider did not start: %r" % line)
    proc.port = int(line.split()[1])  # type: ignore[attr-defined]
    return proc


def prepare(config_name: str) -> "tuple[str, config.Config, Any, Any, List[int]]":
    """Pin this (the client's) process to the first CPU, write the benchmark's config file and
    register its appkey: (config path, config, client CPU, the CPU left for the provider, all
    CPUs); the CPUs are None on a single-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0))
    client_cpu, server_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    config_path = str(Path(os.environ.get("TMPDIR", "/tmp")) / config_name)
    Path(config_path).write_text(CONFIG_TEXT)
    cfg = config.load(config_path, ENV)
    create_schema(cfg.mysql)
    add_appkey(cfg.mysql, APPKEY, owner="bench")
    return config_path, cfg, client_cpu, server_cpu, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, not for figures)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    quick = args.quick

    config_path, cfg, client_cpu, server_cpu, cpus = prepare("thriftprobe-bench.yml")
    zk = KazooClient(hosts=cfg.zookeeper.hosts)
    zk.start(10)
    for leftover in ("/services/%s" % ENV,):
        if zk.exists(leftover):
            zk.delete(leftover, recursive=True)
    provider = start_provider(config_path, server_cpu)
    results: Dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": len(cpus),
            "placement": ("client process pinned to CPU %s, provider process to CPU %s" % (client_cpu, server_cpu))
            if client_cpu is not None else "one CPU: no pinning",
            "kernel": platform.release(),
        }
    }
    try:
        client = build_client(IDL, APPKEY, "Calculator", config=cfg)
        raw = make_client(demo.Calculator, "127.0.0.1", provider.port, timeout=3000)
        seed = SeedStyleClient(cfg.zookeeper.hosts, ENV, APPKEY, "Calculator", demo.Calculator)

        rounds = 3 if quick else 10
        per = {"raw": 300 if quick else 2000, "thriftprobe": 300 if quick else 2000, "seed": 20 if quick else 60}
        results["call_path_1_thread"] = call_path(
            {"raw": lambda: raw.echo(PAYLOAD), "thriftprobe": lambda: client.echo(PAYLOAD),
             "seed": lambda: seed.echo(PAYLOAD)},
            rounds, per,
        )
        cp = results["call_path_1_thread"]
        results["ratios"] = {
            "p50_thriftprobe_over_raw": cp["thriftprobe"]["p50_ms"] / cp["raw"]["p50_ms"],
            "throughput_thriftprobe_over_raw": cp["thriftprobe"]["calls_per_s"] / cp["raw"]["calls_per_s"],
            "p50_seed_over_thriftprobe": cp["seed"]["p50_ms"] / cp["thriftprobe"]["p50_ms"],
        }

        raws: List[Any] = []

        def raw_for_thread(i: int) -> Callable[[], Any]:
            while len(raws) <= i:
                raws.append(make_client(demo.Calculator, "127.0.0.1", provider.port, timeout=3000))
            return lambda: raws[i].echo(PAYLOAD)

        results["call_path_16_threads"] = threaded(
            {
                "raw (16 clients)": raw_for_thread,
                "thriftprobe (1 shared client)": lambda i: lambda: client.echo(PAYLOAD),
            },
            16, 2 if quick else 6, 100 if quick else 300,
        )
        t16 = results["call_path_16_threads"]
        results["ratios"]["throughput_16_threads_thriftprobe_over_raw"] = (
            t16["thriftprobe (1 shared client)"]["calls_per_s"] / t16["raw (16 clients)"]["calls_per_s"])
        for r in raws:
            r.close()
        raw.close()

        # The same run also measures the discovery lag the client records (znode mtime -> table):
        # its histogram, and the exact observations beside it.
        exact_lag: List[float] = []
        recorder = metrics.default_recorder()
        if recorder is not None:
            lag_child = recorder.child(recorder.discovery_lag, APPKEY, "Calculator")
            client.table.set_lag_observer(lambda seconds: (exact_lag.append(seconds), lag_child.observe(seconds)))
        results["propagation"] = propagation(zk, client, 20 if quick else 100)
        results["discovery_lag"] = discovery_lag(recorder, exact_lag) if recorder is not None else None
        client.close()
        if metrics.available():
            results["metrics_cost"] = metrics_cost(cfg, rounds, 300 if quick else 2000)
        results["scale"] = scale(cfg, zk, 1000)
        results["distribution"] = distribution(100_000)
    finally:
        provider.terminate()
        provider.wait(15)
        zk.stop()
        zk.close()

    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True))


def report(r: Dict[str, Any]) -> None:
    m = r["machine"]
    print("thriftprobe benchmark - Python %s, %d CPUs, %s" % (m["python"], m["cpus"], m["placement"]))
    print("\n1. call path, 1 thread, echo of 32 bytes (interleaved rounds; thriftprobe records metrics, the default)")
    print("   %-14s %10s %9s %9s" % ("client", "calls/s", "p50 ms", "p99 ms"))
    for name, v in r["call_path_1_thread"].items():
        print("   %-14s %10.0f %9.3f %9.3f" % (name, v["calls_per_s"], v["p50_ms"], v["p99_ms"]))
    ratios = r["ratios"]
    print("   p50 thriftprobe/raw %.2f (target <= 1.10); seed/thriftprobe %.0fx"
          % (ratios["p50_thriftprobe_over_raw"], ratios["p50_seed_over_thriftprobe"]))
    print("\n2. call path, 16 threads")
    for name, v in r["call_path_16_threads"].items():
        print("   %-30s %10.0f calls/s" % (name, v["calls_per_s"]))
    print("   thriftprobe/raw %.2f (target >= 0.90)" % ratios["throughput_16_threads_thriftprobe_over_raw"])
    print("\n3. propagation: ZooKeeper change -> running client's table")
    for name, v in r["propagation"].items():
        print("   %-14s p50 %6.2f ms  p99 %6.2f ms  (n=%d)" % (name, v["p50_ms"], v["p99_ms"], v["n"]))
    lag = r.get("discovery_lag")
    if lag:
        print("   discovery lag recorded by the client (znode mtime -> table applied; joins, weight changes and")
        print("   switch-offs above): histogram p50 %.2f ms, p99 %.2f ms (interpolated within buckets);"
              % (lag["histogram_p50_ms"], lag["histogram_p99_ms"]))
        print("   exact p50 %.2f ms, p99 %.2f ms, max %.2f ms (n=%d)"
              % (lag["exact_p50_ms"], lag["exact_p99_ms"], lag["exact_max_ms"], lag["n"]))
    s = r["scale"]
    print("\n4. scale: %d nodes of one service" % s["nodes"])
    print("   client start-up %.0f ms; one pick %.2f us (target <= 5); memory %.0f KiB"
          % (s["startup_ms"], s["pick_us"], s["client_memory_kib"]))
    print("   ZooKeeper reads when one node changes: %d; when one node joins: %s"
          % (s["zk_reads_one_node_changed"], s["zk_reads_one_node_joined"]))
    d = r["distribution"]
    print("\n5. distribution: %d picks over weights 1/10/100: %s; chi-square %.2f, p = %.3f (target > 0.01)"
          % (d["picks"], d["observed"], d["chi2"], d["p_value"]))
    mc = r.get("metrics_cost")
    if mc:
        print("\n6. metrics cost: one call, 1 thread, echo of 32 bytes, metrics on vs off (interleaved rounds)")
        for name in ("metrics on", "metrics off"):
            v = mc[name]
            print("   %-14s %10.0f %9.3f %9.3f" % (name, v["calls_per_s"], v["p50_ms"], v["p99_ms"]))
        print("   p50 on/off %.3f (target <= 1.05)" % mc["p50_on_over_off"])
    else:
        print("\n6. metrics cost: skipped (prometheus_client is not installed)")
    print("\nJSON:")
    print(json.dumps(r, sort_keys=True))


if __name__ == "__main__":
    main()

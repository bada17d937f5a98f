"""What a pick costs, strategy by strategy, among 1,000 nodes; and the two measured properties
of the issue: keys that move when one of N nodes leaves (ConsistentHash) and the share of a 10x
slower node (LeastLoaded).

    .venv/bin/python tests/bench_pick.py [--quick] [--nodes 1000]

Pure in-process (no servers): a pick works on the client's snapshot only. Each figure is the
median of 5 rounds; all strategies run side by side in one run. The goal: under 5 us per pick.
"""

from __future__ import annotations

import argparse
import collections
import gc
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thriftprobe import ConsistentHash, LeastLoaded, RoundRobin, WeightedRandom
from thriftprobe.consumer.table import Snapshot
from thriftprobe.node import Node

STRATEGIES: Dict[str, Callable[[], Any]] = {
    "WeightedRandom": WeightedRandom,
    "RoundRobin": RoundRobin,
    "LeastLoaded": LeastLoaded,
    "ConsistentHash": lambda: ConsistentHash(key=lambda method, args: args["k"]),
}


def node(i: int, **extras: Any) -> Node:
    return Node("10.%d.%d.%d" % (i // 65536, i // 256 % 256, i % 256), 9090, 5 + i % 20, True, extras=extras)


def scenarios(n: int) -> Dict[str, Tuple[Snapshot, frozenset]]:
    now = time.time()
    plain = Snapshot({str(i): node(i) for i in range(n)})
    tiered_nodes = {str(i): node(i, priority=i % 3) for i in range(n)}
    tiered = Snapshot(tiered_nodes)
    # A tenth of the primary tier ejected: the primary keeps ~93%, the next tier takes the rest.
    ejected = frozenset(nd.address for nd in list(tiered_nodes.values())[: n // 3 : 3][: n // 10])
    warming = Snapshot({
        str(i): node(i, warmup=600, start_time=now - (30 if i % 10 == 0 else 6000)) for i in range(n)
    })
    # A rolling restart half done: a tenth of the nodes warm, the rest at half their weight.
    rolling = Snapshot({
        str(i): node(i, warmup=600, start_time=now - (6000 if i % 10 == 0 else 300)) for i in range(n)
    })
    return {
        "one tier": (plain, frozenset()),
        "3 tiers, 10% ejected": (tiered, ejected),
        "10% warming up": (warming, frozenset()),
        "90% warming (rolling)": (rolling, frozenset()),
    }


def time_picks(balancer: Any, snapshot: Snapshot, exclude: frozenset, picks: int, rounds: int) -> Tuple[float, float]:
    """(median us per pick, ms of the first pick, which builds the plan). For LeastLoaded, a
    few calls were reported first so that it compares real latencies."""
    calls = [("get", {"k": "user-%d" % i}) for i in range(picks)]
    began = time.perf_counter()
    balancer.pick(snapshot, exclude, frozenset(), calls[0])
    first = (time.perf_counter() - began) * 1000
    if balancer.tracks_load:
        rng = random.Random(1)
        for node_ in snapshot.available:
            balancer.begin(node_.address)
            balancer.end(node_.address, rng.uniform(0.0005, 0.002), True)
    per: List[float] = []
    pick = balancer.pick
    none: frozenset = frozenset()
    for _ in range(rounds):
        gc.disable()
        began = time.perf_counter()
        for call in calls:
            pick(snapshot, exclude, none, call)
        per.append((time.perf_counter() - began) / picks * 1e6)
        gc.enable()
    return statistics.median(per), first


def time_reports(picks: int, rounds: int) -> float:
    """Median us of LeastLoaded's begin + end around one call (the client's part per call)."""
    balancer = LeastLoaded()
    address = ("10.0.0.1", 9090)
    per = []
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(picks):
            balancer.begin(address)
            balancer.end(address, 0.001, True)
        per.append((time.perf_counter() - began) / picks * 1e6)
    return statistics.median(per)


def moved_keys(nodes: int, keys: int) -> Tuple[float, float, float]:
    """When node 0 of ``nodes`` (weights 5..24) leaves: (share of keys that move, share node 0
    held, share that moved between other nodes)."""
    every = Snapshot({str(i): node(i) for i in range(nodes)})
    fewer = Snapshot({str(i): node(i) for i in range(1, nodes)})
    ring = ConsistentHash(key=lambda method, args: args["k"])
    calls = [("get", {"k": "user-%d" % i}) for i in range(keys)]
    before = [ring.pick(every, call=c) for c in calls]
    after = [ring.pick(fewer, call=c) for c in calls]
    gone = every.available[0]
    moved = sum(b != a for b, a in zip(before, after)) / keys
    held = sum(b == gone for b in before) / keys
    between = sum(b != a and b != gone for b, a in zip(before, after)) / keys
    return moved, held, between


def slow_share(nodes: int, calls: int, in_flight: int) -> float:
    """LeastLoaded's share for one node answering 10x slower, ``in_flight`` calls outstanding."""
    snapshot = Snapshot({str(i): node(i) for i in range(nodes)})
    slow = snapshot.available[0].address
    balancer = LeastLoaded(rng=random.Random(7))
    outstanding: collections.deque = collections.deque()
    counts: collections.Counter = collections.Counter()
    for _ in range(calls):
        if len(outstanding) >= in_flight:
            done = outstanding.popleft()
            balancer.end(done, 0.010 if done == slow else 0.001, True)
        chosen = balancer.pick(snapshot).address
        balancer.begin(chosen)
        outstanding.append(chosen)
        counts[chosen] += 1
    return counts[slow] / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer picks (a smoke run, not for figures)")
    parser.add_argument("--nodes", type=int, default=1000)
    args = parser.parse_args()
    picks, rounds = (2_000, 2) if args.quick else (50_000, 5)
    rows = []
    for label, (snapshot, exclude) in scenarios(args.nodes).items():
        for name, make in STRATEGIES.items():
            per_pick, first = time_picks(make(), snapshot, exclude, picks, rounds)
            rows.append((label, name, per_pick, first))
    print("Pick cost among %d nodes (median of %d rounds of %d picks; goal < 5 us)" % (args.nodes, rounds, picks))
    print("%-22s %-15s %10s %16s %6s" % ("scenario", "strategy", "us/pick", "first pick (ms)", "goal"))
    for label, name, per_pick, first in rows:
        print("%-22s %-15s %10.2f %16.1f %6s" % (label, name, per_pick, first, "met" if per_pick < 5 else "MISSED"))
    print("LeastLoaded's begin + end around each call (not part of the pick): %.2f us" % time_reports(picks, rounds))
    print()
    keys = 2_000 if args.quick else 50_000
    for n in (5, 10, 50):
        moved, held, between = moved_keys(n, keys)
        print("ConsistentHash: one of %d nodes leaves: %.1f%% of %d keys move; it held %.1f%% (1/N = %.1f%%); "
              "%.1f%% moved between the others" % (n, moved * 100, keys, held * 100, 100 / n, between * 100))
    now = time.time()
    start = Snapshot({  # a rolling restart just begun: 100 warm nodes, 900 at 2% of their weight
        str(i): node(i, warmup=600, start_time=now - (6000 if i % 10 == 0 else 5)) for i in range(args.nodes)
    })
    per_pick, _ = time_picks(STRATEGIES["ConsistentHash"](), start, frozenset(), picks, rounds)
    print("ConsistentHash, 90%% of the nodes at 2%% of their weight (a rolling restart's first seconds): "
          "%.2f us per pick (keys walk past the warming nodes that refuse them)" % per_pick)
    calls = 5_000 if args.quick else 50_000
    for in_flight in (1, 8, 32):
        print("LeastLoaded: one of 10 nodes 10x slower, %d call(s) in flight: it takes %.2f%% of %d calls "
              "(uniform: 10%%)" % (in_flight, slow_share(10, calls, in_flight) * 100, calls))


if __name__ == "__main__":
    main()

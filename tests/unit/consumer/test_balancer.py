import random
import time
from collections import Counter

from thriftprobe.consumer.balancer import WeightedRandom
from thriftprobe.consumer.table import NodeTable
from thriftprobe.node import Node

# Upper critical values of the chi-square distribution at p = 0.001.
CHI2_CRIT_P001 = {1: 10.828, 2: 13.816, 3: 16.266}


def chi_square(observed, expected):
    return sum((observed[k] - expected[k]) ** 2 / expected[k] for k in expected)


def table_of(*nodes):
    t = NodeTable()
    for n in nodes:
        t.upsert(n.znode_name("svc"), n)
    return t


def test_picks_follow_weights_within_chi_square_bound():
    t = table_of(Node("a", 1, 1), Node("b", 2, 10), Node("c", 3, 100))
    picker = WeightedRandom(random.Random(1234))
    n = 100_000
    counts = Counter(picker.pick(t.snapshot).host for _ in range(n))
    expected = {"a": n * 1 / 111, "b": n * 10 / 111, "c": n * 100 / 111}
    assert chi_square(counts, expected) < CHI2_CRIT_P001[2]


def test_disabled_and_zero_weight_nodes_are_never_picked():
    t = table_of(Node("on", 1, 5), Node("off", 2, 50, valid=False), Node("zero", 3, 0))
    picker = WeightedRandom(random.Random(7))
    assert {picker.pick(t.snapshot).host for _ in range(2000)} == {"on"}


def test_no_available_node_gives_none():
    picker = WeightedRandom()
    assert picker.pick(table_of().snapshot) is None
    assert picker.pick(table_of(Node("off", 1, 5, valid=False)).snapshot) is None


def test_exclude_skips_tried_nodes_and_keeps_weights():
    t = table_of(Node("a", 1, 1), Node("b", 2, 3), Node("c", 3, 6))
    picker = WeightedRandom(random.Random(99))
    n = 20_000
    counts = Counter(picker.pick(t.snapshot, {("a", 1)}).host for _ in range(n))
    assert "a" not in counts
    assert chi_square(counts, {"b": n * 3 / 9, "c": n * 6 / 9}) < CHI2_CRIT_P001[1]
    assert picker.pick(t.snapshot, {("a", 1), ("b", 2), ("c", 3)}) is None


def test_table_publishes_snapshots_and_reports_removals():
    t = NodeTable()
    removed = []
    t.on_remove(removed.append)
    t.upsert("x", Node("h", 1, 5))
    before = t.snapshot
    t.upsert("x", Node("h", 1, 0))
    assert before.total == 5 and t.snapshot.total == 0 and len(t.snapshot.all_nodes) == 1
    t.remove("x")
    t.remove("x")
    assert removed == [Node("h", 1, 0)]
    assert t.wait_for(lambda s: not s.all_nodes, timeout=0.01)
    assert not t.wait_for(lambda s: bool(s.all_nodes), timeout=0.01)


def test_exclusions_keep_weights_among_many_nodes():
    nodes = [Node("n%d" % i, i, weight=1 + i % 7) for i in range(1, 41)]
    t = table_of(*nodes)
    excluded = {nodes[i].address for i in (0, 1, 5, 17, 18, 19, 39)}
    picker = WeightedRandom(random.Random(5))
    n = 60_000
    counts = Counter(picker.pick(t.snapshot, excluded).port for _ in range(n))
    left = [node for node in nodes if node.address not in excluded]
    assert set(counts) == {node.port for node in left}
    total = sum(node.weight for node in left)
    expected = {node.port: n * node.weight / total for node in left}
    # chi-square with 32 degrees of freedom: 62.49 is its upper critical value at p = 0.001
    assert chi_square(counts, expected) < 62.49


def _cost(pick, rounds: int = 5, n: int = 2000) -> float:
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(n):
            pick()
        best = min(best, time.perf_counter() - began)
    return best / n


def test_a_pick_with_one_of_a_thousand_nodes_excluded_costs_about_a_plain_pick():
    t = table_of(*(Node("10.0.%d.%d" % (i // 250, i % 250), 9000, weight=10) for i in range(1000)))
    snapshot = t.snapshot
    excluded = frozenset({snapshot.available[500].address})
    picker = WeightedRandom()
    plain = _cost(lambda: picker.pick(snapshot))
    degraded = _cost(lambda: picker.pick(snapshot, excluded))
    # It was ~200 times a plain pick (a list of every node per pick); O(log n) stays within a few.
    assert degraded < 15 * plain, (degraded, plain)

"""Pure logic of the resilience parts: retry budget, outlier ejection, empty-list protection."""

import threading

import pytest

from thriftprobe.consumer.health import HealthChecker, OutlierDetector
from thriftprobe.consumer.retry import Retry, RetryBudget
from thriftprobe.consumer.table import NodeTable, Snapshot
from thriftprobe.node import Node


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


A, B, C, D = ("a", 1), ("b", 1), ("c", 1), ("d", 1)


def test_budget_allows_its_burst_then_a_share_of_calls():
    budget = RetryBudget(ratio=0.1, min_per_second=0, window_calls=50)
    assert sum(budget.withdraw() for _ in range(100)) == 5  # the burst: 0.1 * 50
    for _ in range(30):
        budget.deposit()
    assert sum(budget.withdraw() for _ in range(100)) == 3  # 10 % of 30 calls


def test_retry_only_idempotent_methods_within_attempts():
    retry = Retry(idempotent={"get"}, attempts=3)
    assert retry.may_retry("get", 1) and retry.may_retry("get", 2)
    assert not retry.may_retry("get", 3)
    assert not retry.may_retry("put", 1)
    with pytest.raises(TypeError):
        Retry(idempotent="get")


def test_consecutive_failures_eject_for_a_growing_time():
    clock = Clock()
    d = OutlierDetector(consecutive_failures=3, base_ejection=1.0, max_ejection=3.0, max_ejected_share=1.0, clock=clock)
    d.failure(A, 4)
    d.failure(A, 4)
    d.success(A)  # a success resets the count
    d.failure(A, 4)
    d.failure(A, 4)
    assert d.excluded() == frozenset()
    d.failure(A, 4)
    assert d.excluded() == {A}
    clock.now += 1.01
    assert d.excluded() == {A}  # still avoided by calls until its probe answers...
    assert d.claim_probe(lambda a: True) == A  # ...and one call probes it
    d.failure(A, 4)  # the probe failed: ejected again, for twice as long
    assert d.excluded() == {A}
    clock.now += 1.5
    assert d.excluded() == {A} and d.claim_probe(lambda a: True) is None
    clock.now += 0.6
    assert d.claim_probe(lambda a: True) == A
    d.success(A)  # the probe succeeded: record cleared, back to three failures needed
    assert d.excluded() == frozenset()
    d.failure(A, 4)
    assert d.excluded() == frozenset()


def test_ejection_never_exceeds_the_share():
    d = OutlierDetector(consecutive_failures=1, max_ejected_share=0.5, clock=Clock())
    for node in (A, B, C, D):
        d.failure(node, 4)
    assert d.excluded() == {A, B}


def test_active_probe_recovers_and_forget_drops():
    d = OutlierDetector(consecutive_failures=1, max_ejected_share=1.0, clock=Clock())
    d.failure(A, 2)
    d.failure(B, 2)
    d.recovered(A)
    d.forget(B)
    assert d.excluded() == frozenset()


def test_removal_of_the_last_node_is_held_for_the_grace_period():
    t = NodeTable(empty_grace=0.2)
    removed = []
    gone = threading.Event()
    t.on_remove(lambda n: (removed.append(n.port), gone.set()))
    t.upsert("x_h_1", Node("h", 1))
    t.upsert("x_h_2", Node("h", 2))
    t.remove("x_h_1")
    assert removed == [1]  # not the last one: removed at once
    t.remove("x_h_2")
    assert [n.port for n in t.snapshot.all_nodes] == [2] and removed == [1]  # held
    assert gone.wait(0)  # (the event was set by the first removal)
    gone.clear()
    assert gone.wait(5)
    assert removed == [1, 2] and t.snapshot.all_nodes == ()
    t.close()


def test_a_held_node_that_comes_back_stays():
    t = NodeTable(empty_grace=0.2)
    removed = []
    t.on_remove(lambda n: removed.append(n.port))
    t.upsert("x_h_1", Node("h", 1))
    t.remove("x_h_1")
    t.upsert("x_h_1", Node("h", 1, weight=5))
    assert not t.wait_for(lambda s: not s.all_nodes, timeout=0.5)
    assert removed == [] and t.snapshot.all_nodes[0].weight == 5
    t.close()


def test_without_grace_removal_is_immediate():
    t = NodeTable()
    t.upsert("x_h_1", Node("h", 1))
    t.remove("x_h_1")
    assert t.snapshot.all_nodes == ()


def test_a_registry_listing_none_of_many_nodes_keeps_them_all():
    t = NodeTable(empty_grace=5.0)
    for port in range(1, 6):
        t.upsert("x_h_%d" % port, Node("h", port))
    t.remove_many(["x_h_%d" % port for port in range(1, 6)])
    assert sorted(n.port for n in t.snapshot.all_nodes) == [1, 2, 3, 4, 5]
    t.close()


def test_tcp_probe_does_not_restore_a_node_that_failed_after_sending():
    d = OutlierDetector(consecutive_failures=1, max_ejected_share=1.0, clock=Clock())
    d.failure(A, 2, after_send=True)
    d.recovered(A)
    assert d.excluded() == {A}


def test_a_node_ejected_for_hours_keeps_being_ejected_for_at_most_max_ejection():
    # ~1,024 ejections in a row (a node that stays registered but fails for ~8.5 h) overflowed
    # base * 2 ** ejections: every call picking it, and the health check, raised OverflowError.
    clock = Clock()
    d = OutlierDetector(consecutive_failures=1, max_ejection=30.0, max_ejected_share=1.0, clock=clock)
    for _ in range(1100):
        d.failure(A, 2)
        assert d.excluded() == {A}
        clock.now += 30.0
        assert d.excluded() == {A} and d.claim_probe(lambda a: True) == A
    d.failure(A, 2)
    clock.now += 29.9
    assert d.claim_probe(lambda a: True) is None  # ejected for max_ejection, not less, not more
    clock.now += 0.2
    assert d.excluded() == {A} and d.claim_probe(lambda a: True) == A


def test_health_check_thread_survives_a_round_that_raises():
    rounds = []
    ran_after_error = threading.Event()

    def snapshot():
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("boom")
        ran_after_error.set()
        return Snapshot({})

    checker = HealthChecker(snapshot, OutlierDetector(), "t", interval=0.01).start()
    try:
        assert ran_after_error.wait(5), "no health check round ran after the one that raised"
        assert checker._thread.is_alive()
    finally:
        checker.close()


def test_only_one_call_probes_a_node_whose_ejection_ended():
    clock = Clock()
    d = OutlierDetector(consecutive_failures=1, base_ejection=1.0, max_ejected_share=1.0, clock=clock)
    d.failure(A, 2)
    clock.now += 1.5
    claims = []
    barrier = threading.Barrier(8)

    def caller():
        barrier.wait()
        if A not in d.excluded():
            claims.append("picked freely")
        claims.append(d.claim_probe(lambda a: True))

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(map(str, claims)) == sorted(map(str, [A] + [None] * 7))
    d.probe_abandoned(A)  # the probing call sent nothing (its caller's own error)
    assert d.claim_probe(lambda a: a != A) is None  # a call that may not use it leaves it
    assert d.claim_probe(lambda a: True) == A
    d.success(A)
    assert d.excluded() == frozenset() and d.claim_probe(lambda a: True) is None


def test_ejection_cap_counts_only_nodes_that_can_take_calls():
    d = OutlierDetector(consecutive_failures=1, max_ejected_share=0.5, clock=Clock())
    d.failure(A, 4, eligible={A, B, C, D})
    d.failure(B, 4, eligible={A, B, C, D})
    assert d.excluded() == {A, B}
    # A and B were switched off since; of the three nodes left that can take calls, one may go.
    d.failure(C, 3, eligible={C, D, ("e", 1)})
    assert C in d.excluded()


def test_health_check_probes_only_nodes_that_can_take_calls():
    t = NodeTable()
    t.upsert("s_a_1", Node("a", 1))
    t.upsert("s_off_2", Node("off", 2, valid=False))
    t.upsert("s_zero_3", Node("zero", 3, weight=0))
    probed = []
    checker = HealthChecker(lambda: t.snapshot, OutlierDetector(consecutive_failures=1, max_ejected_share=1.0), "t")
    checker._probe = lambda address: probed.append(address) or False
    checker.check_once()
    assert probed == [("a", 1)]
    assert checker._detector.excluded() == {("a", 1)}

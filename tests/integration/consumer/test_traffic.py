"""Traffic control with real providers: selection by version, group and tags; blue/green by
weights; priority tiers; each balancing strategy; warm-up.

Every provider's handler answers ``ping`` with its tag, so a test counts where calls went.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from typing import Any, Callable, Dict

import pytest
from conftest import IDL, Handler, free_port, wait_until

from thriftprobe import ConsistentHash, LeastLoaded, RoundRobin, WeightedRandom, build_client
from thriftprobe.consumer.tiers import warmup_factor
from thriftprobe.node import service_path

STRATEGIES: Dict[str, Callable[[], Any]] = {
    "WeightedRandom": WeightedRandom,
    "RoundRobin": RoundRobin,
    "LeastLoaded": LeastLoaded,
    "ConsistentHash": lambda: ConsistentHash(key=lambda method, args: args.get("text")),
}


def _client(cfg, appkey, **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("config", cfg)
    return build_client(IDL, appkey, "Calculator", **kwargs)


def _tally(client, calls: int) -> collections.Counter:  # type: ignore[no-untyped-def]
    return collections.Counter(client.ping() for _ in range(calls))


def _wait_nodes(client, n: int) -> None:  # type: ignore[no-untyped-def]
    wait_until(lambda: len(client.table.snapshot.available) == n, what="%d selectable nodes" % n)


def test_version_group_and_tags_choose_the_nodes_a_client_calls(providers, cfg, appkey, run):
    providers("v1-eu", version="1.2.0", tags={"zone": "eu"})
    providers("v2-us", version="2.0.1", tags={"zone": "us"})
    providers("canary", version="2.0.1", group="canary")
    providers("old")  # no version, group or tags: as an older provider registers
    expected = [
        ({}, {"v1-eu", "v2-us", "old"}),  # the default: any version, ungrouped nodes only
        ({"version": "2.*"}, {"v2-us"}),
        ({"version": ">=1.0,<2"}, {"v1-eu"}),
        ({"version": "1.2.0"}, {"v1-eu"}),
        ({"tags": {"zone": "eu"}}, {"v1-eu"}),
        ({"tags": {"zone": "*"}}, {"v1-eu", "v2-us"}),
        ({"group": "canary"}, {"canary"}),
        ({"group": "*"}, {"v1-eu", "v2-us", "canary", "old"}),
        ({"group": "*", "version": "2.0.1"}, {"v2-us", "canary"}),
    ]
    for selection, tags in expected:
        with _client(cfg, appkey, balancer=RoundRobin(), **selection) as client:
            _wait_nodes(client, len(tags))
            assert set(_tally(client, 8 * len(tags))) == tags, selection
            states = {r.name.split("_")[-1]: r.state for r in client.explain().nodes}
            assert sum(state == "unmatched" for state in states.values()) == 4 - len(tags)
    listed = run("ls", appkey)  # operators see what each node declares
    assert "version 1.2.0 zone=eu" in listed and "version 2.0.1 group canary" in listed, listed
    called = run("call", IDL, appkey, "Calculator", "ping", "--group", "canary", "--version", "2.*", "--compact")
    assert json.loads(called) == {"result": "canary"}
    called = run("call", IDL, appkey, "Calculator", "ping", "--tag", "zone=eu", "--compact")
    assert json.loads(called) == {"result": "v1-eu"}


def test_blue_green_moves_traffic_between_two_groups_by_weight(providers, cfg, appkey, gov):
    blue = providers("blue", group="blue")
    green = providers("green", group="green")
    with _client(cfg, appkey, group=("blue", "green"), balancer=RoundRobin()) as client:
        _wait_nodes(client, 2)
        assert _tally(client, 40) == {"blue": 20, "green": 20}
        gov.set_node(appkey, "Calculator", "127.0.0.1", green.port, weight=0)  # all to blue
        wait_until(lambda: set(_tally(client, 10)) == {"blue"}, what="blue only")
        gov.set_node(appkey, "Calculator", "127.0.0.1", green.port, weight=10)
        gov.set_node(appkey, "Calculator", "127.0.0.1", blue.port, weight=0)  # the switch to green
        wait_until(lambda: set(_tally(client, 10)) == {"green"}, what="green only")
        gov.set_node(appkey, "Calculator", "127.0.0.1", blue.port, weight=30)  # a 3:1 canary of blue
        wait_until(lambda: _tally(client, 40) == {"blue": 30, "green": 10}, what="3:1")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_priority_tiers_spill_in_proportion_and_traffic_returns(providers, cfg, appkey, gov, strategy):
    """Three primary nodes and two fallbacks. With 2 of 3 primaries switched off, the primary's
    health is 1.4 x 1/3 = 46.7%: the fallbacks take 53.3% of the calls (within 6 points over
    1,500 calls); when the operator switches them on again, everything returns to the primary."""
    primary = [providers("p%d" % i) for i in range(3)]
    for i in range(2):
        providers("f%d" % i, priority=1)
    with _client(cfg, appkey, balancer=STRATEGIES[strategy]()) as client:
        _wait_nodes(client, 5)
        assert not _to_fallback(client, 300)
        for svc in primary[:2]:
            gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, valid=False)
        _wait_nodes(client, 3)
        to_fallback = _to_fallback(client, 1500) / 1500
        assert abs(to_fallback - (1 - 1.4 / 3)) < 0.06, to_fallback
        for svc in primary[:2]:
            gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, valid=True)
        _wait_nodes(client, 5)
        assert not _to_fallback(client, 300)


def _to_fallback(client, calls: int) -> int:  # type: ignore[no-untyped-def]
    """How many of ``calls`` pings went to a fallback node (tag ``f...``). (ping has no
    arguments: ConsistentHash's key is None, so it picks at random, tiers first.)"""
    return sum(n for tag, n in _tally(client, calls).items() if tag.startswith("f"))


def test_round_robin_takes_turns_exactly(providers, cfg, appkey, gov):
    a = providers("a")
    providers("b")
    gov.set_node(appkey, "Calculator", "127.0.0.1", a.port, weight=30)
    with _client(cfg, appkey, balancer=RoundRobin()) as client:
        wait_until(lambda: sorted(n.weight for n in client.table.snapshot.available) == [10, 30], what="weights")
        assert _tally(client, 400) == {"a": 300, "b": 100}


class _Slow(Handler):
    def __init__(self, tag: str, delay: float) -> None:
        super().__init__(tag)
        self.delay = delay

    def echo(self, text: str) -> str:
        time.sleep(self.delay)
        return super().echo(text) and self.tag


def test_least_loaded_sends_a_10x_slower_node_a_small_share(cfg, appkey):
    """Three providers, one answering echo in 20 ms and two in 2 ms, 8 threads calling for 3 s:
    the slow one takes under 8% of the calls (a weighted random pick would give it 33%)."""
    from thriftprobe import start_service

    started = [
        start_service(IDL, appkey, "Calculator", _Slow(tag, delay), 0, config=cfg, bind_host="127.0.0.1",
                      block=False, drain=0)
        for tag, delay in (("slow", 0.02), ("fast1", 0.002), ("fast2", 0.002))
    ]
    try:
        with _client(cfg, appkey, balancer=LeastLoaded()) as client:
            _wait_nodes(client, 3)
            counts: collections.Counter = collections.Counter()
            lock = threading.Lock()
            until = time.monotonic() + 3.0

            def caller() -> None:
                mine: collections.Counter = collections.Counter()
                while time.monotonic() < until:
                    mine[client.echo("x")] += 1
                with lock:
                    counts.update(mine)

            threads = [threading.Thread(target=caller) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            total = sum(counts.values())
            print("LeastLoaded, one node 10x slower: %d calls, shares %s" % (
                total, {tag: "%.1f%%" % (100 * n / total) for tag, n in sorted(counts.items())}))
            assert counts["slow"] / total < 0.08, counts
    finally:
        for svc in started:
            svc.stop(timeout=2.0, drain=0)


def test_consistent_hash_keeps_keys_on_their_node_and_moves_only_the_leavers(providers, cfg, appkey):
    """Four nodes, 400 keys: a key always answers from the same node; stopping one node moves
    only its keys (about a quarter), and every other key stays where it was."""
    nodes = {tag: providers(tag) for tag in ("n1", "n2", "n3", "n4")}
    with _client(cfg, appkey, balancer=ConsistentHash(key=lambda method, args: args["operation"].left)) as client:
        _wait_nodes(client, 4)
        import demo_thrift

        def where(key: int) -> str:
            return client.compute(demo_thrift.Operation(left=key, right=0)).served_by

        before = {key: where(key) for key in range(400)}
        assert all(where(key) == before[key] for key in range(0, 400, 7))
        assert set(before.values()) == set(nodes)
        nodes["n3"].stop(timeout=2.0, drain=0)
        _wait_nodes(client, 3)
        after = {key: where(key) for key in range(400)}
        moved = [key for key in before if before[key] != after[key]]
        assert moved and all(before[key] == "n3" for key in moved)
        print("ConsistentHash: one node of 4 left; %d of 400 keys moved (%.1f%%)" % (len(moved), len(moved) / 4))
        assert len(moved) / 400 < 0.25 + 0.12


def test_a_new_node_warms_up_without_znode_writes(providers, cfg, appkey, zk):
    """A warm node (warmup 0) and a new one with a 4 s warm-up: the new one gets a small share
    at first (its weight starts at 2% and ramps; the bound is computed from how far it has
    ramped when the window ends), then its full half; its znode is not written meanwhile."""
    providers("warm", warmup=0)
    with _client(cfg, appkey, balancer=WeightedRandom()) as client:
        _wait_nodes(client, 1)
        new = providers("new", warmup=4)
        _wait_nodes(client, 2)
        path = "%s/Calculator_127.0.0.1_%d" % (service_path(cfg.env, appkey), new.port)
        version = zk.get(path)[1].version
        early = _tally(client, 300)
        # Its share can be at most what its ramp allows by now: f*10 / (10 + f*10), f the
        # share of its weight at the end of the window (the ramp moves in steps of 2%).
        factor, _ = warmup_factor(new.node, time.time() + 0.1)
        bound = factor / (1 + factor)
        assert factor < 0.75, "the early window took too long to say anything (factor %.2f)" % factor
        assert early["new"] / 300 < bound + 0.1, (early, factor)
        wait_until(lambda: abs(_tally(client, 400)["new"] / 400 - 0.5) < 0.1, timeout=12, what="the full share")
        assert zk.get(path)[1].version == version


def test_least_loaded_keeps_away_from_a_node_that_sheds_every_call(providers, cfg, appkey):
    """Three providers, one over a request limit that sheds nearly every call ("not executed"
    replies come back fastest of all): LeastLoaded sends it few first attempts, and with the
    default retry budget almost no call ends in Overloaded (the review saw 249 of 600)."""
    from thriftprobe import Overloaded
    from thriftprobe.limits import MethodLimit, ServiceLimits

    providers("a")
    providers("b")
    shedder = providers("shedder")
    shedder.set_limits(ServiceLimits({"*": MethodLimit(qps=0.001, burst=1)}, rev=1))
    with _client(cfg, appkey, balancer=LeastLoaded()) as client:
        _wait_nodes(client, 3)
        overloaded = 0
        answered: collections.Counter = collections.Counter()
        for _ in range(600):
            try:
                answered[client.ping()] += 1
            except Overloaded:
                overloaded += 1
        assert overloaded <= 6 and answered["shedder"] <= 1, (overloaded, answered)


def test_one_balancer_cannot_serve_two_open_clients(providers, cfg, appkey):
    from thriftprobe import InvalidArgument

    providers("a")
    shared = RoundRobin()
    with _client(cfg, appkey, balancer=shared) as first:
        _wait_nodes(first, 1)
        with pytest.raises(InvalidArgument, match="give each client its own balancer"):
            _client(cfg, appkey, balancer=shared)
    with _client(cfg, appkey, balancer=shared) as second:  # free again once the first closed
        assert second.ping() == "a"


def test_a_forked_child_closes_its_client_although_a_parent_thread_held_the_balancers_locks(providers, cfg, appkey):
    """A pre-fork server's child that never calls and closes at shutdown: a parent thread was
    inside the balancer (building a plan) at fork() time; close() must not wait for it."""
    import os
    import signal

    providers("a")
    client = _client(cfg, appkey, balancer=ConsistentHash(key=lambda method, args: None))
    try:
        _wait_nodes(client, 1)
        from thriftprobe.consumer.client import _CORE

        balancer = client.__dict__[_CORE]._balancer
        held = [balancer._build_lock, balancer._claim_lock]
        for lock in held:
            lock.acquire()
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)
            client.close()
            os._exit(0)
        for lock in held:
            lock.release()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        client.close()


def test_a_failed_build_leaves_the_balancer_free(cfg, appkey):
    """build_client fails (ZooKeeper unreachable) and the caller keeps the exception: the same
    balancer must still be usable by the next build_client (which fails for the same reason,
    not with "already serves another client")."""
    import dataclasses

    from thriftprobe import BackendError

    dead = dataclasses.replace(cfg, zookeeper=dataclasses.replace(
        cfg.zookeeper, hosts="127.0.0.1:%d" % free_port(), connect_timeout=0.5))
    balancer = RoundRobin()
    kept = []
    for _ in range(2):
        with pytest.raises(BackendError) as err:
            build_client(IDL, appkey, "Calculator", config=dead, balancer=balancer)
        kept.append(err.value)  # its traceback holds build_client's frame

"""A consumer's view of the registry (ServiceWatch into a NodeTable), its node cache, and what
closing or forking a client leaves behind: against the real ZooKeeper."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import weakref
from typing import Any, List, Optional

import pytest
from conftest import IDL, TEST_ENV, free_port, wait_until
from kazoo.exceptions import NoNodeError

from thriftprobe import build_client, config
from thriftprobe.consumer.cache import TableCache
from thriftprobe.consumer.table import NodeTable
from thriftprobe.node import Node, service_path
from thriftprobe.registry import open_registry
from thriftprobe.registry.zookeeper import ServiceWatch


def watcher_count(kz: Any) -> int:
    """The watchers kazoo keeps for one session (it calls each once, when its znode changes)."""
    return sum(len(s) for s in list(kz._child_watchers.values())) + sum(
        len(s) for s in list(kz._data_watchers.values())
    )


def drain(kz: Any) -> None:
    """Wait until what kazoo's two worker threads were given so far has run."""
    for queue in (kz.handler.callback_queue, kz.handler.completion_queue):
        done = threading.Event()
        queue.put(done.set)
        assert done.wait(5), "kazoo's worker thread is stuck"


# -- B3: the appkey's folder deleted while empty -----------------------------------------------


def test_deleting_the_empty_appkey_folder_does_not_stop_discovery(cfg, appkey, zk, providers):
    folder = service_path(TEST_ENV, appkey)
    with build_client(IDL, appkey, "Calculator", config=cfg) as c:
        assert c.table.snapshot.all_nodes == ()
        kz = c._registry.client
        zk.delete(folder)  # an operator's clean-up of an empty appkey
        wait_until(lambda: not kz._child_watchers.get(folder), 5, "the consumer to see the deletion")
        drain(kz)  # ... and to have acted on it
        providers("late")  # re-creates the folder and registers in it
        assert c.table.wait_for(lambda s: len(s.all_nodes) == 1, 5), "a provider registering later is never seen"
        assert c.ping() == "late"


def test_a_watch_on_a_folder_that_does_not_exist_yet_sees_its_first_node(cfg, appkey, zk):
    folder = service_path(TEST_ENV, appkey)
    with open_registry(cfg) as reg:
        table = NodeTable()
        watch = reg.watch(TEST_ENV, appkey, "Calculator", table)
        try:
            zk.delete(folder)  # (watch() may have created it)
            drain(reg.client)
            node = Node("127.0.0.1", free_port())
            zk.create(folder + "/" + node.znode_name("Calculator"), node.to_json(), ephemeral=True, makepath=True)
            assert table.wait_for(lambda s: [n.port for n in s.all_nodes] == [node.port], 5)
        finally:
            watch.close()


# -- B4: closed clients leave nothing on the shared session ------------------------------------


def test_fifty_closed_clients_leave_no_watcher_and_are_collected(providers, cfg, appkey):
    for tag in "abc":
        providers(tag)
    with open_registry(cfg) as reg:  # keeps the process's session up across the cycles
        kz = reg.client
        before = (watcher_count(kz), len(kz.state_listeners))
        refs: List[weakref.ref] = []
        for _ in range(50):
            client = build_client(IDL, appkey, "Calculator", config=cfg)
            assert len(client.table.snapshot.all_nodes) == 3
            assert client.ping() in ("a", "b", "c")
            client.close()
            refs.append(weakref.ref(client))
            del client
        wait_until(
            lambda: (watcher_count(kz), len(kz.state_listeners)) == before,
            5,
            "the session's watchers and listeners %s to come back to %s"
            % ((watcher_count(kz), len(kz.state_listeners)), before),
        )
        kz.exists("/")  # kazoo's connection thread holds the last request it answered until the next one
        drain(kz)  # and its workers the callbacks of the last replies until they ran
        gc.collect()
        alive = sum(1 for r in refs if r() is not None)
        assert alive == 0, "%d closed clients are still reachable" % alive


# -- B10: a late "no node" reply for a node deleted and re-created under the same name ----------


class _HeldReply:
    """An async result whose callbacks run only when the test releases it."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.delivered = threading.Event()
        self._callbacks: List[Any] = []
        self._released = False

    def rawlink(self, callback: Any) -> None:
        self._callbacks.append(callback)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self.result.get(*args, **kwargs)

    def release(self) -> None:
        for callback in self._callbacks:

            def deliver(result: Any, callback: Any = callback) -> None:
                try:
                    callback(result)
                finally:
                    self.delivered.set()

            self.result.rawlink(deliver)


class OrderingClient:
    """The real session, except that the test can hold back the reply to the next read of one
    znode, and hold the next children read of the folder until it says go."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.hold_get_of: Optional[str] = None
        self.held: List[_HeldReply] = []
        self.children_gate: Optional[threading.Event] = None
        self.children_waiting = threading.Event()
        self.children_applied = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def get_async(self, path: str, watch: Any = None) -> Any:
        result = self._real.get_async(path, watch=watch)
        if path == self.hold_get_of:
            self.hold_get_of = None
            held = _HeldReply(result)
            self.held.append(held)
            return held
        return result

    def _gate(self) -> bool:
        gate, self.children_gate = self.children_gate, None
        if gate is None:
            return False
        self.children_waiting.set()
        assert gate.wait(10)
        return True

    def get_children(self, path: str, watch: Any = None, include_data: bool = False) -> Any:
        gated = self._gate()
        children = self._real.get_children(path, watch=watch, include_data=include_data)
        if gated:  # the caller applies the list on this thread, before what is queued now
            self._real.handler.dispatch_callback(_Marker(self.children_applied.set))
        return children

    def get_children_async(self, path: str, watch: Any = None, include_data: bool = False) -> Any:
        gated = self._gate()
        result = self._real.get_children_async(path, watch=watch, include_data=include_data)
        return _Tracked(result, self.children_applied) if gated else result


class _Marker:
    type = "watch"

    def __init__(self, func: Any) -> None:
        self.func, self.args = func, ()


class _Tracked:
    def __init__(self, result: Any, applied: threading.Event) -> None:
        self._result, self._applied = result, applied

    def __getattr__(self, name: str) -> Any:
        return getattr(self._result, name)

    def rawlink(self, callback: Any) -> None:
        def run(result: Any) -> None:
            try:
                callback(result)
            finally:
                self._applied.set()

        self._result.rawlink(run)


def test_a_late_no_node_reply_never_removes_a_node_the_children_list_has(cfg, appkey, zk):
    folder = service_path(TEST_ENV, appkey)
    node = Node("127.0.0.1", free_port())
    name = node.znode_name("Calculator")
    path = folder + "/" + name
    zk.create(path, node.to_json(), ephemeral=True, makepath=True)
    with open_registry(cfg) as reg:
        proxy = OrderingClient(reg.client)
        table = NodeTable()
        watch = ServiceWatch(proxy, cfg.zookeeper, TEST_ENV, appkey, "Calculator", table)
        try:
            assert list(table.named()) == [name]
            # A provider restarted on the same port replaces its stale znode: delete, then create.
            proxy.hold_get_of = path
            proxy.children_gate = gate = threading.Event()
            zk.delete(path)
            wait_until(lambda: proxy.held and proxy.held[0].result.ready(), 5, "the read after the deletion")
            assert isinstance(proxy.held[0].result.exception, NoNodeError)
            assert proxy.children_waiting.wait(5)  # the children read the deletion triggered
            zk.create(path, node.with_settings(77, True, 1).to_json(), ephemeral=True)
            gate.set()  # the children list now has the name again...
            assert proxy.children_applied.wait(5)
            proxy.held[0].release()  # ... and only then the "no node" reply lands
            assert proxy.held[0].delivered.wait(5)
            drain(reg.client)
            assert table.wait_for(lambda s: [n.weight for n in s.all_nodes] == [77], 5), (
                "the live node is missing from the table: %s" % table.named()
            )
            assert watch.names() == {name}
            zk.set(path, node.with_settings(33, True, 2).to_json())  # and it is still watched
            assert table.wait_for(lambda s: [n.weight for n in s.all_nodes] == [33], 5)
        finally:
            watch.close()


def test_delete_and_recreate_churn_leaves_every_listed_node_in_the_table(cfg, appkey, zk):
    """The race of the previous test, left to chance: bounded churn, then the table must match."""
    folder = service_path(TEST_ENV, appkey)
    nodes = [Node("127.0.0.1", free_port()) for _ in range(4)]
    paths = [folder + "/" + n.znode_name("Calculator") for n in nodes]
    for node, path in zip(nodes, paths):
        zk.create(path, node.to_json(), ephemeral=True, makepath=True)
    with open_registry(cfg) as reg:
        table = NodeTable()
        watch = reg.watch(TEST_ENV, appkey, "Calculator", table)
        try:
            deadline = time.monotonic() + 4.0
            rounds = 0
            while time.monotonic() < deadline:
                rounds += 1
                pending = [zk.delete_async(p) for p in paths]
                for p in pending:
                    p.get()
                pending = [
                    zk.create_async(p, n.with_settings(1 + rounds % 100, True, rounds).to_json(), ephemeral=True)
                    for n, p in zip(nodes, paths)
                ]
                for p in pending:
                    p.get()
            final = {n.znode_name("Calculator"): 1 + rounds % 100 for n in nodes}
            wait_until(
                lambda: {k: v.weight for k, v in table.named().items()} == final,
                5,
                "every listed node in the table with its current data after %d rounds (table: %s)"
                % (rounds, {k: v.weight for k, v in table.named().items()}),
            )
        finally:
            watch.close()


# -- B5: the cache's age is the time since ZooKeeper last confirmed it --------------------------


def test_the_cache_of_a_quiet_fleet_stays_usable_while_zookeeper_confirms_it(providers, cfg, appkey, tmp_path):
    providers("a")
    cache = tmp_path / "calc.nodes.json"
    unreachable = config.Config(
        cfg.path, cfg.env, cfg.mysql, cfg.redis,
        config.ZooKeeperConfig("127.0.0.1:%d" % free_port(), session_timeout=2.0, connect_timeout=0.5),
    )
    with build_client(IDL, appkey, "Calculator", config=cfg, cache_file=cache, cache_max_age=2.0) as c:
        assert c.ping() == "a"
        began = time.monotonic()
        # The scenario is time passing: nothing changes in the fleet for longer than cache_max_age,
        # while this consumer's session to ZooKeeper stays up.
        time.sleep(3.0)
        assert time.monotonic() - began >= 3.0
        # Now ZooKeeper is unreachable for a consumer starting: the cache was confirmed moments ago.
        with build_client(IDL, appkey, "Calculator", config=unreachable, cache_file=cache,
                          cache_max_age=2.0) as late:
            assert late._registry is None
            assert late.ping() == "a"


# -- B12: the cache file is written off kazoo's thread, coalesced -------------------------------


def test_a_thousand_re_registrations_never_wait_for_the_cache_file(cfg, appkey, zk, tmp_path, monkeypatch):
    folder = service_path(TEST_ENV, appkey)
    zk.ensure_path(folder)
    nodes = [Node("127.0.0.1", 20000 + i) for i in range(1000)]
    paths = [folder + "/" + n.znode_name("Calculator") for n in nodes]
    for p in [zk.create_async(p, n.to_json(), ephemeral=True) for n, p in zip(nodes, paths)]:
        p.get()
    writers: List[str] = []
    save = TableCache.save

    def counting_save(self: TableCache, *args: Any, **kwargs: Any) -> None:
        writers.append(threading.current_thread().name)
        save(self, *args, **kwargs)

    monkeypatch.setattr(TableCache, "save", counting_save)
    cache = tmp_path / "calc.nodes.json"
    with build_client(IDL, appkey, "Calculator", config=cfg, cache_file=cache) as c:
        assert len(c.table.snapshot.all_nodes) == 1000
        writers.clear()
        began = time.monotonic()
        for p in [zk.set_async(p, n.with_settings(20, True, 1).to_json()) for n, p in zip(nodes, paths)]:
            p.get()
        assert c.table.wait_for(lambda s: {n.weight for n in s.all_nodes} == {20}, 30)
        took = time.monotonic() - began
        wait_until(
            lambda: {v["weight"] for v in json.loads(cache.read_text())["nodes"].values()} == {20},
            10,
            "the cache file to hold the last state",
        )
    print("1,000 re-registrations applied in %.2f s, %d cache writes" % (took, len(writers)))
    on_kazoo = [name for name in writers if not name.startswith("thriftprobe-cache-")]
    assert on_kazoo == [], "%d cache writes on kazoo's (or another) thread" % len(on_kazoo)
    assert len(writers) <= 100, "%d cache writes for 1,000 changes: not coalesced" % len(writers)


# -- B9: close() in a forked child never blocks --------------------------------------------------


def test_close_in_a_child_forked_while_a_watch_callback_held_the_table_lock_returns(providers, cfg, appkey, zk):
    svc = providers("a")
    with build_client(IDL, appkey, "Calculator", config=cfg) as c:
        assert c.ping() == "a"
        inside, leave = threading.Event(), threading.Event()
        parent = os.getpid()

        def slow_listener(nodes: Any) -> None:  # runs on kazoo's thread, under the table's lock
            if os.getpid() != parent:
                return  # (a child's own table carries this listener over)
            inside.set()
            leave.wait(10)

        c.table.on_change(slow_listener)
        data, _ = zk.get(svc.znode_path)
        zk.set(svc.znode_path, Node.from_json(data).with_settings(5, True, 100).to_json())
        try:
            assert inside.wait(5)
            children = []
            for use_first in (False, True):
                pid = os.fork()
                if pid == 0:  # child: close (after a call, or not), then leave without pytest's teardown
                    code = 1
                    try:
                        if use_first:
                            c.ping()
                        c.close()
                        code = 0
                    finally:
                        os._exit(code)
                children.append(pid)
            for pid in children:
                deadline = time.monotonic() + 10
                status: Optional[int] = None
                while status is None and time.monotonic() < deadline:
                    done, raw = os.waitpid(pid, os.WNOHANG)
                    status = os.waitstatus_to_exitcode(raw) if done else None
                    if status is None:
                        time.sleep(0.02)
                if status is None:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("close() in the forked child hung")
                assert status == 0
        finally:
            leave.set()

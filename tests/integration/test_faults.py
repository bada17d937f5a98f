"""Fault injection against real servers, each under a steady call load, counting failed calls and
checking that no file descriptor or thread is leaked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from typing import Dict, Iterator, List

import pytest
from conftest import IDL, MYSQL_PORT, REDIS_PORT, TEST_ENV, ZK, free_port, spawn_provider, wait_until
from kazoo.client import KazooClient
from thriftpy2.transport import TTransportException
from zk_ensemble import zk_ensemble  # noqa: F401 - the fixture "ensemble"

from thriftprobe import BackendError, NoAvailableNode, build_client, config
from thriftprobe.consumer.balancer import WeightedRandom
from thriftprobe.consumer.health import OutlierDetector
from thriftprobe.consumer.retry import Retry
from thriftprobe.node import Node


class Load:
    """Threads calling ``ping`` back to back (paced at ~1 ms), counting outcomes per provider tag."""

    def __init__(self, client, threads: int = 2) -> None:
        self.client = client
        self.tags: Counter = Counter()
        self.failures: List[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                tag = self.client.ping()
                with self._lock:
                    self.tags[tag] += 1
            except Exception as err:  # counted: the tests assert there are none
                with self._lock:
                    self.failures.append(err)
            self._stop.wait(0.001)

    @property
    def calls(self) -> int:
        return sum(self.tags.values()) + len(self.failures)

    def more(self, n: int = 200, timeout: float = 20.0) -> None:
        """Wait until ``n`` more calls completed (the load is really flowing)."""
        target = self.calls + n
        wait_until(lambda: self.calls >= target, timeout, "%d more calls" % n)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        self.more(50)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fd_targets() -> Dict[str, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found[fd] = os.readlink("/proc/self/fd/%s" % fd)
    return found


def _threads() -> int:
    """Threads of this process, but the workers of running providers (they live as long as the
    provider, and the calls of a test start them)."""
    return sum(not t.name.startswith("thriftprobe-worker-") for t in threading.enumerate())


@contextmanager
def no_leaks() -> Iterator[None]:
    threads, fds, before = _threads(), _fds(), _fd_targets()
    yield
    wait_until(lambda: _threads() <= threads, 10, "threads to end (%s)" % threading.enumerate())
    try:
        wait_until(lambda: _fds() <= fds, 10, "file descriptors to close")
    except AssertionError:
        new = {fd: target for fd, target in _fd_targets().items() if before.get(fd) != target}
        raise AssertionError("file descriptors still open: %s; sockets: %s" % (new, _sockets_of(new))) from None


def _sockets_of(fds: Dict[str, str]) -> List[str]:
    """The local and remote addresses of the TCP sockets among ``fds`` (from /proc/net/tcp)."""
    inodes = {target[8:-1] for target in fds.values() if target.startswith("socket:[")}
    found = []
    with contextlib.suppress(OSError), open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            parts = line.split()
            if parts[9] in inodes:
                found.append("%s -> %s state %s" % (_addr(parts[1]), _addr(parts[2]), parts[3]))
    return found


def _addr(hexaddr: str) -> str:
    ip, port = hexaddr.split(":")
    return "%s:%d" % (".".join(str(int(ip[i : i + 2], 16)) for i in (6, 4, 2, 0)), int(port, 16))


def write_config(path, zk_hosts: str, redis_port: int = REDIS_PORT) -> str:
    path.write_text(
        "mysql: {test: {host: 127.0.0.1, port: %d, username: root, database: thriftprobe_test}}\n"
        "redis: {test: {host: 127.0.0.1, port: %d, socket_timeout: 500}}\n"
        'zkserver: {test: {hosts: "%s", session_timeout: 2000, connect_timeout: 10000}}\n'
        % (MYSQL_PORT, redis_port, zk_hosts)
    )
    return str(path)


def test_provider_kill_9_under_load_loses_no_idempotent_call(config_path, appkey, procs, cfg):
    procs.extend(spawn_provider(config_path, TEST_ENV, appkey, "p%d" % i) for i in range(3))
    retry = Retry(idempotent={"ping"}, attempts=3)
    with no_leaks(), build_client(IDL, appkey, "Calculator", config=cfg, retry=retry) as c:
        wait_until(lambda: len(c.table.snapshot.available) == 3, what="three nodes")
        with Load(c) as load:
            load.more()
            procs[0].kill()
            killed = time.monotonic()
            load.more(500)
            wait_until(lambda: len(c.table.snapshot.all_nodes) == 2, 8, "the dead node's session to expire")
            print("kill -9: node left the consumer's table %.2f s later (session timeout 2 s)"
                  % (time.monotonic() - killed))
            load.more()
        assert load.failures == []
        assert set(load.tags) == {"p0", "p1", "p2"}


def test_provider_sigterm_under_load_loses_no_call(config_path, appkey, procs, cfg):
    procs.extend(spawn_provider(config_path, TEST_ENV, appkey, "p%d" % i) for i in range(3))
    with no_leaks(), build_client(IDL, appkey, "Calculator", config=cfg) as c:  # no retries at all
        wait_until(lambda: len(c.table.snapshot.available) == 3, what="three nodes")
        with Load(c) as load:
            procs[0].send_signal(signal.SIGTERM)
            assert procs[0].wait(15) == 0
            load.more(500)
        assert load.failures == []
        assert len(c.table.snapshot.all_nodes) == 2


def test_rolling_restart_of_every_provider_loses_no_call(config_path, appkey, procs, cfg):
    ports = [free_port() for _ in range(3)]
    procs.extend(spawn_provider(config_path, TEST_ENV, appkey, "v1-%d" % i, port) for i, port in enumerate(ports))
    with no_leaks(), build_client(IDL, appkey, "Calculator", config=cfg) as c:  # no retries at all
        wait_until(lambda: len(c.table.snapshot.available) == 3, what="three nodes")
        with Load(c) as load:
            for i, port in enumerate(ports):
                procs[i].send_signal(signal.SIGTERM)
                assert procs[i].wait(15) == 0
                procs.append(spawn_provider(config_path, TEST_ENV, appkey, "v2-%d" % i, port))
                wait_until(lambda: len(c.table.snapshot.available) == 3, what="the restarted node")
                load.more(300)
            before = load.tags.copy()
            load.more(300)
        assert load.failures == []
        assert {t for t in load.tags if load.tags[t] > before[t]} == {"v2-0", "v2-1", "v2-2"}


def test_session_expiry_under_load_re_registers_with_current_settings(cfg, appkey, providers, zk):
    from thriftprobe.admin.governance import Governance

    own = config.Config(cfg.path, cfg.env, cfg.mysql, cfg.redis, config.ZooKeeperConfig(cfg.zookeeper.hosts, 2.3))
    victim = providers("victim", config=own)
    providers("other")
    with build_client(IDL, appkey, "Calculator", config=cfg) as c, Load(c) as load:
        session = victim._registry.client.client_id
        thief = KazooClient(hosts=cfg.zookeeper.hosts, client_id=session)
        thief.start(5)
        thief.stop()
        thief.close()
        expired = time.monotonic()
        with Governance(cfg) as gov:
            gov.set_node(appkey, "Calculator", "127.0.0.1", victim.port, weight=33)
        wait_until(lambda: zk.exists(victim.znode_path) and zk.exists(victim.znode_path).ephemeralOwner != session[0],
                   10, "re-registration under a new session")
        wait_until(lambda: Node.from_json(zk.get(victim.znode_path)[0]).weight == 33, 10, "the current settings")
        print("session expiry: re-registered with current settings %.3f s after the expiry"
              % (time.monotonic() - expired))
        load.more(300)
    assert load.failures == []



def test_killing_one_ensemble_member_is_invisible(ensemble, tmp_path, appkey, providers):
    cfg = config.load(write_config(tmp_path / "c.yml", ensemble.hosts), TEST_ENV)
    providers("a", config=cfg)
    providers("b", config=cfg)
    with no_leaks():
        with build_client(IDL, appkey, "Calculator", config=cfg) as c, Load(c) as load:
            for member in (ensemble.leader(), 0):
                ensemble.kill(member)
                load.more(300)
                ensemble.start(member)
                ensemble.wait_ready()
            # The watches still work: a weight change still reaches the client.
            zk = c._registry.client
            path = c.table.snapshot.all_nodes[0].znode_name("Calculator")
            full = "/services/%s/%s/%s" % (TEST_ENV, appkey, path)
            data, _ = zk.get(full)
            zk.set(full, Node.from_json(data).with_settings(77, True, 99).to_json())
            assert c.table.wait_for(lambda s: 77 in [n.weight for n in s.all_nodes], 10)
        assert load.failures == []


def test_whole_ensemble_down_30s_keeps_calls_going_and_providers_come_back(ensemble, tmp_path, appkey, providers):
    cfg = config.load(write_config(tmp_path / "c.yml", ensemble.hosts), TEST_ENV)
    a = providers("a", config=cfg)
    b = providers("b", config=cfg)
    with build_client(IDL, appkey, "Calculator", config=cfg) as c, Load(c) as load:
        ensemble.kill()
        outage_began = time.monotonic()
        while time.monotonic() - outage_began < 30:
            load.more(200, timeout=40)
        ensemble.start()
        ensemble.wait_ready(60)
        back = time.monotonic()
        zk = KazooClient(hosts=ensemble.hosts)
        zk.start(20)
        try:
            wait_until(lambda: zk.exists(a.znode_path) and zk.exists(b.znode_path), 30, "providers to re-register")
            print("providers re-registered %.1f s after the ensemble was back" % (time.monotonic() - back))
        finally:
            zk.stop()
            zk.close()
        assert c.table.wait_for(lambda s: len(s.available) == 2, 20)
        load.more(300)
    assert load.failures == []
    assert load.tags["a"] > 0 and load.tags["b"] > 0


def test_redis_stopped_during_operation_leaves_calls_unaffected(tmp_path, appkey, providers):
    port = free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        ping = ["redis-cli", "-p", str(port), "ping"]
        wait_until(lambda: subprocess.run(ping, capture_output=True, check=False).stdout == b"PONG\n",
                   what="the private Redis")
        cfg = config.load(write_config(tmp_path / "c.yml", ZK, port), TEST_ENV)
        svc = providers("a", config=cfg, audit_interval=0.2)
        with build_client(IDL, appkey, "Calculator", config=cfg) as c, Load(c) as load:
            redis_proc.kill()
            redis_proc.wait()
            load.more(500)  # several audits fail meanwhile: the node keeps its settings
            assert svc.node.weight == 10 and svc.node.valid
        assert load.failures == []
    finally:
        if redis_proc.poll() is None:
            redis_proc.kill()
            redis_proc.wait()


def test_corrupt_znode_data_is_skipped_then_repaired_by_its_provider(providers, cfg, appkey, zk):
    a = providers("a", audit_interval=0.3)
    providers("b")
    with build_client(IDL, appkey, "Calculator", config=cfg) as c, Load(c) as load:
        zk.set(a.znode_path, b"{this is not json")
        assert c.table.wait_for(lambda s: len(s.all_nodes) == 1, 5)
        load.more(200)
        assert c.table.wait_for(lambda s: len(s.all_nodes) == 2, 5)  # the provider's audit rewrote it
        assert json.loads(zk.get(a.znode_path)[0])["port"] == a.port
        load.more(200)
    assert load.failures == []


def test_registry_glitch_showing_no_node_causes_no_outage_but_real_removal_is_honoured(providers, cfg, appkey, zk):
    svc = providers("only", audit_interval=0.3)
    with build_client(IDL, appkey, "Calculator", config=cfg, empty_grace=1.5) as c:
        with Load(c) as load:
            zk.delete(svc.znode_path)  # the registry shows zero nodes for a moment
            load.more(300)
            wait_until(lambda: zk.exists(svc.znode_path), 5, "the provider's audit to re-register it")
            load.more(100)
            assert load.failures == []
        svc.stop(drain=0)  # a real removal of every provider
        began = time.monotonic()
        assert c.table.wait_for(lambda s: not s.all_nodes, 5)
        assert time.monotonic() - began >= 1.0  # held for the grace period first
        with pytest.raises(NoAvailableNode, match="no valid node"):
            c.ping()


def test_idempotent_calls_are_retried_after_a_timeout_and_others_are_not(config_path, appkey, procs, cfg, settings):
    heavy_port = free_port()
    settings.put(heavy_port, weight=1000)
    procs.append(spawn_provider(config_path, TEST_ENV, appkey, "heavy", heavy_port))
    procs.append(spawn_provider(config_path, TEST_ENV, appkey, "light"))
    settings.put(procs[1].port, weight=1)
    with build_client(IDL, appkey, "Calculator", config=cfg, socket_timeout=300,
                      retry=Retry(idempotent={"ping"}), balancer=WeightedRandom(__import__("random").Random(1))) as c:
        wait_until(lambda: len(c.table.snapshot.available) == 2, what="both nodes")
        procs[0].send_signal(signal.SIGSTOP)  # accepts connections, never answers
        assert c.ping() == "light"  # timed out on heavy after sending, retried on light
        with pytest.raises(TTransportException, match="timed out"):
            c.echo("not idempotent")
        procs[0].send_signal(signal.SIGCONT)


def test_failing_node_is_ejected_and_health_check_brings_it_back(config_path, appkey, procs, cfg):
    procs.append(spawn_provider(config_path, TEST_ENV, appkey, "a"))
    port = procs[0].port
    procs.append(spawn_provider(config_path, TEST_ENV, appkey, "b"))
    detector = OutlierDetector(consecutive_failures=2, base_ejection=30.0, max_ejected_share=0.5)
    with no_leaks(), build_client(IDL, appkey, "Calculator", config=cfg, outlier_detection=detector,
                      health_check_interval=0.2, empty_grace=0) as c:
        wait_until(lambda: len(c.table.snapshot.available) == 2, what="both nodes")
        procs[0].send_signal(signal.SIGSTOP)
        os.kill(procs[0].pid, signal.SIGKILL)  # its znode lingers until its session expires
        procs[0].wait()
        wait_until(lambda: ("127.0.0.1", port) in detector.excluded(), 5, "the idle client to eject it")
        assert {c.ping() for _ in range(50)} == {"b"}
        procs.append(spawn_provider(config_path, TEST_ENV, appkey, "a2", port))
        wait_until(lambda: ("127.0.0.1", port) not in detector.excluded(), 5, "the health check to restore it")
        wait_until(lambda: "a2" in {c.ping() for _ in range(50)}, 5, "calls to reach it again")


def test_ejection_is_capped_and_panic_uses_every_node(config_path, appkey, procs, cfg):
    procs.append(spawn_provider(config_path, TEST_ENV, appkey, "a"))
    detector = OutlierDetector(consecutive_failures=1, max_ejected_share=0.5)
    with build_client(IDL, appkey, "Calculator", config=cfg, outlier_detection=detector) as c:
        wait_until(lambda: len(c.table.snapshot.available) == 1, what="the node")
        detector.failure(("127.0.0.1", procs[0].port), table_size=1)
        assert detector.excluded() == frozenset()  # 1 of 1 would exceed the 50 % cap
        forced = OutlierDetector(consecutive_failures=1, max_ejected_share=1.0)
        forced.failure(("127.0.0.1", procs[0].port), table_size=1)
        c._outliers = forced  # every node ejected: panic mode still calls it
        assert c.ping() == "a"


def test_per_call_timeout_override(providers, cfg, appkey):
    providers("a")
    with build_client(IDL, appkey, "Calculator", config=cfg, socket_timeout=3000) as c:
        with pytest.raises(TTransportException, match="timed out"):
            c.with_timeout(100).sleep_ms(400)
        c.sleep_ms(300)  # the client's own timeout is untouched
        assert c.with_timeout(1000).echo("ok") == "ok"


def test_client_built_before_fork_works_in_children(providers, cfg, appkey):
    providers("a")
    providers("b")
    with build_client(IDL, appkey, "Calculator", config=cfg) as c:
        assert c.ping() in ("a", "b")
        children = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:  # child: use the inherited client, then leave without pytest's teardown
                code = 1
                try:
                    tags = {c.ping() for _ in range(100)}
                    # The child attaches to ZooKeeper in the background (no call waits for it).
                    wait_until(lambda: c._registry is not None, 10, "the child to attach")
                    code = 0 if tags == {"a", "b"} and c._registry.client is not None else 2
                    c.close()
                except BaseException:  # shown in the test's captured output: the child has no pytest
                    traceback.print_exc()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
            children.append(pid)
        assert {c.ping() for _ in range(100)} == {"a", "b"}  # the parent keeps working meanwhile
        for pid in children:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        assert {c.ping() for _ in range(100)} == {"a", "b"}  # and after the children closed theirs


def test_consumer_starting_during_an_outage_uses_the_fresh_cache_then_attaches(ensemble, tmp_path, appkey, providers):
    cfg = config.load(write_config(tmp_path / "c.yml", ensemble.hosts), TEST_ENV)
    short = config.Config(cfg.path, cfg.env, cfg.mysql, cfg.redis,
                          config.ZooKeeperConfig(ensemble.hosts, session_timeout=2.1, connect_timeout=1.0))
    cache = tmp_path / "calc.nodes.json"
    a = providers("a", config=cfg)
    with build_client(IDL, appkey, "Calculator", config=short, cache_file=cache) as c:
        assert c.ping() == "a"
    assert json.loads(cache.read_text())["nodes"]
    ensemble.kill()
    with pytest.raises(BackendError, match="zookeeper"):
        build_client(IDL, appkey, "Calculator", config=short)  # no cache: no table, no client
    shared = config.Config(cfg.path, cfg.env, cfg.mysql, cfg.redis,
                           config.ZooKeeperConfig(ensemble.hosts, session_timeout=2.0, connect_timeout=1.0))
    began = time.monotonic()
    with pytest.raises(BackendError, match="reconnecting"):  # shares the provider's session, which is down
        build_client(IDL, appkey, "Calculator", config=shared)
    assert time.monotonic() - began < 5
    with pytest.raises(BackendError, match="old"):
        build_client(IDL, appkey, "Calculator", config=short, cache_file=cache, cache_max_age=0)
    with build_client(IDL, appkey, "Calculator", config=short, cache_file=cache) as c:
        assert c._registry is None
        assert {c.ping() for _ in range(20)} == {"a"}  # served from the cached table
        ensemble.start()
        ensemble.wait_ready()
        wait_until(lambda: c._registry is not None, 30, "the client to attach to ZooKeeper")
        # It now follows the registry: a weight change arrives.
        zk = c._registry.client
        wait_until(lambda: zk.exists(a.znode_path), 20, "the provider to re-register")
        data, _ = zk.get(a.znode_path)
        zk.set(a.znode_path, Node.from_json(data).with_settings(55, True, 1000).to_json())
        assert c.table.wait_for(lambda s: [n.weight for n in s.all_nodes] == [55], 10)


def test_a_child_closing_an_unused_inherited_client_leaves_the_parents_connections_alone(providers, cfg, appkey):
    svc = providers("a")
    with build_client(IDL, appkey, "Calculator", config=cfg) as c:
        assert c.ping() == "a"
        address = ("127.0.0.1", svc.port)
        assert c._pool.idle_count(address) == 1
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                c.close()  # never called in the child: everything it holds is the parent's
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        conn = c._pool.acquire(address)
        assert not conn.is_stale()  # the parent's pooled connection was not shut down
        c._pool.release(conn)
        assert c.ping() == "a"

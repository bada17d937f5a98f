"""Who calls whom, from the consumer's side: each client registers itself under /consumers, keeps
its entry through a lost session, withdraws it on close(), never lets ZooKeeper delay a call;
and client.explain() tells what the client's table looks like now, node by node."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import IDL, MYSQL_PORT, REDIS_PORT, TEST_ENV, free_port, wait_until
from kazoo.client import KazooClient
from zk_ensemble import zk_ensemble  # noqa: F401 - the fixture "ensemble"

from thriftprobe import ConfigError, InvalidArgument, NoAvailableNode, build_client, config
from thriftprobe.consumer.health import OutlierDetector
from thriftprobe.node import Node

HOST = socket.gethostname()


def folder(appkey: str, service: str = "Calculator") -> str:
    return "/consumers/%s/%s/%s" % (TEST_ENV, appkey, service)


def entries(zk: KazooClient, appkey: str) -> dict:
    path = folder(appkey)
    if not zk.exists(path):
        return {}
    return {name: json.loads(zk.get(path + "/" + name)[0]) for name in zk.get_children(path)}


def own_session(cfg: config.Config, session_timeout: float, **kw: float) -> config.Config:
    """The same servers with another session timeout: a ZooKeeper session of its own."""
    return config.Config(cfg.path, cfg.env, cfg.mysql, cfg.redis,
                         config.ZooKeeperConfig(cfg.zookeeper.hosts, session_timeout, **kw))


def test_each_client_registers_itself_and_close_withdraws_it(cfg, appkey, providers, zk):
    providers("a")
    pid = os.getpid()
    began = time.time()
    with build_client(IDL, appkey, "Calculator", config=cfg, caller="t-web") as web:
        # Published when build_client returns.
        assert set(entries(zk, appkey)) == {"t-web_%s_%d" % (HOST, pid)}
        info = entries(zk, appkey)["t-web_%s_%d" % (HOST, pid)]
        assert info["caller"] == "t-web" and info["host"] == HOST and info["pid"] == pid
        assert info["sdk"].startswith("thriftprobe/") and began - 1 <= info["start_time"] <= time.time()
        assert zk.exists(folder(appkey) + "/t-web_%s_%d" % (HOST, pid)).ephemeralOwner  # ephemeral
        with build_client(IDL, appkey, "Calculator", config=cfg, caller="t-web") as twin, \
                build_client(IDL, appkey, "Calculator", config=cfg) as anonymous:
            # Two clients of one process with the same caller get distinct entries; without a
            # caller (argument or config) a client registers as "unknown".
            assert set(entries(zk, appkey)) == {"t-web_%s_%d" % (HOST, pid), "t-web_%s_%d_2" % (HOST, pid),
                                                "unknown_%s_%d" % (HOST, pid)}
            assert web.ping() == twin.ping() == anonymous.ping() == "a"
        # close() withdraws at once (no session timeout to wait for: the session is shared).
        assert set(entries(zk, appkey)) == {"t-web_%s_%d" % (HOST, pid)}
        with build_client(IDL, appkey, "Calculator", config=cfg, caller="t-web"):  # the freed name is reused
            assert "t-web_%s_%d_2" % (HOST, pid) in entries(zk, appkey)
    assert entries(zk, appkey) == {}


def test_the_default_caller_comes_from_the_config(tmp_path, cfg, appkey, providers, zk):
    path = tmp_path / "c.yml"
    base = Path(cfg.path).read_text()
    path.write_text(base + "client:\n  %s: {caller: from-config}\n  other: {}\n" % TEST_ENV)
    with_caller = config.load(path, TEST_ENV)
    assert with_caller.client.caller == "from-config"
    providers("a")
    with build_client(IDL, appkey, "Calculator", config=with_caller) as c:
        assert [info["caller"] for info in entries(zk, appkey).values()] == ["from-config"]
        assert c.explain().caller == "from-config"
    with build_client(IDL, appkey, "Calculator", config=with_caller, caller="given") as c:
        assert [info["caller"] for info in entries(zk, appkey).values()] == ["given"]
    path.write_text(base + "client:\n  %s: {caller: \"a/b\"}\n" % TEST_ENV)
    with pytest.raises(ConfigError, match=r"client\.test\.caller"):
        config.load(path, TEST_ENV)
    path.write_text(base + "client:\n  %s: {caler: x}\n" % TEST_ENV)
    with pytest.raises(ConfigError, match="caler"):
        config.load(path, TEST_ENV)
    for bad in ("a/b", "..", "", 7):
        with pytest.raises(InvalidArgument, match="caller"):
            build_client(IDL, appkey, "Calculator", config=cfg, caller=bad)


def test_the_entry_comes_back_after_a_session_loss(cfg, appkey, providers, zk):
    providers("a")
    own = own_session(cfg, 2.4)
    with build_client(IDL, appkey, "Calculator", config=own, caller="t-lost") as c:
        name = "t-lost_%s_%d" % (HOST, os.getpid())
        path = folder(appkey) + "/" + name
        before = zk.exists(path).ephemeralOwner
        session = c._registry.client.client_id
        thief = KazooClient(hosts=cfg.zookeeper.hosts, client_id=session)  # ends the client's session
        thief.start(5)
        thief.stop()
        thief.close()
        lost = time.monotonic()
        wait_until(lambda: zk.exists(path) is not None and zk.exists(path).ephemeralOwner != before, 15,
                   "the consumer entry under a new session")
        print("session loss: consumer entry back %.2f s after it" % (time.monotonic() - lost))
        assert json.loads(zk.get(path)[0])["caller"] == "t-lost"
        assert c.ping() == "a"
        assert c.explain().registered_as == path
    assert not zk.exists(path)


def test_an_unreachable_zookeeper_never_delays_or_fails_a_call(tmp_path, cfg, appkey, providers, zk):
    providers("a")
    cache = tmp_path / "nodes.json"
    with build_client(IDL, appkey, "Calculator", config=cfg, cache_file=cache) as c:
        assert c.ping() == "a"
    nowhere = config.Config(cfg.path, cfg.env, cfg.mysql, cfg.redis,
                            config.ZooKeeperConfig("127.0.0.1:%d" % free_port(), 2.0, connect_timeout=0.5))
    began = time.monotonic()
    c = build_client(IDL, appkey, "Calculator", config=nowhere, cache_file=cache, caller="t-offline")
    try:
        assert time.monotonic() - began < 2.0
        took = []
        for _ in range(50):
            start = time.monotonic()
            assert c.ping() == "a"
            took.append(time.monotonic() - start)
        assert max(took) < 0.2, took
        explained = c.explain()
        assert explained.registered_as is None and not explained.attached
        assert [n.state for n in explained.nodes] == ["valid"]
    finally:
        began = time.monotonic()
        c.close()
        assert time.monotonic() - began < 2.0
    assert entries(zk, appkey) == {}



def test_zookeeper_going_away_and_back_neither_delays_calls_nor_loses_the_entry(ensemble, tmp_path, appkey,
                                                                                   providers):
    path = tmp_path / "c.yml"
    path.write_text(
        "mysql: {test: {host: 127.0.0.1, port: %d, username: root, database: thriftprobe_test}}\n"
        "redis: {test: {host: 127.0.0.1, port: %d}}\n"
        'zkserver: {test: {hosts: "%s", session_timeout: 2000, connect_timeout: 10000}}\n'
        % (MYSQL_PORT, REDIS_PORT, ensemble.hosts))
    ens_cfg = config.load(path, TEST_ENV)
    providers("a", config=ens_cfg)
    zk = KazooClient(hosts=ensemble.hosts)
    zk.start(10)
    try:
        c = build_client(IDL, appkey, "Calculator", config=own_session(ens_cfg, 2.2, connect_timeout=5.0),
                         caller="t-outage")
        entry = folder(appkey) + "/t-outage_%s_%d" % (HOST, os.getpid())
        assert zk.exists(entry)
        zk.stop()
        ensemble.kill()
        took = []
        for _ in range(200):  # across the outage, and the session's expiry on the client's side
            start = time.monotonic()
            assert c.ping() == "a"
            took.append(time.monotonic() - start)
            time.sleep(0.02)
        assert max(took) < 0.2, max(took)
        assert c.explain().registered_as is None
        ensemble.start()
        ensemble.wait_ready()
        zk.start(10)
        wait_until(lambda: zk.exists(entry) is not None, 30, "the entry to be registered again")
        wait_until(lambda: c.explain().registered_as == entry, 10, "the client to know it")
        began = time.monotonic()
        c.close()
        assert time.monotonic() - began < 3.0
        wait_until(lambda: zk.exists(entry) is None, 5, "the entry to go with close()")
    finally:
        zk.stop()
        zk.close()


def test_a_forked_child_registers_its_own_entry(cfg, appkey, providers, zk):
    providers("a")
    with build_client(IDL, appkey, "Calculator", config=cfg, caller="t-fork") as c:
        assert c.ping() == "a"
        parent = "t-fork_%s_%d" % (HOST, os.getpid())
        assert set(entries(zk, appkey)) == {parent}
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: call (which attaches and registers), report, wait, close, leave
            code = 1
            try:
                os.close(ready_r)
                os.close(go_w)
                assert c.ping() == "a"
                deadline = time.monotonic() + 10
                while not c._presence.registered() and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.write(ready_w, (c.explain().registered_as or "none").encode())
                os.read(go_r, 1)
                c.close()
                code = 0
            finally:
                os._exit(code)
        os.close(ready_w)
        os.close(go_r)
        try:
            registered_as = os.read(ready_r, 1000).decode()
            child = "t-fork_%s_%d" % (HOST, pid)
            assert registered_as == folder(appkey) + "/" + child
            found = entries(zk, appkey)
            assert set(found) == {parent, child} and found[child]["pid"] == pid
        finally:
            os.write(go_w, b"x")
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The child withdrew its own entry, never the parent's.
        assert set(entries(zk, appkey)) == {parent}
        assert c.ping() == "a" and c.explain().registered_as == folder(appkey) + "/" + parent


def test_explain_tells_each_nodes_state_and_why(cfg, appkey, providers, zk, gov):
    a = providers("a")
    b = providers("b")
    off = providers("off")
    dead_port = free_port()
    dead = "/services/%s/%s/Calculator_127.0.0.1_%d" % (TEST_ENV, appkey, dead_port)
    zk.create(dead, Node("127.0.0.1", dead_port).to_json(), ephemeral=True)
    outliers = OutlierDetector(consecutive_failures=1, base_ejection=30, max_ejection=30)
    with build_client(IDL, appkey, "Calculator", config=cfg, outlier_detection=outliers, caller="t-explain") as c:
        gov.set_node(appkey, "Calculator", "127.0.0.1", off.port, valid=False)
        gov.set_node(appkey, "Calculator", "127.0.0.1", a.port, weight=30)
        assert c.table.wait_for(lambda s: len(s.available) == 3 and s.total == 50, 5)
        for _ in range(200):  # a call that picks the dead node fails over; the node is ejected
            assert c.ping() in ("a", "b")
            if dead_port in [address[1] for address in outliers.excluded()]:
                break
        for _ in range(50):  # both live nodes get a pooled connection
            assert c.ping() in ("a", "b")
        slow = threading.Thread(target=c.sleep_ms, args=(1500,))
        slow.start()
        wait_until(lambda: sum(n.in_flight for n in c.explain().nodes) == 1, what="the slow call in flight")
        explained = c.explain()
        slow.join()
        by_port = {n.port: n for n in explained.nodes}
        assert set(by_port) == {a.port, b.port, off.port, dead_port}
        node_a, node_b, node_off, node_dead = by_port[a.port], by_port[b.port], by_port[off.port], by_port[dead_port]
        assert (node_a.state, node_a.weight, node_a.share) == ("valid", 30, 0.75)
        assert "75.0%" in node_a.why and "weight 30 of 40" in node_a.why
        assert (node_b.state, node_b.share) == ("valid", 0.25)
        assert (node_off.state, node_off.valid, node_off.share) == ("disabled", False, 0.0)
        assert "switched off" in node_off.why
        assert (node_dead.state, node_dead.share, node_dead.pooled) == ("ejected", 0.0, 0)
        assert 25 < node_dead.ejected_for <= 30 and "avoided for" in node_dead.why
        assert node_a.pooled + node_b.pooled >= 1  # the calls' connections wait in the pool
        assert node_a.in_flight + node_b.in_flight == 1 and node_dead.in_flight == 0
        assert explained.registered_as == folder(appkey) + "/t-explain_%s_%d" % (HOST, os.getpid())
        assert explained.attached and not explained.panic
        # Nothing in flight once the call is over.
        assert sum(n.in_flight for n in c.explain().nodes) == 0
        text = str(explained)
        print(text)
        assert "caller t-explain" in text and "4 node(s), 2 take calls now" in text
        assert "127.0.0.1:%d" % dead_port in text and "ejected" in text
        assert json.loads(json.dumps(explained.to_dict()))["nodes"][0]["state"] in ("valid", "disabled", "ejected")
        gov.set_node(appkey, "Calculator", "127.0.0.1", b.port, weight=0)
        assert c.table.wait_for(lambda s: len(s.available) == 2, 5)
        node_b = {n.port: n for n in c.explain().nodes}[b.port]
        assert (node_b.state, node_b.why) == ("disabled", "weight 0: takes no calls")
    zk.delete(dead)


def test_explain_shows_held_nodes(cfg, appkey, providers):
    a = providers("a")
    with build_client(IDL, appkey, "Calculator", config=cfg, empty_grace=30) as c:
        assert c.ping() == "a"
        a.stop(timeout=2.0, drain=0)  # the registry shows none: the table holds the last node
        wait_until(lambda: [n.state for n in c.explain().nodes] == ["held"], what="the node held")
        held = c.explain().nodes[0]
        assert 25 < held.held_for <= 30 and held.share == 1.0 and "glitch" in held.why


def test_explain_shows_panic_when_every_node_is_ejected(cfg, appkey, zk):
    dead_port = free_port()
    dead = "/services/%s/%s/Calculator_127.0.0.1_%d" % (TEST_ENV, appkey, dead_port)
    zk.create(dead, Node("127.0.0.1", dead_port).to_json(), ephemeral=True, makepath=True)
    outliers = OutlierDetector(consecutive_failures=1, base_ejection=30, max_ejection=30, max_ejected_share=1.0)
    try:
        with build_client(IDL, appkey, "Calculator", config=cfg, outlier_detection=outliers) as c:
            with pytest.raises(NoAvailableNode):
                c.ping()
            explained = c.explain()
            node = explained.nodes[0]
            assert explained.panic and (node.state, node.share) == ("ejected", 1.0)
            assert "panic" in node.why and "PANIC" in str(explained)
    finally:
        zk.delete(dead)

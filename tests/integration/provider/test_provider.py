"""start_service against real MySQL, Redis and ZooKeeper."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid

import pytest
from conftest import (
    CLUSTER_ENV,
    CLUSTER_PORT,
    IDL,
    MYSQL_PORT,
    REDIS_PORT,
    TEST_ENV,
    ZK_PORT,
    Handler,
    free_port,
    spawn_provider,
    wait_until,
)

from thriftprobe import (
    AppkeyNotRegistered,
    BackendError,
    IdlError,
    InvalidArgument,
    SettingsError,
    build_client,
    config,
    start_service,
)
from thriftprobe.node import settings_field
from thriftprobe.stores.settings import hash_key


def children(zk, appkey, env=TEST_ENV):
    path = "/services/%s/%s" % (env, appkey)
    return zk.get_children(path) if zk.exists(path) else []


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_registration_json_and_path(providers, zk, appkey):
    svc = providers("a")
    path = "/services/test/%s/Calculator_127.0.0.1_%d" % (appkey, svc.port)
    assert svc.znode_path == path
    data, stat = zk.get(path)
    node = json.loads(data)
    assert {k: node[k] for k in ("host", "port", "weight", "valid")} == {
        "host": "127.0.0.1",
        "port": svc.port,
        "weight": 10,
        "valid": 1,
    }
    assert node["pid"] > 0 and node["sdk"].startswith("thriftprobe/")
    assert stat.ephemeralOwner != 0


def test_defaults_are_written_to_redis_when_absent(providers, settings):
    svc = providers("a")
    stored = json.loads(settings.get(svc.port))
    assert stored == {"host": "127.0.0.1", "port": svc.port, "weight": 10, "valid": 1}


def test_preset_weight_and_valid_are_used_and_not_overwritten(providers, settings, zk):
    port = free_port()
    settings.put(port, weight=37, valid=0)
    svc = providers("a", port=port)
    assert (svc.node.weight, svc.node.valid) == (37, False)
    data = json.loads(zk.get(svc.znode_path)[0])
    assert (data["weight"], data["valid"]) == (37, 0)
    assert json.loads(settings.get(port))["weight"] == 37


def test_corrupt_settings_fail_the_start_and_leave_nothing(settings, zk, appkey, cfg):
    port = free_port()
    settings.client.hset(
        hash_key(TEST_ENV), settings_field(appkey, TEST_ENV, "Calculator", "127.0.0.1", port), b"{not json"
    )
    with pytest.raises(SettingsError, match="corrupt settings"):
        start_service(IDL, appkey, "Calculator", Handler("x"), port, config=cfg, block=False, bind_host="127.0.0.1")
    assert children(zk, appkey) == []
    assert port_is_free(port)


def test_unknown_appkey_leaves_no_znode_and_releases_nothing(cfg, zk):
    port = free_port()
    before = threading.active_count()
    with pytest.raises(
        AppkeyNotRegistered,
        match=r"appkey 'no.such.app' is not in table serviceapp of mysql 127.0.0.1:%d/thriftprobe_test \(env test\)"
        % MYSQL_PORT,
    ):
        start_service(IDL, "no.such.app", "Calculator", Handler("x"), port, config=cfg, block=False)
    assert children(zk, "no.such.app") == []
    assert port_is_free(port)
    assert threading.active_count() == before


@pytest.mark.parametrize("name", ["", "bad-name", "a b", None])
def test_bad_service_name_is_rejected_before_anything(name, cfg, appkey, zk):
    with pytest.raises(InvalidArgument, match="service_name"):
        start_service(IDL, appkey, name, Handler("x"), 0, config=cfg, block=False)
    assert children(zk, appkey) == []


@pytest.mark.parametrize("option, host", [("advertise_host", "10.0.0.5\n"), ("advertise_host", "a_b"),
                                          ("bind_host", "127.0.0.1 "), ("advertise_host", "h" * 254)])
def test_a_host_that_cannot_name_a_node_is_rejected_before_anything(option, host, cfg, appkey, zk):
    port = free_port()
    with pytest.raises(InvalidArgument, match=option):
        start_service(IDL, appkey, "Calculator", Handler("x"), port, config=cfg, block=False, **{option: host})
    assert children(zk, appkey) == []
    assert port_is_free(port)


def test_missing_idl_names_file_and_service(cfg, appkey, zk):
    with pytest.raises(IdlError, match=r"IDL file /nope/missing.thrift not found \(looking for service 'Calculator'"):
        start_service("/nope/missing.thrift", appkey, "Calculator", Handler("x"), 0, config=cfg, block=False)
    assert children(zk, appkey) == []


def test_service_not_in_idl_lists_what_is_there(cfg, appkey, zk):
    with pytest.raises(
        IdlError, match=r"service 'Adder' is not defined in IDL file .*demo.thrift \(services there: Calculator\)"
    ):
        start_service(IDL, appkey, "Adder", Handler("x"), 0, config=cfg, block=False)
    assert children(zk, appkey) == []


def test_incomplete_handler_is_rejected(cfg, appkey, zk):
    class Partial:
        def ping(self):
            return "x"

    with pytest.raises(InvalidArgument, match="does not implement compute, echo, record, sleep_ms"):
        start_service(IDL, appkey, "Calculator", Partial(), 0, config=cfg, block=False)
    assert children(zk, appkey) == []


def test_port_in_use_is_a_clear_error(providers, cfg, appkey, zk):
    svc = providers("a")
    with pytest.raises(Exception, match="cannot listen on 127.0.0.1:%d" % svc.port):
        start_service(IDL, appkey, "Calculator", Handler("x"), svc.port, config=cfg, block=False, bind_host="127.0.0.1")
    assert children(zk, appkey) == ["Calculator_127.0.0.1_%d" % svc.port]


def test_unreachable_redis_is_a_backend_error_and_leaves_nothing(tmp_path, cfg, appkey, zk):
    path = tmp_path / "c.yml"
    path.write_text(
        f"""
mysql: {{test: {{host: 127.0.0.1, port: {MYSQL_PORT}, username: root, database: thriftprobe_test}}}}
redis: {{test: {{host: 127.0.0.1, port: 1, socket_timeout: 500}}}}
zkserver: {{test: {{host: 127.0.0.1, port: {ZK_PORT}}}}}
"""
    )
    port = free_port()
    began = time.monotonic()
    with pytest.raises(BackendError, match=r"redis 127\.0\.0\.1:1"):
        start_service(IDL, appkey, "Calculator", Handler("x"), port, config=str(path), env="test", block=False)
    # A refused connection is reported at once, not after redis-py's default retries with
    # backoff (4-15 s); the bound is loose, the old figure far above it.
    assert time.monotonic() - began < 3.0
    assert children(zk, appkey) == []
    assert port_is_free(port)


def test_stop_deletes_znode_and_releases_port(cfg, appkey, zk):
    svc = start_service(IDL, appkey, "Calculator", Handler("x"), 0, config=cfg, block=False, bind_host="127.0.0.1")
    assert zk.exists(svc.znode_path)
    svc.stop()
    svc.stop()  # idempotent
    assert not zk.exists(svc.znode_path)
    assert port_is_free(svc.port)
    assert not [t for t in threading.enumerate() if t.name.startswith("thriftprobe-") and str(svc.port) in t.name]


def test_stop_finishes_in_flight_calls(providers, cfg, appkey):
    svc = providers("a")
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        outcome = {}

        def slow_call():
            try:
                client.sleep_ms(400)
                outcome["ok"] = True
            except Exception as err:  # recorded for the assertion below
                outcome["error"] = err

        caller = threading.Thread(target=slow_call)
        caller.start()
        wait_until(lambda: svc._server._conns, what="the call to arrive")
        svc.stop(timeout=5.0)
        caller.join(5)
        assert outcome == {"ok": True}


def test_idle_connections_are_not_dropped(providers, cfg, appkey):
    # io_timeout bounds one request's transfer, never idle time: thriftpy2's make_server would
    # have closed this connection after its client_timeout.
    svc = providers("a", io_timeout=200)
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        assert client.ping() == "a"
        conns = set(svc._server._conns.values())
        assert len(conns) == 1
        threading.Event().wait(0.8)  # stay idle for 4x io_timeout
        assert client.ping() == "a"
        assert set(svc._server._conns.values()) == conns


def test_sigterm_in_blocking_mode_deregisters_and_exits(config_path, appkey, zk):
    proc = spawn_provider(config_path, TEST_ENV, appkey, "sub")
    path = "/services/test/%s/Calculator_127.0.0.1_%d" % (appkey, proc.port)
    assert zk.exists(path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not zk.exists(path)
    assert port_is_free(proc.port)


def test_killed_providers_znode_vanishes_with_its_session(config_path, appkey, zk):
    proc = spawn_provider(config_path, TEST_ENV, appkey, "doomed")
    path = "/services/test/%s/Calculator_127.0.0.1_%d" % (appkey, proc.port)
    assert zk.exists(path)
    proc.kill()
    proc.wait()
    wait_until(lambda: not zk.exists(path), timeout=8, what="the ephemeral node to expire")


def test_restart_on_same_port_replaces_a_stale_znode(config_path, appkey, zk, cfg):
    proc = spawn_provider(config_path, TEST_ENV, appkey, "old")
    port = proc.port
    path = "/services/test/%s/Calculator_127.0.0.1_%d" % (appkey, port)
    old_owner = zk.exists(path).ephemeralOwner
    proc.kill()
    proc.wait()
    svc = start_service(IDL, appkey, "Calculator", Handler("new"), port, config=cfg, block=False, bind_host="127.0.0.1")
    try:
        stat = zk.exists(path)
        assert stat is not None and stat.ephemeralOwner != old_owner
    finally:
        svc.stop()


def test_redis_cluster_mode(cluster_cfg, zk, services):
    import redis.cluster

    from thriftprobe.stores import appkeys

    appkey = "t.cluster.%s" % uuid.uuid4().hex[:12]
    appkeys.add_appkey(cluster_cfg.mysql, appkey)
    rc = redis.cluster.RedisCluster(host="127.0.0.1", port=CLUSTER_PORT)
    port = free_port()
    field = settings_field(appkey, CLUSTER_ENV, "Calculator", "127.0.0.1", port)
    rc.hset(hash_key(CLUSTER_ENV), field, json.dumps({"host": "127.0.0.1", "port": port, "weight": 3, "valid": 1}))
    try:
        svc = start_service(
            IDL, appkey, "Calculator", Handler("c"), port, config=cluster_cfg, block=False, bind_host="127.0.0.1"
        )
        try:
            assert svc.node.weight == 3
            assert json.loads(zk.get(svc.znode_path)[0])["weight"] == 3
            with build_client(IDL, appkey, "Calculator", config=cluster_cfg) as client:
                assert client.ping() == "c"
        finally:
            svc.stop()
        second = free_port()
        svc = start_service(
            IDL, appkey, "Calculator", Handler("d"), second, config=cluster_cfg, block=False, bind_host="127.0.0.1"
        )
        svc.stop()
        stored = rc.hget(hash_key(CLUSTER_ENV), settings_field(appkey, CLUSTER_ENV, "Calculator", "127.0.0.1", second))
        assert json.loads(stored)["weight"] == 10
    finally:
        rc.close()


def test_config_argument_as_path_and_env(config_path, appkey, zk):
    svc = start_service(
        IDL, appkey, "Calculator", Handler("x"), 0, config=config_path, env=TEST_ENV, block=False, bind_host="127.0.0.1"
    )
    try:
        assert svc.env == TEST_ENV and isinstance(svc.config, config.Config)
    finally:
        svc.stop()


def test_default_advertised_host_is_routable_not_127_0_1_1(providers):
    svc = providers("a", bind_host="0.0.0.0")
    assert svc.node.host == "127.0.0.1"  # the route to ZooKeeper at 127.0.0.1
    assert not svc.node.host.startswith("127.0.1.")


def test_unreachable_mysql_is_a_backend_error_and_leaves_nothing(tmp_path, appkey, zk):
    path = tmp_path / "c.yml"
    path.write_text(
        f"""
mysql: {{test: {{host: 127.0.0.1, port: 1, username: root, database: thriftprobe_test, connect_timeout: 500}}}}
redis: {{test: {{host: 127.0.0.1, port: {REDIS_PORT}}}}}
zkserver: {{test: {{host: 127.0.0.1, port: {ZK_PORT}}}}}
"""
    )
    port = free_port()
    with pytest.raises(BackendError, match=r"cannot connect to mysql 127\.0\.0\.1:1/thriftprobe_test"):
        start_service(IDL, appkey, "Calculator", Handler("x"), port, config=str(path), env="test", block=False)
    assert children(zk, appkey) == []
    assert port_is_free(port)


def test_drain_keeps_serving_after_deregistering(providers, cfg, appkey, zk):
    svc = providers("a")
    with build_client(IDL, appkey, "Calculator", config=cfg) as client:
        assert client.ping() == "a"
        stopper = threading.Thread(target=svc.stop, kwargs={"drain": 1.0})
        stopper.start()
        wait_until(lambda: not zk.exists(svc.znode_path), what="deregistration")
        # Deregistered, still draining: a consumer that has not yet seen the change is served.
        conn = client._pool.acquire(("127.0.0.1", svc.port))
        client._pool.release(conn)
        assert stopper.is_alive()
        stopper.join(10)
        assert port_is_free(svc.port)

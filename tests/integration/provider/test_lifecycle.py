"""Issue 10 C2-C7: a provider's registration across outages, and stopping it whatever ZooKeeper does.

Tests that stop, freeze or restart ZooKeeper use a private single-member ZooKeeper on a free
port (never the shared one); MySQL and Redis are the shared servers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from typing import Iterator, Optional

import pytest
from conftest import IDL, Handler, free_port, wait_until
from kazoo.client import KazooClient
from zk_ensemble import ZkEnsemble, mode

from thriftprobe import build_client, config, start_service
from thriftprobe.admin.governance import Governance
from thriftprobe.node import Node
from thriftprobe.provider import server as server_mod
from thriftprobe.registry import zookeeper as zk_mod


class PrivateZooKeeper:
    """One standalone ZooKeeper (tickTime 500) that a test may kill, restart, freeze and thaw."""

    def __init__(self, base) -> None:
        self._ens = ZkEnsemble(base, size=1)  # one member runs standalone
        self.port = self._ens.client_ports[0]
        self.hosts = self._ens.hosts

    def start(self) -> None:
        self._ens.start()
        wait_until(lambda: mode(self.port) == "standalone", 60, "the private ZooKeeper to serve")

    def kill(self) -> None:
        self._ens.kill()

    def _signal(self, sig: int) -> None:
        proc = self._ens._procs[0]
        assert proc is not None and proc.poll() is None
        os.killpg(proc.pid, sig)

    def freeze(self) -> None:
        """Stopped, not dead: connections stay open and nothing answers."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def client(self) -> KazooClient:
        zk = KazooClient(hosts=self.hosts)
        zk.start(20)
        return zk

    def close(self) -> None:
        proc = self._ens._procs[0]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
        self._ens.close()


@pytest.fixture
def private_zk(tmp_path) -> Iterator[PrivateZooKeeper]:
    if not shutil.which("java"):
        pytest.fail("java is needed for the private ZooKeeper")
    zk = PrivateZooKeeper(tmp_path / "zk")
    zk.start()
    yield zk
    zk.close()


def on(cfg: config.Config, hosts: str, session_timeout: float) -> config.Config:
    """``cfg`` with its ZooKeeper replaced (MySQL and Redis stay the shared ones)."""
    return config.Config(cfg.path, cfg.env, cfg.mysql, cfg.redis,
                         config.ZooKeeperConfig(hosts, session_timeout=session_timeout, connect_timeout=10.0))


def owned_by(zk: KazooClient, path: str, owner: KazooClient) -> bool:
    stat = zk.exists(path)
    session = owner.client_id
    return owner.connected and stat is not None and session is not None and stat.ephemeralOwner == session[0]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def threads_of(port: int) -> list:
    return [t.name for t in threading.enumerate() if t.name.startswith("thriftprobe-") and str(port) in t.name]


# -- C2: back within about a second of the ensemble, after any outage ---------------------------


@pytest.mark.slow
def test_node_is_registered_again_within_about_a_second_of_zookeeper_after_a_long_outage(
    private_zk, cfg, appkey, providers
):
    svc = providers("a", config=on(cfg, private_zk.hosts, session_timeout=2.0))
    session = svc._registry.client
    private_zk.kill()
    wait_until(lambda: not session.connected, 10, "the provider to see ZooKeeper gone")
    threading.Event().wait(30)  # the outage: kazoo's default retry has backed off to ~13-25 s by now
    private_zk.start()
    back = time.monotonic()
    checker = private_zk.client()
    try:
        wait_until(lambda: owned_by(checker, svc.znode_path, session), 40, "the node under a live session")
        elapsed = time.monotonic() - back
        print("registered again %.2f s after ZooKeeper was back" % elapsed)
        assert elapsed < 2.0
    finally:
        checker.stop()
        checker.close()


# -- C3: an operator's change that lands during a re-registration is not lost ------------------


def test_change_landing_between_the_keepers_read_and_its_re_registration_wins(providers, cfg, appkey, zk):
    svc = providers("a", audit_interval=60.0)  # no audit would repair it during the test
    registration = svc._registration
    read = registration._refresh
    armed = threading.Event()
    outcome = []

    def operator_acts_right_after_the_keepers_read(node: Node) -> Node:
        current = read(node)
        if armed.is_set():
            armed.clear()
            try:
                with Governance(cfg) as gov:
                    outcome.append(gov.set_node(appkey, "Calculator", "127.0.0.1", svc.port, valid=False).live)
            except Exception as err:  # asserted below: the keeper thread must not swallow it
                outcome.append(err)
        return current

    registration._refresh = operator_acts_right_after_the_keepers_read
    armed.set()
    zk.delete(svc.znode_path)  # the node is lost; its keeper re-registers it (as after a lost session)
    registration._wake.set()  # at once, not at the next audit
    wait_until(lambda: outcome, 5, "the operator's change")
    assert outcome == [False]  # made while the node was gone: stored, not live
    wait_until(lambda: zk.exists(svc.znode_path), 5, "re-registration")
    wait_until(lambda: Node.from_json(zk.get(svc.znode_path)[0]).valid is False, 3,
               "the re-registered node to carry the operator's change")


# -- C4: stopping during a short disconnect --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False], ids=["session-shared-with-a-consumer", "session-of-its-own"])
def test_stop_during_a_short_disconnect_deletes_the_node_once_zookeeper_is_back(
    private_zk, cfg, appkey, providers, shared
):
    own = on(cfg, private_zk.hosts, session_timeout=20.0)  # the outage is shorter than the session
    svc = providers("a", config=own)
    consumer = build_client(IDL, appkey, "Calculator", config=own, empty_grace=0) if shared else None
    session = svc._registry.client
    session_id = session.client_id
    try:
        private_zk.kill()
        wait_until(lambda: not session.connected, 10, "the provider to see ZooKeeper gone")
        began = time.monotonic()
        svc.stop(timeout=2.0, drain=0)
        assert time.monotonic() - began < 2.5
        private_zk.start()
        back = time.monotonic()
        checker = private_zk.client()
        try:
            wait_until(lambda: not checker.exists(svc.znode_path), 5, "the stopped provider's node to go")
            print("stopped provider's node deleted %.2f s after ZooKeeper was back" % (time.monotonic() - back))
        finally:
            checker.stop()
            checker.close()
        if consumer is not None:
            assert consumer._registry.client.client_id == session_id  # the shared session lived on
            assert consumer.table.wait_for(lambda s: not s.all_nodes, 5)
    finally:
        if consumer is not None:
            consumer.close()


# -- C5: stop() and SIGTERM return in time whatever ZooKeeper does -----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop", "sigterm"])
def test_stop_returns_within_its_timeout_while_zookeeper_does_not_answer(private_zk, cfg, appkey, providers, how):
    svc = providers("a", config=on(cfg, private_zk.hosts, session_timeout=10.0), stop_timeout=1.0)
    serving: Optional[threading.Thread] = None
    if how == "sigterm":
        serving = threading.Thread(target=svc.serve_forever)  # what start_service(block=True) runs
        serving.start()
    private_zk.freeze()
    try:
        began = time.monotonic()
        if serving is None:
            svc.stop()
        else:
            svc._on_signal(signal.SIGTERM, None)  # what the main thread's SIGTERM handler does
            serving.join(5)
            assert not serving.is_alive()
        elapsed = time.monotonic() - began
        print("%s returned after %.2f s with ZooKeeper frozen" % (how, elapsed))
        assert elapsed < 1.5  # drain 0 + stop_timeout 1.0
        assert port_is_free(svc.port)  # the server did stop
    finally:
        private_zk.thaw()
    checker = private_zk.client()
    try:
        wait_until(lambda: not checker.exists(svc.znode_path), 20, "the node to go once ZooKeeper answers")
    finally:
        checker.stop()
        checker.close()
    wait_until(lambda: svc.stopped, 20, "the rest of the stop to finish in the background")


# -- C6: a failure starting the accept thread -------------------------------------------------------


def test_a_failure_starting_the_accept_thread_leaves_nothing_behind(cfg, appkey, zk, monkeypatch):
    def cannot_start(self) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(server_mod.Server, "start", cannot_start)
    port = free_port()
    sessions = {key: shared.refs for key, shared in zk_mod._sessions.items()}
    with pytest.raises(RuntimeError, match="can't start new thread"):
        start_service(IDL, appkey, "Calculator", Handler("x"), port, config=cfg, block=False, bind_host="127.0.0.1")
    folder = "/services/%s/%s" % (cfg.env, appkey)
    assert not zk.exists(folder) or zk.get_children(folder) == []
    assert port_is_free(port)
    wait_until(lambda: not threads_of(port), 5, "no thread of it left (%s)" % threads_of(port))
    assert {key: shared.refs for key, shared in zk_mod._sessions.items()} == sessions  # its share released


# -- C7: stop() from a handler -------------------------------------------------------------------------


class StopsItself(Handler):
    """``ping`` stops the very service it runs in, as a handler of an admin endpoint would."""

    svc = None

    def ping(self) -> str:
        self.svc.stop(timeout=2.0, drain=0)
        return "bye"


def test_stop_from_a_handler_stops_everything_and_the_call_gets_its_reply(cfg, appkey, zk):
    handler = StopsItself("x")
    svc = start_service(IDL, appkey, "Calculator", handler, 0, config=cfg, block=False, bind_host="127.0.0.1",
                        drain=0)
    handler.svc = svc
    try:
        with build_client(IDL, appkey, "Calculator", config=cfg) as client:
            assert client.ping() == "bye"
        wait_until(lambda: svc.stopped, 5, "the service to stop")
        assert not zk.exists(svc.znode_path)
        assert port_is_free(svc.port)
        wait_until(lambda: not threads_of(svc.port), 5, "its threads to end (%s)" % threads_of(svc.port))
    finally:
        svc.stop(timeout=1.0, drain=0)

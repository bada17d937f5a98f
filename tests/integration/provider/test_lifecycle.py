"""Issue 10 C2-C7: a provider's registration across outages, and stopping it whatever ZooKeeper does.

Tests that need ZooKeeper unreachable reach the shared one through a proxy of their own
(ZooKeeperLink) and cut or freeze that, never the server other tests use.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import threading
import time
from typing import Iterator, List, Optional

import pytest
from conftest import IDL, ZK, Handler, free_port, wait_until
from kazoo.client import KazooClient

from thriftprobe import build_client, config, start_service
from thriftprobe.admin.governance import Governance
from thriftprobe.node import Node
from thriftprobe.provider import server as server_mod
from thriftprobe.registry import zookeeper as zk_mod


class ZooKeeperLink:
    """A TCP proxy between this process and the shared ZooKeeper: the network path a test may cut,
    restore, freeze or thaw, without touching the server that other tests use.

    ``cut()`` refuses new connections and resets the open ones (ZooKeeper down, or a partition
    that answers with resets); ``freeze()`` keeps connections open but lets nothing through
    (ZooKeeper hung, or a partition that drops packets). The server itself keeps running, so its
    sessions live and expire as they would.
    """

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.hosts = "127.0.0.1:%d" % self.port
        self._target = target_port
        self._lock = threading.Lock()
        self._socks: List[socket.socket] = []
        self._listener: Optional[socket.socket] = None
        self._flowing = threading.Event()
        self._flowing.set()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                down, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                up = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                down.close()
                continue
            with self._lock:
                self._socks += [down, up]
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                self._flowing.wait()
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            sock.close()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self.thaw()
        self.cut()


@pytest.fixture
def link() -> Iterator[ZooKeeperLink]:
    proxy = ZooKeeperLink(int(ZK.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()


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
    link, cfg, appkey, providers, zk
):
    svc = providers("a", config=on(cfg, link.hosts, session_timeout=2.0))
    session = svc._registry.client
    link.cut()
    wait_until(lambda: not session.connected, 10, "the provider to see ZooKeeper gone")
    wait_until(lambda: not zk.exists(svc.znode_path), 10, "its session to expire")
    threading.Event().wait(30)  # the outage: kazoo's default retry has backed off to ~13-25 s by now
    link.restore()
    back = time.monotonic()
    wait_until(lambda: owned_by(zk, svc.znode_path, session), 40, "the node under a live session")
    elapsed = time.monotonic() - back
    print("registered again %.2f s after ZooKeeper was reachable again" % elapsed)
    assert elapsed < 2.0


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


@pytest.mark.parametrize("shared", [True, False], ids=["session-shared-with-a-consumer", "session-of-its-own"])
def test_stop_during_a_short_disconnect_deletes_the_node_once_zookeeper_is_back(
    link, cfg, appkey, providers, zk, shared
):
    own = on(cfg, link.hosts, session_timeout=10.0)  # the disconnect is shorter than the session
    svc = providers("a", config=own)
    consumer = build_client(IDL, appkey, "Calculator", config=own, empty_grace=0) if shared else None
    session = svc._registry.client
    session_id = session.client_id
    try:
        link.cut()
        wait_until(lambda: not session.connected, 10, "the provider to see ZooKeeper gone")
        began = time.monotonic()
        svc.stop(timeout=2.0, drain=0)
        assert time.monotonic() - began < 2.5
        assert zk.exists(svc.znode_path)  # the server still holds the session and its node
        link.restore()
        back = time.monotonic()
        wait_until(lambda: not zk.exists(svc.znode_path), 5, "the stopped provider's node to go")
        print("stopped provider's node deleted %.2f s after ZooKeeper was reachable" % (time.monotonic() - back))
        if consumer is not None:
            assert consumer._registry.client.client_id == session_id  # the shared session lived on
            assert consumer.table.wait_for(lambda s: not s.all_nodes, 5)
    finally:
        if consumer is not None:
            consumer.close()


# -- C5: stop() and SIGTERM return in time whatever ZooKeeper does -----------------------------


@pytest.mark.parametrize("how", ["stop", "sigterm"])
def test_stop_returns_within_its_timeout_while_zookeeper_does_not_answer(link, cfg, appkey, providers, zk, how):
    svc = providers("a", config=on(cfg, link.hosts, session_timeout=10.0), stop_timeout=1.0)
    serving: Optional[threading.Thread] = None
    if how == "sigterm":
        serving = threading.Thread(target=svc.serve_forever)  # what start_service(block=True) runs
        serving.start()
    link.freeze()
    try:
        began = time.monotonic()
        if serving is None:
            svc.stop()
        else:
            svc._on_signal(signal.SIGTERM, None)  # what the main thread's SIGTERM handler does
            serving.join(5)
            assert not serving.is_alive()
        elapsed = time.monotonic() - began
        print("%s returned after %.2f s with ZooKeeper not answering" % (how, elapsed))
        assert elapsed < 1.5  # drain 0 + stop_timeout 1.0
        assert port_is_free(svc.port)  # the server did stop
    finally:
        link.thaw()
    wait_until(lambda: not zk.exists(svc.znode_path), 15, "the node to go once ZooKeeper answers")
    wait_until(lambda: svc.stopped, 15, "the rest of the stop to finish in the background")


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

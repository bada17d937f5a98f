"""Wires (transport and protocol) node by node: what a node's data says, what the table makes of
it, and a pool whose node changes its wire. A local listening socket, no server process."""

from __future__ import annotations

import logging
from typing import Tuple

import pytest
from local_listener import listening_socket  # noqa: F401 - the fixture "listener"
from thriftpy2.protocol import TCompactProtocol
from thriftpy2.transport import TCyFramedTransport

from thriftprobe.consumer.pool import ConnectionPool
from thriftprobe.consumer.table import NodeTable, Snapshot
from thriftprobe.consumer.wire import BUFFERED_BINARY, Wire, wire_of
from thriftprobe.node import Node

Address = Tuple[str, int]


def node(port: int, **extras: object) -> Node:
    return Node("127.0.0.1", port, extras=extras)


def test_a_node_without_the_keys_speaks_buffered_binary():
    assert wire_of(node(1)) is BUFFERED_BINARY
    assert wire_of(node(1, transport="buffered", protocol="binary")) is BUFFERED_BINARY


@pytest.mark.parametrize(("transport", "protocol"), [("framed", "compact"), ("framed", "binary"),
                                                     ("buffered", "compact")])
def test_each_known_pair_is_one_wire(transport, protocol):
    wire = wire_of(node(1, transport=transport, protocol=protocol))
    assert wire is not None and (wire.transport, wire.protocol) == (transport, protocol)
    assert wire is wire_of(Node.from_json(node(2, transport=transport, protocol=protocol).to_json()))
    assert str(wire) == "%s/%s" % (transport, protocol)


@pytest.mark.parametrize("extras", [{"transport": "zlib"}, {"protocol": "json"}, {"transport": "Framed"},
                                    {"protocol": ["compact"]}, {"transport": None}, {"protocol": 1}])
def test_anything_else_is_no_wire(extras):
    assert wire_of(node(1, **extras)) is None


def test_the_snapshot_leaves_nodes_of_unknown_wires_out_of_the_pick():
    snap = Snapshot({"a": node(1), "b": node(2, transport="zlib"), "c": node(3, transport="framed")})
    assert [n.port for n in snap.available] == [1, 3]
    assert snap.total == 20
    assert [n.port for n in snap.unspoken] == [2]
    assert set(snap.wires) == {("127.0.0.1", 1), ("127.0.0.1", 3)}


def test_the_table_warns_once_per_node_and_again_only_when_it_says_something_new(caplog):
    caplog.set_level(logging.WARNING, logger="thriftprobe.consumer.table")
    table = NodeTable(label="t")
    table.upsert("a", node(1, transport="zlib"))
    table.upsert("b", node(2))
    table.upsert("a", Node("127.0.0.1", 1, weight=20, extras={"transport": "zlib"}))  # same wire, new weight
    table.upsert("c", node(3))
    assert len(caplog.records) == 1 and "127.0.0.1:1" in caplog.records[0].getMessage()
    table.upsert("a", node(1, transport="zlib2"))
    assert len(caplog.records) == 2
    table.upsert("a", node(1, transport="framed"))  # spoken now: no warning
    table.upsert("a", node(1, transport="zlib2"))  # back to unknown: logged again
    assert len(caplog.records) == 3




FRAMED_COMPACT = wire_of(node(1, transport="framed", protocol="compact"))


def test_connections_are_opened_in_the_wire_asked_for(listener):
    pool = ConnectionPool(connect_timeout_ms=1000, socket_timeout_ms=1000)
    assert FRAMED_COMPACT is not None
    conn = pool.acquire(listener, wire=FRAMED_COMPACT)
    assert conn.wire is FRAMED_COMPACT
    assert isinstance(conn.protocol, TCompactProtocol) and isinstance(conn.protocol.trans, TCyFramedTransport)
    assert conn.drop_unsent()  # the framed transport can forget an unsent request too
    pool.release(conn)
    assert pool.acquire(listener, wire=FRAMED_COMPACT) is conn
    pool.close()


def test_idle_connections_of_the_nodes_old_wire_are_closed_not_lent(listener):
    current: dict = {}
    pool = ConnectionPool(connect_timeout_ms=1000, socket_timeout_ms=1000, wires=current)
    old = pool.acquire(listener)  # no opinion: buffered binary
    pool.release(old)
    current[listener] = FRAMED_COMPACT
    new = pool.acquire(listener)  # the node's wire now
    assert new is not old and new.wire is FRAMED_COMPACT and old.tsocket.sock is None
    assert pool.idle_count(listener) == 0
    pool.release(new)
    assert pool.idle_count(listener) == 1
    pool.close()


def test_a_connection_of_the_old_wire_coming_back_from_a_call_is_not_kept(listener):
    current: dict = {}
    pool = ConnectionPool(connect_timeout_ms=1000, socket_timeout_ms=1000, wires=current)
    old, older = pool.acquire(listener), pool.acquire(listener)  # out on calls
    current[listener] = FRAMED_COMPACT
    new = pool.acquire(listener)
    pool.release(new)
    pool.release(old)  # the list speaks framed/compact, so does the node: closed
    assert old.tsocket.sock is None and list(pool._idle[listener]) == [new]
    del current[listener]  # no opinion (the node left the table meanwhile, say)
    pool.release(older)  # no word on the node's wire: the list stays, the newcomer is not mixed into it
    assert older.tsocket.sock is None and list(pool._idle[listener]) == [new]
    pool.close()


def test_a_returning_connection_of_the_current_wire_replaces_a_list_of_the_old_one(listener):
    current: dict = {}
    pool = ConnectionPool(connect_timeout_ms=1000, socket_timeout_ms=1000, wires=current)
    new = pool.acquire(listener, wire=FRAMED_COMPACT)  # opened for the new wire
    old = pool.acquire(listener)
    pool.release(old)  # the node's wire unknown to the pool yet: kept
    current[listener] = FRAMED_COMPACT
    pool.release(new)
    assert old.tsocket.sock is None and list(pool._idle[listener]) == [new]
    pool.close()


def test_the_wire_is_given_to_the_child_pool_after_fork(listener):
    pool = ConnectionPool(connect_timeout_ms=1000, socket_timeout_ms=1000, wires={listener: FRAMED_COMPACT})
    child = pool.abandon_after_fork()
    assert child.acquire(listener).wire is FRAMED_COMPACT
    pool.close()
    child.close()


def test_wires_compare_by_names():
    assert Wire("framed", "compact", None, None) == FRAMED_COMPACT  # type: ignore[arg-type]

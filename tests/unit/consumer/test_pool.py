"""ConnectionPool against a local listening socket (no server process): idle age, removal races."""

import socket
import threading
import time

import pytest
from local_listener import listening_socket  # noqa: F401 - the fixture "listener"
from thriftpy2.transport import TTransportException

from thriftprobe.consumer.pool import ConnectionPool


def test_a_connection_idle_for_longer_than_max_idle_age_is_replaced_not_lent(listener):
    pool = ConnectionPool(connect_timeout_ms=1000, socket_timeout_ms=1000, max_idle_age=60.0)
    first = pool.acquire(listener)
    pool.release(first)
    assert pool.acquire(listener) is first  # young: lent again
    pool.release(first)
    first.idle_since -= 61.0  # as if a NAT had had a minute to forget it
    second = pool.acquire(listener)
    assert second is not first
    assert first.tsocket.sock is None  # closed, not leaked
    pool.release(second)
    pool.close()


def test_expired_idle_connections_are_closed_when_another_is_returned(listener):
    pool = ConnectionPool(connect_timeout_ms=1000, socket_timeout_ms=1000, max_idle_age=60.0)
    old, young = pool.acquire(listener), pool.acquire(listener)
    pool.release(old)
    old.idle_since -= 120.0
    pool.release(young)
    assert pool.idle_count(listener) == 1 and old.tsocket.sock is None
    pool.close()


def test_release_racing_the_nodes_removal_leaves_no_idle_socket_or_entry(listener):
    pool = ConnectionPool(connect_timeout_ms=1000, socket_timeout_ms=1000)
    in_table = {listener}
    conn = pool.acquire(listener)
    remover = threading.Thread(target=lambda: (in_table.discard(listener), pool.drop(listener)))

    def keep(address):
        # The node leaves the table right after release() looked: the table's removal listener
        # (drop) runs while release() is still on its way to store the connection.
        ok = address in in_table
        remover.start()
        remover.join(0.3)  # returns at once unless drop() has to wait for release()
        return ok

    pool.set_keep(keep)
    pool.release(conn)
    remover.join(5)
    assert listener not in pool._idle
    assert conn.tsocket.sock is None
    pool.close()


def test_a_request_that_never_reached_the_socket_can_be_dropped_from_the_buffer(listener):
    pool = ConnectionPool(connect_timeout_ms=1000, socket_timeout_ms=1000)
    conn = pool.acquire(listener)
    conn.protocol.trans.write(b"half a request")
    assert conn.written == 0 and conn.drop_unsent()
    conn.protocol.trans.flush()
    assert conn.written == 0  # nothing of the dropped request was sent
    conn.protocol.trans.write(b"x" * 3000)
    conn.protocol.trans.write(b"y" * 3000)  # does not fit in the buffer: the first part is written through
    assert conn.written > 0
    pool.discard(conn)


def test_connect_is_bounded_by_the_calls_deadline():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname())  # the accept queue is full: SYNs are dropped
    try:
        pool = ConnectionPool(connect_timeout_ms=3000, socket_timeout_ms=3000)
        began = time.monotonic()
        with pytest.raises(TTransportException):
            pool.acquire(srv.getsockname(), deadline=time.monotonic() + 0.2)
        assert time.monotonic() - began < 1.0
    finally:
        filler.close()
        srv.close()

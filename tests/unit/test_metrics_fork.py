"""Review of issue 12: a forked child serves its own /metrics endpoint (it inherits the parent's
table, not its HTTP thread), and explain()'s in-flight counts stay exact with readers racing."""

from __future__ import annotations

import os
import sys
import threading
import urllib.request

import pytest

from thriftprobe import metrics
from thriftprobe.consumer.presence import InFlight


def test_a_forked_child_gets_an_endpoint_of_its_own():
    parent = metrics.acquire_endpoint(0, "127.0.0.1")
    try:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its endpoint must be one it serves itself
            try:
                mine = metrics.acquire_endpoint(0, "127.0.0.1")
                body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % mine.port, timeout=5).read()
                os.write(write_fd, b"%d %d" % (mine.port, len(body) > 0))
                mine.release()
            finally:
                os._exit(0)
        os.close(write_fd)
        child_port, served = map(int, os.read(read_fd, 100).split())
        os.close(read_fd)
        os.waitpid(pid, 0)
        assert child_port != parent.port and served == 1
    finally:
        parent.release()


def test_in_flight_counts_stay_exact_with_two_readers():
    flights = InFlight()
    address = ("127.0.0.1", 1)
    done = flights.start(address)  # one call in flight throughout
    seen = set()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the readers as much as possible
    try:
        def read():
            for _ in range(20000):
                seen.add(flights.count(address))

        readers = [threading.Thread(target=read) for _ in range(2)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
    finally:
        sys.setswitchinterval(old)
    next(done)
    assert seen == {1}
    assert flights.count(address) == 0


@pytest.mark.skipif(not metrics.available(), reason="needs prometheus_client")
def test_endpoint_shared_within_one_process():
    a = metrics.acquire_endpoint(0, "127.0.0.1")
    b = metrics.acquire_endpoint(0, "127.0.0.1")
    try:
        assert a.port == b.port
    finally:
        a.release()
        b.release()

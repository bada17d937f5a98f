"""CacheWriter: what the node cache file says about its age (real files, a stand-in registry)."""

from __future__ import annotations

import time
from typing import Optional

import pytest

from thriftprobe.consumer.cache import CacheWriter, TableCache
from thriftprobe.errors import ThriftProbeError
from thriftprobe.node import Node


def test_the_cache_is_as_old_as_zookeepers_last_confirmation_not_its_last_write(tmp_path):
    cache = TableCache(tmp_path / "nodes.json", "test", "a.b", "Calculator")
    lost_at: Optional[float] = time.time() - 100  # the session dropped 100 s ago
    writer = CacheWriter(cache, label="t", refresh=1.0)
    writer.changed({"n": Node("h", 1)})
    writer.start(lambda: lost_at, write_now=True)
    writer.changed({"n": Node("h", 2)})  # a change while disconnected (a grace timer's removal...)
    writer.close()
    with pytest.raises(ThriftProbeError, match="100 s old"):
        cache.load(max_age=50)
    nodes, age = cache.load(max_age=200)
    assert [n.port for n in nodes.values()] == [2] and 99 <= age <= 102


def test_a_client_started_from_the_cache_keeps_its_age(tmp_path):
    cache = TableCache(tmp_path / "nodes.json", "test", "a.b", "Calculator")
    writer = CacheWriter(cache, label="t", refresh=1.0, confirmed_at=time.time() - 30)
    writer.changed({"n": Node("h", 1)})
    writer.start(lambda: None, write_now=True)  # no registry yet
    writer.close()
    _, age = cache.load(max_age=3600)
    assert 29 <= age <= 32

"""NodeTable's empty-list protection and removal events (pure logic, real timers)."""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Tuple

from thriftprobe.consumer.table import NodeTable
from thriftprobe.node import Node


def test_a_held_node_returning_with_another_address_removes_the_old_address():
    t = NodeTable(empty_grace=5.0)
    removed: List[Tuple[str, int]] = []
    t.on_remove(lambda n: removed.append(n.address))
    t.upsert("x", Node("10.0.0.1", 9000))
    t.remove("x")  # the last node: held
    assert removed == []
    t.upsert("x", Node("10.0.0.2", 9000))  # back under the same name, at another address
    assert removed == [("10.0.0.1", 9000)]
    assert [n.address for n in t.snapshot.all_nodes] == [("10.0.0.2", 9000)]
    t.close()


def test_a_node_held_during_an_earlier_hold_gets_the_full_grace():
    grace = 0.6
    t = NodeTable(empty_grace=grace)
    removed_at: Dict[int, float] = {}
    both = threading.Event()

    def on_remove(node: Node) -> None:
        removed_at[node.port] = time.monotonic()
        if len(removed_at) == 2:
            both.set()

    t.on_remove(on_remove)
    t.upsert("a", Node("h", 1))
    t.remove("a")  # held, grace running
    held_a = time.monotonic()
    time.sleep(grace / 2)  # the scenario: part of a's grace passes
    t.upsert("b", Node("h", 2))
    t.remove("b")  # the table is empty again: b is held too
    held_b = time.monotonic()
    assert sorted(n.port for n in t.snapshot.all_nodes) == [1, 2]
    assert both.wait(5 * grace)
    assert removed_at[1] - held_a >= grace - 0.02
    assert removed_at[2] - held_b >= grace - 0.02, "b was held %.2f s, not the full %.2f s" % (
        removed_at[2] - held_b, grace)
    assert t.snapshot.all_nodes == ()
    t.close()

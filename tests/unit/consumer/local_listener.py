"""The consumer unit tests' listening-socket fixture (a module of its own: a second conftest.py would
shadow tests/integration/conftest.py, which tests import by the name ``conftest``)."""

from __future__ import annotations

import socket
import threading
from typing import Iterator, List, Tuple

import pytest


@pytest.fixture(name="listener")
def listening_socket() -> Iterator[Tuple[str, int]]:
    """A local listening socket that accepts every connection (no server process); its address."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    accepted: List[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()
    stop.set()
    thread.join(5)
    srv.close()
    for conn in accepted:
        conn.close()

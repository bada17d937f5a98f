"""Providers that are not thriftprobe, for the consumer's wire and overload tests: a plain
thriftpy2 server speaking any transport and protocol, an Apache Thrift TNonblockingServer (framed),
and a znode written by hand for each, as a provider of another stack would register."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import types
from typing import Any, Dict, List, Optional

from kazoo.client import KazooClient
from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.thrift import TProcessor
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory, TSocket, TTransportException

WIRES = [("buffered", "binary"), ("buffered", "compact"), ("framed", "binary"), ("framed", "compact")]
_TRANSPORTS = {"buffered": TBufferedTransportFactory(), "framed": TFramedTransportFactory()}
_PROTOCOLS = {"binary": TBinaryProtocolFactory(), "compact": TCompactProtocolFactory()}


def register(
    zk: KazooClient,
    appkey: str,
    port: int,
    transport: Optional[str] = None,
    protocol: Optional[str] = None,
    *,
    service: str = "Calculator",
    weight: int = 10,
    env: str = "test",
    **extra: Any,
) -> str:
    """Advertise 127.0.0.1:port as a node of ``service``: an ephemeral znode holding the node's
    JSON, with ``transport`` and ``protocol`` when given (none: a node of the original design)."""
    data: Dict[str, Any] = {"host": "127.0.0.1", "port": port, "weight": weight, "valid": 1, **extra}
    if transport is not None:
        data["transport"] = transport
    if protocol is not None:
        data["protocol"] = protocol
    path = "/services/%s/%s/%s_127.0.0.1_%d" % (env, appkey, service, port)
    zk.create(path, json.dumps(data).encode("utf-8"), ephemeral=True, makepath=True)
    return path


class WireServer:
    """A thriftpy2 TProcessor served on a thread per connection over ``transport`` and
    ``protocol``. Counts the connections it accepted; ``stop()`` closes the listener and every
    connection, so a restart on the same port starts from nothing."""

    def __init__(
        self, service: types.ModuleType, handler: object, transport: str = "buffered", protocol: str = "binary",
        port: int = 0,
    ) -> None:
        self.transport, self.protocol = transport, protocol
        self._processor = TProcessor(service, handler)
        self._trans = _TRANSPORTS[transport]
        self._proto = _PROTOCOLS[protocol]
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self._conns: List[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="wire-server-%d" % self.port, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                if self._stopped:
                    conn.close()
                    return
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        tsock = TSocket(sock=conn)  # type: ignore[no-untyped-call]
        trans = self._trans.get_transport(tsock)
        proto = self._proto.get_protocol(trans)
        try:
            while True:
                self._processor.process(proto, proto)
        except (TTransportException, OSError, EOFError):
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            conns, self._conns = self._conns, []
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._thread.join(5)




class ApacheNonblocking:
    """Apache Thrift's TNonblockingServer (framed, by design) for the generated ``service``, on a
    thread of its own, speaking ``protocol`` (binary or compact)."""

    def __init__(self, service: Any, handler: object, protocol: str = "binary") -> None:
        from thrift.protocol import TBinaryProtocol, TCompactProtocol
        from thrift.server.TNonblockingServer import TNonblockingServer
        from thrift.transport.TSocket import TServerSocket

        factory = (TBinaryProtocol.TBinaryProtocolFactory() if protocol == "binary"
                   else TCompactProtocol.TCompactProtocolFactory())
        self._lsock = TServerSocket(host="127.0.0.1", port=0)
        self.server = TNonblockingServer(service.Processor(handler), self._lsock, factory, factory, threads=4)
        self.server.prepare()  # listens
        self.port: int = self._lsock.handle.getsockname()[1]
        self._thread = threading.Thread(target=self.server.serve, name="apache-nonblocking", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.stop()
        self._thread.join(5)
        self.server.close()
        for connection in list(self.server.clients.values()):
            connection.close()

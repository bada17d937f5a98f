"""How bytes travel to one node: its transport and protocol, as its znode advertises them.

A provider's znode carries ``transport`` (``"buffered"`` or ``"framed"``) and ``protocol``
(``"binary"`` or ``"compact"``); nodes written by the original design lack both keys and speak
buffered binary. Apache Thrift's THsHaServer and TNonblockingServer (any language) need framed.
A consumer opens each node's connections with that node's pair; a node advertising anything else
cannot be spoken to, so it takes no calls (the table logs it once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.protocol.base import TProtocolFactory
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory
from thriftpy2.transport.base import TTransportFactory

from ..node import Node

__all__ = ["BUFFERED_BINARY", "PROTOCOLS", "TRANSPORTS", "Wire", "advertised", "wire_of"]

DEFAULT_TRANSPORT = "buffered"
DEFAULT_PROTOCOL = "binary"

# thriftpy2's transport factories (and its binary protocol's) are the compiled ones when it was
# built with Cython; its compact protocol exists in pure Python only.
TRANSPORTS: Dict[str, TTransportFactory] = {
    "buffered": TBufferedTransportFactory(),
    "framed": TFramedTransportFactory(),
}
PROTOCOLS: Dict[str, TProtocolFactory] = {
    "binary": TBinaryProtocolFactory(),
    "compact": TCompactProtocolFactory(),
}


@dataclass(frozen=True)
class Wire:
    """A transport and a protocol by name, with the factories that make them. There is one
    instance per pair (``wire_of`` hands them out), so ``is`` compares two wires."""

    transport: str
    protocol: str
    transport_factory: TTransportFactory = field(compare=False, repr=False)
    protocol_factory: TProtocolFactory = field(compare=False, repr=False)

    def __str__(self) -> str:
        return "%s/%s" % (self.transport, self.protocol)


_WIRES: Dict[Tuple[str, str], Wire] = {
    (t, p): Wire(t, p, TRANSPORTS[t], PROTOCOLS[p]) for t in TRANSPORTS for p in PROTOCOLS
}
BUFFERED_BINARY = _WIRES[(DEFAULT_TRANSPORT, DEFAULT_PROTOCOL)]


def advertised(node: Node) -> Tuple[Any, Any]:
    """The node's ``transport`` and ``protocol`` values as written (the defaults when absent)."""
    extras = node.extras
    return extras.get("transport", DEFAULT_TRANSPORT), extras.get("protocol", DEFAULT_PROTOCOL)


def wire_of(node: Node) -> Optional[Wire]:
    """The wire to open the node's connections with, or None when it advertises a transport or
    protocol this consumer does not speak (such a node can take no calls)."""
    try:
        return _WIRES.get(advertised(node))
    except TypeError:  # an unhashable value (a list, an object): not a name we know either
        return None

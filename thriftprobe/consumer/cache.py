"""The last known table of a service on local disk, for a consumer that starts while ZooKeeper
is unreachable.

The file is rewritten (atomically: a temporary file, then rename) whenever the table changes.
It is read only when ZooKeeper cannot be reached at start, and only if it is younger than
``max_age`` seconds: that bounds how stale the nodes a consumer starts with can be. Once
ZooKeeper answers, the live registry replaces the cached nodes within milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Dict, Tuple, Union

from ..errors import ThriftProbeError
from ..node import Node

__all__ = ["TableCache"]

log = logging.getLogger(__name__)

_FORMAT = 1


class TableCache:
    """One service's cache file. ``save`` is called under the table's lock, so calls are serial."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], env: str, appkey: str, service: str) -> None:
        self.path = os.fspath(path)
        self._key = {"env": env, "appkey": appkey, "service": service}

    def save(self, nodes: Dict[str, Node]) -> None:
        payload = dict(self._key, format=_FORMAT, written_at=time.time(),
                       nodes={name: node.to_dict() for name, node in nodes.items()})
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".thriftprobe-", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(payload, fh)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as err:  # a cache that cannot be written must not break the client
            log.warning("cannot write the node cache %s: %s", self.path, err)

    def load(self, max_age: float) -> Tuple[Dict[str, Node], float]:
        """The cached nodes and their age in seconds. Raises ThriftProbeError when the file is
        missing, unreadable, for another service, or older than ``max_age``."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                payload = json.load(fh)
        except (OSError, ValueError) as err:
            raise ThriftProbeError("node cache %s is not usable: %s" % (self.path, err)) from err
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT or any(
            payload.get(k) != v for k, v in self._key.items()
        ):
            raise ThriftProbeError("node cache %s is not for %s" % (self.path, "/".join(self._key.values())))
        try:
            age = time.time() - float(payload["written_at"])
            entries = dict(payload["nodes"])
        except (KeyError, TypeError, ValueError) as err:
            raise ThriftProbeError("node cache %s is malformed: %s" % (self.path, err)) from err
        if age > max_age:
            raise ThriftProbeError("node cache %s is %.0f s old (limit %.0f s)" % (self.path, age, max_age))
        nodes = {}
        for name, data in entries.items():
            try:
                nodes[str(name)] = Node.from_dict(data)
            except (ValueError, TypeError) as err:
                log.warning("skipping cached node %s in %s: %s", name, self.path, err)
        return nodes, age


"""The consumer wing: ``build_client`` and the ``ProbeClient`` it returns, and what a call goes
through: the node ``table`` the registry keeps current, the ``balancer`` that picks a node, the
connection ``pool`` (each node's connections in its ``wire``: transport and protocol), ``health``
(outlier ejection, active checks), ``retry`` and the node ``cache``."""

from .client import ProbeClient, build_client

__all__ = ["ProbeClient", "build_client"]

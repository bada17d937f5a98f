"""thriftprobe: service discovery, weighted balancing and live governance for thriftpy2 services.

Providers call ``start_service``; consumers call ``build_client``. Everything else is detail.

The package has wings over a shared vocabulary (``errors``, ``config``, ``node``, ``idl``):
``registry`` and ``stores`` below, ``provider`` and ``consumer`` above them, and ``admin`` (the
operators' tools) on top. Importing the package loads no part of ``admin``.
"""

from ._version import __version__
from .config import Config
from .consumer import ProbeClient, build_client
from .consumer.balancer import Balancer, ConsistentHash, LeastLoaded, RoundRobin, WeightedRandom
from .consumer.health import OutlierDetector
from .consumer.retry import Retry, RetryBudget
from .errors import (
    AppkeyNotRegistered,
    BackendError,
    ConfigError,
    IdlError,
    InvalidArgument,
    NoAvailableNode,
    Overloaded,
    SettingsError,
    ThriftProbeError,
)
from .provider import RunningService, start_service

__all__ = [
    "AppkeyNotRegistered",
    "BackendError",
    "Balancer",
    "Config",
    "ConfigError",
    "ConsistentHash",
    "IdlError",
    "InvalidArgument",
    "LeastLoaded",
    "NoAvailableNode",
    "OutlierDetector",
    "Overloaded",
    "ProbeClient",
    "Retry",
    "RetryBudget",
    "RoundRobin",
    "RunningService",
    "SettingsError",
    "ThriftProbeError",
    "WeightedRandom",
    "__version__",
    "build_client",
    "start_service",
]

"""thriftprobe: service discovery, weighted balancing and live governance for thriftpy2 services.

Providers call ``start_service``; consumers call ``build_client``. Everything else is detail.
"""

__version__ = "0.1.0"

from .client import ProbeClient, build_client  # noqa: E402
from .config import Config  # noqa: E402
from .errors import (  # noqa: E402
    AppkeyNotRegistered,
    BackendError,
    ConfigError,
    IdlError,
    InvalidArgument,
    NoAvailableNode,
    SettingsError,
    ThriftProbeError,
)
from .health import OutlierDetector  # noqa: E402
from .retry import Retry, RetryBudget  # noqa: E402
from .server import RunningService, start_service  # noqa: E402

__all__ = [
    "__version__",
    "start_service",
    "build_client",
    "RunningService",
    "ProbeClient",
    "Config",
    "Retry",
    "RetryBudget",
    "OutlierDetector",
    "ThriftProbeError",
    "ConfigError",
    "InvalidArgument",
    "IdlError",
    "AppkeyNotRegistered",
    "BackendError",
    "SettingsError",
    "NoAvailableNode",
]

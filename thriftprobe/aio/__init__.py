"""asyncio: ``client = await thriftprobe.aio.build_client(...)`` and ``await thriftprobe.aio.start_service(...)``."""

from .client import AioProbeClient, build_client
from .pool import PoolExhausted
from .service import AioRunningService, start_service

__all__ = ["AioProbeClient", "AioRunningService", "PoolExhausted", "build_client", "start_service"]

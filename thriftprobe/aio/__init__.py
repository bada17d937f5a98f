"""The asyncio twins of the consumer: ``client = await thriftprobe.aio.build_client(...)``."""

from .client import AioProbeClient, build_client

__all__ = ["AioProbeClient", "build_client"]

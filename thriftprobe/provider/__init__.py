"""The provider wing: ``start_service`` (``service``) checks the appkey, merges the node's
settings, starts the ``server`` core and registers the node; ``RunningService`` stops it."""

from .service import RunningService, start_service

__all__ = ["RunningService", "start_service"]

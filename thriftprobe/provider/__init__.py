"""The provider wing: ``start_service`` (``service``) checks the appkey, merges the node's
settings, starts the ``server`` core and registers the node; ``RunningService`` stops it;
``ServerHooks`` (``hooks``) is what the server reports about requests and connections."""

from .hooks import ServerHooks
from .service import RunningService, start_service

__all__ = ["RunningService", "ServerHooks", "start_service"]

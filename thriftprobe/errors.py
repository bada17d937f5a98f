"""The exceptions thriftprobe raises: one base class, one subclass per cause a caller handles differently."""

from __future__ import annotations

LOADSHEDDING = 11
"""The ``TApplicationException`` type of a provider's "not executed" reply (fbthrift's name and
number): it was overloaded or over a limit and did not run the handler, so the call is safe to
send to another node, idempotent or not."""

__all__ = [
    "LOADSHEDDING",
    "AppkeyNotRegistered",
    "BackendError",
    "ConcurrentChange",
    "ConfigError",
    "IdlError",
    "InvalidArgument",
    "NoAvailableNode",
    "Overloaded",
    "SettingsError",
    "ThriftProbeError",
]


class ThriftProbeError(Exception):
    """Base class of every error raised by thriftprobe itself."""


class ConfigError(ThriftProbeError):
    """The configuration file is missing, unreadable, or lacks a section or key."""


class InvalidArgument(ThriftProbeError, ValueError):
    """An argument passed to the API is malformed (bad service name, appkey, handler...)."""


class IdlError(ThriftProbeError):
    """The Thrift IDL file cannot be loaded or does not define the requested service."""


class AppkeyNotRegistered(ThriftProbeError):
    """The appkey is not registered in the MySQL table ``serviceapp``."""


class BackendError(ThriftProbeError):
    """MySQL, Redis or ZooKeeper could not be reached or refused an operation."""


class ConcurrentChange(ThriftProbeError):
    """A compare-and-set found the stored value changed since it was read (another operator's
    change landed in between): nothing was written; read it again and make the change on top."""


class SettingsError(ThriftProbeError):
    """A node's stored settings in Redis are corrupt; they are never silently replaced by defaults."""


class NoAvailableNode(ThriftProbeError):
    """No registered, valid node of the service could take the call (nothing was sent)."""


class Overloaded(NoAvailableNode):
    """Every node tried answered "not executed" (``LOADSHEDDING``: overloaded, or over a limit),
    or the retry budget allowed no further try: the handler never ran anywhere. A subclass of
    NoAvailableNode, since no node could take the call."""

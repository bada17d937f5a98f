"""Find and load the YAML configuration, pick the environment, return frozen settings.

Lookup order for the file: the explicit ``config=`` argument, then the ``THRIFTPROBE_CONFIG``
environment variable, then ``./config/config.yml``. The environment is the explicit ``env=``
argument, then ``THRIFTPROBE_ENV``, then ``prod`` when the short hostname matches ``^prod\\d+$``,
else ``dev``.

Every string value may be written ``${NAME}`` to take it from the environment variable NAME at
load time (for passwords that must not live in the file). Everything returned is immutable and
may be shared freely between threads.

The optional section ``client.<env>`` holds what clients of the environment share; today one
key, ``caller``: the appkey of the application making the calls, which every client registers
as (``build_client(..., caller=)`` wins over it)::

    client:
      prod: {caller: web-frontend}
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .errors import ConfigError, InvalidArgument
from .node import validate_appkey

__all__ = [
    "TLS_MODES",
    "ClientConfig",
    "Config",
    "ConsoleConfig",
    "MysqlConfig",
    "ProviderConfig",
    "RedisConfig",
    "TlsConfig",
    "ZooKeeperConfig",
    "find_config_path",
    "load",
    "load_console",
    "resolve",
    "resolve_env",
]

CONFIG_ENV_VAR = "THRIFTPROBE_CONFIG"
ENV_ENV_VAR = "THRIFTPROBE_ENV"
DEFAULT_PATH = Path("config") / "config.yml"

# Matched with fullmatch: with re.match, "$" also matches before a final newline.
_NAME_RE = re.compile(r"\w+")
_PROD_HOST_RE = re.compile(r"prod[0-9]+")
_VAR_RE = re.compile(r"\$\{(\w+)\}")
_DIGITS_RE = re.compile(r"[0-9]+")  # str.isdigit() also accepts "²", which int() refuses


TLS_MODES = ("disabled", "required", "verify_ca", "verify_identity")


@dataclass(frozen=True)
class TlsConfig:
    """How one backend's connections are secured (keys ``ssl_mode``, ``ssl_ca``, ``ssl_cert``,
    ``ssl_key``, ``ssl_key_password`` of its section). No mode ever falls back to plaintext:

    - ``disabled``: plaintext (the default);
    - ``required``: TLS or no connection; the server's certificate is not checked, which protects
      against listening, not against an impostor;
    - ``verify_ca``: also checks the certificate chain against ``ca`` (else the system's CAs);
    - ``verify_identity``: also checks that the certificate names the host connected to.
    """

    mode: str = "disabled"
    ca: Optional[str] = None
    cert: Optional[str] = None
    """Client certificate (PEM), for servers that authenticate clients by certificate."""
    key: Optional[str] = None
    """The client certificate's private key (PEM); may be in ``cert``'s file instead."""
    key_password: Optional[str] = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    @property
    def verify_cert(self) -> bool:
        return self.mode in ("verify_ca", "verify_identity")

    @property
    def check_hostname(self) -> bool:
        return self.mode == "verify_identity"

    def describe(self) -> str:
        return "" if not self.enabled else " (TLS %s)" % self.mode


_PLAINTEXT = TlsConfig()


@dataclass(frozen=True)
class MysqlConfig:
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    database: str
    tls: TlsConfig = _PLAINTEXT
    connect_timeout: float = 2.0

    def describe(self) -> str:
        return "mysql %s:%d/%s%s" % (self.host, self.port, self.database, self.tls.describe())


@dataclass(frozen=True)
class RedisConfig:
    host: str
    port: int
    password: Optional[str] = field(repr=False)
    cluster: bool = False
    socket_timeout: float = 2.0
    tls: TlsConfig = _PLAINTEXT

    def describe(self) -> str:
        return "redis%s %s:%d%s" % (" cluster" if self.cluster else "", self.host, self.port, self.tls.describe())


@dataclass(frozen=True)
class ZooKeeperConfig:
    hosts: str
    """A kazoo connection string: ``host:port[,host:port...][/chroot]``."""
    session_timeout: float = 10.0
    """Seconds; how long a dead provider's ephemeral node outlives it."""
    connect_timeout: float = 5.0
    """Seconds to wait for the first connection."""
    tls: TlsConfig = _PLAINTEXT

    def describe(self) -> str:
        return "zookeeper %s%s" % (self.hosts, self.tls.describe())


@dataclass(frozen=True)
class ConsoleConfig:
    """Who may use the web console. Optional: without it the console refuses to start."""

    username: str
    password: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 8700


@dataclass(frozen=True)
class ProviderConfig:
    """Optional section ``provider.<env>``: the server limits of every provider of the
    environment, with the names and units of ``start_service``'s arguments (seconds, bytes).
    ``start_service``'s own arguments win; what neither sets takes the server's defaults."""

    workers: Optional[int] = None
    queue_size: Optional[int] = None
    max_connections: Optional[int] = None
    max_message_size: Optional[int] = None
    read_timeout: Optional[float] = None
    idle_timeout: Optional[float] = None
    transport: Optional[str] = None
    protocol: Optional[str] = None
    metrics_port: Optional[int] = None
    """Serve ``/metrics`` on this port (0: the OS picks); unset: no endpoint."""
    warmup: Optional[float] = None
    """Seconds over which consumers ramp a new node's weight up (default 600; 0: none)."""

    def set_values(self) -> Dict[str, Any]:
        """The server limits the file set, with their values (``metrics_port`` and ``warmup``
        are not ones)."""
        return {k: v for k, v in self.__dict__.items() if v is not None and k not in ("metrics_port", "warmup")}


@dataclass(frozen=True)
class ClientConfig:
    """Optional section ``client.<env>``: defaults of every client of the environment."""

    caller: Optional[str] = None
    """The calling application's appkey, registered with each client's consumer entry."""


_PROVIDER_KEYS: Tuple[Tuple[str, type], ...] = (
    ("workers", int), ("queue_size", int), ("max_connections", int), ("max_message_size", int),
    ("read_timeout", float), ("idle_timeout", float), ("transport", str), ("protocol", str),
    ("metrics_port", int), ("warmup", float),
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    """The settings of one environment, as read from one file."""

    path: str
    env: str
    mysql: MysqlConfig
    redis: RedisConfig
    zookeeper: ZooKeeperConfig
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    client: ClientConfig = field(default_factory=ClientConfig)


def resolve_env(
    explicit: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
    hostname: Optional[str] = None,
) -> str:
    """Return the environment name by the rules in the module docstring.

    Raises ConfigError for a name that is not ``^\\w+$`` (it becomes part of ZooKeeper paths and
    Redis keys).
    """
    environ = os.environ if environ is None else environ
    env = explicit or environ.get(ENV_ENV_VAR) or None
    if env is None:
        short = (hostname if hostname is not None else socket.gethostname()).split(".", 1)[0]
        env = "prod" if _PROD_HOST_RE.fullmatch(short) else "dev"
    if not _NAME_RE.fullmatch(env):
        raise ConfigError("environment name %r must match ^\\w+$" % (env,))
    return env


def find_config_path(
    explicit: Union[str, "os.PathLike[str]", None] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> Path:
    """Return the config file to read: explicit path > $THRIFTPROBE_CONFIG > ./config/config.yml."""
    environ = os.environ if environ is None else environ
    if explicit is not None:
        return Path(explicit)
    if environ.get(CONFIG_ENV_VAR):
        return Path(environ[CONFIG_ENV_VAR])
    return DEFAULT_PATH


def load(
    path: Union[str, "os.PathLike[str]", None] = None,
    env: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> Config:
    """Read the config file and return the frozen settings of one environment.

    Raises ConfigError naming the file and the key when the file, a section or a key is missing
    or has the wrong type.
    """
    environ = os.environ if environ is None else environ
    file = find_config_path(path, environ)
    env = resolve_env(env, environ)
    data = _read(file)
    reader = _Reader(str(file), env, environ)
    return Config(
        path=str(file),
        env=env,
        mysql=_mysql(reader, data),
        redis=_redis(reader, data),
        zookeeper=_zookeeper(reader, data),
        provider=_provider(reader, data),
        client=_client(reader, data),
    )


def load_console(cfg: Config, environ: Optional[Mapping[str, str]] = None) -> ConsoleConfig:
    """Read the ``console.<env>`` section of the file ``cfg`` came from.

    Kept apart from ``load`` so that providers and clients never depend on the console's
    credentials (a missing ``${VAR}`` there must not break them). Raises ConfigError.
    """
    environ = os.environ if environ is None else environ
    data = _read(Path(cfg.path))
    r = _Reader(cfg.path, cfg.env, environ)
    s = r.section(data, "console")
    r.only(s, "console", ("username", "password", "host", "port"))
    password = r.get(s, "console", "password", str)
    if not password:
        raise ConfigError("config file %s: console.%s.password must not be empty" % (cfg.path, cfg.env))
    return ConsoleConfig(
        username=r.get(s, "console", "username", str),
        password=password,
        host=r.get(s, "console", "host", str, "127.0.0.1"),
        port=r.port(s, "console") if "port" in s else 8700,
    )


def _read(file: Path) -> Dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError as err:
        raise ConfigError("config file %s not found (cwd %s)" % (file, os.getcwd())) from err
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError("cannot read config file %s: %s" % (file, err)) from err
    if not isinstance(data, dict):
        raise ConfigError("config file %s must hold a mapping at the top level" % file)
    return data


def resolve(config: Union[Config, str, "os.PathLike[str]", None], env: Optional[str] = None) -> Config:
    """Accept what the public API takes as ``config=``: a loaded Config, a path, or None."""
    if isinstance(config, Config):
        if env is not None and env != config.env:
            raise ConfigError("env=%r conflicts with the loaded config's env %r (%s)" % (env, config.env, config.path))
        return config
    return load(config, env)


class _Reader:
    """Typed access to ``section.<env>.key`` with errors that name file and key."""

    def __init__(self, path: str, env: str, environ: Mapping[str, str]) -> None:
        self.path = path
        self.env = env
        self.environ = environ

    def section(self, data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
        top = data.get(name)
        if not isinstance(top, dict):
            raise ConfigError("config file %s has no section %r" % (self.path, name))
        sect = top.get(self.env)
        if not isinstance(sect, dict):
            raise ConfigError(
                "config file %s has no key %s.%s (environments there: %s)"
                % (self.path, name, self.env, ", ".join(map(str, top)) or "none")
            )
        return sect

    def only(self, sect: Mapping[str, Any], section: str, known: Sequence[str]) -> None:
        """Refuse keys this version does not know: a misspelt ``ssl_mode`` must not mean plaintext."""
        unknown = sorted(str(k) for k in sect if k not in known)
        if unknown:
            raise ConfigError(
                "config file %s: unknown key%s %s in %s.%s (known: %s)"
                % (self.path, "s" if len(unknown) > 1 else "", ", ".join(unknown), section, self.env, ", ".join(known))
            )

    def get(self, sect: Mapping[str, Any], section: str, key: str, kind: type, default: Any = ...) -> Any:
        where = "%s.%s.%s" % (section, self.env, key)
        if key not in sect or sect[key] is None:
            if default is ...:
                raise ConfigError("config file %s has no key %s" % (self.path, where))
            return default
        value = sect[key]
        if isinstance(value, str):
            value = self._expand(value, where)
        if kind is bool:
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "0", "1"):
                return value.lower() in ("true", "yes", "1")
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and _DIGITS_RE.fullmatch(value):
                return int(value)
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif kind is str:
            if isinstance(value, str):
                return value
            # YAML reads 0123 as 83 and 0x1F as 31: a number here would silently be the wrong text.
            raise ConfigError(
                "config file %s: key %s must be a string; quote it (got %r)" % (self.path, where, value)
            )
        raise ConfigError("config file %s: key %s must be %s, got %r" % (self.path, where, kind.__name__, value))

    def port(self, sect: Mapping[str, Any], section: str, key: str = "port") -> int:
        port = self.get(sect, section, key, int)
        if not 0 < port < 65536:
            raise ConfigError(
                "config file %s: key %s.%s.%s must be a TCP port, got %d" % (self.path, section, self.env, key, port)
            )
        return int(port)

    def _expand(self, value: str, where: str) -> str:
        m = _VAR_RE.fullmatch(value)
        if not m:
            return value
        name = m.group(1)
        if name not in self.environ:
            raise ConfigError(
                "config file %s: key %s refers to environment variable %s, which is not set" % (self.path, where, name)
            )
        return self.environ[name]


_TLS_KEYS = ("ssl", "ssl_mode", "ssl_ca", "ssl_cert", "ssl_key", "ssl_key_password")


def _tls(r: _Reader, s: Mapping[str, Any], section: str) -> TlsConfig:
    def where(key: str) -> str:
        return "config file %s: %s.%s.%s" % (r.path, section, r.env, key)

    enabled = r.get(s, section, "ssl", bool, None)
    mode = r.get(s, section, "ssl_mode", str, None)
    if mode is None:
        # 'ssl: true' alone means what it says: secure transport, the certificate checked.
        mode = "verify_identity" if enabled else "disabled"
    elif mode not in TLS_MODES:
        raise ConfigError("%s must be one of %s, got %r" % (where("ssl_mode"), ", ".join(TLS_MODES), mode))
    elif enabled is not None and enabled != (mode != "disabled"):
        raise ConfigError("%s contradicts %s.%s.ssl_mode %s" % (where("ssl"), section, r.env, mode))
    files = {}
    for key in ("ssl_ca", "ssl_cert", "ssl_key"):
        path = r.get(s, section, key, str, None)
        if path is not None and not os.path.isfile(path):
            raise ConfigError("%s: file %s not found" % (where(key), path))
        files[key] = path
    key_password = r.get(s, section, "ssl_key_password", str, None)
    given = [k for k, v in (*files.items(), ("ssl_key_password", key_password)) if v is not None]
    if mode == "disabled" and given:
        raise ConfigError("%s is set, but TLS is disabled: set ssl_mode" % where(given[0]))
    if files["ssl_ca"] and mode == "required":
        raise ConfigError(
            "%s is only used to verify the server: set ssl_mode verify_ca or verify_identity" % where("ssl_ca")
        )
    if (files["ssl_key"] or key_password) and not files["ssl_cert"]:
        raise ConfigError("%s needs ssl_cert (the client certificate)" % where("ssl_key"))
    return TlsConfig(mode, files["ssl_ca"], files["ssl_cert"], files["ssl_key"], key_password)


def _mysql(r: _Reader, data: Mapping[str, Any]) -> MysqlConfig:
    s = r.section(data, "mysql")
    r.only(s, "mysql", ("host", "port", "username", "password", "database", "connect_timeout", *_TLS_KEYS))
    database = r.get(s, "mysql", "database", str)
    if not _NAME_RE.fullmatch(database):
        raise ConfigError("config file %s: mysql.%s.database must match ^\\w+$" % (r.path, r.env))
    return MysqlConfig(
        host=r.get(s, "mysql", "host", str),
        port=r.port(s, "mysql"),
        username=r.get(s, "mysql", "username", str),
        password=r.get(s, "mysql", "password", str, ""),
        database=database,
        tls=_tls(r, s, "mysql"),
        connect_timeout=r.get(s, "mysql", "connect_timeout", float, 2000.0) / 1000.0,
    )


def _redis(r: _Reader, data: Mapping[str, Any]) -> RedisConfig:
    s = r.section(data, "redis")
    r.only(s, "redis", ("host", "port", "password", "cluster", "socket_timeout", *_TLS_KEYS))
    return RedisConfig(
        host=r.get(s, "redis", "host", str),
        port=r.port(s, "redis"),
        password=r.get(s, "redis", "password", str, "") or None,
        cluster=r.get(s, "redis", "cluster", bool, False),
        socket_timeout=r.get(s, "redis", "socket_timeout", float, 2000.0) / 1000.0,
        tls=_tls(r, s, "redis"),
    )


def _provider(r: _Reader, data: Mapping[str, Any]) -> ProviderConfig:
    top = data.get("provider")
    if top is None or (isinstance(top, dict) and top.get(r.env) is None):
        return ProviderConfig()  # optional: every provider option has a default
    s = r.section(data, "provider")
    r.only(s, "provider", tuple(key for key, _ in _PROVIDER_KEYS))
    values = {key: r.get(s, "provider", key, kind, None) for key, kind in _PROVIDER_KEYS}
    metrics_port = values["metrics_port"]
    if metrics_port is not None and not 0 <= metrics_port < 65536:
        raise ConfigError(
            "config file %s: key provider.%s.metrics_port must be a TCP port or 0 (the OS picks), got %d"
            % (r.path, r.env, metrics_port)
        )
    return ProviderConfig(**values)


def _client(r: _Reader, data: Mapping[str, Any]) -> ClientConfig:
    top = data.get("client")
    if top is None or (isinstance(top, dict) and top.get(r.env) is None):
        return ClientConfig()  # optional
    s = r.section(data, "client")
    r.only(s, "client", ("caller",))
    caller = r.get(s, "client", "caller", str, None)
    if caller is not None:
        try:
            validate_appkey(caller)
        except InvalidArgument as err:
            raise ConfigError("config file %s: client.%s.caller: %s" % (r.path, r.env, err)) from None
    return ClientConfig(caller=caller)


def _zookeeper(r: _Reader, data: Mapping[str, Any]) -> ZooKeeperConfig:
    s = r.section(data, "zkserver")
    r.only(s, "zkserver", ("host", "port", "hosts", "session_timeout", "connect_timeout", *_TLS_KEYS))
    if "hosts" in s:
        hosts = r.get(s, "zkserver", "hosts", str)
        if not hosts.strip():
            raise ConfigError("config file %s: zkserver.%s.hosts is empty" % (r.path, r.env))
    else:
        hosts = "%s:%d" % (r.get(s, "zkserver", "host", str), r.port(s, "zkserver"))
    session_timeout = r.get(s, "zkserver", "session_timeout", float, 10000.0) / 1000.0
    if session_timeout <= 0:
        raise ConfigError("config file %s: zkserver.%s.session_timeout must be > 0" % (r.path, r.env))
    return ZooKeeperConfig(
        hosts=hosts.replace(" ", ""),
        session_timeout=session_timeout,
        connect_timeout=r.get(s, "zkserver", "connect_timeout", float, 5000.0) / 1000.0,
        tls=_tls(r, s, "zkserver"),
    )

"""Load a Thrift IDL file with thriftpy2 and find one service in it."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import types
from typing import Dict, List

import thriftpy2
from thriftpy2.parser.exc import ThriftGrammarError, ThriftParserError

from .errors import IdlError

__all__ = ["load_service"]


def _services(module: types.ModuleType) -> List[str]:
    return sorted(name for name, obj in vars(module).items() if hasattr(obj, "thrift_services"))


_names_lock = threading.Lock()
_names: Dict[str, str] = {}  # module name -> the real path of the file loaded under it


def _module_name(path: str) -> str:
    """``<stem>_thrift``, like thriftpy2's own habit, unless another file with the same stem was
    loaded under that name already: thriftpy2 caches by module name, so that one would be
    handed back. Then the name gets a hash of the path."""
    real = os.path.realpath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    with _names_lock:
        for name in (stem + "_thrift", "%s_%s_thrift" % (stem, hashlib.sha1(real.encode()).hexdigest()[:10])):
            if _names.setdefault(name, real) == real:
                return name
    raise IdlError("cannot find a module name for %s" % path)  # pragma: no cover - a sha1 collision


def load_service(thrift_path: "str | os.PathLike[str]", service_name: str) -> types.ModuleType:
    """Parse ``thrift_path`` and return the thriftpy2 service object named ``service_name``.

    Raises IdlError naming the file and the service when the file is missing or malformed, or
    does not define that service.
    """
    path = os.fspath(thrift_path)
    if not os.path.isfile(path):
        raise IdlError("IDL file %s not found (looking for service %r, cwd %s)" % (path, service_name, os.getcwd()))
    try:
        module = thriftpy2.load(path, module_name=_module_name(path))
    except (ThriftParserError, ThriftGrammarError, OSError) as err:
        raise IdlError("cannot load IDL file %s (looking for service %r): %s" % (path, service_name, err)) from err
    service = getattr(module, service_name, None)
    if service is None or not hasattr(service, "thrift_services"):
        raise IdlError(
            "service %r is not defined in IDL file %s (services there: %s)"
            % (service_name, path, ", ".join(_services(module)) or "none")
        )
    return service  # type: ignore[no-any-return]

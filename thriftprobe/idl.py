"""Load a Thrift IDL file with thriftpy2 and find one service in it."""

from __future__ import annotations

import os
import re
import types
from typing import List

import thriftpy2
from thriftpy2.parser.exc import ThriftGrammarError, ThriftParserError

from .errors import IdlError

__all__ = ["load_service"]


def _services(module: types.ModuleType) -> List[str]:
    return sorted(name for name, obj in vars(module).items() if hasattr(obj, "thrift_services"))


def load_service(thrift_path: "str | os.PathLike[str]", service_name: str) -> types.ModuleType:
    """Parse ``thrift_path`` and return the thriftpy2 service object named ``service_name``.

    Raises IdlError naming the file and the service when the file is missing or malformed, or
    does not define that service.
    """
    path = os.fspath(thrift_path)
    if not os.path.isfile(path):
        raise IdlError("IDL file %s not found (looking for service %r, cwd %s)" % (path, service_name, os.getcwd()))
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    try:
        module = thriftpy2.load(path, module_name=stem + "_thrift")
    except (ThriftParserError, ThriftGrammarError, OSError) as err:
        raise IdlError("cannot load IDL file %s (looking for service %r): %s" % (path, service_name, err)) from err
    service = getattr(module, service_name, None)
    if service is None or not hasattr(service, "thrift_services"):
        raise IdlError(
            "service %r is not defined in IDL file %s (services there: %s)"
            % (service_name, path, ", ".join(_services(module)) or "none")
        )
    return service  # type: ignore[no-any-return]

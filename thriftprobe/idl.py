"""Find one service of a Thrift IDL: in a file (loaded with thriftpy2 once per process), a loaded
module or a service class; and tell whether two struct classes are the same Thrift type."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import types
from typing import Dict, List, Optional, Set, Tuple, Union

import thriftpy2
from thriftpy2.parser import parser as thriftpy2_parser
from thriftpy2.parser.exc import ThriftGrammarError, ThriftParserError

from .errors import IdlError, InvalidArgument

__all__ = ["IdlSource", "load_service", "same_thrift_struct"]


def _services(module: types.ModuleType) -> List[str]:
    return sorted(name for name, obj in vars(module).items() if hasattr(obj, "thrift_services"))


_names_lock = threading.Lock()
_names: Dict[str, str] = {}  # module name -> the real path of the file loaded under it


def _same_file(a: str, b: object) -> bool:
    if not isinstance(b, str):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # a relative path loaded from another cwd, or a file since removed
        return False


def _loaded_from(path: str) -> Optional[types.ModuleType]:
    """A thriftpy2 module this process already loaded from the file at ``path``, if any: under
    a module name (``sys.modules``), else thriftpy2's default-name load (its parse cache)."""
    candidates = list(sys.modules.values())
    cache = getattr(thriftpy2_parser, "_thrift_cache", None)  # thriftpy2's own cache; private
    if isinstance(cache, dict):
        candidates.extend(cache.values())
    for module in candidates:
        if isinstance(module, types.ModuleType) and _same_file(path, getattr(module, "__thrift_file__", None)):
            return module
    return None


def _module_name(path: str) -> str:
    """``<stem>_thrift``, like thriftpy2's own habit, unless that name is taken by another file
    (thriftpy2 caches by module name, so that file's module would be handed back). Then the name
    gets a hash of the path."""
    real = os.path.realpath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    with _names_lock:
        for name in (stem + "_thrift", "%s_%s_thrift" % (stem, hashlib.sha1(real.encode()).hexdigest()[:10])):
            other = sys.modules.get(name)
            if other is not None and not _same_file(real, getattr(other, "__thrift_file__", None)):
                continue
            if _names.setdefault(name, real) == real:
                return name
    raise IdlError("cannot find a module name for %s" % path)  # pragma: no cover - a sha1 collision


IdlSource = Union[str, "os.PathLike[str]", types.ModuleType, type]
"""What ``start_service`` and ``build_client`` accept for the IDL: the path of a .thrift file, a
module thriftpy2 loaded from one, or the service class itself (``calc_thrift.Calculator``)."""


def load_service(idl: IdlSource, service_name: str) -> types.ModuleType:
    """Return the thriftpy2 service object named ``service_name``.

    ``idl`` is a path, a loaded thriftpy2 module or a service class. Given a path, the module this
    process already loaded from that file is used (whatever name it was loaded under), so the
    exception classes a caller catches are the ones it loaded; otherwise the file is loaded.

    Raises IdlError naming the file and the service when the file is missing or malformed, or
    does not define that service; InvalidArgument when ``idl`` is none of the three.
    """
    if isinstance(idl, type):
        if not hasattr(idl, "thrift_services"):
            raise InvalidArgument("%r is not a thriftpy2 service class (it has no thrift_services)" % (idl,))
        if idl.__name__ != service_name:
            raise InvalidArgument("service class %s was given for service %r" % (idl.__name__, service_name))
        return idl  # type: ignore[return-value]
    if isinstance(idl, types.ModuleType):
        return _service_of(idl, service_name, "module %s" % (getattr(idl, "__thrift_file__", None) or idl.__name__))
    if not isinstance(idl, (str, os.PathLike)):
        raise InvalidArgument(
            "the IDL must be a path, a thriftpy2 module or a service class, got %s" % type(idl).__name__
        )
    path = os.fspath(idl)
    if not os.path.isfile(path):
        raise IdlError("IDL file %s not found (looking for service %r, cwd %s)" % (path, service_name, os.getcwd()))
    module = _loaded_from(path)
    if module is None:
        try:
            module = thriftpy2.load(path, module_name=_module_name(path))
        except (ThriftParserError, ThriftGrammarError, OSError) as err:
            raise IdlError("cannot load IDL file %s (looking for service %r): %s" % (path, service_name, err)) from err
    return _service_of(module, service_name, "file " + path)


def _service_of(module: types.ModuleType, service_name: str, where: str) -> types.ModuleType:
    service = getattr(module, service_name, None)
    if service is None or not hasattr(service, "thrift_services"):
        raise IdlError(
            "service %r is not defined in IDL %s (services there: %s)"
            % (service_name, where, ", ".join(_services(module)) or "none")
        )
    return service  # type: ignore[no-any-return]


def same_thrift_struct(a: object, b: object) -> bool:
    """True when ``a`` and ``b`` are the same Thrift struct or exception, whichever load of the
    IDL made each: the same name, and fields with the same ids, names, types and requiredness
    (nested structs and enums compared the same way)."""
    return _same_type(a, b, set())


def _same_type(a: object, b: object, seen: Set[Tuple[int, int]]) -> bool:
    if a is b:
        return True
    if not (isinstance(a, type) and isinstance(b, type)) or a.__name__ != b.__name__:
        return False
    key = (id(a), id(b))
    if key in seen:  # recursive structs: assume equal while comparing the cycle
        return True
    seen.add(key)
    values_a, values_b = getattr(a, "_VALUES_TO_NAMES", None), getattr(b, "_VALUES_TO_NAMES", None)
    if values_a is not None or values_b is not None:  # enums
        return bool(values_a == values_b)
    spec_a, spec_b = getattr(a, "thrift_spec", None), getattr(b, "thrift_spec", None)
    if not isinstance(spec_a, dict) or not isinstance(spec_b, dict) or spec_a.keys() != spec_b.keys():
        return False
    return all(_same_spec(spec_a[k], spec_b[k], seen) for k in spec_a)


def _same_spec(x: object, y: object, seen: Set[Tuple[int, int]]) -> bool:
    if isinstance(x, type) or isinstance(y, type):
        return _same_type(x, y, seen)
    if isinstance(x, tuple) and isinstance(y, tuple):
        return len(x) == len(y) and all(_same_spec(p, q, seen) for p, q in zip(x, y))
    return bool(x == y)

"""Call one method through discovery with JSON arguments, and render the outcome as JSON.

The ``thriftprobe call`` command's engine, like grpcurl for Thrift: arguments are converted with
the IDL's type specs (structs, lists, maps, binary as base64), and so are results and the
exceptions the IDL declares.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from typing import Any, Dict, Optional, Tuple, Union

from thriftpy2.protocol.json import json_value, struct_to_json
from thriftpy2.thrift import TApplicationException, TException, TType

from ..config import Config
from ..consumer import build_client
from ..errors import InvalidArgument
from ..idl import load_service

__all__ = ["call_method"]


def _convert_args(service: Any, method: str, raw: Union[str, None]) -> Dict[str, Any]:
    spec = getattr(service, method + "_args").thrift_spec
    names = [field[1] for _, field in sorted(spec.items())]
    if raw is None or raw.strip() == "":
        given: Any = {}
    else:
        try:
            given = json.loads(raw, parse_constant=_no_constant)
        except json.JSONDecodeError as err:
            raise InvalidArgument("JSON_ARGS is not valid JSON: %s" % err) from err
        except (RecursionError, ValueError) as err:  # nested too deep; an integer of 10,000 digits
            raise InvalidArgument("JSON_ARGS cannot be read: %s" % err) from None
    if isinstance(given, list):
        if len(given) > len(names):
            raise InvalidArgument("%s takes %d arguments, got %d" % (method, len(names), len(given)))
        given = dict(zip(names, given))
    if not isinstance(given, dict):
        raise InvalidArgument('JSON_ARGS must be an object {"name": value} or an array')
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InvalidArgument(
            "%s has no argument %s (it takes: %s)" % (method, ", ".join(unknown), ", ".join(names) or "none")
        )
    kwargs = {}
    for field in spec.values():
        ttype, name = field[0], field[1]
        if name in given:
            kwargs[name] = _to_thrift(ttype, field[2] if len(field) > 3 else None, given[name], name)
    return kwargs


def _no_constant(name: str) -> Any:
    raise InvalidArgument("JSON_ARGS holds %s, which is not JSON (and no Thrift value)" % name)


_INT_BITS = {TType.BYTE: 8, TType.I16: 16, TType.I32: 32, TType.I64: 64}
_INT_NAMES = {TType.BYTE: "byte", TType.I16: "i16", TType.I32: "i32", TType.I64: "i64"}


def _split(spec: Any) -> Tuple[int, Any]:
    """A container's element spec: a bare TType, or (TType, its own spec)."""
    return (spec, None) if isinstance(spec, int) else (spec[0], spec[1])


def _to_thrift(ttype: int, spec: Any, value: Any, where: str) -> Any:
    """Convert a JSON value to what the IDL type ``ttype`` encodes, or raise InvalidArgument naming
    ``where`` (the argument and the path inside it). Strict: an i32 out of range, 1.5 for an integer
    or "false" for a bool never reach the encoder (which would fail after connecting, or send
    something else than what was asked)."""

    def bad(expected: str) -> InvalidArgument:
        return InvalidArgument("argument %s must be %s, got %s" % (where, expected, json.dumps(value)[:80]))

    if ttype in _INT_BITS:
        bits = _INT_BITS[ttype]
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer (%s)" % _INT_NAMES[ttype])
        if not low <= value <= high:
            raise bad("an %s, %d..%d" % (_INT_NAMES[ttype], low, high))
        return value
    if ttype == TType.DOUBLE:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise bad("a finite number (double)")
        return float(value)
    if ttype == TType.BOOL:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if ttype == TType.STRING:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if ttype == TType.BINARY:
        if not isinstance(value, str):
            raise bad("base64 text (binary)")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as err:
            raise bad("base64 text (binary)") from err
    if ttype in (TType.LIST, TType.SET):
        if not isinstance(value, list):
            raise bad("an array")
        elem_type, elem_spec = _split(spec)
        return [_to_thrift(elem_type, elem_spec, v, "%s[%d]" % (where, i)) for i, v in enumerate(value)]
    if ttype == TType.MAP:
        if not isinstance(value, list) or not all(isinstance(e, dict) and set(e) == {"key", "value"} for e in value):
            raise bad('an array of {"key": ..., "value": ...} (map)')
        (key_type, key_spec), (value_type, value_spec) = _split(spec[0]), _split(spec[1])
        result = {}
        for i, entry in enumerate(value):
            key = _to_thrift(key_type, key_spec, entry["key"], "%s[%d].key" % (where, i))
            if isinstance(key, list):
                raise bad("a map whose keys are not lists")
            result[key] = _to_thrift(value_type, value_spec, entry["value"], "%s[%d].value" % (where, i))
        return result
    if ttype == TType.STRUCT:
        if not isinstance(value, dict):
            raise bad("an object (struct %s)" % spec.__name__)
        fields = {f[1]: f for f in spec.thrift_spec.values()}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise InvalidArgument(
                "argument %s: struct %s has no field %s (it has: %s)"
                % (where, spec.__name__, ", ".join(unknown), ", ".join(fields))
            )
        obj = spec()
        for name, f in fields.items():
            if name in value:
                sub = f[2] if len(f) > 3 else None
                setattr(obj, name, _to_thrift(f[0], sub, value[name], "%s.%s" % (where, name)))
            elif f[-1] is True and getattr(obj, name) is None:
                raise InvalidArgument("argument %s: required field %s of %s is missing" % (where, name, spec.__name__))
        return obj
    raise bad("a value of Thrift type %d, which JSON_ARGS cannot express" % ttype)


def _result_json(service: Any, method: str, value: Any) -> Any:
    spec = getattr(service, method + "_result").thrift_spec
    success = spec.get(0)
    if success is None or value is None:
        return None
    return json_value(success[0], value, success[2] if len(success) > 3 else None)


def call_method(
    thrift_file: Union[str, "os.PathLike[str]"],
    appkey: str,
    service_name: str,
    method: str,
    json_args: Union[str, None],
    *,
    config: Config,
    timeout_ms: int = 3000,
    version: str = "*",
    group: str = "",
    tags: Optional[Dict[str, str]] = None,
) -> Tuple[str, Dict[str, Any]]:
    """Call ``method`` and return ("ok", {"result": ...}) or ("exception", {"exception": ...}).
    ``version``, ``group`` and ``tags`` select the nodes as ``build_client``'s do.

    Raises InvalidArgument for an unknown method or arguments that do not fit the IDL, and the
    usual build_client / call errors (NoAvailableNode, BackendError, TTransportException...).
    """
    service = load_service(thrift_file, service_name)
    if method not in service.thrift_services:
        raise InvalidArgument(
            "service %r has no method %r (methods: %s)"
            % (service_name, method, ", ".join(sorted(service.thrift_services)))
        )
    kwargs = _convert_args(service, method, json_args)
    with build_client(
        service, appkey, service_name, socket_timeout=timeout_ms, config=config, version=version, group=group,
        tags=tags or None,
    ) as client:
        try:
            # Through with_timeout: it holds the IDL's methods only, so a method named like the
            # client's own (close, with_timeout) is the remote one.
            value = getattr(client.with_timeout(timeout_ms), method)(**kwargs)
        except TApplicationException as exc:
            return "exception", {"exception": "TApplicationException", "type": exc.type, "message": exc.message}
        except TException as exc:
            result_spec = getattr(service, method + "_result").thrift_spec
            declared = tuple(
                f[2] for fid, f in result_spec.items() if fid != 0 and len(f) > 2 and isinstance(f[2], type)
            )
            if declared and isinstance(exc, declared):
                return "exception", {"exception": type(exc).__name__, "fields": struct_to_json(exc)}
            raise
        return "ok", {"result": _result_json(service, method, value)}

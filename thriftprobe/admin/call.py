"""Call one method through discovery with JSON arguments, and render the outcome as JSON.

The ``thriftprobe call`` command's engine, like grpcurl for Thrift: arguments are converted with
the IDL's type specs (structs, lists, maps, binary as base64), and so are results and the
exceptions the IDL declares.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple, Union

from thriftpy2.protocol.json import json_value, obj_value, struct_to_json
from thriftpy2.thrift import TApplicationException, TException

from ..config import Config
from ..consumer import build_client
from ..errors import InvalidArgument

__all__ = ["call_method"]


def _convert_args(service: Any, method: str, raw: Union[str, None]) -> Dict[str, Any]:
    spec = getattr(service, method + "_args").thrift_spec
    names = [field[1] for _, field in sorted(spec.items())]
    if raw is None or raw.strip() == "":
        given: Any = {}
    else:
        try:
            given = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InvalidArgument("JSON_ARGS is not valid JSON: %s" % err) from err
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
            type_spec = field[2] if len(field) > 3 else None
            try:
                kwargs[name] = obj_value(ttype, given[name], type_spec)
            except (TypeError, ValueError, KeyError, AttributeError) as err:
                raise InvalidArgument("argument %r does not fit its IDL type: %s" % (name, err)) from err
    return kwargs


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
) -> Tuple[str, Dict[str, Any]]:
    """Call ``method`` and return ("ok", {"result": ...}) or ("exception", {"exception": ...}).

    Raises InvalidArgument for an unknown method or arguments that do not fit the IDL, and the
    usual build_client / call errors (NoAvailableNode, BackendError, TTransportException...).
    """
    with build_client(thrift_file, appkey, service_name, socket_timeout=timeout_ms, config=config) as client:
        service = client._service
        if method not in service.thrift_services:
            raise InvalidArgument(
                "service %r has no method %r (methods: %s)"
                % (service_name, method, ", ".join(sorted(service.thrift_services)))
            )
        kwargs = _convert_args(service, method, json_args)
        try:
            value = getattr(client, method)(**kwargs)
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

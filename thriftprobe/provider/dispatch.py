"""One request in, one reply out: decode a call, run the handler, encode what the IDL declares.

The server core owns connections and threads; this module owns what a message means:

- a method missing from the service is answered with ``UNKNOWN_METHOD``;
- an exception the method declares is sent as declared, whichever load of the IDL the handler
  raised it from (matched by its Thrift identity: name and fields), so a handler written with
  ``thriftpy2.load("calc.thrift")`` or any ``module_name`` works;
- any other exception is answered with a generic ``INTERNAL_ERROR`` that carries an error id;
  the provider logs the id with the traceback (``expose_errors=True`` sends the details, for
  development only: exception text often holds hostnames, queries or secrets);
- a result that cannot be encoded is answered with ``INTERNAL_ERROR`` naming the method and the
  field, and the connection stays in step (the reply is encoded in full before a byte is sent);
- a oneway call is never answered, whatever happens.
"""

from __future__ import annotations

import logging
import types
import uuid
from typing import Any, Callable, Dict, Optional, Tuple

from thriftpy2.thrift import TApplicationException, TDecodeException, TMessageType, TType
from thriftpy2.transport import TMemoryBuffer

from ..idl import same_thrift_struct

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)


class _Method:
    """What serving one IDL method needs, looked up once."""

    __slots__ = ("arg_names", "args_cls", "func", "name", "result_cls", "throws")

    def __init__(self, service: types.ModuleType, handler: object, name: str) -> None:
        self.name = name
        self.args_cls = getattr(service, name + "_args")
        self.arg_names = tuple(spec[1] for _, spec in sorted(self.args_cls.thrift_spec.items()))
        self.result_cls = getattr(service, name + "_result")
        self.func: Callable[..., Any] = getattr(handler, name)
        # (result field name, declared exception class), in field-id order
        self.throws: Tuple[Tuple[str, type], ...] = tuple(
            (spec[1], spec[2])
            for _, spec in sorted(self.result_cls.thrift_spec.items())
            if spec[1] != "success" and spec[0] == TType.STRUCT
        )

    def declared_field(self, exc: BaseException) -> Optional[str]:
        """The result field that carries ``exc``, if the method declares it."""
        for field, cls in self.throws:
            if isinstance(exc, cls):
                return field
        for field, cls in self.throws:  # raised from another load of the same IDL
            if same_thrift_struct(type(exc), cls):
                return field
        return None


class Dispatcher:
    """Serves the calls of one service on a binary protocol.

    Stateless between calls: one instance is shared by every connection thread. ``protocol_factory``
    builds the protocol that encodes replies into memory before they are written.
    """

    def __init__(
        self,
        service: types.ModuleType,
        handler: object,
        protocol_factory: Any,
        *,
        label: str,
        expose_errors: bool = False,
    ) -> None:
        self.handler = handler
        self._service_name = getattr(service, "__name__", "service")
        self._methods: Dict[str, _Method] = {name: _Method(service, handler, name) for name in service.thrift_services}
        self._protocol_factory = protocol_factory
        self._label = label
        self._expose_errors = expose_errors

    def handle(self, proto: Any) -> None:
        """Read one message from ``proto``, run it, and write the reply (if any) to ``proto``'s
        transport. Raises what reading or writing the connection raises (the caller ends it)."""
        api, mtype, seqid = proto.read_message_begin()
        oneway = mtype == TMessageType.ONEWAY
        method = self._methods.get(api)
        if method is None:
            proto.skip(TType.STRUCT)
            proto.read_message_end()
            if not oneway:
                self._send_exception(
                    proto, api, seqid,
                    TApplicationException(
                        TApplicationException.UNKNOWN_METHOD,
                        "%s has no method %r" % (self._service_name, api),
                    ),
                )
            return
        args = method.args_cls()
        args.read(proto)
        proto.read_message_end()
        values = args.__dict__
        result = method.result_cls()
        try:
            result.success = method.func(*(values[name] for name in method.arg_names))
        except TApplicationException as exc:
            if not oneway:
                self._send_exception(proto, api, seqid, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a handler may raise anything: answered, and logged if undeclared
            field = method.declared_field(exc)
            if field is None:
                error = self._internal_error(api, exc, oneway)
                if not oneway:
                    self._send_exception(proto, api, seqid, error)
                return
            setattr(result, field, exc)
        if oneway:
            return
        self._send_result(proto, api, seqid, result)

    def _internal_error(self, api: str, exc: Exception, oneway: bool) -> TApplicationException:
        error_id = uuid.uuid4().hex[:16]
        log.error(
            "%s: %s.%s raised an exception the IDL does not declare (error id %s)%s",
            self._label, self._service_name, api, error_id, " in a oneway call" if oneway else "",
            exc_info=exc,
        )
        if self._expose_errors:
            text = "%s.%s failed (error id %s): %s: %s" % (self._service_name, api, error_id, type(exc).__name__, exc)
        else:
            text = "internal error in %s.%s (error id %s; the provider's log has the details)" % (
                self._service_name, api, error_id,
            )
        return TApplicationException(TApplicationException.INTERNAL_ERROR, text)

    def _encode(self, write: Callable[[Any], None]) -> bytes:
        buffer = TMemoryBuffer()
        write(self._protocol_factory.get_protocol(buffer))
        return buffer.getvalue()  # type: ignore[no-any-return]

    def _send_result(self, proto: Any, api: str, seqid: int, result: Any) -> None:
        def write(out: Any) -> None:
            out.write_message_begin(api, TMessageType.REPLY, seqid)
            result.write(out)
            out.write_message_end()

        try:
            data = self._encode(write)
        except (TDecodeException, TypeError, ValueError, OverflowError, AttributeError) as exc:
            error_id = uuid.uuid4().hex[:16]
            log.error("%s: the result of %s.%s cannot be encoded (error id %s): %s",
                      self._label, self._service_name, api, error_id, exc)
            self._send_exception(proto, api, seqid, TApplicationException(
                TApplicationException.INTERNAL_ERROR,
                "%s.%s returned a value that cannot be encoded: %s (error id %s)"
                % (self._service_name, api, _describe_encode_error(exc), error_id),
            ))
            return
        _send(proto, data)

    def _send_exception(self, proto: Any, api: str, seqid: int, exc: TApplicationException) -> None:
        def write(out: Any) -> None:
            out.write_message_begin(api, TMessageType.EXCEPTION, seqid)
            exc.write(out)
            out.write_message_end()

        _send(proto, self._encode(write))


def _send(proto: Any, data: bytes) -> None:
    proto.trans.write(data)
    proto.trans.flush()


def _describe_encode_error(exc: BaseException) -> str:
    """Name the field, never the value (values can hold anything)."""
    if isinstance(exc, TDecodeException):
        return "field '%s(%s)' of '%s' needs type '%s'" % (exc.field, exc.fid, exc.struct_name, exc.type_repr)
    return type(exc).__name__

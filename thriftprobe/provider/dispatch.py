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
from typing import Any, Callable, Dict, Optional, Tuple, Union

from thriftpy2.thrift import TApplicationException, TDecodeException, TMessageType, TType
from thriftpy2.transport import TMemoryBuffer

from ..idl import same_thrift_struct

__all__ = ["APPLICATION_ERROR", "DECLARED_EXCEPTION", "OK", "OUTCOMES", "Call", "Dispatcher"]

OK = "ok"
DECLARED_EXCEPTION = "declared_exception"
APPLICATION_ERROR = "application_error"
"""A TApplicationException: raised by the handler, an undeclared exception, an unknown method, a
result that cannot be encoded."""
OUTCOMES = (OK, DECLARED_EXCEPTION, APPLICATION_ERROR)

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


class Call:
    """A decoded request: the method, its arguments in the IDL's order, and what the reply needs."""

    __slots__ = ("args", "method", "oneway", "seqid")

    def __init__(self, method: _Method, seqid: int, oneway: bool, args: Tuple[Any, ...]) -> None:
        self.method = method
        self.seqid = seqid
        self.oneway = oneway
        self.args = args


class Dispatcher:
    """Serves the calls of one service.

    Stateless between calls: one instance is shared by every worker thread. ``protocol_factory``
    builds the protocol that encodes replies into memory (the server frames and sends them).
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

    @property
    def methods(self) -> Tuple[str, ...]:
        """The names of the service's methods, as the IDL declares them."""
        return tuple(self._methods)

    def handle(self, proto: Any) -> Tuple[Optional[bytes], str, str]:
        """Read one message from ``proto`` (over the request's bytes), run it, and return
        ``(reply, method name, outcome)``: the reply's bytes (None for a oneway call) and one of
        ``OUTCOMES``. Raises what decoding a malformed request raises (the connection is ended)."""
        call = self.decode(proto)
        if isinstance(call, tuple):
            return call
        method = call.method
        try:
            value = method.func(*call.args)
        except Exception as exc:  # noqa: BLE001 - a handler may raise anything: answered, and logged if undeclared
            return self.answer(call, None, exc)
        return self.answer(call, value, None)

    def decode(self, proto: Any) -> Union["Call", Tuple[Optional[bytes], str, str]]:
        """Read one message from ``proto``: the ``Call`` to run (``call.method.func(*call.args)``,
        then ``answer``), or, for a method the service lacks, the finished ``(reply, name,
        outcome)``. Raises what decoding a malformed request raises."""
        api, mtype, seqid = proto.read_message_begin()
        oneway = mtype == TMessageType.ONEWAY
        method = self._methods.get(api)
        if method is None:
            proto.skip(TType.STRUCT)
            proto.read_message_end()
            error = TApplicationException(
                TApplicationException.UNKNOWN_METHOD, "%s has no method %r" % (self._service_name, api)
            )
            return (None if oneway else self.exception_reply(api, seqid, error)), api, APPLICATION_ERROR
        args = method.args_cls()
        args.read(proto)
        proto.read_message_end()
        values = args.__dict__
        return Call(method, seqid, oneway, tuple(values[name] for name in method.arg_names))

    def answer(self, call: "Call", value: Any, exc: Optional[BaseException]) -> Tuple[Optional[bytes], str, str]:
        """``(reply, method name, outcome)`` for a call whose handler returned ``value`` or
        raised ``exc`` (an Exception)."""
        method = call.method
        api = method.name
        oneway = call.oneway
        result = method.result_cls()
        if exc is None:
            result.success = value
            outcome = OK
        elif isinstance(exc, TApplicationException):
            return (None if oneway else self.exception_reply(api, call.seqid, exc)), api, APPLICATION_ERROR
        else:
            field = method.declared_field(exc)
            if field is None:
                error = self._internal_error(api, exc, oneway)
                return (None if oneway else self.exception_reply(api, call.seqid, error)), api, APPLICATION_ERROR
            setattr(result, field, exc)
            outcome = DECLARED_EXCEPTION
        if oneway:
            return None, api, outcome
        return self._result_reply(api, call.seqid, result, outcome)

    def _internal_error(self, api: str, exc: BaseException, oneway: bool) -> TApplicationException:
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

    def _result_reply(self, api: str, seqid: int, result: Any, outcome: str) -> Tuple[bytes, str, str]:
        def write(out: Any) -> None:
            out.write_message_begin(api, TMessageType.REPLY, seqid)
            result.write(out)
            out.write_message_end()

        try:
            return self._encode(write), api, outcome
        except (TDecodeException, TypeError, ValueError, OverflowError, AttributeError) as exc:
            error_id = uuid.uuid4().hex[:16]
            log.error("%s: the result of %s.%s cannot be encoded (error id %s): %s",
                      self._label, self._service_name, api, error_id, exc)
            error = TApplicationException(
                TApplicationException.INTERNAL_ERROR,
                "%s.%s returned a value that cannot be encoded: %s (error id %s)"
                % (self._service_name, api, _describe_encode_error(exc), error_id),
            )
            return self.exception_reply(api, seqid, error), api, APPLICATION_ERROR

    def exception_reply(self, api: str, seqid: int, exc: TApplicationException) -> bytes:
        """The bytes of a reply carrying ``exc`` (also for requests the server answers itself:
        overloaded, too large)."""

        def write(out: Any) -> None:
            out.write_message_begin(api, TMessageType.EXCEPTION, seqid)
            exc.write(out)
            out.write_message_end()

        return self._encode(write)


def _describe_encode_error(exc: BaseException) -> str:
    """Name the field, never the value (values can hold anything)."""
    if isinstance(exc, TDecodeException):
        return "field '%s(%s)' of '%s' needs type '%s'" % (exc.field, exc.fid, exc.struct_name, exc.type_repr)
    return type(exc).__name__

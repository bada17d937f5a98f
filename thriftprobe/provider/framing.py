"""Where a request ends: find the boundary of one Thrift message in the bytes received so far.

The server's I/O thread reads whatever a connection sends and must know when a request is
whole before a worker decodes it; a worker never waits on a slow peer. With the framed
transport the frame's length says it. With the buffered transport (no length prefix) a
``MessageReader`` walks the message's structure, binary or compact protocol, without building
any value: it resumes where it stopped when more bytes arrive, so a request trickled one byte
at a time costs no more than one sent whole, and every length it meets is checked against
``max_size`` before anything is allocated. The header (method name, message type, sequence id)
is kept, so that a request can be answered without being run (overload, too large).

A ``MessageReader`` belongs to one connection and is used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Callable, Dict, List, Optional, Tuple, Union

from thriftpy2.thrift import TMessageType

__all__ = ["BINARY", "COMPACT", "MAX_DEPTH", "PROTOCOLS", "TRANSPORTS", "MessageError", "MessageReader"]

BINARY = "binary"
COMPACT = "compact"
PROTOCOLS = (BINARY, COMPACT)
TRANSPORTS = ("buffered", "framed")

Buffer = Union[bytes, bytearray, memoryview]

MAX_DEPTH = 64
"""Nesting of structs and containers a request may have (thriftpy2 itself recurses per level)."""

_I32 = struct.Struct("!i")
_I32_PAIR = struct.Struct("!ii")
_BINARY_VERSION_MASK = -65536  # 0xffff0000 as a signed i32
_BINARY_VERSION_1 = -2147418112  # 0x80010000 as a signed i32
_COMPACT_ID = 0x82
_COMPACT_VERSION = 1

# Frames of the walk: what the bytes at ``pos`` belong to.
_STRUCT, _LIST, _MAP = 0, 1, 2

# Binary protocol: bytes of each fixed-width type (BOOL, BYTE, DOUBLE, I16, I32, I64, UUID).
_BIN_FIXED = {2: 1, 3: 1, 4: 8, 6: 2, 8: 4, 10: 8, 16: 16}
_BIN_STRING, _BIN_STRUCT, _BIN_MAP, _BIN_SET, _BIN_LIST = 11, 12, 13, 14, 15
# The fewest bytes a value of each type takes, to refuse a container that claims more elements
# than ``max_size`` could hold before walking any of them.
_BIN_MIN = {**_BIN_FIXED, _BIN_STRING: 4, _BIN_STRUCT: 1, _BIN_MAP: 6, _BIN_SET: 5, _BIN_LIST: 5}

# Compact protocol: types inside a struct field header and in container headers.
_C_TRUE, _C_FALSE, _C_BYTE, _C_I16, _C_I32, _C_I64, _C_DOUBLE = 1, 2, 3, 4, 5, 6, 7
_C_BINARY, _C_LIST, _C_SET, _C_MAP, _C_STRUCT, _C_UUID = 8, 9, 10, 11, 12, 13
_C_FIXED = {_C_TRUE: 1, _C_FALSE: 1, _C_BYTE: 1, _C_DOUBLE: 8, _C_UUID: 16}
_C_VARINT = (_C_I16, _C_I32, _C_I64)
_C_KNOWN = frozenset(range(1, 14))


class MessageError(Exception):
    """The bytes are not a Thrift message this server accepts. ``too_large`` when a length in
    it (or the whole) exceeds the limit; the header fields are set when it was read."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.too_large = too_large


class _Incomplete(Exception):
    """More bytes are needed (internal: the walk stops and resumes from its saved state)."""


class MessageReader:
    """Finds where each message ends in a connection's receive buffer.

    ``feed(buf)`` looks at ``buf`` (the bytes received and not yet consumed, message start at
    offset 0) and returns ``(start, end)``: the message (without a frame's length prefix) is
    ``buf[start:end]`` and the next one begins at ``end``; or None while more bytes are needed.
    Call it again with the same buffer grown; after consuming a message, ``reset()``. Raises
    MessageError for a malformed or oversized message (the connection cannot go on: it has lost
    its place in the stream).
    """

    __slots__ = (
        "_compact",
        "_framed",
        "_header_done",
        "_max",
        "_pending",
        "_pos",
        "_stack",
        "_walk",
        "mtype",
        "name",
        "seqid",
    )  # fmt: skip

    def __init__(self, protocol: str = BINARY, framed: bool = False, max_size: int = 16 * 1024 * 1024) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError("protocol must be one of %s, got %r" % (", ".join(PROTOCOLS), protocol))
        self._framed = framed
        self._max = max_size
        self._compact = protocol == COMPACT
        self._walk: Callable[[Buffer, int], bool] = self._walk_compact if self._compact else self._walk_binary
        self.reset()

    def reset(self) -> None:
        self._pos = 0
        self._stack: List[List[int]] = []
        self._pending = -1  # the type of a value to read next, -1 for none
        self._header_done = False
        self.name: Optional[str] = None
        self.mtype: Optional[int] = None
        self.seqid: Optional[int] = None

    @property
    def started(self) -> bool:
        """True once any byte of the message was seen (the read timeout runs from then)."""
        return self._pos > 0 or self._header_done

    def feed(self, buf: Buffer) -> Optional[Tuple[int, int]]:
        n = len(buf)
        if self._framed:
            if n < 4:
                return None
            (size,) = _I32.unpack_from(buf, 0)
            if size < 0:
                raise MessageError("negative frame size %d" % size)
            if size > self._max:
                self._peek_header(buf, 4, min(n, 4 + size))
                raise MessageError(
                    "a frame of %d bytes exceeds max_message_size %d" % (size, self._max), too_large=True
                )
            if not self._header_done:
                self._peek_header(buf, 4, min(n, 4 + size))
            if n < 4 + size:
                self._pos = n
                return None
            if not self._header_done:
                raise MessageError("a frame of %d bytes holds no whole message header" % size)
            return 4, 4 + size
        if not self._walk(buf, n):
            return None
        return 0, self._pos

    def _peek_header(self, buf: Buffer, start: int, end: int) -> None:
        """Read the header of a framed message, if its bytes are there (for the error reply)."""
        with memoryview(buf) as view, view[start:end] as frame, contextlib.suppress(_Incomplete):
            self._header(frame, end - start)  # no copy; released before buf grows
        self._pos = 0

    # -- headers ---------------------------------------------------------------------------------

    def _header(self, buf: Buffer, n: int) -> None:
        if self._header_done:
            return
        if self._compact:
            self._compact_header(buf, n)
        else:
            self._binary_header(buf, n)
        self._header_done = True
        if self.mtype not in (TMessageType.CALL, TMessageType.ONEWAY):
            raise MessageError("message type %r is not a call" % (self.mtype,))

    def _name(self, buf: Buffer, pos: int, length: int) -> str:
        try:
            return bytes(buf[pos : pos + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError("the method name is not UTF-8") from None

    def _binary_header(self, buf: Buffer, n: int) -> None:
        if n < 4:
            raise _Incomplete
        (first,) = _I32.unpack_from(buf, 0)
        if first < 0:  # strict: version and type, name length, name, seqid
            if first & _BINARY_VERSION_MASK != _BINARY_VERSION_1:
                raise MessageError("bad binary protocol version 0x%08x" % (first & 0xFFFFFFFF))
            if n < 8:
                raise _Incomplete
            (length,) = _I32.unpack_from(buf, 4)
            self._check_length(length, 8, "method name")
            if n < 12 + length:
                raise _Incomplete
            self.name = self._name(buf, 8, length)
            self.mtype = first & 0xFF
            (self.seqid,) = _I32.unpack_from(buf, 8 + length)
            self._pos = 12 + length
        else:  # old non-strict: name length, name, type, seqid
            self._check_length(first, 4, "method name")
            if n < 9 + first:
                raise _Incomplete
            self.name = self._name(buf, 4, first)
            self.mtype = buf[4 + first]
            (self.seqid,) = _I32.unpack_from(buf, 5 + first)
            self._pos = 9 + first

    def _compact_header(self, buf: Buffer, n: int) -> None:
        if n < 2:
            raise _Incomplete
        if buf[0] != _COMPACT_ID:
            raise MessageError("bad compact protocol id 0x%02x" % buf[0])
        if buf[1] & 0x1F != _COMPACT_VERSION:
            raise MessageError("bad compact protocol version %d" % (buf[1] & 0x1F))
        seqid, pos = self._varint(buf, 2, n)
        length, pos = self._varint(buf, pos, n)
        self._check_length(length, pos, "method name")
        if n < pos + length:
            raise _Incomplete
        self.name = self._name(buf, pos, length)
        self.mtype = (buf[1] >> 5) & 0x07
        self.seqid = seqid - (1 << 32) if seqid >= 1 << 31 else seqid
        self._pos = pos + length

    def _check_length(self, length: int, pos: int, what: str) -> None:
        if length < 0:
            raise MessageError("negative %s length %d" % (what, length))
        if pos + length > self._max:
            raise MessageError(
                "a %s of %d bytes exceeds max_message_size %d" % (what, length, self._max), too_large=True
            )

    def _varint(self, buf: Buffer, pos: int, n: int) -> Tuple[int, int]:
        """An unsigned varint at ``pos``: (value, position after it). Raises _Incomplete."""
        result = shift = 0
        while True:
            if pos >= n:
                raise _Incomplete
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result, pos
            shift += 7
            if shift > 63:
                raise MessageError("a varint longer than 10 bytes")

    def _begin(self, buf: Buffer, n: int) -> bool:
        """Read the message header and open its struct; False while the header is incomplete."""
        try:
            self._header(buf, n)
        except _Incomplete:
            self._pos = n  # restarts from 0; ``started`` is True
            return False
        self._stack.append([_STRUCT])
        return True

    # -- binary body -------------------------------------------------------------------------------
    # The two walks below share their frame handling on purpose inline: they run once per value
    # of every request, and a method call per value would cost more than the repetition.

    def _walk_binary(self, buf: Buffer, n: int) -> bool:
        """Advance over whole values; True once the message's struct is closed."""
        if not self._header_done and not self._begin(buf, n):
            return False
        stack = self._stack
        pos = self._pos
        pending = self._pending
        fixed = _BIN_FIXED
        limit = self._max
        try:
            while stack:
                if pending < 0:
                    top = stack[-1]
                    kind = top[0]
                    if kind == _STRUCT:
                        if pos >= n:
                            raise _Incomplete
                        t = buf[pos]
                        if t == 0:
                            pos += 1
                            stack.pop()
                            continue
                        if pos + 3 > n:
                            raise _Incomplete
                        pos += 3
                        pending = t
                    elif kind == _LIST:
                        if top[2] == 0:
                            stack.pop()
                            continue
                        width = fixed.get(top[1])
                        if width is not None:  # a run of fixed-width values: one step
                            if pos + width * top[2] > n:
                                raise _Incomplete
                            pos += width * top[2]
                            stack.pop()
                            continue
                        top[2] -= 1
                        pending = top[1]
                    else:  # _MAP: top[3] counts keys and values left, keys first
                        left = top[3]
                        if left == 0:
                            stack.pop()
                            continue
                        kw, vw = fixed.get(top[1]), fixed.get(top[2])
                        if kw is not None and vw is not None and left % 2 == 0:
                            size = (kw + vw) * (left // 2)
                            if pos + size > n:
                                raise _Incomplete
                            pos += size
                            stack.pop()
                            continue
                        top[3] = left - 1
                        pending = top[1] if left % 2 == 0 else top[2]
                # One value of type ``pending`` at ``pos``.
                width = fixed.get(pending)
                if width is not None:
                    if pos + width > n:
                        raise _Incomplete
                    pos += width
                elif pending == _BIN_STRING:
                    if pos + 4 > n:
                        raise _Incomplete
                    (length,) = _I32.unpack_from(buf, pos)
                    self._check_length(length, pos + 4, "string")
                    if pos + 4 + length > n:
                        raise _Incomplete
                    pos += 4 + length
                elif pending == _BIN_STRUCT:
                    self._push(stack, [_STRUCT])
                elif pending in (_BIN_LIST, _BIN_SET):
                    if pos + 5 > n:
                        raise _Incomplete
                    etype = buf[pos]
                    (count,) = _I32.unpack_from(buf, pos + 1)
                    self._check_count(etype, count, pos + 5, _BIN_MIN)
                    pos += 5
                    self._push(stack, [_LIST, etype, count])
                elif pending == _BIN_MAP:
                    if pos + 6 > n:
                        raise _Incomplete
                    ktype, vtype = buf[pos], buf[pos + 1]
                    (count,) = _I32.unpack_from(buf, pos + 2)
                    self._check_count(ktype, count, pos + 6, _BIN_MIN, vtype)
                    pos += 6
                    self._push(stack, [_MAP, ktype, vtype, 2 * count])
                else:
                    raise MessageError("unknown binary protocol type %d" % pending)
                pending = -1
                if pos > limit:
                    raise MessageError("the request exceeds max_message_size %d" % limit, too_large=True)
        except _Incomplete:
            self._pos, self._pending = pos, pending
            return False
        self._pos, self._pending = pos, -1
        return True

    def _push(self, stack: List[List[int]], frame: List[int]) -> None:
        if len(stack) >= MAX_DEPTH:
            raise MessageError("the request nests deeper than %d levels" % MAX_DEPTH)
        stack.append(frame)

    def _check_count(
        self, etype: int, count: int, pos: int, least: Dict[int, int], vtype: Optional[int] = None
    ) -> None:
        if count < 0:
            raise MessageError("negative container size %d" % count)
        if count == 0:
            return
        smallest = least.get(etype)
        if smallest is None or (vtype is not None and vtype not in least):
            raise MessageError("unknown element type %r" % (etype if smallest is None else vtype))
        if vtype is not None:
            smallest += least[vtype]
        if pos + smallest * count > self._max:
            raise MessageError(
                "a container of %d elements exceeds max_message_size %d" % (count, self._max), too_large=True
            )

    # -- compact body ------------------------------------------------------------------------------

    def _walk_compact(self, buf: Buffer, n: int) -> bool:
        if not self._header_done and not self._begin(buf, n):
            return False
        stack = self._stack
        pos = self._pos
        pending = self._pending
        fixed = _C_FIXED
        limit = self._max
        varint = self._varint
        try:
            while stack:
                if pending < 0:
                    top = stack[-1]
                    kind = top[0]
                    if kind == _STRUCT:
                        if pos >= n:
                            raise _Incomplete
                        byte = buf[pos]
                        if byte == 0:
                            pos += 1
                            stack.pop()
                            continue
                        t = byte & 0x0F
                        if byte >> 4 == 0:  # a long-form field id follows (zigzag varint)
                            _, after = varint(buf, pos + 1, n)
                            pos = after
                        else:
                            pos += 1
                        if t in (_C_TRUE, _C_FALSE):  # a bool field's value is its type
                            continue
                        pending = t
                    elif kind == _LIST:
                        if top[2] == 0:
                            stack.pop()
                            continue
                        width = fixed.get(top[1])
                        if width is not None:
                            if pos + width * top[2] > n:
                                raise _Incomplete
                            pos += width * top[2]
                            stack.pop()
                            continue
                        top[2] -= 1
                        pending = top[1]
                    else:
                        left = top[3]
                        if left == 0:
                            stack.pop()
                            continue
                        top[3] = left - 1
                        pending = top[1] if left % 2 == 0 else top[2]
                width = fixed.get(pending)
                if width is not None:
                    if pos + width > n:
                        raise _Incomplete
                    pos += width
                elif pending in _C_VARINT:
                    _, pos = varint(buf, pos, n)
                elif pending == _C_BINARY:
                    length, after = varint(buf, pos, n)
                    self._check_length(length, after, "string")
                    if after + length > n:
                        raise _Incomplete
                    pos = after + length
                elif pending == _C_STRUCT:
                    self._push(stack, [_STRUCT])
                elif pending in (_C_LIST, _C_SET):
                    if pos >= n:
                        raise _Incomplete
                    byte = buf[pos]
                    etype, count = byte & 0x0F, byte >> 4
                    after = pos + 1
                    if count == 15:
                        count, after = varint(buf, after, n)
                    self._check_compact_count(etype, None, count, after)
                    pos = after
                    self._push(stack, [_LIST, etype, count])
                elif pending == _C_MAP:
                    count, after = varint(buf, pos, n)
                    if count == 0:
                        pos = after
                    else:
                        if after >= n:
                            raise _Incomplete
                        kinds = buf[after]
                        self._check_compact_count(kinds >> 4, kinds & 0x0F, count, after + 1)
                        pos = after + 1
                        self._push(stack, [_MAP, kinds >> 4, kinds & 0x0F, 2 * count])
                else:
                    raise MessageError("unknown compact protocol type %d" % pending)
                pending = -1
                if pos > limit:
                    raise MessageError("the request exceeds max_message_size %d" % limit, too_large=True)
        except _Incomplete:
            self._pos, self._pending = pos, pending
            return False
        self._pos, self._pending = pos, -1
        return True

    def _check_compact_count(self, etype: int, vtype: Optional[int], count: int, pos: int) -> None:
        if count == 0:
            return
        for t in (etype, vtype):
            if t is not None and t not in _C_KNOWN:
                raise MessageError("unknown compact element type %d" % t)
        each = _C_FIXED.get(etype, 1) + (0 if vtype is None else _C_FIXED.get(vtype, 1))
        if pos + each * count > self._max:
            raise MessageError(
                "a container of %d elements exceeds max_message_size %d" % (count, self._max), too_large=True
            )

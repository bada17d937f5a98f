"""The I/O thread's view of a request: where it ends, checked against what thriftpy2 encodes, in
every protocol and transport, whole and in pieces; and what it refuses before allocating."""

from __future__ import annotations

import random
import struct

import pytest
import thriftpy2
from thriftpy2.protocol import TBinaryProtocol, TCompactProtocol
from thriftpy2.thrift import TMessageType
from thriftpy2.transport import TMemoryBuffer

from thriftprobe.provider.framing import MAX_DEPTH, MessageError, MessageReader

IDL = """
enum Color { RED = 1, GREEN = 2 }
struct Leaf { 1: bool flag, 2: byte b, 3: i16 s, 4: i32 i, 5: i64 l, 6: double d, 7: string text,
              8: binary blob, 9: Color color }
struct Tree { 1: list<Leaf> leaves, 2: map<string, Leaf> named, 3: set<i32> ids, 4: map<i64, double> nums,
              5: list<list<string>> nested, 6: optional Tree child, 7: list<bool> flags,
              300: i32 far_field, 8: map<string, list<i16>> groups }
service S {
    Tree grow(1: Tree seed, 2: i32 depth, 3: string note),
    oneway void fire(1: list<string> names),
    void nothing(),
}
"""


@pytest.fixture(scope="module")
def idl(tmp_path_factory):
    path = tmp_path_factory.mktemp("idl") / "framing_all.thrift"
    path.write_text(IDL)
    return thriftpy2.load(str(path), module_name="framing_all_thrift")


def leaf(m, rnd):
    return m.Leaf(
        flag=rnd.random() < 0.5, b=rnd.randint(-128, 127), s=rnd.randint(-2000, 2000),
        i=rnd.randint(-(2**31), 2**31 - 1),
        l=rnd.randint(-(2**63), 2**63 - 1), d=rnd.random(), text="é" * rnd.randint(0, 40),
        blob=bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 30))), color=rnd.choice([1, 2]),
    )


def tree(m, rnd, depth=2):
    return m.Tree(
        leaves=[leaf(m, rnd) for _ in range(rnd.randint(0, 4))],
        named={str(i): leaf(m, rnd) for i in range(rnd.randint(0, 3))},
        ids={rnd.randint(0, 10**6) for _ in range(rnd.randint(0, 20))},
        nums={rnd.randint(-(10**12), 10**12): rnd.random() for _ in range(rnd.randint(0, 5))},
        nested=[["x" * rnd.randint(0, 5) for _ in range(rnd.randint(0, 3))] for _ in range(rnd.randint(0, 3))],
        child=tree(m, rnd, depth - 1) if depth and rnd.random() < 0.7 else None,
        flags=[rnd.random() < 0.5 for _ in range(rnd.randint(0, 20))],
        far_field=rnd.randint(0, 9),
        groups={"g%d" % i: [rnd.randint(-5, 5) for _ in range(rnd.randint(0, 17))] for i in range(rnd.randint(0, 3))},
    )


def encode(m, protocol, name, args, mtype=TMessageType.CALL, seqid=7, **kwargs):
    buf = TMemoryBuffer()
    proto = protocol(buf, **kwargs)
    proto.write_message_begin(name, mtype, seqid)
    args.write(proto)
    proto.write_message_end()
    return buf.getvalue()


def calls(m, protocol, rnd, **kwargs):
    # thriftpy2's compact writer never ends on a negative sequence id: those are binary only.
    low = 0 if protocol is TCompactProtocol else -(2**31)
    out = [encode(m, protocol, "nothing", m.S.nothing_args(), seqid=rnd.randint(low, 2**31 - 1), **kwargs)]
    out.append(encode(m, protocol, "fire", m.S.fire_args(names=["a", "bc"]), mtype=TMessageType.ONEWAY, **kwargs))
    for _ in range(30):
        args = m.S.grow_args(seed=tree(m, rnd), depth=rnd.randint(-5, 5), note="n" * rnd.randint(0, 300))
        out.append(encode(m, protocol, "grow", args, seqid=rnd.randint(0, 2**31 - 1), **kwargs))
    return out


PROTOCOLS = [("binary", TBinaryProtocol, {}), ("binary", TBinaryProtocol, {"strict_write": False}),
             ("compact", TCompactProtocol, {})]


def frame(data):
    return struct.pack("!i", len(data)) + data


@pytest.mark.parametrize("framed", [False, True])
@pytest.mark.parametrize("name,protocol,kwargs", PROTOCOLS)
def test_boundaries_match_thriftpy2_whole_and_in_pieces(idl, name, protocol, kwargs, framed):
    rnd = random.Random(1)
    messages = calls(idl, protocol, rnd, **kwargs)
    stream = b"".join(frame(m) if framed else m for m in messages)
    for chunking in ("whole", "bytes", "random"):
        reader = MessageReader(name, framed=framed)
        buf = bytearray()
        found = []
        pos = 0
        while pos < len(stream):
            step = len(stream) if chunking == "whole" else 1 if chunking == "bytes" else rnd.randint(1, 200)
            buf += stream[pos : pos + step]
            pos += step
            while True:
                got = reader.feed(buf)
                if got is None:
                    break
                start, end = got
                found.append((bytes(buf[start:end]), reader.name, reader.seqid))
                del buf[:end]
                reader.reset()
        assert not buf
        assert [f[0] for f in found] == messages, chunking
        assert [f[1] for f in found][:2] == ["nothing", "fire"]


@pytest.mark.parametrize("name,protocol,kwargs", PROTOCOLS)
def test_header_fields_are_kept(idl, name, protocol, kwargs):
    seqid = 2**31 - 5 if protocol is TCompactProtocol else -5
    data = encode(idl, protocol, "grow", idl.S.grow_args(note="x"), seqid=seqid, **kwargs)
    reader = MessageReader(name)
    assert reader.feed(data[:3]) is None and reader.started
    assert reader.feed(data) == (0, len(data))
    assert (reader.name, reader.mtype, reader.seqid) == ("grow", TMessageType.CALL, seqid)


def test_a_header_claiming_2_gib_is_refused_before_anything_is_read():
    reader = MessageReader("binary", max_size=1 << 20)
    with pytest.raises(MessageError) as err:
        reader.feed(struct.pack("!ii", -2147418111, 2**31 - 2))  # strict CALL, name of ~2 GiB
    assert err.value.too_large
    with pytest.raises(MessageError) as err:  # non-strict: the name length comes first
        MessageReader("binary", max_size=1 << 20).feed(struct.pack("!i", 2**31 - 1))
    assert err.value.too_large


@pytest.mark.parametrize("framed", [False, True])
def test_a_body_over_the_limit_is_refused_with_its_header_known(idl, framed):
    data = encode(idl, TBinaryProtocol, "grow", idl.S.grow_args(note="x" * 5000), seqid=9)
    reader = MessageReader("binary", framed=framed, max_size=4096)
    with pytest.raises(MessageError) as err:
        reader.feed(frame(data)[:200] if framed else data[:200])
    assert err.value.too_large and (reader.name, reader.seqid) == ("grow", 9)


@pytest.mark.parametrize("etype", [12, 15, 11])  # structs, lists, strings: each takes >= 1 byte
def test_a_list_claiming_more_elements_than_the_limit_holds_is_refused(idl, etype):
    head = encode(idl, TBinaryProtocol, "nothing", idl.S.nothing_args())[:-1]  # without the STOP
    body = bytes([15]) + struct.pack("!h", 1) + bytes([etype]) + struct.pack("!i", 10**9)
    with pytest.raises(MessageError) as err:
        MessageReader("binary", max_size=1 << 20).feed(head + body)
    assert err.value.too_large


def test_nesting_deeper_than_the_limit_is_refused(idl):
    head = encode(idl, TBinaryProtocol, "nothing", idl.S.nothing_args())[:-1]
    body = (bytes([12]) + struct.pack("!h", 1)) * (MAX_DEPTH + 5)
    with pytest.raises(MessageError, match="deeper"):
        MessageReader("binary").feed(head + body)


@pytest.mark.parametrize(
    "data,reason",
    [
        (struct.pack("!ii", -2147352575, 1) + b"x" + struct.pack("!i", 1), "version"),  # 0x80020001
        (struct.pack("!ii", -2147418110, 1) + b"x" + struct.pack("!i", 1), "not a call"),  # a REPLY
        (struct.pack("!ii", -2147418111, 2) + b"\xff\xfe" + struct.pack("!i", 1) + b"\x63\x00\x01", "UTF-8"),
        (struct.pack("!ii", -2147418111, 1) + b"x" + struct.pack("!i", 1) + b"\x63\x00\x01", "unknown"),
        (b"\x82\x22", "version"),
        (b"\x81\x21", "compact protocol id"),
    ],
)
def test_garbage_is_refused(data, reason):
    protocol = "compact" if data[0] in (0x81, 0x82) else "binary"
    with pytest.raises(MessageError, match=reason):
        MessageReader(protocol).feed(data)


def test_a_trickled_request_costs_about_what_it_costs_whole(idl):
    """Each byte is looked at once: feeding a 64 KiB request byte by byte walks it once."""
    rnd = random.Random(3)
    args = idl.S.grow_args(seed=idl.Tree(leaves=[leaf(idl, rnd) for _ in range(400)]))
    data = encode(idl, TBinaryProtocol, "grow", args)
    reader = MessageReader("binary")
    calls_made = 0
    original = reader._walk

    def counting(buf, n):
        nonlocal calls_made
        calls_made += 1
        return original(buf, n)

    reader._walk = counting
    buf = bytearray()
    for i in range(len(data)):
        buf.append(data[i])
        got = reader.feed(buf)
    assert got == (0, len(data)) and calls_made == len(data)
    assert reader._pos == len(data)  # resumed, never restarted

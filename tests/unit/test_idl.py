import pytest
import thriftpy2

from thriftprobe import IdlError
from thriftprobe.idl import load_service, same_thrift_struct


def test_two_files_with_the_same_name_do_not_collide(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "svc.thrift").write_text("service Alpha { string ping() }")
    (tmp_path / "b" / "svc.thrift").write_text("service Beta { string ping() }")
    alpha = load_service(tmp_path / "a" / "svc.thrift", "Alpha")
    beta = load_service(tmp_path / "b" / "svc.thrift", "Beta")
    assert alpha.thrift_services == ["ping"] and beta.thrift_services == ["ping"]
    assert alpha.__name__ == "Alpha" and beta.__name__ == "Beta"


def test_malformed_idl_names_the_file(tmp_path):
    bad = tmp_path / "bad.thrift"
    bad.write_text("service {")
    with pytest.raises(IdlError, match=r"cannot load IDL file .*bad\.thrift"):
        load_service(bad, "X")


def _load(tmp_path, name, text):
    path = tmp_path / (name + ".thrift")
    path.write_text(text)
    return thriftpy2.load(str(path), module_name=name + "_thrift")


BASE = """
enum Color { RED = 1, BLUE = 2 }
struct Inner { 1: required i32 n, 2: optional list<Inner> children }
exception Boom { 1: string message, 2: Inner where, 3: Color color, 4: map<string, list<Inner>> more }
"""


def test_the_same_exception_from_two_loads_is_the_same_thrift_type(tmp_path):
    a, b = _load(tmp_path, "same_a", BASE), _load(tmp_path, "same_b", BASE)
    assert a.Boom is not b.Boom
    assert same_thrift_struct(a.Boom, b.Boom)


@pytest.mark.parametrize("changed", [
    BASE.replace("1: string message", "1: binary message"),          # a field's type
    BASE.replace("1: string message", "9: string message"),          # a field's id
    BASE.replace("1: required i32 n", "1: optional i32 n"),          # requiredness, nested
    BASE.replace("BLUE = 2", "BLUE = 3"),                            # an enum's values
    BASE.replace("list<Inner>> more", "list<i32>> more"),            # a container's element type
    BASE.replace("exception Boom", "exception Bang"),                # the name
])
def test_a_changed_declaration_is_another_thrift_type(tmp_path, changed):
    a, b = _load(tmp_path, "diff_a", BASE), _load(tmp_path, "diff_b", changed)
    other = getattr(b, "Boom", None) or b.Bang
    assert not same_thrift_struct(a.Boom, other)

import pytest

from thriftprobe import IdlError
from thriftprobe.idl import load_service


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

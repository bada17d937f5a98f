import json

import pytest

from thriftprobe import InvalidArgument
from thriftprobe.node import Node, parse_znode_name, settings_field, validate_host, validate_names


def test_json_round_trip_keeps_extras_and_uses_seed_layout():
    node = Node("10.0.0.5", 9090, 25, False, extras={"pid": 42})
    data = json.loads(node.to_json())
    assert data == {"host": "10.0.0.5", "port": 9090, "weight": 25, "valid": 0, "pid": 42}
    again = Node.from_json(node.to_json())
    assert again == node and again.extras == {"pid": 42}


def test_seed_written_json_is_accepted():
    node = Node.from_json(b'{"host": "10.1.1.1", "port": 8081, "weight": 10, "valid": 1}')
    assert node.available and node.address == ("10.1.1.1", 8081)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"host": "h", "port": 1, "weight": 1}',
        b'{"host": "h", "port": 0, "weight": 1, "valid": 1}',
        b'{"host": "h", "port": 1, "weight": -1, "valid": 1}',
        b'{"host": "h", "port": 1, "weight": 1.5, "valid": 1}',
        b'{"host": "h", "port": 1, "weight": 1, "valid": 2}',
        b'{"host": "", "port": 1, "weight": 1, "valid": 1}',
        b"\xff\xfe",
        b'{"host": "h", "port": 1, "weight": 1, "valid": 1, "start_time": NaN}',
        b'{"host": "h", "port": 1, "weight": 1, "valid": 1, "start_time": -Infinity}',
        b'{"host": "h", "port": 1, "weight": 1, "valid": 1, "start_time": 1e400}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"host": "h", "port": 1, "weight": 1, "valid": 1, "pid": ' + b"9" * 5000 + b"}",
    ],
)
def test_malformed_node_data_is_rejected(raw):
    with pytest.raises(ValueError):
        Node.from_json(raw)


def test_availability_needs_valid_and_positive_weight():
    assert Node("h", 1, 1, True).available
    assert not Node("h", 1, 0, True).available
    assert not Node("h", 1, 5, False).available


def test_znode_name_and_settings_field_follow_the_seed():
    node = Node("10.0.0.5", 9090)
    assert node.znode_name("calc") == "calc_10.0.0.5_9090"
    assert settings_field("bars.calc", "dev", "calc", "10.0.0.5", 9090) == "bars.calc|dev|calc|10.0.0.5|9090"


def test_znode_name_parsing_keeps_underscored_service_names_apart():
    assert parse_znode_name("calc_10.0.0.5_9090") == ("calc", "10.0.0.5", 9090)
    assert parse_znode_name("calc_v2_10.0.0.5_9090") == ("calc_v2", "10.0.0.5", 9090)
    assert parse_znode_name("calc_fe80::1_9090") == ("calc", "fe80::1", 9090)
    assert parse_znode_name("garbage") is None
    assert parse_znode_name("calc_host_port") is None


@pytest.mark.parametrize("service", ["", "a-b", "a b", None, 5, "x/y", "s" * 129])
def test_bad_service_names_are_rejected(service):
    with pytest.raises(InvalidArgument, match="service_name"):
        validate_names("app", service)


@pytest.mark.parametrize("appkey", ["", "a/b", "a|b", None, "a b", ".", "..", "a" * 129])
def test_bad_appkeys_are_rejected(appkey):
    with pytest.raises(InvalidArgument, match="appkey"):
        validate_names(appkey, "svc")


def test_good_names_pass():
    validate_names("bars.calc-v1", "Calc_2")


@pytest.mark.parametrize("appkey, service", [("app\n", "svc"), ("app", "svc\n"), ("app", "Calc\n")])
def test_a_trailing_newline_is_not_a_valid_name(appkey, service):
    # '^...$' with re.match lets a final newline through: it would end up in znode paths and Redis fields.
    with pytest.raises(InvalidArgument):
        validate_names(appkey, service)


@pytest.mark.parametrize("name", ["calc_10.0.0.5_９０９０", "calc_10.0.0.5_²", "calc_10.0.0.5_9090\n"])
def test_znode_names_with_non_ascii_or_trailing_text_in_the_port_are_not_nodes(name):
    # str.isdigit() accepts '²' and fullwidth digits, which int() then refuses or reads: a stray
    # znode must never crash (or be misread by) a watch.
    assert parse_znode_name(name) is None


@pytest.mark.parametrize("host", ["", "10.0.0.1\n", "a b", "a_b", "a|b", "a/b", "h\x00", "x" * 254, None, 5])
def test_bad_hosts_are_rejected(host):
    with pytest.raises(InvalidArgument, match="host"):
        validate_host(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "fe80::1", "[fe80::1]", "pod-7f9c.calc.ns.svc.cluster.local", "x" * 253])
def test_good_hosts_pass(host):
    assert validate_host(host) == host

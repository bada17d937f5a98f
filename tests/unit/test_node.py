import json

import pytest

from thriftprobe import InvalidArgument
from thriftprobe.node import Node, parse_znode_name, settings_field, validate_names


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


@pytest.mark.parametrize("service", ["", "a-b", "a b", None, 5, "x/y"])
def test_bad_service_names_are_rejected(service):
    with pytest.raises(InvalidArgument, match="service_name"):
        validate_names("app", service)


@pytest.mark.parametrize("appkey", ["", "a/b", "a|b", None, "a b"])
def test_bad_appkeys_are_rejected(appkey):
    with pytest.raises(InvalidArgument, match="appkey"):
        validate_names(appkey, "svc")


def test_good_names_pass():
    validate_names("bars.calc-v1", "Calc_2")

import textwrap

import pytest

from thriftprobe import ConfigError
from thriftprobe import config as cfgmod

GOOD = """
mysql:
  dev: {host: 127.0.0.1, port: 3306, username: root, password: "", database: thriftprobe}
  prod: {host: db.prod, port: 3306, username: app, password: "${DB_PW}", database: tp}
redis:
  dev: {host: 127.0.0.1, port: 6379, password: "", cluster: 0}
  prod: {host: r.prod, port: 7001, password: "", cluster: 1}
zkserver:
  dev: {host: 127.0.0.1, port: 2181}
  prod: {hosts: "zk1:2181, zk2:2181,zk3:2181/chroot", session_timeout: 3000}
"""


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(GOOD)
    return path


def write(tmp_path, text):
    path = tmp_path / "c.yml"
    path.write_text(textwrap.dedent(text))
    return path


def test_explicit_path_wins_over_env_var_and_default(good, tmp_path):
    other = tmp_path / "other.yml"
    assert cfgmod.find_config_path(good, {"THRIFTPROBE_CONFIG": str(other)}) == good


def test_env_var_wins_over_default(good):
    assert cfgmod.find_config_path(None, {"THRIFTPROBE_CONFIG": str(good)}) == good


def test_default_path_is_config_yml_in_cwd():
    assert str(cfgmod.find_config_path(None, {})) == "config/config.yml"


@pytest.mark.parametrize(
    "explicit, environ, hostname, expected",
    [
        ("qa", {"THRIFTPROBE_ENV": "prod"}, "prod01", "qa"),
        (None, {"THRIFTPROBE_ENV": "staging"}, "prod01", "staging"),
        (None, {}, "prod01", "prod"),
        (None, {}, "prod12.dc1.example.com", "prod"),
        (None, {}, "production", "dev"),
        (None, {}, "prod", "dev"),
        (None, {}, "web01", "dev"),
    ],
)
def test_environment_rules(explicit, environ, hostname, expected):
    assert cfgmod.resolve_env(explicit, environ, hostname) == expected


def test_bad_environment_name_is_a_config_error():
    with pytest.raises(ConfigError, match="must match"):
        cfgmod.resolve_env("a/b", {}, "x")


def test_load_dev(good):
    c = cfgmod.load(good, "dev", environ={})
    assert c.env == "dev" and c.path == str(good)
    assert (c.mysql.host, c.mysql.port, c.mysql.database) == ("127.0.0.1", 3306, "thriftprobe")
    assert not c.mysql.tls.enabled
    assert c.redis.cluster is False and c.redis.password is None
    assert c.zookeeper.hosts == "127.0.0.1:2181"
    assert c.zookeeper.session_timeout == 10.0


def test_load_prod_takes_secret_from_environment_and_ensemble_string(good):
    c = cfgmod.load(good, "prod", environ={"DB_PW": "s3cret"})
    assert c.mysql.password == "s3cret"
    assert "s3cret" not in repr(c)
    assert c.redis.cluster is True
    assert c.zookeeper.hosts == "zk1:2181,zk2:2181,zk3:2181/chroot"
    assert c.zookeeper.session_timeout == 3.0


def test_missing_secret_variable_names_key_and_variable(good):
    with pytest.raises(ConfigError, match=r"mysql\.prod\.password.*DB_PW"):
        cfgmod.load(good, "prod", environ={})


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yml not found"):
        cfgmod.load(tmp_path / "nope.yml", "dev", environ={})


def test_missing_environment_names_file_and_key(good):
    with pytest.raises(ConfigError, match=r"c.*config.yml has no key mysql\.qa \(environments there: dev, prod\)"):
        cfgmod.load(good, "qa", environ={})


def test_missing_section(tmp_path):
    path = write(tmp_path, "mysql: {dev: {host: h, port: 1, username: u, database: d}}\n")
    with pytest.raises(ConfigError, match=f"{path} has no section 'redis'"):
        cfgmod.load(path, "dev", environ={})


def test_missing_key_names_it(tmp_path):
    path = write(
        tmp_path,
        """
        mysql: {dev: {host: h, port: 1, username: u, database: d}}
        redis: {dev: {host: h}}
        zkserver: {dev: {host: h, port: 2181}}
        """,
    )
    with pytest.raises(ConfigError, match=r"has no key redis\.dev\.port"):
        cfgmod.load(path, "dev", environ={})


def test_wrong_type_is_reported(tmp_path):
    path = write(
        tmp_path,
        """
        mysql: {dev: {host: h, port: "x", username: u, database: d}}
        redis: {dev: {host: h, port: 1}}
        zkserver: {dev: {host: h, port: 2181}}
        """,
    )
    with pytest.raises(ConfigError, match=r"mysql\.dev\.port must be int"):
        cfgmod.load(path, "dev", environ={})


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "mysql: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="cannot read"):
        cfgmod.load(path, "dev", environ={})


def test_resolve_rejects_conflicting_env(good):
    c = cfgmod.load(good, "dev", environ={})
    assert cfgmod.resolve(c) is c
    with pytest.raises(ConfigError, match="conflicts"):
        cfgmod.resolve(c, "prod")


def test_shipped_template_and_dev_config_load(monkeypatch):
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "config"
    assert cfgmod.load(root / "config.yml", "dev", environ={}).zookeeper.hosts == "127.0.0.1:2181"
    prod = cfgmod.load(
        root / "config.template.yml",
        "prod",
        environ={"THRIFTPROBE_MYSQL_PASSWORD": "a", "THRIFTPROBE_REDIS_PASSWORD": "b"},
    )
    assert prod.redis.cluster and prod.mysql.tls.mode == "verify_identity"


def test_numbers_where_text_is_expected_must_be_quoted(tmp_path):
    path = write(
        tmp_path,
        """
        mysql: {dev: {host: h, port: 1, username: u, password: 0123, database: d}}
        redis: {dev: {host: h, port: 1}}
        zkserver: {dev: {host: h, port: 2181}}
        """,
    )
    with pytest.raises(ConfigError, match=r"mysql\.dev\.password must be a string; quote it"):
        cfgmod.load(path, "dev", environ={})


def test_times_may_come_from_environment_variables(tmp_path):
    path = write(
        tmp_path,
        """
        mysql: {dev: {host: h, port: 1, username: u, database: d}}
        redis: {dev: {host: h, port: 1}}
        zkserver: {dev: {host: h, port: 2181, session_timeout: "${ZK_TIMEOUT}"}}
        """,
    )
    assert cfgmod.load(path, "dev", environ={"ZK_TIMEOUT": "2500"}).zookeeper.session_timeout == 2.5


def test_a_trailing_newline_is_not_a_valid_environment_or_database_name(tmp_path):
    with pytest.raises(ConfigError, match="must match"):
        cfgmod.resolve_env("dev\n", {}, "x")
    path = write(
        tmp_path,
        """
        mysql: {dev: {host: h, port: 1, username: u, database: "thriftprobe\\n"}}
        redis: {dev: {host: h, port: 1}}
        zkserver: {dev: {host: h, port: 2181}}
        """,
    )
    with pytest.raises(ConfigError, match=r"mysql\.dev\.database must match"):
        cfgmod.load(path, "dev", environ={})


def test_a_port_of_non_ascii_digits_is_a_config_error(tmp_path):
    path = write(
        tmp_path,
        """
        mysql: {dev: {host: h, port: "²", username: u, database: d}}
        redis: {dev: {host: h, port: 1}}
        zkserver: {dev: {host: h, port: 2181}}
        """,
    )
    with pytest.raises(ConfigError, match=r"mysql\.dev\.port must be int"):
        cfgmod.load(path, "dev", environ={})


def tls_config(tmp_path, mysql_tls):
    return write(
        tmp_path,
        """
        mysql: {dev: {host: h, port: 1, username: u, database: d, %s}}
        redis: {dev: {host: h, port: 1, ssl: true}}
        zkserver: {dev: {host: h, port: 2181, ssl_mode: required}}
        """
        % mysql_tls,
    )


def test_ssl_true_means_tls_with_the_certificate_checked_not_preferred(tmp_path):
    c = cfgmod.load(tls_config(tmp_path, "ssl: true"), "dev", environ={})
    assert c.mysql.tls.mode == c.redis.tls.mode == "verify_identity"
    assert c.zookeeper.tls.mode == "required" and not c.zookeeper.tls.verify_cert
    assert "(TLS verify_identity)" in c.mysql.describe() and "(TLS required)" in c.zookeeper.describe()


def test_tls_files_are_taken_and_checked(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    c = cfgmod.load(tls_config(tmp_path, "ssl_mode: verify_ca, ssl_ca: %s" % ca), "dev", environ={})
    assert c.mysql.tls == cfgmod.TlsConfig("verify_ca", str(ca))
    with pytest.raises(ConfigError, match=r"mysql\.dev\.ssl_ca: file .*nope\.pem not found"):
        cfgmod.load(tls_config(tmp_path, "ssl_mode: verify_ca, ssl_ca: %s" % (tmp_path / "nope.pem")), "dev", {})


@pytest.mark.parametrize(
    "mysql_tls, message",
    [
        ("ssl_mode: preferred", r"ssl_mode must be one of disabled, required, verify_ca, verify_identity"),
        ("ssl: false, ssl_mode: required", r"mysql\.dev\.ssl contradicts mysql\.dev\.ssl_mode required"),
        ("ssl_ca: CA", r"mysql\.dev\.ssl_ca is set, but TLS is disabled"),
        ("ssl_mode: required, ssl_ca: CA", r"ssl_ca is only used to verify the server"),
        ("ssl_mode: verify_ca, ssl_key: CA", r"ssl_key needs ssl_cert"),
        ("ssl_mod: required", r"unknown key ssl_mod in mysql\.dev"),
    ],
)
def test_tls_settings_that_would_not_mean_what_they_say_are_config_errors(tmp_path, mysql_tls, message):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigError, match=message):
        cfgmod.load(tls_config(tmp_path, mysql_tls.replace("CA", str(ca))), "dev", environ={})

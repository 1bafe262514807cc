from pathlib import Path

import pytest

from bbsnap.config import load_settings
from bbsnap.errors import UsageError
from bbsnap.sizes import GIB, MIB, parse_size, to_mib


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("data_dir: /from/file\naccel: kvm\nowner: filer\nmax_virtual_size: 10G\n")
    env = {"BBSNAP_CONFIG": str(config), "BBSNAP_ACCEL": "tcg"}
    settings = load_settings({"data_dir": "/from/flag"}, environ=env)
    assert settings.data_dir == Path("/from/flag")   # flag beats file
    assert settings.accel == "tcg"                   # env beats file
    assert settings.owner == "filer"                 # file beats default
    assert settings.max_virtual_size == 10 * GIB
    assert settings.connect == "qemu:///system"      # default


def test_empty_config_variable_means_no_file():
    settings = load_settings(environ={"BBSNAP_CONFIG": "", "BBSNAP_HOME": "/x"})
    assert settings.data_dir == Path("/x")


@pytest.mark.parametrize("text", ["- a list\n", "nonsense_key: 1\n", "accel: warp\n", "a: [\n"])
def test_bad_config_files_are_usage_errors(tmp_path, text):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(UsageError):
        load_settings(environ={"BBSNAP_CONFIG": str(config)})


def test_missing_explicit_config_file_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_settings(environ={"BBSNAP_CONFIG": str(tmp_path / "nope.yaml")})


@pytest.mark.parametrize("text,expected", [("4096", 4096), ("64M", 64 * MIB), ("2GiB", 2 * GIB),
                                           ("1.5g", int(1.5 * GIB)), ("10 k", 10240)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(UsageError):
        parse_size("lots")


def test_to_mib_rounds_up():
    assert (to_mib(0), to_mib(1), to_mib(MIB), to_mib(MIB + 1)) == (0, 1, 1, 2)


# -- strict settings (#10 item 13): every bad value is one usage error naming its source ----

def _config(tmp_path: Path, text: str | bytes) -> dict[str, str]:
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return {"BBSNAP_CONFIG": str(path)}


@pytest.mark.parametrize("text,message", [
    ("data_dir: ~\n", "'data_dir' in .* must be a directory path, not null"),
    ("data_dir:\n", "must be a directory path, not null"),
    ("data_dir: 7\n", "must be a directory path, not 7"),
    ("data_dir: relative/dir\n", "must be an absolute path"),
    ("max_virtual_size: -5\n", "'max_virtual_size' in .* must be a positive size, not -5"),
    ("max_virtual_size: true\n", "must be a positive size, not true"),
    ("max_virtual_size: 0\n", "must be a positive size, not 0"),
    ("max_decompressed_size: 1.5\n", "must be a positive size"),
    ("max_decompressed_size: lots\n", "must be a positive size"),
    ("ssh_ports: {a: 1}\n", "'ssh_ports' .* must be a non-empty string, not a mapping"),
    ("ssh_ports: 80-90\n", "must lie within 1024-65535"),
    ("ssh_ports: 3000-2000\n", "must lie within"),
    ("ssh_ports: '2222'\n", "is not a port range"),
    ("http_timeout: yes\n", "positive number of seconds, not true"),
    ("http_timeout: .inf\n", "positive number of seconds"),
    ("owner: 12\n", "'owner' .* must be a non-empty string, not 12"),
    ("network: ''\n", "must be a non-empty string"),
    ("qemu_user: [a]\n", "must be a non-empty string, not a list"),
    ("accel: warp\n", "must be one of auto, kvm, tcg"),
])
def test_config_values_are_strictly_typed(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        load_settings(environ=_config(tmp_path, text))


def test_good_config_values_still_load(tmp_path):
    settings = load_settings(environ=_config(tmp_path, (
        "data_dir: ~/bbsnap-data\nmax_virtual_size: 10G\nmax_decompressed_size: 4096\n"
        "ssh_ports: 3000-3010\nhttp_timeout: 5\nnetwork: default\n")))
    assert settings.data_dir == Path.home() / "bbsnap-data"
    assert (settings.max_virtual_size, settings.max_decompressed_size) == (10 * GIB, 4096)
    assert (settings.ssh_ports, settings.http_timeout, settings.network) == ("3000-3010", 5.0,
                                                                            "default")


@pytest.mark.parametrize("variable,value,message", [
    ("BBSNAP_HOME", "", "BBSNAP_HOME is set but empty"),
    ("BBSNAP_HOME", "data", "BBSNAP_HOME must be an absolute path"),
    ("BBSNAP_HOME", "/tmp/\udcff", "BBSNAP_HOME is not valid UTF-8"),
    ("BBSNAP_ACCEL", "", "BBSNAP_ACCEL is set but empty"),
    ("BBSNAP_MAX_VIRTUAL_SIZE", "-5", "BBSNAP_MAX_VIRTUAL_SIZE must be a positive size"),
    ("BBSNAP_MAX_VIRTUAL_SIZE", "0", "must be a positive size"),
    ("BBSNAP_SSH_PORTS", "1-2", "BBSNAP_SSH_PORTS: port range 1-2 must lie within"),
    ("BBSNAP_HTTP_TIMEOUT", "0", "BBSNAP_HTTP_TIMEOUT must be a positive number"),
    ("BBSNAP_OWNER", "\udcff", "BBSNAP_OWNER is not valid UTF-8"),
])
def test_bad_environment_values_are_usage_errors(variable, value, message):
    with pytest.raises(UsageError, match=message):
        load_settings(environ={"BBSNAP_CONFIG": "", "BBSNAP_HOME": "/x", variable: value})


def test_empty_libvirt_uri_means_unset_as_libvirt_defines_it():
    settings = load_settings(environ={"BBSNAP_CONFIG": "", "BBSNAP_HOME": "/x",
                                      "LIBVIRT_DEFAULT_URI": ""})
    assert settings.connect == "qemu:///system"


def test_relative_data_dir_flag_is_resolved_against_the_working_directory(tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings({"data_dir": "here/data"},
                             environ={"BBSNAP_CONFIG": "", "BBSNAP_HOME": "/x"})
    assert settings.data_dir == tmp_path / "here" / "data"


@pytest.mark.parametrize("value", ["", "/tmp/\udcff"])
def test_bad_data_dir_flags_are_usage_errors(value):
    with pytest.raises(UsageError, match="--data-dir"):
        load_settings({"data_dir": value}, environ={"BBSNAP_CONFIG": ""})


def test_malformed_yaml_is_one_line_with_line_and_column(tmp_path):
    env = _config(tmp_path, "data_dir: /x\n  bad: : y\n")
    with pytest.raises(UsageError) as caught:
        load_settings(environ=env)
    text = str(caught.value)
    assert "\n" not in text
    assert f"config file {env['BBSNAP_CONFIG']} is not valid YAML: line 2, column 6:" in text


@pytest.mark.parametrize("content,message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not UTF-8 text"),
    ("a: " + "[" * 20000, "nested too deeply"),
    (b"a: b\n" * 300000, "larger than 1 MiB"),
    ("? [a]\n: b\n", "not valid YAML"),
    ("1: x\nb: 2\n", "unknown setting"),
])
def test_unreadable_config_files_are_one_line_usage_errors(tmp_path, content, message):
    with pytest.raises(UsageError, match=message) as caught:
        load_settings(environ=_config(tmp_path, content))
    assert "\n" not in str(caught.value)


def test_a_setting_without_its_own_parser_is_checked_by_its_defaults_type():
    from bbsnap import config

    assert config._parser_for("qemu_user") is config.parse_text
    with pytest.raises(UsageError, match="positive whole number"):
        config.parse_positive_int(True, "x")
    assert config.parse_positive_int("12", "x") == 12


def test_every_setting_has_a_strict_parser_and_settings_added_later_are_checked(tmp_path):
    from dataclasses import fields

    from bbsnap import config

    for field in fields(config.Settings):
        assert callable(config._parser_for(field.name)), field.name
    # lock_timeout was appended with no parser of its own: its float default picks one.
    with pytest.raises(UsageError, match="'lock_timeout' in .* positive number of seconds"):
        load_settings(environ=_config(tmp_path, "lock_timeout: -5\n"))

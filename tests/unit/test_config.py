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

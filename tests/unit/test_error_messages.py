"""The pieces behind #10 item 13's one-line errors: SQLite failures classified, user-data
decoded (gzip accepted), and every free-text CLI parameter checked for UTF-8. The CLI runs
of each case are in tests/disk/test_cli_errors.py."""

from __future__ import annotations

import gzip
import sqlite3
import sys
from pathlib import Path

import click
import pytest

from bbsnap.state.catalogue_errors import catalogue_failure
from bbsnap.cli.lazy import load_all
from bbsnap.cli.main import cli
from bbsnap.cli.text_params import PATH_PARAMS, Utf8Text
from bbsnap.errors import CatalogueError, InvalidInputError
from bbsnap.seed import (MAX_USER_DATA, SeedSpec, decode_user_data, read_seed_iso,
                         validate_user_data, write_seed_iso)


def _sqlite_error(action) -> sqlite3.Error:  # type: ignore[no-untyped-def]
    with pytest.raises(sqlite3.Error) as caught:
        action()
    return caught.value


def test_damaged_read_only_missing_and_busy_catalogues_say_what_to_do(tmp_path):
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not SQLite" * 512)
    damaged = _sqlite_error(lambda: sqlite3.connect(garbage).execute("SELECT 1 FROM x"))
    good = tmp_path / "good.sqlite3"
    sqlite3.connect(good).execute("CREATE TABLE t (a)")
    read_only = _sqlite_error(lambda: sqlite3.connect(f"{good.as_uri()}?mode=ro", uri=True)
                              .execute("INSERT INTO t VALUES (1)"))
    missing = _sqlite_error(lambda: sqlite3.connect(tmp_path / "no" / "such.sqlite3"))
    holder = sqlite3.connect(good, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    busy = _sqlite_error(lambda: sqlite3.connect(good, timeout=0, isolation_level=None)
                         .execute("BEGIN IMMEDIATE"))
    holder.execute("ROLLBACK")

    cases = [(damaged, "is damaged: file is not a database", "restore it from a backup"),
             (read_only, "cannot write the catalogue /c.sqlite3: read-only", "permissions"),
             (missing, "cannot open the catalogue /c.sqlite3", "directory exists"),
             (busy, "is busy", "retry")]
    for exc, message, hint in cases:
        error = catalogue_failure(exc, Path("/c.sqlite3"))
        assert isinstance(error, CatalogueError) and error.exit_code == 1
        assert message in error.message and hint in (error.hint or ""), str(error)
        assert "\n" not in str(error)


def test_a_catalogue_path_is_shown_escaped():
    error = catalogue_failure(sqlite3.DatabaseError("x"), Path("/d\udcff/\x1b[2J.sqlite3"))
    assert "/d\\xff/\\x1b[2J.sqlite3" in error.message


# -- user-data -------------------------------------------------------------------------------

CONFIG = "#cloud-config\nhostname: zipped\nruncmd: [[echo, 'caf\u00e9']]\n"


@pytest.mark.parametrize("raw", [CONFIG.encode(), gzip.compress(CONFIG.encode()),
                                 gzip.compress(CONFIG[:20].encode()) +
                                 gzip.compress(CONFIG[20:].encode())],  # multi-member gzip
                         ids=["plain", "gzip", "gzip-members"])
def test_user_data_is_decoded_to_the_text_cloud_init_acts_on(raw):
    assert decode_user_data(raw) == CONFIG


def test_gzipped_user_data_reaches_the_seed_as_its_text(tmp_path):
    text = validate_user_data(decode_user_data(gzip.compress(CONFIG.encode())))
    seed = write_seed_iso(SeedSpec("srv-abcde", "zipped", ("52:54:00:aa:bb:cc",), text),
                          tmp_path / "seed.iso")
    assert read_seed_iso(seed)["user-data"] == CONFIG


@pytest.mark.parametrize("raw,message", [
    (b"\xff\xfe#cloud-config", "neither UTF-8 text nor gzip"),
    (b"x" * (MAX_USER_DATA + 1), "larger than 16 MiB"),
    (gzip.compress(b"#!/bin/sh\n" + b" " * MAX_USER_DATA), "larger than 16 MiB once decompressed"),
    (b"\x1f\x8b\x08\x00garbage", "damaged"),
    (gzip.compress(b"#cloud-config\n")[:-4], "damaged"),
])
def test_undecodable_user_data(raw, message):
    with pytest.raises(InvalidInputError, match=message):
        decode_user_data(raw)


def test_deeply_nested_cloud_config_is_refused_not_a_recursion_error():
    with pytest.raises(InvalidInputError, match="nested too deeply"):
        validate_user_data("#cloud-config\na: " + "[" * 50000)


# -- free text on the command line ---------------------------------------------------------

def _string_params(group: click.Group):  # type: ignore[no-untyped-def]
    for name, command in group.commands.items():
        for param in command.params:
            yield f"{name} {param.name}", param
        if isinstance(command, click.Group):
            yield from _string_params(command)


def test_every_plain_string_parameter_is_checked_for_utf8():
    """A parameter added later with type=str (or none) gets the check too, unless it is
    one of the file names that are only read. Every command loaded first, as the lazy
    groups (cli/lazy.py) load them when named: the check is applied as they load."""
    load_all(cli)
    unchecked = [where for where, param in _string_params(cli)
                 if param.type is click.STRING and param.name not in PATH_PARAMS]
    assert unchecked == []
    checked = {where for where, param in _string_params(cli) if isinstance(param.type, Utf8Text)}
    assert {"import name", "import description", "update name", "create name",
            "snapshot name", "export output", "show image_ids"} <= checked


# -- standard output at exit -------------------------------------------------------------------

@pytest.mark.parametrize("code,expected", [(0, 1), (3, 3)])
def test_output_that_fails_only_at_the_exit_flush_fails_the_command(monkeypatch, capsys, code,
                                                                     expected):
    """What is still buffered when the command returns (sys.stdout.buffer.write without a
    flush) is written by main's last flush: a full disk there is reported, not swallowed."""
    from bbsnap.cli import main as entry

    full = open("/dev/full", "w")
    monkeypatch.setattr(sys, "stdout", full)
    full.write("pending output")
    assert entry._flush(code) == expected
    assert capsys.readouterr().err == ("bbsnap: error: cannot write to standard output: No space "
                                       "left on device (what was written is incomplete; check "
                                       "where the output goes)\n")
    assert entry._flush(0) == 0, "said once: standard output now goes nowhere"

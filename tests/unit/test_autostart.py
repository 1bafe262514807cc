"""When an interactive `bbsnap` starts a command server for the next command
(cmdserver/autostart.py); the start itself, with real processes, is in
tests/disk/test_command_server.py."""

from __future__ import annotations

import os

import pytest

from bbsnap.cmdserver import autostart


@pytest.mark.parametrize("value,expected", [(None, "auto"), ("", "auto"), ("auto", "auto"),
                                            ("manual", "manual"), ("off", "off"),
                                            ("bogus", "auto")])
def test_the_mode_comes_from_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("BBSNAP_COMMAND_SERVER", raising=False)
    else:
        monkeypatch.setenv("BBSNAP_COMMAND_SERVER", value)
    assert autostart.mode() == expected


@pytest.mark.parametrize("argv,at_terminal,mode,expected", [
    (["servers", "revert", "srv-a", "img-b"], True, "auto", True),
    (["--data-dir", "/d", "images", "list"], True, "auto", True),
    (["images"], True, "auto", True),
    (["servers", "revert", "srv-a"], False, "auto", False),  # a script, cron, CI: never
    (["servers", "revert", "srv-a"], True, "manual", False),
    (["servers", "revert", "srv-a"], True, "off", False),
    (["command-server", "stop"], True, "auto", False),  # stop must not start the next one
    (["command-server", "status"], True, "auto", False),
    (["--version"], True, "auto", False),
    ([], True, "auto", False),
])
def test_only_an_interactive_command_in_auto_mode_starts_one(monkeypatch, tmp_path, argv,
                                                             at_terminal, mode, expected):
    monkeypatch.setenv("BBSNAP_COMMAND_SERVER", mode)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # this user's, whatever the caller's
    assert autostart.wanted(argv, at_terminal=at_terminal) is expected


def test_a_runtime_directory_of_another_user_starts_none(monkeypatch, tmp_path):
    """`sudo bbsnap ...` keeping the caller's XDG_RUNTIME_DIR: root starts no server there
    (it would leave a root-owned bbsnap/ the user could not use)."""
    monkeypatch.setenv("BBSNAP_COMMAND_SERVER", "auto")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert autostart.wanted(["images", "list"], at_terminal=True)
    monkeypatch.setattr(autostart.os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    assert not autostart.wanted(["images", "list"], at_terminal=True)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "gone"))
    assert not autostart.runtime_base_is_ours()
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert autostart.runtime_base_is_ours()  # /tmp/bbsnap-UID

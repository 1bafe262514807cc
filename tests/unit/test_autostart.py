"""When an interactive `bbsnap` starts a command server for the next command
(cmdserver/autostart.py); the start itself, with real processes, is in
tests/disk/test_command_server.py."""

from __future__ import annotations

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
def test_only_an_interactive_command_in_auto_mode_starts_one(monkeypatch, argv, at_terminal,
                                                             mode, expected):
    monkeypatch.setenv("BBSNAP_COMMAND_SERVER", mode)
    assert autostart.wanted(argv, at_terminal=at_terminal) is expected

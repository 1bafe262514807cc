"""The CLI imports the module of the group a command names and no other (cli/lazy.py),
and every command is still there, by name and in --help."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from bbsnap.cli.main import COMMANDS, cli

OTHER_GROUPS = ("bbsnap.cli.registry", "bbsnap.cli.image_export", "bbsnap.cli.schedule",
                "bbsnap.cli.prune", "bbsnap.cli.doctor", "bbsnap.cli.command_server",
                "bbsnap.cli.images")


def _imported_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout
    return set(out.split())


def test_a_servers_command_imports_no_other_group():
    loaded = _imported_after(
        "import click\nfrom bbsnap.cli.main import cli\n"
        "cli.get_command(click.Context(cli), 'servers').get_command(click.Context(cli), 'revert')")
    assert "bbsnap.cli.servers" in loaded
    assert loaded.isdisjoint(OTHER_GROUPS)


def test_every_lazy_command_resolves_and_help_lists_it():
    ctx = click.Context(cli)
    assert set(COMMANDS) <= set(cli.list_commands(ctx))
    for name in COMMANDS:
        assert isinstance(cli.get_command(ctx, name), click.Command), name
    images = cli.get_command(ctx, "images")
    servers = cli.get_command(ctx, "servers")
    assert isinstance(images, click.Group) and isinstance(servers, click.Group)
    for group, names in ((images, ("export", "push", "pull")), (servers, ("prune", "schedule"))):
        for name in names:
            assert isinstance(group.get_command(click.Context(group), name), click.Command), name
    help_text = subprocess.run([sys.executable, "-m", "bbsnap.cli.main", "servers", "--help"],
                               check=True, capture_output=True, text=True).stdout
    assert "prune" in help_text and "schedule" in help_text and "revert" in help_text


def test_a_command_whose_module_fails_to_import_fails_again_not_vanishes():
    """An import that fails (a broken install) is raised each time the command is named,
    never turned into "No such command" the second time."""
    from bbsnap.cli.lazy import LazyGroup

    group = LazyGroup("g", lazy_commands={"broken": "bbsnap.cli.no_such_module:cmd"})
    ctx = click.Context(group)
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError):
            group.get_command(ctx, "broken")
    assert "broken" in group.list_commands(ctx)

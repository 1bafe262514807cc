"""Command groups whose subcommands are imported only when named.

A command imports the module of its own group and no other: `bbsnap servers revert` does not
import the registry, export, schedule, doctor or command-server modules (measured here:
importing every group took 8-9 ms more than importing the servers group alone, of a
revert's ~85 ms before its first step). `--help` and shell completion list every command,
and so import them all.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from bbsnap.cli.text_params import check_text_params


class LazyGroup(click.Group):
    """A click group with, besides its own commands, *lazy_commands*: name -> "module:attr"
    of a command imported on first use. Every command it hands out has its free-text
    parameters checked (text_params.py), whether it was imported now or defined eagerly."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy_commands or {})
        for command in self.commands.values():
            check_text_params(command)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        check_text_params(cmd)
        super().add_command(cmd, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = self._lazy.get(cmd_name)
        if spec is not None:
            module, _, attr = spec.partition(":")
            command = getattr(importlib.import_module(module), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{spec} is not a click command")
            self.add_command(command, cmd_name)
            del self._lazy[cmd_name]  # only once it is there: a failed import says so again
        return super().get_command(ctx, cmd_name)


def load_all(group: click.Group) -> None:
    """Import every command of *group* and of its subgroups, lazy or not (the command
    server does, so that its forks find them built)."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            load_all(command)

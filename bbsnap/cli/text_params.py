"""Free text on the command line must be UTF-8: the check every plain string parameter gets.

On Linux, click hands undecodable bytes of argv over as surrogate escapes, which fail only
much later, encoded for SQLite, libvirt's XML or the terminal; they are refused when the
arguments are parsed, before anything is done, as a usage error.
"""

from __future__ import annotations

from typing import Any

import click

# String parameters that are file names (or URLs) only read: a file name may hold any
# bytes, and os.fsencode recovers them from the surrogate escapes, so these pass through.
# (export's --output is not among them: its name is recorded as text, in the crash journal
# and the sidecar, so an undecodable one is refused like any other text.)
PATH_PARAMS = frozenset({"source", "checksum_file"})


class Utf8Text(click.ParamType):
    """Free text (names, descriptions, ids), refused unless it is valid UTF-8."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        text = click.STRING.convert(value, param, ctx)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            from bbsnap.errors import UsageError

            label = _label(param)
            raise UsageError(f"{label} is not valid UTF-8: {text!r}",
                             hint="give it as UTF-8 text") from None
        return text


def _label(param: click.Parameter | None) -> str:
    if isinstance(param, click.Option):
        return "/".join(param.opts)
    if param is not None:
        return param.metavar or (param.name or "value").upper()
    return "a value"


def check_text_params(command: click.Command) -> None:
    """Give every plain string parameter of *command* (and of the subcommands a group holds
    already) the Utf8Text check. A lazy group checks the commands it imports later itself
    (lazy.py). The root's own options are not passed here: a BbsnapError raised while they
    are parsed would escape the catch point (--connect and --data-dir are checked by
    config.py instead)."""
    for param in command.params:
        if param.type is click.STRING and param.name not in PATH_PARAMS:
            param.type = Utf8Text()
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            check_text_params(sub)

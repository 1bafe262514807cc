"""`bbsnap command-server start|stop|status`: the opt-in server that runs commands in
pre-imported forks (bbsnap/cmdserver)."""

from __future__ import annotations

import click

from bbsnap.text import escape


@click.group("command-server")
def command_server() -> None:
    """Run commands in a pre-imported process: `bbsnap` starts in milliseconds."""


@command_server.command("start")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              metavar="SECONDS", help="End after this long without a command (0: never).")
def start(idle_timeout: float) -> None:
    """Start this user's command server for this install (nothing if one runs)."""
    from bbsnap.cmdserver import control

    click.echo(f"command server running: {escape(control.start(idle_timeout))}")


@command_server.command("stop")
def stop() -> None:
    """Stop it; commands it is running finish."""
    from bbsnap.cmdserver import control

    said = control.stop()
    click.echo("command server stopping" if said is not None else "no command server was running")


@command_server.command("status")
def status() -> None:
    """Say whether it runs (exit 3 when it does not)."""
    from bbsnap.cmdserver import control
    from bbsnap.errors import NotFoundError

    said = control.status()
    if said is None:
        raise NotFoundError("no command server of this install is running",
                            hint="`bbsnap command-server start` starts one")
    click.echo(f"command server running: {escape(said)}")

"""`bbsnap` entry point: global options and the single place where errors become exit codes."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .. import __version__
from . import context, render
from .context import AppContext
from .doctor import doctor
from .image_export import export_image
from .images import images
from .servers import servers, types


class BbsnapGroup(click.Group):
    """The root group: every BbsnapError raised below is reported here, once."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("bbsnap: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            # The reader went away (`bbsnap images list | head -1`): nothing is wrong and
            # nothing more can be said; exit as a process killed by SIGPIPE would.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the flush at exit goes here
            ctx.exit(128 + 13)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # noqa: BLE001 - the one catch point
            from ..errors import BbsnapError

            app = ctx.obj if isinstance(ctx.obj, AppContext) else None
            if isinstance(exc, BbsnapError):
                click.echo(f"bbsnap: error: {render.escape(exc)}", err=True)
                if app is not None and app.debug:
                    raise
                ctx.exit(exc.exit_code)
            if app is not None and app.debug:
                raise
            click.echo(f"bbsnap: internal error: {type(exc).__name__}: {render.escape(exc)} "
                       "(rerun with --debug for a traceback)", err=True)
            ctx.exit(1)
        finally:
            if isinstance(ctx.obj, AppContext):
                ctx.obj.close()


@click.group(cls=BbsnapGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bbsnap")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar=None,
              help="Data directory (catalogue and images). Env: BBSNAP_HOME.")
@click.option("-c", "--connect", metavar="URI",
              help="libvirt connection URI. Env: LIBVIRT_DEFAULT_URI. Default: qemu:///system.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, data_dir: str | None, connect: str | None, debug: bool) -> None:
    """bbsnap: snapshot running VMs into a local image catalogue and boot clones from it."""
    ctx.obj = AppContext(overrides={"data_dir": data_dir, "connect": connect}, debug=debug)


images.add_command(export_image)
cli.add_command(images)
cli.add_command(servers)
cli.add_command(types)
cli.add_command(doctor)


def main() -> None:
    """The console entry point: run one command, then leave at once.

    ``os._exit`` skips the interpreter's teardown (~20 ms of freeing modules and closing
    libvirt) and the catalogue's close (see ``context.leave_open_at_exit``); files the
    commands wrote are closed by then, and output is flushed here.
    """
    context.leave_open_at_exit = True
    try:
        cli.main(prog_name="bbsnap")
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc.code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe (`bbsnap images list | head`): nothing more to say
    os._exit(code)


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # what sys.exit does with a message
    return 1


if __name__ == "__main__":  # pragma: no cover
    main()

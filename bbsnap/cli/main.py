"""`bbsnap` entry point: global options and the single place where errors become exit codes."""

from __future__ import annotations

import io
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

from bbsnap import __version__
from bbsnap.text import escape
from bbsnap.cli import context
from bbsnap.cli.context import AppContext
from bbsnap.cli.lazy import LazyGroup

if TYPE_CHECKING:
    from bbsnap.errors import BbsnapError


class BbsnapGroup(LazyGroup):
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
            sys.stdout = open(os.devnull, "w")  # the flush at exit goes here
            ctx.exit(128 + 13)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # the one catch point
            from bbsnap.errors import BbsnapError

            app = ctx.obj if isinstance(ctx.obj, AppContext) else None
            known = exc if isinstance(exc, BbsnapError) else None
            known = _explained(exc, app) or known
            if known is not None:
                click.echo(f"bbsnap: error: {escape(known)}", err=True)
                if app is not None and app.debug:
                    raise
                ctx.exit(known.exit_code)
            if app is not None and app.debug:
                raise
            click.echo(f"bbsnap: internal error: {type(exc).__name__}: {escape(exc)} "
                       "(rerun with --debug for a traceback)", err=True)
            ctx.exit(1)
        finally:
            if isinstance(ctx.obj, AppContext):
                ctx.obj.close()


# Each group's module is imported when its name is given (lazy.py).
COMMANDS = {
    "command-server": "bbsnap.cli.command_server:command_server",
    "doctor": "bbsnap.cli.doctor:doctor",
    "images": "bbsnap.cli.images:images",
    "registry": "bbsnap.cli.registry:registry",
    "schedule": "bbsnap.cli.schedule:schedule",
    "servers": "bbsnap.cli.servers:servers",
    "types": "bbsnap.cli.servers:types",
}


@click.group(cls=BbsnapGroup, lazy_commands=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
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



# -- failures that are not bugs, though they do not arrive as BbsnapErrors -----------------

def _explained(exc: BaseException, app: AppContext | None) -> "BbsnapError | None":
    """The BbsnapError *exc* amounts to, or None (a BbsnapError as it is, or a real bug).

    SQLite's errors reach here from any catalogue query (damaged pages show on the first
    query that reads them), and the catalogue's open/BEGIN wrappers name the failure but not
    the way out: both are classified once, by catalogue_errors. A failed write to standard
    output is recognised by identity (_WatchedStdout), never guessed from an errno that any
    file could have raised.
    """
    from bbsnap.errors import CatalogueError

    stdout_error = _watched.last_error if _watched is not None else None
    if stdout_error is not None and _caused_by(exc, stdout_error):
        return _stdout_failure(stdout_error)
    sqlite3 = sys.modules.get("sqlite3")  # not imported: no SQLite error is possible
    if sqlite3 is None:
        return None
    cause = exc.__cause__ if isinstance(exc, CatalogueError) and exc.hint is None else exc
    if isinstance(cause, sqlite3.Error):
        from bbsnap.state.catalogue_errors import catalogue_failure

        return catalogue_failure(cause, _catalogue_path(app))
    return None


def _stdout_failure(exc: OSError) -> "BbsnapError":
    from bbsnap.errors import BbsnapError

    sys.stdout = open(os.devnull, "w")  # the flushes at exit must not fail (or say it) again
    return BbsnapError(f"cannot write to standard output: {exc.strerror or exc}",
                       hint="what was written is incomplete; check where the output goes")


def _caused_by(exc: BaseException, cause: BaseException) -> bool:
    """Whether *cause* is *exc* or in its chain (a service may wrap the OSError)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if seen is cause:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _catalogue_path(app: AppContext | None) -> Any:
    from bbsnap.errors import BbsnapError

    if app is None:
        return None
    try:
        return app.settings.data_dir / "catalogue.sqlite3"
    except BbsnapError:
        return None


class _WatchedStdout(io.FileIO):
    """File descriptor 1, remembering the error of a failed write (a full disk, /dev/full,
    a device gone), so the catch point can say it was standard output that failed."""

    last_error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except BrokenPipeError:
            raise  # the reader left: quiet, exit 141 (BbsnapGroup.invoke)
        except OSError as exc:
            self.last_error = exc
            raise


_watched: _WatchedStdout | None = None


def _watch_stdout() -> None:
    """Route sys.stdout (text and .buffer) through a _WatchedStdout on the same descriptor."""
    global _watched
    stream = sys.stdout
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test harness's capture): nothing to watch
    _watched = _WatchedStdout(fd, "w", closefd=False)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(_watched), encoding=stream.encoding,
                                  errors=stream.errors, line_buffering=bool(stream.line_buffering))


def main() -> NoReturn:
    """The console entry point: run one command, then leave at once.

    ``os._exit`` skips the interpreter's teardown (~20 ms of freeing modules and closing
    libvirt) and the catalogue's close (see ``context.leave_open_at_exit``); files the
    commands wrote are closed by then, output is flushed here, and then the catalogue is
    checkpointed.
    """
    os._exit(run_command())


def run_command() -> int:
    """Run the command in sys.argv to its end, output flushed and catalogue settled, and
    return its exit status; the process must end right after (main, or the command
    server's child, bbsnap/cmdserver/session.py)."""
    context.leave_open_at_exit = True
    _watch_stdout()
    try:
        cli.main(prog_name="bbsnap")
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc.code)
    code = _flush(code)
    return _settle_catalogue(code)


def _flush(code: int = 0) -> int:
    """Flush what is still buffered; if standard output cannot take it, the output is
    incomplete, which a command that otherwise succeeded must not hide (exit 1)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            pass  # the reader left (`bbsnap images list | head`): nothing more to say
        except OSError as exc:
            if stream is sys.stdout:
                print(f"bbsnap: error: {escape(_stdout_failure(exc))}", file=sys.stderr)
                code = code or 1
        except ValueError:
            pass  # already closed
    return code


def _settle_catalogue(code: int) -> int:
    """Checkpoint what the command committed, after its output is out (a caller reading it
    is not kept waiting); a command whose rows are not durable does not exit 0."""
    from bbsnap.errors import BbsnapError

    try:
        context.settle_at_exit()
    except BbsnapError as exc:
        print(f"bbsnap: error: {escape(exc)}", file=sys.stderr)
        _flush()
        return code or exc.exit_code
    return code


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(escape(code), file=sys.stderr)  # what sys.exit does with a message
    return 1


if __name__ == "__main__":  # pragma: no cover
    main()

"""Options and behaviour shared by several commands."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import click

from bbsnap.text import escape
from bbsnap.cli.render import OUTPUT_FORMATS

F = Callable[..., Any]


def output_options(func: F) -> F:
    func = click.option("-s", "--simple", is_flag=True,
                        help="Tab-separated values without header (for scripts).")(func)
    func = click.option("--format", "output_format", type=click.Choice(OUTPUT_FORMATS),
                        default="table", show_default=True, help="Output format.")(func)
    return func


def say(text: str) -> None:
    """One line for the user on stderr (a note, a step, an error), its control characters
    escaped: names, file names and guest-reported text are interpolated into these."""
    click.echo(escape(text), err=True)


def for_each(keys: tuple[str, ...], action: Callable[[str], Any],
             done_message: Callable[[str], str] | None = None) -> None:
    """Run *action* on every id of a many-id verb: one failure does not stop the others;
    each is reported, and the command exits with the first failure's code."""
    from bbsnap.errors import BbsnapError

    failure: BbsnapError | None = None
    for key in keys:
        try:
            action(key)
            if done_message is not None:
                say(done_message(key))
        except BbsnapError as exc:
            if len(keys) == 1:
                raise
            say(f"bbsnap: error: {exc}")
            failure = failure or exc
    if failure is not None:
        raise click.exceptions.Exit(failure.exit_code)


@contextmanager
def bulk_listing() -> Iterator[None]:
    """Read and render a long listing with the cyclic garbage collector off: its 10k rows
    are tens of thousands of new objects and no cycles, and the collector's passes over them
    were a quarter of `images list` (bench_cli.py). Reference counting still frees them."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

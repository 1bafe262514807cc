"""Options shared by several commands."""

from __future__ import annotations

from typing import Any, Callable

import click

from .render import OUTPUT_FORMATS

F = Callable[..., Any]


def output_options(func: F) -> F:
    func = click.option("-s", "--simple", is_flag=True,
                        help="Tab-separated values without header (for scripts).")(func)
    func = click.option("--format", "output_format", type=click.Choice(OUTPUT_FORMATS),
                        default="table", show_default=True, help="Output format.")(func)
    return func

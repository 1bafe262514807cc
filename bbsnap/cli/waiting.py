"""`--wait`: follow images until they leave `creating`, with a progress bar on a terminal."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from ..models import ImageStatus
from ..sizes import MIB
from .options import say


def wait_for_images(app: Any, image_ids: list[str], poll: float = 0.25) -> None:
    """Block until every image is available or failed; exit 1 if any failed."""
    from ..errors import BbsnapError

    tty = sys.stderr.isatty()
    failed = []
    for image_id in image_ids:
        while True:
            image = app.catalogue.get(image_id, include_deleted=True)
            if image.status is not ImageStatus.CREATING:
                break
            if tty:
                done = f"{image.progress}%, " if image.progress is not None else ""
                sys.stderr.write(f"\r{image_id}: copying, {done}{image.disk_size // MIB} MiB "
                                 "so far")
                sys.stderr.flush()
            time.sleep(poll)
            app.recover()  # a dead worker is adopted or failed while we wait
        if tty:
            sys.stderr.write("\n")
        if image.status is ImageStatus.AVAILABLE:
            say(f"Image {image_id} is available")
        else:
            failed.append(image)
            say(f"bbsnap: error: snapshot {image_id} failed: {image.failure_reason}")
    if failed:
        raise click.exceptions.Exit(BbsnapError.exit_code)

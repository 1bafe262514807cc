"""`--wait`: the outcome of each image waited for (services/snapshots/wait.py waits)."""

from __future__ import annotations

from typing import Any

import click

from bbsnap.models import ImageStatus
from bbsnap.cli.options import say


def wait_for_images(app: Any, image_ids: list[str]) -> None:
    """Block until every image is available or failed; exit 1 if any failed."""
    from bbsnap.errors import BbsnapError
    from bbsnap.services.snapshots.wait import wait_settled

    failed = False
    for image in wait_settled(app.catalogue, image_ids, app.recover, reporter=app.reporter):
        if image.status is ImageStatus.AVAILABLE:
            say(f"Image {image.id} is available")
        else:
            failed = True
            say(f"bbsnap: error: snapshot {image.id} failed: {image.failure_reason}")
    if failed:
        raise click.exceptions.Exit(BbsnapError.exit_code)

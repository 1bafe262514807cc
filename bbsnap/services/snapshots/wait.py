"""Waiting for images to leave `creating` (`--wait`): a use case, not a CLI loop.

The copy runs in a worker process; waiting polls the catalogue and runs crash recovery
between polls, so a worker that died while we waited is adopted or failed (the image
then ends instead of staying `creating` forever).
"""

from __future__ import annotations

import time
from typing import Callable

from bbsnap.state.catalogue import Catalogue
from bbsnap.models import Image, ImageStatus
from bbsnap.reporting import SILENT, Reporter

POLL_SECONDS = 0.25


def wait_settled(catalogue: Catalogue, image_ids: list[str], recover: Callable[[], None], *,
                 reporter: Reporter = SILENT, poll: float = POLL_SECONDS) -> list[Image]:
    """Each image once it is no longer creating (available, failed or deleted), in order."""
    settled = []
    for image_id in image_ids:
        try:
            while True:
                image = catalogue.get(image_id, include_deleted=True)
                if image.status is not ImageStatus.CREATING:
                    break
                reporter.progress(f"{image_id}: copying", image.disk_size,
                                  percent=image.progress)
                time.sleep(poll)  # the worker writes the row; nothing to wait on but time
                recover()
        finally:
            reporter.progress_end()
        settled.append(image)
    return settled

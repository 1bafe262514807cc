"""Recover work interrupted by a crash: no image stays `creating` after its process died.

Run at the start of catalogue-using commands. Cheap when there is nothing to do
(one indexed query), so it can run every time.
"""

from __future__ import annotations

from ..catalogue import Catalogue
from ..jobs import job_alive
from ..layout import DataDir
from ..models import Image, ImageStatus


def recover_interrupted(catalogue: Catalogue, data_dir: DataDir) -> list[Image]:
    """Mark images whose creating process is gone as failed and delete their work files."""
    recovered = []
    for image in catalogue.creating():
        if job_alive(image.job):
            continue
        _remove_work_files(data_dir, image.id)
        recovered.append(catalogue.update(
            image.id, expect_status=ImageStatus.CREATING, status=ImageStatus.FAILED,
            failure_reason="interrupted: the bbsnap process creating it stopped", job=None))
    return recovered


def _remove_work_files(data_dir: DataDir, image_id: str) -> None:
    for path in data_dir.tmp_dir.glob(f"{image_id}.*"):
        path.unlink(missing_ok=True)
    for path in data_dir.images_dir.glob(f"{image_id}.*"):
        # A finished file is only renamed into place before the row turns available, so an
        # interrupted job's final file is as untrusted as its partial one.
        path.unlink(missing_ok=True)

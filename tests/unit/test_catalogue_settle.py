"""When the CLI's exit path may leave its checkpoint to another process (cli/context.py)."""

from __future__ import annotations

import subprocess

from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.cli.context import _another_job_commits_later
from bbsnap.state.process_tokens import current_job_token, token_for_pid
from bbsnap.models import Image, ImageStatus, ImageType


def _creating(image_id: str, job: str | None) -> Image:
    return Image(id=image_id, type=ImageType.SNAPSHOT, owner="me", created_at=utcnow(),
                 status=ImageStatus.CREATING, name=image_id, job=job)


def test_only_an_image_this_command_handed_to_a_live_worker_defers_the_checkpoint(tmp_path):
    worker = subprocess.Popen(["sleep", "30"])
    try:
        token = token_for_pid(worker.pid)
        command = Catalogue(tmp_path / "c.sqlite3")
        other = Catalogue(tmp_path / "c.sqlite3")
        try:
            other.add(_creating("img-other", token))  # an unrelated long copy
            assert not _another_job_commits_later(command)
            command.add(_creating("img-mine0", current_job_token()))
            assert not _another_job_commits_later(command)  # still ours to finish
            command.update("img-mine0", job=token)  # handed to the worker
            assert _another_job_commits_later(command)
        finally:
            command.close()
            other.close()
    finally:
        worker.kill()
        worker.wait()
    reopened = Catalogue(tmp_path / "c.sqlite3")
    reopened.update("img-mine0", description="touched")
    try:
        assert not _another_job_commits_later(reopened)  # the worker is dead: checkpoint
    finally:
        reopened.close()

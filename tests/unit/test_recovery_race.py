"""Recovery decides on each image as it is when it acts, not as it was listed
(services/recovery.py): an image that became available, or was handed to a worker, after
the list of ``creating`` rows was read keeps its row and its file. Found by
test_concurrency.py's eight processes: an ``available`` row left without its file."""

from __future__ import annotations

import dataclasses

import pytest

from bbsnap.models import Image, ImageStatus, ImageType, SnapshotDisk, SnapshotJob
from bbsnap.services import recovery
from bbsnap.state.catalogue import utcnow
from bbsnap.state.process_tokens import current_job_token

DEAD = "999999:1:not-this-boot"  # a token no live process has


def _image(image_id: str, **fields: object) -> Image:
    base: dict[str, object] = {"id": image_id, "type": ImageType.UPLOAD, "owner": "me",
                               "created_at": utcnow(), "status": ImageStatus.CREATING,
                               "name": image_id, "job": DEAD}
    base.update(fields)
    return Image(**base)  # type: ignore[arg-type]


def _listed_as_creating(monkeypatch: pytest.MonkeyPatch, catalogue, image: Image) -> None:
    """The list recovery reads, as it was before *image* changed: creating, its process dead."""
    stale = dataclasses.replace(image, status=ImageStatus.CREATING, job=DEAD)
    monkeypatch.setattr(catalogue, "creating", lambda: [stale])


def test_an_image_made_available_after_the_list_was_read_keeps_its_file(
        monkeypatch, catalogue, data):
    catalogue.add(_image("img-aaaaa", status=ImageStatus.AVAILABLE, job=None,
                         path="img-aaaaa.qcow2"))
    stored = data.images_dir / "img-aaaaa.qcow2"
    stored.write_bytes(b"the image")
    _listed_as_creating(monkeypatch, catalogue, catalogue.get("img-aaaaa"))
    assert recovery.recover_interrupted(catalogue, data) == []
    assert stored.read_bytes() == b"the image"
    assert catalogue.get("img-aaaaa").status is ImageStatus.AVAILABLE


def test_a_snapshot_handed_to_a_live_worker_after_the_list_was_read_is_left_to_it(
        monkeypatch, catalogue, data):
    job = SnapshotJob(domain="srv-aaaaa", domain_uuid="6f1c0c1e-0000-4000-8000-000000000001",
                      mode="backup", disks=(SnapshotDisk("vda", "/nowhere.qcow2", "qcow2",
                                                         str(data.tmp_dir / "img-bbbbb.qcow2")),))
    catalogue.add(_image("img-bbbbb", type=ImageType.SNAPSHOT, job=current_job_token()),
                  snapshot_job=job)
    work = data.tmp_dir / "img-bbbbb.qcow2"
    work.write_bytes(b"being copied")
    adopted: list[str] = []
    _listed_as_creating(monkeypatch, catalogue, catalogue.get("img-bbbbb"))
    assert recovery.recover_interrupted(catalogue, data, lambda i, _lock: adopted.append(i)) == []
    assert adopted == []
    assert work.exists()
    assert catalogue.get("img-bbbbb").status is ImageStatus.CREATING


def test_an_image_whose_row_went_after_the_list_was_read_is_skipped(monkeypatch, catalogue,
                                                                     data):
    monkeypatch.setattr(catalogue, "creating", lambda: [_image("img-ccccc")])
    assert recovery.recover_interrupted(catalogue, data) == []


def test_an_abandoned_import_is_failed_and_its_work_files_removed(catalogue, data):
    catalogue.add(_image("img-ddddd"))
    partial = data.tmp_dir / "img-ddddd.qcow2.partial"
    partial.write_bytes(b"half")
    (failed,) = recovery.recover_interrupted(catalogue, data)
    assert failed.status is ImageStatus.FAILED and "interrupted" in (failed.failure_reason or "")
    assert not partial.exists()
    assert catalogue.creating() == []

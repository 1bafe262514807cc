"""Layer records per disk (migration 8): a catalogue of the version before keeps its layer
rows as the images' own files'; two disks of one image may be the same layer; a volume's
layer never names the image as a whole."""

from __future__ import annotations

import sqlite3

from bbsnap.models import Image, ImageStatus, ImageType
from bbsnap.registry.records import LayerRecord, LayerRecords
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.state.migrations import MIGRATIONS

DIGEST = "sha256:" + "a" * 64


def _add(catalogue: Catalogue, image_id: str) -> None:
    catalogue.add(Image(id=image_id, type=ImageType.UPLOAD, owner="me", created_at=utcnow(),
                        status=ImageStatus.AVAILABLE, name=image_id))


def test_layer_rows_of_the_version_before_are_kept_as_the_images_own(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as raw:
        for migration in MIGRATIONS[:7]:
            for statement in migration:
                raw.execute(statement)
        raw.execute("PRAGMA user_version = 7")
        raw.execute("INSERT INTO images (id, type, owner, created_at, updated_at, status, name, "
                    "arch) VALUES ('img-old00', 'upload', 'me', ?, ?, 'available', 'old', "
                    "'x86_64')", (utcnow().isoformat(), utcnow().isoformat()))
        raw.execute("INSERT INTO registry_layers (digest, image_id, parent_digest, size, origin, "
                    "file_identity, repository) VALUES (?, 'img-old00', NULL, 5, 'pulled', "
                    "NULL, 'h/r')", (DIGEST,))
    catalogue = Catalogue(path)
    try:
        records = LayerRecords(catalogue)
        assert [r.device for r in records.for_image("img-old00")] == [""]
        found = records.image_for(DIGEST)
        assert found is not None and found.id == "img-old00"
    finally:
        catalogue.close()


def test_two_disks_of_one_image_may_be_one_layer_and_name_no_image(tmp_path):
    catalogue = Catalogue(tmp_path / "c.sqlite3")
    try:
        _add(catalogue, "img-two00")
        records = LayerRecords(catalogue)
        for device in ("vdb", "vdc"):
            records.add(LayerRecord(DIGEST, "img-two00", None, 5, "pulled", None, "h/r", device))
        assert sorted(r.device for r in records.for_image("img-two00", None)) == ["vdb", "vdc"]
        assert records.for_image("img-two00") == []
        # Only an image's own file stands for the image when a pull looks a layer up.
        assert records.image_for(DIGEST) is None
    finally:
        catalogue.close()

"""Which catalogue image a layer digest is: pulled layers (found again by digest, so a
second pull registers nothing) and pushed ones (not hashed again while the file is the
same, and named by the digest a registry already has).

The table ``registry_layers`` is the catalogue's (migrations 6 and 8): it refers to image
rows, and a row whose image is gone or not available is ignored. ``device`` is '' for an
image's own file and the volume's device (vdb...) for a further disk's layer.
"""

from __future__ import annotations

import os
from pathlib import Path

from bbsnap.lazy_dataclass import dataclass
from bbsnap.state.catalogue import Catalogue
from bbsnap.errors import NotFoundError
from bbsnap.models import Image, ImageStatus

@dataclass(frozen=True)
class LayerRecord:
    digest: str
    image_id: str
    parent_digest: str | None
    size: int
    origin: str            # "pulled" or "pushed"
    file_identity: str | None
    repository: str | None  # host/repository it was last seen in
    device: str = ""        # '' for the image's own file, else the volume's (vdb...)


def file_identity(path: Path) -> str:
    """Changes when the file is replaced or written (a prune merge renames a new one in)."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class LayerRecords:
    def __init__(self, catalogue: Catalogue) -> None:
        self._catalogue = catalogue

    def image_for(self, digest: str) -> Image | None:
        """An available image whose content is the layer *digest* (pulled, or pushed from
        an unchanged file), or None."""
        with self._catalogue.transaction() as db:
            rows = db.execute("SELECT image_id FROM registry_layers WHERE digest = ? "
                              "AND device = '' ORDER BY origin DESC", (digest,)).fetchall()
        for image_id in (row["image_id"] for row in rows):
            try:
                image = self._catalogue.get(image_id)
            except NotFoundError:
                continue
            if image.status is ImageStatus.AVAILABLE:
                return image
        return None

    def for_image(self, image_id: str, device: str | None = "") -> list[LayerRecord]:
        """The records of *image_id*'s own file ('' ), of one volume, or all (None)."""
        query = ("SELECT digest, image_id, parent_digest, size, origin, file_identity, "
                 "repository, device FROM registry_layers WHERE image_id = ?")
        params: tuple[str, ...] = (image_id,)
        if device is not None:
            query, params = query + " AND device = ?", (image_id, device)
        with self._catalogue.transaction() as db:
            rows = db.execute(query, params).fetchall()
        return [LayerRecord(**dict(row)) for row in rows]

    def add(self, record: LayerRecord) -> None:
        with self._catalogue.transaction() as db:
            db.execute("INSERT OR REPLACE INTO registry_layers (digest, image_id, "
                       "parent_digest, size, origin, file_identity, repository, device) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.digest, record.image_id, record.parent_digest, record.size,
                        record.origin, record.file_identity, record.repository,
                        record.device))

"""Catalogue use cases other than import: list, show, update, destroy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bbsnap import ids
from bbsnap.lazy_dataclass import dataclass
from bbsnap.state.catalogue import Catalogue
from bbsnap.errors import ConflictError, UsageError
from bbsnap.state.layout import DataDir
from bbsnap.models import (Dependent, Image, ImageFilter, ImageStatus, ImageSummary, ImageType,
                           ImageVolume, Visibility)
from bbsnap.services import image_fields

STATUS_CHOICES = ("creating", "available", "private", "public", "failed", "deleted")


@dataclass(frozen=True)
class ImageChanges:
    name: str | None = None
    description: str | None = None
    username: str | None = None
    arch: str | None = None
    min_ram: int | None = None
    firmware: str | None = None
    public: bool | None = None


# (domain UUID, checkpoint name): remove a destroyed snapshot's checkpoint from its domain
ForgetCheckpoint = Callable[[str, str], None]


def _image_filter(image_type: str | None, status: str | None,
                  source_server: str | None) -> ImageFilter:
    if status is not None and status not in STATUS_CHOICES:
        raise UsageError(f"unknown status '{status}'", hint=f"one of {', '.join(STATUS_CHOICES)}")
    return ImageFilter(type=ImageType(image_type) if image_type else None, status=status,
                       source_server=source_server)


class ImageService:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir,
                 forget_checkpoint: ForgetCheckpoint | None = None) -> None:
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._forget_checkpoint = forget_checkpoint

    def find(self, image_type: str | None = None, status: str | None = None, *,
             source_server: str | None = None) -> list[Image]:
        """*source_server*: only that server's snapshots (its history, oldest first)."""
        return self._catalogue.find(_image_filter(image_type, status, source_server))

    def summaries(self, image_type: str | None = None, status: str | None = None, *,
                  source_server: str | None = None) -> list[ImageSummary]:
        """find()'s images as a listing's table shows them."""
        return self._catalogue.summaries(_image_filter(image_type, status, source_server))

    def get(self, image_id: str) -> Image:
        return self._catalogue.get(ids.require(image_id, "img"))

    def dependents(self, image_id: str) -> list[Dependent]:
        return self._catalogue.dependents(image_id)

    def update(self, image_id: str, changes: ImageChanges) -> Image:
        ids.require(image_id, "img")
        fields: dict[str, Any] = {}
        if changes.name is not None:
            fields["name"] = image_fields.check_name(changes.name)
        if changes.description is not None:
            fields["description"] = image_fields.check_description(changes.description)
        if changes.username is not None:
            fields["username"] = image_fields.check_username(changes.username)
        if changes.arch is not None:
            fields["arch"] = image_fields.check_arch(changes.arch)
        if changes.min_ram is not None:
            fields["min_ram"] = image_fields.check_min_ram(changes.min_ram)
        if changes.firmware is not None:
            fields["firmware"] = image_fields.check_firmware(changes.firmware)
        if changes.public is not None:
            fields["visibility"] = Visibility.PUBLIC if changes.public else Visibility.PRIVATE
        if not fields:
            raise UsageError("nothing to update", hint="give at least one option, see --help")
        image = self._catalogue.get(image_id)
        if image.status is ImageStatus.DELETED:
            raise ConflictError(f"image {image_id} is deleted")
        return self._catalogue.update(image_id, **fields)

    def destroy(self, image_id: str) -> Image:
        """Delete an image: the row first (atomically refused while in use), then its file.

        A crash between the two leaves an orphaned file, never a row without its file.
        """
        ids.require(image_id, "img")
        image = self._catalogue.get(image_id)
        if image.status is ImageStatus.CREATING:
            raise ConflictError(f"image {image_id} is still being created",
                                hint="wait until it is available or failed")
        volumes = self._catalogue.volumes(image_id)
        # Resolved before the row changes: a path that leads out of images/ is refused with
        # the row intact, rather than leaving a deleted row whose file was never removed.
        files = [self._data_dir.image_path(name)
                 for name in [image.path, *(v.path for v in volumes), image.memory_path]
                 if name]
        link = self._catalogue.chain_link(image_id)
        self._catalogue.mark_deleted(image_id)
        for path in files:
            path.unlink(missing_ok=True)
        self._data_dir.remove_blank_overlays(image_id)
        if link is not None and self._forget_checkpoint is not None:
            # Only bbsnap's own checkpoint of this snapshot (and its bitmap) goes: the next
            # snapshot would not start from it any more (services/snapshots/chain.py).
            self._forget_checkpoint(link.domain_uuid, link.checkpoint)
        return image

    def volumes(self, image_id: str) -> list[ImageVolume]:
        return self._catalogue.volumes(image_id)

"""`images push IMG REF`: an image and its storage chain as one OCI artifact.

One layer per chain file, base first (layers.py), a config blob with each image's
catalogue metadata (artifact.py), a manifest tagged REF. What the repository already
holds is not sent again: a chain image pulled from a registry is named by the layer it
came as, one pushed before by the digest recorded then (the file unchanged), and any
layer the repository has (``HEAD``) or another repository of the registry can lend
(mount) is skipped. So the tenth snapshot of a server whose earlier ones were pushed
uploads its own delta only.

A chain with further disks (catalogue volumes) goes up as one layer chain per disk, each
volume file a layer like the image's own (disk_layout.py: the manifest and config of such
an image); a disk's layer the repository has is skipped as any other, so a second push
sends the disks that changed.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import field
from pathlib import Path

from bbsnap.lazy_dataclass import dataclass
from bbsnap.state.catalogue import Catalogue
from bbsnap.errors import ConflictError, InvalidInputError
from bbsnap.state.layout import DataDir
from bbsnap.models import Image, ImageStatus, ImageVolume
from bbsnap.services.stored_chain import require_inside
from bbsnap.reporting import SILENT, Reporter
from bbsnap.registry import artifact, disk_layout, layers, uploads
from bbsnap.registry.client import DEFAULT_CHUNK, RegistryClient
from bbsnap.registry.records import LayerRecord, LayerRecords, file_identity
from bbsnap.registry.reference import Reference

Note = Callable[[str], None]  # a step line for the user (Reporter.step)


@dataclass
class PushResult:
    reference: Reference
    digest: str                     # the manifest's
    uploaded: int                   # request body bytes sent (retries included)
    layers: list[tuple[str, str, str]] = field(default_factory=list)  # image, digest, how


def registry_dir(data_dir: DataDir) -> Path:
    return data_dir.root / "registry"


@dataclass(frozen=True)
class StoredVolume:
    """A further disk of a chain image, its file vetted (inside images/)."""

    volume: ImageVolume
    path: Path
    backed: bool          # stored on the image below's disk of the same device


def chain_of(catalogue: Catalogue, data_dir: DataDir, image_id: str, *,
             multi_disk: bool = False) -> list[tuple[Image, Path]]:
    """The image and the images it is stored on, base first, each with its file; refused
    unless every file is inside images/ and the files' chain is the rows' chain. Unless
    *multi_disk* (their volumes are volume_files'), an image with further disks is refused."""
    top = catalogue.get(image_id)
    if top.status is not ImageStatus.AVAILABLE:
        raise ConflictError(f"image {image_id} is {top.status.value}, not available",
                            hint="wait until it is available")
    if not multi_disk and catalogue.volumes(image_id):
        raise InvalidInputError(f"image {image_id} has more than one disk; a containerDisk "
                                "holds one", hint="push it without --containerdisk")
    rows = [top]
    while rows[-1].parent_id is not None:
        if len(rows) > artifact.MAX_CHAIN:
            raise InvalidInputError(f"image {image_id}'s chain is longer than "
                                    f"{artifact.MAX_CHAIN}")
        rows.append(catalogue.get(rows[-1].parent_id))
    files = require_inside(data_dir, image_id, data_dir.image_path(top.path or ""))
    if [f.name for f in files] != [Path(r.path or "").name for r in rows]:
        raise InvalidInputError(f"image {image_id}'s files are not stored as its catalogue "
                                "rows say", hint="run 'bbsnap doctor'")
    return list(zip(reversed(rows), reversed(files), strict=True))


def volume_files(catalogue: Catalogue, data_dir: DataDir,
                 chain: list[tuple[Image, Path]]) -> list[list[StoredVolume]]:
    """Each chain image's further disks, base first; refused unless every file is inside
    images/, standalone or stored on the image below's disk of the same device."""
    out: list[list[StoredVolume]] = []
    below: dict[str, Path] = {}
    for image, _path in chain:
        mine = []
        for volume in catalogue.volumes(image.id):
            if not disk_layout.valid_target(volume.device):
                raise InvalidInputError(f"image {image.id}'s disk {volume.device!r} has a name "
                                        "an image in a registry cannot carry")
            path = data_dir.image_path(volume.path)
            files = require_inside(data_dir, image.id, path)
            if len(files) > 2 or (len(files) == 2 and files[1] != below.get(volume.device)):
                raise InvalidInputError(f"image {image.id}'s disk {volume.device} is stored "
                                        f"on a file that is not disk {volume.device} of the "
                                        "image below it", hint="run 'bbsnap doctor'")
            mine.append(StoredVolume(volume, path, len(files) == 2))
        below = {v.volume.device: v.path.resolve() for v in mine}
        out.append(mine)
    return out


class Pusher:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir, *, insecure: bool = False,
                 timeout: float = 30.0, chunk_size: int = DEFAULT_CHUNK,
                 reporter: Reporter = SILENT) -> None:
        self._reporter = reporter
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._records = LayerRecords(catalogue)
        self._insecure = insecure
        self._timeout = timeout
        self._chunk = chunk_size
        self._journal = uploads.UploadJournal(registry_dir(data_dir) / "uploads")

    def client(self, ref: Reference, mount_from: list[str]) -> RegistryClient:
        scopes = [f"repository:{ref.repository}:pull,push",
                  *(f"repository:{r}:pull" for r in mount_from if r != ref.repository)]
        return RegistryClient(ref, insecure=self._insecure, timeout=self._timeout,
                              scopes=scopes, chunk_size=self._chunk)

    def push(self, image_id: str, ref: Reference) -> PushResult:
        if ref.tag is None:
            raise InvalidInputError(f"push to a tag, not a digest: {ref}")
        chain = chain_of(self._catalogue, self._data_dir, image_id, multi_disk=True)
        volumes = volume_files(self._catalogue, self._data_dir, chain)
        note = self._reporter.step
        mount_from = self._known_repositories(ref, [image for image, _ in chain])
        client = self.client(ref, mount_from)
        try:
            result = PushResult(ref, "", 0)
            entries: list[artifact.ChainEntry] = []
            sizes: dict[str, int] = {}
            parent: str | None = None
            below: dict[str, str] = {}      # device -> the image below's layer of it
            for (image, path), stored in zip(chain, volumes, strict=True):
                digest, size, how = self._layer(client, image, path, parent, mount_from, note)
                result.layers.append((image.id, digest, how))
                sizes[digest] = size
                disks = []
                for disk in stored:
                    device = disk.volume.device
                    under = below[device] if disk.backed else None
                    found, length, how = self._layer(client, image, disk.path, under,
                                                     mount_from, note, device=device)
                    result.layers.append((f"{image.id}/{device}", found, how))
                    sizes[found] = length
                    disks.append(artifact.VolumeEntry(device, found, disk.volume.virtual_size,
                                                      under))
                entries.append(artifact.ChainEntry.of(image, digest, tuple(disks)))
                below = {d.target: d.digest for d in disks}
                parent = digest
            if artifact.is_multi_disk(entries):
                descriptors = disk_layout.manifest_layers(entries, sizes)
                config = artifact.config_blob(entries, disk_layout.disk_list(entries))
            else:  # version 1, as older bbsnap reads it
                descriptors, config = [], artifact.config_blob(entries)
                for index, entry in enumerate(entries):
                    descriptors.append(artifact.layer_descriptor(
                        entry.digest, sizes[entry.digest],
                        entries[index - 1].digest if index else None))
            config_digest = _sha256(config)
            uploads.ensure_blob(client, self._journal, config_digest, len(config),
                                lambda offset: io.BytesIO(config[offset:]))
            top = chain[-1][0]
            body = artifact.manifest(
                artifact.Descriptor(artifact.config_media_type(entries), config_digest,
                                    len(config), {}),
                descriptors,
                {"org.opencontainers.image.created": top.created_at.isoformat(),
                 "org.opencontainers.image.title": top.name[:256],
                 "dev.bbsnap.image.id": top.id})
            result.digest = client.put_manifest(ref.tag, artifact.OCI_MANIFEST, body)
            result.uploaded = client.bytes_sent
            return result
        finally:
            client.close()

    def _known_repositories(self, ref: Reference, images: list[Image]) -> list[str]:
        """Repositories of the same registry a chain image was pushed to or pulled from."""
        found: list[str] = []
        for image in images:
            for record in self._records.for_image(image.id, device=None):
                host, _, repository = (record.repository or "").partition("/")
                if host == ref.host and repository and repository not in found:
                    found.append(repository)
        return found

    def _layer(self, client: RegistryClient, image: Image, path: Path, parent: str | None,
               mount_from: list[str], note: Note, device: str = "") -> tuple[str, int, str]:
        """The layer digest and size for *image*'s file *path* (its own, or its disk
        *device*'s) on the layer *parent*, in the repository."""
        identity = file_identity(path)
        where = f"{client.ref.host}/{client.ref.repository}"
        label = f"{image.id} {device}" if device else image.id
        records = [r for r in self._records.for_image(image.id, device)
                   if r.parent_digest == parent
                   and (r.origin == "pulled" or r.file_identity == identity)]
        for record in records:
            # What this image was pulled as (or pushed as, from this very file) is its
            # content under another name: where the registry has it, nothing is read.
            how = _present_or_mounted(client, record.digest, mount_from)
            if how is not None:
                self._records.add(LayerRecord(record.digest, image.id, parent, record.size,
                                              record.origin, record.file_identity, where,
                                              device))
                note(f"{label}: layer {record.digest[7:19]} {how}")
                return record.digest, record.size, how
        source = layers.open_layer(path, layers.title(parent) if parent else None)
        try:
            pushed = [r for r in records if r.origin == "pushed"]
            digest = pushed[0].digest if pushed else source.digest()
            how = uploads.ensure_blob(client, self._journal, digest, source.size,
                                      source.opener(), mount_from=mount_from)
        finally:
            source.close()
        note(f"{label}: layer {digest[7:19]} {how} ({source.size} bytes)")
        self._records.add(LayerRecord(digest, image.id, parent, source.size, "pushed", identity,
                                      where, device))
        return digest, source.size, how


def _present_or_mounted(client: RegistryClient, digest: str,
                        mount_from: list[str]) -> str | None:
    if client.has_blob(digest):
        return "present"
    for repository in mount_from:
        if repository != client.ref.repository and client.mount(digest, repository):
            return "mounted"
    return None


def _sha256(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()

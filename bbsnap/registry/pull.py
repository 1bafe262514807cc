"""`images pull REF`: a pushed chain back into the catalogue, every layer vetted as an
untrusted import.

1. the manifest (an index is followed one level, to bbsnap's artifact), the config blob
   (bounded, digest checked), both vetted field by field (artifact.py) before any layer;
2. each layer the catalogue does not hold (found by digest, records.py) gets a
   ``creating`` row and is streamed straight into images/<id>.qcow2.partial (digest
   checked as it streams, never more bytes than the manifest says nor than its qcow2
   header allows), its header vetted in Python before the first byte is written (the only
   backing name allowed is the layer below's title, no data file, encryption or unknown
   features) and by ``qemu-img info``/``check`` under limits, its virtual size checked
   against the config's; its backing is pointed at the parent's stored file by name, and
   it is kept as it came when plain, rewritten by ``qemu-img convert`` otherwise
   (layer_store.py: what "plain" is, and the figures that made it worth it);
3. only when every layer passed are the rows made available, base first, each image in one
   transaction with its volume rows (a multi-disk image is never available with a disk
   missing). Any refusal removes every row and file this pull made; a killed pull leaves
   ``creating`` rows that the next command's recovery fails and cleans, with every file
   named after them (images/<id>.qcow2 and <id>-<disk>.qcow2, partial or not: the usual
   import recovery).

A multi-disk image (disk_layout.py) brings each chain image's further disks as layers too:
each goes through step 2 as the image's own layer does, into images/<id>-<disk>.qcow2,
stored on the image below's file of the same disk when its layer is a delta.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import field, replace
from pathlib import Path
from datetime import datetime
from typing import BinaryIO, cast

from bbsnap import ids, safe_files
from bbsnap.lazy_dataclass import dataclass
from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.transfer.compression import Compression
from bbsnap.config import Settings
from bbsnap.disks import qemu_img
from bbsnap.disks.qcow2_header import MAX_HEADER_AREA
from bbsnap.errors import HostileImageError, InvalidInputError
from bbsnap.state.process_tokens import current_job_token
from bbsnap.state.layout import FILE_MODE, PARTIAL_SUFFIX, DataDir
from bbsnap.models import Image, ImageStatus, ImageVolume
from bbsnap.services import image_fields
from bbsnap.transfer.stream import copy_decompressed
from bbsnap.reporting import SILENT, Reporter
from bbsnap.registry import artifact, layer_store, layers
from bbsnap.registry.layer_store import LayerHead
from bbsnap.registry.client import BlobReader, RegistryClient, read_small_blob
from bbsnap.registry.records import LayerRecord, LayerRecords, file_identity
from bbsnap.registry.reference import Reference

Note = Callable[[str], None]  # a step line for the user (Reporter.step)
MAX_INDEX_DEPTH = 2
# Writeback starts per 64 MiB downloaded: the fsync before the layer is published then
# took 0.01-0.02 s instead of 0.6-0.8 s on the 1.2 GiB benchmark layer, the download
# itself no slower within this machine's noise (README, bench_registry.py).
WRITEBACK_EVERY = 64 << 20


@dataclass
class PullResult:
    image: Image                       # the top of the chain
    new: list[str]                     # ids registered by this pull, base first
    reused: list[str]                  # ids already held
    digest: str                        # the manifest's
    seconds: dict[str, float]          # per phase (download, vet, rewrite, fsync)


class Puller:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir, settings: Settings, *,
                 insecure: bool = False, reporter: Reporter = SILENT) -> None:
        self._reporter = reporter
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._settings = settings
        self._records = LayerRecords(catalogue)
        self._insecure = insecure
        self._phases = layer_store.Phases()

    def pull(self, ref: Reference, *, name: str | None = None) -> PullResult:
        note = self._reporter.step
        if name is not None:
            image_fields.check_name(name)
        client = RegistryClient(ref, insecure=self._insecure,
                                timeout=self._settings.http_timeout)
        try:
            manifest_digest, pulled = self._manifest(client, ref)
            config = read_small_blob(client, pulled.config.digest, pulled.config.size,
                                     artifact.MAX_CONFIG)
            entries = artifact.read_config(config, pulled)
            # One pull at a time per data directory: two pulls of the same chain would
            # both find its layers missing and register them twice.
            self._data_dir.locks_dir.mkdir(mode=0o700, exist_ok=True)
            with locks.acquire_path(self._data_dir.locks_dir / "registry-pull.lock",
                                    timeout=self._data_dir.lock_timeout,
                                    purpose="images pull", busy="another images pull"):
                return self._chain(client, pulled, entries, manifest_digest, name, note)
        finally:
            client.close()

    def _manifest(self, client: RegistryClient, ref: Reference
                  ) -> tuple[str, artifact.PulledManifest]:
        reference, seen = ref.reference, set()
        for _ in range(MAX_INDEX_DEPTH + 1):
            media, data, digest = client.get_manifest(reference, artifact.ACCEPT)
            if reference.startswith("sha256:") and digest != reference:
                raise HostileImageError(f"the registry's manifest {reference} has the digest "
                                        f"{digest}; refused")
            if digest in seen:
                raise HostileImageError("the manifest index refers back to itself; refused")
            seen.add(digest)
            if media not in (artifact.OCI_INDEX, artifact.DOCKER_LIST):
                limit = self._settings.max_decompressed_size
                return digest, artifact.read_manifest(data, max_layer=limit)
            entries = artifact.index_entries(data)
            # bbsnap's artifact first, then any manifest, then a nested index (bounded).
            ours = [e for e in entries if e.media_type == artifact.OCI_MANIFEST]
            ours = ([e for e in ours if e.annotations.get("artifactType") ==
                     artifact.ARTIFACT_TYPE] or ours or
                    [e for e in entries if e.media_type == artifact.OCI_INDEX])
            if not ours:
                raise InvalidInputError(f"{ref} is an index with no bbsnap image in it")
            reference = ours[0].digest
        raise HostileImageError(f"{ref}: manifest indexes nest more than {MAX_INDEX_DEPTH} "
                                "deep; refused")

    def _chain(self, client: RegistryClient, pulled: artifact.PulledManifest,
               entries: list[artifact.ChainEntry], manifest_digest: str, name: str | None,
               note: Note) -> PullResult:
        local: dict[str, str] = {}          # origin id -> local id
        made: list[_Made] = []
        reused: list[str] = []
        parent: Image | None = None
        below: str | None = None            # the digest of the layer below
        below_disks: dict[str, Path] = {}   # the image below's further disks' files
        by_digest = {layer.digest: layer for layer in pulled.layers}
        # Standalone further-disk layers this pull stored, by digest: an unchanged disk's
        # full copies in two images are one layer, downloaded once.
        fetched: dict[str, Path] = {}
        try:
            for index, (desc, entry) in enumerate(zip(pulled.layers, entries, strict=False)):
                held = self._held(desc.digest, entry)
                if held is not None:
                    local[entry.origin_id] = held.id
                    reused.append(held.id)
                    parent, below = held, desc.digest
                    below_disks = {v.device: self._data_dir.image_path(v.path)
                                   for v in self._catalogue.volumes(held.id)}
                    continue
                top = index == len(entries) - 1
                image = self._register(entry, parent, local, name if top else None)
                done = _Made(image, desc, below)
                made.append(done)
                local[entry.origin_id] = image.id
                note(f"pulling layer {desc.digest[7:19]} ({desc.size} bytes) as {image.id}")
                parent_file = self._data_dir.image_path(parent.path or "") if parent else None
                final = self._data_dir.image_file(image.id)
                self._fill(client, desc, entry.virtual_size, below, parent_file, final, index)
                stored = qemu_img.info(final, "qcow2")
                self._catalogue.update(image.id, expect_status=ImageStatus.CREATING,
                                       virtual_size=stored.virtual_size,
                                       disk_size=stored.actual_size, path=final.name,
                                       format="qcow2", checksum=desc.digest)
                for volume in entry.volumes:
                    layer = by_digest[volume.digest]
                    disk = self._data_dir.images_dir / f"{image.id}-{volume.target}.qcow2"
                    earlier = fetched.get(volume.digest) if volume.backing is None else None
                    if earlier is not None:
                        note(f"copying layer {layer.digest[7:19]} from {earlier.name} as "
                             f"{image.id} {volume.target}")
                        self._copy(earlier, disk)
                    else:
                        note(f"pulling layer {layer.digest[7:19]} ({layer.size} bytes) as "
                             f"{image.id} {volume.target}")
                        self._fill(client, layer, volume.virtual_size, volume.backing,
                                   below_disks[volume.target] if volume.backing else None,
                                   disk, index, what=f"image {index}'s disk {volume.target}")
                    if volume.backing is None:
                        fetched.setdefault(volume.digest, disk)
                    info = qemu_img.info(disk, "qcow2")
                    done.volumes.append((ImageVolume(volume.target, disk.name,
                                                     info.virtual_size, info.actual_size),
                                         layer, volume.backing))
                parent, below = self._catalogue.get(image.id), desc.digest
                below_disks = {v.device: self._data_dir.images_dir / v.path
                               for v, _layer, _under in done.volumes}
            self._publish(client, made)
        except BaseException:
            for done in reversed(made):
                self._data_dir.remove_image_files(done.image.id)
                self._catalogue.remove_row(done.image.id)
            raise
        assert parent is not None
        return PullResult(self._catalogue.get(parent.id), [m.image.id for m in made], reused,
                          manifest_digest, dict(self._phases.seconds))

    def _held(self, digest: str, entry: artifact.ChainEntry) -> Image | None:
        """The catalogue's image that is *entry*: its own layer and every disk's the same."""
        held = self._records.image_for(digest)
        if held is None or held.virtual_size != entry.virtual_size:
            return None
        disks = {v.device for v in self._catalogue.volumes(held.id)}
        if disks != {v.target for v in entry.volumes}:
            return None
        for volume in entry.volumes:
            records = self._records.for_image(held.id, volume.target)
            if not any(r.digest == volume.digest for r in records):
                return None
        return held

    def _publish(self, client: RegistryClient, made: list[_Made]) -> None:
        """Every layer passed: the rows available, base first, each with its volumes."""
        where = f"{client.ref.host}/{client.ref.repository}"
        for done in made:
            image = done.image
            if done.volumes:
                volumes = [v for v, _layer, _under in done.volumes]
                own = self._catalogue.get(image.id).disk_size
                current = self._catalogue.finish_snapshot(
                    image.id, volumes, status=ImageStatus.AVAILABLE, job=None,
                    disk_size=own + sum(v.disk_size for v in volumes))
            else:
                current = self._catalogue.update(image.id, expect_status=ImageStatus.CREATING,
                                                 status=ImageStatus.AVAILABLE, job=None)
            identity = file_identity(self._data_dir.image_path(current.path or ""))
            self._records.add(LayerRecord(done.layer.digest, image.id, done.below,
                                          done.layer.size, "pulled", identity, where))
            for volume, layer, under in done.volumes:
                identity = file_identity(self._data_dir.image_path(volume.path))
                self._records.add(LayerRecord(layer.digest, image.id, under, layer.size,
                                              "pulled", identity, where, volume.device))

    def _register(self, entry: artifact.ChainEntry, parent: Image | None,
                  local: dict[str, str], name: str | None) -> Image:
        # source_server is not registered: it names a server of the machine that pushed,
        # and a local domain of the same name would take the snapshot into its history
        # (revert would give it another machine's disk). The config keeps it.
        draft = Image(
            id="", type=entry.type, owner=self._settings.owner,
            created_at=datetime.fromisoformat(entry.created_at) if entry.created_at
            else utcnow(), status=ImageStatus.CREATING, name=name or entry.name,
            arch=entry.arch, description=entry.description, username=entry.username,
            min_ram=entry.min_ram, firmware=entry.firmware, consistency=entry.consistency,
            virtual_size=entry.virtual_size, ancestor_id=local.get(entry.ancestor or ""),
            parent_id=parent.id if parent is not None else None,
            job=current_job_token())
        added: list[Image] = []

        def claim(image_id: str) -> bool:
            try:  # the insert is the claim: another pull may take the same id meanwhile
                added.append(self._catalogue.add(replace(draft, id=image_id),
                                                 depends_on=draft.parent_id))
            except sqlite3.IntegrityError:
                return False
            return True

        ids.allocate("img", claim)
        return added[0]

    def _copy(self, stored: Path, final: Path) -> None:
        """*final* as a copy of *stored*, a layer this pull already vetted and stored."""
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        with self._phases.timed("copy"):
            layer_store.copy_stored(stored, partial)
        with self._phases.timed("fsync"):
            safe_files.publish(partial, final, mode=FILE_MODE)

    def _fill(self, client: RegistryClient, layer: artifact.Descriptor, virtual_size: int,
              below: str | None, parent_file: Path | None, final: Path, index: int,
              what: str | None = None) -> None:
        """Download *layer* into *final*'s partial file, vet it (stored on *parent_file*,
        the layer *below*'s) and publish it as *final*."""
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        backing_title = layers.title(below) if below is not None else None
        head = LayerHead(virtual_size, layer.size, backing_title,
                         self._settings.max_virtual_size)
        reader = BlobReader(client, layer.digest, layer.size, verify=False)
        label = f"Pulling layer {index + 1}" + (f" ({what})" if what else "")

        def progress(done: int) -> None:
            self._reporter.progress(label, done, layer.size)

        try:
            with self._phases.timed("download"):
                copy_decompressed(cast(BinaryIO, reader), partial, max_output=min(
                    layer.size, self._settings.max_decompressed_size),
                    expected_sha256=layer.digest.split(":", 1)[1], progress=progress,
                    check_head=head, head_size=MAX_HEADER_AREA, compression=Compression.NONE,
                    stated_by="the registry", sync=False, writeback_every=WRITEBACK_EVERY)
        finally:
            self._reporter.progress_end()
            reader.close()
        assert head.header is not None  # the head check ran before the first byte was written
        stored_file = layer_store.settle(partial, head.header, index=index,
                                         virtual_size=virtual_size,
                                         backing_title=backing_title, parent_file=parent_file,
                                         phases=self._phases, what=what)
        with self._phases.timed("fsync"):
            safe_files.publish(stored_file, final, mode=FILE_MODE)


@dataclass
class _Made:
    """An image this pull registered: its own layer and its further disks' (the volume
    row, its layer, the layer it is stored on)."""

    image: Image
    layer: artifact.Descriptor
    below: str | None
    volumes: list[tuple[ImageVolume, artifact.Descriptor, str | None]] = field(
        default_factory=list)

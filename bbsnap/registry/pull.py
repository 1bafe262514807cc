"""`images pull REF`: a pushed chain back into the catalogue, every layer vetted as an
untrusted import.

1. the manifest (an index is followed one level, to bbsnap's artifact), the config blob
   (bounded, digest checked), both vetted field by field (artifact.py) before any layer;
2. each layer the catalogue does not hold (found by digest, records.py) gets a
   ``creating`` row, is streamed into tmp/ (digest checked as it streams, never more
   bytes than the manifest says nor than its qcow2 header allows), its header vetted in
   Python (the only backing name allowed is the layer below's title, no data file,
   encryption or unknown features) and by ``qemu-img info``/``check`` under limits, its
   virtual size checked against the config's; then its backing is pointed at the parent's
   stored file and it is written anew by ``qemu-img convert`` (only its own clusters, on
   that parent), stored as images/<id>.qcow2 with a relative backing name;
3. only when every layer passed are the rows made available, base first. Any refusal
   removes every row and file this pull made; a killed pull leaves ``creating`` rows that
   the next command's recovery fails and cleans (the usual import recovery).
"""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, cast

from bbsnap import ids, safe_files
from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.transfer.compression import Compression
from bbsnap.config import Settings
from bbsnap.disks import qemu_img
from bbsnap.disks.qcow2_header import MAX_HEADER_AREA, read_qcow2_header
from bbsnap.errors import HostileImageError, InvalidInputError
from bbsnap.state.process_tokens import current_job_token
from bbsnap.state.layout import FILE_MODE, PARTIAL_SUFFIX, DataDir
from bbsnap.models import Image, ImageStatus
from bbsnap.services import image_fields
from bbsnap.transfer.stream import OutputLimit, copy_decompressed
from bbsnap.reporting import SILENT, Reporter
from bbsnap.registry import artifact, layers
from bbsnap.registry.client import BlobReader, RegistryClient, read_small_blob
from bbsnap.registry.records import LayerRecord, LayerRecords, file_identity
from bbsnap.registry.reference import Reference

Note = Callable[[str], None]  # a step line for the user (Reporter.step)
MAX_INDEX_DEPTH = 2


@dataclass
class PullResult:
    image: Image                       # the top of the chain
    new: list[str]                     # ids registered by this pull, base first
    reused: list[str]                  # ids already held
    digest: str                        # the manifest's


class Puller:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir, settings: Settings, *,
                 insecure: bool = False, reporter: Reporter = SILENT) -> None:
        self._reporter = reporter
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._settings = settings
        self._records = LayerRecords(catalogue)
        self._insecure = insecure

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
        made: list[tuple[Image, artifact.Descriptor, str | None]] = []
        reused: list[str] = []
        parent: Image | None = None
        below: str | None = None            # the digest of the layer below
        try:
            for index, (desc, entry) in enumerate(zip(pulled.layers, entries, strict=True)):
                held = self._records.image_for(desc.digest)
                if held is not None and held.virtual_size == entry.virtual_size:
                    local[entry.origin_id] = held.id
                    reused.append(held.id)
                    parent, below = held, desc.digest
                    continue
                top = index == len(entries) - 1
                image = self._register(entry, parent, local, name if top else None)
                made.append((image, desc, below))
                local[entry.origin_id] = image.id
                note(f"pulling layer {desc.digest[7:19]} ({desc.size} bytes) as {image.id}")
                self._fill(client, image, desc, entry, parent, below, index)
                parent, below = self._catalogue.get(image.id), desc.digest
            where = f"{client.ref.host}/{client.ref.repository}"
            for image, desc, under in made:
                current = self._catalogue.update(image.id, expect_status=ImageStatus.CREATING,
                                                 status=ImageStatus.AVAILABLE, job=None)
                identity = file_identity(self._data_dir.image_path(current.path or ""))
                self._records.add(LayerRecord(desc.digest, image.id, under, desc.size,
                                              "pulled", identity, where))
        except BaseException:
            for image, _desc, _under in reversed(made):
                self._data_dir.remove_image_files(image.id)
                self._catalogue.remove_row(image.id)
            raise
        assert parent is not None
        return PullResult(self._catalogue.get(parent.id), [m[0].id for m in made], reused,
                          manifest_digest)

    def _register(self, entry: artifact.ChainEntry, parent: Image | None,
                  local: dict[str, str], name: str | None) -> Image:
        draft = Image(
            id="", type=entry.type, owner=self._settings.owner,
            created_at=datetime.fromisoformat(entry.created_at) if entry.created_at
            else utcnow(), status=ImageStatus.CREATING, name=name or entry.name,
            arch=entry.arch, description=entry.description, username=entry.username,
            min_ram=entry.min_ram, firmware=entry.firmware, consistency=entry.consistency,
            virtual_size=entry.virtual_size,
            ancestor_id=local.get(entry.ancestor or ""),
            parent_id=parent.id if parent is not None else None,
            job=current_job_token())
        for _ in range(20):
            candidate = replace(draft, id=ids.new_id("img"))
            try:
                return self._catalogue.add(candidate, depends_on=draft.parent_id)
            except sqlite3.IntegrityError:
                continue
        raise RuntimeError("could not allocate a free image id")

    def _fill(self, client: RegistryClient, image: Image, layer: artifact.Descriptor,
              entry: artifact.ChainEntry, parent: Image | None, below: str | None,
              index: int) -> None:
        tmp = self._data_dir.tmp_dir
        download = tmp / f"{image.id}.download"
        final = self._data_dir.image_file(image.id)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        backing_title = layers.title(below) if below is not None else None
        limit = min(self._settings.max_virtual_size, entry.virtual_size)
        head = _LayerHead(entry.virtual_size, layer.size, backing_title,
                          self._settings.max_virtual_size)
        reader = BlobReader(client, layer.digest, layer.size, verify=False)
        label = f"Pulling layer {index + 1}"

        def progress(done: int) -> None:
            self._reporter.progress(label, done, layer.size)

        try:
            copy_decompressed(cast(BinaryIO, reader), download, max_output=min(
                layer.size, self._settings.max_decompressed_size),
                expected_sha256=layer.digest.split(":", 1)[1], progress=progress,
                check_head=head, head_size=MAX_HEADER_AREA, compression=Compression.NONE,
                stated_by="the registry", sync=False)
        finally:
            self._reporter.progress_end()
            reader.close()
        info = qemu_img.info(download, "qcow2", untrusted=True)
        if info.format != "qcow2" or info.data_file:
            raise HostileImageError(f"layer {index} is not a plain qcow2 image; refused")
        if info.virtual_size != entry.virtual_size or info.virtual_size > limit:
            raise HostileImageError(f"layer {index} is {info.virtual_size} bytes, its config "
                                    f"says {entry.virtual_size}; refused")
        if (info.backing_file or None) != backing_title:
            raise HostileImageError(f"layer {index} names the backing file "
                                    f"{info.backing_file!r}; refused")
        if parent is None:
            self._check(download, index)
            qemu_img.convert(download, "qcow2", partial, "qcow2", untrusted=True,
                             unsafe_cache=True)
        else:
            parent_file = self._data_dir.image_path(parent.path or "")
            qemu_img.set_backing(download, parent_file)  # our own file, absolute
            self._check(download, index)
            qemu_img.convert_top(download, partial, parent_file, unsafe_cache=True,
                                 untrusted=True)
            qemu_img.set_backing(partial, parent_file, relative=True)
        download.unlink()
        safe_files.publish(partial, final, mode=FILE_MODE)
        stored = qemu_img.info(final, "qcow2")
        self._catalogue.update(image.id, expect_status=ImageStatus.CREATING,
                               virtual_size=stored.virtual_size, disk_size=stored.actual_size,
                               path=final.name, format="qcow2", checksum=layer.digest)

    @staticmethod
    def _check(path: Path, index: int) -> None:
        verdict = qemu_img.check(path, "qcow2", untrusted=True)
        if verdict.corruptions:
            raise HostileImageError(f"layer {index} is a corrupt qcow2 image "
                                    f"({verdict.corruptions} errors); refused")


class _LayerHead:
    """The head check of a layer: Python's header vetting (only the expected backing name),
    the config's virtual size, and the bound on the rest: what the header allows, and never
    more than the manifest's size."""

    def __init__(self, virtual_size: int, size: int, backing: str | None,
                 max_virtual_size: int) -> None:
        self._virtual_size, self._size = virtual_size, size
        self._backing, self._max = backing, max_virtual_size

    def __call__(self, head: bytes) -> OutputLimit:
        header = read_qcow2_header(io.BytesIO(head), max_virtual_size=self._max,
                                   allowed_backing=self._backing)
        if header.virtual_size != self._virtual_size:
            raise HostileImageError(f"the layer is {header.virtual_size} bytes, its config "
                                    f"says {self._virtual_size}; refused")
        if header.nb_snapshots:
            raise HostileImageError("the layer carries internal snapshots; refused")
        bound = min(header.max_file_size(), self._size)
        return OutputLimit(bound, f"the layer runs past the {bound} bytes its header and "
                           "manifest allow; refused")

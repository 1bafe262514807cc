"""Import a disk image into the catalogue: the `creating` -> available path, hostile-safe.

Order matters for "lose nothing and register nothing bad":
0. settle what to check the data against (checksum, checksum list, sidecar):
   a file name missing from a checksum list fails before the image is fetched;
1. open the source (a missing path or a 404 fails before any row exists);
2. register the row as ``creating`` (visible in ``images list`` while it runs);
3. decompress the head and vet it without QEMU: the format (stated by
   --disk-format or the sidecar, else recognised by content) and, for qcow2, the
   header, which also bounds how many bytes the rest may have;
4. stream the rest into ``tmp/`` (hash, decompress, sparse) within that bound, the
   decompression cap and the filesystem's reserve; then vet it with ``qemu-img
   info`` (and ``check``) under resource limits;
5. produce ``images/<id>.qcow2`` via a ``.partial`` name, always written anew by
   ``qemu-img convert`` with explicit formats (no bitmap, internal snapshot, unknown
   compatible feature or dirty flag of the download survives), fsync, rename;
6. only then mark the row available.
Any failure removes the row and every file the import made.
"""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from bbsnap import ids, safe_files
from bbsnap.lazy_dataclass import dataclass
from bbsnap.transfer import checksums
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.config import Settings
from bbsnap.transfer.compression import Compression
from bbsnap.disks import boot_firmware, qemu_img
from bbsnap.disks.formats import PROBE_BYTES, DetectedFormat, detect_format
from bbsnap.disks.qcow2_header import MAX_HEADER_AREA, read_qcow2_header
from bbsnap.errors import HostileImageError, InvalidInputError, UsageError
from bbsnap.state.process_tokens import current_job_token
from bbsnap.state.layout import FILE_MODE, PARTIAL_SUFFIX, DataDir
from bbsnap.models import Image, ImageStatus, ImageType
from bbsnap.free_space import check_free_space
from bbsnap.reporting import SILENT, Reporter
from bbsnap.transfer.sidecar import Sidecar
from bbsnap.transfer.sources import load_sidecar, open_source, read_document, source_file_name
from bbsnap.transfer.stream import OutputLimit, Progress, copy_decompressed
from bbsnap.services import image_fields


@dataclass(frozen=True)
class ImportRequest:
    source: str                   # a path, an http(s):// URL, or "-" for standard input
    # None: the sidecar's value if there is one, else the default.
    name: str | None = None
    description: str | None = None
    arch: str | None = None
    username: str | None = None
    min_ram: int | None = None    # MiB
    firmware: str | None = None   # "bios" (the default) or "uefi"
    checksum: str | None = None   # "sha256:HEX"
    checksum_file: str | None = None  # path or URL of a SHA256SUMS listing the source's name
    use_sidecar: bool = True      # read <source>.json when it exists
    disk_format: str | None = None  # "raw" or "qcow2": wins over the sidecar's and the content


class ImageImporter:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir, settings: Settings,
                 stdin: BinaryIO | None = None, reporter: Reporter = SILENT) -> None:
        self._reporter = reporter
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._settings = settings
        self._stdin = stdin

    def run(self, request: ImportRequest, *,
            on_registered: Callable[[Image], None] | None = None) -> Image:
        """Import; *on_registered* gets the image once its id is known (still creating)."""
        expected, meta = self._expectations(request)
        source = open_source(request.source, self._stdin,
                             http_timeout=self._settings.http_timeout,
                             http_min_rate=self._settings.http_min_rate)
        total = source.size  # file size or Content-Length, when known

        def progress(done: int) -> None:
            self._reporter.progress("Importing", done, total)

        try:
            effective = _with_sidecar_defaults(request, meta)
            image = self._register(effective, source.suggested_name)
            if on_registered is not None:
                on_registered(image)
            try:
                return self._fill(image, source.stream, expected, progress,
                                  _Statements.of(request, meta),
                                  detect_firmware=effective.firmware is None)
            except BaseException:
                self._discard(image.id)
                raise
        finally:
            self._reporter.progress_end()
            source.close()

    def _expectations(self, request: ImportRequest) -> tuple[str | None, Sidecar | None]:
        """The SHA-256 the data must have (if any) and the sidecar, before any image byte."""
        if request.checksum is not None and request.checksum_file is not None:
            raise UsageError("--checksum and --checksum-file cannot be used together",
                             hint="give one of them")
        expected = checksums.parse_option(request.checksum) if request.checksum is not None else None
        if request.checksum_file is not None:
            expected = self._listed_checksum(request.source, request.checksum_file)
        meta = (load_sidecar(request.source, http_timeout=self._settings.http_timeout)
                if request.use_sidecar else None)
        if meta is not None:
            _check_sidecar_fields(meta)
            if expected is None and meta.sha256 is not None:
                expected = checksums.normalise(meta.sha256, "the metadata sidecar")
        return expected, meta

    def _listed_checksum(self, source: str, checksum_file: str) -> str:
        file_name = source_file_name(source)
        if file_name is None:
            raise UsageError(f"--checksum-file needs a file name to look up, and {source!r} has "
                             "none", hint="use --checksum sha256:HEX")
        data = read_document(checksum_file, what="checksum file", max_bytes=checksums.MAX_BYTES,
                             http_timeout=self._settings.http_timeout)
        assert data is not None  # missing_ok is off: absence raised NotFoundError
        return checksums.lookup(data.decode("utf-8", errors="replace"), file_name, checksum_file)

    def _register(self, request: ImportRequest, suggested_name: str) -> Image:
        name = image_fields.check_name(request.name if request.name is not None else suggested_name)
        draft = Image(
            id="", type=ImageType.UPLOAD, owner=self._settings.owner, created_at=utcnow(),
            status=ImageStatus.CREATING, name=name,
            arch=image_fields.check_arch(request.arch or image_fields.host_arch()),
            description=image_fields.check_description(request.description or ""),
            username=image_fields.check_username(request.username) if request.username else None,
            min_ram=image_fields.check_min_ram(request.min_ram) if request.min_ram else None,
            firmware=image_fields.check_firmware(request.firmware or "bios"),
            job=current_job_token(),
        )
        added: list[Image] = []

        def claim(candidate: str) -> bool:  # the INSERT itself claims the id, atomically
            try:
                added.append(self._catalogue.add(replace(draft, id=candidate)))
            except sqlite3.IntegrityError:
                return False
            return True

        ids.allocate("img", claim)
        return added[0]

    def _work_files(self, image_id: str) -> tuple[Path, Path, Path]:
        download = self._data_dir.tmp_dir / f"{image_id}.download"
        final = self._data_dir.image_file(image_id)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        return download, partial, final

    def _fill(self, image: Image, stream: BinaryIO, expected_sha256: str | None,
              progress: Progress | None, stated: _Statements, *,
              detect_firmware: bool) -> Image:
        download, partial, final = self._work_files(image.id)
        head = _HeadVetting(stated, self._settings.max_virtual_size)
        copied = copy_decompressed(stream, download,
                                   max_output=self._settings.max_decompressed_size,
                                   expected_sha256=expected_sha256, progress=progress,
                                   check_head=head, head_size=HEAD_BYTES,
                                   compression=stated.compression, stated_by="the sidecar")
        fmt = head.detected.name
        self._vet(download, fmt, stated)
        self._rewrite(download, fmt, partial)
        firmware = image.firmware
        if detect_firmware and self._boots_only_under_uefi(image.id, partial):
            firmware = "uefi"
            self._reporter.note("the disk has an EFI system partition and no BIOS boot code: firmware "
                    "uefi (--firmware bios to override)")
        safe_files.publish(partial, final, mode=FILE_MODE)
        stored = qemu_img.info(final, "qcow2")
        return self._catalogue.update(
            image.id, expect_status=ImageStatus.CREATING, status=ImageStatus.AVAILABLE,
            virtual_size=stored.virtual_size, disk_size=stored.actual_size,
            path=final.name, format="qcow2", checksum=f"sha256:{copied.source_sha256}",
            firmware=firmware, job=None)

    def _vet(self, download: Path, fmt: str, stated: _Statements) -> None:
        """QEMU's view of the download, refused if it reaches outside itself, is corrupt, or
        is not what the sidecar says; before converting, so no work is spent on it."""
        vetted = qemu_img.vet_untrusted(download, fmt,
                                        max_virtual_size=self._settings.max_virtual_size)
        if stated.virtual_size is not None and vetted.virtual_size != stated.virtual_size:
            raise InvalidInputError(
                f"the sidecar says {stated.virtual_size} bytes, the image is "
                f"{vetted.virtual_size}", hint="the sidecar belongs to another file, or the data "
                "is not what was published; nothing was imported")
        if fmt == "qcow2":
            verdict = qemu_img.check(download, "qcow2", untrusted=True)
            if verdict.corruptions:
                raise HostileImageError(
                    f"the qcow2 image is corrupt ({verdict.corruptions} errors)")

    @staticmethod
    def _rewrite(download: Path, fmt: str, partial: Path) -> None:
        """The stored qcow2, always written anew, never kept as it came: a persistent bitmap
        named like bbsnap's change tracking breaks its clones' live snapshots, internal
        snapshots hide data from the active layer, unknown compatible bits would ride along."""
        check_free_space(partial.parent,
                         qemu_img.measure_required(download, fmt, untrusted=True))
        qemu_img.convert(download, fmt, partial, "qcow2", untrusted=True)
        download.unlink()

    def _boots_only_under_uefi(self, image_id: str, stored: Path) -> bool:
        """No --firmware and no sidecar said: a disk with an EFI system partition and no
        BIOS boot code would not boot under SeaBIOS, so it gets OVMF."""
        start = qemu_img.read_start(stored, "qcow2", boot_firmware.READ_BYTES,
                                    self._data_dir.tmp_dir / f"{image_id}.start")
        return boot_firmware.needs_uefi(start)

    def _discard(self, image_id: str) -> None:
        self._data_dir.remove_image_files(image_id)
        self._catalogue.remove_row(image_id)


# The decompressed head vetted before anything is written: all of a qcow2 header area
# (extensions may reach 1 MiB), and more than format detection needs.
HEAD_BYTES = max(PROBE_BYTES, MAX_HEADER_AREA)


@dataclass(frozen=True)
class _Statements:
    """What the user or the sidecar says the data is; None where nobody said."""
    disk_format: str | None
    format_by: str
    compression: Compression | None
    virtual_size: int | None

    @classmethod
    def of(cls, request: ImportRequest, meta: Sidecar | None) -> _Statements:
        by_user = request.disk_format is not None
        return cls(
            disk_format=request.disk_format if by_user else meta.format if meta else None,
            format_by="--disk-format" if by_user else "the sidecar",
            compression=(Compression(meta.compression)
                         if meta is not None and meta.compression is not None else None),
            virtual_size=meta.virtual_size if meta is not None else None)


class _HeadVetting:
    """The head check of the download: remembers the format it found, returns the bound
    on the whole decompressed image."""

    def __init__(self, stated: _Statements, max_virtual_size: int) -> None:
        self._stated = stated
        self._max_virtual_size = max_virtual_size
        self.detected = DetectedFormat("raw", "not vetted yet")

    def __call__(self, head: bytes) -> OutputLimit:
        stated = self._stated
        self.detected = detect_format(head[:PROBE_BYTES], stated.disk_format,
                                      stated_by=stated.format_by)
        if self.detected.name == "qcow2":
            return self._qcow2_limit(head)
        if stated.virtual_size is not None and stated.virtual_size < self._max_virtual_size:
            return OutputLimit(stated.virtual_size, f"the raw disk runs past the "
                               f"{stated.virtual_size} bytes the sidecar says it has",
                               hint="the sidecar belongs to another file; nothing was imported")
        return OutputLimit(self._max_virtual_size, f"the raw disk is over the limit of "
                           f"{self._max_virtual_size} bytes (max_virtual_size)",
                           hint="raise max_virtual_size (BBSNAP_MAX_VIRTUAL_SIZE) if you trust it")

    def _qcow2_limit(self, head: bytes) -> OutputLimit:
        header = read_qcow2_header(io.BytesIO(head), max_virtual_size=self._max_virtual_size)
        claimed = self._stated.virtual_size
        if claimed is not None and header.virtual_size != claimed:
            raise InvalidInputError(
                f"the sidecar says {claimed} bytes, the image is {header.virtual_size}",
                hint="the sidecar belongs to another file, or the data is not what was "
                "published; nothing was imported")
        bound = header.max_file_size()
        return OutputLimit(bound, f"the qcow2 data runs past the {bound} bytes its header "
                           f"allows (virtual size {header.virtual_size} bytes)",
                           hint="a qcow2 carrying internal snapshots must be flattened first: "
                           "qemu-img convert -O qcow2")


def _with_sidecar_defaults(request: ImportRequest, meta: Sidecar | None) -> ImportRequest:
    """Fill the fields the command line left unset from the sidecar: flags win."""
    if meta is None:
        return request
    return replace(
        request,
        name=request.name if request.name is not None else meta.name,
        description=request.description if request.description is not None else meta.description,
        arch=request.arch if request.arch is not None else meta.arch,
        username=request.username if request.username is not None else meta.username,
        min_ram=request.min_ram if request.min_ram is not None else meta.min_ram,
        firmware=request.firmware if request.firmware is not None else meta.firmware)


def _check_sidecar_fields(meta: Sidecar) -> None:
    """A sidecar is input data: a bad field refuses the file (exit 1), not the command line."""
    try:
        image_fields.check_name(meta.name)
        image_fields.check_description(meta.description)
        image_fields.check_arch(meta.arch)
        if meta.username is not None:
            image_fields.check_username(meta.username)
        if meta.min_ram is not None:
            image_fields.check_min_ram(meta.min_ram)
        image_fields.check_firmware(meta.firmware)
    except UsageError as exc:
        raise InvalidInputError(f"the metadata sidecar is refused: {exc.message}") from None

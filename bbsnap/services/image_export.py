"""Export a catalogue image for download: the raw disk, gzip-compressed, as the seed does.

Any image exports as a standalone full disk (its backing chain flattened):
``qemu-nbd`` serves the flattened view and ``qemu-img map`` says where data is,
so zero regions are never read, and the bytes stream straight into the
compressor (no temporary raw file; ``-o -`` writes to stdout). Written to a new
``FILE.<random>.partial`` and renamed when complete, so a failure (a full disk,
Ctrl-C) never leaves a partial file under the final name; then ``FILE.sha256``
(sha256sum format) and ``FILE.json`` (the metadata sidecar import reads), each
also renamed into place. The output directory may be writable by others (a
sticky /tmp): every file is created exclusively, without following symlinks,
mode 0600 (what a guest wrote is private), and an existing ``FILE`` or sidecar
that is not a regular file (a device, FIFO, symlink) is refused (safe_files).

The catalogue's path is resolved inside images/, and every file of the stored
image's backing chain must be there too: a row or a qcow2 header naming a host
file would otherwise export that file.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO, Callable

from bbsnap import ids, safe_files
from bbsnap.lazy_dataclass import dataclass
from bbsnap.transfer import sidecar
from bbsnap.state.catalogue import Catalogue
from bbsnap.disks import qemu_img
from bbsnap.disks.nbd import NbdImageReader, extents
from bbsnap.errors import BbsnapError, InvalidInputError, NotFoundError, UsageError
from bbsnap.state.process_tokens import current_job_token
from bbsnap.transfer.export_sinks import COMPRESSORS, EXTENSIONS, FramedSink, HashingOutput, RawSink
from bbsnap.state.layout import PARTIAL_SUFFIX, DataDir
from bbsnap.models import Image
from bbsnap.reporting import SILENT, Reporter
from bbsnap.safe_files import PRIVATE, OutputDir
from bbsnap.services import stored_chain
from bbsnap.vocabulary import DiskFormat, ExportCompression, values

FORMATS = values(DiskFormat)
COMPRESSIONS = values(ExportCompression)
SHA256_SUFFIX = ".sha256"


@dataclass(frozen=True)
class ExportRequest:
    image_id: str
    output: str | None = None      # a path, "-" for stdout, None for ./IMG.gz (and the like)
    format: str = "raw"
    compress: str = "gzip"


@dataclass(frozen=True)
class ExportResult:
    image: Image
    path: Path | None              # None when written to stdout
    bytes_written: int
    sha256: str


def default_file_name(image_id: str, fmt: str, compress: str) -> str:
    base = image_id if fmt == "raw" else f"{image_id}.qcow2"
    return base + (EXTENSIONS[compress] if compress != "none" else (".raw" if fmt == "raw" else ""))


class ImageExporter:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir,
                 stdout: BinaryIO | None = None, reporter: Reporter = SILENT) -> None:
        self._reporter = reporter
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._stdout = stdout

    def run(self, request: ExportRequest) -> ExportResult:
        try:
            return self._run(request, lambda done, total: self._reporter.progress(
                f"Exporting {request.image_id}", done, total))
        finally:
            self._reporter.progress_end()

    def _run(self, request: ExportRequest, progress: Callable[[int, int], None]) -> ExportResult:
        if request.format not in FORMATS or request.compress not in COMPRESSIONS:
            raise UsageError(f"unknown export format {request.format}/{request.compress}")
        image = self._catalogue.get_available(ids.require(request.image_id, "img"))
        source = self._data_dir.image_path(str(image.path))
        stored_chain.require_inside(self._data_dir, image.id, source)
        if request.output == "-":
            out = self._stdout or sys.stdout.buffer
            digest, written = self._write(image, source, request, out, progress)
            out.flush()
            return ExportResult(image, None, written, digest)
        final = Path(request.output or default_file_name(image.id, request.format,
                                                         request.compress)).absolute()
        _check_destination(final)
        try:
            directory = OutputDir(final.parent)
        except OSError as exc:
            raise BbsnapError(f"cannot open the directory {final.parent}: "
                              f"{exc.strerror or exc}") from exc
        with directory:
            digest, written = self._write_file(image, source, request, directory, final,
                                               progress)
            self._write_sidecars(image, request, directory, final, digest)
            directory.sync()
        return ExportResult(image, final, written, digest)

    def _write_file(self, image: Image, source: Path, request: ExportRequest,
                    directory: OutputDir, final: Path,
                    progress: Callable[[int, int], None] | None) -> tuple[str, int]:
        """The export itself, into a new partial file renamed over *final* when complete."""
        partial_name = directory.temp_name(final.name, PARTIAL_SUFFIX)
        # Crash journal: names the partial file so recovery can remove it if we are killed.
        journal = self._data_dir.export_journal(current_job_token())
        journal.write_text(str(final.parent / partial_name))
        created = False
        try:
            fd = directory.create(partial_name, PRIVATE)
            created = True
            with os.fdopen(fd, "wb") as out:
                digest, written = self._write(image, source, request, out, progress)
                out.flush()
                os.fsync(out.fileno())
            directory.publish(partial_name, final.name)
        except OSError as exc:
            if created:
                directory.remove(partial_name)
            raise BbsnapError(f"writing {final} failed: {exc.strerror or exc}",
                              hint="nothing was left under that name") from exc
        except BaseException:
            if created:
                directory.remove(partial_name)
            raise
        finally:
            journal.unlink(missing_ok=True)
        return digest, written

    def _write(self, image: Image, source: Path, request: ExportRequest, out: BinaryIO,
               progress: Callable[[int, int], None] | None) -> tuple[str, int]:
        hashed = HashingOutput(out)
        if request.compress == "none":
            sink: FramedSink | RawSink = RawSink(hashed, out)
        else:
            sink = FramedSink(hashed, COMPRESSORS[request.compress])
        try:
            if request.format == "raw":
                self._stream_raw(source, sink, progress)
            else:
                self._stream_qcow2(image, source, sink)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        return hashed.sha256.hexdigest(), hashed.written

    def _stream_raw(self, source: Path, sink: FramedSink | RawSink,
                    progress: Callable[[int, int], None] | None) -> None:
        layout = extents(source, "qcow2")
        total = sum(e.length for e in layout)
        done = 0
        with NbdImageReader(source, "qcow2") as reader:
            for extent in layout:
                if not extent.data:
                    sink.write_zeros(extent.length)
                    done += extent.length
                else:
                    for chunk in reader.read(extent.start, extent.length):
                        sink.write_data(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                if progress is not None:
                    progress(done, total)

    def _stream_qcow2(self, image: Image, source: Path, sink: FramedSink | RawSink) -> None:
        """qcow2 cannot be streamed: flatten into a work file, then pass it through."""
        # Named by the job token, not the pid: doctor keeps it while that process lives, and
        # a reused pid cannot pass for it (state/process_tokens.py).
        flat = self._data_dir.tmp_dir / f"{image.id}.export.{current_job_token()}.qcow2"
        try:
            qemu_img.convert(source, "qcow2", flat, "qcow2")
            with open(flat, "rb") as handle:
                while chunk := handle.read(4 * 1024 * 1024):
                    sink.write_data(chunk)
        finally:
            flat.unlink(missing_ok=True)

    def _write_sidecars(self, image: Image, request: ExportRequest, directory: OutputDir,
                        final: Path, digest: str) -> None:
        meta = sidecar.Sidecar(
            name=image.name, virtual_size=image.virtual_size, arch=image.arch,
            description=image.description, username=image.username, min_ram=image.min_ram,
            firmware=image.firmware, format=request.format, compression=request.compress,
            sha256=digest,
            source={"image_id": image.id, "type": image.type.value,
                    **({"source_server": image.source_server} if image.source_server else {})})
        try:
            directory.write_file(final.name + SHA256_SUFFIX,
                                 f"{digest}  {final.name}\n".encode(), PRIVATE)
            directory.write_file(final.name + sidecar.SUFFIX, sidecar.to_json(meta).encode(),
                                 PRIVATE)
        except OSError as exc:
            raise BbsnapError(f"writing the sidecars of {final} failed: {exc.strerror or exc}",
                              hint=f"{final} itself is complete") from exc


def _check_destination(final: Path) -> None:
    """Refuse, before any work, an output that exists and is not a regular file."""
    if not final.parent.is_dir():
        raise NotFoundError(f"the directory {final.parent} does not exist",
                            hint="create it first or choose another -o path")
    for name in (final.name, final.name + SHA256_SUFFIX, final.name + sidecar.SUFFIX):
        try:
            mode = os.lstat(final.parent / name).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(mode) and name == final.name:
            raise InvalidInputError(f"{final} is a directory", hint="give a file name with -o")
        if not stat.S_ISREG(mode):
            raise InvalidInputError(
                f"{final.parent / name} exists and is {safe_files.describe_kind(mode)}; "
                "export replaces only regular files",
                hint="to write to a device or pipe, use -o - (stdout) and redirect it")

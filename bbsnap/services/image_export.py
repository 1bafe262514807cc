"""Export a catalogue image for download: the raw disk, gzip-compressed, as the seed does.

Any image exports as a standalone full disk (its backing chain flattened):
``qemu-nbd`` serves the flattened view and ``qemu-img map`` says where data is,
so zero regions are never read, and the bytes stream straight into the
compressor (no temporary raw file; ``-o -`` writes to stdout). Written to
``FILE.partial`` and renamed when complete, so a failure (a full disk, Ctrl-C)
never leaves a partial file under the final name; then ``FILE.sha256``
(sha256sum format) and ``FILE.json`` (the metadata sidecar import reads).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from .. import ids, sidecar
from ..catalogue import Catalogue
from ..disks import qemu_img
from ..disks.nbd import NbdImageReader, extents
from ..errors import BbsnapError, ConflictError, InvalidInputError, NotFoundError, UsageError
from ..jobs import current_job_token
from ..export_sinks import COMPRESSORS, EXTENSIONS, FramedSink, HashingOutput, RawSink
from ..layout import DataDir
from ..models import Image, ImageStatus
from ..transfer import fsync_directory

FORMATS = ("raw", "qcow2")
COMPRESSIONS = ("gzip", "zstd", "xz", "none")


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
                 stdout: BinaryIO | None = None) -> None:
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._stdout = stdout

    def run(self, request: ExportRequest,
            progress: Callable[[int, int], None] | None = None) -> ExportResult:
        if request.format not in FORMATS or request.compress not in COMPRESSIONS:
            raise UsageError(f"unknown export format {request.format}/{request.compress}")
        image = self._catalogue.get(ids.require(request.image_id, "img"))
        if image.status is not ImageStatus.AVAILABLE:
            raise ConflictError(f"image {image.id} is {image.status.value}, not available",
                                hint="wait until it is available")
        source = self._data_dir.images_dir / str(image.path)
        if request.output == "-":
            out = self._stdout or sys.stdout.buffer
            digest, written = self._write(image, source, request, out, progress)
            out.flush()
            return ExportResult(image, None, written, digest)
        final = Path(request.output or default_file_name(image.id, request.format,
                                                         request.compress)).absolute()
        _check_destination(final)
        partial = final.with_name(final.name + ".partial")
        # Crash journal: names the partial file so recovery can remove it if we are killed.
        journal = self._data_dir.export_journal(current_job_token())
        journal.write_text(str(partial))
        try:
            with open(partial, "wb") as out:
                digest, written = self._write(image, source, request, out, progress)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, final)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise BbsnapError(f"writing {final} failed: {exc.strerror or exc}",
                              hint="nothing was left under that name") from exc
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            journal.unlink(missing_ok=True)
        self._write_sidecars(image, request, final, digest)
        fsync_directory(final.parent)
        return ExportResult(image, final, written, digest)

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
        flat = self._data_dir.tmp_dir / f"{image.id}.export.{os.getpid()}.qcow2"
        try:
            qemu_img.convert(source, "qcow2", flat, "qcow2")
            with open(flat, "rb") as handle:
                while chunk := handle.read(4 * 1024 * 1024):
                    sink.write_data(chunk)
        finally:
            flat.unlink(missing_ok=True)

    def _write_sidecars(self, image: Image, request: ExportRequest, final: Path,
                        digest: str) -> None:
        (final.parent / (final.name + ".sha256")).write_text(f"{digest}  {final.name}\n")
        meta = sidecar.Sidecar(
            name=image.name, virtual_size=image.virtual_size, arch=image.arch,
            description=image.description, username=image.username, min_ram=image.min_ram,
            firmware=image.firmware, format=request.format, compression=request.compress, sha256=digest,
            source={"image_id": image.id, "type": image.type.value,
                    **({"source_server": image.source_server} if image.source_server else {})})
        (final.parent / (final.name + sidecar.SUFFIX)).write_text(sidecar.to_json(meta))


def _check_destination(final: Path) -> None:
    if final.is_dir():
        raise InvalidInputError(f"{final} is a directory", hint="give a file name with -o")
    if not final.parent.is_dir():
        raise NotFoundError(f"the directory {final.parent} does not exist",
                            hint="create it first or choose another -o path")

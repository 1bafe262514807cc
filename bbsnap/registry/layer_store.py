"""A pulled layer made a stored chain file: vetted as an untrusted import, then kept as it
was downloaded when it is a plain qcow2, rewritten by ``qemu-img convert`` otherwise.

Why in place: the rewrite was half of a pull. On the 1.2 GiB benchmark layer (README,
``bench_registry.py``) the download (hash, sparse write) took 3.1-4.0 s and the rewrite
into a second file 4.4-7.0 s, against 3.2-3.6 s for curl to fetch the same blob. What the
rewrite is for (DESIGN §8: no backing file, data file, persistent bitmap or internal
snapshot survives) can be had without it for the layers bbsnap itself pushes:

- refused outright, from the header bytes before QEMU opens the file (LayerHead and
  qcow2_header): any backing name but the layer below's title, an external data file,
  encryption, the corrupt bit, unknown incompatible features, internal snapshots, a
  virtual size not the config's, more bytes than the header or the manifest allow;
- refused by QEMU (``qemu-img info``/``check`` under resource limits): a file that is not
  a qcow2, names another backing file or data file, or has refcount or L2 corruption;
- rewritten (the old path, :func:`_rewrite`): anything QEMU would carry over that a
  stored image must not have, or that a clean file does not have: a persistent bitmap or
  any autoclear bit, the dirty bit, compatible bits other than lazy refcounts, a header
  extension other than the backing format and the feature-name table, leaked clusters;
- kept: what is left is a qcow2 whose every cluster is the active layer's own, mapped
  consistently, with the backing format and name QEMU writes (``qemu-img rebase -u``
  points it at the parent's stored file before ``check`` runs).

The layer is downloaded straight into ``images/<id>.qcow2.partial`` (no work file in
tmp/): nothing is registered available before its digest matched and it passed all of
the above; the row stays ``creating`` and a killed pull's partial file is removed with it
by the next command's recovery (DataDir.remove_image_files).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bbsnap import safe_files
from bbsnap.disks import qemu_img
from bbsnap.disks.qcow2_header import (DIRTY, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE,
                                       LAZY_REFCOUNTS, Qcow2Header, read_qcow2_header)
from bbsnap.errors import HostileImageError
from bbsnap.transfer.stream import OutputLimit

# Header extensions a layer may keep in place: what qemu-img writes for a plain overlay.
KEPT_EXTENSIONS = frozenset({EXT_BACKING_FORMAT, EXT_FEATURE_TABLE})
REWRITE_SUFFIX = ".rewrite"


class Phases:
    """Seconds spent per phase of a pull, summed over its layers (the benchmark prints
    them: where a pull's time goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class LayerHead:
    """The head check of a layer: Python's header vetting (only the expected backing name),
    the config's virtual size, and the bound on the rest: what the header allows, and never
    more than the manifest's size. Keeps the parsed header for :func:`settle`."""

    def __init__(self, virtual_size: int, size: int, backing: str | None,
                 max_virtual_size: int) -> None:
        self._virtual_size, self._size = virtual_size, size
        self._backing, self._max = backing, max_virtual_size
        self.header: Qcow2Header | None = None

    def __call__(self, head: bytes) -> OutputLimit:
        header = read_qcow2_header(io.BytesIO(head), max_virtual_size=self._max,
                                   allowed_backing=self._backing)
        if header.virtual_size != self._virtual_size:
            raise HostileImageError(f"the layer is {header.virtual_size} bytes, its config "
                                    f"says {self._virtual_size}; refused")
        if header.nb_snapshots:
            raise HostileImageError("the layer carries internal snapshots; refused")
        self.header = header
        bound = min(header.max_file_size(), self._size)
        return OutputLimit(bound, f"the layer runs past the {bound} bytes its header and "
                           "manifest allow; refused")


def rewrite_reason(header: Qcow2Header) -> str | None:
    """Why a vetted layer cannot be stored as it came (None: it can)."""
    if header.autoclear_features:
        return "autoclear features (persistent bitmaps)"
    if header.incompatible_features & DIRTY:
        return "the dirty bit"
    if header.compatible_features & ~LAZY_REFCOUNTS:
        return "unknown compatible features"
    extra = [e for e in header.extensions if e not in KEPT_EXTENSIONS]
    if extra:
        return f"header extension 0x{extra[0]:08x}"
    return None


def settle(partial: Path, header: Qcow2Header, *, index: int, virtual_size: int,
           backing_title: str | None, parent_file: Path | None, phases: Phases,
           what: str | None = None) -> Path:
    """Vet the downloaded, digest-checked *partial* as QEMU sees it, point its backing at
    *parent_file* (by name: both live in images/) and return the file to publish: *partial*
    itself when it is plain, else a rewritten copy beside it (*partial* removed). *what*
    names the layer in refusals (default: layer *index*)."""
    layer = what or f"layer {index}"
    with phases.timed("vet"):
        info = qemu_img.info(partial, "qcow2", untrusted=True)
        if info.format != "qcow2" or info.data_file:
            raise HostileImageError(f"{layer} is not a plain qcow2 image; refused")
        if info.virtual_size != virtual_size:
            raise HostileImageError(f"{layer} is {info.virtual_size} bytes, its config "
                                    f"says {virtual_size}; refused")
        if (info.backing_file or None) != backing_title:
            raise HostileImageError(f"{layer} names the backing file "
                                    f"{info.backing_file!r}; refused")
        if parent_file is not None:
            # Only the header's name changes (qemu-img rebase -u); the parent is ours.
            qemu_img.set_backing(partial, parent_file, relative=True, untrusted=True)
        verdict = qemu_img.check(partial, "qcow2", untrusted=True)
        if verdict.corruptions:
            raise HostileImageError(f"{layer} is a corrupt qcow2 image "
                                    f"({verdict.corruptions} errors); refused")
        reason = rewrite_reason(header)
        if reason is None and verdict.leaks:
            reason = f"{verdict.leaks} leaked clusters"
    if reason is None:
        return partial
    with phases.timed("rewrite"):
        return _rewrite(partial, parent_file)


def _rewrite(partial: Path, parent_file: Path | None) -> Path:
    """The layer written anew by QEMU: only its active layer's own clusters (on the parent's
    stored file), no bitmap, snapshot, unknown bit or leaked cluster of the download."""
    target = partial.with_name(partial.name + REWRITE_SUFFIX)
    if parent_file is None:
        qemu_img.convert(partial, "qcow2", target, "qcow2", untrusted=True, unsafe_cache=True)
    else:
        qemu_img.convert_top(partial, target, parent_file, unsafe_cache=True, untrusted=True)
        qemu_img.set_backing(target, parent_file, relative=True)
    partial.unlink()
    return target


def copy_stored(source: Path, target: Path) -> None:
    """A copy of the stored, vetted file *source* as the new *target* (a partial file):
    a layer two images of one pull share (an unchanged further disk's full copies) is
    downloaded once and copied for the second (safe_files.copy_sparse)."""
    safe_files.copy_sparse(source, target)

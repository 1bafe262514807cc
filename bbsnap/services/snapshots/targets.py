"""The backup's target files, which bbsnap makes before the snapshot's instant is fixed.

bbsnap makes them itself (empty qcow2s, 0600, of each disk's size) rather than letting
libvirt: libvirt then hands them back to bbsnap's user when the job ends, while files
libvirt made were left to root, which a normal user's worker on qemu:///system could not
read.

Copied, not created: ``qemu-img create`` is a process and qemu-img's start-up, 13-23 ms of
the snapshot command's latency (bench_snapshot.py's steps, "backup targets made"), while
a blank qcow2 of a given size is the same bytes every time (qcow2 records no time and no
id; two ``qemu-img create`` runs compare equal). So the first target of each disk size is
made by qemu-img as a template in blank-overlays/ (DataDir.target_template:
``blank-<size>.qcow2``; for a full copy over 512 MiB with its tables already mapped,
``blank-<size>-mapped.qcow2``: qemu_img.map_as_zero) and every later target is a copy of
it, 0.3 ms. A template is checked before each use (the qcow2 magic and the size in its
header) and made again when it is not what its name says.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from bbsnap import hostinfo, safe_files
from bbsnap.free_space import spare_bytes
from bbsnap.disks import qemu_img, reserve
from bbsnap.hypervisor import Hypervisor
from bbsnap.models import SnapshotJob
from bbsnap.state.layout import DataDir
from bbsnap.state.process_tokens import current_job_token

QCOW2_MAGIC = b"QFI\xfb"


class RamBudget:
    """Which standalone full copies of one snapshot QEMU writes into RAM
    (DataDir.qemu_ram_dir) rather than into tmp/, to be copied onto the disk after the job
    (disks/direct_copy.py): the guest's flushes of its own disk then never wait behind the
    copy's writeback (the module's docstring in direct_copy.py has the figures).

    Only a disk whose file holds all the guest sees (a regular file without a backing
    file: its allocated bytes bound the copy), and only while the RAM directory and the
    host can each spare twice what this snapshot's copies in RAM hold; else tmp/ as before."""

    def __init__(self, data_dir: DataDir) -> None:
        self._data_dir = data_dir
        self._claimed = 0
        self._directory: Path | None | bool = False  # False: not looked for yet

    def target(self, image_id: str, device: str, source: str, source_format: str) -> Path | None:
        """The RAM target for this disk's copy, or None (then tmp/)."""

        need = _standalone_bytes(source, source_format)
        if need is None:
            return None
        if self._directory is False:  # once per snapshot, not once per disk
            self._directory = self._data_dir.ensure_qemu_ram_dir()
        directory = self._directory
        if not isinstance(directory, Path):
            return None
        wanted = 2 * (self._claimed + need)
        if spare_bytes(directory) < wanted or hostinfo.available_memory_bytes() < wanted:
            return None
        self._claimed += need
        return self._data_dir.qemu_ram_file(f"{image_id}.{device}.copy.qcow2")


def _standalone_bytes(source: str, source_format: str) -> int | None:
    """The bytes a disk file holds when it holds all the guest sees, else None: a raw
    regular file, or a qcow2 the import vetting would pass (no backing file, no external
    data file: disks/qcow2_header.py); None too when it cannot be read."""
    from bbsnap.disks.qcow2_header import read_qcow2_header
    from bbsnap.errors import HostileImageError

    try:
        # Non-blocking: never held up by whatever the path is (a FIFO, a device).
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None  # a block device: its size says nothing of its data
            if source_format == "qcow2":
                read_qcow2_header(handle, max_virtual_size=1 << 62)
            elif source_format != "raw":
                return None
        except (OSError, HostileImageError):
            return None  # on a backing file or another file: more than this file
    return info.st_blocks * 512


def make(data_dir: DataDir, hv: Hypervisor, job: SnapshotJob) -> None:
    """Every target of *job*: blank, of its disk's size; a full copy's on disk mapped and
    with its blocks reserved (disks/reserve.py; in RAM neither buys anything)."""
    for disk in job.disks:
        size = file_capacity(disk.source, disk.source_format)
        if size is None:
            size = hv.disk_capacity(job.domain, disk.device)
        target = Path(disk.target)
        on_disk = not data_dir.is_qemu_ram_file(target)
        full_copy = not disk.incremental  # an incremental's clusters stay unallocated
        copy_blank(data_dir, target, size,
                   mapped=full_copy and on_disk and qemu_img.zero_map_applies(size))
        if full_copy and on_disk:
            # The copy holds about what the disk's file does (disks/reserve.py).
            reserve.reserve(target, min(size, allocated_bytes(disk.source)))


def copy_blank(data_dir: DataDir, target: Path, size: int, *, mapped: bool) -> None:
    """A blank qcow2 of *size* bytes at *target* (0600), copied from its template in
    *data_dir* (made first if missing or not what its name says)."""
    template = data_dir.target_template(size, mapped=mapped)
    if not _fits(template, size):
        _make_template(template, size, mapped)
    target.unlink(missing_ok=True)  # a re-planned snapshot's first target (start.py)
    safe_files.copy_sparse(template, target)


def _fits(template: Path, size: int) -> bool:
    try:
        fd = os.open(template, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        head = os.read(fd, 32)
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    return regular and head[:4] == QCOW2_MAGIC and int.from_bytes(head[24:32], "big") == size


def _make_template(template: Path, size: int, mapped: bool) -> None:
    # Named by its maker's job token: doctor leaves it alone while that process lives.
    making = template.with_name(f".{template.name}.{current_job_token()}")
    try:
        qemu_img.create_blank(making, size)
        if mapped:
            qemu_img.map_as_zero(making, size)
        os.replace(making, template)  # concurrent snapshots each make one; either is right
    finally:
        making.unlink(missing_ok=True)


def allocated_bytes(path: str) -> int:
    """The bytes *path*'s file holds on disk (0 when it cannot be looked at)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def file_capacity(path: str, fmt: str) -> int | None:
    """A disk's virtual size read from its file (the qcow2 header's size field, a raw file's
    length), or None when the file cannot be read (QEMU's user's, under a normal user's
    bbsnap) or is neither: then libvirt is asked, one round trip more (5-15 ms here, under
    load) in the command's latency."""
    try:
        with open(path, "rb") as handle:
            if fmt == "qcow2":
                head = handle.read(32)
                return int.from_bytes(head[24:32], "big") if head[:4] == QCOW2_MAGIC else None
            if fmt == "raw":
                info = os.fstat(handle.fileno())
                return info.st_size if stat.S_ISREG(info.st_mode) else None
    except OSError:
        return None
    return None

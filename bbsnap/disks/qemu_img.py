"""A thin, typed wrapper over qemu-img (through bbsnap.proc, the one door to subprocesses).

Every call names the format explicitly (``-f``): letting qemu-img probe a
guest-written raw disk could make it read a qcow2 header the guest planted.
Paths are always absolute, so nothing can be read as a ``json:`` or protocol name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from bbsnap import proc
from bbsnap.errors import ExternalCommandError, HostileImageError
from bbsnap.lazy_dataclass import dataclass

UNTRUSTED_LIMITS = proc.Limits(address_space_bytes=1 << 30, cpu_seconds=60)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    dirty: bool
    raw: dict[str, Any]


def _abs(path: Path) -> str:
    resolved = str(Path(path).absolute())
    if not resolved.startswith("/"):
        raise ValueError(f"not an absolute path: {resolved}")
    return resolved


def info(path: Path, fmt: str, *, untrusted: bool = False, force_share: bool = False) -> ImageInfo:
    argv = ["qemu-img", "info", "--output=json", "-f", fmt]
    if force_share:
        argv.append("-U")
    argv.append(_abs(path))
    result = proc.run(argv, timeout=60, limits=UNTRUSTED_LIMITS if untrusted else None)
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise ExternalCommandError("qemu-img info printed no JSON", argv=argv) from exc
    specific = (data.get("format-specific") or {}).get("data") or {}
    return ImageInfo(
        format=data.get("format", fmt),
        virtual_size=int(data.get("virtual-size", 0)),
        actual_size=int(data.get("actual-size", 0)),
        backing_file=data.get("backing-filename") or data.get("full-backing-filename"),
        backing_format=data.get("backing-filename-format"),
        data_file=specific.get("data-file"),
        dirty=bool(data.get("dirty-flag", False)),
        raw=data,
    )


@dataclass(frozen=True)
class CheckResult:
    clean: bool
    corruptions: int
    leaks: int
    message: str


def check(path: Path, fmt: str = "qcow2", *, untrusted: bool = False,
          force_share: bool = False) -> CheckResult:
    """``qemu-img check``: exit 0 clean, 2 corrupt, 3 leaked clusters only (harmless)."""
    argv = ["qemu-img", "check", "--output=json", "-f", fmt]
    if force_share:
        argv.append("-U")
    argv.append(_abs(path))
    result = proc.run(argv, timeout=600, check=False,
                      limits=UNTRUSTED_LIMITS if untrusted else None)
    if result.returncode not in (0, 2, 3):
        raise ExternalCommandError(f"qemu-img check could not check {path}: "
                                   f"{result.stderr.strip() or result.stdout.strip()}",
                                   argv=argv, returncode=result.returncode, stderr=result.stderr)
    try:
        data = json.loads(result.stdout) if result.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {}
    corruptions = int(data.get("corruptions", 0)) + int(data.get("check-errors", 0))
    leaks = int(data.get("leaks", 0))
    return CheckResult(clean=result.returncode == 0, corruptions=corruptions, leaks=leaks,
                       message=result.stderr.strip())


def convert(source: Path, source_format: str, target: Path, target_format: str, *,
            untrusted: bool = False, compress: bool = False, timeout: float = 3600,
            progress: Callable[[float], None] | None = None, unsafe_cache: bool = False) -> None:
    """Copy *source* into a new standalone *target* (sparse: zero runs are not written).

    The target is a fresh image of the guest-visible active layer only: without
    ``--bitmaps`` (off by default) no persistent bitmap is copied, and internal
    snapshots, unknown compatible feature bits and a dirty flag stay behind.
    *unsafe_cache*: qemu-img does not flush the target (``-t unsafe``), for a caller that
    fsyncs it itself before using it (safe_files.publish): on a 1.2 GiB image here that
    was 0.7 s + 0.5 s for the fsync against 3.7 s with qemu-img's own flushing.
    """
    argv = ["qemu-img", "convert", "-f", source_format, "-O", target_format, "-S", "64k"]
    if unsafe_cache:
        argv += ["-t", "unsafe"]
    if compress:
        argv.append("-c")
    argv += [_abs(source), _abs(target)]
    _run_convert(argv, progress, timeout=timeout, limits=UNTRUSTED_LIMITS if untrusted else None)


def measure_required(path: Path, fmt: str, target_format: str = "qcow2", *,
                     untrusted: bool = False) -> int:
    """Bytes `qemu-img convert -O target_format` will write for *path* (its allocated data,
    uncompressed, plus metadata): what must be free before converting."""
    argv = ["qemu-img", "measure", "--output=json", "-f", fmt, "-O", target_format,
            _abs(path)]
    result = proc.run(argv, timeout=600, limits=UNTRUSTED_LIMITS if untrusted else None)
    try:
        return int(json.loads(result.stdout)["required"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ExternalCommandError("qemu-img measure printed no size", argv=argv) from exc


def create_overlay(path: Path, backing: Path, backing_format: str = "qcow2",
                   size: int | None = None) -> None:
    """A qcow2 whose backing file is *backing* (always with its format: QEMU >= 6.1 needs it).

    Mode 0600: an overlay holds what a guest wrote (libvirt hands it to QEMU's user);
    files that become catalogue images are opened up to 0644 when they are stored.
    """
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format,
            "-b", _abs(backing), _abs(path)]
    if size is not None:
        argv.append(str(size))
    proc.run(argv, timeout=60)
    os.chmod(path, 0o600)


def create_blank(path: Path, size: int) -> None:
    """An empty standalone qcow2 of *size* bytes, mode 0600 (made so before qemu-img writes
    it, so it is never readable by others, even for an instant)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600))
    proc.run(["qemu-img", "create", "-q", "-f", "qcow2", _abs(path), str(size)], timeout=60)


# One L2 table of a qcow2 with qemu-img's default 64 KiB clusters maps 8192 clusters: 512 MiB.
L2_TABLE_SPAN = 512 << 20
# Beyond this, mapping every cluster up front writes more tables than the job would stall on
# (64 GiB: 128 tables, 8 MiB, ~80 ms of qemu-io here): such a target is left to the job.
ZERO_MAP_MAX = 64 << 30
_ZERO_WRITE_MAX = 1 << 30  # qemu-io's `write -z` takes under 2 GiB per command


def zero_map_applies(size: int) -> bool:
    """Whether map_as_zero maps a disk of *size* bytes (more than one table, not huge)."""
    return L2_TABLE_SPAN < size <= ZERO_MAP_MAX


def map_as_zero(path: Path, size: int) -> bool:
    """Mark every cluster of the blank qcow2 *path* (of *size* bytes) as reading zeroes, so
    that all its L2 tables exist before a full copy writes into it. True if it did.

    Only for a target a backup job copies whole (sync=full): that job writes every cluster
    anyway, as data or as zeroes, so the finished copy is the same. Never for an
    incremental one, whose untouched clusters must stay unallocated to show its parent.

    Why: the job allocates an L2 table each time it reaches a new 512 MiB of the disk, and
    QEMU's qcow2 flushes the target file two or three times per allocation. With the copy's
    data dirty in the page cache each flush waits for all of it to reach the disk, and the
    job waits with it: on an 8 GiB disk holding 1 GiB (QEMU's trace events, HMP `log
    trace:qcow2_l2_allocate,...`, during a bare blockdev-backup) two such allocations took
    330 and 289 ms, and the job ran 1.25-2.1 s over rounds; with the tables made first it ran
    0.76-0.95 s (0.47-0.49 s with the file's blocks also reserved by fallocate, which bbsnap
    does not do: it would have to guess the copy's size); in bbsnap's path QEMU's job went from 1.48 s to
    1.08 s and the copy until available from 1.42x to 1.23x `convert` + fsync (scripts/
    bench_snapshot.py --full-copy). Made with the host cache
    and no flushes (`-t unsafe`): nothing needs them on disk before the copy's own final
    fsync, and a crash before that discards the image anyway."""
    if not zero_map_applies(size):
        return False
    commands: list[str] = []
    for offset in range(0, size, _ZERO_WRITE_MAX):
        commands += ["-c", f"write -q -z {offset} {min(_ZERO_WRITE_MAX, size - offset)}"]
    proc.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", *commands, _abs(path)], timeout=60)
    return True


def rebase(path: Path, new_backing: Path, backing_format: str = "qcow2") -> None:
    """Safe rebase: *path* keeps its content but holds only what differs from *new_backing*."""
    proc.run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", _abs(new_backing),
              "-F", backing_format, _abs(path)], timeout=3600)


def set_backing(path: Path, backing: Path, backing_format: str = "qcow2", *,
                relative: bool = False, untrusted: bool = False) -> None:
    """Unsafe rebase: only the header's backing file changes, no data is read or written.
    Right only when *path* already holds exactly what differs from *backing*. *relative*
    names the backing file by its name alone: it resolves from the directory *path* ends up
    in (images/, where both live), so a moved data directory keeps its chains.
    *untrusted*: under the resource limits (a pulled layer, vetted but not yet rewritten)."""
    name = backing.name if relative else _abs(backing)
    proc.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", name,
              "-F", backing_format, _abs(path)], timeout=60,
             limits=UNTRUSTED_LIMITS if untrusted else None)


def add_bitmap(path: Path, name: str) -> None:
    """A persistent dirty bitmap in a qcow2: from now on it records every cluster written."""
    proc.run(["qemu-img", "bitmap", "--add", "-f", "qcow2", _abs(path), name], timeout=60)


def convert_top(source: Path, target: Path, base: Path, base_format: str = "qcow2", *,
                progress: Callable[[float], None] | None = None,
                unsafe_cache: bool = False, untrusted: bool = False) -> None:
    """Copy *source* (whose backing chain ends in *base*) as a new overlay on *base*:
    only what the layers above *base* hold is written. *progress* gets qemu-img's percent.
    *unsafe_cache* as for :func:`convert`; *untrusted*: under the resource limits."""
    cache = ["-t", "unsafe"] if unsafe_cache else []
    _run_convert(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", *cache, "-B",
                  _abs(base), "-F", base_format, _abs(source), _abs(target)], progress,
                 timeout=3600, limits=UNTRUSTED_LIMITS if untrusted else None)


def snapshot_create(path: Path, name: str) -> None:
    """An internal qcow2 snapshot of *path* (metadata only: the L1 table copied and the
    clusters' refcounts raised; later writes copy on write). Only where no QEMU holds it."""
    proc.run(["qemu-img", "snapshot", "-q", "-c", name, _abs(path)], timeout=120)


def snapshot_delete(path: Path, name: str) -> None:
    proc.run(["qemu-img", "snapshot", "-q", "-d", name, _abs(path)], timeout=120)


def snapshot_names(path: Path) -> list[str]:
    """The internal snapshots of *path* (read with force-share: a running QEMU may hold it)."""
    out = proc.run(["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", _abs(path)],
                   timeout=60).stdout
    return [str(s.get("name")) for s in json.loads(out).get("snapshots", []) or []]


def convert_snapshot(source: Path, snapshot: str, target: Path, base: Path | None, *,
                     progress: Callable[[float], None] | None = None) -> None:
    """Copy internal snapshot *snapshot* of the qcow2 *source* into a new qcow2: as an overlay
    on *base* (only what the layers above it held) or whole. Reads with force-share: the
    running QEMU keeps writing *source*, but never into a snapshot's clusters (refcount > 1:
    it copies them on write), so the snapshot's view stands still."""
    argv = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2",
            "-l", f"snapshot.name={snapshot}"]
    if base is not None:
        argv += ["-B", _abs(base), "-F", "qcow2"]
    _run_convert([*argv, _abs(source), _abs(target)], progress, timeout=3600)


_PERCENT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


def _run_convert(argv: list[str], progress: Callable[[float], None] | None, *,
                 timeout: float, limits: proc.Limits | None = None) -> None:
    """qemu-img convert, with its own progress meter (-p) read when *progress* wants it."""
    if progress is None:
        proc.run(argv, timeout=timeout, limits=limits)
        return

    def meter(line: str) -> None:
        match = _PERCENT.search(line)
        if match:
            progress(float(match.group(1)))

    proc.run_reporting([*argv[:2], "-p", *argv[2:]], meter, timeout=timeout, limits=limits)


def read_start(path: Path, fmt: str, length: int, scratch: Path) -> bytes:
    """The first *length* bytes the guest sees (fewer if the disk is smaller), through a
    *scratch* file that is removed again. For vetted images: no backing or data file."""
    try:
        proc.run(["qemu-img", "dd", "-f", fmt, "-O", "raw", f"bs={length}", "count=1",
                  f"if={_abs(path)}", f"of={_abs(scratch)}"], timeout=60,
                 limits=UNTRUSTED_LIMITS)
        return scratch.read_bytes()[:length]
    finally:
        scratch.unlink(missing_ok=True)


def vet_untrusted(path: Path, fmt: str, *, max_virtual_size: int) -> ImageInfo:
    """qemu-img's own view of an untrusted image, refused if it reaches outside the file."""
    image = info(path, fmt, untrusted=True)
    if image.format != fmt:
        raise HostileImageError(f"qemu-img reads the file as {image.format}, not {fmt}")
    if image.backing_file:
        raise HostileImageError(f"the image names a backing file ({image.backing_file!r})")
    if image.data_file:
        raise HostileImageError(f"the image names an external data file ({image.data_file!r})")
    if image.virtual_size > max_virtual_size:
        raise HostileImageError(
            f"the image's virtual size ({image.virtual_size} bytes) is over the limit of "
            f"{max_virtual_size} bytes", hint="raise max_virtual_size (BBSNAP_MAX_VIRTUAL_SIZE)")
    return image

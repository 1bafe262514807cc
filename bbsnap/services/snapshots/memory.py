"""Memory-state snapshots (`servers snapshot --memory`): the guest's RAM and device state and
its disks, all from one instant, while the guest keeps running.

Mechanism, as measured on Debian 12's libvirt 9.0 / QEMU 7.2 (TCG, 128 MiB tiny guest):

- libvirt's push backup and its snapshot API are both *async jobs*: libvirt runs one at a
  time per domain (the second waits 30 s for the first, then fails), so the RAM cannot be
  saved while the backup copies, nor the other way round.
- A memory-only external snapshot (``<memory snapshot='external' file=…>``) with the LIVE
  flag copies the RAM while the guest runs (QEMU's migration to a file); the guest stops
  only for the final pass. With every disk ``snapshot='no'`` libvirt resumes the guest at
  once, so no disk instant can be fixed to match. With the disks ``snapshot='manual'``
  (libvirt >= 8.2) libvirt *leaves the guest paused* at the instant the RAM copy converged
  and returns: bbsnap begins its push backup then (the disks' instant, the same instant:
  the guest has not run since) and resumes the guest. Measured: the guest stopped for
  130-190 ms (QEMU's STOP to RESUME events) with ``migrateSetMaxDowntime(30)``, of which
  the backup's start took 60-100 ms; 240-360 ms with QEMU's 300 ms default downtime.
- At the end of a migration QEMU *inactivates* the disks (it hands them to the
  destination; ``cont`` activates them again). On inactive disks libvirt 9.0 refuses an
  incremental backup ("missing or broken bitmap"); a full backup begun there made QEMU 7.2
  segfault on the ``cont`` that followed (2 runs of 6), and one into a pre-created target
  (REUSE_EXTERNAL) too. So the push backup cannot fix the disks' instant here.
- What does: inactive disks are flushed and QEMU has released their locks, so in that
  window ``qemu-img snapshot -c`` makes an *internal* qcow2 snapshot of each disk file
  (metadata only: 20-70 ms here, whatever the disk's size), and ``cont`` re-opens the file
  and sees it (from then on QEMU copies the snapshot's clusters on write). Measured: the
  guest stopped 115-170 ms (STOP to RESUME events) in 4 runs of 4, no crash. The worker
  then copies the internal snapshot (``qemu-img convert -U -l snapshot.name=…``, as a
  delta on the server's image) while the guest runs, and deletes it through the guest's
  QEMU (QMP ``blockdev-snapshot-delete-internal-sync``: QEMU holds the file). The guest's
  disk chain and definition are never changed; between the instant and the copy's end the
  disk file holds one internal snapshot, named ``bbsnap-<image id>``. The copy makes no
  checkpoint: the chain of disk-only snapshots goes on from the previous one, whose
  bitmap QEMU stored on inactivation and loads again.
- Where the pause goes (this session, scripts/bench_memory.py's breakdown, tiny guest under
  TCG, libvirt's SUSPENDED/RESUMED events): 130-220 ms at 1 GiB and 125-175 ms at 256 MiB
  from QEMU stopping the guest to it running again, made of QEMU's final pass (its own
  ``downtime``: 11-48 ms), libvirt ending the save after QEMU's stream completed (60-120
  ms: mostly writing the save file out to disk, see save_file: 7-44 ms since the file is
  kept in RAM), the internal snapshot (qemu-img: 20-70 ms; now hidden in libvirt's end,
  below) and the resume (12-33 ms). It does
  not grow with RAM: QEMU sends a zero page as a few bytes, so the stream is what the guest
  used (109 MiB at 256 MiB, 121 MiB at 1 GiB). Tried: a lower max downtime (10 ms instead
  of 30): the final pass is already that short (QEMU has a few MiB left at 300-600 MB/s);
  postcopy: impossible for a save (postcopy needs a destination QEMU that asks for pages;
  libvirt's postcopy is a migration flag, not a snapshot one); a cheaper internal snapshot:
  ``qemu-img snapshot -c`` took 31 ms (median of 10 on a 1 GiB qcow2), of which 11 ms is
  starting qemu-img and ~15 ms its flushes; with ``cache.no-flush=on`` 17 ms, not used (the
  guest's own disk's metadata left unflushed: a host crash could corrupt it). Done since:
  qemu-img runs while libvirt ends the save. QEMU inactivates the disks at the end of its
  final pass, vCPUs stopped, and drops its write locks on them then (disks/image_lock.py),
  well before libvirt's save call returns, so bbsnap watches those locks from the moment
  the save begins (the save runs in a thread) and makes the internal snapshots at once;
  before that, qemu-img's own lock check would refuse to write. Measured (bench_memory,
  interleaved, median of 3): STOP to RESUME 110 vs 123 ms at 256 MiB and 143 vs 158 ms at
  1 GiB, 0.90x: qemu-img's 20-25 ms leave the pause, but libvirt's end of the save took
  10-17 ms longer beside it on two cores. Outside the pause the guest can stall too: on a
  loaded host the tick loop showed gaps of 185-340 ms after the command had returned, while
  the worker copied the disk and deleted the internal snapshot through QEMU (QMP, which runs
  under QEMU's big lock); the benchmark prints the longest such stall apart.
- The save file is libvirt's save-image format (a header with the domain definition, then
  QEMU's migration stream), so ``virDomainRestoreFlags`` restores it with a rewritten
  definition (services/memory_restore.py). libvirt writes it raw (its compression is a
  libvirtd-wide qemu.conf setting); the worker compresses it into images/ afterwards, 0600
  (it holds the guest's secrets). The NVRAM of a UEFI guest is QEMU's pflash RAM, which the
  migration stream carries, and QEMU writes it back to the server's store on restore.
- Disks must be qcow2 (raw files have no internal snapshots).
- Quiescing through the agent would freeze the guest's filesystems for the whole RAM copy;
  the memory and the disks are consistent with each other without it, so a memory
  snapshot is crash-consistent as a disk alone (what a clone boots from).

Crash safety: the guest is paused only between the save's return and ``resume``. A
bbsnap killed in that window (or during the save, which libvirtd finishes on its own) leaves
it paused: the worker that adopts the image (crash recovery runs it) waits for the save to
end and resumes a guest that is paused for any reason but a user's. A libvirtd restart
during the save cancels it in libvirtd and fails the call here: the guest is resumed on a
new connection and the image fails. An image whose internal snapshots were not all made
fails; a failed image's internal snapshots are deleted and every file named after it
removed (the memory file is one), so no image is available without its memory file.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Callable

from bbsnap.background import Background
from bbsnap import hostinfo, proc
from bbsnap.disks import image_lock, qemu_img
from bbsnap.errors import BbsnapError, ConflictError, HypervisorError, NotFoundError
from bbsnap.hypervisor import DomainState, Hardware, Hypervisor, PauseCause
from bbsnap.state.layout import DataDir
from bbsnap.models import SnapshotJob
from bbsnap.services import memory_file
from bbsnap.services.snapshots.timeline import COMMAND as timeline
from bbsnap.free_space import spare_bytes
from bbsnap.lazy_dataclass import materialize

MAX_DOWNTIME_MS = 30      # QEMU's final pass target (its default 300 ms is the whole pause)
RESUME_WAIT = 120.0       # seconds to get a paused guest running again (libvirtd restarting)


def work_file(data_dir: DataDir, image_id: str) -> Path:
    """Where libvirt writes the raw save file when it is not kept in RAM (named after the
    image: a failed snapshot's cleanup removes it with the image's other work files)."""
    return data_dir.tmp_dir / _raw_name(image_id)


def save_file(data_dir: DataDir, image_id: str, memory_bytes: int) -> Path:
    """Where the raw save file of a guest with *memory_bytes* of RAM goes: in RAM
    (DataDir.ram_dir) when that has room for twice the guest's RAM beside its free-space
    reserve and the host has as much available, else tmp/.

    Why RAM: libvirt ends a save by writing the file out to disk while the guest is still
    stopped — measured here (1 GiB tiny guest, ~120 MiB file), QEMU let go of the disks
    119-140 ms before libvirt's call returned with the file in tmp/, 22-34 ms with it on
    tmpfs: ~100 ms of the guest's pause. The file lives until the worker has compressed it
    into images/ (a second or two), so it costs RAM only that long; a host that cannot
    spare it keeps the old place."""
    ram = data_dir.ensure_ram_dir()
    if ram is not None and spare_bytes(ram) >= 2 * memory_bytes \
            and hostinfo.available_memory_bytes() >= 2 * memory_bytes:
        return data_dir.ram_file(_raw_name(image_id))
    return work_file(data_dir, image_id)


def _raw_name(image_id: str) -> str:
    return f"{image_id}.memory.save"


def raw_file(data_dir: DataDir, image_id: str) -> Path | None:
    """The image's raw save file, in RAM or in tmp/; None if there is none. In RAM only in
    a directory that is ours (DataDir.trusted_ram_dir), and never through a symlink: what
    is found here is stored as the guest's memory, and a revert restores it."""
    places = [work_file(data_dir, image_id)]
    if data_dir.trusted_ram_dir():
        places.insert(0, data_dir.ram_file(_raw_name(image_id)))
    return next((path for path in places if _regular_file(path)), None)


def _regular_file(path: Path) -> bool:
    """Not through a symlink; its owner may be libvirt's (root), which writes the file into
    our directory on qemu:///system."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def stored_name(image_id: str) -> str:
    return f"{image_id}{memory_file.SUFFIX}"


def check_saveable(server_id: str, hardware: Hardware) -> None:
    """Refuse what QEMU cannot migrate (so cannot save) before anything is made."""
    if hardware.host_devices:
        raise ConflictError(
            f"server {server_id} has host devices that cannot be saved with its memory "
            f"({', '.join(hardware.host_devices)})",
            hint="take a disk-only snapshot (without --memory)")


def internal_name(image_id: str) -> str:
    return f"bbsnap-{image_id}"


def capture(hv: Hypervisor, data_dir: DataDir, image_id: str, job: SnapshotJob,
            read_only: list[str], memory_bytes: int) -> None:
    """Save the RAM live, keep each disk's state at that instant (an internal snapshot)
    while the guest is stopped there, then let it run. Raises, with the guest running
    again and no internal snapshot left, if a step fails. *memory_bytes*: the guest's RAM
    (check's answer), which decides where the save file goes (save_file).

    The disk states are made while libvirt is still ending the save when QEMU's image locks
    show the instant has come (_DiskStates.when_released), else once the save returned."""
    domain = job.domain
    raw = save_file(data_dir, image_id, memory_bytes)
    timeline.duration("memory-save-in-ram", float(raw.parent == data_dir.ram_dir))
    # qemu-img's result, made inside the guest's pause, is made now (lazy_dataclass.py).
    materialize(proc.Result)
    states = _DiskStates([Path(d.source) for d in job.disks], internal_name(image_id))
    save = Background(lambda: hv.save_memory_live(
        domain, raw, [d.device for d in job.disks], read_only, MAX_DOWNTIME_MS), "memory-save")
    try:
        states.when_released(save)
        save.result()
        timeline.mark("memory-saved")
        states.make()  # what when_released has not made (all of it, unless it could)
        timeline.mark("disk-states")
    except BaseException:
        resume_unless_user_paused(hv, domain)  # a failed save may leave it stopped
        if states.made:
            forget_disk_states(hv, job, image_id)
        raise
    resume_after_save(hv, domain)
    timeline.mark("resumed")


class _DiskStates:
    """The internal snapshots keeping each disk's state at the memory save's instant.

    Why early: libvirt takes 60-120 ms to end a save after QEMU's final pass (job stats,
    migration parameters reset, the save header finished), and the guest stays stopped
    throughout; ``qemu-img snapshot -c`` (20-70 ms) can run in that window, because QEMU
    inactivates the disks — flushes them and drops its image locks — at the end of its
    final pass, with the vCPUs already stopped (disks/image_lock.py). Before that,
    qemu-img's own lock check would refuse to write. Trusted only when QEMU's locks were
    seen held before the save began: a QEMU without image locking, or a filesystem
    without OFD locks, shows none at any time, and those disks are done after the save."""

    POLL_SECONDS = 0.001

    def __init__(self, disks: list[Path], name: str) -> None:
        self._disks = disks
        self._name = name
        self._watched = bool(disks) and all(image_lock.held_for_writing(d) for d in disks)
        self.made: list[Path] = []

    def when_released(self, save: Background) -> None:
        """Until *save* ends: as soon as no disk is locked any more, make their states."""
        if not self._watched:
            return
        while not save.wait(self.POLL_SECONDS):
            if not any(image_lock.held_for_writing(d) for d in self._disks):
                timeline.mark("disks-released")
                self.make()
                return

    def make(self) -> None:
        for disk in self._disks:
            if disk not in self.made:
                qemu_img.snapshot_create(disk, self._name)
                self.made.append(disk)


def resume_after_save(hv: Hypervisor, domain: str) -> None:
    """The guest running again once the save returned: every call here is part of its
    pause, so the save's end is not asked again (two calls, not three); a failing call
    (libvirtd going away) takes the patient path."""
    try:
        if hv.pause_cause(domain) is PauseCause.OTHER:
            hv.resume(domain)
    except HypervisorError:
        resume_unless_user_paused(hv, domain)


def copy_disks(job: SnapshotJob, image_id: str,
               progress: Callable[[int], None] | None = None) -> None:
    """The worker's copy: each disk's internal snapshot into its target (a delta on the
    ancestor where there is one), then the internal snapshots deleted."""
    name = internal_name(image_id)
    for index, disk in enumerate(job.disks):
        def report(percent: float, index: int = index) -> None:
            if progress is not None:
                progress(min(99, int((index * 100 + percent) / len(job.disks))))
        if name not in qemu_img.snapshot_names(Path(disk.source)):
            raise BbsnapError(f"the state of {disk.device} at the snapshot's instant is "
                              f"missing from {disk.source}")
        Path(disk.target).unlink(missing_ok=True)  # a killed worker's partial copy
        qemu_img.convert_snapshot(Path(disk.source), name, Path(disk.target),
                                  Path(disk.ancestor) if disk.ancestor else None,
                                  progress=report)


def forget_disk_states(hv: Hypervisor, job: SnapshotJob, image_id: str) -> None:
    """Delete the internal snapshots the image made (best effort: through the guest's QEMU
    while it runs, with qemu-img when it is off). Never anybody else's: only this name."""
    name = internal_name(image_id)
    for disk in job.disks:
        try:
            if name not in qemu_img.snapshot_names(Path(disk.source)):
                continue
            try:
                hv.delete_disk_snapshot(job.domain, disk.source, name)
            except (HypervisorError, NotFoundError):
                qemu_img.snapshot_delete(Path(disk.source), name)  # refused if QEMU holds it
        except BbsnapError:
            pass


def resume_unless_user_paused(hv: Hypervisor, domain: str,
                              wait: float = RESUME_WAIT) -> None:
    """Get a guest a memory save stopped running again, through libvirtd restarts; a guest
    a user paused stays paused. Waits for a save still running in libvirtd first."""
    deadline = time.monotonic() + wait
    while True:
        try:
            if not hv.memory_save_running(domain):
                if hv.pause_cause(domain) is PauseCause.OTHER:
                    hv.resume(domain)
                return
        except HypervisorError:
            if time.monotonic() >= deadline:
                raise
            try:
                hv.close()  # a restarted libvirtd: the next call connects again
            except BbsnapError:
                pass
        if time.monotonic() >= deadline:
            raise HypervisorError(f"the memory save of {domain} did not end within {wait:g} s")
        time.sleep(0.1)


def store(data_dir: DataDir, image_id: str) -> tuple[str, int]:
    """Compress the finished save file into images/ (0600); its name there and its size."""
    name = stored_name(image_id)
    final = data_dir.images_dir / name
    raw = raw_file(data_dir, image_id)
    if raw is None:
        if final.is_file():  # stored by a worker killed before the image turned available
            return name, final.stat().st_size
        raise BbsnapError(f"the memory file of {image_id} is missing")
    size = memory_file.pack(raw, data_dir.tmp_dir / f"{name}.partial", final)
    raw.unlink()
    return name, size


def check(hv: Hypervisor, server_id: str, state: DomainState) -> int:
    """What `snapshot --memory` needs: a running guest QEMU can migrate. Its RAM in bytes."""
    if state is not DomainState.RUNNING:
        raise ConflictError(f"server {server_id} is {state.value}: a memory snapshot needs a "
                            "running server", hint="start it, or snapshot without --memory")
    hardware = hv.hardware(server_id)
    check_saveable(server_id, hardware)
    raw = [d.target for d in hv.disks(server_id) if d.writable and d.format != "qcow2"]
    if raw:
        raise ConflictError(f"server {server_id}'s disk {raw[0]} is not qcow2: a memory "
                            "snapshot keeps the disks' instant inside qcow2 files",
                            hint="snapshot without --memory")
    return hardware.memory_kib * 1024

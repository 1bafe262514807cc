"""The BIOS boot disk: MBR + one FAT16 partition holding syslinux, the kernel and
the initramfs, converted to qcow2.

Assembled without loop devices or mounts (the build machines may have neither):
sfdisk + mtools on a raw file, syslinux installed at an offset, then
``qemu-img convert``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BbsnapError, NotFoundError
from ..proc import run, which

DISK_SIZE = 128 * 1024 * 1024
PARTITION_START = 1024 * 1024        # sector 2048; the counter lives below it
SECTOR = 512
MBR_CODE_SIZE = 440                  # boot code before the disk signature/table
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
KERNEL_CMDLINE = "console=ttyS0,115200 panic=0"


def make_boot_disk(work: Path, vmlinuz: Path, initrd: Path, out: Path) -> None:
    """MBR + FAT16 partition with syslinux, kernel and initramfs; then qcow2 at *out*."""
    raw = work / "disk.raw"
    with raw.open("wb") as handle:
        handle.truncate(DISK_SIZE)
    _partition(raw)
    target = f"{raw}@@{PARTITION_START}"
    # mtools refuses geometries that do not divide the size evenly; we give LBA sizes.
    mtools_env = {"MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}
    part_sectors = (DISK_SIZE - PARTITION_START) // SECTOR
    run([which("mformat"), "-i", target, "-T", str(part_sectors), "-h", "64", "-s", "32",
         "-H", str(PARTITION_START // SECTOR), "-v", "BBSNAPTINY", "-N", "bb5a0001", "::"],
        env=mtools_env, timeout=120)
    config = work / "syslinux.cfg"
    config.write_text(_syslinux_cfg())
    for source, name in ((config, "syslinux.cfg"), (vmlinuz, "vmlinuz"), (initrd, "initrd.gz")):
        run([which("mcopy"), "-i", target, str(source), f"::/{name}"],
            env=mtools_env, timeout=120)
    run([which("syslinux"), "--offset", str(PARTITION_START), "--install", str(raw)],
        env=mtools_env, timeout=120)
    _write_mbr_code(raw)
    # Written under another name and renamed, so *out* is never a half-converted image.
    partial = out.with_name(out.name + ".partial")
    run([which("qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
         str(partial)], timeout=600)
    os.chmod(partial, 0o644)
    partial.rename(out)


def _partition(raw: Path) -> None:
    start = PARTITION_START // SECTOR
    # type e = FAT16 (LBA), the filesystem mformat makes at this size; bootable so
    # syslinux's mbr.bin chains to it.
    script = ("label: dos\nlabel-id: 0xbb5a0001\nunit: sectors\n\n"
              f"start={start}, type=e, bootable\n")
    run([which("sfdisk"), "--no-reread", "--no-tell-kernel", "-q", str(raw)],
        input_text=script, timeout=60)


def _syslinux_cfg() -> str:
    return ("DEFAULT tiny\nPROMPT 0\nTIMEOUT 0\n"
            "LABEL tiny\n  LINUX /vmlinuz\n  INITRD /initrd.gz\n"
            f"  APPEND {KERNEL_CMDLINE}\n")


def _write_mbr_code(raw: Path) -> None:
    """Syslinux's MBR boot code into sector 0, keeping the partition table."""
    if not SYSLINUX_MBR.is_file():
        raise NotFoundError(f"{SYSLINUX_MBR} is missing", hint="apt-get install syslinux-common")
    code = SYSLINUX_MBR.read_bytes()
    if len(code) > MBR_CODE_SIZE:
        raise BbsnapError(f"{SYSLINUX_MBR} is larger than {MBR_CODE_SIZE} bytes")
    with raw.open("r+b") as handle:
        handle.write(code)
        handle.seek(510)
        if handle.read(2) != b"\x55\xaa":
            raise BbsnapError("the disk has no MBR signature after sfdisk")

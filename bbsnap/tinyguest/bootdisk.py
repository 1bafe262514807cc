"""The boot disk: MBR + one FAT16 partition holding syslinux, the kernel and the
initramfs, converted to qcow2. It boots both ways: under BIOS through syslinux's MBR
code, and under UEFI through a unified kernel image (systemd's EFI stub + kernel +
initramfs + command line, one PE file) at the removable-media path
``/EFI/BOOT/BOOTX64.EFI``, which OVMF finds with a fresh NVRAM store (no boot entry).
syslinux.efi was tried first: it hangs after loading the kernel below 256 MiB of RAM.

Assembled without loop devices or mounts (the build machines may have neither):
sfdisk + mtools on a raw file, syslinux installed at an offset, then
``qemu-img convert``.
"""

from __future__ import annotations

import os
from pathlib import Path

from bbsnap.errors import BbsnapError, NotFoundError
from bbsnap.proc import run, which

DISK_SIZE = 128 * 1024 * 1024
PARTITION_START = 1024 * 1024        # sector 2048; the counter lives below it
SECTOR = 512
MBR_CODE_SIZE = 440                  # boot code before the disk signature/table
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
EFI_STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
PAGE = 4096
KERNEL_CMDLINE = "console=ttyS0,115200 panic=0"


def make_boot_disk(work: Path, vmlinuz: Path, initrd: Path, out: Path) -> None:
    """MBR + FAT16 partition with syslinux, kernel and initramfs, and the same as a unified
    kernel image for UEFI; then qcow2 at *out*."""
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
    uki = work / "BOOTX64.EFI"
    _make_unified_kernel_image(work, vmlinuz, initrd, uki)
    run([which("mmd"), "-i", target, "::/EFI", "::/EFI/BOOT"], env=mtools_env, timeout=120)
    for source, name in ((config, "syslinux.cfg"), (vmlinuz, "vmlinuz"), (initrd, "initrd.gz"),
                         (uki, "EFI/BOOT/BOOTX64.EFI")):
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


def _make_unified_kernel_image(work: Path, vmlinuz: Path, initrd: Path, out: Path) -> None:
    """The EFI stub with the command line, kernel and initramfs added as PE sections.

    The sections sit just past the stub's own and each other (page-aligned): OVMF loads the
    whole image at once, and gaps (systemd's documented 0x2000000/0x3000000 addresses)
    make it too large for a 128-256 MiB guest ("Out of Resources").
    """
    if not EFI_STUB.is_file():
        raise NotFoundError(f"{EFI_STUB} is missing", hint="apt-get install systemd-boot-efi")
    cmdline = work / "cmdline.txt"
    cmdline.write_text(KERNEL_CMDLINE)
    address = 0x30000  # past the stub's sections (its image ends below 0x20000)
    argv = [which("objcopy")]
    for section, path in ((".cmdline", cmdline), (".linux", vmlinuz), (".initrd", initrd)):
        argv += ["--add-section", f"{section}={path}",
                 "--change-section-vma", f"{section}={address:#x}"]
        address = (address + path.stat().st_size + PAGE - 1) // PAGE * PAGE
    run([*argv, str(EFI_STUB), str(out)], timeout=120)


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

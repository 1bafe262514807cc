"""Imports that say nothing of the firmware read it from the disk's partition table: an EFI
system partition without BIOS boot code means UEFI; tables made with the real sfdisk."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bbsnap.disks.boot_firmware import needs_uefi

MIB = 1 << 20
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def disk(path: Path, table: str, *, boot_code: bool) -> Path:
    """A 16 MiB raw disk partitioned by sfdisk (*table* is its script), with or without
    something in the MBR's boot code area (GRUB's or syslinux's, for BIOS)."""
    with open(path, "wb") as handle:
        handle.truncate(16 * MIB)
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(path)],
                   input=table, text=True, check=True, capture_output=True)
    if boot_code:
        with open(path, "r+b") as handle:
            handle.write(b"\xeb\x63\x90" + bytes(range(1, 200)))
    return path


UEFI_ONLY_GPT = f"label: gpt\nstart=2048, size=8192, type={ESP}\ntype={LINUX}\n"
HYBRID_GPT = (f"label: gpt\nstart=2048, size=2048, type={BIOS_BOOT}\n"
              f"size=8192, type={ESP}\ntype={LINUX}\n")
UEFI_ONLY_MBR = "label: dos\nstart=2048, size=8192, type=ef\ntype=83\n"
DATA_GPT = f"label: gpt\ntype={LINUX}\n"


@pytest.mark.parametrize("table, boot_code, uefi", [
    (UEFI_ONLY_GPT, False, True),    # e.g. a disk installed under OVMF
    (HYBRID_GPT, True, False),       # Debian/Ubuntu/Fedora cloud images
    (UEFI_ONLY_MBR, False, True),
    (UEFI_ONLY_GPT, True, False),    # boot code: let SeaBIOS try it, as before
    (DATA_GPT, False, False),        # no ESP: nothing says UEFI
])
def test_partition_tables(work_dir, table, boot_code, uefi):
    path = disk(work_dir / "d.raw", table, boot_code=boot_code)
    assert needs_uefi(path.read_bytes()[:64 * 1024]) is uefi


def _imported(bbsnap, *args: str) -> tuple[dict, str]:
    result = bbsnap("images", "import", *args)
    assert result.exit_code == 0, result.stderr
    shown = bbsnap("images", "show", result.stdout.strip(), "--format", "json")
    return json.loads(shown.stdout), result.stderr


def test_a_uefi_only_disk_is_imported_as_uefi_and_says_so(bbsnap, work_dir):
    path = disk(work_dir / "efi.raw", UEFI_ONLY_GPT, boot_code=False)
    record, stderr = _imported(bbsnap, str(path))
    assert record["firmware"] == "uefi"
    assert "EFI system partition and no BIOS boot code: firmware uefi" in stderr

    hybrid = disk(work_dir / "hybrid.raw", HYBRID_GPT, boot_code=True)
    record, stderr = _imported(bbsnap, str(hybrid))
    assert record["firmware"] == "bios" and "note" not in stderr


def test_an_explicit_firmware_is_not_second_guessed(bbsnap, work_dir):
    path = disk(work_dir / "efi.raw", UEFI_ONLY_GPT, boot_code=False)
    record, stderr = _imported(bbsnap, str(path), "--firmware", "bios")
    assert record["firmware"] == "bios" and "note" not in stderr

"""Small real disk images for tests, made with the real qemu-img."""

from __future__ import annotations

import subprocess
from pathlib import Path

MIB = 1024 * 1024


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def raw_disk(path: Path, size: int = 8 * MIB, pattern: int = 0xAB) -> Path:
    """A raw disk with an MBR signature and 1 MiB of *pattern* at 1 MiB."""
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.seek(510)
        handle.write(b"\x55\xaa")
        handle.seek(MIB)
        handle.write(bytes([pattern]) * MIB)
    return path


def qcow2_disk(path: Path, size: int = 8 * MIB, pattern: int = 0xAB) -> Path:
    raw = path.with_suffix(".src.raw")
    raw_disk(raw, size, pattern)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    raw.unlink()
    return path


def written_qcow2(path: Path, size: int, write: str, *create: str) -> Path:
    """A qcow2 of *size* bytes (*create*: more `qemu-img create` options, e.g. a backing
    file) with qemu-io's `write -P` *write* ("PATTERN OFFSET LENGTH") done on it."""
    run("qemu-img", "create", "-q", "-f", "qcow2", *create, str(path), str(size))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {write}", str(path))
    return path


def read_bytes(image: Path, fmt: str, offset: int, length: int) -> bytes:
    """Guest-visible bytes of *image*: converted to a (sparse) raw file and read back."""
    out = image.with_name(image.name + ".read.raw")
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(out))
    try:
        with open(out, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)
    finally:
        out.unlink()

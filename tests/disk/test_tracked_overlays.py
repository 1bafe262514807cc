"""New server disks: copies of one blank overlay per image and size, each born with the
change-tracking bitmap, independent of one another (real qemu-img and qemu-io)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from bbsnap.state.layout import DataDir
from bbsnap.services.snapshots import change_tracking

MIB = 1 << 20


def qemu_info(path: Path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                     check=True, capture_output=True, text=True).stdout)


def make_base(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "32M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4M", str(path)],
                   check=True, capture_output=True)
    return path


def new_disk(data: DataDir, base: Path, server: str, size: int = 64 * MIB) -> Path:
    directory = data.server_dir(server)
    directory.mkdir()
    disk = directory / "disk.qcow2"
    change_tracking.new_tracked_overlay(data, "img-aaaaa", base, size, disk)
    return disk


def test_a_new_disk_is_an_empty_overlay_with_the_bitmap_and_the_marker(tmp_path):
    data = DataDir(tmp_path / "data").ensure()
    base = make_base(tmp_path / "base.qcow2")
    disk = new_disk(data, base, "srv-aaaaa")

    info = qemu_info(disk)
    assert info["backing-filename"] == str(base) and info["virtual-size"] == 64 * MIB
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert [b["name"] for b in bitmaps] == [change_tracking.CHECKPOINT]
    assert "in-use" not in bitmaps[0]["flags"]  # consistent: usable by QEMU
    assert stat.S_IMODE(os.stat(disk).st_mode) == 0o600
    assert (disk.parent / change_tracking.MARKER).read_text().strip() == "disk.qcow2"
    compared = subprocess.run(["qemu-img", "compare", str(disk), str(base)], capture_output=True)
    assert compared.returncode == 0  # nothing of its own yet


def test_disks_share_one_blank_overlay_but_not_their_writes(tmp_path):
    data = DataDir(tmp_path / "data").ensure()
    base = make_base(tmp_path / "base.qcow2")
    first = new_disk(data, base, "srv-aaaaa")
    blank = data.blank_overlay("img-aaaaa", 64 * MIB)
    made = blank.stat().st_mtime_ns
    second = new_disk(data, base, "srv-bbbbb")
    assert blank.stat().st_mtime_ns == made  # reused, not made again
    assert list(data.blank_overlays_dir.iterdir()) == [blank]

    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 8M 1M", str(first)],
                   check=True, capture_output=True)
    assert subprocess.run(["qemu-img", "compare", str(second), str(base)]).returncode == 0
    assert subprocess.run(["qemu-img", "compare", str(blank), str(base)]).returncode == 0
    assert subprocess.run(["qemu-img", "compare", str(first), str(base)],
                          capture_output=True).returncode == 1

    third = new_disk(data, base, "srv-ccccc", size=128 * MIB)  # another size, another blank
    assert qemu_info(third)["virtual-size"] == 128 * MIB
    data.remove_blank_overlays("img-aaaaa")
    assert list(data.blank_overlays_dir.iterdir()) == []

"""A full copy's target has all its L2 tables made before the job (qemu_img.map_as_zero)
and its blocks reserved (disks/reserve.py): every cluster reads zeroes, the image stays the
blank it was, what the copy did not use is given back, and small or incremental targets are
left alone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bbsnap.disks import qemu_img

GIB = 1 << 30


def _map(path: Path) -> list[dict[str, object]]:
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_a_big_blank_target_is_mapped_as_zeroes_and_reads_as_before(tmp_path: Path) -> None:
    size = 2 * GIB + (3 << 20)  # not a multiple of qemu-io's 1 GiB commands
    target, blank = tmp_path / "target.qcow2", tmp_path / "blank.qcow2"
    qemu_img.create_blank(target, size)
    qemu_img.create_blank(blank, size)

    assert qemu_img.map_as_zero(target, size)

    extents = _map(target)
    assert sum(int(str(e["length"])) for e in extents) == size
    assert all(e["zero"] and e["present"] and not e["data"] for e in extents), extents
    compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                               str(target), str(blank)], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert qemu_img.check(target).clean
    assert qemu_img.info(target, "qcow2").virtual_size == size
    assert target.stat().st_mode & 0o777 == 0o600
    assert target.stat().st_blocks * 512 < 4 << 20, "tables only, no data"


def test_a_target_one_table_maps_or_a_huge_one_is_left_to_the_job(tmp_path: Path) -> None:
    small = tmp_path / "small.qcow2"
    qemu_img.create_blank(small, qemu_img.L2_TABLE_SPAN)
    assert not qemu_img.map_as_zero(small, qemu_img.L2_TABLE_SPAN)
    assert not any(e["present"] for e in _map(small))

    huge = tmp_path / "huge.qcow2"
    qemu_img.create_blank(huge, qemu_img.ZERO_MAP_MAX + GIB)
    assert not qemu_img.map_as_zero(huge, qemu_img.ZERO_MAP_MAX + GIB)
    assert not any(e["present"] for e in _map(huge))


def test_the_snapshot_maps_a_full_copys_target_and_never_an_incremental_ones(
        tmp_path: Path) -> None:
    from bbsnap.models import SnapshotDisk, SnapshotJob
    from bbsnap.services.snapshots.start import SnapshotService

    disks = []
    for device, incremental in (("vda", False), ("vdb", True)):
        source = tmp_path / f"{device}.qcow2"
        qemu_img.create_blank(source, 2 * GIB)
        with open(source, "r+b") as handle:  # 8 MiB of the source's file in use
            handle.seek(1 << 20)
            handle.write(b"\x5a" * (8 << 20))
        disks.append(SnapshotDisk(device=device, source=str(source), source_format="qcow2",
                                  target=str(tmp_path / f"{device}.copy.qcow2"),
                                  ancestor=str(source) if incremental else None,
                                  incremental=incremental))
    job = SnapshotJob(domain="srv", domain_uuid="u", mode="backup", disks=tuple(disks))
    # Only the targets step is exercised: it reads each size from the source's header.
    SnapshotService._make_targets(object.__new__(SnapshotService), job)

    full, incremental = (_map(Path(d.target)) for d in disks)
    assert all(e["zero"] and e["present"] for e in full), "the full copy's tables are made"
    assert not any(e["present"] for e in incremental), "an incremental shows its parent"
    # The full copy's blocks are reserved past its end (disks/reserve.py), its size as it was.
    full_target, incremental_target = (Path(d.target) for d in disks)
    assert full_target.stat().st_blocks * 512 >= 8 << 20 > full_target.stat().st_size
    assert incremental_target.stat().st_blocks * 512 < 1 << 20


def test_reserved_blocks_are_given_back_and_a_full_filesystem_gets_no_reservation(
        tmp_path: Path, monkeypatch) -> None:
    from bbsnap.disks import reserve

    target = tmp_path / "target.qcow2"
    qemu_img.create_blank(target, GIB)
    size = target.stat().st_size
    assert reserve.reserve(target, 64 << 20)
    assert target.stat().st_blocks * 512 >= 64 << 20 and target.stat().st_size == size
    assert qemu_img.check(target).clean, "qcow2 sees the same file"
    reserve.release(target)
    assert target.stat().st_blocks * 512 < 1 << 20 and target.stat().st_size == size

    # No room beside the filesystem's free-space reserve: nothing reserved.
    from bbsnap.transfer import stream

    monkeypatch.setattr(stream, "free_space_reserve", lambda _dir: (100 << 20, 60 << 20))
    assert not reserve.reserve(target, 64 << 20)
    assert target.stat().st_blocks * 512 < 1 << 20

"""A full copy's target has all its L2 tables made before the job (qemu_img.map_as_zero)
and its blocks reserved (disks/reserve.py): every cluster reads zeroes, the image stays the
blank it was, what the copy did not use is given back before it is published, and small,
huge or incremental targets are left alone. The snapshot's cases go through the service
(SnapshotService.begin, then the fake's job and a SnapshotFinisher) on the fake hypervisor,
whose job writes into the target files bbsnap made, as QEMU's does."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from bbsnap import hostinfo
from bbsnap.disks import qemu_img
from bbsnap.hypervisor import DiskSpec, DomainSpec
from bbsnap.models import ImageStatus
from bbsnap.services.snapshots.finish import SnapshotFinisher
from bbsnap.services.snapshots.start import SnapshotRequest
from bbsnap.state.catalogue import Catalogue
from bbsnap.state.layout import DataDir
from tests.disk.fake_servers import (base_catalogue, create_request, server_creator,
                                     snapshot_service)
from tests.fakes.hypervisor import FakeHypervisor

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


@pytest.fixture()
def site(work_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[DataDir, Catalogue]]:
    """A data directory and its catalogue with fake_servers' base images; full copies go
    to tmp/ (this file is about targets on disk: a host with no RAM to spare)."""
    monkeypatch.setattr(hostinfo, "available_memory_bytes", lambda: 0)
    data = DataDir(work_dir / "data").ensure()
    catalogue = base_catalogue(data)
    yield data, catalogue
    catalogue.close()


def _foreign_domain(hv: FakeHypervisor, work_dir: Path, disks: dict[str, Path]) -> str:
    """A running domain bbsnap did not create, on *disks* (device -> qcow2): its snapshots
    are full copies (no ancestor; several disks are never a chain's delta either)."""
    spec = DomainSpec(name="foreign", uuid=str(uuid.uuid4()), memory_mib=64, vcpus=1,
                      accel="tcg", console_log=work_dir / "console.log",
                      disks=tuple(DiskSpec(path, target=device) for device, path in disks.items()))
    hv.define(spec)
    hv.start(spec.name)
    return spec.name


def _targets(hv: FakeHypervisor, domain: str, *, incremental: bool) -> dict[str, Path]:
    """The running backup's target files by device (the files bbsnap made, libvirt reuses),
    once its plan is shown to be the *incremental* or full copy the test is about."""
    plan = hv.backup_plan(domain)
    assert plan is not None and plan.reuse_targets
    assert (plan.incremental_from is not None) is incremental
    return {t.device: t.path for t in plan.targets}


def test_the_snapshot_maps_a_full_copys_target_and_leaves_a_small_or_huge_one_to_the_job(
        site, work_dir: Path) -> None:
    data, catalogue = site
    hv = FakeHypervisor()
    sources = {"vda": work_dir / "vda.qcow2", "vdb": work_dir / "vdb.qcow2",
               "vdc": work_dir / "vdc.qcow2"}
    qemu_img.create_blank(sources["vda"], 2 * GIB)
    with open(sources["vda"], "r+b") as handle:  # 8 MiB of the source's file in use
        handle.seek(1 << 20)
        handle.write(b"\x5a" * (8 << 20))
    qemu_img.create_blank(sources["vdb"], qemu_img.L2_TABLE_SPAN)  # one table: not worth it
    qemu_img.create_blank(sources["vdc"], qemu_img.ZERO_MAP_MAX + GIB)  # left to the job
    domain = _foreign_domain(hv, work_dir, sources)
    snapshot_service(data, catalogue, hv).begin(SnapshotRequest(domain))
    targets = _targets(hv, domain, incremental=False)

    full, small, huge = (_map(targets[device]) for device in ("vda", "vdb", "vdc"))
    # Zero clusters only: the target reads as the blank it was (compared in the first test).
    assert all(e["zero"] and e["present"] and not e["data"] for e in full), \
        "the full copy's tables are made"
    assert not any(e["present"] for e in small + huge), "a small or huge target is the job's"
    # The full copy's blocks are reserved past its end (disks/reserve.py), its size as it was.
    assert targets["vda"].stat().st_blocks * 512 >= 8 << 20 > targets["vda"].stat().st_size


def test_the_snapshot_never_maps_nor_reserves_an_incremental_copys_target(
        site, work_dir: Path) -> None:
    data, catalogue = site
    hv = FakeHypervisor()
    # A server bbsnap made: its snapshot copies what it wrote since its birth, on its image.
    creator, _ = server_creator(data, catalogue, hv, work_dir)
    server = creator.create(create_request(work_dir))
    snapshot_service(data, catalogue, hv).begin(SnapshotRequest(server.id))
    incremental = _targets(hv, server.id, incremental=True)["vda"]
    assert not any(e["present"] for e in _map(incremental)), "an incremental shows its parent"
    assert incremental.stat().st_blocks * 512 < 1 << 20, "and has no reservation"


def test_a_full_copy_gives_back_the_blocks_it_did_not_use_before_it_is_published(
        site, work_dir: Path) -> None:
    """The reservation is a guess (the source file's allocated bytes): a preallocated disk
    holding 1 MiB gets ~96 MiB reserved, and its copy, once available, holds no block past
    its end (finish.py's reserve.release)."""
    data, catalogue = site
    hv = FakeHypervisor()
    source = work_dir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc",
                    str(source), str(96 << 20)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 4M 1M", str(source)],
                   check=True, capture_output=True)
    domain = _foreign_domain(hv, work_dir, {"vda": source})
    image = snapshot_service(data, catalogue, hv).begin(SnapshotRequest(domain))
    target = _targets(hv, domain, incremental=False)["vda"]
    reserved = target.stat().st_blocks * 512 - target.stat().st_size
    assert reserved >= 64 << 20, "the reservation this test is about"

    hv.complete_job(domain)
    # QEMU's job writes into the file bbsnap made: the reservation outlives the copy itself.
    assert target.stat().st_blocks * 512 - target.stat().st_size >= 64 << 20
    done = SnapshotFinisher(catalogue, data, lambda: hv).run(image.id)

    assert done.status is ImageStatus.AVAILABLE and done.path
    published = data.images_dir / done.path
    held, size = published.stat().st_blocks * 512, published.stat().st_size
    # Past its end at most the filesystem's own bookkeeping (an extent tree block), never
    # the tens of MiB reserved.
    assert held <= size + (256 << 10), f"{held - size} bytes held past the end"
    assert done.disk_size == held, "the catalogue counts what the copy holds"
    compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                               str(published), str(source)], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr


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
    monkeypatch.setattr(reserve, "free_space_reserve", lambda _dir: (100 << 20, 60 << 20))
    assert not reserve.reserve(target, 64 << 20)
    assert target.stat().st_blocks * 512 < 1 << 20

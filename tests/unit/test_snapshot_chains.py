"""Snapshot chains without libvirt: the catalogue's chain records and the planner's choices
(which checkpoint a snapshot starts from, what it is stored on, and why not)."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.state.migrations import MIGRATIONS, SCHEMA_VERSION
from bbsnap.config import load_settings
from bbsnap.errors import InUseError, UsageError
from bbsnap.hypervisor import DiskInfo
from bbsnap.state.layout import DataDir
from bbsnap.models import ChainLink, Image, ImageStatus, ImageType
from bbsnap.services.snapshots import change_tracking
from bbsnap.services.snapshots import chain as snapshot_chain
from bbsnap.services.snapshots.chain import ChainPlanner, ServerDisk

UUID = "6f1c0c1e-0000-4000-8000-000000000001"


def _image(image_id: str, **fields) -> Image:
    base = {"id": image_id, "type": ImageType.SNAPSHOT, "owner": "me", "created_at": utcnow(),
            "status": ImageStatus.AVAILABLE, "name": image_id, "path": f"{image_id}.qcow2"}
    base.update(fields)
    return Image(**base)


@dataclass
class FakeHypervisor:
    """Only the checkpoint calls the planner and pruning make."""

    names: set[str] = field(default_factory=set)
    redefined: list[str] = field(default_factory=list)

    def has_checkpoint(self, _domain: str, name: str) -> bool:
        return name in self.names

    def redefine_checkpoint(self, _domain: str, name: str, _device: str) -> None:
        self.names.add(name)
        self.redefined.append(name)

    def checkpoints(self, _domain: str) -> list[str]:
        return sorted(self.names)

    def delete_checkpoint(self, _domain: str, name: str) -> None:
        self.names.discard(name)


def _disk(data: DataDir, fmt: str = "qcow2", backing: str | None = None) -> DiskInfo:
    path = data.root / "disk.qcow2"
    path.touch()
    return DiskInfo(target="vda", path=str(path), format=fmt, device="disk", readonly=False,
                    backing=backing)


def _snapshot(catalogue: Catalogue, data: DataDir, image_id: str, disk: DiskInfo,
              parent: str | None, checkpoint: bool = True) -> Image:
    (data.images_dir / f"{image_id}.qcow2").touch()
    link = None
    if checkpoint:
        link = ChainLink(image_id, UUID, snapshot_chain.checkpoint_name(image_id), disk.target,
                         disk.path, snapshot_chain.disk_identity(Path(disk.path)))
    return catalogue.add(_image(image_id, parent_id=parent), chain_link=link,
                         depends_on=parent)


def test_a_catalogue_before_chains_gets_parent_ids_of_its_snapshots(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as raw:
        for migration in MIGRATIONS[:3]:
            for statement in migration:
                raw.execute(statement)
        raw.execute("PRAGMA user_version = 3")
        for image_id, kind, ancestor in (("img-base0", "upload", None),
                                         ("img-snap0", "snapshot", "img-base0")):
            raw.execute("INSERT INTO images (id, type, owner, created_at, updated_at, status, "
                        "name, arch, ancestor_id) VALUES (?, ?, 'me', ?, ?, 'available', ?, "
                        "'x86_64', ?)", (image_id, kind, utcnow().isoformat(),
                                         utcnow().isoformat(), image_id, ancestor))
    cat = Catalogue(path)
    try:
        assert cat.schema_version == SCHEMA_VERSION
        assert cat.get("img-snap0").parent_id == "img-base0"  # stored on its ancestor
        assert cat.get("img-base0").parent_id is None
    finally:
        cat.close()


def test_the_chain_head_is_the_newest_available_snapshot_with_a_checkpoint(catalogue, data):
    disk = _disk(data)
    catalogue.add(_image("img-base0", type=ImageType.UPLOAD))
    _snapshot(catalogue, data, "img-aaaa1", disk, "img-base0")
    _snapshot(catalogue, data, "img-aaaa2", disk, "img-aaaa1")
    _snapshot(catalogue, data, "img-aaaa3", disk, "img-base0", checkpoint=False)  # shut off
    head, link = catalogue.chain_head(UUID)
    assert head.id == "img-aaaa2" and link.checkpoint == "bbsnap-img-aaaa2"
    assert catalogue.chain_length("img-aaaa2") == 3
    assert catalogue.chain_head("another-domain") is None
    catalogue.fail_snapshot("img-aaaa2", "gone")
    assert catalogue.chain_head(UUID)[0].id == "img-aaaa1"  # failed ones are no head


def test_a_snapshot_with_a_delta_on_it_cannot_be_destroyed(catalogue, data):
    disk = _disk(data)
    _snapshot(catalogue, data, "img-aaaa1", disk, None)
    _snapshot(catalogue, data, "img-aaaa2", disk, "img-aaaa1")
    with pytest.raises(InUseError, match="img-aaaa2"):
        catalogue.mark_deleted("img-aaaa1")


def test_a_replanned_snapshot_moves_its_hold_to_its_new_parent(catalogue, data):
    disk = _disk(data)
    catalogue.add(_image("img-base0", type=ImageType.UPLOAD))
    _snapshot(catalogue, data, "img-aaaa1", disk, "img-base0")
    catalogue.add(_image("img-aaaa2", status=ImageStatus.CREATING, parent_id="img-aaaa1"),
                  depends_on="img-aaaa1")
    catalogue.replan_snapshot("img-aaaa2", (), "img-base0")
    assert catalogue.get("img-aaaa2").parent_id == "img-base0"
    assert [d.dependent_id for d in catalogue.dependents("img-aaaa1")] == []
    assert "img-aaaa2" in [d.dependent_id for d in catalogue.dependents("img-base0")]


def _planner(catalogue, data, hv, depth: int = 32) -> ChainPlanner:
    return ChainPlanner(catalogue, data, hv, depth)  # type: ignore[arg-type]


def test_the_next_snapshot_starts_from_the_heads_checkpoint_and_is_stored_on_it(catalogue, data):
    disk = _disk(data)
    _snapshot(catalogue, data, "img-aaaa1", disk, None)
    hv = FakeHypervisor({"bbsnap-img-aaaa1", "backup-tool-7"})
    plan = _planner(catalogue, data, hv).plan(
        "img-aaaa2", ServerDisk("dom", UUID, disk, data.server_dir("dom")), None)
    assert (plan.since, plan.parent.id, plan.checkpoint) == (
        "bbsnap-img-aaaa1", "img-aaaa1", "bbsnap-img-aaaa2")
    assert plan.note is None


@pytest.mark.parametrize("change, reason", [
    ("checkpoint lost", "no longer has checkpoint"),
    ("disk replaced", "is not the one"),
    ("file missing", "is missing"),
])
def test_an_untrusted_head_gives_a_full_copy_that_starts_a_new_chain(catalogue, data, change,
                                                                     reason):
    disk = _disk(data)
    _snapshot(catalogue, data, "img-aaaa1", disk, None)
    hv = FakeHypervisor({"bbsnap-img-aaaa1"})
    if change == "checkpoint lost":
        hv.names.clear()
    elif change == "disk replaced":
        # A copy renamed over it (as `cp` + `mv`); a file removed first and made anew may get
        # the same inode, which libvirt's own check (the bitmap must be in the disk) catches.
        Path(disk.path + ".new").write_bytes(b"another file")
        os.replace(disk.path + ".new", disk.path)
    else:
        (data.images_dir / "img-aaaa1.qcow2").unlink()
    plan = _planner(catalogue, data, hv).plan(
        "img-aaaa2", ServerDisk("dom", UUID, disk, data.server_dir("dom")), None)
    assert plan.since is None and plan.parent is None
    assert plan.checkpoint == "bbsnap-img-aaaa2"
    assert reason in plan.note and "copying the whole disk" in plan.note


def test_a_raw_disk_has_no_chain(catalogue, data):
    plan = _planner(catalogue, data, FakeHypervisor()).plan(
        "img-aaaa1", ServerDisk("dom", UUID, _disk(data, fmt="raw"), data.server_dir("dom")), None)
    assert (plan.since, plan.checkpoint) == (None, None) and "raw disk" in plan.note


def _tracked_server(catalogue, data) -> tuple[Image, DiskInfo]:
    ancestor = catalogue.add(_image("img-base0", type=ImageType.UPLOAD))
    (data.images_dir / "img-base0.qcow2").touch()
    disk = _disk(data, backing=str(data.images_dir / "img-base0.qcow2"))
    data.server_dir("dom").mkdir(parents=True)
    (data.server_dir("dom") / change_tracking.MARKER).write_text("disk.qcow2\n")
    return ancestor, disk


def test_a_bbsnap_servers_first_snapshot_starts_from_the_bitmap_its_disk_was_born_with(
        catalogue, data):
    ancestor, disk = _tracked_server(catalogue, data)
    hv = FakeHypervisor()
    plan = _planner(catalogue, data, hv).plan("img-aaaa1", ServerDisk("dom", UUID, disk, data.server_dir("dom")),
                                              ancestor)
    assert (plan.since, plan.parent.id) == (change_tracking.CHECKPOINT, "img-base0")
    assert hv.redefined == [change_tracking.CHECKPOINT]


def test_past_the_depth_bound_the_snapshot_is_stored_on_the_servers_image(catalogue, data):
    ancestor, disk = _tracked_server(catalogue, data)
    _snapshot(catalogue, data, "img-aaaa1", disk, "img-base0")
    _snapshot(catalogue, data, "img-aaaa2", disk, "img-aaaa1")
    hv = FakeHypervisor({"bbsnap-img-aaaa2", change_tracking.CHECKPOINT})
    server = ServerDisk("dom", UUID, disk, data.server_dir("dom"))
    assert _planner(catalogue, data, hv, depth=4).plan("img-aaaa3", server,
                                                       ancestor).parent.id == "img-aaaa2"
    flat = _planner(catalogue, data, hv, depth=3).plan("img-aaaa3", server, ancestor)
    assert (flat.since, flat.parent.id) == (change_tracking.CHECKPOINT, "img-base0")
    assert "max_chain_depth 3" in flat.note and "copying the whole disk" not in flat.note


def test_pruning_and_giving_up_touch_only_bbsnaps_checkpoints(data):
    hv = FakeHypervisor({"bbsnap-img-aaaa1", "bbsnap-img-aaaa2", change_tracking.CHECKPOINT,
                         "backup-tool-7", "bbsnapshot-of-someone"})
    snapshot_chain.prune(hv, "dom", keep="bbsnap-img-aaaa2")  # type: ignore[arg-type]
    assert hv.names == {"bbsnap-img-aaaa2", change_tracking.CHECKPOINT, "backup-tool-7",
                        "bbsnapshot-of-someone"}
    snapshot_chain.give_up(hv, data.server_dir("dom"), "dom")  # type: ignore[arg-type]
    assert hv.names == {"backup-tool-7", "bbsnapshot-of-someone"}


def test_destroying_a_snapshot_forgets_its_checkpoint_only(catalogue, data):
    from bbsnap.services.images import ImageService

    disk = _disk(data)
    _snapshot(catalogue, data, "img-aaaa1", disk, None)
    catalogue.add(_image("img-upld1", type=ImageType.UPLOAD))
    forgotten: list[tuple[str, str]] = []
    service = ImageService(catalogue, data, lambda uuid, name: forgotten.append((uuid, name)))
    service.destroy("img-upld1")
    service.destroy("img-aaaa1")
    assert forgotten == [(UUID, "bbsnap-img-aaaa1")]


def test_forget_never_deletes_another_tools_checkpoint():
    hv = FakeHypervisor({"backup-tool-7"})
    snapshot_chain.forget(hv, "dom", "backup-tool-7")  # type: ignore[arg-type]
    assert hv.names == {"backup-tool-7"}


def test_max_chain_depth_setting(monkeypatch):
    env = {"BBSNAP_CONFIG": "", "BBSNAP_HOME": "/tmp/x"}
    assert load_settings(environ=env).max_chain_depth == 32
    assert load_settings(environ={**env, "BBSNAP_MAX_CHAIN_DEPTH": "5"}).max_chain_depth == 5
    for bad in ("1", "many", "0"):
        with pytest.raises(UsageError, match="max_chain_depth|MAX_CHAIN_DEPTH"):
            load_settings(environ={**env, "BBSNAP_MAX_CHAIN_DEPTH": bad})

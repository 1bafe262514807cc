"""The memory revert's restore steps (services/memory_restore.py) on the fake hypervisor,
with real files: the memory file is streamed through a FIFO (the fake reads it whole, as
libvirt reads it once), a failed restore neither hangs the feeder nor leaves anything in
tmp/, and a file damaged at its start is refused before the server is touched."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from bbsnap.disks import qemu_img
from bbsnap.errors import HypervisorError, InvalidInputError
from bbsnap.hypervisor import DomainState
from bbsnap.models import Image, ImageStatus, ImageType, Server, ServerStatus
from bbsnap.services import memory_file, memory_restore
from bbsnap.services.snapshots.timeline import Timeline
from bbsnap.state.layout import DataDir
from tests.fakes.hypervisor import FakeHypervisor, running_domain

IMAGE_ID = "img-aaaaa"
# What the saved fixture gives: the fake, the data directory, the server, its snapshot, the
# test's directory.
Saved = tuple[FakeHypervisor, DataDir, Server, Image, Path]


@pytest.fixture()
def saved(work_dir: Path) -> Saved:
    """A running fake domain, and a memory snapshot of it stored as a revert finds it."""
    data = DataDir(work_dir / "data").ensure()
    hv, spec = running_domain(work_dir)
    raw = data.tmp_dir / "raw.save"
    hv.save_memory_live(spec.name, raw, ["vda"], [], 30)
    hv.resume(spec.name)
    name = f"{IMAGE_ID}{memory_file.SUFFIX}"
    memory_file.pack(raw, data.tmp_dir / "partial", data.images_dir / name)
    raw.unlink()
    image = Image(id=IMAGE_ID, type=ImageType.SNAPSHOT, owner="local",
                  created_at=datetime.now(timezone.utc), status=ImageStatus.AVAILABLE,
                  name="s", memory_path=name)
    server = Server(id=spec.name, uuid=spec.uuid, name="dev", status=ServerStatus.ACTIVE,
                    managed=True)
    return hv, data, server, image, work_dir


def restored_on_a_new_disk(saved: Saved, timeline: Timeline) -> memory_restore.MemoryBoot:
    """The restore as a revert runs it, onto a new blank disk: it must leave the server
    running on that disk and nothing in tmp/. Its boot step, to ask how it restored."""
    hv, data, server, image, work_dir = saved
    new_disk = work_dir / "new.qcow2"
    qemu_img.create_blank(new_disk, 16 << 20)
    with memory_restore.prepared(hv, data, server, image, timeline) as boot:
        boot.ready()
        hv.destroy(server.id)
        boot({"vda": new_disk})
    assert hv.info(server.id).state is DomainState.RUNNING
    assert [d.path for d in hv.disks(server.id)] == [str(new_disk)]
    assert list(data.tmp_dir.iterdir()) == []
    return boot


def test_the_memory_is_streamed_into_the_restore_through_a_fifo(saved):
    hv = saved[0]
    timeline = Timeline()
    boot = restored_on_a_new_disk(saved, timeline)
    assert boot.streamed, "restored from the FIFO, not from an unpacked file"
    assert "saved_domain" not in hv.calls, "the header came from the stream"
    assert [label for label, _ in timeline.marks] == ["checked", "verified", "restored"]


def test_a_libvirt_that_cannot_read_the_fifo_gets_the_unpacked_file(saved):
    hv = saved[0]
    hv.refuse_fifos = True
    timeline = Timeline()
    boot = restored_on_a_new_disk(saved, timeline)
    assert not boot.streamed
    assert hv.calls.count("restore_memory") == 2, "the FIFO, then the unpacked file"
    assert [label for label, _ in timeline.marks] == ["checked", "verified", "unpacked",
                                                      "restored"]


def test_a_failed_restore_returns_and_leaves_no_fifo_or_file(saved):
    hv, data, server, image, work_dir = saved
    with memory_restore.prepared(hv, data, server, image, Timeline()) as boot:
        boot.ready()
        hv.destroy(server.id)
        with pytest.raises(HypervisorError, match="Cannot access storage file"):
            boot({"vda": work_dir / "missing.qcow2"})  # the stream, then the file: both fail
    assert hv.info(server.id).state is DomainState.SHUTOFF
    assert list(data.tmp_dir.iterdir()) == []


def test_a_damaged_memory_file_is_refused_before_the_server_is_touched(saved):
    hv, data, server, image, _ = saved
    stored = data.image_path(image.memory_path or "")
    stored.write_bytes(stored.read_bytes()[:20])
    calls = len(hv.calls)
    with pytest.raises(InvalidInputError, match=f"memory file of image {IMAGE_ID}"):
        with memory_restore.prepared(hv, data, server, image, Timeline()):
            pass
    assert hv.calls[calls:] == ["saved_head"]
    assert hv.info(server.id).state is DomainState.RUNNING
    assert list(data.tmp_dir.iterdir()) == []


def test_a_killed_reverts_fifo_is_removed_by_the_next_command(saved):
    _, data, _, _, _ = saved
    import os

    left = memory_restore.restore_fifo(data, "999999999-1")  # a job token no process holds
    os.mkfifo(left, 0o600)
    assert memory_restore.remove_stale(data) == [left]
    assert not left.exists()

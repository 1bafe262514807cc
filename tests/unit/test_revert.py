"""History and revert without a guest: the server's snapshots as the catalogue lists them,
which one a revert picks, its refusals, and the journal a killed rebuild leaves.

The CLI runs in-process against libvirt's test driver (whose domain ``test`` bbsnap did
not create); the rebuild journal is settled against the fake hypervisor
(tests/fakes/hypervisor.py).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.errors import ConflictError, NotFoundError
from bbsnap.hypervisor import DiskInfo, DiskSpec, DomainSpec, DomainState
from bbsnap.state.layout import DataDir
from bbsnap.models import (DependentKind, Image, ImageFilter, ImageStatus, ImageType, ImageVolume,
                           Server)
from bbsnap.models import ServerStatus
from bbsnap.services import rebuild_journal
from bbsnap.services.snapshots import change_tracking
from bbsnap.services.revert import choose_snapshot, match_disks
from tests.fakes.hypervisor import FakeHypervisor

SERVER = Server(id="srv-aaaaa", uuid="6f1c0c1e-0000-4000-8000-000000000001", name="dev",
                status=ServerStatus.ACTIVE, managed=True, image_id="img-base0")


def _image(image_id: str, minutes: int, *, source: str | None = "srv-aaaaa",
           status: ImageStatus = ImageStatus.AVAILABLE,
           image_type: ImageType = ImageType.SNAPSHOT) -> Image:
    return Image(id=image_id, type=image_type, owner="me",
                 created_at=utcnow() - timedelta(minutes=60 - minutes), status=status,
                 name=image_id, path=f"{image_id}.qcow2", source_server=source)


def _history(catalogue: Catalogue) -> list[Image]:
    return catalogue.find(ImageFilter(type=ImageType.SNAPSHOT, source_server=SERVER.id))


def test_a_servers_history_is_its_snapshots_oldest_first_without_deleted_or_others(catalogue):
    catalogue.add(_image("img-base0", 0, source=None, image_type=ImageType.UPLOAD))
    catalogue.add(_image("img-newer", 30))
    catalogue.add(_image("img-older", 10))
    catalogue.add(_image("img-other", 20, source="srv-bbbbb"))
    catalogue.add(_image("img-gone0", 15))
    catalogue.mark_deleted("img-gone0")
    assert [i.id for i in _history(catalogue)] == ["img-older", "img-newer"]


def test_by_default_the_newest_available_snapshot_is_chosen():
    history = [_image("img-old00", 1), _image("img-new00", 2),
               _image("img-copy0", 3, status=ImageStatus.CREATING)]
    assert choose_snapshot(SERVER, history, None, _no_lookup).id == "img-new00"
    assert choose_snapshot(SERVER, history, "img-old00", _no_lookup).id == "img-old00"


def _no_lookup(image_id: str) -> Image:
    raise NotFoundError(f"image {image_id} not found")


def test_no_snapshot_to_revert_to_is_a_conflict_with_the_way_to_take_one():
    with pytest.raises(ConflictError) as caught:
        choose_snapshot(SERVER, [_image("img-copy0", 3, status=ImageStatus.CREATING)], None,
                        _no_lookup)
    assert "no available snapshot" in str(caught.value)
    assert "bbsnap servers snapshot srv-aaaaa" in str(caught.value.hint)


def test_another_servers_snapshot_or_a_plain_image_is_refused_with_a_hint_to_rebuild():
    others = {"img-other": _image("img-other", 5, source="srv-bbbbb"),
              "img-base0": _image("img-base0", 0, source=None, image_type=ImageType.UPLOAD)}
    for image_id in others:
        with pytest.raises(ConflictError) as caught:
            choose_snapshot(SERVER, [_image("img-mine0", 1)], image_id, others.__getitem__)
        assert caught.value.exit_code == 4
        assert f"{image_id} is not a snapshot of server srv-aaaaa" in str(caught.value)
        assert f"bbsnap servers rebuild srv-aaaaa {image_id}" in str(caught.value.hint)
    with pytest.raises(NotFoundError):
        choose_snapshot(SERVER, [], "img-nope0", _no_lookup)


def test_a_snapshot_still_being_created_or_failed_is_refused():
    history = [_image("img-copy0", 3, status=ImageStatus.CREATING),
               _image("img-fail0", 4, status=ImageStatus.FAILED)]
    with pytest.raises(ConflictError, match="still being created"):
        choose_snapshot(SERVER, history, "img-copy0", _no_lookup)
    with pytest.raises(ConflictError, match="is failed"):
        choose_snapshot(SERVER, history, "img-fail0", _no_lookup)


def _disk(target: str) -> DiskInfo:
    return DiskInfo(target=target, path=f"/d/{target}.qcow2", format="qcow2", device="disk",
                    readonly=False)


def _volume(device: str) -> ImageVolume:
    return ImageVolume(device=device, path=f"img-snap0.{device}.qcow2", virtual_size=1,
                       disk_size=1)


def test_each_disk_gets_the_snapshots_file_of_its_device():
    image = _image("img-snap0", 1)
    sources = match_disks(SERVER, [_disk("vda"), _disk("vdb")], image, [_volume("vdb")],
                          every_disk=True)
    assert [(s.disk.target, s.stored) for s in sources] == [
        ("vda", "img-snap0.qcow2"), ("vdb", "img-snap0.vdb.qcow2")]


def test_disks_and_snapshot_files_that_do_not_match_are_refused_clearly():
    image = _image("img-snap0", 1)
    with pytest.raises(ConflictError, match="disks for vda and server srv-aaaaa has writable "
                                            "disks vda, vdb: they do not match"):
        match_disks(SERVER, [_disk("vda"), _disk("vdb")], image, [], every_disk=True)
    with pytest.raises(ConflictError, match="disks for vda, vdb and server srv-aaaaa has "
                                            "writable disks vda"):
        match_disks(SERVER, [_disk("vda")], image, [_volume("vdb")], every_disk=True)
    with pytest.raises(ConflictError, match="has no writable file-backed disk"):
        match_disks(SERVER, [], image, [], every_disk=True)
    # A rebuild from a one-disk image leaves the server's further disks as they are.
    (only,) = match_disks(SERVER, [_disk("vda"), _disk("vdb")], image, [], every_disk=False)
    assert only.disk.target == "vda"


# -- the CLI, on libvirt's test driver --------------------------------------------------------

def _add_rows(bbsnap, *images: Image) -> None:
    catalogue = Catalogue(DataDir(bbsnap.data_dir).ensure().catalogue_path)
    for image in images:
        catalogue.add(image)
    catalogue.close()


def test_servers_show_and_images_list_give_the_servers_history(bbsnap):
    _add_rows(bbsnap, _image("img-later", 20, source="test"), _image("img-first", 10,
              source="test"), _image("img-other", 15, source="srv-bbbbb"))
    shown = bbsnap("-c", "test:///default", "servers", "show", "test", "--format", "json")
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout)["snapshots"] == ["img-first", "img-later"]
    table = bbsnap("-c", "test:///default", "servers", "show", "test")
    assert "snapshots" in table.stdout and "img-first, img-later" in table.stdout
    listed = bbsnap("-c", "test:///default", "images", "list", "--server", "test", "-s")
    assert listed.exit_code == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["img-first",
                                                                          "img-later"]
    gone = bbsnap("-c", "test:///default", "images", "list", "--server", "srv-bbbbb", "-s")
    assert gone.exit_code == 0 and gone.stdout.split("\t")[0] == "img-other"


# -- the journal a killed rebuild leaves -------------------------------------------------------

def _fake_server(disk: str, *, running: bool = False) -> FakeHypervisor:
    """The server as the fake hypervisor holds it, its definition naming *disk*."""
    hv = FakeHypervisor()
    hv.define(DomainSpec(name=SERVER.id, uuid=SERVER.uuid, memory_mib=128, vcpus=1,
                         accel="tcg", disks=(DiskSpec(Path(disk)),),
                         console_log=Path(disk).parent / "console.log"))
    if running:
        hv.start(SERVER.id)
    return hv


def _killed_rebuild(data: DataDir, catalogue: Catalogue) -> rebuild_journal.RebuildJournal:
    """What a rebuild killed after making its overlay leaves: both disks, both holds."""
    server_dir = data.server_dir(SERVER.id)
    server_dir.mkdir(parents=True)
    old, new = server_dir / "disk.qcow2", server_dir / "disk-img-snap0-1.qcow2"
    old.write_bytes(b"old")
    new.write_bytes(b"new")
    (server_dir / change_tracking.MARKER).write_text(f"{new.name}\n")
    for image_id in ("img-base0", "img-snap0"):
        catalogue.add(_image(image_id, 1))
        catalogue.add_dependent(image_id, DependentKind.SERVER, SERVER.id)
    journal = rebuild_journal.RebuildJournal(
        token="1:1:dead", server_id=SERVER.id, uuid=SERVER.uuid,
        swaps=(rebuild_journal.DiskSwap("vda", str(old), str(new)),), old_image_id="img-base0",
        new_image_id="img-snap0", was_running=True, old_marker="disk.qcow2\n")
    rebuild_journal.write(server_dir, journal)
    return journal


def _holders(catalogue: Catalogue) -> list[str]:
    return [i for i in ("img-base0", "img-snap0") if catalogue.dependents(i)]


def test_a_rebuild_killed_before_the_new_definition_rolls_back(data, catalogue):
    journal = _killed_rebuild(data, catalogue)
    hv = _fake_server(journal.swaps[0].old_disk)
    assert rebuild_journal.recover_interrupted_rebuilds(catalogue, data, hv) == [SERVER.id]
    assert Path(journal.swaps[0].old_disk).read_bytes() == b"old"
    assert not Path(journal.swaps[0].new_disk).exists()
    assert _holders(catalogue) == ["img-base0"]
    marker = data.server_dir(SERVER.id) / change_tracking.MARKER
    assert marker.read_text() == "disk.qcow2\n"
    assert hv.info(SERVER.id).state is DomainState.RUNNING, "it ran before, so it runs again"
    assert not rebuild_journal.journal_path(data.server_dir(SERVER.id)).exists()


def test_a_rebuild_killed_after_the_new_definition_rolls_forward(data, catalogue):
    journal = _killed_rebuild(data, catalogue)
    hv = _fake_server(journal.swaps[0].new_disk, running=True)
    assert rebuild_journal.recover_interrupted_rebuilds(catalogue, data, hv) == [SERVER.id]
    assert not Path(journal.swaps[0].old_disk).exists()
    assert Path(journal.swaps[0].new_disk).read_bytes() == b"new"
    assert _holders(catalogue) == ["img-snap0"]
    assert hv.info(SERVER.id).state is DomainState.RUNNING
    assert not rebuild_journal.journal_path(data.server_dir(SERVER.id)).exists()


def test_a_live_rebuilds_journal_and_one_naming_other_files_are_left_alone(data, catalogue):
    from bbsnap.state.process_tokens import current_job_token

    journal = _killed_rebuild(data, catalogue)
    rebuild_journal.write(data.server_dir(SERVER.id), rebuild_journal.RebuildJournal(
        **{**journal.__dict__, "token": current_job_token()}))
    hv = _fake_server(journal.swaps[0].old_disk)
    assert rebuild_journal.recover_interrupted_rebuilds(catalogue, data, hv) == []
    assert Path(journal.swaps[0].new_disk).exists()
    outside = data.root / "not-ours.qcow2"
    outside.write_bytes(b"x")
    swap = rebuild_journal.DiskSwap("vda", journal.swaps[0].old_disk, str(outside))
    rebuild_journal.write(data.server_dir(SERVER.id), rebuild_journal.RebuildJournal(
        **{**journal.__dict__, "swaps": (swap,)}))
    rebuild_journal.recover_interrupted_rebuilds(catalogue, data, hv)
    assert outside.exists(), "a journal is never a licence to delete outside the server's dir"


def _killed_foreign_revert(data: DataDir, catalogue: Catalogue, users_disk: Path,
                           devices: tuple[str, ...]) -> rebuild_journal.RebuildJournal:
    """A revert of a domain bbsnap did not create, killed after making its overlays: the
    user's own disks outside the data directory, the new ones in dom-<uuid>/."""
    directory = data.domain_dir(SERVER.uuid)
    directory.mkdir(parents=True)
    users_disk.parent.mkdir(parents=True)
    swaps = []
    for device in devices:
        old, new = users_disk.with_name(f"{device}.qcow2"), directory / f"disk-{device}.qcow2"
        old.write_bytes(b"old")
        new.write_bytes(b"new")
        swaps.append(rebuild_journal.DiskSwap(device, str(old), str(new)))
    catalogue.add(_image("img-snap0", 1, source="web"))
    catalogue.add_dependent("img-snap0", DependentKind.SERVER, "web")
    journal = rebuild_journal.RebuildJournal(
        token="1:1:dead", server_id="web", uuid=SERVER.uuid, swaps=tuple(swaps),
        old_image_id=None, new_image_id="img-snap0", was_running=False, old_marker=None)
    rebuild_journal.write(directory, journal)
    return journal


def _foreign(hv_disks: list[str]) -> FakeHypervisor:
    hv = FakeHypervisor()
    hv.define(DomainSpec(name="web", uuid=SERVER.uuid, memory_mib=128, vcpus=1, accel="tcg",
                         disks=tuple(DiskSpec(Path(d), target=f"vd{'ab'[i]}")
                                     for i, d in enumerate(hv_disks)),
                         console_log=Path(hv_disks[0]).parent / "console.log"))
    return hv


def test_a_killed_foreign_revert_rolls_forward_and_never_deletes_the_users_disks(
        data, catalogue, tmp_path):
    journal = _killed_foreign_revert(data, catalogue, tmp_path / "users" / "x", ("vda", "vdb"))
    hv = _foreign([s.new_disk for s in journal.swaps])
    assert rebuild_journal.recover_interrupted_rebuilds(catalogue, data, hv) == ["web"]
    assert all(Path(s.old_disk).read_bytes() == b"old" for s in journal.swaps), "the user's"
    assert all(Path(s.new_disk).exists() for s in journal.swaps)
    assert [d.dependent_id for d in catalogue.dependents("img-snap0")] == ["web"]
    assert not rebuild_journal.journal_path(data.domain_dir(SERVER.uuid)).exists()


def test_a_killed_multi_disk_revert_rolls_back_every_new_overlay(data, catalogue, tmp_path):
    journal = _killed_foreign_revert(data, catalogue, tmp_path / "users" / "x", ("vda", "vdb"))
    hv = _foreign([s.old_disk for s in journal.swaps])
    assert rebuild_journal.recover_interrupted_rebuilds(catalogue, data, hv) == ["web"]
    assert not any(Path(s.new_disk).exists() for s in journal.swaps)
    assert all(Path(s.old_disk).read_bytes() == b"old" for s in journal.swaps)
    assert catalogue.dependents("img-snap0") == []


def test_a_journal_written_before_multi_disk_rebuilds_is_still_settled(data, catalogue):
    journal = _killed_rebuild(data, catalogue)
    old_format = {**{k: v for k, v in journal.__dict__.items() if k != "swaps"},
                  "device": "vda", "old_disk": journal.swaps[0].old_disk,
                  "new_disk": journal.swaps[0].new_disk}
    rebuild_journal.journal_path(data.server_dir(SERVER.id)).write_text(json.dumps(old_format))
    hv = _fake_server(journal.swaps[0].new_disk, running=True)
    assert rebuild_journal.recover_interrupted_rebuilds(catalogue, data, hv) == [SERVER.id]
    assert not Path(journal.swaps[0].old_disk).exists()
    assert _holders(catalogue) == ["img-snap0"]


def test_recovery_waits_out_a_start_that_reads_paused(monkeypatch):
    """libvirt shows a domain paused while it still starts it (QEMU runs -S until set up):
    recovery of a killed revert waits for that to settle before judging the server paused
    by someone; a pause that lasts is left alone."""
    from types import SimpleNamespace

    from bbsnap.hypervisor import DomainState
    from bbsnap.services import rebuild_journal

    class Starting:
        def __init__(self, states):
            self.states = list(states)

        def info(self, name):
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return SimpleNamespace(state=state)

    starting = Starting([DomainState.PAUSED, DomainState.PAUSED, DomainState.RUNNING])
    assert rebuild_journal._settled_state(starting, "srv-aaaaa") is DomainState.RUNNING
    monkeypatch.setattr(rebuild_journal, "STARTING_UP_WAIT", 0.5)
    paused = Starting([DomainState.PAUSED])
    assert rebuild_journal._settled_state(paused, "srv-aaaaa") is DomainState.PAUSED


def test_revert_and_rebuild_of_an_unknown_server_say_nothing_before_the_error(tmp_path):
    """Validation before output: no "Reverting server ..." line for a server that is not
    there, only the one-line error (exit 3)."""
    from click.testing import CliRunner

    from bbsnap.cli.main import cli

    env = {"BBSNAP_HOME": str(tmp_path / "data"), "BBSNAP_CONFIG": ""}
    for args in (["servers", "revert", "srv-zzzzz"],
                 ["servers", "rebuild", "srv-zzzzz", "img-zzzzz"]):
        result = CliRunner().invoke(cli, ["-c", "test:///default", *args], env=env)
        assert result.exit_code == 3, result.stderr
        assert result.stderr.splitlines() == [line for line in result.stderr.splitlines()
                                              if line.startswith("bbsnap: error:")], result.stderr
        assert len(result.stderr.splitlines()) == 1

"""DataDir's RAM work directory (state/layout.py): the user's own directory on the shared
/dev/shm, never one someone else planted, and each data directory's files kept apart."""

from __future__ import annotations

import os

import pytest

from bbsnap.state import layout
from bbsnap.state.layout import DataDir



def test_made_private_and_shared_by_the_users_data_directories(shm, tmp_path):
    one, two = DataDir(tmp_path / "one"), DataDir(tmp_path / "two")
    made = one.ensure_ram_dir()
    assert made == shm / f"bbsnap-{os.getuid()}" == two.ensure_ram_dir()
    assert made.stat().st_mode & 0o777 == 0o700
    one.ram_file("img-aaaaa.memory.save").write_bytes(b"1")
    two.ram_file("img-aaaaa.memory.save").write_bytes(b"2")  # the same id elsewhere
    assert one.ram_file("img-aaaaa.memory.save") != two.ram_file("img-aaaaa.memory.save")
    one.remove_image_files("img-aaaaa")
    assert one.ram_files() == [] and [p.read_bytes() for p in two.ram_files()] == [b"2"]


def test_a_planted_symlink_is_not_used(shm, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (shm / f"bbsnap-{os.getuid()}").symlink_to(elsewhere)
    assert DataDir(tmp_path / "data").ensure_ram_dir() is None


def test_a_directory_others_can_enter_is_not_used(shm, tmp_path):
    (shm / f"bbsnap-{os.getuid()}").mkdir(mode=0o755)
    os.chmod(shm / f"bbsnap-{os.getuid()}", 0o755)
    assert DataDir(tmp_path / "data").ensure_ram_dir() is None


def test_a_file_in_its_place_or_no_tmpfs_is_not_used(shm, tmp_path, monkeypatch):
    (shm / f"bbsnap-{os.getuid()}").write_text("not a directory")
    assert DataDir(tmp_path / "data").ensure_ram_dir() is None
    monkeypatch.setattr(layout, "RAM_ROOT", str(tmp_path / "no-such-root"))
    assert DataDir(tmp_path / "data").ensure_ram_dir() is None


def test_someone_elses_directory_is_not_used(shm, tmp_path):
    if os.getuid() != 0:
        pytest.skip("making a directory another user owns needs root")
    planted = shm / f"bbsnap-{os.getuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, 12345, 12345)
    assert DataDir(tmp_path / "data").ensure_ram_dir() is None


def test_a_save_file_is_never_found_through_a_planted_directory_or_symlink(shm, tmp_path):
    from bbsnap.services.snapshots import memory

    data = DataDir(tmp_path / "data")
    data.tmp_dir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (shm / f"bbsnap-{os.getuid()}").symlink_to(elsewhere)
    crafted = elsewhere / data.ram_file("img-aaaaa.memory.save").name
    crafted.write_bytes(b"a crafted save image")
    assert data.trusted_ram_dir() is None
    assert memory.raw_file(data, "img-aaaaa") is None, "not read through the planted symlink"
    assert data.ram_files() == []
    data.remove_image_files("img-aaaaa")
    assert crafted.exists(), "nothing touched in a directory that is not ours"

    # In tmp/, a symlink in the save file's place is not followed either.
    memory.work_file(data, "img-bbbbb").symlink_to(crafted)
    assert memory.raw_file(data, "img-bbbbb") is None


def test_a_save_file_in_our_own_ram_directory_is_found_first(shm, tmp_path):
    from bbsnap.services.snapshots import memory

    data = DataDir(tmp_path / "data")
    data.tmp_dir.mkdir(parents=True)
    assert data.ensure_ram_dir() == data.trusted_ram_dir()
    in_ram = data.ram_file("img-aaaaa.memory.save")
    in_ram.write_bytes(b"1")
    memory.work_file(data, "img-aaaaa").write_bytes(b"2")
    assert memory.raw_file(data, "img-aaaaa") == in_ram


@pytest.mark.parametrize(("plant", "why"), [
    ("symlink", "it is a symlink"), ("open", "others can enter it (mode 0755)"),
    ("file", "it is not a directory")])
def test_the_snapshot_path_and_doctor_refuse_the_same_planted_ram_dir(shm, tmp_path, plant,
                                                                       why):
    """One decision (layout.opened_ram_dir) for the files a snapshot uses and the ones doctor
    reads: neither trusts what the other refuses, and doctor says why."""
    from bbsnap.services import ram_reclaim

    data = DataDir(tmp_path / "data")
    if plant == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        data.ram_dir.symlink_to(tmp_path / "elsewhere")
    elif plant == "open":
        data.ram_dir.mkdir()
        os.chmod(data.ram_dir, 0o755)
    else:
        data.ram_dir.write_text("not a directory")
    assert data.trusted_ram_dir() is None and data.ensure_ram_dir() is None
    assert ram_reclaim.survey(data, None).refused == why

    if plant == "open":
        data.ram_dir.rmdir()
    else:
        data.ram_dir.unlink()
    assert ram_reclaim.survey(data, None).refused == "", "none there: nothing to refuse"
    assert data.ensure_ram_dir() == data.trusted_ram_dir() == data.ram_dir
    assert ram_reclaim.survey(data, None).refused == ""


def test_the_qemu_ram_dir_lets_qemus_group_in_and_nobody_else(shm, tmp_path):
    import grp

    data = DataDir(tmp_path / "data", qemu_user="nobody")  # a user with a group of its own
    made = data.ensure_qemu_ram_dir()
    gid = data.qemu_gid()
    assert made == shm / f"bbsnap-{os.getuid()}-qemu"
    if os.getuid() == 0 and gid is not None:
        assert (made.stat().st_mode & 0o777, made.stat().st_gid) == (0o710, gid), \
            grp.getgrgid(gid).gr_name
    assert data.ensure_ram_dir() is not None
    data.qemu_ram_file("img-aaaaa.vda.copy.qcow2").write_bytes(b"copy")
    data.ram_file("img-aaaaa.memory.save").write_bytes(b"save")
    assert sorted(p.name.split(".", 1)[1] for p in data.ram_files()) == [
        "img-aaaaa.memory.save", "img-aaaaa.vda.copy.qcow2"]
    data.remove_image_files("img-aaaaa")
    assert data.ram_files() == []


def test_a_qemu_ram_dir_others_can_enter_or_list_is_not_used(shm, tmp_path):
    data = DataDir(tmp_path / "data", qemu_user="no-such-user-here")
    planted = shm / f"bbsnap-{os.getuid()}-qemu"
    planted.mkdir()
    for mode in (0o711, 0o750, 0o770):
        os.chmod(planted, mode)
        assert data.ensure_qemu_ram_dir() is None, oct(mode)
    os.chmod(planted, 0o700)
    assert data.ensure_qemu_ram_dir() == planted  # QEMU runs as us: ours alone is right


def test_full_copies_go_to_ram_only_for_a_standalone_file_that_fits(shm, tmp_path, monkeypatch):
    import subprocess

    from bbsnap import hostinfo
    from bbsnap.services.snapshots import targets

    data = DataDir(tmp_path / "data", qemu_user="no-such-user-here")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(1 << 20))
    base, overlay = tmp_path / "base.qcow2", tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(overlay)], check=True)
    budget = targets.RamBudget(data)
    assert budget.target("img-aaaaa", "vda", str(raw), "raw") == data.qemu_ram_file(
        "img-aaaaa.vda.copy.qcow2")
    assert budget.target("img-aaaaa", "vdb", str(base), "qcow2") is not None
    assert budget.target("img-aaaaa", "vdc", str(overlay), "qcow2") is None, "on a backing file"
    external = tmp_path / "external.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={tmp_path / 'external.raw'}", str(external), "64M"], check=True)
    assert budget.target("img-aaaaa", "vdf", str(external), "qcow2") is None, "data elsewhere"
    assert budget.target("img-aaaaa", "vdd", "/dev/null", "raw") is None, "not a regular file"
    assert budget.target("img-aaaaa", "vde", str(tmp_path / "gone"), "raw") is None
    monkeypatch.setattr(hostinfo, "available_memory_bytes", lambda: 1 << 20)
    assert targets.RamBudget(data).target("img-bbbbb", "vda", str(raw), "raw") is None, \
        "the host cannot spare twice the copy"


def test_a_qemu_ram_dir_qemus_group_cannot_be_given_is_not_left_behind(shm, tmp_path,
                                                                        monkeypatch):
    def refused(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(1, "Operation not permitted")  # a user outside QEMU's group

    monkeypatch.setattr(layout.os, "chown", refused)
    data = DataDir(tmp_path / "data", qemu_user="nobody")
    assert data.ensure_qemu_ram_dir() is None
    assert not data.qemu_ram_dir.exists()

"""The backup targets (services/snapshots/targets.py): their size, read from the server's
disk file instead of asked of libvirt, agrees with qemu-img; each is a copy of a blank
template qemu-img made, byte for byte what `qemu-img create` writes; doctor keeps the
templates."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from bbsnap.disks import qemu_img
from bbsnap.models import Image, ImageStatus, ImageType
from bbsnap.services import reclaim
from bbsnap.services.snapshots.targets import copy_blank
from bbsnap.services.snapshots.targets import file_capacity as _file_capacity
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.state.layout import DataDir


def _virtual_size(path, fmt):  # type: ignore[no-untyped-def]
    out = subprocess.run(["qemu-img", "info", "--output=json", "-f", fmt, str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["virtual-size"]


def test_a_disks_size_from_its_file_is_what_qemu_img_says(tmp_path):
    qcow2, raw, overlay = tmp_path / "d.qcow2", tmp_path / "d.raw", tmp_path / "o.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "8G"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "65M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(qcow2),
                    str(overlay), "9G"], check=True)
    assert _file_capacity(str(qcow2), "qcow2") == _virtual_size(qcow2, "qcow2") == 8 << 30
    assert _file_capacity(str(raw), "raw") == _virtual_size(raw, "raw") == 65 << 20
    assert _file_capacity(str(overlay), "qcow2") == _virtual_size(overlay, "qcow2") == 9 << 30


def test_what_cannot_be_read_from_the_file_is_left_to_libvirt(tmp_path):
    assert _file_capacity(str(tmp_path / "missing.qcow2"), "qcow2") is None
    (tmp_path / "not.qcow2").write_bytes(b"\0" * 512)
    assert _file_capacity(str(tmp_path / "not.qcow2"), "qcow2") is None  # no qcow2 magic
    assert _file_capacity("/dev/null", "raw") is None  # not a regular file
    assert _file_capacity(str(tmp_path / "not.qcow2"), "vmdk") is None


def test_a_target_is_a_copy_of_a_template_qemu_img_made_byte_for_byte(tmp_path):
    """Each size's first target makes its template (qemu-img); later ones copy it. A blank
    qcow2 holds no time or id, so the copy is what `qemu-img create` would have written;
    a mapped template is what create + map_as_zero writes."""
    data = DataDir(tmp_path / "data").ensure()
    templates = data.blank_overlays_dir
    made = {}
    for name, size, mapped in (("small", 64 << 20, False), ("big", 2 << 30, True)):
        expected = tmp_path / f"{name}.expected.qcow2"
        qemu_img.create_blank(expected, size)
        if mapped:
            assert qemu_img.map_as_zero(expected, size)
        for round_ in range(2):
            target = tmp_path / f"{name}.{round_}.qcow2"
            copy_blank(data, target, size, mapped=mapped)
            assert target.read_bytes() == expected.read_bytes()
            assert stat.S_IMODE(target.stat().st_mode) == 0o600
        made[name] = data.target_template(size, mapped=mapped)
        assert made[name].name == f"blank-{size}{'-mapped' if mapped else ''}.qcow2"
    assert sorted(templates.iterdir()) == sorted(made.values())
    assert all(data.is_target_template(path.name) for path in made.values())
    assert not data.is_target_template("img-abcde-67108864.qcow2")  # a catalogue image's blank overlay


def test_a_template_that_is_not_what_its_name_says_is_made_again(tmp_path):
    data = DataDir(tmp_path / "data").ensure()
    templates = data.blank_overlays_dir
    size = 64 << 20
    template = data.target_template(size, mapped=False)
    expected = tmp_path / "expected.qcow2"
    qemu_img.create_blank(expected, size)
    other_size = tmp_path / "other.qcow2"
    qemu_img.create_blank(other_size, 32 << 20)
    elsewhere = tmp_path / "elsewhere.qcow2"
    qemu_img.create_blank(elsewhere, size)
    for bad in (b"", b"not a qcow2" * 100, other_size.read_bytes(), None):
        template.unlink(missing_ok=True)
        if bad is None:
            template.symlink_to(elsewhere)  # never followed: made again as a file
        else:
            template.write_bytes(bad)
        target = tmp_path / "target.qcow2"
        copy_blank(data, target, size, mapped=False)
        assert target.read_bytes() == expected.read_bytes()
        assert template.is_file() and not template.is_symlink()
        assert template.read_bytes() == expected.read_bytes()
    assert [p.name for p in templates.iterdir()] == [template.name]  # no work file left


def test_doctor_keeps_target_templates_and_reclaims_other_strays(tmp_path):
    data = DataDir(tmp_path / "data").ensure()
    catalogue = Catalogue(data.catalogue_path)
    try:
        image = catalogue.add(Image(id="img-aaaaa", type=ImageType.SNAPSHOT, owner="local",
                                    created_at=utcnow(), status=ImageStatus.AVAILABLE,
                                    name="an image", arch="x86_64", path="img-aaaaa.qcow2"))
        qemu_img.create_blank(data.image_file(image.id), 16 << 20)
        copy_blank(data, tmp_path / "t.qcow2", 16 << 20, mapped=False)
        stray = data.blank_overlays_dir / "leftover.qcow2"
        stray.write_bytes(b"x")
        found = reclaim.survey(data, catalogue, "test:///default", list)
    finally:
        catalogue.close()
    assert [o.path for o in found.orphans] == [stray]


def test_a_target_on_another_file_system_than_its_template_is_still_copied(tmp_path):
    """tmp/ may be a file system of its own (a tmpfs mounted there; tests/system's disk-full
    case): copy_file_range refuses to cross file systems, the copy is made all the same."""
    data = DataDir(tmp_path / "data").ensure()
    templates = data.blank_overlays_dir
    elsewhere = Path(tempfile.mkdtemp(prefix="bbsnap-target-", dir="/dev/shm"))
    try:
        assert os.stat(elsewhere).st_dev != os.stat(templates).st_dev
        expected = tmp_path / "expected.qcow2"
        qemu_img.create_blank(expected, 2 << 30)
        assert qemu_img.map_as_zero(expected, 2 << 30)
        target = elsewhere / "target.qcow2"
        copy_blank(data, target, 2 << 30, mapped=True)
        assert target.read_bytes() == expected.read_bytes()
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
    finally:
        shutil.rmtree(elsewhere)

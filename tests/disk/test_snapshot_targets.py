"""The backup target's size, read from the server's disk file instead of asked of libvirt
(services/snapshots/start.py _file_capacity), agrees with qemu-img."""

from __future__ import annotations

import json
import subprocess

from bbsnap.services.snapshots.start import _file_capacity


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

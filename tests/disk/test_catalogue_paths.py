"""A catalogue row's `path` is data, not a file name to trust (DESIGN §8): a row edited to
point outside DATA/images (absolute, `..`, a symlink out) is refused by `images destroy`
and `images export`, and a stored qcow2 whose backing file is a host file is not exported."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bbsnap.errors import CataloguePathError
from bbsnap.state.layout import DataDir
from tests.images import MIB, qcow2_disk, raw_disk, run


@pytest.fixture()
def secret(work_dir) -> Path:
    """A host file outside the data directory that no catalogue row may reach: a qcow2
    (another VM's disk, say), so the old code really deleted and exported it."""
    return qcow2_disk(work_dir / "host-secret.qcow2", size=4 * MIB, pattern=0x5E)


def set_row_path(bbsnap, image_id: str, path: str) -> None:
    with sqlite3.connect(bbsnap.data_dir / "catalogue.sqlite3") as conn:
        conn.execute("UPDATE images SET path = ? WHERE id = ?", (path, image_id))


def hostile_path(kind: str, bbsnap, secret: Path) -> str:
    """The row's new path: absolute, with `..`, or a symlink in images/ leading out."""
    if kind == "absolute":
        return str(secret)
    if kind == "dotdot":
        return f"../../{secret.name}"    # DATA/images/../../ is the work dir
    link = bbsnap.data_dir / "images" / "img-link.qcow2"
    link.symlink_to(secret)
    return link.name


KINDS = ["absolute", "dotdot", "symlink"]


@pytest.mark.parametrize("kind", KINDS)
def test_destroy_does_not_delete_a_file_outside_the_data_directory(bbsnap, image_id, secret,
                                                                   kind):
    before = secret.read_bytes()
    set_row_path(bbsnap, image_id, hostile_path(kind, bbsnap, secret))
    result = bbsnap("images", "destroy", image_id)
    assert result.exit_code == 1 and "inside" in result.stderr, result.stderr
    assert secret.read_bytes() == before
    # Refused before the row changed: it is not left deleted with its (real) file behind.
    shown = bbsnap("images", "show", image_id, "--format", "json")
    assert shown.exit_code == 0 and '"state": "available"' in shown.stdout, shown.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_export_does_not_serve_a_file_outside_the_data_directory(bbsnap, image_id, secret,
                                                                 work_dir, kind):
    set_row_path(bbsnap, image_id, hostile_path(kind, bbsnap, secret))
    out = work_dir / "out.raw"
    result = bbsnap("images", "export", image_id, "-o", str(out), "--compress", "none")
    assert result.exit_code == 1 and "inside" in result.stderr, result.stderr
    assert not out.exists()
    stdout = bbsnap("images", "export", image_id, "-o", "-")
    assert stdout.exit_code == 1 and stdout.stdout == ""


@pytest.mark.parametrize("backing", ["absolute", "relative"])
def test_export_refuses_a_stored_qcow2_backed_by_a_host_file(bbsnap, image_id, work_dir,
                                                             backing):
    host = raw_disk(work_dir / "host-disk.raw", size=4 * MIB, pattern=0x5E)
    stored = bbsnap.data_dir / "images" / f"{image_id}.qcow2"
    stored.unlink()
    name = str(host) if backing == "absolute" else f"../../{host.name}"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", name, str(stored))
    out = work_dir / "out.raw"
    result = bbsnap("images", "export", image_id, "-o", str(out), "--compress", "none")
    assert result.exit_code == 1 and "backing file" in result.stderr, result.stderr
    assert not out.exists()
    for fmt in ("raw", "qcow2"):
        stdout = bbsnap("images", "export", image_id, "-o", "-", "--format", fmt)
        assert stdout.exit_code == 1 and stdout.stdout == ""


def test_export_still_flattens_a_chain_inside_the_data_directory(bbsnap, image_id, work_dir):
    base = bbsnap.data_dir / "images" / f"{image_id}.qcow2"
    delta = bbsnap.data_dir / "images" / f"{image_id}-delta.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.name, str(delta))
    set_row_path(bbsnap, image_id, delta.name)
    result = bbsnap("images", "export", image_id, "-o", str(work_dir / "out.gz"))
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("stored", ["/etc/passwd", "../catalogue.sqlite3", "a/../../x", "",
                                    ".", "img-a.qcow2/.."])
def test_image_path_refuses_names_that_leave_images(tmp_path, stored):
    data = DataDir(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(CataloguePathError):
        data.image_path(stored)


def test_image_path_accepts_plain_names_and_symlinks_inside(tmp_path):
    data = DataDir(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    (images / "img-a.qcow2").write_bytes(b"")
    (images / "img-b.qcow2").symlink_to("img-a.qcow2")
    assert data.image_path("img-a.qcow2") == images / "img-a.qcow2"
    assert data.image_path("img-b.qcow2") == images / "img-b.qcow2"
    assert data.image_path("img-missing.qcow2") == images / "img-missing.qcow2"


def test_recovery_does_not_glob_a_row_id_out_of_the_data_directory(bbsnap, image_id, work_dir):
    # recovery removes an interrupted image's files by `<id>[.-]*`: an id edited to climb
    # out of tmp/ and images/ matched host files (here victim-1 and victim.x).
    victims = [work_dir / "victim-1", work_dir / "victim.x"]
    for victim in victims:
        victim.write_text("keep")
    with sqlite3.connect(bbsnap.data_dir / "catalogue.sqlite3") as conn:
        conn.execute("UPDATE images SET id = '../../victim', status = 'creating', "
                     "job = '1:0:gone' WHERE id = ?", (image_id,))
    result = bbsnap("images", "list")
    assert all(v.read_text() == "keep" for v in victims)
    # The row is failed without touching a file, and commands go on working (it does not
    # trip every later command).
    assert result.exit_code == 0, result.stderr
    with sqlite3.connect(bbsnap.data_dir / "catalogue.sqlite3") as conn:
        status = conn.execute("SELECT status FROM images WHERE id = '../../victim'").fetchone()
    assert status == ("failed",)
    assert bbsnap("images", "list").exit_code == 0

"""`images export`: raw+gzip (and zstd, xz, none, qcow2), flattened, sparse, streaming,
with sidecars; bad input refused without partial files."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.models import Image, ImageStatus, ImageType
from tests.images import MIB, qcow2_disk, run

DECOMPRESS = {"gzip": ["gzip", "-dc"], "zstd": ["zstd", "-dcq"], "xz": ["xz", "-dc"]}


def import_image(bbsnap, path: Path, *args: str) -> str:
    result = bbsnap("images", "import", str(path), *args)
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def guest_view(image: Path, work: Path) -> bytes:
    out = work / "view.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.fixture()
def sample(bbsnap, work_dir) -> tuple[str, Path]:
    """A 64 MiB image with data in two places and holes elsewhere."""
    disk = qcow2_disk(work_dir / "sample.qcow2", size=64 * MIB)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 40M 3M", str(disk))
    image_id = import_image(bbsnap, disk, "--name", "sample", "--username", "debian",
                            "--min-ram", "256")
    return image_id, bbsnap.data_dir / "images" / f"{image_id}.qcow2"


@pytest.mark.parametrize("compress", ["gzip", "zstd", "xz"])
def test_export_decompresses_with_ordinary_tools_to_the_disk_bytes(bbsnap, work_dir, sample,
                                                                   compress):
    image_id, stored = sample
    out = work_dir / f"export.{compress}"
    result = bbsnap("images", "export", image_id, "-o", str(out), "--compress", compress)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    raw = subprocess.run([*DECOMPRESS[compress], str(out)], check=True, capture_output=True).stdout
    assert raw == guest_view(stored, work_dir)
    assert len(raw) == 64 * MIB
    check = subprocess.run(["sha256sum", "-c", out.name + ".sha256"], cwd=work_dir,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    meta = json.loads((work_dir / (out.name + ".json")).read_text())
    assert (meta["name"], meta["virtual_size"], meta["username"], meta["min_ram"],
            meta["compression"], meta["format"]) == ("sample", 64 * MIB, "debian", 256,
                                                     compress, "raw")
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert meta["source"]["image_id"] == image_id


def test_default_is_raw_gzip_named_like_the_seed(bbsnap, work_dir, sample):
    image_id, stored = sample
    env_cwd = os.getcwd()
    os.chdir(work_dir)
    try:
        result = bbsnap("images", "export", image_id)
    finally:
        os.chdir(env_cwd)
    assert result.exit_code == 0, result.stderr
    out = work_dir / f"{image_id}.gz"
    assert out.exists() and subprocess.run(["gzip", "-t", str(out)]).returncode == 0
    assert gzip.decompress(out.read_bytes()) == guest_view(stored, work_dir)


def test_uncompressed_raw_export_is_sparse(bbsnap, work_dir, sample):
    image_id, stored = sample
    out = work_dir / "disk.raw"
    assert bbsnap("images", "export", image_id, "-o", str(out), "--compress", "none").exit_code == 0
    assert out.read_bytes() == guest_view(stored, work_dir)
    assert out.stat().st_blocks * 512 < 8 * MIB, "holes stay holes"


def test_export_flattens_a_backing_chain(bbsnap, work_dir, sample):
    base_id, base = sample
    delta_name = "img-delta.qcow2"
    delta = bbsnap.data_dir / "images" / delta_name
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(delta))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 41M 64k", str(delta))
    catalogue = Catalogue(bbsnap.data_dir / "catalogue.sqlite3")
    catalogue.add(Image(id="img-delta", type=ImageType.SNAPSHOT, owner="me", created_at=utcnow(),
                        status=ImageStatus.AVAILABLE, name="delta", ancestor_id=base_id,
                        path=delta_name, virtual_size=64 * MIB), depends_on=base_id)
    catalogue.close()
    out = work_dir / "flat.gz"
    assert bbsnap("images", "export", "img-delta", "-o", str(out)).exit_code == 0
    raw = gzip.decompress(out.read_bytes())
    assert raw == guest_view(delta, work_dir)
    assert raw[41 * MIB:41 * MIB + 4] == b"\x77" * 4 and raw[40 * MIB:40 * MIB + 4] == b"\x33" * 4

    qcow = work_dir / "flat.qcow2.gz"
    result = bbsnap("images", "export", "img-delta", "-o", str(qcow), "--format", "qcow2")
    assert result.exit_code == 0
    unpacked = work_dir / "flat.qcow2"
    unpacked.write_bytes(gzip.decompress(qcow.read_bytes()))
    info = json.loads(run("qemu-img", "info", "--output=json", str(unpacked)))
    assert "backing-filename" not in info
    assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(unpacked),
                           str(delta)], capture_output=True).returncode == 0


def test_pipe_between_two_data_directories(bbsnap, work_dir, sample):
    image_id, stored = sample
    other = work_dir / "other-host"
    env = {**os.environ, **bbsnap.env}
    exporter = subprocess.Popen([sys.executable, "-m", "bbsnap.cli.main", "images", "export",
                                 image_id, "-o", "-"], stdout=subprocess.PIPE, env=env)
    importer = subprocess.run([sys.executable, "-m", "bbsnap.cli.main", "--data-dir", str(other),
                               "images", "import", "-", "--name", "moved"],
                              stdin=exporter.stdout, capture_output=True, text=True, env=env)
    assert exporter.wait() == 0
    assert importer.returncode == 0, importer.stderr
    moved = other / "images" / f"{importer.stdout.strip()}.qcow2"
    assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(moved),
                           str(stored)], capture_output=True).returncode == 0


def test_unknown_and_unfinished_images(bbsnap, work_dir, sample):
    image_id, _ = sample
    assert bbsnap("images", "export", "img-zzzzz", "-o", str(work_dir / "x.gz")).exit_code == 3
    catalogue = Catalogue(bbsnap.data_dir / "catalogue.sqlite3")
    catalogue.update(image_id, status=ImageStatus.CREATING, job=None)
    result = bbsnap("images", "export", image_id, "-o", str(work_dir / "x.gz"))
    catalogue.update(image_id, status=ImageStatus.AVAILABLE)
    catalogue.close()
    assert result.exit_code == 4 and "not available" in result.stderr
    assert not (work_dir / "x.gz").exists()


def test_output_in_a_missing_directory(bbsnap, work_dir, sample):
    image_id, _ = sample
    result = bbsnap("images", "export", image_id, "-o", str(work_dir / "nope" / "x.gz"))
    assert result.exit_code == 3 and "does not exist" in result.stderr


def test_full_disk_leaves_no_file_under_the_final_name(bbsnap, work_dir, sample):
    image_id, _ = sample
    target = work_dir / "small-fs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], check=True)
    try:
        result = bbsnap("images", "export", image_id, "-o", str(target / "x.raw"),
                        "--compress", "none")
        assert result.exit_code == 1 and "No space left" in result.stderr
        assert "internal error" not in result.stderr
        assert list(target.iterdir()) == []
    finally:
        subprocess.run(["umount", str(target)], check=True)

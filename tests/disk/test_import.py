"""Importing real images with the real qemu-img: formats and compressions by content."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import sys

import pytest

from tests.images import MIB, qcow2_disk, raw_disk, read_bytes

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

COMPRESSORS = {
    "none": lambda data: data,
    "gzip": gzip.compress,
    "xz": lzma.compress,
    "zstd": zstd.compress,
    "bzip2": bz2.compress,
}


def _image_json(bbsnap, image_id: str) -> dict:
    result = bbsnap("images", "show", image_id, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_import_detects_format_and_compression_by_content(bbsnap, work_dir, fmt, compression):
    source = (raw_disk if fmt == "raw" else qcow2_disk)(work_dir / "disk.bin", pattern=0x5A)
    data = COMPRESSORS[compression](source.read_bytes())
    # A misleading name: content decides, not the suffix.
    misleading = work_dir / "image.iso.txt"
    misleading.write_bytes(data)

    result = bbsnap("images", "import", str(misleading), "--name", "probe",
                    "--checksum", "sha256:" + hashlib.sha256(data).hexdigest())

    assert result.exit_code == 0, result.stderr
    image_id = result.stdout.strip()
    record = _image_json(bbsnap, image_id)
    assert record["state"] == "available" and record["status"] == "private"
    assert record["format"] == "qcow2" and record["virtual_size"] == 8 * MIB
    assert record["checksum"] == "sha256:" + hashlib.sha256(data).hexdigest()
    stored = bbsnap.data_dir / "images" / f"{image_id}.qcow2"
    assert read_bytes(stored, "qcow2", MIB, 512) == b"\x5a" * 512
    info = json.loads(os.popen(f"qemu-img info --output=json {stored}").read())
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert oct(stored.stat().st_mode & 0o777) == "0o644"
    assert list((bbsnap.data_dir / "tmp").iterdir()) == []


def test_import_from_stdin_in_a_real_process(bbsnap, work_dir):
    data = gzip.compress(qcow2_disk(work_dir / "d.qcow2").read_bytes())
    result = bbsnap.process("images", "import", "-", stdin=data)
    assert result.exit_code == 0, result.stderr
    record = _image_json(bbsnap, result.stdout.strip())
    assert record["name"] == "Imported image" and record["state"] == "available"


def test_name_defaults_to_file_name_without_image_suffixes(bbsnap, work_dir):
    source = work_dir / "debian-12-genericcloud-amd64.qcow2.xz"
    source.write_bytes(lzma.compress(qcow2_disk(work_dir / "x.qcow2").read_bytes()))
    result = bbsnap("images", "import", str(source))
    assert _image_json(bbsnap, result.stdout.strip())["name"] == "debian-12-genericcloud-amd64"


def test_metadata_options_are_stored(bbsnap, work_dir):
    source = raw_disk(work_dir / "d.raw")
    result = bbsnap("images", "import", str(source), "-n", "web", "-d", "a web server",
                    "--arch", "aarch64", "--username", "debian", "--min-ram", "256")
    record = _image_json(bbsnap, result.stdout.strip())
    assert (record["name"], record["description"], record["arch"], record["username"],
            record["min_ram"]) == ("web", "a web server", "aarch64", "debian", 256)


def test_sparse_raw_stays_small_on_disk(bbsnap, work_dir):
    source = raw_disk(work_dir / "big.raw", size=512 * MIB)
    result = bbsnap("images", "import", str(source))
    record = _image_json(bbsnap, result.stdout.strip())
    assert record["virtual_size"] == 512 * MIB
    assert record["disk_size"] < 8 * MIB


def test_image_shows_creating_while_the_import_runs(bbsnap, work_dir):
    """Feed stdin by hand: mid-stream the row is visible as creating, then available."""
    import subprocess
    import sys

    data = gzip.compress(raw_disk(work_dir / "slow.raw", size=64 * MIB).read_bytes())
    env = {**os.environ, **bbsnap.env}
    child = subprocess.Popen([sys.executable, "-m", "bbsnap.cli.main", "images", "import", "-",
                              "--name", "slow"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    assert child.stdin is not None and child.stderr is not None
    child.stdin.write(data[:1024])
    child.stdin.flush()
    # The importer announces the registered id on stderr once the row exists.
    announced = child.stderr.readline().decode()
    assert "as img-" in announced
    listed = json.loads(bbsnap("images", "list", "--format", "json").stdout)
    assert [(i["name"], i["status"]) for i in listed] == [("slow", "creating")]
    out, err = child.communicate(input=data[1024:], timeout=120)
    assert child.returncode == 0, err
    image_id = out.decode().strip()
    assert _image_json(bbsnap, image_id)["status"] == "private"


def test_untrusted_qemu_img_runs_limited_with_few_malloc_arenas():
    """Children given limits see them (address space, CPU) and MALLOC_ARENA_MAX, without
    which glibc's per-thread arenas ran qemu-img convert out of its address space."""
    import subprocess

    from bbsnap import proc
    from bbsnap.disks.qemu_img import UNTRUSTED_LIMITS

    script = ("import os, resource; print(os.environ.get('MALLOC_ARENA_MAX'), "
              "resource.getrlimit(resource.RLIMIT_AS)[0], os.environ.get('KEEP'))")
    limited = proc.run([sys.executable, "-c", script], limits=UNTRUSTED_LIMITS,
                       env={"KEEP": "yes"}).stdout.split()
    assert limited == ["2", str(UNTRUSTED_LIMITS.address_space_bytes), "yes"]
    plain = proc.run([sys.executable, "-c", script]).stdout.split()
    assert plain[0] == "None"
    child = proc.popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                       limits=UNTRUSTED_LIMITS)
    out, _ = child.communicate(timeout=60)
    assert out.decode().split()[:2] == ["2", str(UNTRUSTED_LIMITS.address_space_bytes)]

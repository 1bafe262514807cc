"""Importing real images with the real qemu-img: formats and compressions by content."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bbsnap.state.layout import FILE_MODE
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
    assert stored.stat().st_mode & 0o777 == FILE_MODE
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


# --- a stated format wins over the content -------------------------------------------------

def raw_starting_with_a_qcow2_header(work_dir) -> Path:
    """A raw disk whose first guest-visible bytes are a valid qcow2 image (a nested guest's
    disk written to the start of the disk), with the raw disk's own data further on."""
    inner = work_dir / "inner.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(inner), "1M"], check=True)
    disk = raw_disk(work_dir / "nested.raw", pattern=0x6B)
    subprocess.run(["dd", f"if={inner}", f"of={disk}", "conv=notrunc", "status=none"], check=True)
    assert disk.read_bytes()[:4] == b"QFI\xfb" and disk.stat().st_size == 8 * MIB
    return disk


def assert_same_disk(raw: Path, stored: Path) -> None:
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw),
                    str(stored)], check=True)


def _stored(bbsnap, result) -> Path:
    assert result.exit_code == 0, result.stderr
    return bbsnap.data_dir / "images" / f"{result.stdout.strip()}.qcow2"


def test_disk_format_raw_imports_a_raw_disk_that_begins_with_a_qcow2_header(bbsnap, work_dir):
    disk = raw_starting_with_a_qcow2_header(work_dir)
    assert_same_disk(disk, _stored(bbsnap, bbsnap("images", "import", str(disk),
                                                  "--disk-format", "raw")))


@pytest.mark.parametrize("compress", ["none", "gzip"])
def test_export_round_trip_keeps_a_raw_disk_that_begins_with_a_qcow2_header(bbsnap, work_dir,
                                                                             compress):
    disk = raw_starting_with_a_qcow2_header(work_dir)
    first = bbsnap("images", "import", str(disk), "--disk-format", "raw", "-n", "nested")
    out = work_dir / "out" / "nested.img"
    out.parent.mkdir()
    exported = bbsnap("images", "export", first.stdout.strip(), "-o", str(out),
                      "--format", "raw", "--compress", compress)
    assert exported.exit_code == 0, exported.stderr
    assert json.loads((work_dir / "out" / "nested.img.json").read_text())["format"] == "raw"

    again = bbsnap("images", "import", str(out))  # the sidecar says raw
    assert_same_disk(disk, _stored(bbsnap, again))
    assert _image_json(bbsnap, again.stdout.strip())["name"] == "nested"


def test_disk_format_qcow2_on_a_raw_disk_is_refused(bbsnap, work_dir):
    from tests.disk.test_hostile_import import assert_refused

    result = bbsnap("images", "import", str(raw_disk(work_dir / "d.raw")), "--disk-format", "qcow2")
    assert_refused(bbsnap, result, exit_code=1, words="--disk-format says qcow2")


def test_sidecar_stating_qcow2_for_a_raw_disk_is_refused(bbsnap, work_dir):
    from tests.disk.test_hostile_import import assert_refused

    disk = raw_disk(work_dir / "d.raw")
    (work_dir / "d.raw.json").write_text(json.dumps(
        {"bbsnap_sidecar": 1, "name": "d", "virtual_size": 8 * MIB, "format": "qcow2"}))
    assert_refused(bbsnap, bbsnap("images", "import", str(disk)), words="the sidecar says qcow2")


def test_flag_wins_over_the_sidecar_format(bbsnap, work_dir):
    disk = raw_starting_with_a_qcow2_header(work_dir)
    (work_dir / "nested.raw.json").write_text(json.dumps(
        {"bbsnap_sidecar": 1, "name": "n", "virtual_size": 8 * MIB, "format": "qcow2"}))
    assert_same_disk(disk, _stored(bbsnap, bbsnap("images", "import", str(disk),
                                                  "--disk-format", "raw")))


def test_stated_raw_still_has_to_be_what_the_sidecar_says(bbsnap, work_dir):
    """Stated raw skips the partition-table heuristic, nothing else: the size is checked."""
    from tests.disk.test_hostile_import import assert_refused

    disk = raw_starting_with_a_qcow2_header(work_dir)
    (work_dir / "nested.raw.json").write_text(json.dumps(
        {"bbsnap_sidecar": 1, "name": "n", "virtual_size": 4 * MIB, "format": "raw"}))
    assert_refused(bbsnap, bbsnap("images", "import", str(disk)),
                   words=f"runs past the {4 * MIB} bytes the sidecar says")


def test_sidecar_stating_no_compression_keeps_a_disk_that_begins_with_gzip_magic(bbsnap,
                                                                                work_dir):
    disk = raw_disk(work_dir / "magic.raw", pattern=0x21)
    with open(disk, "r+b") as handle:
        handle.write(b"\x1f\x8b\x08\x00")  # gzip's magic in the boot code area
    (work_dir / "magic.raw.json").write_text(json.dumps(
        {"bbsnap_sidecar": 1, "name": "m", "virtual_size": 8 * MIB, "format": "raw",
         "compression": "none"}))
    assert_same_disk(disk, _stored(bbsnap, bbsnap("images", "import", str(disk))))


def test_qcow2_bound_holds_for_fully_allocated_images(work_dir):
    """The output bound of an untrusted qcow2 is never below what qemu-img itself writes."""
    from bbsnap.disks.qcow2_header import read_qcow2_header

    for options in ("cluster_size=512,refcount_bits=64", "cluster_size=65536",
                    "cluster_size=16384,extended_l2=on", "cluster_size=2M"):
        image = work_dir / "full.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(image),
                        "24M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 24M", str(image)],
                       check=True, capture_output=True)
        with open(image, "rb") as handle:
            header = read_qcow2_header(handle, max_virtual_size=1 << 40)
        assert image.stat().st_size <= header.max_file_size(), options
        image.unlink()

"""Failures that used to end in "internal error" or a traceback: each is one line
`bbsnap: error: <what failed> (<what to do next>)` with DESIGN §6's exit code, and leaves
nothing behind (#10 item 13). The real CLI on real files (qemu-img images, SQLite, /dev/full).
"""

from __future__ import annotations

import gzip
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Bbsnap, CliResult
from tests.images import qcow2_disk

# Any use of libvirt in these tests would fail with this URI: they prove the refusals come
# before bbsnap touches the hypervisor.
NO_LIBVIRT = {"LIBVIRT_DEFAULT_URI": "qemu:///system?socket=/nonexistent/bbsnap-test.sock"}


def refused(result: CliResult, code: int, *needles: str) -> str:
    """The one `bbsnap: error:` line of a failed command (checked: code, no traceback)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("bbsnap: error: ")]
    assert result.exit_code == code, result.stderr
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def state(bbsnap: Bbsnap) -> tuple[int, list[Path]]:
    return bbsnap.rows(), bbsnap.files()


@pytest.fixture()
def image(bbsnap: Bbsnap, work_dir: Path) -> str:
    source = qcow2_disk(work_dir / "disk.qcow2")
    result = bbsnap("images", "import", str(source), "-n", "disk")
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


# -- text that is not UTF-8 ------------------------------------------------------------------

BAD = os.fsdecode(b"caf\xe9")  # Latin-1 bytes in a UTF-8 locale: click gives 'caf\udce9'


@pytest.mark.parametrize("args,option", [
    (("images", "import", "{src}", "-n", BAD), "-n/--name"),
    (("images", "import", "{src}", "-d", BAD), "-d/--description"),
    (("images", "update", "{img}", "-n", BAD), "-n/--name"),
    (("images", "update", "{img}", "-d", BAD), "-d/--description"),
    (("images", "show", "img-" + BAD), "IMG..."),
    (("images", "export", "{img}", "-o", "{dir}/" + BAD + ".gz"), "-o/--output"),
    (("servers", "create", "{img}", "-n", BAD), "-n/--name"),
    (("servers", "create", "{img}", "--hostname", BAD), "--hostname"),
    (("servers", "snapshot", "srv-aaaaa", "-n", BAD), "-n/--name"),
], ids=["import-name", "import-description", "update-name", "update-description", "show-id",
        "export-output", "create-name", "create-hostname", "snapshot-name"])
def test_undecodable_text_is_a_usage_error(bbsnap, work_dir, image, args, option):
    source = qcow2_disk(work_dir / "other.qcow2")
    before = state(bbsnap)
    filled = [a.format(src=source, img=image, dir=work_dir) for a in args]
    line = refused(bbsnap(*filled, env=NO_LIBVIRT), 2, option, "is not valid UTF-8",
                   "caf\\udce9")
    assert line.endswith("(give it as UTF-8 text)")
    assert state(bbsnap) == before
    assert bbsnap("images", "show", image, "--format", "json").stdout.count('"disk"') == 1
    assert sorted(p.name for p in work_dir.iterdir()) == ["data", "disk.qcow2", "other.qcow2"]


def test_a_file_name_that_is_not_utf8_still_works_as_a_path(bbsnap, work_dir):
    source = Path(os.fsdecode(os.fsencode(work_dir) + b"/disk-\xe9.qcow2"))
    qcow2_disk(source)
    # Without -n the name would come from the file name, which is not text: refused, clean.
    refused(bbsnap("images", "import", str(source)), 2, "an image name must be valid UTF-8",
            "give one with -n/--name")
    assert state(bbsnap) == (0, [])
    # With -n the file is read by its bytes, and the progress line shows it escaped.
    result = bbsnap("images", "import", str(source), "-n", "named")
    assert result.exit_code == 0, result.stderr
    assert "disk-\\udce9.qcow2" in result.stderr or "disk-\\xe9.qcow2" in result.stderr
    assert bbsnap.rows() == 1


def test_a_sidecar_name_with_a_lone_surrogate_is_refused(bbsnap, work_dir):
    source = qcow2_disk(work_dir / "disk.qcow2")
    # JSON's \\u escapes can spell a lone surrogate, which no UTF-8 text holds.
    Path(f"{source}.json").write_text('{"bbsnap_sidecar": 1, "virtual_size": 8388608, '
                                      '"name": "x\\udcff"}')
    refused(bbsnap("images", "import", str(source)), 1, "the metadata sidecar is refused",
            "an image name must be valid UTF-8")
    assert state(bbsnap) == (0, [])


# -- user-data -------------------------------------------------------------------------------

def _create(bbsnap: Bbsnap, image: str, user_data: Path) -> CliResult:
    return bbsnap("servers", "create", image, "--memory", "128", "--user-data", str(user_data),
                  env=NO_LIBVIRT)


@pytest.mark.parametrize("content,message", [
    (b"\x7fELF\x02\x01\x01\x00\xff\xfe binary", "neither UTF-8 text nor gzip-compressed text"),
    (gzip.compress(b"\x00\xff\xfe\xfd" * 100), "neither UTF-8 text nor gzip-compressed text"),
    (gzip.compress(b"#cloud-config\nhostname: x\n")[:20], "gzip-compressed user-data is damaged"),
    (gzip.compress(b"\x00" * (17 * 1024 * 1024)), "larger than 16 MiB once decompressed"),
    (b"#cloud-config\na: " + b"[" * 50000, "nested too deeply"),
    (gzip.compress(b"#cloud-config\na: " + b"{x: " * 50000), "nested too deeply"),
    (gzip.compress(b"#cloud-config\n- a list\n"), "must be a YAML mapping"),
], ids=["binary", "gzip-binary", "gzip-truncated", "gzip-bomb", "deep", "gzip-deep",
        "gzip-list"])
def test_unusable_user_data_is_one_line_and_creates_nothing(bbsnap, work_dir, image, content,
                                                            message):
    path = work_dir / "user-data"
    path.write_bytes(content)
    before = state(bbsnap)
    refused(_create(bbsnap, image, path), 1, message)
    assert state(bbsnap) == before
    assert list((bbsnap.data_dir / "servers").iterdir()) == []


def test_user_data_from_stdin_is_read_as_bytes(bbsnap, image):
    result = bbsnap("servers", "create", image, "--user-data", "-", input=b"\xff\xfe\x00",
                    env=NO_LIBVIRT)
    refused(result, 1, "neither UTF-8 text nor gzip-compressed text")


def test_gzipped_user_data_passes_to_the_hypervisor_step(bbsnap, work_dir, image):
    """Accepted: the create goes on until the (deliberately unreachable) hypervisor. The
    system test test_user_data.py checks the seed it writes on the real libvirtd."""
    path = work_dir / "user-data.gz"
    path.write_bytes(gzip.compress(b"#cloud-config\nhostname: zipped\n"))
    line = refused(_create(bbsnap, image, path), 1)
    assert "user-data" not in line and "/nonexistent/bbsnap-test.sock" in line


# -- settings --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,needle", [
    ("data_dir: ~\n", "'data_dir' in {path} must be a directory path, not null"),
    ("data_dir: data\n", "'data_dir' in {path} must be an absolute path"),
    ("max_virtual_size: -5\n", "'max_virtual_size' in {path} must be a positive size, not -5"),
    ("max_virtual_size: true\n", "must be a positive size, not true"),
    ("ssh_ports: {a: 1}\n", "'ssh_ports' in {path} must be a non-empty string, not a mapping"),
    ("data_dir: /x\n  bad: : y\n", "config file {path} is not valid YAML: line 2, column 6"),
    ("a: " + "[" * 20000 + "\n", "config file {path} is nested too deeply"),
], ids=["null-dir", "relative-dir", "negative-size", "bool-size", "mapping-ports",
        "malformed", "deep"])
def test_bad_config_files_are_one_line_usage_errors(bbsnap, work_dir, text, needle):
    config = work_dir / "config.yaml"
    config.write_text(text)
    result = bbsnap("images", "list", env={"BBSNAP_CONFIG": str(config)})
    refused(result, 2, needle.format(path=config))
    assert not bbsnap.data_dir.exists(), "nothing is created before the settings are valid"


def test_binary_config_file(bbsnap, work_dir):
    config = work_dir / "config.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff")
    refused(bbsnap("images", "list", env={"BBSNAP_CONFIG": str(config)}), 2,
            f"config file {config} is not UTF-8 text")


@pytest.mark.parametrize("home,needle", [
    ("", "BBSNAP_HOME is set but empty (unset it or give a directory)"),
    ("relative/data", "BBSNAP_HOME must be an absolute path, not 'relative/data' "
                      "(give an absolute path"),
], ids=["empty", "relative"])
def test_bad_bbsnap_home(bbsnap, work_dir, monkeypatch, home, needle):
    monkeypatch.chdir(work_dir)
    refused(bbsnap("images", "list", env={"BBSNAP_HOME": home}), 2, needle)
    assert sorted(p.name for p in work_dir.iterdir()) == [], "no catalogue in the cwd"


def test_relative_data_dir_flag_is_the_working_directorys(bbsnap, work_dir, monkeypatch):
    monkeypatch.chdir(work_dir)
    result = bbsnap("--data-dir", "here", "images", "list")
    assert result.exit_code == 0, result.stderr
    assert (work_dir / "here" / "catalogue.sqlite3").exists()


# -- the catalogue ---------------------------------------------------------------------------

def _checkpointed(bbsnap: Bbsnap) -> Path:
    """The catalogue as one file (the WAL folded in), so damage to it is damage to all."""
    db = bbsnap.data_dir / "catalogue.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


@pytest.mark.parametrize("page,detail", [(0, "file is not a database"),
                                         (1, "database disk image is malformed")])
def test_a_damaged_catalogue_is_one_line(bbsnap, work_dir, image, page, detail):
    db = _checkpointed(bbsnap)
    pages = db.stat().st_size // 4096
    with open(db, "r+b") as handle:  # dd if=/dev/urandom seek=PAGE conv=notrunc
        handle.seek(page * 4096)
        handle.write(os.urandom(4096 * (pages - page)))
    files = bbsnap.files()
    source = qcow2_disk(work_dir / "more.qcow2")
    for args in (("images", "list"), ("images", "show", image),
                 ("images", "import", str(source), "-n", "more")):
        refused(bbsnap(*args), 1, f"the catalogue {db} is damaged: {detail}",
                "(restore it from a backup")
        assert bbsnap.files() == files


def _read_only(path: Path) -> None:
    # Root ignores file modes: the immutable attribute stops even root (ext4, xfs, btrfs).
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o555 if path.is_dir() else 0o444)


def _writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_read_only_catalogue_refuses_an_import_and_keeps_nothing(bbsnap, work_dir, image):
    db = _checkpointed(bbsnap)
    source = qcow2_disk(work_dir / "more.qcow2")
    files = bbsnap.files()
    _read_only(db)
    try:
        result = bbsnap("images", "import", str(source), "-n", "more")
        listed = bbsnap("images", "list")
    finally:
        _writable(db)
    refused(result, 1, f"cannot write the catalogue {db}: read-only")
    assert bbsnap.files() == files and bbsnap.rows() == 1
    assert listed.exit_code == 0 and image in listed.stdout, "reading still works"


def test_a_read_only_data_directory_is_one_line(bbsnap, work_dir, image):
    _checkpointed(bbsnap)
    for name in ("catalogue.sqlite3-wal", "catalogue.sqlite3-shm"):
        (bbsnap.data_dir / name).unlink(missing_ok=True)
    source = qcow2_disk(work_dir / "more.qcow2")
    files = bbsnap.files()
    _read_only(bbsnap.data_dir)
    try:
        result = bbsnap("images", "import", str(source), "-n", "more")
    finally:
        _writable(bbsnap.data_dir)
    line = refused(result, 1)
    assert f"the catalogue {bbsnap.data_dir}/catalogue.sqlite3" in line
    assert bbsnap.files() == files and bbsnap.rows() == 1


# -- standard output -------------------------------------------------------------------------

def _run_into(bbsnap: Bbsnap, stdout: int, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, **bbsnap.env}
    return subprocess.run([sys.executable, "-m", "bbsnap.cli.main", *args], stdout=stdout,
                          stderr=subprocess.PIPE, env=env, timeout=120, check=False)


@pytest.mark.parametrize("args", [("images", "export", "{img}", "-o", "-"),
                                  ("images", "export", "{img}", "-o", "-", "--compress", "none"),
                                  ("images", "list"),
                                  ("images", "show", "{img}", "--format", "json")],
                         ids=["export-gzip", "export-raw", "list", "show-json"])
def test_a_full_standard_output_is_one_line(bbsnap, image, args):
    with open("/dev/full", "wb") as full:
        done = _run_into(bbsnap, full.fileno(), *[a.format(img=image) for a in args])
    stderr = done.stderr.decode()
    refused(CliResult(done.returncode, "", stderr), 1,
            "cannot write to standard output: No space left on device")
    assert list((bbsnap.data_dir / "tmp").iterdir()) == []


def test_a_reader_that_leaves_is_still_a_quiet_141(bbsnap, image):
    env = {**os.environ, **bbsnap.env}
    child = subprocess.Popen([sys.executable, "-m", "bbsnap.cli.main", "images", "export",
                              image, "-o", "-", "--compress", "none"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.read(10)
    child.stdout.close()
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141
    assert "bbsnap: error" not in stderr and "Traceback" not in stderr

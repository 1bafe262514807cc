"""Export outputs in a directory others may write (DESIGN §8): nothing is opened through a
planted symlink, an existing output that is not a regular file is refused, a regular one is
replaced by rename (never written through), and every output is private (0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bbsnap import safe_files
from bbsnap.errors import BbsnapError, InvalidInputError
from bbsnap.tinyguest.cache import build_lock, make_shared_dir
from tests.system.reliability_report import read_report, write_report

VICTIM_TEXT = b"root's file, not to be touched\n"


@pytest.fixture()
def victim(work_dir) -> Path:
    """A file elsewhere that a planted link points at: it must come out unchanged."""
    path = work_dir / "victim"
    path.mkdir()
    path = path / "shadow"
    path.write_bytes(VICTIM_TEXT)
    return path


@pytest.fixture()
def out_dir(work_dir) -> Path:
    path = work_dir / "out"
    path.mkdir()
    return path


def test_a_character_device_output_is_refused_and_stays_a_device(bbsnap, image_id, out_dir):
    node = out_dir / "null"           # our own /dev/null: the real one stays out of tests
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    result = bbsnap("images", "export", image_id, "-o", str(node))
    assert result.exit_code == 1
    assert "character device" in result.stderr and "-o -" in result.stderr
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    assert sorted(p.name for p in out_dir.iterdir()) == ["null"], "no sidecars beside it"


def test_a_fifo_output_is_refused_without_opening_it(bbsnap, image_id, out_dir):
    fifo = out_dir / "pipe"
    os.mkfifo(fifo)
    result = bbsnap("images", "export", image_id, "-o", str(fifo))  # old code: replaced it
    assert result.exit_code == 1 and "FIFO" in result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in out_dir.iterdir()) == ["pipe"]


def test_a_symlink_as_the_output_is_refused(bbsnap, image_id, out_dir, victim):
    link = out_dir / "x.gz"
    link.symlink_to(victim)
    result = bbsnap("images", "export", image_id, "-o", str(link))
    assert result.exit_code == 1 and "symlink" in result.stderr
    assert link.is_symlink() and victim.read_bytes() == VICTIM_TEXT
    assert sorted(p.name for p in out_dir.iterdir()) == ["x.gz"]


@pytest.mark.parametrize("suffix", [".sha256", ".json"])
def test_a_symlink_planted_as_a_sidecar_is_refused_before_any_work(bbsnap, image_id, out_dir,
                                                                   victim, suffix):
    planted = out_dir / f"x.gz{suffix}"
    planted.symlink_to(victim)
    result = bbsnap("images", "export", image_id, "-o", str(out_dir / "x.gz"))
    assert result.exit_code == 1 and "symlink" in result.stderr
    assert victim.read_bytes() == VICTIM_TEXT
    assert sorted(p.name for p in out_dir.iterdir()) == [planted.name], "no export was written"


def test_a_symlink_planted_as_the_partial_file_is_not_followed(bbsnap, image_id, out_dir,
                                                               victim):
    planted = out_dir / "x.gz.partial"   # the fixed partial name the old code opened
    planted.symlink_to(victim)
    result = bbsnap("images", "export", image_id, "-o", str(out_dir / "x.gz"))
    assert result.exit_code == 0, result.stderr
    assert victim.read_bytes() == VICTIM_TEXT and planted.is_symlink()
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "x.gz", "x.gz.json", "x.gz.partial", "x.gz.sha256"]


def test_existing_regular_outputs_are_replaced_by_rename_not_written_through(
        bbsnap, image_id, out_dir, victim):
    # Hard links to the victim under all three names: writing through any old name would
    # change the victim; renaming fresh files over them leaves it alone.
    for name in ("x.gz", "x.gz.sha256", "x.gz.json"):
        os.link(victim, out_dir / name)
    result = bbsnap("images", "export", image_id, "-o", str(out_dir / "x.gz"))
    assert result.exit_code == 0, result.stderr
    assert victim.read_bytes() == VICTIM_TEXT and victim.stat().st_nlink == 1
    assert (out_dir / "x.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (out_dir / "x.gz.sha256").read_text().endswith("  x.gz\n")


def test_outputs_are_private_whatever_the_umask(bbsnap, image_id, out_dir):
    old = os.umask(0)
    try:
        result = bbsnap("images", "export", image_id, "-o", str(out_dir / "x.gz"))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    for name in ("x.gz", "x.gz.sha256", "x.gz.json"):
        assert stat.S_IMODE(os.lstat(out_dir / name).st_mode) == 0o600, name


# -- the helper itself: what the CLI tests cannot race into --------------------------------

def test_create_refuses_a_planted_dangling_symlink(work_dir):
    target = work_dir / "would-be-created"
    (work_dir / "name").symlink_to(target)
    with safe_files.OutputDir(work_dir) as directory, pytest.raises(FileExistsError):
        directory.create("name")
    assert not target.exists()


def test_write_file_refuses_a_final_name_that_became_a_symlink(work_dir, victim):
    (work_dir / "report.json").symlink_to(victim)
    with pytest.raises(InvalidInputError, match="symlink"):
        safe_files.write_atomic(work_dir / "report.json", b"{}")
    assert victim.read_bytes() == VICTIM_TEXT
    assert [p.name for p in work_dir.iterdir() if p.name.startswith("report")] == ["report.json"]


def test_write_atomic_replaces_a_regular_file_with_the_mode_asked(work_dir):
    path = work_dir / "report.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    safe_files.write_atomic(path, b"new", 0o640)
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_output_dir_stays_the_directory_it_opened(work_dir):
    # Swapping the directory for a symlink after it was opened moves nothing elsewhere.
    first, elsewhere = work_dir / "first", work_dir / "elsewhere"
    first.mkdir()
    elsewhere.mkdir()
    with safe_files.OutputDir(first) as directory:
        first.rename(work_dir / "moved")
        first.symlink_to(elsewhere)
        directory.write_file("f", b"data")
    assert (work_dir / "moved" / "f").read_bytes() == b"data"
    assert list(elsewhere.iterdir()) == []


def test_read_regular_does_not_follow_symlinks_or_block_on_fifos(work_dir, victim):
    (work_dir / "link").symlink_to(victim)
    os.mkfifo(work_dir / "fifo")
    with pytest.raises(InvalidInputError, match="symlink"):
        safe_files.read_regular(work_dir / "link", 100)
    with pytest.raises(InvalidInputError, match="not a regular file"):
        safe_files.read_regular(work_dir / "fifo", 100)
    assert safe_files.read_regular(work_dir / "absent", 100) is None
    assert safe_files.read_regular(victim, 100) == VICTIM_TEXT



# -- the tiny guest cache ($BBSNAP_CACHE may be any directory) -----------------------------

def test_the_cache_lock_is_not_opened_through_a_symlink(work_dir):
    created = work_dir / "created-by-root"
    (work_dir / ".lock").symlink_to(created)
    with pytest.raises(BbsnapError, match="lock"):
        build_lock(work_dir)
    assert not created.exists()
    (work_dir / ".lock").unlink()
    with build_lock(work_dir):
        assert stat.S_ISREG(os.lstat(work_dir / ".lock").st_mode)


def test_the_cache_never_loosens_an_existing_directory_or_chmods_through_a_link(work_dir):
    private = work_dir / "private"
    private.mkdir(mode=0o700)
    make_shared_dir(private / "tiny-guest")
    assert stat.S_IMODE(private.stat().st_mode) == 0o700, "an existing parent is left alone"
    assert stat.S_IMODE((private / "tiny-guest").stat().st_mode) == 0o755, "a new one is 0755"
    secret_dir = work_dir / "secret"
    secret_dir.mkdir(mode=0o700)
    (work_dir / "planted").symlink_to(secret_dir)
    make_shared_dir(work_dir / "planted")
    assert stat.S_IMODE(secret_dir.stat().st_mode) == 0o700


def test_new_cache_directories_are_0755_whatever_the_umask(work_dir):
    old = os.umask(0o077)
    try:
        make_shared_dir(work_dir / "a" / "b")
    finally:
        os.umask(old)
    for path in (work_dir / "a", work_dir / "a" / "b"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755


# -- the reliability report's fixed name in the shared /var/tmp ----------------------------

def test_the_reliability_report_is_not_written_through_a_planted_symlink(work_dir, victim):
    report = work_dir / "bbsnap-reliability.json"
    report.symlink_to(victim)
    with pytest.raises(InvalidInputError, match="symlink"):
        write_report({"kills": 24}, report)
    assert victim.read_bytes() == VICTIM_TEXT and report.is_symlink()
    assert read_report(report) == {}, "nor read through it"


def test_the_reliability_report_merges_only_a_regular_file_of_ours(work_dir):
    report = work_dir / "bbsnap-reliability.json"
    write_report({"kills": 24}, report)
    assert read_report(report) == {"kills": 24}
    os.chown(report, 65534, 65534)  # someone else's file under the same name: not merged
    assert read_report(report) == {}
    write_report({"concurrency": {}}, report)  # replaced by rename, ours again
    assert read_report(report) == {"concurrency": {}} and report.stat().st_uid == os.geteuid()


def test_the_walkthrough_exports_into_a_fresh_private_directory():
    script = (Path(__file__).parents[2] / "examples" / "walkthrough.sh").read_text()
    assert 'out=$(mktemp -d "${TMPDIR:-/tmp}/bbsnap-walkthrough.XXXXXXXX")' in script
    assert "mkdir -p" not in script

"""qemu-img's own progress meter, read while it copies (a stopped server's snapshot reports
its progress through it), and the streaming runner under it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bbsnap import proc
from bbsnap.disks import qemu_img
from bbsnap.errors import ExternalCommandError
from tests.images import run

MIB = 1 << 20


def _data_disk(path: Path) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "256M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 192M", str(path))
    return path


def test_convert_reports_rising_percentages_up_to_the_end(work_dir):
    source = _data_disk(work_dir / "source.qcow2")
    seen: list[float] = []
    qemu_img.convert(source, "qcow2", work_dir / "copy.qcow2", "qcow2", progress=seen.append)
    assert len(seen) >= 2 and seen == sorted(seen) and seen[-1] == 100.0
    assert "identical" in run("qemu-img", "compare", str(source), str(work_dir / "copy.qcow2"))


def test_convert_top_reports_and_writes_only_the_top(work_dir):
    base = work_dir / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "256M")
    top = work_dir / "top.qcow2"
    qemu_img.create_overlay(top, base)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 8M 64M", str(top))
    seen: list[float] = []
    qemu_img.convert_top(top, work_dir / "delta.qcow2", base, progress=seen.append)
    assert seen and seen[-1] == 100.0
    assert qemu_img.info(work_dir / "delta.qcow2", "qcow2").backing_file == str(base)


def test_streamed_output_is_split_at_carriage_returns_and_errors_keep_stderr():
    pieces: list[str] = []
    script = ("import sys; sys.stdout.write('a\\rb\\nc'); sys.stdout.flush(); "
              "sys.stderr.write('bad thing\\n'); sys.exit(3)")
    with pytest.raises(ExternalCommandError, match=r"exit 3\): bad thing"):
        proc.run_reporting([sys.executable, "-c", script], pieces.append, timeout=60)
    assert pieces == ["a", "b"]  # "c" never ended: a meter's unfinished line is not a reading


def test_streamed_command_that_hangs_is_killed_at_its_timeout():
    with pytest.raises(ExternalCommandError, match="did not finish within 0.5 s"):
        proc.run_reporting([sys.executable, "-c", "import time; time.sleep(60)"],
                           lambda _piece: None, timeout=0.5)

"""Fixtures shared by the disk tests."""

from __future__ import annotations

import pytest

from tests.images import MIB, qcow2_disk


@pytest.fixture()
def image_id(bbsnap, work_dir) -> str:
    """A small qcow2 imported into the test's catalogue: its image id."""
    disk = qcow2_disk(work_dir / "small.qcow2", size=4 * MIB)
    result = bbsnap("images", "import", str(disk), "--name", "small")
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()

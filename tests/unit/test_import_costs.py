"""What the commands measured for speed (a snapshot, a memory revert) do not import: the
modules kept out of their start-up, each for the milliseconds the README's benchmarks name."""

from __future__ import annotations

import subprocess
import sys

import pytest

SNAPSHOT = ("bbsnap.cli.main", "bbsnap.cli.servers", "bbsnap.services.snapshots.start",
            "bbsnap.services.snapshots.memory", "bbsnap.services.snapshots.targets",
            "bbsnap.disks.reserve", "bbsnap.hypervisor.libvirt_adapter")
REVERT = ("bbsnap.cli.main", "bbsnap.cli.servers", "bbsnap.services.servers",
          "bbsnap.services.memory_restore", "bbsnap.services.snapshots.change_tracking",
          "bbsnap.hypervisor.libvirt_adapter", "bbsnap.hypervisor.qemu_exit")


def _imported_by(modules: tuple[str, ...]) -> set[str]:
    imports = f"import {', '.join(modules)}" if modules else ""
    probe = f"import sys\n{imports}\nprint(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                              text=True).stdout.split())


@pytest.mark.parametrize("modules", [SNAPSHOT, REVERT], ids=["snapshot", "memory revert"])
def test_the_fast_commands_leave_out_what_they_do_not_use(modules):
    loaded = _imported_by(modules) - _imported_by(())  # not what the interpreter's site loads
    assert set(modules) <= loaded
    # transfer.stream brings hashlib and the compressors; shutil brings bz2 and lzma.
    assert loaded.isdisjoint({"bbsnap.transfer.stream", "hashlib", "shutil", "bz2", "lzma"})

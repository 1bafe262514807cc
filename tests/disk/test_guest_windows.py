"""Nothing that can wait runs while the guest is frozen or paused: no dataclass is made
(lazy_dataclass.py: ~0.4 ms each, the first time one is used) between a quiesced snapshot's
freeze and its thaw, nor between a memory save's return and the guest's resume.

Each test runs in a fresh interpreter, where every class is still unmade, on the fake
hypervisor with real qcow2 files (a process that made them earlier would prove nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WATCHING = '''
from bbsnap import lazy_dataclass
from tests.fakes.hypervisor import FakeHypervisor

made_inside = {}


class Watching(FakeHypervisor):
    """The fake, noting the dataclasses made while the guest is frozen or paused."""

    def _opened(self):
        self._before = set(lazy_dataclass._pending)

    def _closed(self, window):
        made = self._before - set(lazy_dataclass._pending)
        made_inside.setdefault(window, []).extend(sorted(c.__qualname__ for c in made))

    def freeze(self, name, timeout):
        frozen = super().freeze(name, timeout)
        self._opened()
        return frozen

    def thaw(self, name, timeout=5):
        self._closed("freeze")
        super().thaw(name, timeout)

    def save_memory_live(self, *args, **kwargs):
        saved = super().save_memory_live(*args, **kwargs)
        self._opened()
        return saved

    def resume(self, name):
        self._closed("memory pause")
        super().resume(name)
'''


def _made_inside(script: str, work: Path) -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", WATCHING + textwrap.dedent(script), str(work)],
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_quiesced_snapshot_makes_no_dataclass_while_the_guest_is_frozen(tmp_path):
    made = _made_inside('''
        import json, sys
        from pathlib import Path
        from bbsnap.services.snapshots.start import SnapshotRequest
        from bbsnap.state.layout import DataDir
        from tests.disk.fake_servers import (base_catalogue, create_request, server_creator,
                                             snapshot_service)

        work = Path(sys.argv[1])
        data = DataDir(work / "data").ensure()
        catalogue = base_catalogue(data)
        hv = Watching()
        server = server_creator(data, catalogue, hv, work)[0].create(create_request(work))
        snapshot_service(data, catalogue, hv).begin(SnapshotRequest(server.id))  # quiesced
        print(json.dumps(made_inside))
    ''', tmp_path)
    assert made == {"freeze": []}


def test_a_memory_save_makes_no_dataclass_while_the_guest_is_paused(tmp_path):
    made = _made_inside('''
        import json, subprocess, sys, uuid
        from pathlib import Path
        from bbsnap.hypervisor import DiskSpec, DomainSpec
        from bbsnap.models import SnapshotDisk, SnapshotJob
        from bbsnap.services.snapshots import memory
        from bbsnap.state.layout import DataDir

        work = Path(sys.argv[1])
        data = DataDir(work / "data").ensure()
        disk = work / "disk.qcow2"
        # Not through bbsnap.proc: its result class must still be unmade when the save begins.
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        hv = Watching()
        hv.define(DomainSpec(name="guest", uuid=str(uuid.uuid4()), memory_mib=64, vcpus=1,
                             accel="tcg", disks=(DiskSpec(disk),), console_log=work / "c.log",
                             guest_agent=False))
        hv.start("guest")
        job = SnapshotJob(domain="guest", domain_uuid=hv.info("guest").uuid, mode="memory",
                          disks=(SnapshotDisk("vda", str(disk), "qcow2", str(work / "t")),))
        memory.capture(hv, data, "img-mem00", job, [], 64 << 20)
        print(json.dumps(made_inside))
    ''', tmp_path)
    assert made == {"memory pause": []}

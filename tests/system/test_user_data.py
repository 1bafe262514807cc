"""gzip'd --user-data on the real libvirtd: accepted, and the seed ISO QEMU is given holds
the text cloud-init acts on (cloud-init decompresses gzip'd user-data the same way)."""

from __future__ import annotations

import gzip

from bbsnap.seed import read_seed_iso
from tests.system.conftest import create_server

TEXT = "#cloud-config\nhostname: zipped\nruncmd: [[echo, 'caf\u00e9']]\n"


def test_gzipped_user_data_reaches_the_seed_as_text(cloud, hypervisor, work_dir):
    path = work_dir / "user-data.gz"
    path.write_bytes(gzip.compress(TEXT.encode()))
    (server,) = create_server(cloud, "--user-data", str(path), "--no-start")
    seed = cloud.data_dir / "servers" / server["id"] / "seed.iso"
    assert read_seed_iso(seed)["user-data"] == TEXT
    assert cloud("servers", "destroy", server["id"]).exit_code == 0

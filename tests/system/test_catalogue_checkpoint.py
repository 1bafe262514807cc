"""A snapshot's rows reach the catalogue's main file (DESIGN §8): `servers snapshot` returns
without checkpointing while its worker runs, and the worker checkpoints after its final
commit. Real libvirtd, real processes (the CLI's exit path only runs in a real process)."""

from __future__ import annotations

from bbsnap.state.catalogue import Catalogue
from tests.disk.test_catalogue_durability import main_file_rows
from tests.system.conftest import create_server, wait_until


def test_a_snapshot_is_in_the_main_file_once_its_worker_ends(cloud):
    (server,) = create_server(cloud, "--no-start")
    catalogue = cloud.data_dir / "catalogue.sqlite3"
    # Held open, so the worker's close is not the last one (which checkpoints by itself).
    holder = Catalogue(catalogue)
    try:
        result = cloud.process("servers", "snapshot", server["id"])
        assert result.exit_code == 0, result.stderr
        image_id = result.stdout.strip()
        wait_until(lambda: (image_id, "available") in main_file_rows(catalogue), 180,
                   f"{image_id} available in the main file alone")
    finally:
        holder.close()
    assert cloud("servers", "destroy", server["id"]).exit_code == 0

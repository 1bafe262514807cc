"""`bbsnap doctor` against the real libvirtd: healthy data dirs pass; orphans, stale jobs and
directories QEMU's user cannot enter are reported with their fix; --fix quarantines orphans
only, and never a live server's directory, whichever connection it is pointed at."""

from __future__ import annotations

import json
import os

from bbsnap.state.catalogue import Catalogue
from bbsnap.state.process_tokens import current_job_token
from bbsnap.models import ImageStatus
from bbsnap.services.server_origin import write_origin
from tests.system.conftest import URI, create_server


def test_healthy_data_directory(cloud):
    result = cloud("doctor")
    assert result.exit_code == 0, result.stdout
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line[:4].strip()}
    assert lines["libvirt"].startswith("ok") and "qemu:///system" in lines["libvirt"]
    assert "KVM" in result.stdout and "orphaned files" in result.stdout


def test_orphans_are_found_and_only_they_are_reclaimed(cloud):
    (server,) = create_server(cloud, "--no-start")
    tmp, blanks = cloud.data_dir / "tmp", cloud.data_dir / "blank-overlays"
    dead = "1:1:gone"  # the job token of a process that no longer exists
    junk = [cloud.data_dir / "images" / "img-zzzzz.qcow2", tmp / "img-yyyyy.vda.copy.qcow2",
            tmp / f"export.{dead}.journal", blanks / f".{cloud.image_id}-1024.qcow2.{dead}"]
    # Work files of a process that still runs (this one): theirs, not orphans.
    busy = [tmp / f"export.{current_job_token()}.journal",
            blanks / f".{cloud.image_id}-2048.qcow2.{current_job_token()}"]
    for path in junk + busy:
        path.write_bytes(b"x" * 4096)
    stray = cloud.data_dir / "servers" / "srv-zzzzz"  # made here; its domain is gone
    stray.mkdir()
    (stray / "disk.qcow2").write_bytes(b"x" * 4096)
    write_origin(stray, URI, "00000000-0000-0000-0000-000000000000")

    report = cloud("doctor")
    # The dead export's journal is crash recovery's (a stale job), not an orphan.
    assert report.exit_code == 1 and "4 files hold" in report.stdout, report.stdout
    assert "fix: bbsnap doctor --fix" in report.stdout
    fixed = cloud("doctor", "--fix")
    assert fixed.exit_code == 0, fixed.stdout + fixed.stderr
    assert not any(p.exists() for p in junk) and not stray.exists()
    (batch,) = (cloud.data_dir / "quarantine").iterdir()
    assert (batch / "servers" / "srv-zzzzz" / "disk.qcow2").exists()
    assert (batch / "images" / "img-zzzzz.qcow2").exists()
    assert all(p.exists() for p in busy)
    assert (cloud.data_dir / "images" / f"{cloud.image_id}.qcow2").exists()
    assert (cloud.data_dir / "servers" / server["id"] / "disk.qcow2").exists()
    assert cloud("servers", "destroy", server["id"]).exit_code == 0


def test_stale_jobs_are_reported_and_fixed(cloud, work_dir):
    source = work_dir / "stale.raw"
    with open(source, "wb") as handle:
        handle.truncate(1024 * 1024)
        handle.seek(510)
        handle.write(b"\x55\xaa")
    stale = cloud("images", "import", str(source)).stdout.strip()
    catalogue = Catalogue(cloud.data_dir / "catalogue.sqlite3")
    # As a killed import leaves it: creating, a dead owner, its work file in tmp/.
    catalogue.update(stale, status=ImageStatus.CREATING, job="1:1:gone")
    catalogue.close()
    (cloud.data_dir / "tmp" / f"{stale}.download").write_bytes(b"partial")

    report = cloud("doctor")
    assert report.exit_code == 1
    line = next(x for x in report.stdout.splitlines() if "stale jobs" in x)
    assert line.startswith("FAIL") and stale in line
    fixed = cloud("doctor", "--fix")
    assert fixed.exit_code == 0, fixed.stdout
    shown = cloud("images", "show", stale, "--format", "json").stdout
    assert '"state": "failed"' in shown
    assert list((cloud.data_dir / "tmp").iterdir()) == []


def test_a_data_directory_qemu_cannot_enter(cloud, work_dir):
    parent = work_dir / "private"
    parent.mkdir(mode=0o700)
    os.chmod(parent, 0o700)
    result = cloud("--data-dir", str(parent / "data"), "doctor")
    assert result.exit_code == 1
    assert f"cannot enter {parent} (0700)" in result.stdout
    # the fix grants QEMU's user execute with an ACL; nothing is chmod'ed open
    grant = f"setfacl -m u:libvirt-qemu:x {parent}"
    assert f"bbsnap doctor --fix (runs: {grant}" in result.stdout
    fixed = cloud("--data-dir", str(parent / "data"), "doctor", "--fix")
    assert f"granted QEMU's user passage: {grant}" in fixed.stderr
    assert "data directory access" in fixed.stdout and "cannot enter" not in fixed.stdout
    assert parent.stat().st_mode & 0o007 == 0


def test_a_live_server_is_kept_whichever_connection_doctor_looks_at(cloud, hypervisor):
    (server,) = create_server(cloud, "--no-start")
    directory = cloud.data_dir / "servers" / server["id"]
    origin = directory / "origin.json"
    assert origin.stat().st_mode & 0o777 == 0o600
    assert json.loads(origin.read_text()) == {
        "connect": URI, "domain_uuid": hypervisor.info(server["id"]).uuid}

    for connection in ("test:///default", URI):
        fixed = cloud("-c", connection, "doctor", "--fix")
        assert (directory / "disk.qcow2").exists(), fixed.stdout + fixed.stderr
    assert not (cloud.data_dir / "quarantine").exists()
    elsewhere = cloud("-c", "test:///default", "doctor").stdout
    assert "undecidable files" in elsewhere and f"made on {URI}" in elsewhere
    assert cloud("servers", "destroy", server["id"]).exit_code == 0

"""`bbsnap doctor`: checks, explanations and exact fixes; `--fix` quarantines orphaned files."""

from __future__ import annotations

from typing import Any

import click


@click.command("doctor")
@click.option("--fix", is_flag=True,
              help="Recover interrupted jobs, let QEMU's user pass the directories above the "
                   "data directory (setfacl -m u:libvirt-qemu:x), checkpoint the catalogue, "
                   "move orphaned files into DATA/quarantine and delete quarantined files "
                   "older than 7 days; delete orphaned raw memory saves from RAM "
                   "(/dev/shm/bbsnap-UID).")
@click.pass_obj
def doctor(app: Any, fix: bool) -> None:
    """Check the connection, libvirt, QEMU, KVM, the data directory and the catalogue; exit 1
    on problems."""
    from bbsnap.errors import CatalogueError
    from bbsnap.services.doctor import Doctor

    app.bind_data_dir = False  # another connection's data directory is a finding, not an error
    try:
        catalogue, error = app.catalogue_as_found, ""
    except CatalogueError as exc:  # reported as a finding; it then proves nothing
        catalogue, error = None, str(exc)
    checker = Doctor(app.settings, app.data_dir, catalogue, lambda: app.hypervisor,
                     catalogue_error=error)
    if fix:
        if catalogue is not None:
            app.recover()  # every crash recovery first: what it cleans up is no orphan
        _report_fix(checker.fix())
    findings = checker.run()
    _echo = _escaped_echo()
    width = max(len(f.check) for f in findings)
    for finding in findings:
        mark = "ok  " if finding.ok and not finding.warning else ("warn" if finding.ok else "FAIL")
        _echo(f"{mark}  {finding.check.ljust(width)}  {finding.detail}")
        if finding.fix and (not finding.ok or finding.warning):
            _echo(f"      {' ' * width}  fix: {finding.fix}")
    if any(not f.ok for f in findings):
        raise click.exceptions.Exit(1)


def _escaped_echo(err: bool = False) -> Any:
    """click.echo of lines naming files (names may hold terminal control sequences)."""
    from bbsnap.services.reclaim import printable

    return lambda line: click.echo(printable(line), err=err)


def _report_fix(done: Any) -> None:
    from bbsnap.services.reclaim import QUARANTINE_GRACE

    echo = _escaped_echo(err=True)
    for command in done.granted:
        echo(f"granted QEMU's user passage: {command}")
    for batch in done.purged:
        echo(f"deleted quarantine batch {batch.path.name}: freed {_bytes(batch.size)}")
    freed = sum(b.size for b in done.purged)
    if done.purged:
        echo(f"emptied {len(done.purged)} quarantine batches older than "
             f"{QUARANTINE_GRACE.days} days, freed {_bytes(freed)}")
    for orphan in done.moved:
        echo(f"quarantined {orphan.path}: {_bytes(orphan.size)}")
    moved = sum(o.size for o in done.moved)
    where = f" into {done.batch}" if done.batch else ""
    echo(f"moved {len(done.moved)} orphaned files, {_bytes(moved)},{where}; "
         f"a doctor --fix deletes them after {QUARANTINE_GRACE.days} days")
    for orphan in done.ram_deleted:
        echo(f"deleted from RAM {orphan.path}: {_bytes(orphan.size)}")
    if done.ram_deleted:
        freed = sum(o.size for o in done.ram_deleted)
        echo(f"deleted {len(done.ram_deleted)} orphaned raw memory saves from RAM, freed "
             f"{_bytes(freed)}: guest memory is deleted, never quarantined onto disk")


def _bytes(size: int) -> str:
    return f"{size} bytes ({size / (1024 * 1024):.1f} MiB)"

"""`bbsnap doctor`: checks, explanations and exact fixes; `--fix` reclaims orphaned files."""

from __future__ import annotations

from typing import Any

import click


@click.command("doctor")
@click.option("--fix", is_flag=True,
              help="Recover stale jobs and delete orphaned files (nothing else is changed).")
@click.pass_obj
def doctor(app: Any, fix: bool) -> None:
    """Check libvirt, QEMU, KVM, the data directory and the catalogue; exit 1 on problems."""
    from ..services.doctor import Doctor

    checker = Doctor(app.settings, app.data_dir, app.catalogue_as_found, lambda: app.hypervisor)
    if fix:
        app.recover()  # stale jobs first: their files are then no longer orphans
        removed = checker.fix()
        freed = sum(o.size for o in removed)
        for orphan in removed:
            click.echo(f"removed {orphan.path}", err=True)
        click.echo(f"reclaimed {len(removed)} orphaned files, {freed // (1024 * 1024)} MiB", err=True)
    findings = checker.run()
    width = max(len(f.check) for f in findings)
    for finding in findings:
        mark = "ok  " if finding.ok and not finding.warning else ("warn" if finding.ok else "FAIL")
        click.echo(f"{mark}  {finding.check.ljust(width)}  {finding.detail}")
        if finding.fix and (not finding.ok or finding.warning):
            click.echo(f"      {' ' * width}  fix: {finding.fix}")
    if any(not f.ok for f in findings):
        raise click.exceptions.Exit(1)

"""`bbsnap images export`: download an image as a raw disk, gzip-compressed (or otherwise)."""

from __future__ import annotations

from typing import Any

import click

from bbsnap.vocabulary import DiskFormat, ExportCompression, values


@click.command("export")
@click.argument("image_id", metavar="IMG")
@click.option("-o", "--output", metavar="FILE|-",
              help="Output file, or - for stdout (default: ./IMG.gz and the like). A new "
                   "file, or a regular one replaced whole; a device, FIFO or symlink is "
                   "refused (use - and redirect). Written 0600, with FILE.sha256 and FILE.json.")
@click.option("--format", "disk_format", type=click.Choice(values(DiskFormat)), default="raw",
              show_default=True, help="Disk format inside the file.")
@click.option("--compress", type=click.Choice(values(ExportCompression)), default="gzip",
              show_default=True, help="Compression.")
@click.pass_obj
def export_image(app: Any, image_id: str, output: str | None, disk_format: str,
                 compress: str) -> None:
    """Export IMG as a standalone disk (backing chain flattened), with FILE.sha256 and FILE.json."""
    from bbsnap.services.image_export import ExportRequest

    result = app.exporter().run(ExportRequest(image_id=image_id, output=output,
                                              format=disk_format, compress=compress))
    if result.path is not None:
        click.echo(f"Exported {image_id} to {result.path} ({result.bytes_written} bytes, "
                   f"sha256 {result.sha256})", err=True)
        click.echo(str(result.path))


"""`bbsnap images ...`: the image catalogue."""

from __future__ import annotations

from typing import Any

import click

from bbsnap.vocabulary import DiskFormat, Firmware, ImageStatus, ImageType, Visibility, values
from bbsnap.cli.lazy import LazyGroup
from bbsnap.cli.options import bulk_listing, for_each, output_options, say

IMAGE_TYPES = values(ImageType)
STATUSES = values(ImageStatus) + values(Visibility)  # --status filters either
FIRMWARES = values(Firmware)
DISK_FORMATS = values(DiskFormat)


# Subcommands other modules define, imported when named (lazy.py).
@click.group(cls=LazyGroup, invoke_without_command=True, lazy_commands={
    "export": "bbsnap.cli.image_export:export_image",
    "push": "bbsnap.cli.registry:push_image",
    "pull": "bbsnap.cli.registry:pull_image",
})
@click.pass_context
def images(ctx: click.Context) -> None:
    """The local image catalogue (default: list)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_images)


@images.command("list")
@click.option("-t", "--type", "image_type", type=click.Choice(IMAGE_TYPES), help="Only this type.")
@click.option("--status", type=click.Choice(STATUSES), help="Only this status.")
@click.option("--server", "server_id", metavar="SRV",
              help="Only the snapshots of this server (its history, oldest first).")
@output_options
@click.pass_obj
def list_images(app: Any, image_type: str | None = None, status: str | None = None,
                server_id: str | None = None, output_format: str = "table",
                simple: bool = False) -> None:
    """List images: others first, then snapshots, each by creation time."""
    from bbsnap.cli import image_views, render

    if server_id is not None:
        image_type = "snapshot"
        server_id = _server_name(app, server_id)
    service = app.images()
    with bulk_listing():
        click.echo(render.listing_of(
            image_views.LIST_COLUMNS,
            lambda: [image_views.list_row(s) for s in
                     service.summaries(image_type, status, source_server=server_id)],
            lambda: [image_views.as_record(i) for i in
                     service.find(image_type, status, source_server=server_id)],
            output_format, simple), nl=False)


def _server_name(app: Any, key: str) -> str:
    """The name snapshots record for server *key* (a UUID resolves to it); a server that is
    gone is taken as named: its snapshots are still its history."""
    from bbsnap.errors import NotFoundError

    try:
        return str(app.servers().get(key, with_addresses=False).id)
    except NotFoundError:
        return key


@images.command("show")
@click.argument("image_ids", nargs=-1, required=True, metavar="IMG...")
@output_options
@click.pass_obj
def show_images(app: Any, image_ids: tuple[str, ...], output_format: str, simple: bool) -> None:
    """Show images in detail (JSON/YAML: one object, or a list for several ids)."""
    from bbsnap.cli import image_views, render

    service = app.images()
    found = [(service.get(i), service.dependents(i), service.volumes(i)) for i in image_ids]
    if output_format != "table":
        records = [image_views.as_record(img, deps, vols) for img, deps, vols in found]
        click.echo(render.as_data(records[0] if len(records) == 1 else records, output_format),
                   nl=False)
        return
    blocks = []
    for img, deps, vols in found:
        pairs = image_views.show_pairs(img, deps, vols)
        blocks.append(render.simple([[v for _, v in pairs]]) if simple else render.vertical(pairs))
    click.echo(("" if simple else "\n").join(blocks), nl=False)


@images.command("import")
@click.argument("source", metavar="SOURCE")
@click.option("-n", "--name", help="Image name (default: the sidecar's, else from the file name).")
@click.option("-d", "--description", help="Free-text description.")
@click.option("-a", "--arch", help="Architecture (default: the sidecar's, else the host's).")
@click.option("-u", "--username", help="Default login user of the guest.")
@click.option("--min-ram", type=click.IntRange(min=1), help="Minimum RAM in MiB.")
@click.option("--firmware", type=click.Choice(FIRMWARES),
              help="How servers from it boot (default: the sidecar's, else bios).")
@click.option("--checksum", metavar="sha256:HEX",
              help="Refuse the data unless its SHA-256 matches.")
@click.option("--checksum-file", metavar="URL|PATH",
              help="A SHA256SUMS list: refuse the data unless it matches its file name's entry.")
@click.option("--no-sidecar", is_flag=True, help="Ignore SOURCE.json (the metadata sidecar).")
@click.option("--disk-format", type=click.Choice(DISK_FORMATS),
              help="The disk's format (default: the sidecar's, else recognised by content).")
@click.pass_obj
def import_image(app: Any, source: str, name: str | None, description: str | None,
                 arch: str | None, username: str | None, min_ram: int | None,
                 firmware: str | None, checksum: str | None, checksum_file: str | None,
                 no_sidecar: bool, disk_format: str | None) -> None:
    """Import SOURCE (a file, an http(s):// URL, or - for stdin): qcow2 or raw, plain or
    gzip/xz/zstd/bzip2.

    The format and compression are recognised from the content unless --disk-format or
    SOURCE.json beside the file or URL states them; the sidecar, when present, also gives
    default metadata and is checked. Prints the new image id.
    """
    from bbsnap.transfer.http_source import display, is_url
    from bbsnap.services.image_import import ImportRequest
    label = display(source) if is_url(source) else source  # no query string: it may hold a token
    request = ImportRequest(source=source, name=name, description=description, arch=arch,
                            username=username, min_ram=min_ram, firmware=firmware,
                            checksum=checksum,
                            checksum_file=checksum_file, use_sidecar=not no_sidecar,
                            disk_format=disk_format)
    image = app.importer().run(
        request, on_registered=lambda img: say(f"Importing {label} as {img.id}"))
    click.echo(image.id)


@images.command("update")
@click.argument("image_id", metavar="IMG")
@click.option("-n", "--name", help="New name.")
@click.option("-d", "--description", help="New description.")
@click.option("-u", "--username", help="Default login user.")
@click.option("-a", "--arch", help="Architecture.")
@click.option("--min-ram", type=click.IntRange(min=1), help="Minimum RAM in MiB.")
@click.option("--firmware", type=click.Choice(FIRMWARES),
              help="How servers made from it boot from now on.")
@click.option("--public/--private", "public", default=None, help="Visibility.")
@output_options
@click.pass_obj
def update_image(app: Any, image_id: str, name: str | None, description: str | None,
                 username: str | None, arch: str | None, min_ram: int | None,
                 firmware: str | None, public: bool | None, output_format: str,
                 simple: bool) -> None:
    """Change an image's fields; prints the updated image."""
    from bbsnap.services.images import ImageChanges
    from bbsnap.cli import image_views, render

    service = app.images()
    image = service.update(image_id, ImageChanges(name=name, description=description,
                                                  username=username, arch=arch,
                                                  min_ram=min_ram, firmware=firmware,
                                                  public=public))
    deps = service.dependents(image.id)
    if output_format != "table":
        click.echo(render.as_data(image_views.as_record(image, deps), output_format), nl=False)
    else:
        click.echo(render.vertical(image_views.show_pairs(image, deps)), nl=False)


@images.command("destroy")
@click.argument("image_ids", nargs=-1, required=True, metavar="IMG...")
@click.pass_obj
def destroy_images(app: Any, image_ids: tuple[str, ...]) -> None:
    """Delete images. Refused (exit 4) while servers or images depend on one."""
    for_each(image_ids, app.images().destroy, lambda k: f"Destroying image {k}")

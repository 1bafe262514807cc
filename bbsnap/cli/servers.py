"""`bbsnap servers ...`: servers (libvirt domains) and `bbsnap types`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from bbsnap.cli.lazy import LazyGroup
from bbsnap.cli.options import for_each, output_options, say
from bbsnap.vocabulary import Accel, values


# Subcommands other modules define, imported when named (lazy.py).
@click.group(cls=LazyGroup, invoke_without_command=True, lazy_commands={
    "prune": "bbsnap.cli.prune:prune_server",
    "schedule": "bbsnap.cli.schedule:schedule_server",
})
@click.pass_context
def servers(ctx: click.Context) -> None:
    """Servers: bbsnap's own and every other libvirt domain (default: list)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_servers)


def _print_servers(found: list[Any], output_format: str, simple: bool) -> None:
    from bbsnap.cli import render, server_views

    click.echo(render.listing_of(server_views.LIST_COLUMNS,
                                 lambda: [server_views.list_row(s) for s in found],
                                 lambda: [server_views.as_record(s) for s in found],
                                 output_format, simple), nl=False)


@servers.command("list")
@output_options
@click.pass_obj
def list_servers(app: Any, output_format: str = "table", simple: bool = False) -> None:
    """List servers: bbsnap's first (by creation time), then other domains."""
    _print_servers(app.servers().find(), output_format, simple)


@servers.command("show")
@click.argument("server_ids", nargs=-1, required=True, metavar="SRV...")
@output_options
@click.pass_obj
def show_servers(app: Any, server_ids: tuple[str, ...], output_format: str, simple: bool) -> None:
    """Show servers in detail (name or UUID of any domain works too)."""
    from bbsnap.cli import render, server_views

    service = app.servers()
    found = []
    for key in server_ids:
        server = service.get(key)
        found.append((server, [i.id for i in service.snapshots(server)]))
    if output_format != "table":
        records = [server_views.as_record(s, history) for s, history in found]
        click.echo(render.as_data(records[0] if len(records) == 1 else records, output_format),
                   nl=False)
        return
    blocks = [render.simple([[v for _, v in server_views.show_pairs(s, history)]]) if simple
              else render.vertical(server_views.show_pairs(s, history)) for s, history in found]
    click.echo(("" if simple else "\n").join(blocks), nl=False)


@servers.command("create")
@click.argument("image_id", metavar="IMG")
@click.option("-n", "--name", help="Server name (free text; default: its id).")
@click.option("-t", "--type", "server_type", help="Server type name or id (see 'bbsnap types').")
@click.option("--cpus", type=click.IntRange(1, 64), help="vCPUs (overrides the type).")
@click.option("--memory", type=click.IntRange(min=16), help="RAM in MiB (overrides the type).")
@click.option("--disk-size", type=click.IntRange(min=1), help="Disk size in GiB (grown overlay).")
@click.option("--user-data", type=click.File("rb"),
              help="cloud-init user-data file (plain or gzip'd), or - for stdin.")
@click.option("--ssh-key", "ssh_keys", multiple=True, type=click.Path(dir_okay=False),
              help="SSH public key file (repeatable; default: ~/.ssh/*.pub).")
@click.option("--hostname", help="Guest host name (default: from the name).")
@click.option("--network", help="'user' (127.0.0.1 SSH forward) or a libvirt network name.")
@click.option("--accel", type=click.Choice(values(Accel)), help="Acceleration.")
@click.option("--no-start", is_flag=True, help="Define the server but do not start it.")
@click.option("-i", "--count", type=click.IntRange(1, 32), default=1, show_default=True,
              help="How many servers to create.")
@output_options
@click.pass_obj
def create_servers(app: Any, image_id: str, name: str | None, server_type: str | None,
                   cpus: int | None, memory: int | None, disk_size: int | None,
                   user_data: Any, ssh_keys: tuple[str, ...], hostname: str | None,
                   network: str | None, accel: str | None, no_start: bool, count: int,
                   output_format: str, simple: bool) -> None:
    """Create servers from image IMG as linked clones with a new identity."""
    from bbsnap.services.server_create import CreateRequest

    if hostname and count > 1:
        from bbsnap.errors import UsageError
        raise UsageError("--hostname cannot be used with --count above 1")
    request = CreateRequest(
        image_id=image_id, name=name, server_type=server_type, cpus=cpus, memory_mib=memory,
        disk_gib=disk_size, user_data=_read_user_data(user_data),
        ssh_key_files=tuple(Path(k) for k in ssh_keys), hostname=hostname, network=network,
        start=not no_start)
    # Everything is checked before the first line: every option and the image (before
    # libvirt is touched), QEMU's access to the data directory, then the connection.
    creator = app.server_creator(accel)
    plan = creator.plan(request)
    app.check_qemu_access()
    app.hypervisor.version()
    say(f"Creating {'a' if count == 1 else count} {plan.server_type.name} "
        f"({plan.server_type.id}) server{'s' if count > 1 else ''} with image "
        f"{plan.image.name} ({plan.image.id})")
    created = [creator.create(request) for _ in range(count)]
    _print_servers(created, output_format, simple)


def _read_user_data(stream: Any) -> str | None:
    """--user-data's text: read as bytes (it may be gzip'd, or not text at all), bounded."""
    if stream is None:
        return None
    from bbsnap.seed import MAX_USER_DATA, decode_user_data

    return decode_user_data(stream.read(MAX_USER_DATA + 1))


@servers.command("start")
@click.argument("server_ids", nargs=-1, required=True, metavar="SRV...")
@click.pass_obj
def start_servers(app: Any, server_ids: tuple[str, ...]) -> None:
    """Start servers."""
    app.keep_image_access()
    for_each(server_ids, app.servers().start, lambda k: f"Starting server {k}")


@servers.command("stop")
@click.argument("server_ids", nargs=-1, required=True, metavar="SRV...")
@click.option("--force", is_flag=True, help="Power off at once instead of an ACPI shutdown.")
@click.option("--timeout", type=click.FloatRange(min=1), default=60, show_default=True,
              help="Seconds to wait for the guest to shut down.")
@click.pass_obj
def stop_servers(app: Any, server_ids: tuple[str, ...], force: bool, timeout: float) -> None:
    """Shut servers down (ACPI), or power them off with --force."""
    service = app.servers()
    for_each(server_ids, lambda k: service.stop(k, force=force, timeout=timeout),
             lambda k: f"Stopping server {k}")


@servers.command("reboot")
@click.argument("server_ids", nargs=-1, required=True, metavar="SRV...")
@click.pass_obj
def reboot_servers(app: Any, server_ids: tuple[str, ...]) -> None:
    """Reboot servers (ACPI)."""
    for_each(server_ids, app.servers().reboot, lambda k: f"Rebooting server {k}")


@servers.command("destroy")
@click.argument("server_ids", nargs=-1, required=True, metavar="SRV...")
@click.pass_obj
def destroy_servers(app: Any, server_ids: tuple[str, ...]) -> None:
    """Destroy bbsnap servers: power off, undefine, delete their disk and seed."""
    for_each(server_ids, app.servers().destroy, lambda k: f"Destroying server {k}")


@servers.command("snapshot")
@click.argument("server_ids", nargs=-1, required=True, metavar="SRV...")
@click.option("-n", "--name", help="Image name (default: 'Snapshot of SRV DD Mon HH:MM (arch)').")
@click.option("--wait", is_flag=True, help="Wait until the image is available (or failed).")
@click.option("--no-quiesce", is_flag=True,
              help="Do not freeze filesystems through the guest agent.")
@click.option("-u", "--username",
              help="The guest's login user, recorded on the image for `servers ssh` on its "
                   "clones (default: the server's image's).")
@click.option("--memory", is_flag=True,
              help="Also save the guest's memory: a revert resumes it where it was.")
@click.pass_obj
def snapshot_servers(app: Any, server_ids: tuple[str, ...], name: str | None, wait: bool,
                     no_quiesce: bool, username: str | None, memory: bool) -> None:
    """Snapshot running (or stopped) servers into the image catalogue.

    Returns as soon as the point in time is fixed; the copy continues in the background
    (the image shows `creating`, then private). Prints the new image ids.
    """
    from bbsnap.services.image_fields import check_username
    from bbsnap.services.snapshots.timeline import COMMAND as timeline

    timeline.mark("parsed")  # interpreter, imports, click: scripts/bench_snapshot.py
    from bbsnap.services.snapshots.start import SnapshotRequest

    if username is not None:
        check_username(username)  # a bad option fails before any output
    timeline.mark("imported")
    service = app.snapshots()
    timeline.mark("service")
    app.check_qemu_access()
    timeline.mark("access-checked")
    started = []

    def snap(key: str) -> None:
        say(f"Snapshotting server {key}")
        image = service.begin(SnapshotRequest(server=key, name=name, quiesce=not no_quiesce,
                                              username=username, memory=memory))
        started.append(image.id)
        click.echo(image.id)

    for_each(server_ids, snap)
    if wait:
        from bbsnap.cli.waiting import wait_for_images

        wait_for_images(app, started)


@servers.command("rebuild")
@click.argument("server_id", metavar="SRV")
@click.argument("image_id", metavar="IMG")
@output_options
@click.pass_obj
def rebuild_server(app: Any, server_id: str, image_id: str, output_format: str,
                   simple: bool) -> None:
    """Rebuild SRV's disk from IMG (e.g. one of its snapshots), keeping its identity."""
    service = app.servers()
    service.get(server_id, with_addresses=False)  # an unknown server fails before any output
    app.keep_image_access()
    say(f"Rebuilding server {server_id} with image {image_id}")
    _print_servers([service.rebuild(server_id, image_id)], output_format, simple)


@servers.command("revert")
@click.argument("server_id", metavar="SRV")
@click.argument("image_id", metavar="[IMG]", required=False)
@click.option("--disk-only", is_flag=True,
              help="Of a memory snapshot, revert the disk alone and boot the server afresh.")
@output_options
@click.pass_obj
def revert_server(app: Any, server_id: str, image_id: str | None, disk_only: bool,
                  output_format: str, simple: bool) -> None:
    """Revert SRV to one of its snapshots (default: its newest available one).

    The disk becomes a new overlay on the snapshot; the server keeps its id, name, UUID,
    MAC and SSH port, and runs afterwards if it ran before. What the guest wrote since the
    snapshot is discarded. For another image, use `rebuild`. A memory snapshot's guest
    continues from the snapshot's instant, processes and all (unless --disk-only).
    """
    service = app.servers()
    service.get(server_id, with_addresses=False)  # an unknown server fails before any output
    app.keep_image_access()
    say(f"Reverting server {server_id} to {image_id or 'its newest snapshot'}")
    _print_servers([service.revert(server_id, image_id, disk_only=disk_only)], output_format,
                   simple)


@servers.command("console")
@click.argument("server_id", metavar="SRV")
@click.pass_obj
def console(app: Any, server_id: str) -> None:
    """Print the server's serial console log."""
    path = app.servers().console_log(server_id)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    except PermissionError:
        from bbsnap.errors import BbsnapError
        raise BbsnapError(f"cannot read the console log {path}: libvirt made it root's",
                          hint="servers created by this bbsnap on qemu:///system keep theirs "
                               "yours; for an older one, read it as root") from None
    sys.stdout.buffer.write(data)


@servers.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("server_id", metavar="SRV")
@click.option("-l", "--user", help="Login user (default: the image's username, else root).")
@click.option("-i", "--identity", type=click.Path(dir_okay=False), help="Private key file.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def ssh(app: Any, server_id: str, user: str | None, identity: str | None,
        command: tuple[str, ...]) -> None:
    """SSH into a server: SRV [-- COMMAND...]."""
    from bbsnap.proc import exec_replace, run_attached
    from bbsnap.services.ssh import SSH_FAILED, guessed_login, login_failed, ssh_argv

    server = app.servers().get(server_id)
    argv = ssh_argv(server, user=user, identity=identity, command=list(command))
    app.close()
    if not guessed_login(server, user):
        exec_replace(argv)
    # Trying root only because nothing says whom: stay to name the user if ssh fails.
    status = run_attached(argv)
    if status == SSH_FAILED:
        raise login_failed(server, status)
    if status:
        raise click.exceptions.Exit(status)


@click.group("types", invoke_without_command=True)
@click.pass_context
def types(ctx: click.Context) -> None:
    """Server types (default: list)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_types)


@types.command("list")
@output_options
def list_types(output_format: str = "table", simple: bool = False) -> None:
    """List server types."""
    from bbsnap.server_types import SERVER_TYPES
    from bbsnap.cli import render

    rows = [[t.id, t.name, t.vcpus, t.memory_mib, t.disk_gib * 1024] for t in SERVER_TYPES]
    records = [{"id": t.id, "name": t.name, "vcpus": t.vcpus, "memory_mib": t.memory_mib,
                "disk_gib": t.disk_gib} for t in SERVER_TYPES]
    click.echo(render.listing(("id", "name", "cores", "ram", "disk"), rows, records,
                              output_format, simple), nl=False)

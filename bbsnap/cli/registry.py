"""`bbsnap images push|pull` and `bbsnap registry login|logout`: OCI registries."""

from __future__ import annotations

import sys
from typing import Any

import click

from bbsnap.cli.options import say

def _chunk_size() -> int:
    """Upload chunk size: BBSNAP_REGISTRY_CHUNK_SIZE bytes (default 32 MiB). A cut
    connection or a killed push resends at most the chunk in flight."""
    import os

    from bbsnap.errors import UsageError
    from bbsnap.registry.client import DEFAULT_CHUNK

    text = os.environ.get("BBSNAP_REGISTRY_CHUNK_SIZE", "")
    if not text:
        return DEFAULT_CHUNK
    if not text.isdigit() or not 4096 <= int(text) <= 1 << 32:
        raise UsageError(f"BBSNAP_REGISTRY_CHUNK_SIZE={text!r} is not a byte count from "
                         "4096 to 4 GiB")
    return int(text)


INSECURE_HELP = ("Plain HTTP, for a registry without TLS (one on this machine is tried with TLS "
                 "first, then in plain HTTP by itself).")


@click.command("push")
@click.argument("image_id", metavar="IMG")
@click.argument("reference", metavar="REF")
@click.option("--containerdisk", is_flag=True,
              help="A KubeVirt containerDisk: one layer, the flattened disk at /disk/.")
@click.option("--insecure", is_flag=True, help=INSECURE_HELP)
@click.pass_obj
def push_image(app: Any, image_id: str, reference: str, containerdisk: bool,
               insecure: bool) -> None:
    """Push IMG to REF (host/repository:tag); prints the manifest digest.

    The image goes up as its storage chain, one layer per file: layers the repository
    already has, or that another repository of the registry can lend, are not sent again.
    """
    from bbsnap.registry import reference as refs

    ref = refs.parse(reference)
    if ref.digest is not None:
        from bbsnap.errors import UsageError

        raise UsageError(f"push to a tag, not a digest: {reference}",
                         hint="the registry names what it stores by digest itself")
    say(f"Pushing {image_id} to {ref}")
    if containerdisk:
        from bbsnap.registry.containerdisk import push_containerdisk

        result = push_containerdisk(app.catalogue, app.data_dir, image_id, ref,
                                    insecure=insecure, timeout=app.settings.http_timeout,
                                    chunk_size=_chunk_size())
    else:
        from bbsnap.registry.push import Pusher

        pusher = Pusher(app.catalogue, app.data_dir, insecure=insecure,
                        timeout=app.settings.http_timeout, chunk_size=_chunk_size(),
                        reporter=app.reporter)
        result = pusher.push(image_id, ref)
    say(f"Pushed {ref}@{result.digest} ({result.uploaded} bytes uploaded)")
    click.echo(result.digest)


@click.command("pull")
@click.argument("reference", metavar="REF")
@click.option("-n", "--name", help="Name of the pulled image (default: the pushed name).")
@click.option("--insecure", is_flag=True, help=INSECURE_HELP)
@click.pass_obj
def pull_image(app: Any, reference: str, name: str | None, insecure: bool) -> None:
    """Pull REF into the catalogue (its whole chain; images already held are reused);
    prints the image id."""
    from bbsnap.registry import reference as refs
    from bbsnap.registry.pull import Puller

    ref = refs.parse(reference)
    say(f"Pulling {ref}")
    puller = Puller(app.catalogue, app.data_dir, app.settings, insecure=insecure,
                    reporter=app.reporter)
    result = puller.pull(ref, name=name)
    if not result.new:
        say(f"{ref} is already image {result.image.id}")
    click.echo(result.image.id)


@click.group("registry")
def registry() -> None:
    """Credentials for OCI registries (kept where docker and podman keep theirs)."""


@registry.command("login")
@click.argument("host", metavar="HOST")
@click.option("-u", "--username", required=True, help="User name.")
@click.option("--password-stdin", is_flag=True,
              help="Read the password (or token) from standard input.")
@click.option("--insecure", is_flag=True, help=INSECURE_HELP)
@click.pass_obj
def login(app: Any, host: str, username: str, password_stdin: bool, insecure: bool) -> None:
    """Check the credentials against HOST and store them (0600) in the auth file:
    $REGISTRY_AUTH_FILE, else podman's, else ~/.docker/config.json."""
    from bbsnap.errors import UsageError
    from bbsnap.registry import auth, reference as refs
    from bbsnap.registry.client import RegistryClient

    ref = refs.parse(f"{host.rstrip('/')}/bbsnap/login")
    if password_stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    else:
        secret = click.prompt("Password", hide_input=True, err=True)
    if not secret:
        raise UsageError("no password given")
    credentials = auth.Credentials(username, secret)
    client = RegistryClient(ref, insecure=insecure, timeout=app.settings.http_timeout,
                            scopes=["registry:catalog:*"])
    client.use_credentials(credentials)
    try:
        client.check()
    finally:
        client.close()
    path = auth.store(ref.host, credentials)
    say(f"Login succeeded; credentials for {ref.host} are in {path}")


@registry.command("logout")
@click.argument("host", metavar="HOST")
def logout(host: str) -> None:
    """Remove HOST's stored credentials."""
    from bbsnap.errors import NotFoundError
    from bbsnap.registry import auth, reference as refs

    ref = refs.parse(f"{host.rstrip('/')}/bbsnap/login")
    if not auth.forget(ref.host):
        raise NotFoundError(f"no credentials for {ref.host} in {auth.login_file()}")
    say(f"Removed the credentials for {ref.host}")

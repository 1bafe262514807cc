"""The ssh command line that reaches a server from this host."""

from __future__ import annotations

from ..errors import ConflictError
from ..models import Server, ServerStatus


def ssh_argv(server: Server, *, user: str | None = None, identity: str | None = None,
             command: list[str] | None = None) -> list[str]:
    if server.status is not ServerStatus.ACTIVE:
        raise ConflictError(f"server {server.id} is not running", hint=f"bbsnap servers start {server.id}")
    if server.ssh_port:
        host, port = "127.0.0.1", server.ssh_port
    elif server.addresses:
        host, port = server.addresses[0], 22
    else:
        raise ConflictError(f"no address known for server {server.id}",
                            hint="the guest agent or a DHCP lease tells bbsnap its IP; wait for boot")
    # Host keys are not pinned: every clone (re)generates its own, and the forward ends on
    # 127.0.0.1 at a guest this host runs.
    argv = ["ssh", "-p", str(port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    if identity:
        argv += ["-i", identity, "-o", "IdentitiesOnly=yes"]
    argv.append(f"{user or server.username or 'root'}@{host}")
    if command:
        argv += ["--", *command]
    return argv

"""The ssh command line that reaches a server from this host.

Every word that comes from a user, an image or a guest is placed where ssh cannot read it
as an option: the login name after ``-l`` (and refused if it starts with ``-``), the host
after ``--``. A user name ``-oProxyCommand=...`` once made ssh run a local command.
"""

from __future__ import annotations

import ipaddress

from bbsnap.errors import BbsnapError, ConflictError, UsageError
from bbsnap.models import Server, ServerStatus

MAX_LOGIN_NAME = 256
FALLBACK_USER = "root"
SSH_FAILED = 255  # ssh's own failures (refused login, no connection); else the command's


def check_login_name(user: str) -> str:
    """A login name ssh takes as one: not an option, no spaces or control characters."""
    if (not user or user.startswith("-") or len(user) > MAX_LOGIN_NAME
            or any(c.isspace() or not c.isprintable() for c in user)):
        raise UsageError(f"{user!r} is not a login name ssh can use",
                         hint="no leading '-', spaces or control characters")
    return user


def ssh_argv(server: Server, *, user: str | None = None, identity: str | None = None,
             command: list[str] | None = None) -> list[str]:
    if server.status is not ServerStatus.ACTIVE:
        raise ConflictError(f"server {server.id} is not running",
                            hint=f"bbsnap servers start {server.id}")
    login = check_login_name(login_user(server, user))
    host, port = _address(server)
    # Host keys are not pinned: every clone (re)generates its own, and the forward ends on
    # 127.0.0.1 at a guest this host runs.
    argv = ["ssh", "-l", login, "-p", str(port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    if identity:
        argv += ["-i", identity, "-o", "IdentitiesOnly=yes"]
    # After "--" ssh reads no more options, not even after the host (it otherwise does).
    return [*argv, "--", host, *(command or [])]


def login_user(server: Server, user: str | None) -> str:
    """-l, else the login user its image records, else root."""
    return user or server.username or FALLBACK_USER


def guessed_login(server: Server, user: str | None) -> bool:
    """Whether the login user is only the fallback: no -l, and no image says whom."""
    return not user and not server.username


def login_failed(server: Server, status: int) -> BbsnapError:
    """The error for ssh failing as the fallback user: name the user to pass, and where
    to record it so its clones know."""
    image = server.image_id or "IMG"
    return BbsnapError(
        f"ssh to server {server.id} as {FALLBACK_USER} failed (exit {status}); bbsnap knows "
        f"no login user for it (its image records none), and cloud images refuse "
        f"{FALLBACK_USER}",
        hint=f"pass the guest's user: bbsnap servers ssh {server.id} -l USER (e.g. debian, "
             f"ubuntu, fedora, cloud-user); record it with 'bbsnap images update {image} "
             f"-u USER' or 'bbsnap servers snapshot --username USER'")


def _address(server: Server) -> tuple[str, int]:
    """The SSH forward on 127.0.0.1, else the first address the guest reported that is an
    IP address (the guest agent's answer is the guest's to choose)."""
    if server.ssh_port:
        return "127.0.0.1", server.ssh_port
    for address in server.addresses:
        try:
            return str(ipaddress.ip_address(address)), 22
        except ValueError:
            continue
    raise ConflictError(f"no address known for server {server.id}",
                        hint="the guest agent or a DHCP lease tells bbsnap its IP; wait for boot")

"""Who is logged in to the tiny guest: a login user of its own and a utmp file naming sessions.

A cloud image has a non-root login user ("debian", "ubuntu"); bbsnap learns it for a domain
it did not create from the guest agent, whose guest-get-users reads the guest's utmp. The
tiny guest has no login daemon to write one, so the builder writes ``/run/utmp`` (glibc's
``/var/run/utmp``; init.sh links /var/run to /run) into the initramfs: open sessions of
root (the newest, so a reader has to skip it), of :data:`LOGIN_USER` and of an older user.
:data:`LOGIN_USER` also exists (passwd) and takes the seed's SSH keys, as root does.

The sessions' times are fixed (the image stays byte-identical across builds).
"""

from __future__ import annotations

import struct
from datetime import datetime, timezone

from bbsnap.lazy_dataclass import dataclass
from bbsnap.tinyguest.initramfs import Initramfs

LOGIN_USER = "tiny"
LOGIN_UID = 1000
UTMP_PATH = "run/utmp"


@dataclass(frozen=True)
class Session:
    user: str
    line: str            # the terminal, as utmp names it (ttyS0, pts/0)
    login_time: datetime


SESSIONS = (
    Session("admin", "tty1", datetime(2026, 1, 1, 8, 0, tzinfo=timezone.utc)),
    Session(LOGIN_USER, "pts/0", datetime(2026, 1, 1, 9, 0, tzinfo=timezone.utc)),
    Session("root", "ttyS0", datetime(2026, 1, 1, 10, 0, tzinfo=timezone.utc)),
)

# glibc's struct utmp on x86_64 (384 bytes): ut_type, padding, ut_pid, ut_line[32],
# ut_id[4], ut_user[32], ut_host[256], ut_exit (2 shorts), ut_session, ut_tv (two int32),
# ut_addr_v6[4], 20 reserved bytes.
_UTMP = struct.Struct("<h2xi32s4s32s256shhiii16s20s")
USER_PROCESS = 7
# The passwd, group and shadow lines of LOGIN_USER (ssh.py has root's).
PASSWD_LINE = f"{LOGIN_USER}:x:{LOGIN_UID}:{LOGIN_UID}:{LOGIN_USER}:/home/{LOGIN_USER}:/bin/sh\n"
GROUP_LINE = f"{LOGIN_USER}:x:{LOGIN_UID}:\n"
SHADOW_LINE = f"{LOGIN_USER}:*:19000:0:99999:7:::\n"


def utmp_record(session: Session, pid: int) -> bytes:
    """One USER_PROCESS record, as login(1) or sshd write it."""
    seconds = int(session.login_time.timestamp())
    return _UTMP.pack(USER_PROCESS, pid, session.line.encode(), session.line[-4:].encode(),
                      session.user.encode(), b"", 0, 0, 0, seconds, 0, b"", b"")


def utmp_file(sessions: tuple[Session, ...] = SESSIONS) -> bytes:
    return b"".join(utmp_record(s, 100 + i) for i, s in enumerate(sessions))


def add_logins(initramfs: Initramfs) -> None:
    """The utmp file and LOGIN_USER's home (init.sh gives it the seed's keys at boot)."""
    initramfs.add(UTMP_PATH, utmp_file(), 0o644)
    initramfs.add_dir(f"home/{LOGIN_USER}", 0o755)
    initramfs.add_dir(f"home/{LOGIN_USER}/.ssh", 0o700)

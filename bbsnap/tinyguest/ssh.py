"""SSH into the tiny guest: Debian's dropbear server plus the few userland files
a login needs (root's, and the guest's login user's: logins.py).

Keys are not baked in: init.sh copies the public keys from the cloud-init
seed's user-data to /root/.ssh/authorized_keys at boot, and dropbear makes its
host keys on first use (``-R``), so one cached image serves every test.
"""

from __future__ import annotations

from bbsnap.tinyguest.binaries import LibraryPool, add_binary
from bbsnap.tinyguest.debpkg import Package
from bbsnap.tinyguest.initramfs import Initramfs
from bbsnap.tinyguest.logins import GROUP_LINE, PASSWD_LINE, SHADOW_LINE

SSHD_DEST = "usr/sbin/dropbear"

# Key auth only: "*" in /etc/shadow can never match a password, and
# init.sh starts dropbear with -s as well. dropbear refuses a login whose shell
# is not in /etc/shells. glibc's NSS reads these through the built-in "files"
# module (nsswitch.conf says so explicitly rather than trusting the default).
# tty (gid 5) is the group devpts gives new ptys (init.sh mounts it gid=5).
NSSWITCH = b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
# The guest's own login user (logins.py) logs in the same way.
LOGIN_FILES: dict[str, tuple[int, bytes]] = {
    "etc/passwd": (0o644, b"root:x:0:0:root:/root:/bin/sh\n" + PASSWD_LINE.encode()),
    "etc/group": (0o644, b"root:x:0:\ntty:x:5:\n" + GROUP_LINE.encode()),
    "etc/shadow": (0o600, b"root:*:19000:0:99999:7:::\n" + SHADOW_LINE.encode()),
    "etc/shells": (0o644, b"/bin/sh\n"),
    "etc/nsswitch.conf": (0o644, NSSWITCH),
    "etc/hosts": (0o644, b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"),
}
# dropbear rejects authorized_keys when its directories are group/other
# writable; /etc/dropbear is where -R writes the host keys it generates.
LOGIN_DIRS: dict[str, int] = {
    "root": 0o700,
    "root/.ssh": 0o700,
    "var/log": 0o755,
    "etc/dropbear": 0o700,
}


def add_ssh(initramfs: Initramfs, package: Package, pool: LibraryPool) -> dict[str, str]:
    """Add dropbear with its libraries and the login files; return {soname: package=version}."""
    libs = add_binary(initramfs, package, ("usr/sbin/dropbear", "sbin/dropbear"),
                      SSHD_DEST, pool)
    for path, (mode, data) in LOGIN_FILES.items():
        initramfs.add(path, data, mode)
    for path, mode in LOGIN_DIRS.items():
        initramfs.add_dir(path, mode)
    return libs

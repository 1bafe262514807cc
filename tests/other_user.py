"""Other local users, as real second processes.

``as_nobody``: what ``nobody`` can do with bbsnap's files. The probe runs under ``runuser -u
nobody`` with no repository code, so it sees exactly what the kernel lets that user see: it
tries to open each path for reading (and, for a lock file, to take an flock on it) and to
list each directory.

``throwaway_user``: a new normal user (a 0700 home, as Debian 12's ``adduser`` makes it;
optionally in the ``libvirt`` group) who runs bbsnap as daily work would: through
``runuser`` (their own groups, from the group database) with a clean environment and no
``LIBVIRT_DEFAULT_URI``, so bbsnap chooses their connection itself. The interpreter is the
all-users install (``scripts/setup``: /opt/bbsnap); the code under test is a copy of this
run's package that the user can read (the checkout may sit in root's 0700 home). At the
end every process of the user is ended by pid (their session libvirtd, its QEMUs), and the
user, their home and the copy are removed.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bbsnap

# The system's interpreter: the test run's own may live where nobody may not go (/root).
PYTHON = "/usr/bin/python3"

PROBE = r"""
import fcntl, json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
            out[path] = "listed"
        else:
            fd = os.open(path, os.O_RDONLY)
            os.read(fd, 16)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out[path] = "read"
    except OSError as exc:
        out[path] = "denied" if exc.errno in (1, 13) else f"error {exc.errno}"
print(json.dumps(out))
"""


def as_nobody(paths: list[Path]) -> dict[Path, str]:
    """For each path: "read"/"listed" if nobody got in, "denied" if the kernel refused."""
    for path in paths:
        assert path.exists(), f"{path} should exist for the probe to mean anything"
    done = subprocess.run(["runuser", "-u", "nobody", "--", PYTHON, "-I", "-c", PROBE,
                           *map(str, paths)], capture_output=True, text=True, check=True,
                          timeout=60, cwd="/")
    return {Path(k): v for k, v in json.loads(done.stdout).items()}


def readable_by_nobody(paths: list[Path]) -> list[Path]:
    return [path for path, verdict in as_nobody(paths).items() if verdict != "denied"]


# The all-users install scripts/setup makes; its venv has bbsnap's dependencies.
ALL_USERS_PREFIX = Path(os.environ.get("BBSNAP_PREFIX", "/opt/bbsnap"))
ENTRY = "import sys; from bbsnap.cli.main import main; sys.argv[0] = 'bbsnap'; main()"


@dataclass
class Account:
    name: str
    uid: int
    home: Path
    code: Path  # holds the copy of the package under test

    @property
    def data_dir(self) -> Path:
        return self.home / ".local" / "share" / "bbsnap"

    def environment(self, extra: dict[str, str] | None = None) -> list[str]:
        env = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
               "PATH": f"{ALL_USERS_PREFIX}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
               "PYTHONPATH": str(self.code), "BBSNAP_CONFIG": "", "BBSNAP_ACCEL": "tcg",
               "LANG": "C.UTF-8", **(extra or {})}
        return [f"{key}={value}" for key, value in env.items()]

    def run(self, *argv: str, timeout: float = 300, env: dict[str, str] | None = None,
            stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
        """*argv* as this user, in their home, with only the environment above."""
        return subprocess.run(["runuser", "-u", self.name, "--", "env", "-i",
                               *self.environment(env), *argv], capture_output=True, text=True,
                              timeout=timeout, cwd=self.home, stdin=stdin, check=False)

    def bbsnap(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run(str(ALL_USERS_PREFIX / "bin" / "python3"), "-c", ENTRY, *args,
                        timeout=timeout)

    def give(self, source: Path, name: str) -> Path:
        """A copy of *source* in the user's home, theirs."""
        target = self.home / name
        shutil.copyfile(source, target)
        os.chown(target, self.uid, -1)
        return target

    def processes(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if entry.stat().st_uid == self.uid:
                        found.append(int(entry.name))
                except FileNotFoundError:
                    continue
        return found


@contextmanager
def throwaway_user(*, libvirt_group: bool) -> Iterator[Account]:
    python = ALL_USERS_PREFIX / "bin" / "python3"
    assert python.exists(), f"{python} is missing: run scripts/setup (the all-users install)"
    name = "bbsnapt" + secrets.token_hex(3)
    groups = ["-G", "libvirt"] if libvirt_group else []
    subprocess.run(["useradd", "-m", "-U", "-s", "/bin/sh", *groups, name], check=True,
                   capture_output=True, timeout=60)
    code = Path(tempfile.mkdtemp(prefix="bbsnap-tests-user-", dir="/var/tmp"))
    try:
        entry = pwd.getpwnam(name)
        home = Path(entry.pw_dir)
        os.chmod(home, 0o700)  # Debian 12's adduser default, whatever useradd's is here
        shutil.copytree(Path(bbsnap.__file__).parent, code / "bbsnap",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in [code, *code.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        yield Account(name, entry.pw_uid, home, code)
    finally:
        _end_processes_of(name)
        _remove_system_domains_in(Path(pwd.getpwnam(name).pw_dir))
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True, timeout=60)
        shutil.rmtree(code, ignore_errors=True)


def _remove_system_domains_in(home: Path) -> None:
    """Domains a libvirt-group user left on qemu:///system (a test that failed before its
    destroy): their disks go with the home, so their definitions must go too."""
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        for dom in conn.listAllDomains(0):
            if f"{home}/" not in dom.XMLDesc(0):
                continue
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                              | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    finally:
        conn.close()


def _end_processes_of(name: str) -> None:
    """SIGTERM every process of the user (by pid), then SIGKILL what is left after 30 s."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    account = Account(name, uid, Path("/"), Path("/"))
    for sig, patience in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        for pid in account.processes():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + patience
        while account.processes() and time.monotonic() < deadline:
            time.sleep(0.1)  # waiting for the kernel to reap them: polled, bounded
        if not account.processes():
            return

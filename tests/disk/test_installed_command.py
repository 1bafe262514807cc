"""The installed `bbsnap` command (scripts/setup's launcher in the all-users venv, linked as
/usr/local/bin/bbsnap) runs the CLI in its own process and through a command server of
that install, with none of the start-up pip's console script costs (`re`, site) and
unmoved by the caller's PYTHON* variables."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bbsnap import __version__
from tests.other_user import ALL_USERS_PREFIX

LAUNCHER = ALL_USERS_PREFIX / "bin" / "bbsnap"
PYTHON = ALL_USERS_PREFIX / "bin" / "python3"


def _env(work_dir: Path, runtime: Path, **extra: str) -> dict[str, str]:
    """No caller's variables; *runtime* (tmp_path's: short enough for a socket's path)."""
    runtime.mkdir(mode=0o700, exist_ok=True)
    return {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(work_dir),
            "BBSNAP_HOME": str(work_dir / "data"), "BBSNAP_CONFIG": "",
            "XDG_RUNTIME_DIR": str(runtime), **extra}


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                          cwd="/")


def test_the_launcher_runs_the_cli_and_ignores_the_callers_python_variables(work_dir,
                                                                             tmp_path):
    assert os.path.realpath("/usr/local/bin/bbsnap") == str(LAUNCHER)
    assert LAUNCHER.read_text().startswith(f"#!{PYTHON} -IS\n")
    # A PYTHONPATH holding a module named like one bbsnap imports would run it: not with -I.
    trap = work_dir / "trap"
    trap.mkdir()
    (trap / "click.py").write_text("raise SystemExit('the caller\\'s click was imported')\n")
    env = _env(work_dir, tmp_path / "runtime", PYTHONPATH=str(trap),
               PYTHONSTARTUP=str(trap / "click.py"))
    version = _run(["/usr/local/bin/bbsnap", "--version"], env)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"bbsnap, version {__version__}"
    listed = _run(["/usr/local/bin/bbsnap", "images", "list", "--format", "json"], env)
    assert (listed.returncode, listed.stdout.strip()) == (0, "[]"), listed.stderr


def test_through_a_command_server_the_launcher_imports_neither_re_nor_site(work_dir,
                                                                           tmp_path):
    env = _env(work_dir, tmp_path / "runtime")
    started = _run([str(LAUNCHER), "command-server", "start", "--idle-timeout", "0"], env)
    assert started.returncode == 0, started.stderr
    try:
        # The launcher run as its shebang runs it (-IS), with import times on stderr.
        traced = _run([str(PYTHON), "-IS", "-X", "importtime", str(LAUNCHER),
                       "images", "list", "--format", "json"], env)
        assert (traced.returncode, traced.stdout.strip()) == (0, "[]"), traced.stderr
        imported = {line.rsplit("|", 1)[1].strip() for line in traced.stderr.splitlines()
                    if line.startswith("import time:") and "|" in line}
        assert "bbsnap.cmdserver.client" in imported, "the command went through the server"
        assert not imported & {"re", "site", "enum", "click", "libvirt"}, sorted(imported)
    finally:
        _run([str(LAUNCHER), "command-server", "stop"], env)
    status = _run([str(LAUNCHER), "command-server", "status"], env)
    assert status.returncode == 3, status.stdout + status.stderr

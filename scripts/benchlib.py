"""Shared helpers for the benchmarks: data sets made from this machine's own files."""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

GIB = 1 << 30
MIB = 1 << 20
SOURCES = ("/usr/share", "/usr/lib")


REPO = Path(__file__).resolve().parent.parent


def _installed_python() -> str:
    """The interpreter the installed ``bbsnap`` command runs on: the venv scripts/setup makes
    (BBSNAP_PREFIX, /opt/bbsnap), else this one. Measured here: that venv's Python starts in
    10-20 ms, this machine's pyenv ``python3`` in 50-170 ms (its site runs extra start-up
    hooks), so a CLI timed on the latter measures the machine, not bbsnap."""
    candidate = Path(os.environ.get("BBSNAP_PREFIX", "/opt/bbsnap")) / "bin" / "python3"
    return str(candidate) if os.access(candidate, os.X_OK) else sys.executable


PYTHON = _installed_python()
BBSNAP = [PYTHON, "-m", "bbsnap.cli.main"]  # the CLI, a new process per command


def cli_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment in which BBSNAP runs this checkout's code (PYTHONPATH), with bytecode
    as an installed bbsnap has it: PYTHONDONTWRITEBYTECODE (set in some shells here) would
    recompile every module changed since its last write on every command."""
    env = {**(os.environ if base is None else base), "PYTHONPATH": str(REPO), **extra}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def compile_checkout() -> None:
    """Byte-compile the checkout with PYTHON, as pip does at install time."""
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "bbsnap")], check=True,
                   stdout=subprocess.DEVNULL)


def guest_env(work: Path, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's bbsnap commands: their own data directory under
    *work*, no user configuration, TCG guests (KVM does not boot guests here)."""
    return cli_env(BBSNAP_HOME=str(work / "data"), BBSNAP_CONFIG="", BBSNAP_ACCEL="tcg", **extra)


def cli_runner(env: dict[str, str]) -> Callable[..., str]:
    """run(*args): one bbsnap command in *env*, which must succeed; its stripped stdout."""
    def run(*args: str) -> str:
        return subprocess.run([*BBSNAP, *args], env=env, check=True, capture_output=True,
                              text=True).stdout.strip()
    return run


@functools.cache
def bbsnap_entry() -> list[str]:
    """The installed `bbsnap` command as scripts/setup's launcher runs it (`-IS`, the venv's
    site-packages named on the path), on this checkout's code: through this checkout's
    command server when one answers (bbsnap/cmdserver), else in its own process. Asked of
    the interpreter on first use, not at import (a process, ~20 ms, of every benchmark)."""
    site = subprocess.run([PYTHON, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    return [PYTHON, "-IS", "-c", f"import sys; sys.path[:0] = [{str(REPO)!r}]; "
            f"sys.path.append({site!r}); from bbsnap.entry import main; main()"]



def command_server_env(env: dict[str, str], work: Path) -> dict[str, str]:
    """*env* with the runtime directory command_server's server has under *work*."""
    runtime = work / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return {**env, "XDG_RUNTIME_DIR": str(runtime)}


@contextmanager
def command_server(env: dict[str, str], work: Path) -> Iterator[Callable[..., str]]:
    """A command server of this checkout, for *env*'s commands, in a runtime directory of
    its own under *work* (never a user's server); yields run(*args) through it, as
    cli_runner's. Stopped at the end."""
    env = command_server_env(env, work)
    subprocess.run([*BBSNAP, "command-server", "start", "--idle-timeout", "0"], env=env,
                   check=True, capture_output=True)

    def run(*args: str) -> str:
        return subprocess.run([*bbsnap_entry(), *args], env=env, check=True, capture_output=True,
                              text=True).stdout.strip()
    try:
        run("command-server", "status")
        yield run
    finally:
        subprocess.run([*BBSNAP, "command-server", "stop"], env=env, capture_output=True)


def median_time(action: Callable[[], object], runs: int, between: Callable[[], object] | None = None) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
        if between is not None:
            between()
    return statistics.median(samples)


def stage_files(target: Path, budget: int = GIB) -> int:
    """Hard-link real system files into *target* until *budget* bytes: real filesystem data."""
    total = 0
    for source in SOURCES:
        for root, _dirs, files in os.walk(source):
            for name in files:
                path = Path(root) / name
                try:
                    info = path.lstat()
                except OSError:
                    continue
                if not path.is_file() or path.is_symlink() or info.st_size == 0:
                    continue
                dest = target / path.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, dest)
                except OSError:
                    try:
                        shutil.copy2(path, dest)
                    except OSError:
                        continue
                total += info.st_size
                if total >= budget:
                    return total
    return total


def filesystem_image(path: Path, virtual_size: int = 8 * GIB, data: int = GIB) -> Path:
    """A qcow2 of *virtual_size* holding an ext4 filesystem with ~*data* bytes of real files."""
    with tempfile.TemporaryDirectory(prefix="bbsnap-stage-", dir=path.parent) as stage:
        stage_files(Path(stage), data)
        raw = path.with_suffix(".raw")
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", stage, str(raw),
                        str(virtual_size // MIB) + "M"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True)
    raw.unlink()
    return path


def small_image(path: Path, size: int = 64 * MIB) -> Path:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as handle:
        handle.truncate(size)
        handle.seek(510)
        handle.write(b"\x55\xaa")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True)
    raw.unlink()
    return path


def bench_dir() -> Path:
    """A scratch directory QEMU's user can traverse (libvirt defines reference files in it)."""
    path = Path(tempfile.mkdtemp(prefix="bbsnap-bench-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    return path

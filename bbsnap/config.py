"""Settings, resolved as: command-line flag > environment (BBSNAP_*) > config file > default.

The config file is YAML (``$BBSNAP_CONFIG``, else ``~/.config/bbsnap/config.yaml``,
else ``/etc/bbsnap/config.yaml``), read with safe_load only. PyYAML is imported
only when a file exists, to keep start-up fast.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .errors import UsageError
from .sizes import GIB, parse_size

ACCEL_CHOICES = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    connect: str = "qemu:///system"
    accel: str = "auto"
    owner: str = "local"
    max_virtual_size: int = 2048 * GIB       # refuse images claiming more than this
    max_decompressed_size: int = 2048 * GIB  # stop a compressed stream that expands past this
    qemu_user: str = "libvirt-qemu"
    ssh_ports: str = "2222-2999"   # 127.0.0.1 ports bbsnap may forward to guests' SSH
    network: str = "user"          # "user" (user-mode + 127.0.0.1 forward) or a libvirt network
    http_timeout: float = 30.0     # seconds to connect, and to wait for each read, on image URLs
    max_chain_depth: int = 32      # files a snapshot chain may take to open; then it restarts


def _env_seconds(text: str) -> float:
    return parse_seconds(text, "BBSNAP_HTTP_TIMEOUT")


def _env_depth(text: str) -> int:
    return parse_depth(text, "BBSNAP_MAX_CHAIN_DEPTH")


def parse_depth(value: str | int, setting: str) -> int:
    """A chain length of at least 2 files (a snapshot on the server's image)."""
    try:
        depth = -1 if isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        depth = -1
    if depth < 2:
        raise UsageError(f"{setting} must be a whole number of files, at least 2, not '{value}'")
    return depth


def parse_seconds(value: str | float, setting: str) -> float:
    """A positive number of seconds (a timeout of 0 would make sockets non-blocking)."""
    try:
        seconds = 0.0 if isinstance(value, bool) else float(value)  # YAML `yes` is no duration
    except (TypeError, ValueError):
        seconds = 0.0
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"{setting} must be a positive number of seconds, not '{value}'")
    return seconds


# setting name -> (environment variable, parser)
_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "data_dir": ("BBSNAP_HOME", Path),
    "connect": ("LIBVIRT_DEFAULT_URI", str),
    "accel": ("BBSNAP_ACCEL", str),
    "owner": ("BBSNAP_OWNER", str),
    "max_virtual_size": ("BBSNAP_MAX_VIRTUAL_SIZE", parse_size),
    "max_decompressed_size": ("BBSNAP_MAX_DECOMPRESSED_SIZE", parse_size),
    "qemu_user": ("BBSNAP_QEMU_USER", str),
    "ssh_ports": ("BBSNAP_SSH_PORTS", str),
    "network": ("BBSNAP_NETWORK", str),
    "http_timeout": ("BBSNAP_HTTP_TIMEOUT", _env_seconds),
    "max_chain_depth": ("BBSNAP_MAX_CHAIN_DEPTH", _env_depth),
}


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/bbsnap")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "bbsnap"


def default_owner() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "local"


def config_file_path(environ: Mapping[str, str] = os.environ) -> Path | None:
    if "BBSNAP_CONFIG" in environ:  # set but empty: use no config file at all (tests do this)
        return Path(environ["BBSNAP_CONFIG"]) if environ["BBSNAP_CONFIG"] else None
    for candidate in (Path.home() / ".config" / "bbsnap" / "config.yaml",
                      Path("/etc/bbsnap/config.yaml")):
        if candidate.is_file():
            return candidate
    return None


def _read_config_file(path: Path | None, explicit: bool) -> dict[str, Any]:
    if path is None or not path.exists():
        if path is not None and explicit:
            raise UsageError(f"config file {path} does not exist")
        return {}
    import yaml  # deferred: only needed when a config file exists

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must be a mapping of setting: value")
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"unknown setting(s) in {path}: {', '.join(unknown)}",
                         hint=f"known settings: {', '.join(sorted(known))}")
    return data


def _coerce(name: str, value: Any) -> Any:
    if name == "data_dir":
        return Path(str(value)).expanduser()
    if name in ("max_virtual_size", "max_decompressed_size"):
        return parse_size(value if isinstance(value, int) else str(value))
    if name == "http_timeout":
        return parse_seconds(value, name)
    if name == "max_chain_depth":
        return parse_depth(value, name)
    return str(value)


def load_settings(overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] = os.environ) -> Settings:
    """Resolve every setting from *overrides* (flags), *environ* and the config file."""
    values: dict[str, Any] = {"data_dir": default_data_dir(), "owner": default_owner()}
    for name, value in _read_config_file(config_file_path(environ),
                                          bool(environ.get("BBSNAP_CONFIG"))).items():
        values[name] = _coerce(name, value)
    for name, (variable, parser) in _ENV.items():
        if environ.get(variable):
            values[name] = parser(environ[variable])
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    settings = Settings(**values)
    if settings.accel not in ACCEL_CHOICES:
        raise UsageError(f"acceleration '{settings.accel}' is not one of {', '.join(ACCEL_CHOICES)}")
    return replace(settings, data_dir=settings.data_dir.expanduser().absolute())

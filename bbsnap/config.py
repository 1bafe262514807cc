"""Settings, resolved as: command-line flag > environment (BBSNAP_*) > config file > default.

The config file is YAML (``$BBSNAP_CONFIG``, else ``~/.config/bbsnap/config.yaml``,
else ``/etc/bbsnap/config.yaml``), read with safe_load only. PyYAML is imported
only when a file exists, to keep start-up fast.

Every value, wherever it comes from, goes through the same strict parser for its setting
(``_PARSERS``, else one chosen by the type of the setting's default): a wrong type, an empty
or out-of-range value is a usage error naming where it came from, never a silent fallback.
"""

from __future__ import annotations

import getpass
import grp
import math
import os
import pwd
from collections.abc import Callable, Mapping
from dataclasses import MISSING, field, fields, replace
from pathlib import Path
from typing import Any

from bbsnap.errors import UsageError
from bbsnap.lazy_dataclass import dataclass
from bbsnap.sizes import GIB, parse_size
from bbsnap.vocabulary import Accel, values

ACCEL_CHOICES = values(Accel)
SYSTEM_URI = "qemu:///system"
SESSION_URI = "qemu:///session"
# The group whose members may manage qemu:///system: Debian's polkit rule (60-libvirt.rules)
# and a libvirtd with unix_sock_group both grant it to this group.
LIBVIRT_GROUP = "libvirt"
MAX_CONFIG_BYTES = 1024 * 1024  # a settings file is a few lines; refuse to slurp anything huge


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    connect: str = SYSTEM_URI      # the default is chosen per user: see choose_connection()
    accel: str = "auto"
    owner: str = "local"
    max_virtual_size: int = 2048 * GIB       # refuse images claiming more than this
    max_decompressed_size: int = 2048 * GIB  # stop a compressed stream that expands past this
    qemu_user: str = "libvirt-qemu"
    ssh_ports: str = "2222-2999"   # 127.0.0.1 ports bbsnap may forward to guests' SSH
    network: str = "user"          # "user" (user-mode + 127.0.0.1 forward) or a libvirt network
    http_timeout: float = 30.0     # seconds to connect, and to wait for each read, on image URLs
    http_min_rate: int = 1024      # bytes/s an image URL must keep up over each http_timeout
    lock_timeout: float = 3600.0   # longest wait for another operation's lock (see state/locks.py)
    max_chain_depth: int = 32      # files a snapshot chain may take to open; then it restarts
    # Where `connect` came from ("--connect", "LIBVIRT_DEFAULT_URI", the config file, or
    # why it was chosen automatically), for `doctor`. Not a setting: no file or variable sets it.
    connect_origin: str = field(default="", metadata={"internal": True})


# A parser takes a raw value (a str from a flag or the environment, any YAML value from the
# config file) and where it came from (for the message), and returns the setting's value.
Parser = Callable[[Any, str], Any]


def _shown(value: Any) -> str:
    """A raw value as the user wrote it, for a message (YAML null is '~', not 'None')."""
    if value is None:
        return "null: YAML reads an empty value or a bare ~ as null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)  # escapes control characters and undecodable bytes


def _check_utf8(text: str, where: str) -> str:
    """Refuse text with undecodable bytes (surrogate escapes from os.environ or argv):
    it would fail later, when written to SQLite, libvirt XML or a terminal."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where} is not valid UTF-8: {_shown(text)}",
                         hint="use UTF-8 text") from None
    return text


def parse_text(value: Any, where: str) -> str:
    """A non-empty string; YAML numbers, booleans and nulls are refused, not stringified."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where} must be a non-empty string, not {_shown(value)}",
                         hint="quote it in YAML if it looks like a number or a boolean")
    return _check_utf8(value, where)


def parse_positive_int(value: Any, where: str) -> int:
    """A whole number above zero (YAML ``true`` is a bool, not 1)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{where} must be a positive whole number, not {_shown(value)}")
    return value


def parse_positive_size(value: Any, where: str) -> int:
    """Bytes, from an int or a text like "64G"; zero, negatives and booleans are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        size = 0
    elif isinstance(value, int):
        size = value
    else:
        try:
            size = parse_size(value)
        except UsageError:
            size = 0
    if size <= 0:
        raise UsageError(f"{where} must be a positive size, not {_shown(value)}",
                         hint="a number of bytes, or with K, M, G or T, e.g. 64G")
    return size


def parse_seconds(value: Any, setting: str) -> float:
    """A positive, finite number of seconds (a timeout of 0 would make sockets non-blocking)."""
    try:
        seconds = 0.0 if isinstance(value, bool) else float(value)  # YAML `yes` is no duration
    except (TypeError, ValueError):
        seconds = 0.0
    if not seconds > 0 or not math.isfinite(seconds):
        raise UsageError(f"{setting} must be a positive number of seconds, not {_shown(value)}")
    return seconds


def parse_choice(choices: tuple[str, ...]) -> Parser:
    def parse(value: Any, where: str) -> str:
        if value not in choices:
            raise UsageError(f"{where} must be one of {', '.join(choices)}, not {_shown(value)}")
        return str(value)
    return parse


def parse_port_range_setting(value: Any, where: str) -> str:
    """"LOW-HIGH" within 1024-65535, checked now rather than at the first `servers create`."""
    from bbsnap.netports import parse_port_range  # deferred: imports socket

    text = parse_text(value, where)
    try:
        parse_port_range(text)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc.message}", hint="e.g. 2222-2999") from None
    return text


def parse_data_dir(value: Any, where: str) -> Path:
    """An absolute directory path (``~`` expanded).

    A relative path from the environment or a config file is refused: it would name a
    different (new, empty) catalogue in every working directory.
    """
    path = _path(value, where)
    if not path.is_absolute():
        raise UsageError(f"{where} must be an absolute path, not {_shown(str(value))}",
                         hint="give an absolute path, e.g. /var/lib/bbsnap")
    return path


def parse_data_dir_flag(value: Any, where: str) -> Path:
    """--data-dir on the command line: relative to the working directory, as a shell user
    expects of a path they type; resolved once here, so the worker gets the same place."""
    return _path(value, where).absolute()


def _path(value: Any, where: str) -> Path:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where} must be a directory path, not {_shown(value)}",
                         hint="give an absolute path, e.g. /var/lib/bbsnap")
    return Path(_check_utf8(value, where)).expanduser()


def parse_depth(value: Any, where: str) -> int:
    """A chain length of at least 2 files (a snapshot on the server's image)."""
    depth = parse_positive_int(value, where)
    if depth < 2:
        raise UsageError(f"{where} must be a whole number of files, at least 2, not {depth}")
    return depth


# Settings whose parser is not the one their default's type implies (see _parser_for).
_PARSERS: dict[str, Parser] = {
    "data_dir": parse_data_dir,
    "accel": parse_choice(ACCEL_CHOICES),
    "max_virtual_size": parse_positive_size,
    "max_decompressed_size": parse_positive_size,
    "ssh_ports": parse_port_range_setting,
    "http_timeout": parse_seconds,
    "http_min_rate": parse_positive_size,
    "max_chain_depth": parse_depth,
}
_FLAG_PARSERS: dict[str, Parser] = {"data_dir": parse_data_dir_flag}

# setting name -> environment variable
_ENV: dict[str, str] = {
    "data_dir": "BBSNAP_HOME",
    "connect": "LIBVIRT_DEFAULT_URI",
    "accel": "BBSNAP_ACCEL",
    "owner": "BBSNAP_OWNER",
    "max_virtual_size": "BBSNAP_MAX_VIRTUAL_SIZE",
    "max_decompressed_size": "BBSNAP_MAX_DECOMPRESSED_SIZE",
    "qemu_user": "BBSNAP_QEMU_USER",
    "ssh_ports": "BBSNAP_SSH_PORTS",
    "network": "BBSNAP_NETWORK",
    "http_timeout": "BBSNAP_HTTP_TIMEOUT",
    "lock_timeout": "BBSNAP_LOCK_TIMEOUT",
    "max_chain_depth": "BBSNAP_MAX_CHAIN_DEPTH",
    "http_min_rate": "BBSNAP_HTTP_MIN_RATE",
}
# Variables whose owner defines "set but empty" as unset (libvirt's virConnectOpen does).
# Every other empty BBSNAP_* variable is an error, not a silent fallback to the default.
_EMPTY_MEANS_UNSET = frozenset({"LIBVIRT_DEFAULT_URI"})


def _parser_for(name: str) -> Parser:
    """The setting's own parser, else the strict one for its default's type, so a setting
    appended to Settings is validated without an entry here."""
    if name in _PARSERS:
        return _PARSERS[name]
    default = next(f.default for f in fields(Settings) if f.name == name)
    if isinstance(default, bool) or default is MISSING:
        raise TypeError(f"setting {name} needs an entry in config._PARSERS")
    if isinstance(default, int):
        return parse_positive_int
    if isinstance(default, float):
        return parse_seconds
    return parse_text


def choose_connection(uid: int | None = None,
                      groups: list[int] | None = None) -> tuple[str, str]:
    """The libvirt URI a user gets when nothing names one, and why (for `doctor`).

    root manages qemu:///system. Another user gets qemu:///system when they are in the
    libvirt group — in the group database (what polkit's libvirt rule checks) or in this
    process's groups (what libvirtd's unix_sock_group checks) — and qemu:///session
    otherwise, which every user reaches without set-up (QEMU then runs as them). Decided
    without connecting: settings are loaded by every command, `bbsnap --help` included.
    """
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return SYSTEM_URI, "automatic: running as root"
    if groups is None:
        groups = os.getgroups()
        try:
            entry = pwd.getpwuid(uid)
            groups = [*groups, *os.getgrouplist(entry.pw_name, entry.pw_gid)]
        except KeyError:
            pass
    try:
        libvirt_gid = grp.getgrnam(LIBVIRT_GROUP).gr_gid
    except KeyError:
        return SESSION_URI, f"automatic: there is no '{LIBVIRT_GROUP}' group on this host"
    if libvirt_gid in groups:
        return SYSTEM_URI, f"automatic: you are in the '{LIBVIRT_GROUP}' group"
    return SESSION_URI, f"automatic: you are not in the '{LIBVIRT_GROUP}' group"


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/bbsnap")
    # The XDG spec says a relative (or empty) XDG_DATA_HOME is invalid and to be ignored.
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "bbsnap"


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
            raise UsageError(f"config file {_shown_path(path)} does not exist",
                             hint="fix BBSNAP_CONFIG, or set it empty for no config file")
        return {}
    data = _parse_yaml(path, _read_text(path)) or {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {_shown_path(path)} must be a mapping of setting: value")
    known = {f.name for f in fields(Settings) if not f.metadata.get("internal")}
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise UsageError(f"unknown setting(s) in {_shown_path(path)}: {', '.join(unknown)}",
                         hint=f"known settings: {', '.join(sorted(known))}")
    return data


def _read_text(path: Path) -> str:
    shown = _shown_path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read config file {shown}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise UsageError(f"config file {shown} is larger than 1 MiB",
                         hint="a config file is a short YAML mapping")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {shown} is not UTF-8 text (byte {exc.start})",
                         hint="it must be a YAML mapping of setting: value") from None


def _parse_yaml(path: Path, text: str) -> Any:
    import yaml  # deferred: only needed when a config file exists

    shown = _shown_path(path)
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "invalid").split())
        raise UsageError(f"config file {shown} is not valid YAML: {where}{problem}",
                         hint="fix the file, or set BBSNAP_CONFIG= for none") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {shown} is not valid YAML: {' '.join(str(exc).split())}",
                         hint="fix the file, or set BBSNAP_CONFIG= for none") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise UsageError(f"config file {shown} is nested too deeply",
                         hint="it must be a flat mapping of setting: value") from None


def _shown_path(path: Path) -> str:
    """A path for a message: undecodable bytes and control characters escaped, so printing
    it can neither fail nor drive the terminal."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, variable in _ENV.items():
        if variable not in environ:
            continue
        text = environ[variable]
        if not text:
            if variable in _EMPTY_MEANS_UNSET:
                continue
            what = "a directory" if name == "data_dir" else "a value"
            raise UsageError(f"{variable} is set but empty", hint=f"unset it or give {what}")
        values[name] = _parser_for(name)(text, variable)
    return values


def load_settings(overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] = os.environ) -> Settings:
    """Resolve every setting from *overrides* (flags), *environ* and the config file."""
    connect, origin = choose_connection()
    values: dict[str, Any] = {"data_dir": default_data_dir(), "owner": default_owner(),
                              "connect": connect}
    path = config_file_path(environ)
    for name, value in _read_config_file(path, bool(environ.get("BBSNAP_CONFIG"))).items():
        values[name] = _parser_for(name)(value, f"'{name}' in {_shown_path(path)}" if path
                                         else name)
        if name == "connect":
            origin = f"'connect' in {_shown_path(path)}" if path else "the config file"
    from_environment = _from_environment(environ)
    values.update(from_environment)
    if "connect" in from_environment:
        origin = _ENV["connect"]
    for name, value in (overrides or {}).items():
        if value is not None:
            parser = _FLAG_PARSERS.get(name) or _parser_for(name)
            values[name] = parser(value, f"--{name.replace('_', '-')}")
            if name == "connect":
                origin = "--connect"
    values["connect_origin"] = origin
    settings = Settings(**values)
    return replace(settings, data_dir=settings.data_dir.absolute())

"""Registry credentials where container tools keep them, and the challenges that ask for them.

Read from, in order: ``$REGISTRY_AUTH_FILE``; podman's
``$XDG_RUNTIME_DIR/containers/auth.json``; ``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json``. An entry is an ``auths`` item (``auth``: base64 of
``user:password``, or ``username``/``password``), or a credential helper
(``credHelpers[host]``, else ``credsStore``) run as ``docker-credential-NAME get``.
Credentials are never put in the catalogue, a log line or a process argument: helpers
get the host on standard input. ``bbsnap registry login`` writes ``auths`` entries to
the first of those files (0600, its directory 0700).
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from pathlib import Path

from bbsnap import proc, safe_files
from bbsnap.errors import BbsnapError, ExternalCommandError, InvalidInputError
from bbsnap.lazy_dataclass import dataclass

MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str

    def basic(self) -> str:
        pair = f"{self.username}:{self.secret}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def __repr__(self) -> str:  # never the secret, even in a traceback
        return f"Credentials(username={self.username!r}, secret=<hidden>)"


def config_files() -> list[Path]:
    """The auth files consulted, in order (missing ones included)."""
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    docker = os.environ.get("DOCKER_CONFIG")
    files.append(Path(docker) / "config.json" if docker
                 else Path.home() / ".docker" / "config.json")
    return files


def _keys(host: str) -> list[str]:
    """How an auth file may name *host* (Docker Hub has its legacy URL)."""
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/",
            f"https://{host}/v2/"]
    if host in ("docker.io", "registry-1.docker.io"):
        keys += ["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"]
    return keys


def _load(path: Path) -> dict[str, object]:
    data = safe_files.read_regular(path, MAX_CONFIG_BYTES)
    if data is None:
        return {}
    try:
        loaded = json.loads(data or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"the registry auth file {path} is not valid JSON",
                                hint="fix or remove it") from exc
    if not isinstance(loaded, dict):
        raise InvalidInputError(f"the registry auth file {path} is not a JSON object")
    return loaded


def lookup(host: str) -> Credentials | None:
    """The credentials stored for *host*, or None (anonymous access)."""
    for path in config_files():
        config = _load(path)
        auths = config.get("auths")
        if isinstance(auths, dict):
            for key in _keys(host):
                entry = auths.get(key)
                if isinstance(entry, dict):
                    found = _from_entry(entry, path)
                    if found is not None:
                        return found
        helpers = config.get("credHelpers")
        helper: object = helpers.get(host) if isinstance(helpers, dict) else None
        helper = helper or config.get("credsStore")
        if isinstance(helper, str) and helper:
            found = _from_helper(helper, host)
            if found is not None:
                return found
    return None


def _from_entry(entry: dict[str, object], path: Path) -> Credentials | None:
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, sep, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            user, sep, secret = "", "", ""
        if not sep:
            raise InvalidInputError(f"an 'auth' entry in {path} is not base64 of user:password")
        return Credentials(user, secret)
    name, password = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(password, str):
        return Credentials(name, password)
    return None


_HELPER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _from_helper(name: str, host: str) -> Credentials | None:
    if not _HELPER_NAME.match(name):
        raise InvalidInputError(f"the credential helper name {name!r} is not a program name")
    try:
        done = proc.run([f"docker-credential-{name}", "get"], input_text=host, timeout=60,
                        check=False)
    except BbsnapError as exc:
        raise ExternalCommandError(f"the credential helper docker-credential-{name} could "
                                   f"not run: {exc.message}") from None
    if done.returncode != 0:
        if "credentials not found" in (done.stdout + done.stderr).lower():
            return None
        raise ExternalCommandError(f"docker-credential-{name} get failed "
                                   f"(exit {done.returncode})")
    try:
        answer = json.loads(done.stdout)
        return Credentials(str(answer["Username"]), str(answer["Secret"]))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ExternalCommandError(f"docker-credential-{name} printed no credentials") from exc


def login_file() -> Path:
    """Where `registry login` writes: the first file consulted."""
    return config_files()[0]


def store(host: str, credentials: Credentials) -> Path:
    """Write an ``auths`` entry for *host*: the file is replaced whole, mode 0600."""
    path = login_file()
    config = _load(path)
    auths = config.get("auths")
    if not isinstance(auths, dict):
        auths = {}
    auths[host] = {"auth": credentials.basic().removeprefix("Basic ")}
    config["auths"] = auths
    _write_private(path, config)
    return path


def forget(host: str) -> bool:
    """Remove *host*'s ``auths`` entries; whether there was one."""
    path = login_file()
    config = _load(path)
    auths = config.get("auths")
    if not isinstance(auths, dict):
        return False
    removed = [key for key in _keys(host) if auths.pop(key, None) is not None]
    if removed:
        _write_private(path, config)
    return bool(removed)


def _write_private(path: Path, config: dict[str, object]) -> None:
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    elif path.parent.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO) and \
            path.parent.name in (".docker", "containers"):
        os.chmod(path.parent, 0o700)  # only the tools' own directories are tightened
    safe_files.write_atomic(path, json.dumps(config, indent=2).encode() + b"\n", mode=0o600)


# -- challenges --------------------------------------------------------------------------

_PARAM = re.compile(r'([A-Za-z]+)=(?:"([^"]*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    scheme: str                 # "basic" or "bearer"
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    """The first challenge of a WWW-Authenticate header."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)

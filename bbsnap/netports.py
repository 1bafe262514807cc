"""Choosing a free 127.0.0.1 port for a server's SSH forward.

A port is free when no other bbsnap server has it recorded or claimed (it stays
that server's across restarts, whichever data directory it belongs to) and it
can be bound right now.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

from bbsnap import safe_files
from bbsnap.errors import ConflictError, UsageError
from bbsnap.lazy_dataclass import dataclass
from bbsnap.state.process_tokens import current_job_token, job_alive
from bbsnap.state.locks import acquire_path


def parse_port_range(text: str) -> range:
    try:
        low_text, high_text = text.split("-", 1)
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise UsageError(f"'{text}' is not a port range", hint="e.g. 2222-2999") from None
    if not 1024 <= low <= high <= 65535:
        raise UsageError(f"port range {text} must lie within 1024-65535")
    return range(low, high + 1)


def port_is_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def choose_port(candidates: range, taken: Iterable[int]) -> int:
    reserved = set(taken)
    for port in candidates:
        if port not in reserved and port_is_bindable(port):
            return port
    raise _no_free_port(candidates)


def _no_free_port(candidates: range) -> ConflictError:
    return ConflictError(
        f"no free port for the SSH forward in {candidates.start}-{candidates.stop - 1}",
        hint="destroy unused servers or widen ssh_ports (BBSNAP_SSH_PORTS)")


# Host-wide claims. A forward's port is bound only while its server runs, and the domains
# that record the others are visible only on their own libvirt connection, so neither the
# kernel nor one connection's domain list knows every port that is spoken for. bbsnap keeps
# a claim file per port in one registry per user: root's is HOST_REGISTRY, shared by every
# data directory and connection root uses; a normal user's is under their XDG state
# directory (they cannot write root's) and also honours the claims in root's. A claim is
# made under the registry's lock, after the ports recorded on the connection and a bind
# test, so two creates in any two data directories never get one port, and a stopped
# server's port stays its own. A claim lapses once its domain is gone from the connection
# it was made on and the process that made it is dead (a finished or crashed create).
# Other users' claims are not seen: ports in use by their running servers fail the bind
# test, their stopped servers' ports are not known.
HOST_REGISTRY = Path("/var/lib/bbsnap-ssh-ports")


@dataclass(frozen=True)
class Claim:
    port: int
    connection: str     # the libvirt URI the domain is defined on
    domain_uuid: str
    job: str            # token of the process that made the claim (alive while it creates)
    data_dir: str = ""  # for people reading the registry


def user_registry() -> tuple[Path, tuple[Path, ...]]:
    """(where this user records claims, registries whose claims it honours too)."""
    if os.geteuid() == 0:
        return HOST_REGISTRY, ()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "bbsnap" / "ssh-ports", (HOST_REGISTRY,)


class PortRegistry:
    """Claims of 127.0.0.1 ports for SSH forwards, shared by every data directory."""

    def __init__(self, directory: Path, connection: str, *, honour: Iterable[Path] = (),
                 lock_timeout: float | None = None) -> None:
        self.directory = directory
        self._connection = connection
        self._honour = tuple(honour)
        self._lock_timeout = lock_timeout

    @classmethod
    def for_this_user(cls, connection: str, lock_timeout: float | None = None) -> PortRegistry:
        directory, honour = user_registry()
        return cls(directory, connection, honour=honour, lock_timeout=lock_timeout)

    def claim(self, candidates: range, *, in_use: Iterable[int],
              live_domains: Callable[[], Iterable[str]], domain_uuid: str,
              data_dir: str = "") -> int:
        """The first port of *candidates* that no domain on the connection records
        (*in_use*), no claim holds and nothing has bound; claimed for *domain_uuid*.
        *live_domains*: lists the UUIDs of every domain on the connection, now."""
        taken = set(in_use) | self._honoured_ports()
        with self._locked():
            claims = self._claims()
            lapsed = self._lapsed(claims, live_domains)
            for port in candidates:
                if port in taken or (port in claims and port not in lapsed):
                    continue
                if port_is_bindable(port):
                    self._write(Claim(port, self._connection, domain_uuid,
                                      current_job_token(), data_dir))
                    return port
        raise _no_free_port(candidates)

    def release(self, port: int, domain_uuid: str) -> None:
        """Drop *domain_uuid*'s claim on *port* (a create that failed gives it back)."""
        with self._locked():
            claim = self._claims().get(port)
            if claim is not None and claim.domain_uuid == domain_uuid:
                self._path(port).unlink(missing_ok=True)

    def claims(self) -> dict[int, Claim]:
        return self._claims()

    def _lapsed(self, claims: dict[int, Claim],
                live_domains: Callable[[], Iterable[str]]) -> set[int]:
        """The claimed ports whose claims no longer hold. The makers are checked first and
        the domains listed after: a maker found dead had defined its domain (if it did)
        before the list is taken. (Listed first, a create finishing in between would look
        dead and domain-less, and lose its port.)"""
        # A domain on another connection cannot be looked for from here: it keeps its port.
        dead = [c for c in claims.values()
                if c.connection == self._connection and not job_alive(c.job)]
        if not dead:
            return set()
        live = set(live_domains())
        return {c.port for c in dead if c.domain_uuid not in live}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        with acquire_path(self.directory / ".lock", timeout=self._lock_timeout,
                          purpose="ssh port claim", busy="another servers create"):
            yield

    def _path(self, port: int) -> Path:
        return self.directory / f"{port}.json"

    def _claims(self) -> dict[int, Claim]:
        return _read_claims(self.directory)

    def _honoured_ports(self) -> set[int]:
        ports: set[int] = set()
        for directory in self._honour:
            if directory != self.directory:
                ports.update(_read_claims(directory))
        return ports

    def _write(self, claim: Claim) -> None:
        """Atomically: a reader sees the old claim or the whole new one. World-readable:
        other users' bbsnap honour root's claims (a claim holds no secret)."""
        data = json.dumps(asdict(claim), sort_keys=True).encode()
        safe_files.write_atomic(self._path(claim.port), data, 0o644)


def _read_claims(directory: Path) -> dict[int, Claim]:
    """The claims in *directory* (none if it does not exist or cannot be read). A file that
    does not parse still holds its port: a claim is never dropped on a guess."""
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    claims = {}
    for name in names:
        stem, dot, ext = name.partition(".")
        if dot and ext == "json" and stem.isascii() and stem.isdigit():
            port = int(stem)
            claims[port] = _read_claim(directory / name, port)
    return claims


def _read_claim(path: Path, port: int) -> Claim:
    try:
        raw = json.loads(path.read_bytes())
        return Claim(port, str(raw["connection"]), str(raw["domain_uuid"]), str(raw["job"]),
                     str(raw.get("data_dir", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return Claim(port, "?", "?", "?")  # unreadable: held (its connection matches none)

"""Image references as container tools write them: ``[host[:port]/]repo/path[:tag][@digest]``.

The first path component is a registry host when it has a dot or a colon or is
``localhost`` (Docker's rule); otherwise the reference is on Docker Hub. Everything is
checked against the distribution spec's grammar here, so nothing unchecked reaches a URL.
"""

from __future__ import annotations

import ipaddress
import re

from bbsnap.errors import UsageError
from bbsnap.lazy_dataclass import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
                   r"(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class Reference:
    host: str            # as written (docker.io for Docker Hub), with the port
    repository: str      # library/debian, team/devbox
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Where the API is served (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def hostname(self) -> str:
        name = self.host.rsplit(":", 1)[0] if not self.host.endswith("]") else self.host
        if self.host.startswith("[") and "]" in self.host:
            name = self.host[1:self.host.index("]")]
        return name

    @property
    def port(self) -> int | None:
        tail = self.host.rsplit("]", 1)[-1]
        return int(tail.rsplit(":", 1)[1]) if ":" in tail else None

    @property
    def loopback(self) -> bool:
        """Served from this machine: plain HTTP is allowed without --insecure."""
        if self.hostname == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.hostname).is_loopback
        except ValueError:
            return False

    @property
    def reference(self) -> str:
        """The manifest reference to ask for: the digest if given, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.host, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse(text: str) -> Reference:
    """The reference *text*; UsageError (exit 2) for anything not of the grammar."""
    original = text
    if not text or len(text) > 1024 or any(ch.isspace() or ord(ch) < 32 for ch in text):
        raise UsageError(f"{original!r} is not an image reference",
                         hint="write it like registry.example.com/team/devbox:tag")
    if "://" in text:
        raise UsageError(f"{original!r} is not an image reference: give no scheme",
                         hint="write host/repository:tag; --insecure allows plain HTTP")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.match(digest):
            raise UsageError(f"{digest!r} in {original!r} is not a sha256 digest")
    host, _, rest = text.partition("/")
    if not rest or not ("." in host or ":" in host or host == "localhost"):
        host, rest = DOCKER_HUB, text
    if not _HOST.match(host):
        raise UsageError(f"{host!r} in {original!r} is not a registry host")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.match(tag):
            raise UsageError(f"{tag!r} in {original!r} is not a valid tag",
                             hint="up to 128 letters, digits, '_', '.', '-'")
    components = rest.split("/")
    if not all(_COMPONENT.match(c) for c in components) or len(rest) > 255:
        raise UsageError(f"{rest!r} in {original!r} is not a repository name",
                         hint="lowercase letters, digits and . _ - separators, '/' between parts")
    if host == DOCKER_HUB and len(components) == 1:
        rest = f"library/{rest}"
    if tag is None and digest is None:
        tag = "latest"
    return Reference(host, rest, tag, digest)

"""The one error hierarchy of bbsnap.

Every error a user can see is a :class:`BbsnapError`; each class carries the exit
code of DESIGN §6 so the CLI's single catch point can map it without a table.
Messages say what failed and, where it helps, what to do next.
"""

from __future__ import annotations


class BbsnapError(Exception):
    """Base of every bbsnap failure. Exit code 1."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(BbsnapError):
    """The command line or an option value is wrong. Exit code 2."""

    exit_code = 2


class NotFoundError(BbsnapError):
    """A named image, server, file or type does not exist. Exit code 3."""

    exit_code = 3


class ConflictError(BbsnapError):
    """The object is in a state that forbids the operation. Exit code 4."""

    exit_code = 4


class InUseError(ConflictError):
    """Something still depends on the object (images, servers)."""


class InvalidInputError(BbsnapError):
    """Input data (an image file, a checksum, user-data) is refused. Exit code 1."""


class HostileImageError(InvalidInputError):
    """An image file that could read host files or exhaust resources."""


class ChecksumMismatchError(InvalidInputError):
    """The data's digest is not the one the user asked for."""


class ExternalCommandError(BbsnapError):
    """A subprocess (qemu-img, apt-get ...) failed or timed out."""

    def __init__(self, message: str, *, argv: list[str] | None = None,
                 returncode: int | None = None, stderr: str = "",
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.argv = argv or []
        self.returncode = returncode
        self.stderr = stderr


class HypervisorError(BbsnapError):
    """libvirt or QEMU refused or failed an operation."""


class QuiesceError(HypervisorError):
    """The guest agent could not freeze the guest's filesystems (absent, silent, refused)."""


class GuestAgentSilentError(QuiesceError):
    """The guest's agent channel exists but nothing answered on it: no agent connected, or
    a hung one that let the timeout pass (libvirt's VIR_ERR_AGENT_UNRESPONSIVE). Asked
    again within the same snapshot, it would say the same, a hung one only after the
    timeout once more."""


class GuestAgentError(HypervisorError):
    """The guest agent did not answer a question (absent, silent, refused, domain stopped)."""


class CheckpointBrokenError(HypervisorError):
    """A checkpoint's dirty bitmap can't be trusted (QEMU died without storing it)."""


class CatalogueError(BbsnapError):
    """The SQLite catalogue could not be read or written."""


class CataloguePathError(CatalogueError):
    """A catalogue row names a file outside the data directory's images/ (refused, not used)."""


class RegistryError(BbsnapError):
    """An OCI registry refused a request, failed, or could not be reached."""


class RegistryAuthError(RegistryError):
    """The registry wants credentials that were not given or were refused."""

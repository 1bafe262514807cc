"""Choosing QEMU's accelerator: kvm only when it really runs guests, else tcg.

On some hosts ``/dev/kvm`` exists but guests hang under it (nested KVM), so its
existence proves nothing. The probe boots a 512-byte boot sector under
``-accel kvm`` that writes to QEMU's isa-debug-exit port; QEMU then exits with
a known status. Anything else within the time limit means KVM is not usable.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import proc
from .errors import ExternalCommandError, NotFoundError, UsageError

# mov al, 0x2a ; out 0xf4, al ; hlt ; jmp short -1   -> QEMU exits with (0x2a << 1) | 1
_BOOT_CODE = bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
_EXPECTED_EXIT = (0x2A << 1) | 1
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class AccelProbe:
    kvm_usable: bool
    reason: str


def _boot_sector() -> bytes:
    return _BOOT_CODE + bytes(510 - len(_BOOT_CODE)) + b"\x55\xaa"


def probe_kvm(timeout: float = PROBE_TIMEOUT) -> AccelProbe:
    if not os.path.exists("/dev/kvm"):
        return AccelProbe(False, "/dev/kvm does not exist")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelProbe(False, "/dev/kvm is not accessible to this user")
    with tempfile.TemporaryDirectory(prefix="bbsnap-kvm-probe-") as tmp:
        disk = Path(tmp) / "boot.img"
        disk.write_bytes(_boot_sector())
        argv = ["qemu-system-x86_64", "-accel", "kvm", "-machine", "pc", "-m", "16",
                "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01",
                "-drive", f"file={disk},format=raw,if=ide"]
        try:
            result = proc.run(argv, timeout=timeout, check=False)
        except ExternalCommandError:
            return AccelProbe(False, f"a KVM guest did not run within {timeout:g} s "
                                     "(nested KVM that cannot boot guests?)")
        except NotFoundError:
            return AccelProbe(False, "qemu-system-x86_64 is not installed")
    if result.returncode == _EXPECTED_EXIT:
        return AccelProbe(True, "a test guest ran under KVM")
    detail = result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
    return AccelProbe(False, f"QEMU could not run a KVM guest: {detail[0]}")


def resolve_accel(setting: str, probe: AccelProbe | None = None) -> str:
    """'kvm' or 'tcg' for a setting of auto/kvm/tcg (auto probes unless given a probe)."""
    if setting in ("kvm", "tcg"):
        return setting
    if setting != "auto":
        raise UsageError(f"acceleration '{setting}' is not one of auto, kvm, tcg")
    return "kvm" if (probe or probe_kvm()).kvm_usable else "tcg"


def main() -> None:
    probe = probe_kvm()
    if probe.kvm_usable:
        print(f"acceleration: kvm usable ({probe.reason}); auto will use kvm")
    else:
        print(f"acceleration: tcg (KVM not usable: {probe.reason}); "
              "auto will use tcg; force with --accel or BBSNAP_ACCEL")


if __name__ == "__main__":
    main()

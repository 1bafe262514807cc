"""Choosing QEMU's accelerator: kvm only when it really runs guests, else tcg.

On some hosts ``/dev/kvm`` exists but guests fail under it (seen here: a
paravirtual KVM module that cannot emulate a protected-mode interrupt, so a
guest's bootloader dies with "KVM internal error ... emulation failure" and
QEMU hangs). The file's existence, and even a real-mode boot sector, prove
nothing. The probe boots a 512-byte boot sector that enters 32-bit protected
mode, takes a software interrupt through an IDT gate and returns with
``iret`` (what bootloaders and kernels do early), then writes to QEMU's
isa-debug-exit port so QEMU exits with a known status. Anything else within
the time limit means KVM is not usable here.
"""

from __future__ import annotations

import os
import select
import subprocess
import tempfile
import time
from pathlib import Path

from bbsnap import proc
from bbsnap.errors import NotFoundError, UsageError
from bbsnap.lazy_dataclass import dataclass

# Assembled from this (GNU as --32, objcopy -O binary); trailing zeros omitted:
#   cli; xor ax,ax; mov ds,ax; lgdt [gdtr]; set CR0.PE; ljmp 0x08:pm
#   pm: load 0x10 data segments, esp=0x7000; lidt [idtr]; int 0x20  (gate -> iret)
#       mov al,0x2a; out 0xf4,al; hlt loop       -> QEMU exits with (0x2a << 1) | 1
_PROBE_CODE = bytes.fromhex(
    "fa31c08ed80f0116587c0f20c06683c8010f22c0ea197c080066b810008ed88ed08ec0bc0070"
    "00000f011d667d0000cd20b02ae6f4f4ebfdcf8db426000000000000000000000000ffff0000"
    "009acf00ffff00000092cf001700407c")
_PROBE_IDT = 0x5E  # the IDT starts here in the sector (its base in IDTR is 0x7c5e)
_PROBE_IDT_GATE_0X20 = bytes.fromhex("387c0800008e0000")  # handler 0x7c38, selector 0x08, 32-bit gate
_PROBE_IDTR = bytes.fromhex("07015e7c")
_EXPECTED_EXIT = (0x2A << 1) | 1
PROBE_TIMEOUT = 15.0


@dataclass(frozen=True)
class AccelProbe:
    usable: bool
    reason: str


def _boot_sector() -> bytes:
    sector = bytearray(512)
    sector[:len(_PROBE_CODE)] = _PROBE_CODE
    idt_gate = _PROBE_IDT + 0x20 * 8
    sector[idt_gate:idt_gate + 8] = _PROBE_IDT_GATE_0X20
    sector[idt_gate + 8:idt_gate + 12] = _PROBE_IDTR
    sector[510:] = b"\x55\xaa"
    return bytes(sector)


def probe_kvm(timeout: float = PROBE_TIMEOUT, accel: str = "kvm") -> AccelProbe:
    """Does a protected-mode guest run under *accel*? (``tcg`` checks the probe itself.)"""
    if accel == "kvm" and not os.path.exists("/dev/kvm"):
        return AccelProbe(False, "/dev/kvm does not exist")
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelProbe(False, "/dev/kvm is not accessible to this user")
    with tempfile.TemporaryDirectory(prefix="bbsnap-kvm-probe-") as tmp:
        disk = Path(tmp) / "boot.img"
        disk.write_bytes(_boot_sector())
        argv = ["qemu-system-x86_64", "-accel", accel, "-machine", "pc", "-m", "16",
                "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01",
                "-drive", f"file={disk},format=raw,if=ide"]
        return _run_probe(argv, timeout, accel)


def _run_probe(argv: list[str], timeout: float, accel: str) -> AccelProbe:
    """Run QEMU; stop early when it reports a KVM internal error (it would hang, paused)."""
    try:
        child = proc.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except NotFoundError:
        return AccelProbe(False, "qemu-system-x86_64 is not installed")
    assert child.stderr is not None
    stderr = b""
    deadline = time.monotonic() + timeout
    try:
        while child.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return AccelProbe(False, f"a {accel} test guest did not finish within {timeout:g} s")
            ready, _, _ = select.select([child.stderr], [], [], min(remaining, 0.5))
            if ready:
                stderr += os.read(child.stderr.fileno(), 4096)
                if b"KVM internal error" in stderr:
                    return AccelProbe(False, "KVM cannot run a protected-mode guest here "
                                             "(KVM internal error: emulation failure)")
        stderr += child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stderr.close()
    if child.returncode == _EXPECTED_EXIT:
        return AccelProbe(True, f"a protected-mode test guest ran under {accel}")
    lines = stderr.decode(errors="replace").strip().splitlines()
    return AccelProbe(False, f"QEMU could not run a KVM guest: {lines[-1] if lines else child.returncode}")


def resolve_accel(setting: str, probe: AccelProbe | None = None) -> str:
    """'kvm' or 'tcg' for a setting of auto/kvm/tcg (auto probes unless given a probe)."""
    if setting in ("kvm", "tcg"):
        return setting
    if setting != "auto":
        raise UsageError(f"acceleration '{setting}' is not one of auto, kvm, tcg")
    return "kvm" if (probe or probe_kvm()).usable else "tcg"


def cached_probe(cache_file: Path) -> AccelProbe:
    """The KVM verdict, probed once per host boot and QEMU binary (the probe costs seconds)."""
    import json
    import shutil

    from bbsnap.state.process_tokens import boot_id

    binary = shutil.which("qemu-system-x86_64") or ""
    stamp = f"{boot_id()}:{binary}:{os.stat(binary).st_mtime if binary else 0}"
    try:
        saved = json.loads(cache_file.read_text())
        if saved.get("stamp") == stamp:
            return AccelProbe(bool(saved["usable"]), str(saved["reason"]))
    except (OSError, ValueError, KeyError):
        pass
    probe = probe_kvm()
    try:
        cache_file.write_text(json.dumps({"stamp": stamp, "usable": probe.usable,
                                          "reason": probe.reason}))
    except OSError:
        pass  # a read-only data directory just means probing again next time
    return probe


def main() -> None:
    probe = probe_kvm()
    if probe.usable:
        print(f"acceleration: kvm usable ({probe.reason}); auto will use kvm")
    else:
        print(f"acceleration: tcg (KVM not usable: {probe.reason}); "
              "auto will use tcg; force with --accel or BBSNAP_ACCEL")


if __name__ == "__main__":
    main()

"""The kernel package's share of the guest: its vmlinuz, and the modules /init
loads (with their dependencies, in load order) copied into the initramfs.
"""

from __future__ import annotations

from pathlib import Path

from bbsnap.errors import BbsnapError
from bbsnap.proc import run, which
from bbsnap.tinyguest.debpkg import Package
from bbsnap.tinyguest.initramfs import Initramfs

# Wanted modules, in the order they should load; each one's dependencies (from
# modules.dep) are loaded before it. Built-in ones (modules.builtin) are skipped.
# ata_piix + sr_mod + isofs: the seed is an IDE CD-ROM on i440fx (Debian's cloud
# kernel has no AHCI); virtio_scsi: a seed CD on q35; button + evdev: ACPI
# power button, so libvirt's plain shutdown works.
WANTED_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_scsi",
    "ata_piix", "sr_mod", "isofs", "button", "evdev",
)


def add_kernel_modules(initramfs: Initramfs,
                       package: Package) -> tuple[str, Path, dict[str, list[str]]]:
    """Add the wanted modules; return (release, vmlinuz, {"load_order", "builtin"})."""
    vmlinuz = sorted((package.root / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise BbsnapError(f"expected one kernel in {package.name}, found {len(vmlinuz)}")
    release = vmlinuz[0].name.removeprefix("vmlinuz-")
    moddir = _modules_dir(package.root, release)
    deps = _modules_dep(package.root, moddir, release)
    builtin = _builtin_modules(moddir)
    order, skipped = module_load_order(WANTED_MODULES, deps, builtin)
    for rel in order:
        initramfs.add(f"lib/modules/{release}/{rel}", (moddir / rel).read_bytes())
    return release, vmlinuz[0], {"load_order": order, "builtin": skipped}


def module_load_order(wanted: tuple[str, ...], deps: dict[str, list[str]],
                      builtin: set[str]) -> tuple[list[str], list[str]]:
    """Module files to insmod, dependencies first; and the wanted ones built in."""
    by_name = {_module_name(path): path for path in deps}
    order: list[str] = []
    skipped: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        elif name in builtin:
            skipped.append(name)
        else:
            raise BbsnapError(f"kernel module '{name}' is neither built in nor shipped "
                              "by the kernel package")
    return order, skipped


def _modules_dir(root: Path, release: str) -> Path:
    for base in ("lib/modules", "usr/lib/modules"):
        if (root / base / release).is_dir():
            return root / base / release
    raise BbsnapError(f"no modules directory for kernel {release}")


def _modules_dep(root: Path, moddir: Path, release: str) -> dict[str, list[str]]:
    """modules.dep as {module file: its dependency files}.

    Debian generates modules.dep in the postinst, so the extracted package has
    none: depmod -b builds it inside our work tree.
    """
    dep_file = moddir / "modules.dep"
    if not dep_file.exists():
        # depmod -b ROOT looks in ROOT/lib/modules/RELEASE, where Debian 12 ships them.
        run([which("depmod"), "-b", str(root), release], timeout=300)
    if not dep_file.exists():
        raise BbsnapError(f"depmod did not produce {dep_file}")
    deps: dict[str, list[str]] = {}
    for line in dep_file.read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name.strip()] = rest.split()
    return deps


def _builtin_modules(moddir: Path) -> set[str]:
    builtin = moddir / "modules.builtin"
    lines = builtin.read_text().splitlines() if builtin.exists() else []
    return {_module_name(line) for line in lines if line.strip()}


def _module_name(path: str) -> str:
    """kernel/drivers/block/virtio_blk.ko -> virtio_blk (dashes are underscores)."""
    return Path(path).name.split(".ko")[0].replace("-", "_")

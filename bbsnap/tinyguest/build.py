"""Build the tiny real test guest: a BIOS-bootable qcow2 made from Debian packages.

Everything comes from ``apt-get download`` + ``dpkg-deb -x`` into a throw-away
work directory (nothing is installed on the host): Debian's cloud kernel, a
static busybox, and ``qemu-ga`` with its shared libraries. The libraries are
taken from the Debian packages qemu-guest-agent depends on, followed only as far
as an unresolved ``DT_NEEDED`` requires, rather than from the host's /lib: the
image then depends on the package versions alone, not on what this host has
installed. The disk is assembled without loop devices or mounts (these machines
may have neither): sfdisk + mtools on a raw file, syslinux installed at an
offset, then ``qemu-img convert`` to qcow2.

The result is cached per machine under a key that hashes /init, the exact
package versions and :data:`BUILDER_VERSION`; a build happens in a temp
directory that is renamed into place, so a killed build leaves no half image.
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

from ..errors import BbsnapError, ExternalCommandError, NotFoundError
from ..proc import run, which
from .counter import COUNTER_SECTOR

# Bump whenever the image would come out different for the same inputs.
BUILDER_VERSION = 1

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"

IMAGE_NAME = "tiny-guest.qcow2"
MANIFEST_NAME = "manifest.json"
DISK_SIZE = 128 * 1024 * 1024
PARTITION_START = 1024 * 1024        # sector 2048; the counter lives below it
SECTOR = 512
MBR_CODE_SIZE = 440                  # boot code before the disk signature/table
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
KERNEL_CMDLINE = "console=ttyS0,115200 panic=0"

# Wanted modules, in the order they should load; each one's dependencies (from
# modules.dep) are loaded before it. Built-in ones (modules.builtin) are skipped.
# ata_piix + sr_mod + isofs: the seed is an IDE CD-ROM on i440fx (Debian's cloud
# kernel has no AHCI); virtio_scsi: a seed CD on q35; button + evdev: ACPI
# power button, so libvirt's plain shutdown works.
WANTED_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_scsi",
    "ata_piix", "sr_mod", "isofs", "button", "evdev",
)

LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
GUEST_LIB_DIR = "lib/x86_64-linux-gnu"
MAX_LIB_ROUNDS = 6

Progress = Callable[[str], None]


# --- cache ---------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$BBSNAP_CACHE``; else /var/cache/bbsnap for root; else the XDG cache dir."""
    env = os.environ.get("BBSNAP_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/bbsnap")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "bbsnap"


def guest_root(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "tiny-guest"


def init_script() -> bytes:
    return resources.files(__package__).joinpath("init.sh").read_bytes()


def cache_key(versions: dict[str, str]) -> str:
    blob = json.dumps({"builder": BUILDER_VERSION,
                       "init": hashlib.sha256(init_script()).hexdigest(),
                       "packages": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def image_path(cache_dir: Path | None = None, versions: dict[str, str] | None = None) -> Path:
    """Where the image for the current package versions is (or would be) cached."""
    versions = versions if versions is not None else resolve_versions()
    return guest_root(cache_dir) / cache_key(versions) / IMAGE_NAME


def build_tiny_guest(cache_dir: Path | None = None, *, force: bool = False,
                     progress: Progress | None = None) -> Path:
    """Path of the cached tiny guest qcow2, building it first when needed."""
    say = progress or (lambda _msg: None)
    versions = resolve_versions()
    final = image_path(cache_dir, versions)
    if final.exists() and not force:
        return final
    root = final.parent.parent
    _mkdir(root)
    with _build_lock(root):
        # Another process may have finished the same build while we waited.
        if final.exists() and not force:
            return final
        _remove_stale_work_dirs(root)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            _build_into(work / "out", work, versions, say)
            _publish(work / "out", final.parent)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say(f"tiny guest ready: {final}")
    return final


@dataclass
class _Lock:
    fd: int

    def __enter__(self) -> "_Lock":
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *_exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _build_lock(root: Path) -> _Lock:
    """One builder per cache at a time; the lock dies with its process."""
    return _Lock(os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644))


def _remove_stale_work_dirs(root: Path) -> None:
    # Holding the lock, any .tmp-* left is from a killed build.
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _publish(out: Path, target: Path) -> None:
    """Move a finished build into place; a forced rebuild retires the old one."""
    os.chmod(out, 0o755)   # QEMU's user must reach a backing file in here
    if target.exists():
        retired = target.with_name(f".old-{target.name}-{os.getpid()}")
        target.rename(retired)
        shutil.rmtree(retired, ignore_errors=True)
    out.rename(target)


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(path, 0o755)
    except PermissionError:
        pass  # a shared parent we do not own: leave it as it is


# --- package versions ----------------------------------------------------------------

def resolve_versions() -> dict[str, str]:
    """Exact candidate versions of the real packages the image is built from.

    Memoised per process: without apt's binary cache every apt-cache run parses
    all package lists (~0.5 s here), and the lists do not change under us.
    """
    return dict(_resolve_versions_once())


@functools.lru_cache(maxsize=1)
def _resolve_versions_once() -> tuple[tuple[str, str], ...]:
    shown = _apt_show([KERNEL_METAPACKAGE, BUSYBOX_PACKAGE, AGENT_PACKAGE])
    kernel_pkg = _kernel_package(shown[KERNEL_METAPACKAGE].get("Depends", ""))
    shown.update(_apt_show([kernel_pkg]))
    return tuple((name, _version(shown[name], name))
                 for name in (kernel_pkg, BUSYBOX_PACKAGE, AGENT_PACKAGE))


def _apt_show(packages: list[str]) -> dict[str, dict[str, str]]:
    """Candidate control fields of *packages*, by name (one apt-cache run)."""
    result = run([which("apt-cache"), "show", "--no-all-versions", *packages],
                 timeout=120, check=False)
    shown = {fields.get("Package", ""): fields for fields in _control_stanzas(result.stdout)}
    missing = [name for name in packages if name not in shown]
    if missing:
        raise NotFoundError(f"Debian package(s) {', '.join(missing)} not known to apt",
                            hint="run apt-get update (the tiny guest is built from "
                                 "Debian 12 packages)")
    return shown


def _control_stanzas(text: str) -> list[dict[str, str]]:
    """Control-file text as one {field: value} per stanza (continuations joined)."""
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines() + [""]:
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, last = {}, ""
        elif line[0] in " \t" and last:
            fields[last] += " " + line.strip()
        elif ":" in line:
            last, _, value = line.partition(":")
            fields[last] = value.strip()
    return stanzas


def _version(fields: dict[str, str], package: str) -> str:
    version = fields.get("Version")
    if not version:
        raise BbsnapError(f"apt shows no version for '{package}'")
    return version


def _kernel_package(depends: str) -> str:
    """The versioned linux-image-*-cloud-amd64 the metapackage depends on."""
    for name in _dependency_names(depends):
        if re.fullmatch(r"linux-image-[0-9].*-cloud-amd64", name):
            return name
    raise BbsnapError(f"cannot find the kernel package behind {KERNEL_METAPACKAGE}",
                      hint=f"its Depends are: {depends or 'empty'}")


def _dependency_names(depends: str) -> list[str]:
    """Package names of a Depends field (first alternative, no versions/arch)."""
    names = []
    for clause in depends.split(","):
        first = clause.split("|")[0].strip()
        name = first.split(" ")[0].split("(")[0].split(":")[0].strip()
        if name:
            names.append(name)
    return names


def _download(specs: list[str], dest: Path) -> list[Path]:
    """``apt-get download`` *specs* (``name`` or ``name=version``) into *dest*."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    argv = [which("apt-get"), "download", "-q"]
    if os.geteuid() == 0:
        # apt drops to user _apt, which cannot write our private temp dir.
        argv += ["-o", "APT::Sandbox::User=root"]
    try:
        run(argv + specs, timeout=900, cwd=dest)
    except ExternalCommandError as exc:
        exc.hint = "the tiny guest needs Debian 12 packages: check apt sources / apt-get update"
        raise
    return sorted(set(dest.glob("*.deb")) - before)


def _extract(deb: Path, root: Path) -> dict[str, str]:
    """Unpack *deb* under *root*; return its control fields."""
    root.mkdir(parents=True, exist_ok=True)
    run([which("dpkg-deb"), "-x", str(deb), str(root)], timeout=300)
    stanzas = _control_stanzas(run([which("dpkg-deb"), "-f", str(deb)], timeout=60).stdout)
    if not stanzas:
        raise BbsnapError(f"{deb.name} has no control fields")
    return stanzas[0]


@dataclass
class _Package:
    name: str
    version: str
    root: Path
    depends: list[str]


def _fetch(specs: list[str], work: Path) -> list[_Package]:
    packages = []
    for deb in _download(specs, work / "debs"):
        root = work / "pkgs" / deb.name.split("_")[0]
        control = _extract(deb, root)
        packages.append(_Package(control["Package"], control["Version"], root,
                                 _dependency_names(control.get("Depends", "")
                                                   + "," + control.get("Pre-Depends", ""))))
    return packages


# --- the build -----------------------------------------------------------------------

@dataclass
class _Initramfs:
    """Files of the initramfs, by path inside it (no leading slash)."""

    files: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    chardevs: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.files[path.lstrip("/")] = (mode, data)


def _build_into(out: Path, work: Path, versions: dict[str, str], say: Progress) -> None:
    started = time.monotonic()
    out.mkdir()
    say("downloading " + ", ".join(f"{n} {v}" for n, v in versions.items()))
    fetched = {p.name: p for p in _fetch([f"{n}={v}" for n, v in versions.items()], work)}
    kernel_pkg = next(p for n, p in fetched.items() if n.startswith("linux-image-"))
    initramfs = _Initramfs()
    initramfs.add("init", init_script(), 0o755)
    initramfs.chardevs["dev/console"] = (5, 1)   # the kernel opens it before /init runs
    _add_busybox(initramfs, fetched[BUSYBOX_PACKAGE])
    say("resolving kernel modules")
    release, vmlinuz, modules = _add_kernel_modules(initramfs, kernel_pkg)
    say("resolving qemu-ga libraries")
    libs = _add_agent(initramfs, fetched[AGENT_PACKAGE], work, say)
    initramfs.add("etc/bbsnap-tiny.conf", _guest_config(release, modules["load_order"]))
    say("writing initramfs")
    initrd = work / "initrd.gz"
    initrd.write_bytes(gzip.compress(_cpio_newc(initramfs), compresslevel=9, mtime=0))
    say("making the boot disk")
    _make_boot_disk(work, vmlinuz, initrd, out / IMAGE_NAME)
    manifest = {"builder_version": BUILDER_VERSION, "cache_key": cache_key(versions),
                "packages": versions, "kernel_release": release, "modules": modules,
                "agent_libraries": libs, "kernel_cmdline": KERNEL_CMDLINE,
                "build_seconds": round(time.monotonic() - started, 1)}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _guest_config(release: str, load_order: list[str]) -> bytes:
    lines = [f"KERNEL_RELEASE='{release}'",
             f"COUNTER_SECTOR={COUNTER_SECTOR}",
             "MODULES='" + " ".join(load_order) + "'"]
    return ("\n".join(lines) + "\n").encode()


def _add_busybox(initramfs: _Initramfs, package: _Package) -> None:
    binary = _find_one(package.root, ("bin/busybox", "usr/bin/busybox"))
    initramfs.add("bin/busybox", binary.read_bytes(), 0o755)
    initramfs.symlinks["bin/sh"] = "busybox"   # the rest are made by --install at boot


def _find_one(root: Path, candidates: tuple[str, ...]) -> Path:
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    raise BbsnapError(f"none of {', '.join(candidates)} in the extracted package at {root}")


# --- kernel and modules ------------------------------------------------------------------

def _add_kernel_modules(initramfs: _Initramfs,
                        package: _Package) -> tuple[str, Path, dict[str, list[str]]]:
    vmlinuz = sorted((package.root / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise BbsnapError(f"expected one kernel in {package.name}, found {len(vmlinuz)}")
    release = vmlinuz[0].name.removeprefix("vmlinuz-")
    moddir = _modules_dir(package.root, release)
    deps = _modules_dep(package.root, moddir, release)
    builtin = _builtin_modules(moddir)
    order, skipped = _module_load_order(WANTED_MODULES, deps, builtin)
    for rel in order:
        initramfs.add(f"lib/modules/{release}/{rel}", (moddir / rel).read_bytes())
    return release, vmlinuz[0], {"load_order": order, "builtin": skipped}


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


def _module_load_order(wanted: tuple[str, ...], deps: dict[str, list[str]],
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


# --- qemu-ga and its libraries ---------------------------------------------------------

def _add_agent(initramfs: _Initramfs, agent: _Package, work: Path,
               say: Progress) -> dict[str, str]:
    """Add qemu-ga, its ELF interpreter and libraries; return {soname: package=version}."""
    binary = _find_one(agent.root, ("usr/sbin/qemu-ga", "usr/bin/qemu-ga", "sbin/qemu-ga"))
    packages = {agent.name: agent}
    for _round in range(MAX_LIB_ROUNDS):
        found, missing = _resolve_libraries(binary, agent.name, packages)
        if not missing:
            break
        wanted = _packages_to_fetch(missing, packages)
        if not wanted:
            raise BbsnapError("qemu-ga needs libraries no dependency provides: "
                              + ", ".join(sorted(missing)))
        say("fetching qemu-ga dependencies: " + ", ".join(wanted))
        for package in _fetch(wanted, work):
            packages[package.name] = package
    else:
        raise BbsnapError("could not resolve qemu-ga's libraries: " + ", ".join(sorted(missing)))
    initramfs.add("usr/sbin/qemu-ga", binary.read_bytes(), 0o755)
    interp = _elf_dynamic(binary)[1]
    libs = {}
    for soname, (path, owner) in sorted(found.items()):
        dest = interp.lstrip("/") if interp and Path(interp).name == soname \
            else f"{GUEST_LIB_DIR}/{soname}"
        initramfs.add(dest, path.read_bytes(), 0o755)
        libs[soname] = f"{owner}={packages[owner].version}"
    return libs


def _packages_to_fetch(missing: dict[str, str], packages: dict[str, _Package]) -> list[str]:
    """Dependencies of the needers that may provide the *missing* sonames.

    Debian names library packages after the soname (libpcre2-8.so.0 ->
    libpcre2-8-0); when that name is among the needer's Depends only it is
    fetched, otherwise all of the needer's Depends are (libglib-2.0.so.0 lives
    in libglib2.0-0, libm.so.6 in libc6).
    """
    wanted: set[str] = set()
    for soname, needer in missing.items():
        depends = [dep for dep in packages[needer].depends if dep not in packages]
        guess = _package_for_soname(soname)
        wanted.update([guess] if guess in depends else depends)
    return sorted(wanted)


def _package_for_soname(soname: str) -> str:
    stem, _, version = soname.partition(".so.")
    return f"{stem}-{version}" if stem[-1:].isdigit() else f"{stem}{version}"


def _resolve_libraries(binary: Path, owner: str, packages: dict[str, _Package]
                       ) -> tuple[dict[str, tuple[Path, str]], dict[str, str]]:
    """Walk DT_NEEDED from *binary*: ({soname: (file, package)}, {missing soname: needer})."""
    found: dict[str, tuple[Path, str]] = {}
    missing: dict[str, str] = {}
    needed, interp = _elf_dynamic(binary)
    queue = [(soname, owner) for soname in needed]
    if interp:
        queue.append((Path(interp).name, owner))
    while queue:
        soname, needer = queue.pop()
        if soname in found or soname in missing:
            continue
        hit = _find_library(soname, packages)
        if hit is None:
            missing[soname] = needer
            continue
        found[soname] = hit
        queue.extend((dep, hit[1]) for dep in _elf_dynamic(hit[0])[0])
    return found, missing


def _find_library(soname: str, packages: dict[str, _Package]) -> tuple[Path, str] | None:
    for package in packages.values():
        for libdir in LIB_DIRS:
            real = _resolve_in_root(package.root, f"{libdir}/{soname}")
            if real is not None and real.is_file():
                return real, package.name
    return None


def _resolve_in_root(root: Path, rel: str, depth: int = 0) -> Path | None:
    """Follow symlinks of an extracted tree without escaping to the host's files."""
    path = root / rel
    if depth > 16 or not (path.is_symlink() or path.exists()):
        return None
    if not path.is_symlink():
        return path
    target = os.readlink(path)
    if target.startswith("/"):
        return _resolve_in_root(root, target.lstrip("/"), depth + 1)
    return _resolve_in_root(root, os.path.normpath(str(Path(rel).parent / target)), depth + 1)


def _elf_dynamic(path: Path) -> tuple[list[str], str | None]:
    """(DT_NEEDED sonames, PT_INTERP) of a little-endian ELF64 file.

    Read from the program headers, which stripping keeps; no binutils needed.
    """
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BbsnapError(f"{path.name} is not a little-endian 64-bit ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    headers = [struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    interp = None
    dynamic: tuple[int, int] | None = None
    loads = []
    for p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz in headers:
        if p_type == 3:    # PT_INTERP
            interp = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
        elif p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
    if dynamic is None:
        return [], interp
    return _needed(data, dynamic, loads), interp


def _needed(data: bytes, dynamic: tuple[int, int], loads: list[tuple[int, int, int]]
            ) -> list[str]:
    offsets, strtab = [], None
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == 0:       # DT_NULL
            break
        if tag == 1:       # DT_NEEDED: offset into the string table
            offsets.append(value)
        elif tag == 5:     # DT_STRTAB: a virtual address
            strtab = _vaddr_to_offset(value, loads)
    if strtab is None:
        return []
    return [data[strtab + off:data.index(b"\0", strtab + off)].decode() for off in offsets]


def _vaddr_to_offset(vaddr: int, loads: list[tuple[int, int, int]]) -> int:
    for p_vaddr, p_offset, p_filesz in loads:
        if p_vaddr <= vaddr < p_vaddr + p_filesz:
            return vaddr - p_vaddr + p_offset
    raise BbsnapError("ELF string table outside every loaded segment")


# --- initramfs (newc cpio) ---------------------------------------------------------------

def _cpio_newc(initramfs: _Initramfs) -> bytes:
    """A newc archive, written here so that ownership is root and /dev/console can
    be a device node without the builder being root (and output is reproducible)."""
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    paths = list(initramfs.files) + list(initramfs.symlinks) + list(initramfs.chardevs)
    for path in paths:
        for parent in _parents(path):
            entries.setdefault(parent, (0o040755, b"", (0, 0)))
    for path, (mode, data) in initramfs.files.items():
        entries[path] = (0o100000 | mode, data, (0, 0))
    for path, target in initramfs.symlinks.items():
        entries[path] = (0o120777, target.encode(), (0, 0))
    for path, rdev in initramfs.chardevs.items():
        entries[path] = (0o020600, b"", rdev)
    out = bytearray()
    for ino, path in enumerate(sorted(entries, key=lambda p: p.split("/")), start=1):
        mode, data, rdev = entries[path]
        out += _cpio_entry(path, ino, mode, data, rdev)
    out += _cpio_entry("TRAILER!!!", 0, 0, b"", (0, 0))
    return bytes(out)


def _parents(path: str) -> Iterator[str]:
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])


def _cpio_entry(name: str, ino: int, mode: int, data: bytes, rdev: tuple[int, int]) -> bytes:
    encoded = name.encode() + b"\0"
    nlink = 2 if mode & 0o170000 == 0o040000 else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    return _pad4(header + encoded) + _pad4(data)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


# --- the boot disk ---------------------------------------------------------------------

def _make_boot_disk(work: Path, vmlinuz: Path, initrd: Path, out: Path) -> None:
    """MBR + FAT16 partition with syslinux, kernel and initramfs; then qcow2."""
    raw = work / "disk.raw"
    with raw.open("wb") as handle:
        handle.truncate(DISK_SIZE)
    _partition(raw)
    target = f"{raw}@@{PARTITION_START}"
    # mtools refuses geometries that do not divide the size evenly; we give LBA sizes.
    mtools_env = {"MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}
    part_sectors = (DISK_SIZE - PARTITION_START) // SECTOR
    run([which("mformat"), "-i", target, "-T", str(part_sectors), "-h", "64", "-s", "32",
         "-H", str(PARTITION_START // SECTOR), "-v", "BBSNAPTINY", "-N", "bb5a0001", "::"],
        env=mtools_env, timeout=120)
    config = work / "syslinux.cfg"
    config.write_text(_syslinux_cfg())
    for source, name in ((config, "syslinux.cfg"), (vmlinuz, "vmlinuz"), (initrd, "initrd.gz")):
        run([which("mcopy"), "-i", target, str(source), f"::/{name}"],
            env=mtools_env, timeout=120)
    run([which("syslinux"), "--offset", str(PARTITION_START), "--install", str(raw)],
        env=mtools_env, timeout=120)
    _write_mbr_code(raw)
    partial = out.with_name(out.name + ".partial")
    run([which("qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
         str(partial)], timeout=600)
    os.chmod(partial, 0o644)
    partial.rename(out)


def _partition(raw: Path) -> None:
    start = PARTITION_START // SECTOR
    # type e = FAT16 (LBA), the filesystem mformat makes at this size; bootable so
    # syslinux's mbr.bin chains to it.
    script = ("label: dos\nlabel-id: 0xbb5a0001\nunit: sectors\n\n"
              f"start={start}, type=e, bootable\n")
    run([which("sfdisk"), "--no-reread", "--no-tell-kernel", "-q", str(raw)],
        input_text=script, timeout=60)


def _syslinux_cfg() -> str:
    return ("DEFAULT tiny\nPROMPT 0\nTIMEOUT 0\n"
            "LABEL tiny\n  LINUX /vmlinuz\n  INITRD /initrd.gz\n"
            f"  APPEND {KERNEL_CMDLINE}\n")


def _write_mbr_code(raw: Path) -> None:
    """Syslinux's MBR boot code into sector 0, keeping the partition table."""
    if not SYSLINUX_MBR.is_file():
        raise NotFoundError(f"{SYSLINUX_MBR} is missing", hint="apt-get install syslinux-common")
    code = SYSLINUX_MBR.read_bytes()
    if len(code) > MBR_CODE_SIZE:
        raise BbsnapError(f"{SYSLINUX_MBR} is larger than {MBR_CODE_SIZE} bytes")
    with raw.open("r+b") as handle:
        handle.write(code)
        handle.seek(510)
        if handle.read(2) != b"\x55\xaa":
            raise BbsnapError("the disk has no MBR signature after sfdisk")

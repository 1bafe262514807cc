"""The tiny real test guest's image, checked with the real qemu-img/qemu-io/mtools.

The image is built once per machine (cached under $BBSNAP_CACHE or the default
cache dir); booting it is covered by the libvirt system tests.
"""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
from pathlib import Path

import pytest

from bbsnap.proc import run, which
from bbsnap.tinyguest import (
    COUNTER_OFFSET,
    READY_LINE,
    SSH_NONE_LINE,
    SSH_STARTED_LINE,
    USERDATA_PREFIX,
    build_tiny_guest,
    decode_counter_sector,
    encode_counter_sector,
    read_counter,
    read_disk_bytes,
)
from bbsnap.tinyguest import build as tg_build
from bbsnap.tinyguest import logins, ssh
from bbsnap.tinyguest.bootdisk import KERNEL_CMDLINE
from bbsnap.tinyguest.initramfs import Initramfs, cpio_newc

MIB = 1024 * 1024
INIT_SH = Path(tg_build.__file__).with_name("init.sh")


@pytest.fixture(scope="session")
def tiny_guest() -> Path:
    return build_tiny_guest()


@pytest.fixture(scope="session")
def tiny_guest_raw(tiny_guest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("tiny-raw") / "disk.raw"
    run([which("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", str(tiny_guest), str(raw)])
    return raw


def _info(image: Path, fmt: str = "qcow2") -> dict:
    return json.loads(run([which("qemu-img"), "info", "--output=json", "-f", fmt,
                           str(image)]).stdout)


def _write_at(image: Path, fmt: str, offset: int, data: bytes, tmp_path: Path) -> None:
    source = tmp_path / "payload.bin"
    source.write_bytes(data)
    run([which("qemu-io"), "-f", fmt, "-c", f"write -s {source} {offset} {len(data)}",
         str(image)])


# --- the built image ---------------------------------------------------------------

def test_image_is_standalone_small_qcow2(tiny_guest: Path) -> None:
    info = _info(tiny_guest)
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info
    assert "data-file" not in info.get("format-specific", {}).get("data", {})
    assert info["virtual-size"] <= 256 * MIB


def test_qemu_img_check_is_clean(tiny_guest: Path) -> None:
    result = run([which("qemu-img"), "check", "--output=json", "-f", "qcow2",
                  str(tiny_guest)], check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0
    assert report.get("leaks", 0) == 0
    assert report.get("check-errors", 0) == 0


def test_sector_zero_is_a_bootable_mbr(tiny_guest: Path) -> None:
    mbr = read_disk_bytes(tiny_guest, 0, 512)
    assert mbr[510:512] == b"\x55\xaa"
    assert mbr[:440].rstrip(b"\0"), "no boot code in the MBR"
    status, ptype = mbr[446], mbr[446 + 4]
    start_lba, sectors = struct.unpack_from("<II", mbr, 446 + 8)
    assert status == 0x80, "partition 1 must be active for syslinux's mbr.bin"
    assert ptype == 0x0E
    assert start_lba * 512 == MIB
    assert COUNTER_OFFSET + 512 <= start_lba * 512, "the counter must sit before partition 1"
    assert sectors > 0


def test_boot_partition_holds_syslinux_kernel_and_initramfs(tiny_guest_raw: Path) -> None:
    listing = run([which("mdir"), "-a", "-b", "-i", f"{tiny_guest_raw}@@{MIB}", "::/"],
                  env={"MTOOLS_SKIP_CHECK": "1"}).stdout.lower()
    for name in ("ldlinux.sys", "ldlinux.c32", "syslinux.cfg", "vmlinuz", "initrd.gz"):
        assert name in listing, listing
    config = run([which("mtype"), "-i", f"{tiny_guest_raw}@@{MIB}", "::/syslinux.cfg"],
                 env={"MTOOLS_SKIP_CHECK": "1"}).stdout
    assert "console=ttyS0" in config
    assert "INITRD /initrd.gz" in config


def test_uefi_boot_file_is_the_same_kernel_initramfs_and_command_line(
        tiny_guest_raw: Path, tmp_path: Path) -> None:
    """OVMF boots /EFI/BOOT/BOOTX64.EFI (no NVRAM entry needed): the EFI stub with the
    files syslinux boots under BIOS as its sections."""
    mtools = {"MTOOLS_SKIP_CHECK": "1"}
    part = f"{tiny_guest_raw}@@{MIB}"
    for name in ("BOOTX64.EFI", "vmlinuz", "initrd.gz"):
        source = f"::/EFI/BOOT/{name}" if name.endswith(".EFI") else f"::/{name}"
        run([which("mcopy"), "-i", part, source, str(tmp_path / name)], env=mtools)
    uki = tmp_path / "BOOTX64.EFI"
    assert uki.read_bytes()[:2] == b"MZ", "a PE image"
    for section, expected in ((".linux", (tmp_path / "vmlinuz").read_bytes()),
                              (".initrd", (tmp_path / "initrd.gz").read_bytes())):
        out = tmp_path / section.lstrip(".")
        run([which("objcopy"), "-O", "binary", f"--only-section={section}", str(uki), str(out)])
        assert out.read_bytes() == expected, section
    out = tmp_path / "cmdline"
    run([which("objcopy"), "-O", "binary", "--only-section=.cmdline", str(uki), str(out)])
    assert out.read_text() == KERNEL_CMDLINE


def test_manifest_records_versions_and_module_order(tiny_guest: Path) -> None:
    manifest = json.loads((tiny_guest.parent / tg_build.MANIFEST_NAME).read_text())
    assert set(manifest["packages"]) >= {"busybox-static", "qemu-guest-agent"}
    order = [Path(m).name for m in manifest["modules"]["load_order"]]
    for before, after in (("virtio_ring.ko", "virtio.ko"), ("virtio.ko", "virtio_pci.ko"),
                          ("virtio.ko", "virtio_blk.ko"), ("cdrom.ko", "sr_mod.ko")):
        assert order.index(before) < order.index(after)
    assert "libglib-2.0.so.0" in manifest["agent_libraries"]


def test_manifest_lists_dropbear_and_login_files(tiny_guest: Path) -> None:
    manifest = json.loads((tiny_guest.parent / tg_build.MANIFEST_NAME).read_text())
    assert "dropbear-bin" in manifest["packages"]
    paths = set(manifest["initramfs_paths"])
    for path in ("usr/sbin/dropbear", "usr/sbin/qemu-ga", "lib64/ld-linux-x86-64.so.2",
                 "etc/passwd", "etc/group", "etc/shadow", "etc/shells", "etc/hosts",
                 "root/.ssh", "var/log", "etc/dropbear"):
        assert path in paths, path
    assert "libtomcrypt.so.1" in manifest["ssh_libraries"]
    for soname in manifest["ssh_libraries"]:
        assert any(p.endswith("/" + soname) for p in paths), soname


def test_the_initramfs_utmp_names_the_login_users_sessions_as_glibc_reads_it(
        tiny_guest_raw: Path, tmp_path: Path) -> None:
    """qemu-ga's guest-get-users reads /var/run/utmp through glibc; coreutils' who reads a
    utmp file the same way, so its listing is what the agent sees."""
    initrd = tmp_path / "initrd.gz"
    run([which("mcopy"), "-i", f"{tiny_guest_raw}@@{MIB}", "::/initrd.gz", str(initrd)],
        env={"MTOOLS_SKIP_CHECK": "1"})
    utmp = tmp_path / "utmp"
    archive = gzip.decompress(initrd.read_bytes())
    utmp.write_bytes(subprocess.run([which("cpio"), "-i", "--quiet", "--to-stdout",
                                     logins.UTMP_PATH], input=archive, capture_output=True,
                                    check=True).stdout)
    listed = run([which("who"), str(utmp)], env={"TZ": "UTC"}).stdout.splitlines()
    assert [line.split() for line in listed] == [
        [s.user, s.line, s.login_time.strftime("%Y-%m-%d"), s.login_time.strftime("%H:%M")]
        for s in logins.SESSIONS]
    passwd = dict(line.split(":", 1) for line in ssh.LOGIN_FILES["etc/passwd"][1].decode()
                  .splitlines())
    assert passwd[logins.LOGIN_USER].startswith(f"x:{logins.LOGIN_UID}:")


def test_second_build_uses_the_cache(tiny_guest: Path) -> None:
    assert build_tiny_guest() == tiny_guest
    assert not list(tiny_guest.parent.parent.glob(".tmp-*")), "work dir left behind"


# --- the counter -------------------------------------------------------------------

def test_fresh_image_has_no_counter(tiny_guest: Path) -> None:
    assert read_counter(tiny_guest) is None


def test_read_counter_on_raw_file(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as handle:
        handle.truncate(2 * MIB)
        handle.seek(COUNTER_OFFSET)
        handle.write(encode_counter_sector(4711))
    assert read_counter(raw, "raw") == 4711


def test_read_counter_on_qcow2_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    run([which("qemu-img"), "create", "-q", "-f", "qcow2", str(image), "4M"])
    assert read_counter(image) is None
    _write_at(image, "qcow2", COUNTER_OFFSET, encode_counter_sector(123456789), tmp_path)
    assert read_counter(image) == 123456789


def test_read_counter_through_an_overlay_of_the_guest(tiny_guest: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    run([which("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
         str(tiny_guest), str(overlay)])
    _write_at(overlay, "qcow2", COUNTER_OFFSET, encode_counter_sector(42), tmp_path)
    assert read_counter(overlay) == 42
    assert read_counter(tiny_guest) is None


def test_counter_sector_format() -> None:
    sector = encode_counter_sector(17)
    assert len(sector) == 512
    assert sector.startswith(b"BBSNAPCTR 17\n\0")
    assert decode_counter_sector(sector) == 17
    assert decode_counter_sector(b"\0" * 512) is None
    assert decode_counter_sector(b"BBSNAPCTR x\n".ljust(512, b"\0")) is None
    with pytest.raises(ValueError):
        encode_counter_sector(-1)


# --- /init ---------------------------------------------------------------------------

def test_init_script_parses_and_speaks_the_protocol() -> None:
    run([which("busybox"), "sh", "-n", str(INIT_SH)])
    text = INIT_SH.read_text()
    for line in (READY_LINE, "BBSNAP-COUNTER", "BBSNAP-SEED none", "BBSNAP-AGENT started",
                 "BBSNAP-AGENT none", "BBSNAP-NET", "org.qemu.guest_agent.0",
                 SSH_STARTED_LINE, SSH_NONE_LINE, USERDATA_PREFIX + "sha256="):
        assert line in text
    assert tg_build.init_script() == INIT_SH.read_bytes()
    # SSH must be up (or known absent) before tests are told the boot finished.
    body = text[text.index("\nload_modules\n"):]
    assert body.index("start_ssh") < body.index(READY_LINE)


USER_DATA = """#cloud-config
ssh_authorized_keys:
  - ssh-ed25519 AAAAC3top top@host
  - "ssh-rsa AAAAB3dq dq@host" \t
users:
  - name: root
    ssh_authorized_keys:
      - 'ecdsa-sha2-nistp256 AAAAE2sq sq@host'
      - sk-ssh-ed25519@openssh.com AAAAGsk sk@host
  - default
runcmd:
  - echo ssh-rsa not-a-key
  - ssh-rsanot-a-key
# - ssh-ed25519 AAAAcommented
  - ssh-ed25519 AAAAcrlf crlf@host\r
"""


def test_init_script_finds_ssh_keys_in_user_data(tmp_path: Path) -> None:
    """init.sh's ssh_keys_from, run by the host's busybox sh on sample cloud-config."""
    text = INIT_SH.read_text()
    start = text.index("ssh_keys_from() {")
    function = text[start:text.index("\n}\n", start) + 3]
    user_data = tmp_path / "user-data"
    user_data.write_text(USER_DATA)
    result = run([which("busybox"), "sh", "-c", function + 'ssh_keys_from "$1"', "sh",
                  str(user_data)])
    assert result.stdout.splitlines() == [
        "ssh-ed25519 AAAAC3top top@host", "ssh-rsa AAAAB3dq dq@host",
        "ecdsa-sha2-nistp256 AAAAE2sq sq@host", "sk-ssh-ed25519@openssh.com AAAAGsk sk@host",
        "ssh-ed25519 AAAAcrlf crlf@host"]


def test_cpio_keeps_explicit_directory_modes() -> None:
    # dropbear refuses authorized_keys under a group/other-writable or missing dir.
    initramfs = Initramfs()
    initramfs.add_dir("root/.ssh", 0o700)
    initramfs.add_dir("root", 0o700)
    initramfs.add("etc/shadow", b"root:*:::::::\n", 0o600)
    archive = cpio_newc(initramfs)
    modes = {}
    pos = 0
    while True:
        header = archive[pos:pos + 110]
        mode, namesize = int(header[14:22], 16), int(header[94:102], 16)
        filesize = int(header[54:62], 16)
        name = archive[pos + 110:pos + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            break
        modes[name] = mode
        pos += 110 + namesize
        pos += -pos % 4
        pos += filesize + (-filesize % 4)
    assert modes == {"etc": 0o040755, "etc/shadow": 0o100600, "root": 0o040700,
                     "root/.ssh": 0o040700}

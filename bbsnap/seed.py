"""cloud-init NoCloud seeds: meta-data, user-data and network-config on a `cidata` ISO.

Built in pure Python with pycdlib (ISO 9660 + Joliet + Rock Ridge, as cloud-init's
NoCloud datasource and genisoimage-made seeds look). The file holds user-data,
which can carry secrets, so it is written 0600; libvirt hands it to QEMU's user.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from bbsnap.errors import InvalidInputError, UsageError
from bbsnap.lazy_dataclass import dataclass

VOLUME_ID = "cidata"
MAX_USER_DATA = 16 * 1024 * 1024
# RFC 1123 label, lowercase. Always used with fullmatch: `$` alone also matches before a
# trailing newline, which would then land in meta-data, user-data and the domain metadata.
_HOSTNAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# Regenerate machine-id once per instance: systemd derives the DHCP client id (and so, on a
# shared network, the leased IP) from it, and a clone would otherwise share its parent's.
MACHINE_ID_BOOTCMD = ["cloud-init-per", "instance", "bbsnap-machine-id", "sh", "-c",
                      "rm -f /etc/machine-id /var/lib/dbus/machine-id && "
                      "(systemd-machine-id-setup || dbus-uuidgen --ensure=/etc/machine-id) || true"]


@dataclass(frozen=True)
class SeedSpec:
    instance_id: str
    hostname: str
    macs: tuple[str, ...]
    user_data: str


def check_hostname(hostname: str) -> str:
    if not _HOSTNAME.fullmatch(hostname):
        raise UsageError(f"{hostname!r} is not a valid host name",
                         hint="lowercase letters, digits and '-', at most 63 characters")
    return hostname


def hostname_from_name(name: str, fallback: str) -> str:
    """A host name derived from a free-text server name ("My Web #1" -> "my-web-1")."""
    candidate = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return candidate if candidate and _HOSTNAME.fullmatch(candidate) else fallback


GZIP_MAGIC = b"\x1f\x8b"


def decode_user_data(raw: bytes) -> str:
    """The text of user-data as given (read at most ``MAX_USER_DATA + 1`` bytes of it).

    gzip-compressed user-data is a cloud-init format (uncompressed, "then used as if it were
    not compressed"): it is decompressed here, up to the same 16 MiB, and the seed carries
    the text. That is exactly what cloud-init acts on, so validate_user_data judges what the
    guest gets, and the seed stays readable text (an ISO has no 16 KiB limit to save).
    """
    if len(raw) > MAX_USER_DATA:
        raise InvalidInputError("user-data is larger than 16 MiB")
    if raw.startswith(GZIP_MAGIC):
        raw = _gunzip(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"user-data is neither UTF-8 text nor gzip-compressed text (byte {exc.start})",
            hint="give a #cloud-config or script file, plain or gzip'd") from None


def _gunzip(raw: bytes) -> bytes:
    import gzip
    import zlib

    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            data = stream.read(MAX_USER_DATA + 1)  # bounded: a small bomb can't fill memory
    except (OSError, EOFError, zlib.error) as exc:
        raise InvalidInputError(f"gzip-compressed user-data is damaged: {_one_line(exc)}",
                                hint="check the file with 'gzip -t'") from None
    if len(data) > MAX_USER_DATA:
        raise InvalidInputError("user-data is larger than 16 MiB once decompressed")
    return data


def validate_user_data(text: str) -> str:
    """Refuse user-data cloud-init would reject, before anything is created.

    ``#cloud-config`` must be a YAML mapping; scripts (``#!``), ``#include`` and MIME
    multipart are passed through as cloud-init defines them.
    """
    if len(text.encode()) > MAX_USER_DATA:
        raise InvalidInputError("user-data is larger than 16 MiB")
    first = text.lstrip("\ufeff").split("\n", 1)[0].strip()
    if first.startswith("#cloud-config"):
        import yaml

        try:
            data = _load_cloud_config(text)
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"user-data is not valid YAML: {_one_line(exc)}") from exc
        except RecursionError:  # PyYAML's composer recurses once per nesting level
            raise InvalidInputError("#cloud-config user-data is nested too deeply to read",
                                    hint="flatten its YAML") from None
        if data is not None and not isinstance(data, dict):
            raise InvalidInputError("#cloud-config user-data must be a YAML mapping")
        return text
    if first.startswith(("#!", "#include", "#cloud-boothook", "#part-handler", "#upstart-job",
                         "Content-Type: multipart")):
        return text
    raise InvalidInputError(
        "user-data must start with '#cloud-config' (or '#!' for a script)",
        hint="see https://cloudinit.readthedocs.io/en/latest/explanation/format.html")


# How many nodes a #cloud-config's aliases may add. YAML aliases repeat a node by reference,
# so ~90 of them ("billion laughs") stand for 10**9 nodes: PyYAML builds shared references
# quickly, but whatever walks the result (cloud-init in the guest merging or checking its
# config) pays for the expanded size. Real configs use a few aliases, adding dozens of nodes.
MAX_ALIAS_EXPANSION = 1_000_000


def _load_cloud_config(text: str) -> object:
    """``yaml.safe_load`` that refuses alias bombs and self-referencing aliases."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """Counts each composed node's expanded size (a node reached through an alias counts
        again at every use) against the nodes actually written, before anything is built."""

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.sizes: dict[int, int] = {}  # id(node) -> its size with aliases expanded
            self.written = 0                 # nodes composed from the text itself

        def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
            alias = self.check_event(yaml.AliasEvent)
            node = super().compose_node(parent, index)
            if alias:
                if id(node) not in self.sizes:  # an alias of a node still being composed
                    raise InvalidInputError("#cloud-config user-data refers to itself "
                                            "through a YAML alias")
                return node
            self.written += 1
            self.sizes[id(node)] = size = 1 + sum(self.sizes.get(id(child), 1)
                                                  for child in _children(node))
            # Without aliases a node's size never exceeds the nodes written so far.
            if size - self.written > MAX_ALIAS_EXPANSION:
                raise InvalidInputError(
                    f"#cloud-config user-data's YAML aliases expand it by more than "
                    f"{MAX_ALIAS_EXPANSION:,} nodes", hint="write the repeated parts out")
            return node

    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _children(node: object) -> list[object]:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def default_user_data(hostname: str, ssh_keys: list[str], username: str | None) -> str:
    """``#cloud-config`` that installs *ssh_keys* for the image's user (and root)."""
    import yaml

    config: dict[str, object] = {
        "hostname": hostname,
        "ssh_authorized_keys": list(ssh_keys),
        "bootcmd": [MACHINE_ID_BOOTCMD],
    }
    if username and username != "root":
        config["users"] = ["default", {"name": username, "ssh_authorized_keys": list(ssh_keys),
                                       "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash"}]
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def meta_data(spec: SeedSpec) -> str:
    import yaml

    return str(yaml.safe_dump({"instance-id": spec.instance_id,
                               "local-hostname": spec.hostname}, sort_keys=False))


def network_config(spec: SeedSpec) -> str:
    """DHCP on each NIC matched by MAC; the client id is the MAC, not the machine-id."""
    import yaml

    ethernets = {f"nic{i}": {"match": {"macaddress": mac}, "dhcp4": True,
                             "dhcp-identifier": "mac"}
                 for i, mac in enumerate(spec.macs)}
    return str(yaml.safe_dump({"version": 2, "ethernets": ethernets}, sort_keys=False))


def write_seed_iso(spec: SeedSpec, path: Path) -> Path:
    import pycdlib

    files = {"meta-data": meta_data(spec), "user-data": spec.user_data,
             "network-config": network_config(spec)}
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_ID)
    for name, text in files.items():
        data = text.encode()
        iso_name = "/" + name.replace("-", "").upper()[:8] + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_path=iso_name, rr_name=name,
                   joliet_path="/" + name, file_mode=0o100444)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        iso.write_fp(handle)
        handle.flush()
        os.fsync(handle.fileno())
    iso.close()
    return path


def read_seed_iso(path: Path) -> dict[str, str]:
    """The files of a seed ISO (by Rock Ridge name), for tests and `servers show`."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        out = {}
        for name in ("meta-data", "user-data", "network-config"):
            buffer = io.BytesIO()
            iso.get_file_from_iso_fp(buffer, joliet_path="/" + name)
            out[name] = buffer.getvalue().decode()
        return out
    finally:
        iso.close()


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())

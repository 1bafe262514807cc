"""bbsnap's OCI artifact: media types, the config blob, the manifest; and the vetting of
what a registry hands back (a registry is untrusted input: every field is checked before
it is used, and nothing in it is a path).

Manifest (``application/vnd.oci.image.manifest.v1+json``): ``artifactType`` and the
config's media type ``application/vnd.bbsnap.image.config.v1+json``; one layer per
chain file, base first, media type ``application/vnd.bbsnap.image.layer.v1.qcow2``,
annotated with ``org.opencontainers.image.title`` (``<digest hex>.qcow2``) and
``dev.bbsnap.backing`` (the parent layer's title; none on the base). The config lists
the chain's images with their catalogue metadata.

A multi-disk image (a snapshot with further volumes, vdb...) is format version 2, under its
own config media type ``application/vnd.bbsnap.image.config.v2+json`` (a bbsnap that reads
only version 1 stops at it with one line naming it); its layout and vetting are
disk_layout.py's. Single-disk images stay version 1, byte for byte, so older pullers read
them.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from bbsnap.errors import HostileImageError, InvalidInputError, UsageError
from bbsnap.lazy_dataclass import dataclass
from bbsnap.models import Consistency, Image, ImageType
from bbsnap.services import image_fields
from bbsnap.registry import layers

ARTIFACT_TYPE = "application/vnd.bbsnap.image.v1"
CONFIG_MEDIA_TYPE = "application/vnd.bbsnap.image.config.v1+json"
CONFIG_MEDIA_TYPE_V2 = "application/vnd.bbsnap.image.config.v2+json"
CONFIG_MEDIA_TYPES = {CONFIG_MEDIA_TYPE: 1, CONFIG_MEDIA_TYPE_V2: 2}
LAYER_MEDIA_TYPE = "application/vnd.bbsnap.image.layer.v1.qcow2"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
TITLE = "org.opencontainers.image.title"
BACKING = "dev.bbsnap.backing"
DISK = "dev.bbsnap.disk"          # version 2: the disk (target) a layer is first used by
FORMAT_VERSION = 1
MULTI_DISK_VERSION = 2
MAX_CHAIN = 64
MAX_LAYERS = 256           # version 2: all disks' layers together
MAX_CONFIG = 1 << 20
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ORIGIN_ID = re.compile(r"^img-[a-z0-9]{5}$")
# A server id or a libvirt domain name (no "/", no control characters), as stored.
_SOURCE_SERVER = re.compile(r"^[^\x00-\x1f\x7f/]{1,255}$")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class VolumeEntry:
    """A further disk of a chain image (version 2): which layer it is, and the layer it is
    stored on (the parent image's disk of the same target), None when standalone."""

    target: str               # vdb, vdc...: the catalogue's device name, never a path
    digest: str
    virtual_size: int
    backing: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"target": self.target, "digest": self.digest,
                "virtual_size": self.virtual_size, "backing": self.backing}


@dataclass(frozen=True)
class ChainEntry:
    """One image of a pushed chain, as the config blob describes it."""

    digest: str
    origin_id: str            # its id where it was pushed from (links, not a local id)
    type: ImageType
    name: str
    description: str
    arch: str
    firmware: str
    username: str | None
    min_ram: int | None
    virtual_size: int
    consistency: Consistency | None
    created_at: str
    parent: str | None        # origin id of the image it is stored on (the previous entry)
    ancestor: str | None      # origin id of the image its server was built from
    # The server it is a snapshot of, as the pushing machine names it (its id, or a
    # foreign domain's libvirt name): `images list --server` and a server's history find
    # it by that name after a pull, as before the push. None in configs of older pushes.
    source_server: str | None = None
    volumes: tuple[VolumeEntry, ...] = ()   # version 2 only; ascending by target

    @classmethod
    def of(cls, image: Image, digest: str,
           volumes: tuple[VolumeEntry, ...] = ()) -> ChainEntry:
        return cls(digest=digest, origin_id=image.id, type=image.type, name=image.name,
                   description=image.description, arch=image.arch, firmware=image.firmware,
                   username=image.username, min_ram=image.min_ram,
                   virtual_size=image.virtual_size, consistency=image.consistency,
                   created_at=image.created_at.isoformat(), parent=image.parent_id,
                   ancestor=image.ancestor_id, source_server=image.source_server,
                   volumes=volumes)

    def as_json(self, version: int = FORMAT_VERSION) -> dict[str, Any]:
        out = self._common_json()
        if version >= MULTI_DISK_VERSION:
            out["volumes"] = [v.as_json() for v in self.volumes]
        return out

    def _common_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "id": self.origin_id, "type": self.type.value,
                "name": self.name, "description": self.description, "arch": self.arch,
                "firmware": self.firmware, "username": self.username, "min_ram": self.min_ram,
                "virtual_size": self.virtual_size,
                "consistency": self.consistency.value if self.consistency else None,
                "created_at": self.created_at, "parent": self.parent, "ancestor": self.ancestor,
                "source_server": self.source_server}


def is_multi_disk(chain: list[ChainEntry]) -> bool:
    return any(entry.volumes for entry in chain)


def config_media_type(chain: list[ChainEntry]) -> str:
    return CONFIG_MEDIA_TYPE_V2 if is_multi_disk(chain) else CONFIG_MEDIA_TYPE


def config_blob(chain: list[ChainEntry], disks: list[dict[str, Any]] | None = None) -> bytes:
    """Version 1 for a single-disk chain; version 2 (with *disks*, disk_layout.disk_list)
    when an image of it has further disks."""
    if not is_multi_disk(chain):
        return _canonical({"bbsnap": FORMAT_VERSION, "chain": [e.as_json() for e in chain]})
    return _canonical({"bbsnap": MULTI_DISK_VERSION,
                       "chain": [e.as_json(MULTI_DISK_VERSION) for e in chain],
                       "disks": disks or []})


def manifest(config: Descriptor, chain_layers: list[Descriptor],
             annotations: dict[str, str]) -> bytes:
    return _canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "artifactType": ARTIFACT_TYPE, "config": config.as_json(),
                       "layers": [d.as_json() for d in chain_layers],
                       "annotations": annotations})


def layer_descriptor(digest: str, size: int, parent_digest: str | None,
                     disk: str | None = None) -> Descriptor:
    notes = {TITLE: layers.title(digest)}
    if parent_digest is not None:
        notes[BACKING] = layers.title(parent_digest)
    if disk is not None:
        notes[DISK] = disk
    return Descriptor(LAYER_MEDIA_TYPE, digest, size, notes)


def _canonical(data: dict[str, Any]) -> bytes:
    """Sorted keys, no spaces: the same content always gives the same digest."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


# -- reading what a registry sent ---------------------------------------------------------

def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HostileImageError(f"the {what} is not valid JSON; refused") from None
    if not isinstance(value, dict):
        raise HostileImageError(f"the {what} is not a JSON object; refused")
    return value


def descriptor(value: Any, what: str, *, max_size: int) -> Descriptor:
    if not isinstance(value, dict):
        raise HostileImageError(f"{what} is not a descriptor; refused")
    media, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media, str) or not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise HostileImageError(f"{what} has no valid media type and sha256 digest; refused")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise HostileImageError(f"{what} has no valid size; refused")
    if size > max_size:
        raise HostileImageError(f"{what} claims {size} bytes, over the limit of {max_size} "
                                "(max_decompressed_size); refused")
    notes = value.get("annotations") or {}
    if not isinstance(notes, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in notes.items()):
        raise HostileImageError(f"{what} has malformed annotations; refused")
    return Descriptor(media, digest, size, notes)


def index_entries(data: bytes) -> list[Descriptor]:
    """The manifests an index lists (a pull takes bbsnap's artifact among them)."""
    entries = _json_object(data, "manifest index").get("manifests")
    if not isinstance(entries, list) or len(entries) > 256:
        raise HostileImageError("the manifest index has no valid manifests list; refused")
    return [descriptor(e, "an index entry", max_size=4 << 20) for e in entries]


@dataclass(frozen=True)
class PulledManifest:
    config: Descriptor
    layers: list[Descriptor]
    version: int = FORMAT_VERSION      # of the config, from its media type


def read_manifest(data: bytes, *, max_layer: int) -> PulledManifest:
    doc = _json_object(data, "manifest")
    if doc.get("schemaVersion") != 2:
        raise HostileImageError("the manifest is not an OCI/Docker v2 manifest; refused")
    config = descriptor(doc.get("config"), "the manifest's config", max_size=MAX_CONFIG)
    version = CONFIG_MEDIA_TYPES.get(config.media_type)
    if version is None:
        if config.media_type.startswith("application/vnd.bbsnap.image.config."):
            raise InvalidInputError(f"the image's config is {config.media_type}, a format "
                                    "this bbsnap does not read", hint="upgrade bbsnap")
        raise InvalidInputError(f"this is not a bbsnap image (its config is {config.media_type})",
                                hint="push it with 'bbsnap images push'; a containerDisk is "
                                "for KubeVirt")
    most = MAX_CHAIN if version == FORMAT_VERSION else MAX_LAYERS
    found = doc.get("layers")
    if not isinstance(found, list) or not 1 <= len(found) <= most:
        raise HostileImageError(f"the manifest lists no layers or more than {most}; refused")
    chain = [descriptor(v, f"layer {i}", max_size=max_layer) for i, v in enumerate(found)]
    for i, layer in enumerate(chain):
        if layer.media_type != LAYER_MEDIA_TYPE:
            raise HostileImageError(f"layer {i} has the media type {layer.media_type!r}; "
                                    "refused")
    if len({layer.digest for layer in chain}) != len(chain):
        raise HostileImageError("the manifest lists a layer twice (a chain loop); refused")
    if version == FORMAT_VERSION:
        for i, layer in enumerate(chain):
            expected_backing = layers.title(chain[i - 1].digest) if i else None
            if layer.annotations.get(BACKING) != expected_backing:
                raise HostileImageError(f"layer {i} names another backing layer than the one "
                                        "before it; refused")
    else:
        # Several disks: a layer's backing is an earlier layer, which one the config says
        # (disk_layout.py checks it against the disk each image's layer belongs to).
        earlier: set[str] = set()
        for i, layer in enumerate(chain):
            backing = layer.annotations.get(BACKING)
            if backing is not None and backing not in earlier:
                raise HostileImageError(f"layer {i} names a backing layer that does not come "
                                        "before it; refused")
            earlier.add(layers.title(layer.digest))
    return PulledManifest(config, chain, version)


def read_config(data: bytes, pulled: PulledManifest) -> list[ChainEntry]:
    doc = _json_object(data, "config blob")
    if doc.get("bbsnap") != pulled.version:
        raise InvalidInputError(f"the image's format version {doc.get('bbsnap')!r} is not "
                                f"{pulled.version}, as its config media type says",
                                hint="upgrade bbsnap")
    chain = doc.get("chain")
    if pulled.version == MULTI_DISK_VERSION:
        from bbsnap.registry import disk_layout

        if not isinstance(chain, list) or not 1 <= len(chain) <= min(MAX_CHAIN,
                                                                     len(pulled.layers)):
            raise HostileImageError("the config blob's chain does not match the layers; "
                                    "refused")
        entries = [_entry(value, i) for i, value in enumerate(chain)]
        _check_links(entries, pulled.layers)
        disk_layout.check(entries, pulled.layers, doc.get("disks"))
        return entries
    if not isinstance(chain, list) or len(chain) != len(pulled.layers):
        raise HostileImageError("the config blob's chain does not match the layers; refused")
    entries = [_entry(value, i) for i, value in enumerate(chain)]
    if any(entry.volumes for entry in entries):
        raise HostileImageError("a version 1 config blob lists further disks; refused")
    _check_links(entries, pulled.layers)
    return entries


def _check_links(entries: list[ChainEntry], chain_layers: list[Descriptor]) -> None:
    """Image i is layer i, stored on image i - 1; no image twice."""
    # Version 2 lists the further disks' layers after the chain's: zip stops at the chain.
    for i, (entry, layer) in enumerate(zip(entries, chain_layers, strict=False)):
        if entry.digest != layer.digest:
            raise HostileImageError(f"the config blob's image {i} is not layer {i}; refused")
        if entry.parent != (entries[i - 1].origin_id if i else None):
            raise HostileImageError(f"the config blob's image {i} is not stored on the one "
                                    "before it; refused")
    if len({e.origin_id for e in entries}) != len(entries):
        raise HostileImageError("the config blob lists an image twice; refused")


def _entry(value: Any, index: int) -> ChainEntry:
    if not isinstance(value, dict):
        raise HostileImageError(f"the config blob's image {index} is not an object; refused")
    try:
        return _checked_entry(value)
    except (UsageError, KeyError, TypeError, ValueError) as exc:
        detail = exc.message if isinstance(exc, UsageError) else f"bad field {exc}"
        raise HostileImageError(f"the config blob's image {index} is refused: {detail}"
                                ) from None


def _checked_entry(value: dict[str, Any]) -> ChainEntry:
    def text(key: str) -> str:
        found = value[key]
        if not isinstance(found, str):
            raise TypeError(key)
        return found

    def optional(key: str) -> str | None:
        return None if value.get(key) is None else text(key)

    digest, origin = text("digest"), text("id")
    if not _DIGEST.fullmatch(digest) or not _ORIGIN_ID.fullmatch(origin):
        raise ValueError("digest or id")
    for key in ("parent", "ancestor"):
        if optional(key) is not None and not _ORIGIN_ID.fullmatch(text(key)):
            raise ValueError(key)
    size, min_ram = value["virtual_size"], value.get("min_ram")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError("virtual_size")
    if min_ram is not None and (not isinstance(min_ram, int) or isinstance(min_ram, bool)):
        raise ValueError("min_ram")
    consistency = optional("consistency")
    created = text("created_at")
    datetime.fromisoformat(created)
    username = optional("username")
    source_server = optional("source_server")
    if source_server is not None and not _SOURCE_SERVER.fullmatch(source_server):
        raise ValueError("source_server")
    return ChainEntry(
        digest=digest, origin_id=origin, type=ImageType(text("type")),
        name=image_fields.check_name(text("name")),
        description=image_fields.check_description(text("description")),
        arch=image_fields.check_arch(text("arch")),
        firmware=image_fields.check_firmware(text("firmware")),
        username=image_fields.check_username(username) if username else None,
        min_ram=image_fields.check_min_ram(min_ram) if min_ram else None,
        virtual_size=size, consistency=Consistency(consistency) if consistency else None,
        created_at=created, parent=optional("parent"), ancestor=optional("ancestor"),
        source_server=source_server, volumes=_volumes(value.get("volumes")))


def _volumes(value: Any) -> tuple[VolumeEntry, ...]:
    if value is None:
        return ()
    from bbsnap.registry import disk_layout

    return disk_layout.read_volumes(value)

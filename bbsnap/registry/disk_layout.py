"""Multi-disk images in a registry (config format version 2): which layers make which disk.

A snapshot with further disks (its catalogue volumes: vdb, vdc, ...) is pushed as one layer
chain per disk. The manifest lists every distinct layer once: the first disk's chain first
(layer i is chain image i, base first, exactly as in version 1), then the further disks'
layers in the order the chain's images first use them; every layer is annotated
``dev.bbsnap.disk`` with its disk (``vda`` for the first disk's chain), besides the title and
backing annotations of version 1.

The config blob says, per chain image, its further disks (``volumes``: target, layer digest,
virtual size, and the layer it is stored on: the image below's disk of the same target, or
none when standalone), and, in ``disks``, the top image's disks in the order a server
attaches them (the first disk as ``vda``, then the volumes ascending), each with its size and
its layers, base first: what ``oras``/``skopeo`` users read, checked against the rest.

One layer may serve several disks: bbsnap stores further disks as standalone full copies, so
a disk that did not change between two snapshots is the same bytes in both, uploaded once and
pulled into each image's own file.

Vetting (a registry is untrusted): targets are short lowercase names, never paths; an image
names a target once; a disk's layer is stored only on the same disk of the image below (a
layer of disk B backing disk A is refused, and so is any loop); every layer's backing
annotation is what the config says; the disk list names each of the top image's disks once,
misses none and lists exactly its chain. The layers are then vetted one by one as in version 1
(layer_store.py), their qcow2 backing names checked against what this says.
"""

from __future__ import annotations

import re
from typing import Any

from bbsnap.errors import HostileImageError
from bbsnap.registry import layers
from bbsnap.registry.artifact import (BACKING, DISK, MAX_LAYERS, ChainEntry, Descriptor,
                                      VolumeEntry, layer_descriptor)

PRIMARY = "vda"          # the first disk: how a server built from the image attaches it
# A server attaches further disks as vdb..vdp (services/server_create.py).
MAX_VOLUMES = 15
# A libvirt target name (vdb, sdc, xvdb, hdd); never "/", "." or anything a path needs.
_TARGET = re.compile(r"^[a-z]{2,4}[a-z]{1,3}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def valid_target(target: object) -> bool:
    return isinstance(target, str) and bool(_TARGET.fullmatch(target)) and target != PRIMARY


# -- building (push) ----------------------------------------------------------------------

def disk_list(entries: list[ChainEntry]) -> list[dict[str, Any]]:
    """The top image's disks, in attach order, each with its layers base first."""
    top = entries[-1]
    out = [{"target": PRIMARY, "virtual_size": top.virtual_size,
            "layers": [e.digest for e in entries]}]
    for volume in top.volumes:
        out.append({"target": volume.target, "virtual_size": volume.virtual_size,
                    "layers": _volume_chain(entries, volume)})
    return out


def _volume_chain(entries: list[ChainEntry], volume: VolumeEntry) -> list[str]:
    chain, current, index = [volume.digest], volume, len(entries) - 1
    while current.backing is not None and index > 0:
        index -= 1
        below = {v.target: v for v in entries[index].volumes}.get(volume.target)
        if below is None or below.digest != current.backing:
            break  # check() refuses such a config; the chain ends where it stops making sense
        chain.insert(0, below.digest)
        current = below
    return chain


def manifest_layers(entries: list[ChainEntry], sizes: dict[str, int]) -> list[Descriptor]:
    """The manifest's layers: the first disk's chain, then each further layer once."""
    out, listed = [], set()
    for index, entry in enumerate(entries):
        parent = entries[index - 1].digest if index else None
        out.append(layer_descriptor(entry.digest, sizes[entry.digest], parent, PRIMARY))
        listed.add(entry.digest)
    for entry in entries:
        for volume in entry.volumes:
            if volume.digest not in listed:
                out.append(layer_descriptor(volume.digest, sizes[volume.digest],
                                            volume.backing, volume.target))
                listed.add(volume.digest)
    return out


# -- reading (pull) -----------------------------------------------------------------------

def read_volumes(value: Any) -> tuple[VolumeEntry, ...]:
    """A config image's ``volumes``, each field checked; ascending by target."""
    if not isinstance(value, list) or len(value) > MAX_VOLUMES:
        raise HostileImageError(f"a config image's volumes are not a list of at most "
                                f"{MAX_VOLUMES} disks; refused")
    found: list[VolumeEntry] = []
    for item in value:
        if not isinstance(item, dict):
            raise HostileImageError("a config image's volume is not an object; refused")
        target, digest = item.get("target"), item.get("digest")
        size, backing = item.get("virtual_size"), item.get("backing")
        if not valid_target(target):
            raise HostileImageError(f"a config image names the disk {str(target)[:40]!r}, "
                                    "which is not a disk name; refused")
        assert isinstance(target, str)
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest) or (
                backing is not None and (not isinstance(backing, str)
                                         or not _DIGEST.fullmatch(backing))):
            raise HostileImageError(f"disk {target} has no valid layer digest; refused")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise HostileImageError(f"disk {target} has no valid virtual size; refused")
        if found and target <= found[-1].target:
            raise HostileImageError(f"a config image names disk {target} twice or out of "
                                    "order; refused")
        found.append(VolumeEntry(target, digest, size, backing))
    return tuple(found)


def check(entries: list[ChainEntry], manifest: list[Descriptor], disks: Any) -> None:
    """Refuse a version 2 config whose disks do not fit its manifest (see the docstring)."""
    by_digest = {layer.digest: layer for layer in manifest}
    # Each use is a download (a layer two images share is pulled into each one's file): as
    # many as the manifest may list layers, so sharing does not multiply what a pull fetches.
    uses = len(entries) + sum(len(e.volumes) for e in entries)
    if uses > MAX_LAYERS:
        raise HostileImageError(f"the config's images have {uses} disk files, more than "
                                f"{MAX_LAYERS}; refused")
    used: set[str] = set()
    for index, entry in enumerate(entries):
        layer = manifest[index]   # read_config checked it is entry's
        expected = layers.title(entries[index - 1].digest) if index else None
        if layer.annotations.get(BACKING) != expected:
            raise HostileImageError(f"layer {index} names another backing layer than the one "
                                    "before it; refused")
        if layer.annotations.get(DISK) != PRIMARY:
            raise HostileImageError(f"layer {index} is not annotated as disk {PRIMARY}; "
                                    "refused")
        used.add(entry.digest)
    for index, entry in enumerate(entries):
        below = {v.target: v for v in entries[index - 1].volumes} if index else {}
        for volume in entry.volumes:
            _check_volume(index, volume, below.get(volume.target), by_digest)
            used.add(volume.digest)
    unused = [layer.digest for layer in manifest if layer.digest not in used]
    if unused:
        raise HostileImageError(f"the manifest's layer {unused[0][7:19]} belongs to no disk "
                                "of the config; refused")
    _check_disk_list(disk_list(entries), disks)


def _check_volume(index: int, volume: VolumeEntry, below: VolumeEntry | None,
                  by_digest: dict[str, Descriptor]) -> None:
    what = f"image {index}'s disk {volume.target}"
    layer = by_digest.get(volume.digest)
    if layer is None:
        raise HostileImageError(f"{what} is not a layer of the manifest; refused")
    if volume.backing is not None and (below is None or below.digest != volume.backing):
        raise HostileImageError(f"{what} is stored on a layer that is not disk "
                                f"{volume.target} of the image below it; refused")
    expected = layers.title(volume.backing) if volume.backing else None
    if layer.annotations.get(BACKING) != expected:
        raise HostileImageError(f"{what}'s layer names another backing layer than the config "
                                "says; refused")
    disk = layer.annotations.get(DISK)
    if disk != PRIMARY and not valid_target(disk):
        raise HostileImageError(f"{what}'s layer names no valid disk; refused")


def _check_disk_list(derived: list[dict[str, Any]], given: Any) -> None:
    if not isinstance(given, list) or not all(isinstance(d, dict) for d in given):
        raise HostileImageError("the config blob has no valid disk list; refused")
    targets = [d.get("target") for d in given]
    for target in targets:
        if target != PRIMARY and not valid_target(target):
            raise HostileImageError(f"the disk list names the disk {str(target)[:40]!r}, which "
                                    "is not a disk name; refused")
    for target in targets:
        if targets.count(target) > 1:
            raise HostileImageError(f"the disk list names disk {target} twice; refused")
    expected = [d["target"] for d in derived]
    for target in expected:
        if target not in targets:
            raise HostileImageError(f"the disk list misses disk {target} of the image; "
                                    "refused")
    for target in targets:
        if target not in expected:
            raise HostileImageError(f"the disk list names disk {target}, which the image does "
                                    "not have; refused")
    if targets != expected:
        raise HostileImageError("the disk list is not in the image's disk order; refused")
    for mine, theirs in zip(derived, given, strict=True):
        listed = theirs.get("layers")
        if not isinstance(listed, list):
            raise HostileImageError(f"disk {mine['target']} lists no layers; refused")
        if len(set(map(str, listed))) != len(listed):
            raise HostileImageError(f"disk {mine['target']} lists a layer twice; refused")
        if listed != mine["layers"]:
            raise HostileImageError(f"disk {mine['target']}'s layers are not its images' "
                                    "(a layer of another disk?); refused")
        if theirs.get("virtual_size") != mine["virtual_size"]:
            raise HostileImageError(f"the disk list's size of disk {mine['target']} is not its "
                                    "image's; refused")

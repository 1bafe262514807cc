"""`images push IMG REF --containerdisk`: a KubeVirt containerDisk.

A standard OCI image (config ``application/vnd.oci.image.config.v1+json``, linux/amd64)
whose single, uncompressed tar layer holds the image flattened to one qcow2 at
``/disk/<id>.qcow2``, owned by 107:107 (the qemu user in KubeVirt's launcher) and
mode 0440, in a ``disk/`` directory owned likewise. The tar is never written out: its
headers are made by tarfile and the qcow2's bytes follow them as they are read, so the
flattened file (in tmp/, named by this process's job token; a killed push's is removed
by the next push) is the only copy.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from datetime import datetime, timezone

from bbsnap.state.catalogue import Catalogue
from bbsnap.disks import qemu_img
from bbsnap.state.process_tokens import current_job_token, job_alive
from bbsnap.state.layout import DataDir
from bbsnap.free_space import check_free_space
from bbsnap.registry import uploads
from bbsnap.registry.client import DEFAULT_CHUNK, Readable, RegistryClient
from bbsnap.registry.push import PushResult, chain_of, registry_dir
from bbsnap.registry.reference import Reference

OWNER = 107
FILE_MODE = 0o440
DIR_MODE = 0o555
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
BLOCK = 512
# A fixed time in the tar headers: the same image gives the same layer digest.
EPOCH = 0


class TarLayer:
    """The tar bytes of ``disk/`` and ``disk/NAME`` (the file at *fd*), read on demand."""

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self._size = os.fstat(fd).st_size
        directory = tarfile.TarInfo("disk")
        directory.type, directory.mode = tarfile.DIRTYPE, DIR_MODE
        member = tarfile.TarInfo(f"disk/{name}")
        member.size, member.mode = self._size, FILE_MODE
        for info in (directory, member):
            info.uid = info.gid = OWNER
            info.uname = info.gname = ""
            info.mtime = EPOCH
        self._head = directory.tobuf(tarfile.PAX_FORMAT) + member.tobuf(tarfile.PAX_FORMAT)
        padding = -self._size % BLOCK
        self._tail = bytes(padding + 2 * BLOCK)  # the file's padding, then end of archive
        self.size = len(self._head) + self._size + len(self._tail)

    def read_at(self, offset: int, size: int) -> bytes:
        head, body = len(self._head), self._size
        if offset < head:
            return self._head[offset:offset + size]
        if offset < head + body:
            return os.pread(self._fd, min(size, head + body - offset), offset - head)
        start = offset - head - body
        return self._tail[start:start + size]

    def opener(self) -> Callable[[int], Readable]:
        return lambda offset: _Reader(self, offset)

    def digest(self) -> str:
        sha, reader = hashlib.sha256(), _Reader(self, 0)
        while chunk := reader.read(1 << 20):
            sha.update(chunk)
        return "sha256:" + sha.hexdigest()


class _Reader:
    def __init__(self, layer: TarLayer, offset: int) -> None:
        self._layer, self._position = layer, offset

    def read(self, size: int = 1 << 20) -> bytes:
        data = self._layer.read_at(self._position, size)
        self._position += len(data)
        return data


def push_containerdisk(catalogue: Catalogue, data_dir: DataDir, image_id: str, ref: Reference,
                       *, insecure: bool = False, timeout: float = 30.0,
                       chunk_size: int = DEFAULT_CHUNK) -> PushResult:
    chain = chain_of(catalogue, data_dir, image_id)  # vets every file of the chain
    image, top = chain[-1]
    _remove_stale(data_dir)
    flat = data_dir.tmp_dir / f"containerdisk.{current_job_token()}.qcow2"
    client = RegistryClient(ref, insecure=insecure, timeout=timeout, chunk_size=chunk_size,
                            scopes=[f"repository:{ref.repository}:pull,push"])
    journal = uploads.UploadJournal(registry_dir(data_dir) / "uploads")
    try:
        check_free_space(flat.parent, qemu_img.measure_required(top, "qcow2"))
        qemu_img.convert(top, "qcow2", flat, "qcow2")
        fd = os.open(flat, os.O_RDONLY | os.O_CLOEXEC)
        try:
            layer = TarLayer(fd, f"{image.id}.qcow2")
            digest = layer.digest()
            how = uploads.ensure_blob(client, journal, digest, layer.size, layer.opener())
        finally:
            os.close(fd)
        config = _canonical({
            "architecture": _oci_arch(image.arch), "os": "linux",
            "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat()
            .replace("+00:00", "Z"),
            "config": {"Labels": {"dev.bbsnap.image.id": image.id}},
            "rootfs": {"type": "layers", "diff_ids": [digest]},
            "history": [{"created_by": "bbsnap images push --containerdisk"}]})
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        uploads.ensure_blob(client, journal, config_digest, len(config),
                            lambda offset: io.BytesIO(config[offset:]))
        manifest = _canonical({
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest,
                       "size": len(config)},
            "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": digest,
                        "size": layer.size}],
            "annotations": {"org.opencontainers.image.title": image.name[:256]}})
        result = PushResult(ref, client.put_manifest(ref.tag or "latest", MANIFEST_MEDIA_TYPE,
                                                     manifest), 0, [(image.id, digest, how)])
        result.uploaded = client.bytes_sent
        return result
    finally:
        client.close()
        flat.unlink(missing_ok=True)


def _remove_stale(data_dir: DataDir) -> None:
    """A killed containerDisk push's flattened file: its job token is dead."""
    for path in data_dir.tmp_dir.glob("containerdisk.*.qcow2"):
        token = path.name[len("containerdisk."):-len(".qcow2")]
        if not job_alive(token):
            path.unlink(missing_ok=True)


def _oci_arch(arch: str) -> str:
    return {"x86_64": "amd64", "aarch64": "arm64", "i686": "386"}.get(arch, arch)


def _canonical(data: dict[str, object]) -> bytes:
    import json

    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

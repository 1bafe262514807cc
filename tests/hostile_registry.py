"""A tiny registry of our own on 127.0.0.1 that serves whatever a test crafts: manifests
that lie, blobs that are not what their digest says, endless bodies. Only GET/HEAD of
/v2/, manifests and blobs: what a pull asks for. Also the fixtures and the refusal check
the hostile-registry tests share."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bbsnap.models import ImageType
from bbsnap.registry import artifact
from tests.conftest import Bbsnap
from tests.images import MIB, written_qcow2


# A further disk of a crafted image: its target, its file, and the file of the layer it
# claims to be stored on (None: standalone).
Disk = tuple[str, Path, "Path | None"]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Served:
    body: bytes
    media_type: str = "application/octet-stream"
    extra: int = 0            # bytes of junk sent after the body (a lying size)


@dataclass
class HostileRegistry:
    manifests: dict[str, Served] = field(default_factory=dict)   # tag or digest -> document
    blobs: dict[str, Served] = field(default_factory=dict)       # digest -> blob
    requests: list[str] = field(default_factory=list)
    # Token auth as Docker Hub, GHCR and Harbor do it: the API answers 401 with a Bearer
    # challenge naming /token here, which gives TOKEN for basic *credentials*.
    credentials: tuple[str, str] | None = None
    tokens_issued: list[str] = field(default_factory=list)
    TOKEN = "bbsnap-test-token-3f9a"

    def start(self) -> HostileRegistry:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                registry.requests.append(f"{self.command} {self.path}")
                if registry.credentials is not None and not self._authorized():
                    return
                parts = self.path.split("?")[0].split("/")
                found: Served | None = None
                if self.path.rstrip("/") == "/v2":
                    found = Served(b"{}", "application/json")
                elif len(parts) >= 5 and parts[-2] == "manifests":
                    found = registry.manifests.get(parts[-1])
                elif len(parts) >= 5 and parts[-2] == "blobs":
                    found = registry.blobs.get(parts[-1])
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", found.media_type)
                self.send_header("Content-Length", str(len(found.body) + found.extra))
                self.end_headers()
                if body:
                    try:
                        self.wfile.write(found.body)
                        left = found.extra
                        while left > 0:
                            piece = min(left, 1 << 20)
                            self.wfile.write(bytes(piece))
                            left -= piece
                    except OSError:
                        pass

            def _authorized(self) -> bool:
                import base64

                assert registry.credentials is not None
                given = self.headers.get("Authorization") or ""
                if self.path.startswith("/token"):
                    user, password = registry.credentials
                    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
                    status = 200 if given == expected else 401
                    body = json.dumps({"token": registry.TOKEN}).encode() if status == 200 \
                        else b"{}"
                    if status == 200:
                        registry.tokens_issued.append(self.path)
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return False
                if given == f"Bearer {registry.TOKEN}":
                    return True
                realm = f"http://127.0.0.1:{registry.port}/token"
                self.send_response(401)
                self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",'
                                 f'service="hostile",scope="repository:h/x:pull"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return False

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- building artifacts -----------------------------------------------------------------

    def publish(self, tag: str, layer_files: list[Path], *, virtual_sizes: list[int],
                sizes: list[int] | None = None, config_override: bytes | None = None) -> str:
        """Serve *layer_files* as a bbsnap chain under *tag*; the manifest's digest."""
        descriptors, entries, parent = [], [], None
        for index, path in enumerate(layer_files):
            data = path.read_bytes()
            digest = sha(data)
            self.blobs[digest] = Served(data)
            size = sizes[index] if sizes else len(data)
            descriptors.append(artifact.layer_descriptor(digest, size, parent))
            entries.append(artifact.ChainEntry(
                digest=digest, origin_id=f"img-lay{index:02d}",
                type=ImageType.UPLOAD if index == 0 else ImageType.SNAPSHOT,
                name=f"layer {index}", description="", arch="x86_64", firmware="bios",
                username=None, min_ram=None, virtual_size=virtual_sizes[index],
                consistency=None, created_at="2026-11-01T08:00:00+00:00",
                parent=f"img-lay{index - 1:02d}" if index else None,
                ancestor="img-lay00" if index else None))
            parent = digest
        config = config_override or artifact.config_blob(entries)
        self.blobs[sha(config)] = Served(config)
        body = artifact.manifest(
            artifact.Descriptor(artifact.CONFIG_MEDIA_TYPE, sha(config), len(config), {}),
            descriptors, {})
        return self.serve_manifest(tag, body, artifact.OCI_MANIFEST)

    def serve_manifest(self, tag: str, body: bytes, media_type: str) -> str:
        self.manifests[tag] = Served(body, media_type)
        self.manifests[sha(body)] = Served(body, media_type)
        return sha(body)

    def index_of(self, tag: str, target_digest: str, target_size: int,
                 media_type: str = artifact.OCI_MANIFEST) -> str:
        body = json.dumps({"schemaVersion": 2, "mediaType": artifact.OCI_INDEX,
                           "manifests": [{"mediaType": media_type, "digest": target_digest,
                                          "size": target_size}]}).encode()
        return self.serve_manifest(tag, body, artifact.OCI_INDEX)

    def publish_disks(self, tag: str, images: list[tuple[Path, list[Disk]]], *,
                      edit_config: Callable[[dict[str, Any]], None] | None = None,
                      extra_layers: tuple[Path, ...] = ()) -> str:
        """Serve a multi-disk chain (config version 2) under *tag*: per image its own file and
        its further disks as (target, file, the path of the layer it claims to be stored on
        or None); *edit_config* may change the config document before it is served."""
        from bbsnap.registry import disk_layout

        entries: list[artifact.ChainEntry] = []
        sizes: dict[str, int] = {}
        files: dict[Path, str] = {}
        for index, (own, disks) in enumerate(images):
            volumes = []
            for target, path, backing in disks:
                volumes.append(artifact.VolumeEntry(
                    target, self._blob(path, files, sizes), _virtual_size(path),
                    files[backing] if backing is not None else None))
            entries.append(artifact.ChainEntry(
                digest=self._blob(own, files, sizes), origin_id=f"img-lay{index:02d}",
                type=ImageType.UPLOAD if index == 0 else ImageType.SNAPSHOT,
                name=f"layer {index}", description="", arch="x86_64", firmware="bios",
                username=None, min_ram=None, virtual_size=_virtual_size(own),
                consistency=None, created_at="2026-11-01T08:00:00+00:00",
                parent=f"img-lay{index - 1:02d}" if index else None,
                ancestor="img-lay00" if index else None, volumes=tuple(volumes)))
        descriptors = disk_layout.manifest_layers(entries, sizes)
        for path in extra_layers:
            descriptors.append(artifact.layer_descriptor(self._blob(path, files, sizes),
                                                         path.stat().st_size, None, "vdz"))
        document = json.loads(artifact.config_blob(entries, disk_layout.disk_list(entries)))
        if edit_config is not None:
            edit_config(document)
        config = json.dumps(document).encode()
        self.blobs[sha(config)] = Served(config)
        body = artifact.manifest(
            artifact.Descriptor(artifact.CONFIG_MEDIA_TYPE_V2, sha(config), len(config), {}),
            descriptors, {})
        return self.serve_manifest(tag, body, artifact.OCI_MANIFEST)

    def _blob(self, path: Path, files: dict[Path, str], sizes: dict[str, int]) -> str:
        data = path.read_bytes()
        digest = sha(data)
        self.blobs[digest] = Served(data)
        files[path], sizes[digest] = digest, len(data)
        return digest


def _virtual_size(path: Path) -> int:
    import subprocess

    info = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], check=True,
                          capture_output=True, text=True).stdout
    return int(json.loads(info)["virtual-size"])


# -- fixtures and checks the hostile-registry tests share (imported by their modules) ----------

SECRET = b"BBSNAP-HOST-SECRET-" + b"s3cr3t" * 50
SIZE = 16 * MIB          # the virtual size of the base fixture's disk and of delta()'s


@pytest.fixture()
def hostile() -> Iterator[HostileRegistry]:
    server = HostileRegistry().start()
    yield server
    server.stop()


@pytest.fixture()
def base(work_dir: Path) -> Path:
    return written_qcow2(work_dir / "base.qcow2", SIZE, "0x5a 0 2M")


@pytest.fixture()
def secret_file(work_dir: Path) -> Path:
    """A host file a crafted layer tries to read."""
    path = work_dir / "host-secret"
    path.write_bytes(SECRET + bytes(MIB - len(SECRET)))
    return path


def delta(work_dir: Path, name: str, backing: str, fmt: str = "qcow2") -> Path:
    """A delta naming *backing* (of format *fmt*) as its backing file, whatever that is."""
    return written_qcow2(work_dir / name, SIZE, "0x6b 4M 1M", "-u", "-F", fmt, "-b", backing)


def refused(bbsnap: Bbsnap, ref: str, words: str, exit_code: int = 1) -> str:
    """`images pull` of *ref* fails with one error line saying *words*, registers nothing,
    leaves no file and copies no byte of SECRET: that error line."""
    result = bbsnap("images", "pull", ref)
    assert result.exit_code == exit_code, (result.exit_code, result.stderr)
    errors = [x for x in result.stderr.splitlines() if x.startswith("bbsnap: error:")]
    assert len(errors) == 1, result.stderr
    assert words.lower() in errors[0].lower(), errors[0]
    assert bbsnap.rows() == 0, "a catalogue row was left behind"
    images = bbsnap.data_dir / "images"
    tmp = bbsnap.data_dir / "tmp"
    assert not list(images.iterdir()) and not list(tmp.iterdir()), "files were left behind"
    for path in bbsnap.data_dir.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_bytes(), f"host bytes reached {path}"
    return errors[0]

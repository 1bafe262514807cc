"""Registry pieces without a registry: reference grammar, credentials from auth files and
helpers, challenges, the vetting of config blobs and manifests."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from bbsnap.errors import HostileImageError, InvalidInputError, UsageError
from bbsnap.disks.qcow2_header import (EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_FEATURE_TABLE,
                                       Qcow2Header)
from bbsnap.models import ImageType
from bbsnap.registry import artifact, auth, layer_store
from bbsnap.registry.reference import parse


@pytest.mark.parametrize(("text", "host", "repository", "tag", "loopback"), [
    ("127.0.0.1:5000/team/devbox:2026-12", "127.0.0.1:5000", "team/devbox", "2026-12", True),
    ("localhost/a", "localhost", "a", "latest", True),
    ("[::1]:5000/x/y", "[::1]:5000", "x/y", "latest", True),
    ("registry.example.com/team/devbox", "registry.example.com", "team/devbox", "latest",
     False),
    ("debian", "docker.io", "library/debian", "latest", False),
    ("team/devbox:v1", "docker.io", "team/devbox", "v1", False),
])
def test_references(text, host, repository, tag, loopback):
    ref = parse(text)
    assert (ref.host, ref.repository, ref.tag, ref.loopback) == (host, repository, tag, loopback)


def test_digest_references_and_docker_hub_api_host():
    digest = "sha256:" + "ab" * 32
    ref = parse(f"ghcr.io/o/r@{digest}")
    assert ref.digest == digest and ref.reference == digest and ref.tag is None
    assert parse("debian").api_host == "registry-1.docker.io"


@pytest.mark.parametrize("text", ["", "http://h/x", "h.io/UPPER", "h.io/x:bad tag", "h.io/x@md5:1",
                                  "h.io/a//b", "h.io/x:" + "t" * 200, "h.io/-x", "h .io/x",
                                  "h.io/x\n"])
def test_bad_references_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse(text)


@pytest.fixture()
def auth_env(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    return tmp_path


def test_auth_entries_in_both_forms_and_docker_hub_legacy_key(auth_env):
    token = base64.b64encode(b"alice:pa:ss").decode()
    (auth_env / "auth.json").write_text(json.dumps({"auths": {
        "r.example.com": {"auth": token},
        "https://index.docker.io/v1/": {"username": "bob", "password": "pw"}}}))
    found = auth.lookup("r.example.com")
    assert found is not None and (found.username, found.secret) == ("alice", "pa:ss")
    hub = auth.lookup("docker.io")
    assert hub is not None and hub.username == "bob"
    assert auth.lookup("other.example.com") is None
    assert "pa:ss" not in repr(found)


def test_a_damaged_auth_file_is_a_clear_error(auth_env):
    (auth_env / "auth.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        auth.lookup("r.example.com")
    (auth_env / "auth.json").write_text(json.dumps({"auths": {"h": {"auth": "!!!"}}}))
    with pytest.raises(InvalidInputError, match="base64"):
        auth.lookup("h")


def test_credential_helper_gets_the_host_on_stdin(auth_env, monkeypatch):
    bindir = auth_env / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nread host\n[ "$1" = get ] || exit 3\n'
                      'printf \'{"Username":"u-%s","Secret":"s3"}\' "$host"\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    (auth_env / "auth.json").write_text(json.dumps({"credHelpers": {"h.io": "fake"}}))
    found = auth.lookup("h.io")
    assert found is not None and (found.username, found.secret) == ("u-h.io", "s3")
    (auth_env / "auth.json").write_text(json.dumps({"credsStore": "../evil"}))
    with pytest.raises(InvalidInputError, match="not a program name"):
        auth.lookup("h.io")


def test_store_writes_a_private_file_and_forget_removes_the_entry(auth_env):
    path = auth.store("h.io:5000", auth.Credentials("u", "secret"))
    assert path == auth_env / "auth.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.lookup("h.io:5000") == auth.Credentials("u", "secret")
    assert auth.forget("h.io:5000") and auth.lookup("h.io:5000") is None
    assert not auth.forget("h.io:5000")


def test_challenges():
    bearer = auth.parse_challenge('Bearer realm="https://auth.example.com/token",'
                                  'service="registry.example.com",scope="repository:a/b:pull"')
    assert bearer is not None and bearer.scheme == "bearer"
    assert bearer.params["realm"] == "https://auth.example.com/token"
    assert bearer.params["scope"] == "repository:a/b:pull"
    basic = auth.parse_challenge('Basic realm="x"')
    assert basic is not None and basic.scheme == "basic"
    assert auth.parse_challenge(None) is None


def _entry(**changes: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "digest": "sha256:" + "1" * 64, "id": "img-aaaaa", "type": "upload", "name": "n",
        "description": "", "arch": "x86_64", "firmware": "bios", "username": None,
        "min_ram": None, "virtual_size": 1 << 20, "consistency": None,
        "created_at": "2026-11-01T08:00:00+00:00", "parent": None, "ancestor": None}
    entry.update(changes)
    return entry


def _pulled() -> artifact.PulledManifest:
    layer = artifact.layer_descriptor("sha256:" + "1" * 64, 100, None)
    return artifact.PulledManifest(artifact.Descriptor(artifact.CONFIG_MEDIA_TYPE,
                                                       "sha256:" + "2" * 64, 10, {}), [layer])


@pytest.mark.parametrize("changes", [
    {"virtual_size": -1}, {"virtual_size": True}, {"type": "weird"}, {"id": "../../etc"},
    {"name": 5}, {"parent": "img-bbbbb"}, {"digest": "sha256:" + "3" * 64},
    {"firmware": "coreboot"}, {"created_at": "yesterday"}, {"min_ram": "lots"},
    {"source_server": "srv-a\x1b[2J"}, {"source_server": "../x"}, {"source_server": ""},
    {"source_server": "s" * 256}, {"source_server": 7}, {"digest": "sha256:" + "1" * 64 + "\n"},
    {"id": "img-aaaaa\n"},
])
def test_config_fields_are_vetted(changes):
    config = json.dumps({"bbsnap": 1, "chain": [_entry(**changes)]}).encode()
    with pytest.raises(HostileImageError):
        artifact.read_config(config, _pulled())


def test_a_good_config_round_trips():
    entries = artifact.read_config(json.dumps({"bbsnap": 1, "chain": [_entry()]}).encode(),
                                   _pulled())
    assert entries[0].name == "n" and entries[0].virtual_size == 1 << 20
    assert entries[0].source_server is None  # a config pushed before it was carried


def test_source_server_is_carried_through_the_config():
    entries = artifact.read_config(json.dumps({"bbsnap": 1, "chain": [
        _entry(source_server="debian 12 (virt-manager)")]}).encode(), _pulled())
    assert entries[0].source_server == "debian 12 (virt-manager)"
    assert json.loads(artifact.config_blob(entries))["chain"][0]["source_server"] == \
        "debian 12 (virt-manager)"


def test_manifest_vetting():
    good = artifact.manifest(_pulled().config, _pulled().layers, {})
    assert len(artifact.read_manifest(good, max_layer=1 << 30).layers) == 1
    doc = json.loads(good)
    doc["layers"] = doc["layers"] * 2
    with pytest.raises(HostileImageError):
        artifact.read_manifest(json.dumps(doc).encode(), max_layer=1 << 30)
    doc = json.loads(good)
    doc["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json"
    with pytest.raises(InvalidInputError, match="not a bbsnap image"):
        artifact.read_manifest(json.dumps(doc).encode(), max_layer=1 << 30)
    doc = json.loads(good)
    doc["layers"][0]["size"] = 1 << 40
    with pytest.raises(HostileImageError, match="over the limit"):
        artifact.read_manifest(json.dumps(doc).encode(), max_layer=1 << 30)


V1_KEYS = {"digest", "id", "type", "name", "description", "arch", "firmware", "username",
           "min_ram", "virtual_size", "consistency", "created_at", "parent", "ancestor",
           "source_server"}


def _chain_entry(index: int, volumes: tuple[artifact.VolumeEntry, ...] = ()
                 ) -> artifact.ChainEntry:
    return artifact.ChainEntry(
        digest="sha256:" + str(index + 1) * 64, origin_id=f"img-aaaa{index}",
        type=ImageType.UPLOAD, name="n", description="", arch="x86_64", firmware="bios",
        username=None, min_ram=None, virtual_size=1 << 20, consistency=None,
        created_at="2026-11-01T08:00:00+00:00", parent=None, ancestor=None, volumes=volumes)


def test_single_disk_config_is_version_1_as_before():
    """Older pullers read single-disk images: the same keys, no volumes, the v1 type."""
    entries = [_chain_entry(0)]
    doc = json.loads(artifact.config_blob(entries))
    assert doc["bbsnap"] == 1 and set(doc) == {"bbsnap", "chain"}
    assert set(doc["chain"][0]) == V1_KEYS
    assert artifact.config_media_type(entries) == artifact.CONFIG_MEDIA_TYPE


def test_multi_disk_config_is_version_2_with_its_disk_list():
    from bbsnap.registry import disk_layout

    vdb = artifact.VolumeEntry("vdb", "sha256:" + "9" * 64, 1 << 20)
    entries = [_chain_entry(0, (vdb,))]
    doc = json.loads(artifact.config_blob(entries, disk_layout.disk_list(entries)))
    assert doc["bbsnap"] == 2
    assert doc["chain"][0]["volumes"] == [{"target": "vdb", "digest": vdb.digest,
                                           "virtual_size": 1 << 20, "backing": None}]
    assert [d["target"] for d in doc["disks"]] == ["vda", "vdb"]
    # A bbsnap reading only version 1 stops at the config's media type (its one check).
    assert artifact.config_media_type(entries) == artifact.CONFIG_MEDIA_TYPE_V2
    sizes = {entries[0].digest: 100, vdb.digest: 50}
    layers = disk_layout.manifest_layers(entries, sizes)
    assert [d.annotations[artifact.DISK] for d in layers] == ["vda", "vdb"]
    config = artifact.Descriptor(artifact.CONFIG_MEDIA_TYPE_V2, "sha256:" + "2" * 64, 10, {})
    pulled = artifact.read_manifest(artifact.manifest(config, layers, {}), max_layer=1 << 30)
    assert pulled.version == 2
    assert artifact.read_config(artifact.config_blob(entries, doc["disks"]), pulled) == entries


def test_one_layer_shared_by_too_many_disks_is_refused():
    """Each use is a download: 20 images with 15 disks of one layer are 320 files."""
    from bbsnap.registry import disk_layout

    shared = "sha256:" + "f" * 64
    entries = []
    for index in range(20):
        volumes = tuple(artifact.VolumeEntry(f"vd{chr(ord('b') + n)}", shared, 1 << 20)
                        for n in range(15))
        entry = _chain_entry(0, volumes)
        entries.append(artifact.ChainEntry(**{
            **vars(entry), "digest": f"sha256:{index:064x}", "origin_id": f"img-aa{index:03d}",
            "parent": f"img-aa{index - 1:03d}" if index else None}))
    sizes = {e.digest: 100 for e in entries} | {shared: 100}
    config = artifact.Descriptor(artifact.CONFIG_MEDIA_TYPE_V2, "sha256:" + "2" * 64, 10, {})
    pulled = artifact.read_manifest(artifact.manifest(
        config, disk_layout.manifest_layers(entries, sizes), {}), max_layer=1 << 30)
    assert len(pulled.layers) == 21
    with pytest.raises(HostileImageError, match="320 disk files"):
        artifact.read_config(artifact.config_blob(entries, disk_layout.disk_list(entries)),
                             pulled)


@pytest.mark.parametrize("target", ["vda", "../x", "vd/b", "VDB", "v", "vdb\n", "vdbbbbbbb", 7])
def test_disk_names_are_short_lowercase_names_and_not_the_first_disk(target):
    from bbsnap.registry import disk_layout

    assert not disk_layout.valid_target(target)
    assert disk_layout.valid_target("vdb") and disk_layout.valid_target("sdc")


def _header(**fields: object) -> Qcow2Header:
    plain: dict[str, object] = {"version": 3, "virtual_size": 1 << 30, "cluster_bits": 16,
                                "incompatible_features": 0, "nb_snapshots": 0,
                                "extensions": (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE)}
    return Qcow2Header(**{**plain, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(("fields", "words"), [
    ({}, None),
    ({"compatible_features": 1}, None),                 # lazy refcounts
    ({"incompatible_features": 1 << 4}, None),          # extended L2 reads as it is
    ({"autoclear_features": 1, "extensions": (EXT_BITMAPS,)}, "bitmaps"),
    ({"extensions": (EXT_BITMAPS,)}, "extension 0x23852875"),
    ({"incompatible_features": 1}, "dirty"),
    ({"compatible_features": 2}, "compatible"),
    ({"extensions": (EXT_FEATURE_TABLE, 0x12345678)}, "extension 0x12345678"),
])
def test_what_makes_a_pulled_layer_rewritten(fields, words):
    reason = layer_store.rewrite_reason(_header(**fields))
    assert reason is None if words is None else words in (reason or "")

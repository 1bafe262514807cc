"""A registry is untrusted input: crafted manifests, configs and layers served by a
registry of our own on 127.0.0.1 are refused by `images pull` with one error line and a
non-zero exit, register nothing, leave no file, and read no host byte."""

from __future__ import annotations

import json

from bbsnap.registry import artifact
from tests import hostile_registry as fixtures
from tests.conftest import Bbsnap
from tests.hostile_registry import SIZE, Served, delta, refused, sha
from tests.images import MIB, run
from tests.registry import env_with_auth

hostile = fixtures.hostile
base = fixtures.base
secret_file = fixtures.secret_file


def test_a_well_formed_artifact_from_our_server_is_pulled(bbsnap, hostile, base):
    """The control case: the server's artifacts are real ones, so each refusal below is
    for what was crafted, not for the server."""
    hostile.publish("good", [base], virtual_sizes=[SIZE])
    result = bbsnap("images", "pull", f"{hostile.host}/h/x:good")
    assert result.exit_code == 0, result.stderr
    assert bbsnap.rows() == 1


def test_token_auth_with_credentials_from_the_auth_file(bbsnap, hostile, base, work_dir):
    """Bearer token auth (a token server answering for basic credentials): without
    credentials the pull is refused with the login hint; with them it succeeds, and the
    token request named the repository's pull scope and the service."""
    hostile.credentials = ("tok-user", "tok-pass")
    hostile.publish("v1", [base], virtual_sizes=[SIZE])
    refused(bbsnap, f"{hostile.host}/h/x:v1", "registry login")
    env = env_with_auth(work_dir, hostile.host, "tok-user", "tok-pass")
    result = Bbsnap(bbsnap.data_dir, env=env)("images", "pull", f"{hostile.host}/h/x:v1")
    assert result.exit_code == 0, result.stderr
    assert hostile.tokens_issued
    assert "scope=repository%3Ah%2Fx%3Apull" in hostile.tokens_issued[0]
    assert "service=hostile" in hostile.tokens_issued[0]
    assert "tok-pass" not in result.stderr


def test_layer_whose_bytes_are_not_its_digest(bbsnap, hostile, base):
    hostile.publish("v1", [base], virtual_sizes=[SIZE])
    digest = next(d for d, s in hostile.blobs.items() if s.body == base.read_bytes())
    tampered = bytearray(base.read_bytes())
    tampered[-1] ^= 0xFF
    hostile.blobs[digest] = Served(bytes(tampered))
    refused(bbsnap, f"{hostile.host}/h/x:v1", "checksum mismatch")


def test_config_blob_whose_bytes_are_not_its_digest(bbsnap, hostile, base):
    manifest = hostile.publish("v1", [base], virtual_sizes=[SIZE])
    config = json.loads(hostile.manifests[manifest].body)["config"]["digest"]
    body = hostile.blobs[config].body
    hostile.blobs[config] = Served(body.replace(b'"layer 0"', b'"layer X"'))
    refused(bbsnap, f"{hostile.host}/h/x:v1", "has the digest")


def test_delta_layer_naming_a_host_file_as_backing(bbsnap, hostile, base, work_dir,
                                                   secret_file):
    crafted = delta(work_dir, "evil.qcow2", str(secret_file), fmt="raw")
    hostile.publish("v1", [base, crafted], virtual_sizes=[SIZE, SIZE])
    refused(bbsnap, f"{hostile.host}/h/x:v1", "backing file")


def test_delta_layer_naming_a_relative_path_out(bbsnap, hostile, base, work_dir):
    crafted = delta(work_dir, "evil.qcow2", "../../../../etc/passwd", fmt="raw")
    hostile.publish("v1", [base, crafted], virtual_sizes=[SIZE, SIZE])
    refused(bbsnap, f"{hostile.host}/h/x:v1", "backing file")


def test_base_layer_with_a_backing_file(bbsnap, hostile, work_dir, secret_file):
    crafted = delta(work_dir, "evil.qcow2", str(secret_file), fmt="raw")
    hostile.publish("v1", [crafted], virtual_sizes=[SIZE])
    refused(bbsnap, f"{hostile.host}/h/x:v1", "backing file")


def test_layer_with_an_external_data_file(bbsnap, hostile, work_dir, secret_file):
    path = work_dir / "datafile.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"data_file={secret_file},data_file_raw=on", str(path), str(MIB))
    hostile.publish("v1", [path], virtual_sizes=[MIB])
    refused(bbsnap, f"{hostile.host}/h/x:v1", "data file")


def test_config_lying_about_the_virtual_size(bbsnap, hostile, base):
    hostile.publish("v1", [base], virtual_sizes=[SIZE * 8])
    refused(bbsnap, f"{hostile.host}/h/x:v1", "config says")


def test_huge_layer_is_refused_before_download(bbsnap, hostile, base):
    hostile.publish("v1", [base], virtual_sizes=[SIZE], sizes=[3 << 40])
    refused(bbsnap, f"{hostile.host}/h/x:v1", "over the limit")
    layer = sha(base.read_bytes())
    assert not [r for r in hostile.requests if r == f"GET /v2/h/x/blobs/{layer}"]


def test_layer_longer_than_the_manifest_says(bbsnap, hostile, base):
    data = base.read_bytes()
    hostile.publish("v1", [base], virtual_sizes=[SIZE], sizes=[len(data) - 4096])
    refused(bbsnap, f"{hostile.host}/h/x:v1", "more bytes")


def test_qcow2_bomb_claiming_a_huge_disk(bbsnap, hostile, work_dir):
    bomb = work_dir / "bomb.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(bomb), "4T")
    hostile.publish("v1", [bomb], virtual_sizes=[4 << 40])
    refused(bbsnap, f"{hostile.host}/h/x:v1", "over the limit")


def test_layer_with_more_data_than_its_header_allows(bbsnap, hostile, work_dir):
    small = work_dir / "small.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(small), str(MIB))
    padded = work_dir / "padded.qcow2"
    padded.write_bytes(small.read_bytes() + b"\x01" * (32 * MIB))
    hostile.publish("v1", [padded], virtual_sizes=[MIB])
    refused(bbsnap, f"{hostile.host}/h/x:v1", "runs past")


def test_manifest_indexes_nested_without_end(bbsnap, hostile, base):
    digest = hostile.publish("inner", [base], virtual_sizes=[SIZE])
    size = len(hostile.manifests[digest].body)
    for level in range(4):
        digest = hostile.index_of(f"level{level}", digest, size,
                                  artifact.OCI_MANIFEST if level == 0 else artifact.OCI_INDEX)
        size = len(hostile.manifests[digest].body)
    refused(bbsnap, f"{hostile.host}/h/x:level3", "nest")


def test_manifest_served_under_another_digest(bbsnap, hostile, base):
    digest = hostile.publish("v1", [base], virtual_sizes=[SIZE])
    other = hostile.publish("v2", [base], virtual_sizes=[SIZE], sizes=None,
                            config_override=None)
    assert other == digest
    fake = "sha256:" + "0" * 64
    hostile.manifests[fake] = hostile.manifests[digest]
    refused(bbsnap, f"{hostile.host}/h/x@{fake}", "has the digest")


def test_config_whose_chain_does_not_match_the_layers(bbsnap, hostile, base, work_dir):
    second = delta(work_dir, "d.qcow2", str(base))
    config = json.dumps({"bbsnap": 1, "chain": []}).encode()
    hostile.publish("v1", [base, second], virtual_sizes=[SIZE, SIZE], config_override=config)
    refused(bbsnap, f"{hostile.host}/h/x:v1", "does not match")


def test_config_with_hostile_text_fields(bbsnap, hostile, base):
    digest = sha(base.read_bytes())
    entry = {"digest": digest, "id": "img-aaaaa", "type": "upload", "name": "x" * 5000,
             "description": "", "arch": "x86_64", "firmware": "bios", "username": None,
             "min_ram": None, "virtual_size": SIZE, "consistency": None,
             "created_at": "2026-11-01T08:00:00+00:00", "parent": None, "ancestor": None}
    config = json.dumps({"bbsnap": 1, "chain": [entry]}).encode()
    hostile.publish("v1", [base], virtual_sizes=[SIZE], config_override=config)
    refused(bbsnap, f"{hostile.host}/h/x:v1", "refused")


def test_not_json_manifest_and_unknown_media_types(bbsnap, hostile, base):
    hostile.serve_manifest("junk", b"\x00\xff not json", artifact.OCI_MANIFEST)
    refused(bbsnap, f"{hostile.host}/h/x:junk", "not valid json")
    digest = hostile.publish("v1", [base], virtual_sizes=[SIZE])
    document = json.loads(hostile.manifests[digest].body)
    document["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
    hostile.serve_manifest("tar", json.dumps(document).encode(), artifact.OCI_MANIFEST)
    refused(bbsnap, f"{hostile.host}/h/x:tar", "media type")

"""images push / pull through a real registry (Debian's docker-registry on 127.0.0.1):
chains as layers, equal content and links after a pull into another data directory,
pull again is a no-op, a later snapshot uploads only its delta, authentication."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import Bbsnap
from tests.disk import prune_chain
from tests import registry as fixtures
from tests.registry import PASSWORD, USER, env_with_auth

registry = fixtures.registry
auth_registry = fixtures.auth_registry

UPLOADED = "bytes uploaded)"


def rows(data: Path) -> dict[str, dict[str, object]]:
    with sqlite3.connect(data / "catalogue.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM images")}


def uploaded(stderr: str) -> int:
    line = [x for x in stderr.splitlines() if x.endswith(UPLOADED)][-1]
    return int(line.rsplit("(", 1)[1].split()[0])


def test_push_pull_chain_equal_content_links_and_no_op_again(work_dir, registry):
    chain = prune_chain.build(work_dir / "a")
    source, target = Bbsnap(work_dir / "a"), Bbsnap(work_dir / "b")
    ref = f"{registry.host}/team/devbox:snap3"
    pushed = source("images", "push", chain.snapshots[3], ref)
    assert pushed.exit_code == 0, pushed.stderr
    assert pushed.stdout.strip().startswith("sha256:")

    # A standard tool reads the artifact: media types, titles, the backing annotations.
    raw = json.loads(subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                     f"docker://{ref}"], check=True, capture_output=True,
                                    text=True).stdout)
    assert raw["artifactType"] == "application/vnd.bbsnap.image.v1"
    assert raw["config"]["mediaType"] == "application/vnd.bbsnap.image.config.v1+json"
    assert len(raw["layers"]) == 5
    titles = [layer["annotations"]["org.opencontainers.image.title"] for layer in raw["layers"]]
    assert [layer["annotations"].get("dev.bbsnap.backing") for layer in raw["layers"]] == \
        [None, *titles[:-1]]
    assert all(layer["mediaType"] == "application/vnd.bbsnap.image.layer.v1.qcow2"
               for layer in raw["layers"])

    pulled = target("images", "pull", ref)
    assert pulled.exit_code == 0, pulled.stderr
    top = pulled.stdout.strip()
    got = rows(work_dir / "b")
    assert len(got) == 5
    # Walk the pulled chain from its top: same names, parent links, the base as ancestor.
    walk, current = [], got[top]
    while True:
        walk.append(current)
        if current["parent_id"] is None:
            break
        current = got[str(current["parent_id"])]
    walk.reverse()
    assert [w["name"] for w in walk] == ["base", "snap 0", "snap 1", "snap 2", "snap 3"]
    base_id = walk[0]["id"]
    assert all(w["ancestor_id"] == base_id for w in walk[1:])
    assert all(w["status"] == "available" for w in walk)
    assert walk[0]["type"] == "upload" and walk[-1]["type"] == "snapshot"
    # Another machine's server names are not this one's: no local history takes them in.
    assert [w["source_server"] for w in walk] == [None] * 5
    history = target("images", "list", "--server", prune_chain.SERVER, "-s")
    assert history.exit_code == 0 and history.stdout == "", history.stderr
    # Equal content, image by image; the stored files name their backing relatively.
    originals = [chain.base, *chain.snapshots]
    for original, copy in zip(originals, walk, strict=True):
        mine = work_dir / "b" / "images" / str(copy["path"])
        assert prune_chain.same(chain.file(original), mine), original
        info = json.loads(prune_chain.run("qemu-img", "info", "--output=json", str(mine)))
        parent = copy["parent_id"]
        assert info.get("backing-filename") == (f"{parent}.qcow2" if parent else None)
    # A second pull registers nothing and prints the same id.
    again = target("images", "pull", ref)
    assert again.exit_code == 0, again.stderr
    assert again.stdout.strip() == top
    assert "already image" in again.stderr
    assert len(rows(work_dir / "b")) == 5
    # Destroying the pulled base is refused: its snapshots are stored on it.
    refused = target("images", "destroy", str(base_id))
    assert refused.exit_code == 4, refused.stderr


def test_later_snapshot_uploads_only_its_delta(work_dir, registry):
    chain = prune_chain.build(work_dir / "a")
    source = Bbsnap(work_dir / "a")
    first = source("images", "push", chain.snapshots[1], f"{registry.host}/team/delta:s1")
    assert first.exit_code == 0, first.stderr
    second = source("images", "push", chain.snapshots[3], f"{registry.host}/team/delta:s3")
    assert second.exit_code == 0, second.stderr
    images = work_dir / "a" / "images"
    new_files = sum((images / f"{i}.qcow2").stat().st_size for i in chain.snapshots[2:])
    whole = sum((images / f"{i}.qcow2").stat().st_size for i in [chain.base, *chain.snapshots])
    # The new deltas, the config blob and the manifest: not the base or older snapshots.
    assert new_files <= uploaded(second.stderr) <= new_files + 64 * 1024
    assert uploaded(second.stderr) < whole / 5
    # A push to another repository of the same registry mounts instead of uploading.
    third = source("images", "push", chain.snapshots[3], f"{registry.host}/other/repo:s3")
    assert third.exit_code == 0, third.stderr
    assert "mounted" in third.stderr
    assert uploaded(third.stderr) < 64 * 1024
    # The same push again sends only the manifest.
    fourth = source("images", "push", chain.snapshots[3], f"{registry.host}/team/delta:s3")
    assert fourth.exit_code == 0 and uploaded(fourth.stderr) < 64 * 1024


def test_pulled_image_pushed_on_is_named_by_its_layers(work_dir, registry):
    """Another machine pushing what it pulled (plus nothing) sends no layer again."""
    chain = prune_chain.build(work_dir / "a")
    ref = f"{registry.host}/team/relay:s2"
    assert Bbsnap(work_dir / "a")("images", "push", chain.snapshots[2], ref).exit_code == 0
    other = Bbsnap(work_dir / "b")
    top = other("images", "pull", ref).stdout.strip()
    again = other("images", "push", top, f"{registry.host}/team/relay:copy")
    assert again.exit_code == 0, again.stderr
    assert uploaded(again.stderr) < 64 * 1024
    assert "uploaded (" not in again.stderr


def test_basic_auth_from_the_auth_file_and_login(work_dir, auth_registry):
    chain = prune_chain.build(work_dir / "a")
    ref = f"{auth_registry.host}/team/secret:v1"
    anonymous = Bbsnap(work_dir / "a", env={"REGISTRY_AUTH_FILE": str(work_dir / "none.json"),
                                            "DOCKER_CONFIG": str(work_dir / "nodocker")})
    refused = anonymous.process("images", "push", chain.base, ref)
    assert refused.exit_code == 1
    errors = [x for x in refused.stderr.splitlines() if x.startswith("bbsnap: error:")]
    assert len(errors) == 1 and "registry login" in errors[0], refused.stderr

    auth_file = work_dir / "login" / "auth.json"
    env = {"REGISTRY_AUTH_FILE": str(auth_file)}
    user = Bbsnap(work_dir / "a", env=env)
    wrong = user.process("registry", "login", auth_registry.host, "-u", USER,
                         "--password-stdin", stdin=b"wrong\n")
    assert wrong.exit_code == 1 and "refused" in wrong.stderr, wrong.stderr
    assert not auth_file.exists()
    good = user.process("registry", "login", auth_registry.host, "-u", USER,
                        "--password-stdin", stdin=PASSWORD.encode() + b"\n")
    assert good.exit_code == 0, good.stderr
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    assert PASSWORD not in good.stderr + good.stdout
    pushed = user.process("images", "push", chain.base, ref)
    assert pushed.exit_code == 0, pushed.stderr
    pulled = Bbsnap(work_dir / "b", env=env_with_auth(work_dir, auth_registry.host))(
        "images", "pull", ref)
    assert pulled.exit_code == 0, pulled.stderr
    assert prune_chain.same(chain.file(chain.base), next((work_dir / "b" / "images").glob(
        "img-*.qcow2")))
    # The password is in no catalogue row and no file of the data directories.
    for data in (work_dir / "a", work_dir / "b"):
        for path in data.rglob("*"):
            if path.is_file() and path.stat().st_size < 1 << 20:
                assert PASSWORD.encode() not in path.read_bytes(), path
    out = user.process("registry", "logout", auth_registry.host)
    assert out.exit_code == 0 and USER not in auth_file.read_text()


def test_bad_references_are_usage_errors(work_dir, registry):
    chain = prune_chain.build(work_dir / "a")
    source = Bbsnap(work_dir / "a")
    for bad in ("http://127.0.0.1:5000/x:y", "127.0.0.1:5000/UPPER:y", "127.0.0.1:5000/x:bad tag",
                f"{registry.host}/x@sha256:1234"):
        result = source("images", "push", chain.base, bad)
        assert result.exit_code == 2, (bad, result.stderr)
    missing = source("images", "pull", f"{registry.host}/nothing/here:v1")
    assert missing.exit_code == 3, missing.stderr
    unknown = source("images", "push", "img-zzzzz", f"{registry.host}/x:y")
    assert unknown.exit_code == 3, unknown.stderr
    assert os.path.exists(work_dir / "a" / "catalogue.sqlite3")


def test_tls_registry_is_spoken_to_over_verified_tls(work_dir):
    """A registry on 127.0.0.1 that speaks TLS gets TLS (certificates checked: trusted
    through SSL_CERT_FILE it works, untrusted it is refused, never retried in plain HTTP)."""
    chain = prune_chain.build(work_dir / "a")
    with fixtures.running_registry(tls=True) as secure:
        ref = f"{secure.host}/tls/x:v1"
        untrusted = Bbsnap(work_dir / "a").process("images", "push", chain.base, ref)
        assert untrusted.exit_code == 1
        assert "certificate" in untrusted.stderr.lower(), untrusted.stderr
        trusted = {"SSL_CERT_FILE": str(secure.certificate)}
        pushed = Bbsnap(work_dir / "a", env=trusted).process("images", "push", chain.base, ref)
        assert pushed.exit_code == 0, pushed.stderr
        pulled = Bbsnap(work_dir / "b", env=trusted).process("images", "pull", ref)
        assert pulled.exit_code == 0, pulled.stderr
        stored = work_dir / "b" / "images" / f"{pulled.stdout.strip()}.qcow2"
        assert prune_chain.same(chain.file(chain.base), stored)
        # Through an HTTPS proxy, as URL import honours https_proxy (and no_proxy).
        proxy = fixtures.ConnectProxy()
        try:
            via = {**trusted, "https_proxy": f"http://127.0.0.1:{proxy.port}", "no_proxy": ""}
            again = Bbsnap(work_dir / "c", env=via).process("images", "pull", ref)
        finally:
            proxy.close()
        assert again.exit_code == 0, again.stderr
        assert proxy.tunnels and set(proxy.tunnels) == {secure.host}


def test_plain_http_registry_through_an_http_proxy(work_dir, registry):
    """http_proxy, as URL import honours it: every request to a plain-HTTP registry goes to
    the proxy with its absolute URL, for a push (--insecure) and a pull (a loopback
    registry that does not speak TLS: the TLS probe goes direct, as no https_proxy is set)."""
    chain = prune_chain.build(work_dir / "a")
    ref = f"{registry.host}/proxied/x:v1"
    proxy = fixtures.HttpProxy()
    try:
        via = {"http_proxy": proxy.url, "no_proxy": ""}
        pushed = Bbsnap(work_dir / "a", env=via).process("images", "push", "--insecure",
                                                         chain.snapshots[1], ref)
        assert pushed.exit_code == 0, pushed.stderr
        pulled = Bbsnap(work_dir / "b", env=via).process("images", "pull", ref)
        assert pulled.exit_code == 0, pulled.stderr
    finally:
        proxy.close()
    top = work_dir / "b" / "images" / f"{pulled.stdout.strip()}.qcow2"
    assert prune_chain.same(chain.file(chain.snapshots[1]), top)
    assert proxy.requests
    assert all(r.split(" ", 1)[1].startswith(f"http://{registry.host}/v2/")
               for r in proxy.requests), proxy.requests
    methods = {r.split(" ", 1)[0] for r in proxy.requests}
    assert {"HEAD", "POST", "PATCH", "PUT", "GET"} <= methods, methods
    blob_reads = [r for r in proxy.requests if r.startswith("GET ") and "/blobs/" in r]
    assert len(blob_reads) >= 4, proxy.requests  # the config and the three layers


def test_concurrent_pulls_of_one_chain_register_it_once(work_dir, registry):
    chain = prune_chain.build(work_dir / "a")
    ref = f"{registry.host}/team/together:s3"
    assert Bbsnap(work_dir / "a")("images", "push", chain.snapshots[3], ref).exit_code == 0
    env = {**os.environ, "BBSNAP_HOME": str(work_dir / "b"), "BBSNAP_CONFIG": ""}
    Bbsnap(work_dir / "b")("images", "list")  # the data directory exists before the race
    runs = [subprocess.Popen([sys.executable, "-m", "bbsnap.cli.main", "images", "pull", ref],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(3)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [o[1] for o in outputs]
    assert len({out.strip() for out, _err in outputs}) == 1
    assert len(rows(work_dir / "b")) == 5

"""Importing from http:// URLs served by a local, misbehaving server on 127.0.0.1.

Each test checks the outcome and, when the import must fail, that nothing is
left: no catalogue row, no file. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bbsnap.transfer import checksums
from bbsnap.transfer import http_source
from bbsnap.errors import BbsnapError, InvalidInputError
from bbsnap.transfer.sidecar import Sidecar, to_json
from tests.disk.test_hostile_import import assert_no_secret_copied, assert_refused
from tests.httpserver import HttpServer, Resource, running
from tests.images import MIB, qcow2_disk, raw_disk, read_bytes, run

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours *_proxy: keep every request on the loopback server."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture()
def server() -> Iterator[HttpServer]:
    with running() as state:
        yield state


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_json(bbsnap, image_id: str) -> dict:
    result = bbsnap("images", "show", image_id, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def imported(bbsnap, result) -> dict:
    assert result.exit_code == 0, result.stderr
    record = image_json(bbsnap, result.stdout.strip())
    assert record["state"] == "available"
    assert list((bbsnap.data_dir / "tmp").iterdir()) == []
    return record


def stored_file(bbsnap, record: dict) -> Path:
    return bbsnap.data_dir / "images" / f"{record['id']}.qcow2"


@pytest.fixture()
def qcow2_gz(work_dir: Path) -> tuple[Path, bytes]:
    """A gzip-compressed qcow2 (the source disk and the bytes served)."""
    source = qcow2_disk(work_dir / "source.qcow2", pattern=0x5A)
    return source, gzip.compress(source.read_bytes())


def test_good_image_is_imported_with_its_checksum(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    url = server.serve("/images/debian-12-genericcloud-amd64.qcow2.gz", data)
    record = imported(bbsnap, bbsnap("images", "import", url,
                                     "--checksum", f"sha256:{sha256(data)}"))
    assert record["checksum"] == f"sha256:{sha256(data)}"
    assert record["name"] == "debian-12-genericcloud-amd64"  # from the URL's file name
    assert record["format"] == "qcow2" and record["virtual_size"] == 8 * MIB
    assert read_bytes(stored_file(bbsnap, record), "qcow2", MIB, 512) == b"\x5a" * 512
    assert [s.range for s in server.requests("/images/debian-12-genericcloud-amd64.qcow2.gz")] \
        == [None]


def test_reader_reports_content_length_and_stops_at_the_end(server):
    url = server.serve("/blob", b"x" * 1000)
    reader = http_source.open_url(url, timeout=5)
    try:
        assert reader.length == 1000
        assert reader.read(-1) == b"x" * 1000 and reader.read(10) == b""
    finally:
        reader.close()


@pytest.mark.parametrize("kind", ["gzip-qcow2", "qcow2"])
def test_dropped_connection_is_resumed_with_a_range_request(bbsnap, server, work_dir, kind):
    source = qcow2_disk(work_dir / "source.qcow2", pattern=0x3C)
    data = gzip.compress(source.read_bytes()) if kind == "gzip-qcow2" else source.read_bytes()
    half = len(data) // 2
    url = server.serve("/disk", data, drop_after=half)

    record = imported(bbsnap, bbsnap("images", "import", url, "-n", "resumed"))

    seen = server.requests("/disk")
    assert [s.range for s in seen] == [None, f"bytes={half}-"]
    assert seen[1].headers.get("if-range") == '"v1"'
    assert record["checksum"] == f"sha256:{sha256(data)}"
    stored = stored_file(bbsnap, record)
    assert read_bytes(stored, "qcow2", 0, 8 * MIB) == read_bytes(source, "qcow2", 0, 8 * MIB)


def test_connection_reset_is_resumed(bbsnap, server, work_dir):
    source = raw_disk(work_dir / "source.raw", pattern=0x42)
    data = source.read_bytes()
    url = server.serve("/disk.raw", data, drop_after=3 * MIB // 2, reset=True,
                       etag=None, last_modified="Wed, 21 Oct 2015 07:28:00 GMT")

    record = imported(bbsnap, bbsnap("images", "import", url))

    seen = server.requests("/disk.raw")
    assert len(seen) == 2 and seen[1].range is not None
    # A reset may discard bytes in flight: the resume starts wherever the client got to.
    assert 0 <= int(seen[1].range.removeprefix("bytes=").rstrip("-")) <= 3 * MIB // 2
    assert seen[1].headers.get("if-range") == "Wed, 21 Oct 2015 07:28:00 GMT"
    assert record["checksum"] == f"sha256:{sha256(data)}"
    assert read_bytes(stored_file(bbsnap, record), "qcow2", 0, 8 * MIB) == data


def test_read_timeout_is_resumed(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    url = server.serve("/slow.qcow2.gz", data, stall_after=len(data) // 3)
    record = imported(bbsnap, bbsnap("images", "import", url,
                                     env={"BBSNAP_HTTP_TIMEOUT": "1"}))
    assert [s.range for s in server.requests("/slow.qcow2.gz")] \
        == [None, f"bytes={len(data) // 3}-"]
    assert record["checksum"] == f"sha256:{sha256(data)}"


def test_gives_up_after_bounded_retries(bbsnap, server, qcow2_gz, monkeypatch):
    monkeypatch.setattr(http_source, "RETRY_DELAYS", (0.0,) * 5)
    _, data = qcow2_gz
    url = server.serve("/flaky", data, drop_after=100, resume_body=False)
    assert_refused(bbsnap, bbsnap("images", "import", url), exit_code=1,
                   words="gave up after 5 attempts to resume")
    assert len(server.requests("/flaky")) == 1 + 5


def test_server_without_range_support_that_drops_is_a_clear_error(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    url = server.serve("/norange", data, ranges=False, etag=None, drop_after=len(data) // 2)
    assert_refused(bbsnap, bbsnap("images", "import", url), exit_code=1,
                   words="the server cannot resume")
    assert server.requests("/norange")[1].range == f"bytes={len(data) // 2}-"


def test_resume_from_the_wrong_offset_is_refused(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    url = server.serve("/shifted", data, drop_after=len(data) // 2, range_shift=-10)
    assert_refused(bbsnap, bbsnap("images", "import", url),
                   words=f"asked to resume at byte {len(data) // 2}")


def test_file_changed_on_the_server_during_the_download(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    newer = Resource(body=data[::-1], etag='"v2"')
    url = server.serve("/moving", data, drop_after=len(data) // 2, changed=newer)
    assert_refused(bbsnap, bbsnap("images", "import", url), words="changed on the server")


def test_hostile_rules_apply_to_downloaded_data(bbsnap, server, work_dir):
    secret = work_dir / "host-secret"
    secret.write_bytes(b"BBSNAP-HOST-SECRET-" + b"s3cr3t" * 50 + bytes(MIB))
    evil = work_dir / "evil.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(evil))
    url = server.serve("/evil.qcow2", evil.read_bytes())
    assert_refused(bbsnap, bbsnap("images", "import", url), words="backing file")
    assert_no_secret_copied(bbsnap)


def test_truncated_download_with_an_honest_length_is_refused(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    url = server.serve("/cut.gz", data[: len(data) // 2])
    assert_refused(bbsnap, bbsnap("images", "import", url), words="truncated")


def test_wrong_bytes_fail_the_checksum(bbsnap, server, work_dir, qcow2_gz):
    _, data = qcow2_gz
    wrong = gzip.compress(raw_disk(work_dir / "other.raw").read_bytes())
    url = server.serve("/dist/disk.qcow2.gz", wrong)
    assert_refused(bbsnap, bbsnap("images", "import", url, "--checksum", f"sha256:{sha256(data)}"),
                   words="checksum mismatch")
    sums = work_dir / "SHA256SUMS"
    sums.write_text(f"{sha256(data)}  disk.qcow2.gz\n")
    assert_refused(bbsnap, bbsnap("images", "import", url, "--checksum-file", str(sums)),
                   words="checksum mismatch")


@pytest.mark.parametrize("where", ["path", "url"])
@pytest.mark.parametrize("layout", ["gnu", "binary", "bsd"])
def test_checksum_file(bbsnap, server, work_dir, qcow2_gz, where, layout):
    _, data = qcow2_gz
    line = {"gnu": f"{sha256(data)}  disk.qcow2.gz",
            "binary": f"{sha256(data)} *disk.qcow2.gz",
            "bsd": f"SHA256 (disk.qcow2.gz) = {sha256(data)}"}[layout]
    text = f"{sha256(b'other')}  other.qcow2.gz\n{line}\n-----BEGIN PGP SIGNATURE-----\n"
    url = server.serve("/dist/disk.qcow2.gz", data)
    if where == "url":
        sums = server.serve("/dist/SHA256SUMS", text.encode())
    else:
        (work_dir / "SHA256SUMS").write_text(text)
        sums = str(work_dir / "SHA256SUMS")
    record = imported(bbsnap, bbsnap("images", "import", url, "--checksum-file", sums))
    assert record["checksum"] == f"sha256:{sha256(data)}"


def test_checksum_file_for_a_local_image(bbsnap, work_dir, qcow2_gz):
    _, data = qcow2_gz
    image = work_dir / "local.qcow2.gz"
    image.write_bytes(data)
    (work_dir / "SHA256SUMS").write_text(f"{sha256(data)}  ./local.qcow2.gz\n")
    record = imported(bbsnap, bbsnap("images", "import", str(image),
                                     "--checksum-file", str(work_dir / "SHA256SUMS")))
    assert record["checksum"] == f"sha256:{sha256(data)}"


@pytest.mark.parametrize("where", ["path", "url"])
def test_name_missing_from_the_checksum_file_fails_before_the_download(
        bbsnap, server, work_dir, qcow2_gz, where):
    _, data = qcow2_gz
    url = server.serve("/dist/disk.qcow2.gz", data)
    text = f"{sha256(data)}  disk.qcow2\n"  # a near miss is still a miss
    if where == "url":
        sums = server.serve("/dist/SHA256SUMS", text.encode())
    else:
        (work_dir / "SHA256SUMS").write_text(text)
        sums = str(work_dir / "SHA256SUMS")
    assert_refused(bbsnap, bbsnap("images", "import", url, "--checksum-file", sums),
                   exit_code=1, words="disk.qcow2.gz is not listed")
    assert server.requests("/dist/disk.qcow2.gz") == []


def test_missing_checksum_file_is_not_found(bbsnap, server, qcow2_gz):
    url = server.serve("/dist/disk.qcow2.gz", qcow2_gz[1])
    assert_refused(bbsnap, bbsnap("images", "import", url, "--checksum-file",
                                  server.url("/dist/SHA256SUMS")), exit_code=3, words="404")


def test_checksum_and_checksum_file_together_is_a_usage_error(bbsnap, server, work_dir):
    url = server.serve("/disk.qcow2.gz", b"x")
    (work_dir / "SUMS").write_text("")
    result = bbsnap("images", "import", url, "--checksum", "sha256:" + "0" * 64,
                    "--checksum-file", str(work_dir / "SUMS"))
    assert_refused(bbsnap, result, exit_code=2, words="cannot be used together")
    assert server.seen == []


def test_checksum_file_with_stdin_is_a_usage_error(bbsnap, work_dir):
    (work_dir / "SUMS").write_text("")
    result = bbsnap("images", "import", "-", "--checksum-file", str(work_dir / "SUMS"),
                    input=b"data")
    assert_refused(bbsnap, result, exit_code=2, words="needs a file name")


@pytest.mark.parametrize(("status", "exit_code"), [(404, 3), (410, 3), (500, 1), (403, 1)])
def test_http_errors(bbsnap, server, status, exit_code):
    url = server.serve("/broken.qcow2", status=status)
    assert_refused(bbsnap, bbsnap("images", "import", url), exit_code=exit_code,
                   words=f"HTTP {status}")


def test_unknown_path_is_not_found(bbsnap, server):
    assert_refused(bbsnap, bbsnap("images", "import", server.url("/nothing-here.qcow2")),
                   exit_code=3, words="HTTP 404")


def test_redirects_are_followed(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    server.serve("/latest/disk.qcow2.gz", location="/releases/v2/disk.qcow2.gz")
    server.serve("/releases/v2/disk.qcow2.gz", location=server.url("/pool/disk-v2.qcow2.gz"))
    server.serve("/pool/disk-v2.qcow2.gz", data)
    record = imported(bbsnap, bbsnap("images", "import", server.url("/latest/disk.qcow2.gz")))
    assert record["name"] == "disk"  # named after the address asked for, not the target


def test_redirect_loop_is_a_clear_error(bbsnap, server):
    server.serve("/a.qcow2", location="/b.qcow2")
    server.serve("/b.qcow2", location="/a.qcow2")
    assert_refused(bbsnap, bbsnap("images", "import", server.url("/a.qcow2")), exit_code=1,
                   words="redirects in a loop")
    assert len(server.requests("/a.qcow2")) == 1  # seen once more would be the loop


def test_too_many_redirects(bbsnap, server):
    for hop in range(12):
        server.serve(f"/hop{hop}", location=f"/hop{hop + 1}")
    assert_refused(bbsnap, bbsnap("images", "import", server.url("/hop0")), exit_code=1,
                   words="redirects more than 10 times")


def test_redirect_to_a_local_file_is_refused(bbsnap, server):
    server.serve("/sneaky.qcow2", location="file:///etc/passwd")
    assert_refused(bbsnap, bbsnap("images", "import", server.url("/sneaky.qcow2")),
                   words="other than an http")


def test_connection_refused_is_a_clear_error(bbsnap):
    with running() as gone:  # a port that was just in use, closed on leaving the block
        dead = gone.url("/x.qcow2")
    assert_refused(bbsnap, bbsnap("images", "import", dead), exit_code=1, words="cannot download")


def _sidecar(**fields: object) -> bytes:
    values = {"name": "From the sidecar", "virtual_size": 8 * MIB, "arch": "aarch64",
              "description": "sidecar words", "username": "debian", "min_ram": 768,
              "firmware": "uefi", "format": "qcow2", "compression": "gzip", **fields}
    return to_json(Sidecar(**values)).encode()  # type: ignore[arg-type]


def test_sidecar_supplies_metadata(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    url = server.serve("/d/disk.qcow2.gz", data)
    server.serve("/d/disk.qcow2.gz.json", _sidecar(sha256=sha256(data)))
    record = imported(bbsnap, bbsnap("images", "import", url))
    assert (record["name"], record["arch"], record["username"], record["min_ram"],
            record["description"], record["firmware"]) == ("From the sidecar", "aarch64",
                                                           "debian", 768, "sidecar words", "uefi")
    assert record["checksum"] == f"sha256:{sha256(data)}"


def test_flags_override_the_sidecar(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    url = server.serve("/d/disk.qcow2.gz", data)
    server.serve("/d/disk.qcow2.gz.json", _sidecar())
    record = imported(bbsnap, bbsnap("images", "import", url, "-n", "mine", "-a", "x86_64",
                                     "-u", "admin", "--min-ram", "2048", "-d", "",
                                     "--firmware", "bios"))
    assert (record["name"], record["arch"], record["username"], record["min_ram"],
            record["description"], record["firmware"]) == ("mine", "x86_64", "admin", 2048, "",
                                                           "bios")


def test_sidecar_beside_a_local_file(bbsnap, work_dir, qcow2_gz):
    _, data = qcow2_gz
    image = work_dir / "local.qcow2.gz"
    image.write_bytes(data)
    (work_dir / "local.qcow2.gz.json").write_bytes(_sidecar(username="alpine"))
    record = imported(bbsnap, bbsnap("images", "import", str(image)))
    assert (record["name"], record["username"]) == ("From the sidecar", "alpine")
    ignored = imported(bbsnap, bbsnap("images", "import", str(image), "--no-sidecar"))
    assert (ignored["name"], ignored["username"]) == ("local", None)


def test_sidecar_lying_about_the_size_is_refused(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    url = server.serve("/d/disk.qcow2.gz", data)
    server.serve("/d/disk.qcow2.gz.json", _sidecar(virtual_size=16 * MIB))
    assert_refused(bbsnap, bbsnap("images", "import", url), exit_code=1,
                   words=f"the sidecar says {16 * MIB} bytes, the image is {8 * MIB}")


def test_sidecar_with_an_unknown_firmware_is_refused(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    url = server.serve("/d/disk.qcow2.gz", data)
    server.serve("/d/disk.qcow2.gz.json", _sidecar(firmware="coreboot"))
    assert_refused(bbsnap, bbsnap("images", "import", url), exit_code=1,
                   words="'coreboot' is not a firmware")


def test_sidecar_with_the_wrong_digest_is_refused(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    url = server.serve("/d/disk.qcow2.gz", data)
    server.serve("/d/disk.qcow2.gz.json", _sidecar(sha256=sha256(b"another file")))
    assert_refused(bbsnap, bbsnap("images", "import", url), words="checksum mismatch")


def test_explicit_checksum_wins_over_the_sidecar_digest(bbsnap, server, qcow2_gz):
    _, data = qcow2_gz
    url = server.serve("/d/disk.qcow2.gz", data)
    server.serve("/d/disk.qcow2.gz.json", _sidecar(sha256=sha256(b"stale")))
    imported(bbsnap, bbsnap("images", "import", url, "--checksum", f"sha256:{sha256(data)}"))


@pytest.mark.parametrize(("served", "words"), [
    ({"status": 500}, "HTTP 500"),
    ({"body": b"{not json"}, "not valid JSON"),
    ({"body": json.dumps({"bbsnap_sidecar": 1, "name": "x", "virtual_size": 1,
                          "username": "Root Shell"}).encode()}, "not a valid login name"),
])
def test_unusable_sidecar_is_an_error(bbsnap, server, qcow2_gz, served, words):
    url = server.serve("/d/disk.qcow2.gz", qcow2_gz[1])
    server.serve("/d/disk.qcow2.gz.json", **served)
    assert_refused(bbsnap, bbsnap("images", "import", url), exit_code=1, words=words)
    assert server.requests("/d/disk.qcow2.gz") == []  # refused before the image was fetched


# --- checksum lists, without the network ---------------------------------------------------

def test_checksum_lines_are_parsed():
    digest = "AB" * 32
    assert checksums.parse_line(f"{digest}  a.img\r\n") == (digest.lower(), "a.img")
    assert checksums.parse_line(f"{digest} *a b.img") == (digest.lower(), "a b.img")
    assert checksums.parse_line(f"SHA256 (a.img) = {digest}") == (digest.lower(), "a.img")
    assert checksums.parse_line(f"SHA512 (a.img) = {digest}") is None
    assert checksums.parse_line("# a comment") is None


def test_checksum_list_with_two_digests_for_one_name_is_refused():
    text = f"{'1' * 64}  a.img\n{'2' * 64}  ./a.img\n"
    with pytest.raises(InvalidInputError, match="2 different"):
        checksums.lookup(text, "a.img", "SUMS")


def test_other_directories_entries_do_not_match():
    with pytest.raises(InvalidInputError, match="not listed"):
        checksums.lookup(f"{'1' * 64}  old/a.img\n", "a.img", "SUMS")


def test_messages_hide_credentials_and_query():
    assert http_source.display("https://u:pw@example.org:8443/a.img?sig=secret") \
        == "https://example.org:8443/a.img"
    with pytest.raises(BbsnapError):
        http_source.check_url("http:///no-host")


@pytest.mark.parametrize(("fmt", "compress"), [("raw", "gzip"), ("raw", "zstd"), ("raw", "none"),
                                               ("qcow2", "xz")])
def test_an_export_downloads_back_with_its_sidecar_and_sha256_file(bbsnap, server, work_dir,
                                                                   fmt, compress):
    """The contract with `images export`: FILE, FILE.json and FILE.sha256 served side by side."""
    disk = qcow2_disk(work_dir / "orig.qcow2", pattern=0x77)
    first = imported(bbsnap, bbsnap("images", "import", str(disk), "-n", "orig", "-u", "debian",
                                    "--min-ram", "300"))
    out = work_dir / "out" / "exported.img"
    out.parent.mkdir()
    result = bbsnap("images", "export", first["id"], "-o", str(out), "--format", fmt,
                    "--compress", compress)
    assert result.exit_code == 0, result.stderr
    for path in out.parent.iterdir():
        server.serve(f"/pub/{path.name}", path.read_bytes())

    record = imported(bbsnap, bbsnap("images", "import", server.url("/pub/exported.img"),
                                     "--checksum-file", server.url("/pub/exported.img.sha256")))
    assert (record["name"], record["username"], record["min_ram"]) == ("orig", "debian", 300)
    assert record["checksum"] == f"sha256:{sha256(out.read_bytes())}"
    assert read_bytes(stored_file(bbsnap, record), "qcow2", 0, 8 * MIB) \
        == read_bytes(disk, "qcow2", 0, 8 * MIB)


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_http_timeout_is_a_usage_error(bbsnap, server, value):
    url = server.serve("/x.qcow2", b"x")
    result = bbsnap("images", "import", url, env={"BBSNAP_HTTP_TIMEOUT": value})
    assert_refused(bbsnap, result, exit_code=2, words="positive number of seconds")
    assert server.seen == []


def test_url_with_a_space_is_a_usage_error(bbsnap, server):
    assert_refused(bbsnap, bbsnap("images", "import", server.url("/my disk.qcow2")),
                   exit_code=2, words="percent-encode")
    assert server.seen == []


# --- endless, slow and dribbling servers: refused soon, with nothing left --------------------

def test_endless_body_that_is_no_disk_is_refused_at_its_head(bbsnap, server):
    url = server.serve("/endless.img", endless=bytes(64 * 1024))
    # The cap only bounds this test on code that reads the whole stream before vetting it.
    result = bbsnap("images", "import", url, env={"BBSNAP_MAX_DECOMPRESSED_SIZE": "64M"})
    assert_refused(bbsnap, result, words="not a disk image")
    assert len(server.requests("/endless.img")) == 1


def test_endless_body_after_a_qcow2_header_is_cut_at_what_the_header_allows(bbsnap, server,
                                                                           work_dir):
    small = work_dir / "small.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(small), "1M")
    url = server.serve("/endless.qcow2", small.read_bytes(), endless=b"\xab" * 65536)
    # The decompression cap only bounds this test on code without the header's bound.
    result = bbsnap("images", "import", url, env={"BBSNAP_MAX_DECOMPRESSED_SIZE": "64M"})
    assert_refused(bbsnap, result, words="runs past")


def test_endless_raw_disk_is_cut_at_the_virtual_size_limit(bbsnap, server):
    mbr = bytes(510) + b"\x55\xaa"
    url = server.serve("/endless.raw", mbr, endless=b"\xab" * 65536)
    result = bbsnap("images", "import", url, env={"BBSNAP_MAX_VIRTUAL_SIZE": "16M",
                                                   "BBSNAP_MAX_DECOMPRESSED_SIZE": "64M"})
    assert_refused(bbsnap, result, words="over the limit")


def test_trickle_below_the_minimum_rate_is_refused(bbsnap, server, qcow2_gz):
    """Four bytes a second never trips the read timeout; the minimum rate stops it within
    one http_timeout window (code without it waits out the trickle, then imports)."""
    _, data = qcow2_gz
    url = server.serve("/trickle.qcow2.gz", data, trickle=0.25, trickle_bytes=16)
    result = bbsnap("images", "import", url, env={"BBSNAP_HTTP_TIMEOUT": "1"})
    assert_refused(bbsnap, result, words="too slow")
    assert "http_min_rate" in result.stderr
    assert len(server.requests("/trickle.qcow2.gz")) == 1


def test_one_byte_per_connection_runs_out_of_resumes(bbsnap, server, monkeypatch):
    monkeypatch.setattr(http_source, "RETRY_DELAYS", (0.0,) * 5)
    body = bytes(510) + b"\x55\xaa" + bytes(1536)
    url = server.serve("/dribble.raw", body, per_connection=1)
    assert_refused(bbsnap, bbsnap("images", "import", url),
                   words="gave up after 5 attempts to resume (none delivered")
    assert len(server.requests("/dribble.raw")) == 1 + 5


def test_resumes_are_bounded_overall(bbsnap, server, monkeypatch):
    """Each connection delivers enough to count as progress; their number is still bounded."""
    monkeypatch.setattr(http_source, "RETRY_DELAYS", (0.0,) * 5)
    monkeypatch.setattr(http_source, "RESUME_MIN_BYTES", 100)
    monkeypatch.setattr(http_source, "MAX_RESUMES", 5)
    body = bytes(510) + b"\x55\xaa" + bytes(3584)
    url = server.serve("/drops.raw", body, per_connection=200)
    assert_refused(bbsnap, bbsnap("images", "import", url), words="dropped 6 times")
    assert len(server.requests("/drops.raw")) == 6


@pytest.mark.parametrize("value", ["0", "fast"])
def test_bad_http_min_rate_is_a_usage_error(bbsnap, server, value):
    url = server.serve("/x.qcow2", b"x")
    result = bbsnap("images", "import", url, env={"BBSNAP_HTTP_MIN_RATE": value})
    assert_refused(bbsnap, result, exit_code=2, words="BBSNAP_HTTP_MIN_RATE")
    assert server.seen == []

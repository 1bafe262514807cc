"""images list/show/update/destroy through the CLI, on real imported images."""

from __future__ import annotations

import json
import yaml

from bbsnap.state.catalogue import Catalogue
from bbsnap.models import DependentKind, ImageStatus, ImageType
from tests.images import raw_disk


def _import(bbsnap, work_dir, name: str, *extra: str) -> str:
    source = raw_disk(work_dir / f"{abs(hash(name))}.raw")
    result = bbsnap("images", "import", str(source), "--name", name, *extra)
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def test_list_looks_like_the_seed(bbsnap, work_dir):
    image_id = _import(bbsnap, work_dir, "arch-latest", "--arch", "x86_64")
    out = bbsnap("images", "list").stdout.splitlines()
    assert out[0].split() == ["id", "owner", "type", "created_on", "status", "size", "arch", "name"]
    assert out[0].startswith(" id ")
    assert set(out[1]) == {"-"} and out[1] == out[3] and len(out[1]) == len(out[0])
    row = out[2].split()
    assert row[0] == image_id and row[2:] == [row[2], row[3], "private", "8", "x86_64", "arch-latest"]
    assert row[2] == "upload"
    # `images` alone lists too (list is the default verb)
    assert bbsnap("images").stdout.splitlines() == out


def test_snapshots_are_listed_after_other_images_by_creation_time(bbsnap, work_dir):
    older_snapshot = _import(bbsnap, work_dir, "first")
    upload = _import(bbsnap, work_dir, "second")
    newer_snapshot = _import(bbsnap, work_dir, "third")
    catalogue = Catalogue(bbsnap.data_dir / "catalogue.sqlite3")
    for image_id in (older_snapshot, newer_snapshot):
        catalogue.update(image_id, type=ImageType.SNAPSHOT)
    catalogue.close()
    ids = [line.split("\t")[0] for line in bbsnap("images", "list", "-s").stdout.splitlines()]
    assert ids == [upload, older_snapshot, newer_snapshot]


def test_filters_by_type_and_status(bbsnap, work_dir):
    image_id = _import(bbsnap, work_dir, "one")
    assert bbsnap("images", "list", "--type", "snapshot", "-s").stdout == ""
    assert image_id in bbsnap("images", "list", "--type", "upload", "-s").stdout
    assert image_id in bbsnap("images", "list", "--status", "private", "-s").stdout
    assert bbsnap("images", "list", "--status", "public", "-s").stdout == ""
    assert bbsnap("images", "list", "--status", "bogus").exit_code == 2


def test_show_has_the_seed_fields_and_data_formats(bbsnap, work_dir):
    image_id = _import(bbsnap, work_dir, "web", "--username", "debian", "--min-ram", "128")
    text = bbsnap("images", "show", image_id).stdout
    keys = [line.split(":", 1)[0].strip() for line in text.splitlines()]
    for key in ("id", "type", "owner", "created_at", "status", "arch", "name", "description",
                "virtual_size", "disk_size", "compatibility_mode", "official", "ancestor_id",
                "parent_id", "format", "username", "min_ram", "checksum"):
        assert key in keys
    colons = {line.index(":") for line in text.splitlines()}
    assert len(colons) == 1, "keys are right-aligned on the colon"
    as_json = json.loads(bbsnap("images", "show", image_id, "--format", "json").stdout)
    as_yaml = yaml.safe_load(bbsnap("images", "show", image_id, "--format", "yaml").stdout)
    assert as_json == as_yaml
    assert as_json["virtual_size"] == 8 * 1024 * 1024 and as_json["created_at"].endswith("+00:00")
    assert as_json["username"] == "debian" and as_json["min_ram"] == 128
    assert as_json["firmware"] == "bios"  # unless --firmware uefi says otherwise
    uefi = _import(bbsnap, work_dir, "efi", "--firmware", "uefi")
    assert "firmware: uefi" in bbsnap("images", "show", uefi).stdout
    both = json.loads(bbsnap("images", "show", image_id, image_id, "--format", "json").stdout)
    assert isinstance(both, list) and len(both) == 2


def test_show_unknown_and_malformed_ids(bbsnap):
    assert bbsnap("images", "show", "img-zzzzz").exit_code == 3
    malformed = bbsnap("images", "show", "../../etc/passwd")
    assert malformed.exit_code == 2 and "not a valid img id" in malformed.stderr


def test_special_characters_are_kept_verbatim_and_never_reach_a_path(bbsnap, work_dir):
    name = "<b>&amp; 'quoted' \"double\"\nsecond line ../../etc/passwd"
    image_id = _import(bbsnap, work_dir, name, "--description", name)
    record = json.loads(bbsnap("images", "show", image_id, "--format", "json").stdout)
    assert record["name"] == name and record["description"] == name
    shown = bbsnap("images", "show", image_id).stdout
    escaped = name.replace("\n", "\\n")  # show escapes control characters, as tables do
    assert f"       name: {escaped}\n" in shown and f"description: {escaped}\n" in shown
    table = bbsnap("images", "list").stdout
    assert len(table.splitlines()) == 4, "a newline in a name must not break the table"
    files = [p.name for p in (bbsnap.data_dir / "images").iterdir()]
    assert files == [f"{image_id}.qcow2"]


def test_update_changes_fields(bbsnap, work_dir):
    image_id = _import(bbsnap, work_dir, "old")
    result = bbsnap("images", "update", image_id, "--name", "new", "--description", "d",
                    "--username", "ubuntu", "--arch", "aarch64", "--min-ram", "512", "--public",
                    "--firmware", "uefi", "--format", "json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["name"], record["description"], record["username"], record["arch"],
            record["min_ram"], record["status"], record["public"], record["firmware"]) == (
        "new", "d", "ubuntu", "aarch64", 512, "public", True, "uefi")
    assert bbsnap("images", "update", image_id, "--private").stdout.count("status: private") == 1
    assert bbsnap("images", "update", image_id).exit_code == 2
    assert bbsnap("images", "update", image_id, "--username", "Bad User").exit_code == 2
    assert bbsnap("images", "update", image_id, "--firmware", "coreboot").exit_code == 2
    assert bbsnap("images", "update", "img-zzzzz", "--name", "x").exit_code == 3


def test_destroy_removes_row_from_listing_and_file(bbsnap, work_dir):
    image_id = _import(bbsnap, work_dir, "doomed")
    result = bbsnap("images", "destroy", image_id)
    assert result.exit_code == 0, result.stderr
    assert bbsnap("images", "list", "-s").stdout == ""
    assert bbsnap.files() == []
    assert bbsnap("images", "show", image_id).exit_code == 3
    assert bbsnap("images", "list", "--status", "deleted", "-s").stdout.startswith(image_id)
    assert bbsnap("images", "destroy", image_id).exit_code == 3


def test_destroy_refuses_an_image_others_depend_on(bbsnap, work_dir):
    base = _import(bbsnap, work_dir, "base")
    child = _import(bbsnap, work_dir, "child")
    catalogue = Catalogue(bbsnap.data_dir / "catalogue.sqlite3")
    catalogue.add_dependent(base, DependentKind.IMAGE, child)
    catalogue.add_dependent(base, DependentKind.SERVER, "srv-abcde")
    catalogue.close()

    refused = bbsnap("images", "destroy", base)
    assert refused.exit_code == 4
    assert child in refused.stderr and "srv-abcde" in refused.stderr
    assert (bbsnap.data_dir / "images" / f"{base}.qcow2").exists()
    shown = json.loads(bbsnap("images", "show", base, "--format", "json").stdout)
    assert shown["dependents"] == [child, "srv-abcde"] and shown["state"] == "available"

    # Destroying the dependent image releases its hold; the server's hold remains.
    assert bbsnap("images", "destroy", child).exit_code == 0
    assert bbsnap("images", "destroy", base).exit_code == 4
    catalogue = Catalogue(bbsnap.data_dir / "catalogue.sqlite3")
    catalogue.remove_dependent(DependentKind.SERVER, "srv-abcde")
    catalogue.close()
    assert bbsnap("images", "destroy", base).exit_code == 0


def test_destroy_several_reports_each_and_fails_overall(bbsnap, work_dir):
    image_id = _import(bbsnap, work_dir, "one")
    result = bbsnap("images", "destroy", "img-zzzzz", image_id)
    assert result.exit_code == 3
    assert "img-zzzzz" in result.stderr
    assert bbsnap("images", "list", "-s").stdout == ""


def test_interrupted_import_is_recovered_as_failed(bbsnap, work_dir):
    image_id = _import(bbsnap, work_dir, "will-be-stale")
    catalogue = Catalogue(bbsnap.data_dir / "catalogue.sqlite3")
    # Simulate a crashed importer: row back to creating, a dead job token, work files left.
    catalogue.update(image_id, status=ImageStatus.CREATING, job="999999999:1:deadbeef")
    catalogue.close()
    (bbsnap.data_dir / "tmp" / f"{image_id}.download").write_bytes(b"partial")

    record = json.loads(bbsnap("images", "show", image_id, "--format", "json").stdout)
    assert record["state"] == "failed" and "interrupted" in record["failure_reason"]
    assert bbsnap.files() == []
    assert bbsnap("images", "destroy", image_id).exit_code == 0


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                min_size=1, max_size=80).filter(lambda t: t.strip())


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=_TEXT, description=_TEXT)
def test_any_name_and_description_round_trip_verbatim(bbsnap, work_dir, name, description):
    image_id = bbsnap.data_dir.name and _shared_image(bbsnap, work_dir)
    result = bbsnap("images", "update", image_id, "--name", name, "--description", description,
                    "--format", "json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(bbsnap("images", "show", image_id, "--format", "json").stdout)
    assert (record["name"], record["description"]) == (name, description)
    assert yaml.safe_load(bbsnap("images", "show", image_id, "--format", "yaml").stdout)[
        "name"] == name
    assert len(bbsnap("images", "list").stdout.splitlines()) == 4
    assert sorted(p.name for p in (bbsnap.data_dir / "images").iterdir()) == [f"{image_id}.qcow2"]


def _shared_image(bbsnap, work_dir) -> str:
    listed = bbsnap("images", "list", "-s").stdout.split()
    return listed[0] if listed else _import(bbsnap, work_dir, "fuzzed")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.sampled_from(["../../etc/passwd", "/etc/passwd", "img-../x", "img-abcde/..",
                                  "srv-abcde;rm -rf /", "img-abcde\n", "$(id)", "`id`",
                                  "img-*", "img-abcd?"]),
                 st.text(max_size=30).filter(lambda t: t and not t.startswith("-"))))
def test_ids_that_look_like_paths_or_commands_are_refused(bbsnap, key):
    for args in (("images", "show", key), ("images", "destroy", key),
                 ("images", "export", key, "-o", "/dev/null")):
        result = bbsnap(*args)
        assert result.exit_code in (2, 3), (args, result.stderr)
        assert "bbsnap: error:" in result.stderr
    assert not (bbsnap.data_dir / "images").exists() or \
        all(p.name.startswith("img-") for p in (bbsnap.data_dir / "images").iterdir())


def test_the_entry_point_flushes_its_output_and_keeps_exit_codes(bbsnap, work_dir):
    """`bbsnap` leaves with os._exit (cli/main.py): output must be flushed first."""
    image_id = _import(bbsnap, work_dir, "flushed")
    listed = bbsnap.process("images", "list")
    assert listed.exit_code == 0 and image_id in listed.stdout
    assert listed.stdout.rstrip().endswith("-")  # the whole table, closing rule included
    missing = bbsnap.process("images", "show", "img-zzzzz")
    assert missing.exit_code == 3 and "img-zzzzz not found" in missing.stderr


def test_a_reader_that_goes_away_is_not_an_error(bbsnap, work_dir):
    import os
    import subprocess
    import sys

    _import(bbsnap, work_dir, "piped")
    reader, writer = os.pipe()
    os.close(reader)  # like `bbsnap images list | head -0`: nobody will read
    try:
        done = subprocess.run([sys.executable, "-m", "bbsnap.cli.main", "images", "list"],
                              stdout=writer, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **bbsnap.env}, timeout=60)
    finally:
        os.close(writer)
    assert done.returncode == 141, done.stderr  # as if killed by SIGPIPE
    assert "error" not in done.stderr

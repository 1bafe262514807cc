import pytest

from bbsnap import ids
from bbsnap.cli import render
from bbsnap.errors import ConflictError, UsageError


def test_new_ids_are_well_formed_and_distinct():
    made = {ids.new_id("img") for _ in range(500)}
    assert len(made) == 500
    assert all(ids.is_valid(i, "img") and len(i) == 9 for i in made)


@pytest.mark.parametrize("bad", ["img-ABCDE", "img-abcd", "img-abcdef", "srv-abcde", "../img-abcde",
                                 "img-abc/e", "img-abcde\n", ""])
def test_malformed_ids_are_refused(bad):
    with pytest.raises(UsageError):
        ids.require(bad, "img")


def test_table_has_rules_as_wide_as_the_header_and_escapes_control_characters():
    out = render.table(["id", "name"], [["img-aaaaa", "two\nlines"], ["img-bbbbb", "x"]])
    lines = out.splitlines()
    assert len(lines) == 5
    assert lines[1] == lines[4] == "-" * len(lines[0])
    assert lines[2] == " img-aaaaa  two\\nlines"


def test_table_columns_fit_the_widest_cell_of_any_kind():
    out = render.table(["id", "size", "name"], [["img-a", 10240, None], ["img-bbbbbb", 5, "é\x1b"]])
    assert out.splitlines() == [" id          size   name ",
                                "-------------------------",
                                " img-a       10240       ",
                                " img-bbbbbb  5      é\\x1b",
                                "-------------------------"]
    assert render.table(["id"], []) == " id\n---\n---\n"


def test_vertical_right_aligns_keys():
    assert render.vertical([("id", 1), ("virtual_size", 2)]) == "          id: 1\nvirtual_size: 2\n"


def test_json_is_sorted_and_stable():
    assert render.as_json({"b": 1, "a": "é"}) == '{\n  "a": "é",\n  "b": 1\n}\n'


@pytest.mark.parametrize("active, processed, total, percent", [
    (True, 0, 1000, 0), (True, 333, 1000, 33), (True, 1000, 1000, 99),  # 100 only once available
    (True, 5, 0, None),          # QEMU has not said yet how much there is to copy
    (False, 1000, 1000, None),   # no job running: nothing to report
])
def test_job_progress_in_percent(active, processed, total, percent):
    from bbsnap.hypervisor import JobStatus
    assert JobStatus(active=active, processed=processed, total=total).percent == percent


def test_progress_is_shown_only_while_there_is_one():
    from bbsnap.state.catalogue import utcnow
    from bbsnap.cli.image_views import as_record, show_pairs
    from bbsnap.models import Image, ImageStatus, ImageType

    copying = Image(id="img-aaaaa", type=ImageType.SNAPSHOT, owner="me", created_at=utcnow(),
                    status=ImageStatus.CREATING, name="s", progress=12)
    assert ("progress", "12%") in show_pairs(copying, [])
    assert as_record(copying)["progress"] == 12
    available = Image(id="img-bbbbb", type=ImageType.SNAPSHOT, owner="me", created_at=utcnow(),
                      status=ImageStatus.AVAILABLE, name="s")
    assert "progress" not in dict(show_pairs(available, []))
    assert as_record(available)["progress"] is None


def test_waiting_on_a_terminal_shows_the_copy_s_progress(tmp_path):
    """`--wait`'s line on a terminal, fed by a real catalogue the worker would update."""
    import io

    from bbsnap.state.catalogue import Catalogue, utcnow
    from bbsnap.cli.reporter import TerminalReporter
    from bbsnap.models import Image, ImageStatus, ImageType
    from bbsnap.services.snapshots.wait import wait_settled

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    catalogue = Catalogue(tmp_path / "c.sqlite3")
    catalogue.add(Image(id="img-aaaaa", type=ImageType.SNAPSHOT, owner="me", created_at=utcnow(),
                        status=ImageStatus.CREATING, name="s", disk_size=3 << 20, progress=41))

    def recover() -> None:  # the worker finishes while the command waits
        catalogue.finish_snapshot("img-aaaaa", [], status=ImageStatus.AVAILABLE)

    terminal = Terminal()
    try:
        (settled,) = wait_settled(catalogue, ["img-aaaaa"], recover,
                                  reporter=TerminalReporter(terminal), poll=0)
    finally:
        catalogue.close()
    assert settled.status is ImageStatus.AVAILABLE
    bar = "#" * 12 + "." * 18
    assert terminal.getvalue() == f"\rimg-aaaaa: copying [{bar}] 3 MiB so far\n"


def test_firmware_names():
    from bbsnap.services.image_fields import check_firmware
    assert [check_firmware(f) for f in ("bios", "uefi")] == ["bios", "uefi"]
    with pytest.raises(UsageError, match="not a firmware"):
        check_firmware("coreboot")


def test_the_cli_offers_the_firmwares_bbsnap_boots():
    from bbsnap.cli.images import FIRMWARES
    from bbsnap.services.image_fields import FIRMWARES as CHECKED
    assert FIRMWARES == CHECKED


def test_allocate_returns_the_first_id_its_claim_accepts():
    offered: list[str] = []

    def claim(candidate: str) -> bool:
        offered.append(candidate)
        return len(offered) == 3  # two ids "taken" first

    allocated = ids.allocate("img", claim)
    assert allocated == offered[-1] and ids.is_valid(allocated, "img") and len(offered) == 3


def test_allocate_gives_up_with_a_conflict_not_an_internal_error():
    with pytest.raises(ConflictError, match="could not allocate a free srv id after 4") as caught:
        ids.allocate("srv", lambda _candidate: False, attempts=4)
    assert caught.value.exit_code == 4

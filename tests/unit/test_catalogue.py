import sqlite3
import threading

import pytest

from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.state.migrations import MIGRATIONS, SCHEMA_VERSION
from bbsnap.errors import BbsnapError, CatalogueError, ConflictError, InUseError, NotFoundError
from bbsnap.models import DependentKind, Image, ImageFilter, ImageStatus, ImageType, Visibility


def _image(image_id: str, **fields) -> Image:
    base = {"id": image_id, "type": ImageType.UPLOAD, "owner": "me", "created_at": utcnow(),
            "status": ImageStatus.AVAILABLE, "name": image_id}
    base.update(fields)
    return Image(**base)


@pytest.fixture()
def catalogue(tmp_path):
    cat = Catalogue(tmp_path / "c.sqlite3")
    yield cat
    cat.close()


def test_schema_is_migrated_and_in_wal_mode(tmp_path, catalogue):
    assert catalogue.schema_version == SCHEMA_VERSION
    with sqlite3.connect(tmp_path / "c.sqlite3") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    Catalogue(tmp_path / "c.sqlite3").close()  # reopening is a no-op migration


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "n.sqlite3"
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(Exception, match="newer than this"):
        Catalogue(path)


def test_a_catalogue_of_an_older_bbsnap_is_migrated_with_its_rows(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as raw:  # the schema bbsnap shipped before `progress`
        for migration in MIGRATIONS[:2]:
            for statement in migration:
                raw.execute(statement)
        raw.execute("PRAGMA user_version = 2")
        raw.execute("INSERT INTO images (id, type, owner, created_at, updated_at, status, name, "
                    "arch) VALUES ('img-old00', 'upload', 'me', ?, ?, 'available', 'old', "
                    "'x86_64')", (utcnow().isoformat(), utcnow().isoformat()))
    cat = Catalogue(path)
    try:
        assert cat.schema_version == SCHEMA_VERSION
        old = cat.get("img-old00")
        assert old.name == "old" and old.progress is None
    finally:
        cat.close()


def test_every_migration_step_is_one_whole_statement():
    for migration in MIGRATIONS:
        assert not isinstance(migration, str)  # statements, never a script split on ';'
        for statement in migration:
            # Complete once terminated, and not before: exactly one statement.
            assert sqlite3.complete_statement(statement + ";")
            assert not sqlite3.complete_statement(statement)


@pytest.mark.parametrize("ending", ["finish", "fail"])
def test_a_snapshot_that_ends_no_longer_shows_progress(catalogue, ending):
    catalogue.add(_image("img-ccccc", type=ImageType.SNAPSHOT, status=ImageStatus.CREATING))
    assert catalogue.update("img-ccccc", progress=37).progress == 37
    if ending == "finish":
        ended = catalogue.finish_snapshot("img-ccccc", [], status=ImageStatus.AVAILABLE)
    else:
        ended = catalogue.fail_snapshot("img-ccccc", "the copy failed")
    assert ended.progress is None


def test_round_trip_of_every_field(catalogue):
    image = _image("img-aaaaa", description="d", virtual_size=5, disk_size=3,
                   ancestor_id="img-bbbbb",
                   username="debian", min_ram=128, checksum="sha256:00", official=True,
                   progress=42)
    catalogue.add(image)
    assert catalogue.get("img-aaaaa") == image


def test_failed_transaction_changes_nothing(catalogue):
    catalogue.add(_image("img-aaaaa"))
    with pytest.raises(RuntimeError):
        with catalogue.transaction() as db:
            db.execute("UPDATE images SET name = 'changed'")
            raise RuntimeError("boom")
    assert catalogue.get("img-aaaaa").name == "img-aaaaa"


def test_update_with_expected_status(catalogue):
    catalogue.add(_image("img-aaaaa", status=ImageStatus.CREATING))
    catalogue.update("img-aaaaa", expect_status=ImageStatus.CREATING, status=ImageStatus.AVAILABLE)
    with pytest.raises(ConflictError):
        catalogue.update("img-aaaaa", expect_status=ImageStatus.CREATING, status=ImageStatus.FAILED)


def test_dependents_block_deletion_atomically(catalogue):
    catalogue.add(_image("img-aaaaa"))
    catalogue.add_dependent("img-aaaaa", DependentKind.SERVER, "srv-bbbbb")
    with pytest.raises(InUseError, match="srv-bbbbb"):
        catalogue.mark_deleted("img-aaaaa")
    catalogue.remove_dependent(DependentKind.SERVER, "srv-bbbbb")
    catalogue.mark_deleted("img-aaaaa")
    with pytest.raises(NotFoundError):
        catalogue.get("img-aaaaa")
    with pytest.raises(NotFoundError):
        catalogue.add_dependent("img-aaaaa", DependentKind.SERVER, "srv-ccccc")


def test_list_filters_and_hides_deleted(catalogue):
    catalogue.add(_image("img-aaaaa"))
    catalogue.add(_image("img-bbbbb", status=ImageStatus.FAILED))
    catalogue.add(_image("img-ccccc"))
    catalogue.mark_deleted("img-ccccc")
    assert [i.id for i in catalogue.find()] == ["img-aaaaa", "img-bbbbb"]
    assert [i.id for i in catalogue.find(ImageFilter(status="failed"))] == ["img-bbbbb"]
    assert [i.id for i in catalogue.find(ImageFilter(status="deleted"))] == ["img-ccccc"]


@pytest.mark.parametrize("flt", [None, ImageFilter(status="failed"), ImageFilter(status="private"),
                                 ImageFilter(status="deleted"), ImageFilter(type=ImageType.SNAPSHOT),
                                 ImageFilter(source_server="web")])
def test_summaries_are_the_listed_images_in_the_same_order(catalogue, flt):
    catalogue.add(_image("img-aaaaa", virtual_size=5 << 20, arch="aarch64"))
    catalogue.add(_image("img-bbbbb", status=ImageStatus.FAILED))
    catalogue.add(_image("img-ccccc", type=ImageType.SNAPSHOT, source_server="web"))
    catalogue.add(_image("img-ddddd", visibility=Visibility.PUBLIC, name="shared"))
    catalogue.add(_image("img-eeeee"))
    catalogue.mark_deleted("img-eeeee")
    images, summaries = catalogue.find(flt), catalogue.summaries(flt)
    assert images  # every filter above selects something
    assert [(i.id, i.owner, i.type.value, i.created_at.date().isoformat(), i.display_status,
             i.virtual_size, i.arch, i.name) for i in images] == \
        [(s.id, s.owner, s.type, s.created_on, s.display_status, s.virtual_size, s.arch, s.name)
         for s in summaries]


def test_concurrent_writers_lose_no_rows(tmp_path):
    path = tmp_path / "c.sqlite3"
    Catalogue(path).close()

    def writer(n: int) -> None:
        cat = Catalogue(path)
        for i in range(25):
            cat.add(_image(f"img-{n}{i:04d}"))
        cat.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check = Catalogue(path)
    assert len(check.find()) == 100
    check.close()


# -- durability (DESIGN §8: the main file alone holds every committed row) ---------------------

def _main_file_ids(path) -> list[str]:
    with sqlite3.connect(path.absolute().as_uri() + "?immutable=1", uri=True) as raw:
        return sorted(r[0] for r in raw.execute("SELECT id FROM images"))


def test_checkpoint_puts_every_committed_row_in_the_main_file(tmp_path, catalogue):
    catalogue.add(_image("img-aaaaa"))
    catalogue.update("img-aaaaa", description="x")
    assert catalogue.committed and catalogue.touched == ["img-aaaaa"]
    assert catalogue.checkpoint()
    assert _main_file_ids(tmp_path / "c.sqlite3") == ["img-aaaaa"]
    assert catalogue.wal_path.stat().st_size == 0 and catalogue.wal_frames() == 0
    assert catalogue.missing_from_main_file() == []


def test_rows_only_in_the_wal_are_missing_from_the_main_file(tmp_path, catalogue):
    catalogue.add(_image("img-aaaaa"))
    assert catalogue.checkpoint()
    catalogue.update("img-aaaaa", status=ImageStatus.FAILED)
    catalogue.add(_image("img-bbbbb"))
    assert catalogue.wal_frames() > 0
    assert catalogue.missing_from_main_file() == ["img-aaaaa", "img-bbbbb"]


def test_opening_and_reading_commits_nothing(tmp_path, catalogue):
    catalogue.add(_image("img-aaaaa"))
    reader = Catalogue(tmp_path / "c.sqlite3")
    try:
        reader.find()
        assert not reader.committed and reader.touched == []
    finally:
        reader.close()


def test_a_deleted_wal_is_gone_but_not_replaced_a_new_one_is(tmp_path, catalogue):
    catalogue.add(_image("img-aaaaa"))
    catalogue.wal_path.unlink()
    assert not catalogue.files_replaced()
    catalogue.wal_path.write_bytes(b"")  # another process started a WAL of its own
    assert catalogue.files_replaced()


def test_a_fresh_catalogue_beside_image_files_is_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Catalogue(tmp_path / "empty-images.sqlite3", images_dir=images).close()  # nothing to disown
    (images / "img-aaaaa.qcow2").write_bytes(b"QFI\xfb")
    with pytest.raises(CatalogueError, match="missing or empty.*holds 1 files") as caught:
        Catalogue(tmp_path / "new.sqlite3", images_dir=images)
    assert "restore new.sqlite3 from a backup" in str(caught.value)
    assert not (tmp_path / "new.sqlite3").exists()


def test_a_main_file_whose_tables_lived_in_a_lost_wal_is_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "img-aaaaa.qcow2").write_bytes(b"QFI\xfb")
    path = tmp_path / "c.sqlite3"
    with sqlite3.connect(path) as raw:  # what bbsnap left before checkpoints: a 4 KiB shell
        raw.execute("PRAGMA journal_mode = WAL")
    assert path.stat().st_size > 0
    with pytest.raises(CatalogueError, match="missing or empty"):
        Catalogue(path, images_dir=images)
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    Catalogue(path).close()  # without images_dir (tests, tools) it is set up as before


@pytest.mark.parametrize(("status", "says", "hint"), [
    (ImageStatus.CREATING, "still being created", "bbsnap images show img-use01"),
    (ImageStatus.FAILED, "is failed, not available", "pick another image"),
    (ImageStatus.DELETED, "not found", "bbsnap images list"),
])
def test_only_an_available_image_is_handed_out_for_use(catalogue, status, says, hint):
    catalogue.add(_image("img-use01", status=status))
    with pytest.raises(BbsnapError, match=says) as caught:
        catalogue.get_available("img-use01")
    assert hint in (caught.value.hint or "")


def test_an_available_image_is_handed_out(catalogue):
    catalogue.add(_image("img-use02"))
    assert catalogue.get_available("img-use02").id == "img-use02"


def test_unsynced_commits_are_committed_and_only_they_skip_the_fsync(tmp_path, catalogue):
    """Inside unsynced_commits the connection commits with synchronous = NORMAL (no fsync
    in WAL mode); every other commit, and every commit after it, even one that raised inside,
    is FULL again."""
    def synchronous() -> int:
        return int(catalogue._db.execute("PRAGMA synchronous").fetchone()[0])

    catalogue.add(_image("img-aaaaa"))
    assert synchronous() == 2  # FULL
    with catalogue.unsynced_commits():
        assert synchronous() == 1  # NORMAL
        catalogue.update("img-aaaaa", name="renamed")
    assert synchronous() == 2
    with sqlite3.connect(tmp_path / "c.sqlite3") as other:  # committed: seen by others
        assert other.execute("SELECT name FROM images WHERE id = 'img-aaaaa'"
                             ).fetchone()[0] == "renamed"
    with pytest.raises(ConflictError):
        with catalogue.unsynced_commits():
            catalogue.update("img-aaaaa", expect_status=ImageStatus.CREATING, name="x")
    assert synchronous() == 2 and catalogue.get("img-aaaaa").name == "renamed"
    with catalogue.transaction():
        with pytest.raises(CatalogueError):
            with catalogue.unsynced_commits():
                pass  # the outer transaction's commit would be unsynced too: refused

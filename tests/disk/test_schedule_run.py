"""`schedule run` with servers due and not due: the older snapshots' rows and the schedules'
last runs are made with past times through the catalogue's own API, rather than waiting.
Snapshots come from a stand-in for the snapshot service (a new delta on the chain, as a
chained snapshot is stored); prunes are the real ones, merging real qemu-img files."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.state.layout import DataDir
from bbsnap.models import Image, ImageStatus, ImageType, Schedule
from bbsnap.services.images import ImageService
from bbsnap.services.prune import PruneService
from bbsnap.services.retention import Policy
from bbsnap.services.schedule import ScheduleService, next_due, parse_duration
from tests.disk import prune_chain
from tests.disk.prune_chain import SERVER, build, fake_hypervisor, run, same, server_uuid

HOUR = 3600


class Services:
    """The schedule service on one catalogue connection, with the stand-in snapshotter."""

    def __init__(self, data: DataDir) -> None:
        self.data = data
        self.catalogue = Catalogue(data.catalogue_path)
        self.hv = fake_hypervisor()
        self.taken: list[str] = []
        pruner = PruneService(self.catalogue, data, self.hv,
                              ImageService(self.catalogue, data))
        self.schedules = ScheduleService(
            self.catalogue, data, self.hv,
            snapshot=self.snapshot, prune=lambda key, policy: pruner.prune(key, policy))

    def snapshot(self, key: str, quiesce: bool) -> Image:
        """A new snapshot of the server: a delta on its newest, one write in it."""
        server = self.hv.info(key).name
        newest = max((i for i in self.catalogue.find() if i.source_server == server),
                     key=lambda i: i.created_at)
        image_id = f"img-new{len(self.taken):02d}"
        path = self.data.images_dir / f"{image_id}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
            f"{newest.id}.qcow2", str(path))
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x6{len(self.taken)} 40M 1M", str(path))
        self.taken.append(image_id)
        return self.catalogue.add(Image(
            id=image_id, type=ImageType.SNAPSHOT, owner="local", created_at=utcnow(),
            status=ImageStatus.AVAILABLE, name="scheduled", path=path.name,
            parent_id=newest.id, source_server=server), depends_on=newest.id)

    def schedule(self, server: str, every: int, last_run_ago: float | None,
                 keep_last: int = 0) -> None:
        now = utcnow()
        self.catalogue.set_schedule(Schedule(
            server_uuid=server_uuid(server), server=server, every_seconds=every,
            retention=Policy(last=keep_last).as_dict(), quiesce=True,
            created_at=now - timedelta(days=3),
            last_run=None if last_run_ago is None else now - timedelta(seconds=last_run_ago)))

    def available(self, server: str) -> list[str]:
        return [i.id for i in self.catalogue.find() if i.source_server == server
                and i.status is ImageStatus.AVAILABLE]


def test_schedule_run_does_due_servers_once_and_skips_the_others(work_dir):
    chain = build(work_dir / "data")  # srv-prune: four snapshots from November, hours apart
    services = Services(chain.data)
    refs = prune_chain.references(chain, work_dir / "refs")
    services.schedule(SERVER, HOUR, last_run_ago=2 * HOUR, keep_last=2)   # due
    services.schedule("srv-other", HOUR, last_run_ago=600)                # not due

    results = {r.server: r for r in services.schedules.run()}

    done = results[SERVER]
    assert done.outcome == "done" and done.image_id == "img-new00", done
    assert sorted(done.removed) == chain.snapshots[:3]  # keep-last 2: the new one and s3
    assert sorted(services.available(SERVER)) == sorted([chain.snapshots[3], "img-new00"])
    assert same(chain.file(chain.snapshots[3]), refs[chain.snapshots[3]])
    assert results["srv-other"].outcome == "not due" and not results["srv-other"].failed
    entry = services.catalogue.schedule(server_uuid(SERVER))
    assert entry is not None and entry.last_result == done.outcome + ": " + done.detail
    assert next_due(entry) > utcnow() + timedelta(minutes=59)

    # Idempotent: a second run right after finds nothing due.
    again = {r.server: r.outcome for r in services.schedules.run()}
    assert again == {SERVER: "not due", "srv-other": "not due"}
    assert services.taken == ["img-new00"]


def test_a_concurrent_run_skips_the_server_another_run_is_doing(work_dir):
    chain = build(work_dir / "data")
    services = Services(chain.data)
    services.schedule(SERVER, HOUR, last_run_ago=None, keep_last=1)  # never ran: due
    held = locks.acquire_path(chain.data.locks_dir / f"schedule-{server_uuid(SERVER)}.lock")
    with held:
        (result,) = services.schedules.run()
    assert result.outcome == "skipped" and services.taken == []
    (result,) = services.schedules.run()
    assert result.outcome == "done" and services.taken == ["img-new00"]


def test_a_failed_snapshot_fails_the_run_and_is_recorded(work_dir):
    chain = build(work_dir / "data")
    services = Services(chain.data)
    services.schedule(SERVER, HOUR, last_run_ago=None, keep_last=1)

    def broken(key: str, quiesce: bool) -> Image:
        from bbsnap.errors import ConflictError
        raise ConflictError("server srv-prune has no writable file-backed disk")
    services.schedules._snapshot = broken  # type: ignore[assignment]
    (result,) = services.schedules.run()
    assert result.failed and "no writable" in result.detail
    assert len(services.available(SERVER)) == 4  # nothing pruned after a failed snapshot
    entry = services.catalogue.schedule(server_uuid(SERVER))
    assert entry is not None and entry.last_result is not None and \
        entry.last_result.startswith("failed")


def test_schedule_cli_sets_lists_and_removes(bbsnap, data_dir: Path):
    made = bbsnap("servers", "schedule", "srv-abcde", "--every", "90x")
    assert made.exit_code == 2 and "invalid duration" in made.stderr
    catalogue = Catalogue(DataDir(data_dir).ensure().catalogue_path)
    catalogue.set_schedule(Schedule(server_uuid=server_uuid(SERVER), server=SERVER,
                                    every_seconds=int(parse_duration("1d").total_seconds()),
                                    retention=Policy(last=3, daily=7).as_dict(), quiesce=True,
                                    created_at=utcnow()))
    catalogue.close()
    listed = bbsnap("schedule", "list")
    assert listed.exit_code == 0, listed.stderr
    assert SERVER in listed.stdout and "1d" in listed.stdout and "last=3 daily=7" in listed.stdout
    assert "never" in listed.stdout
    off = bbsnap("servers", "schedule", SERVER, "--off")
    assert off.exit_code == 0, off.stderr
    assert SERVER not in bbsnap("schedule", "list").stdout
    assert bbsnap("servers", "schedule", SERVER, "--off").exit_code == 3

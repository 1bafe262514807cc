"""Snapshot schedules: `servers schedule SRV --every 1h --keep-...`, and `schedule run`, which
does every due snapshot and prune once and exits (for a cron line or a systemd timer).

`schedule run` is idempotent and safe to run concurrently: each server is done under its own
schedule lock (``DATA/locks/schedule-UUID.lock``, taken without waiting: a second run skips a
server another run is doing), and due-ness is read again under that lock, so a server a
concurrent run has just done is not due any more. The snapshot goes through the snapshot
service (taking the server's lock like `servers snapshot`); the run waits for its copy to
finish, then prunes by the server's policy. A run that fails is recorded as the server's
last run too (with the error): a broken server is tried again next interval, not every
minute.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import field
from datetime import datetime, timedelta

from bbsnap.lazy_dataclass import dataclass
from bbsnap.state import locks
from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.errors import BbsnapError, ConflictError, NotFoundError, UsageError
from bbsnap.hypervisor import Hypervisor
from bbsnap.state.layout import DataDir
from bbsnap.models import Image, ImageStatus, Schedule
from bbsnap.services.prune import PruneReport
from bbsnap.services.retention import RULES, Policy

_DURATION = re.compile(r"([1-9][0-9]{0,5})([mhdw])")
_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60}
POLL_SECONDS = 0.25

Snapshotter = Callable[[str, bool], Image]            # (server, quiesce) -> the new image
Pruner = Callable[[str, Policy], PruneReport]         # (server, policy)


def parse_duration(text: str) -> timedelta:
    """``30m``, ``1h``, ``1d``, ``2w`` -> a timedelta (a whole number of one unit)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"invalid duration {text!r}",
                         hint="a whole number and a unit: 30m, 1h, 1d, 1w")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def format_duration(seconds: int) -> str:
    """The largest unit that divides *seconds*: 3600 -> ``1h``, 5400 -> ``90m``."""
    for unit, size in _UNITS.items():
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def policy_of(schedule: Schedule) -> Policy:
    return Policy(**{rule: schedule.retention.get(rule, 0) for rule in RULES})


def next_due(schedule: Schedule) -> datetime:
    """When the server is due: an interval after its last run; at once if it never ran."""
    if schedule.last_run is None:
        return schedule.created_at
    return schedule.last_run + timedelta(seconds=schedule.every_seconds)


@dataclass
class RunResult:
    server: str
    outcome: str                 # "done", "not due", "skipped" or "failed"
    detail: str = ""
    image_id: str | None = None
    removed: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.outcome == "failed"


class ScheduleService:
    def __init__(self, catalogue: Catalogue, data_dir: DataDir, hypervisor: Hypervisor, *,
                 snapshot: Snapshotter | None = None, prune: Pruner | None = None,
                 recover: Callable[[], None] | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._catalogue = catalogue
        self._data_dir = data_dir
        self._hv = hypervisor
        self._snapshot = snapshot
        self._prune = prune
        self._recover = recover
        self._clock = clock

    def set(self, server: str, every: timedelta, policy: Policy, *,
            quiesce: bool = True) -> Schedule:
        if every < timedelta(minutes=1):
            raise UsageError("--every must be at least 1m")
        info = self._hv.info(server)
        return self._catalogue.set_schedule(Schedule(
            server_uuid=info.uuid, server=info.name, every_seconds=int(every.total_seconds()),
            retention=policy.as_dict(), quiesce=quiesce, created_at=self._clock()))

    def off(self, server: str) -> Schedule:
        """Remove a server's schedule (found by name or UUID, even if the domain is gone)."""
        found = [s for s in self._catalogue.schedules() if server in (s.server, s.server_uuid)]
        if not found:
            try:
                uuid = self._hv.info(server).uuid
            except NotFoundError:
                uuid = ""
            found = [s for s in self._catalogue.schedules() if s.server_uuid == uuid]
        if not found:
            raise NotFoundError(f"server {server} has no schedule",
                                hint="'bbsnap schedule list' shows the schedules")
        self._catalogue.remove_schedule(found[0].server_uuid)
        return found[0]

    def entries(self) -> list[tuple[Schedule, datetime]]:
        return [(s, next_due(s)) for s in self._catalogue.schedules()]

    def run(self) -> list[RunResult]:
        """Every due server once: its snapshot (waited for), then its prune."""
        return [self._run_one(schedule) for schedule in self._catalogue.schedules()]

    def _run_one(self, schedule: Schedule) -> RunResult:
        try:
            lock = locks.acquire_path(
                self._data_dir.locks_dir / f"schedule-{schedule.server_uuid}.lock", timeout=0,
                purpose=f"scheduled snapshot of {schedule.server}")
        except ConflictError:
            return RunResult(schedule.server, "skipped", "another schedule run is doing it")
        with lock:
            current = self._catalogue.schedule(schedule.server_uuid)  # again, under the lock
            if current is None:
                return RunResult(schedule.server, "skipped", "its schedule was removed")
            started = self._clock()
            due = next_due(current)
            if started < due:
                return RunResult(current.server, "not due",
                                 f"next due {due.strftime('%Y-%m-%d %H:%M:%S')} UTC")
            result = self._snapshot_and_prune(current)
            self._catalogue.mark_schedule_run(
                current.server_uuid, started,
                f"{result.outcome}: {result.detail}" if result.detail else result.outcome)
            return result

    def _snapshot_and_prune(self, schedule: Schedule) -> RunResult:
        assert self._snapshot is not None and self._prune is not None
        try:
            # By UUID: the schedule follows the domain, whatever it is called now.
            image = self._wait_settled(self._snapshot(schedule.server_uuid, schedule.quiesce))
            if image.status is not ImageStatus.AVAILABLE:
                return RunResult(schedule.server, "failed",
                                 f"snapshot {image.id} failed: {image.failure_reason}",
                                 image.id)
            policy = policy_of(schedule)
            if policy.empty:
                return RunResult(schedule.server, "done", f"snapshot {image.id}", image.id)
            report = self._prune(schedule.server_uuid, policy)
            removed = [d.image.id for d in report.removed]
            return RunResult(schedule.server, "done",
                             f"snapshot {image.id}, removed {len(removed)}", image.id, removed)
        except BbsnapError as exc:
            return RunResult(schedule.server, "failed", str(exc))

    def _wait_settled(self, image: Image) -> Image:
        """Until the snapshot's background copy is done (recovery adopts a dead worker)."""
        deadline = time.monotonic() + self._data_dir.lock_timeout
        while image.status is ImageStatus.CREATING:
            if time.monotonic() > deadline:
                raise ConflictError(f"snapshot {image.id} is still being copied; gave up "
                                    f"after {self._data_dir.lock_timeout:g} s")
            time.sleep(POLL_SECONDS)
            if self._recover is not None:
                self._recover()
            image = self._catalogue.get(image.id, include_deleted=True)
        return image

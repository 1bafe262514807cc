"""Background workers that finish a snapshot's copy, holding the server's lock.

Two ways to start one, both detached, both writing only to the image's log file in
``DATA/logs/``, both running :func:`finish_snapshot`:

- :class:`ForkedWorker` (``servers snapshot``): a fork of the command itself, once the
  point in time is fixed and its libvirt connection closed (proc.fork_detached). It has
  every module imported already: a new interpreter's start-up and imports took ~250 ms
  here, most of a 64 MiB full copy's time until available.
- :class:`ExecWorker`: ``python -m bbsnap.services.snapshots.worker finish-snapshot IMG
  --lock-fd N``, a new interpreter. Crash recovery adopts an orphaned copy this way: it
  runs inside whatever command came next, whose open connections (libvirt's, with a
  domain job under way) are no business of a forked copy. The command line is built
  (:func:`base_argv`, :func:`finish_snapshot_argv`) and parsed (:func:`main`) here and
  nowhere else.

Either way the worker's job token (process_tokens) is recorded on the image, and the
lock is inherited (the same open file), so SIGKILL of the command or of the worker is
recovered the same way: the next command sees the token dead and the lock free.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Protocol

from bbsnap.errors import BbsnapError

if TYPE_CHECKING:
    from pathlib import Path

    from bbsnap.state.catalogue import Catalogue
    from bbsnap.state.locks import ServerLock
    from bbsnap.services.snapshots.timeline import Timeline


class WorkerLauncher(Protocol):
    def start(self, image_id: str, lock: ServerLock, log_path: Path, *,
              agent_silent: bool = False) -> int:
        """Start a detached worker finishing *image_id*, holding *lock*; its pid. With
        *agent_silent* (the command's freeze found the guest agent silent) the worker does
        not ask the agent for the login user (another timeout)."""
        ...

    def release(self) -> None:
        """The caller made its last change to the image's row: the worker may settle it."""
        ...


class ExecWorker:
    """A new interpreter running *argv* (:func:`base_argv`) ``finish-snapshot IMG``. It
    takes far longer to start than its caller takes to record it, so it does not wait."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def start(self, image_id: str, lock: ServerLock, log_path: Path, *,
              agent_silent: bool = False) -> int:
        from bbsnap import proc

        return proc.spawn_detached(
            finish_snapshot_argv(self.argv, image_id, lock.fd, agent_silent=agent_silent),
            log_path=log_path, pass_fds=[lock.fd])

    def release(self) -> None:
        pass


class ForkedWorker:
    """A fork of this process running :func:`finish_snapshot` for the data directory
    *data_dir* on connection *connect*. The caller closes its libvirt connection and puts
    its catalogue connection aside first (neither may cross a fork).

    A forked worker may be done with a small copy before its caller has recorded the
    worker's token, the consistency and the login user: it waits for the caller's
    :meth:`release` (the end of a pipe closing: also when the caller dies) before the
    image turns available or failed."""

    def __init__(self, data_dir: str, connect: str) -> None:
        self.data_dir = data_dir
        self.connect = connect
        self._release_fd: int | None = None

    def start(self, image_id: str, lock: ServerLock, log_path: Path, *,
              agent_silent: bool = False) -> int:
        from bbsnap import proc

        if threading.active_count() > 1:
            # A fork of a process with other threads inherits every lock they held at
            # that instant, held for good: seen here when bbsnap ran inside a test
            # runner with threads of its own, the forked worker hung for good in
            # virConnectOpen on GLib's main-context lock. bbsnap's own threads have ended
            # by now (background.py), so this is a process embedding bbsnap's commands:
            # it gets a new interpreter, as crash recovery does.
            return ExecWorker(base_argv(self.data_dir, self.connect)).start(
                image_id, lock, log_path, agent_silent=agent_silent)
        fd = lock.fd
        waits, releases = os.pipe()

        def work() -> int:
            from bbsnap.services.snapshots.timeline import Timeline

            os.close(releases)  # EOF on *waits* once the caller closes its end
            # Standard output is the log now (proc.fork_detached). The command's stream
            # objects may hold its unflushed output: kept referenced, never flushed (that
            # output belongs to the command), and this worker prints through new ones.
            _inherited_streams.extend([sys.stdout, sys.stderr])
            sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
            timeline = Timeline()
            timeline.mark("worker-started")
            timeline.mark("imported")  # nothing to import: the command had it all
            return finish_snapshot(image_id, fd, data_dir=self.data_dir, connect=self.connect,
                                   timeline=timeline, handed_over=lambda: _wait_eof(waits),
                                   agent_silent=agent_silent)

        try:
            pid = proc.fork_detached(work, log_path=log_path, keep_fds=[fd, waits, releases])
        except BaseException:
            os.close(releases)
            raise
        finally:
            os.close(waits)
        self._release_fd = releases
        return pid

    def release(self) -> None:
        if self._release_fd is not None:
            os.close(self._release_fd)
            self._release_fd = None


_inherited_streams: list[object] = []


def _wait_eof(fd: int) -> None:
    """Block until every writer of the pipe *fd* has closed it (or died)."""
    while os.read(fd, 1):
        pass


def base_argv(data_dir: str, connect: str) -> list[str]:
    """How to run a worker for the data directory *data_dir* on connection *connect*."""
    return [sys.executable, "-m", "bbsnap.services.snapshots.worker", "--data-dir", data_dir, "--connect", connect]


def finish_snapshot_argv(base: list[str], image_id: str, lock_fd: int, *,
                         agent_silent: bool = False) -> list[str]:
    """Finish *image_id*'s copy, holding the server's lock the caller passes as *lock_fd*."""
    return [*base, "finish-snapshot", image_id, "--lock-fd", str(lock_fd),
            *(["--agent-silent"] if agent_silent else [])]


def _holds_lock(fd: int) -> bool:
    """Whether *fd* is an open file whose exclusive flock this process holds (inherited: the
    same open file description, so taking it again succeeds at once; any other holder
    would make it fail)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse  # here: a forked worker never parses a command line

    parser = argparse.ArgumentParser(prog="bbsnap-worker")
    parser.add_argument("--data-dir")
    parser.add_argument("--connect")
    sub = parser.add_subparsers(dest="command", required=True)
    finish = sub.add_parser("finish-snapshot")
    finish.add_argument("image_id")
    finish.add_argument("--lock-fd", type=int, required=True,
                        help="the server lock inherited from the caller")
    finish.add_argument("--agent-silent", action="store_true",
                        help="the caller found the guest agent silent: no login user asked")
    args = parser.parse_args(argv)
    if not _holds_lock(args.lock_fd):
        # Copying without the server's lock would race a prune or revert of its chain.
        print(f"snapshot {args.image_id}: not started with the server's lock (fd "
              f"{args.lock_fd}); recovery will adopt it", flush=True)
        return 2

    from bbsnap.services.snapshots import timeline as snapshot_timeline

    timeline = snapshot_timeline.Timeline()
    started = snapshot_timeline.process_start()
    if started is not None:
        timeline.mark("worker-started", started)
    return finish_snapshot(args.image_id, args.lock_fd, data_dir=args.data_dir,
                           connect=args.connect, timeline=timeline,
                           agent_silent=args.agent_silent)


def finish_snapshot(image_id: str, lock_fd: int, *, data_dir: str | None,
                    connect: str | None, timeline: Timeline,
                    handed_over: Callable[[], None] | None = None,
                    agent_silent: bool = False) -> int:
    """The worker's whole life, holding the server's lock as *lock_fd*: finish the copy,
    log what happened (its standard output is the image's log), settle the catalogue."""
    from bbsnap.state.catalogue import Catalogue
    from bbsnap.config import load_settings
    from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
    from bbsnap.state.layout import DataDir
    from bbsnap.cli.reporter import TerminalReporter
    from bbsnap.services.snapshots.finish import SnapshotFinisher

    timeline.mark("imported")
    settings = load_settings({"data_dir": data_dir, "connect": connect})
    data = DataDir.from_settings(settings).ensure()
    catalogue = Catalogue(data.catalogue_path, images_dir=data.images_dir)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"{stamp} finishing snapshot {image_id}", flush=True)
    try:
        finisher = SnapshotFinisher(catalogue, data,
                                    lambda: LibvirtHypervisor(settings.connect),
                                    timeline=timeline, handed_over=handed_over,
                                    agent_silent=agent_silent,
                                    # its notes (the login user it recorded) into the
                                    # image's log, escaped as on a terminal
                                    reporter=TerminalReporter(sys.stdout, tty=False))
        image = finisher.run(image_id)
    except BbsnapError as exc:
        print(f"{stamp} snapshot {image_id} failed: {exc}", flush=True)
        return 1
    finally:
        _checkpoint(catalogue)
        catalogue.close()
        timeline.mark("checkpointed")
        print(timeline.line(), flush=True)  # read by scripts/bench_snapshot.py
    print(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} snapshot {image.id} is "
          f"{image.status.value}", flush=True)
    os.close(lock_fd)  # the server's lock: released once the image is settled
    return 0


def _checkpoint(catalogue: Catalogue) -> None:
    """After the final commit: the main file alone must hold the image's row (DESIGN §8).
    The `servers snapshot` that started this worker left its own rows to this checkpoint."""
    try:
        catalogue.checkpoint()
    except BbsnapError as exc:
        print(f"checkpointing the catalogue failed: {exc}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

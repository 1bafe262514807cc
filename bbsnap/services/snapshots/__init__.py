"""Snapshots of servers, from `bbsnap servers snapshot` to an available catalogue image.

Read the modules in this order; each step names the next:

1. ``start.py`` — :class:`SnapshotService.begin`, run by the CLI (``cli/servers.py``
   through ``AppContext.snapshots()``). Under the server's lock (``state/locks.py``) it
   plans the copy (``chain.py``: incremental from the previous snapshot's checkpoint, or a
   full copy with a note), adds the image as ``creating`` with its snapshot job
   (``state/catalogue.py``), freezes the guest through its agent, fixes the instant with a
   push-mode backup (``hypervisor``'s ``begin_backup``), thaws, closes its libvirt and
   catalogue connections, and hands the lock to a detached worker forked from itself.
   ``--memory`` adds the RAM and device state at the same instant (``memory.py``). A
   snapshot with no login user to take (no ``--username``, no ancestor: a domain bbsnap did
   not create; no earlier snapshot it is stored on that records one) has its worker ask
   the guest agent who is logged in (``login_user.py``) while QEMU copies.
2. ``worker.py`` — the worker: a fork of the command (``ForkedWorker``), or for crash
   recovery a new interpreter (``python -m bbsnap.services.snapshots.worker finish-snapshot
   IMG --lock-fd N``, built and parsed there, which checks it holds the inherited lock);
   either runs:
3. ``finish.py`` — :class:`SnapshotFinisher.run`: waits for QEMU's copy, stores it as a
   delta on its parent (or on the server's image), checks the file, makes the image
   available and moves the server's checkpoint chain on (``chain.py``); any failure makes
   the image ``error`` with the reason.
4. ``wait.py`` — ``--wait``: polls the catalogue until the images settle, running crash
   recovery (``services/recovery.py``) between polls, so a worker killed meanwhile is
   adopted or failed.

``timeline.py``: when each of the command's and the worker's steps ended, written into the
image's log for ``scripts/bench_snapshot.py``'s breakdown of the command's latency and of a
full copy's time until available.

``change_tracking.py`` holds the dirty bitmap every bbsnap server's disk is born with, which
the first snapshot's incremental copy starts from.
"""

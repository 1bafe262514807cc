"""The catalogue's schema, as the migrations that build it (PRAGMA user_version counts them)."""

from __future__ import annotations

from typing import Sequence

# Each entry migrates the schema from version i to i+1: its statements, one string each (a
# script split on ';' would break on a literal holding one). Never edit a shipped entry: append.
MIGRATIONS: Sequence[Sequence[str]] = (
    (
        """CREATE TABLE images (
            id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            owner TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            status TEXT NOT NULL,
            visibility TEXT NOT NULL DEFAULT 'private',
            name TEXT NOT NULL,
            arch TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            virtual_size INTEGER NOT NULL DEFAULT 0,
            disk_size INTEGER NOT NULL DEFAULT 0,
            compatibility_mode INTEGER NOT NULL DEFAULT 0,
            official INTEGER NOT NULL DEFAULT 0,
            ancestor_id TEXT,
            format TEXT NOT NULL DEFAULT 'qcow2',
            path TEXT,
            source_server TEXT,
            consistency TEXT,
            checksum TEXT,
            firmware TEXT NOT NULL DEFAULT 'bios',
            username TEXT,
            min_ram INTEGER,
            failure_reason TEXT,
            job TEXT
        )""",
        "CREATE INDEX images_by_status ON images(status, created_at)",
        """CREATE TABLE dependencies (
            image_id TEXT NOT NULL REFERENCES images(id),
            kind TEXT NOT NULL,
            dependent_id TEXT NOT NULL,
            PRIMARY KEY (image_id, kind, dependent_id)
        )""",
        "CREATE INDEX dependencies_by_dependent ON dependencies(kind, dependent_id)",
    ),
    # 2: live snapshots. A snapshot job journals what its (background) worker must finish or
    # clean up; extra volumes hold the non-primary disks of a multi-disk snapshot.
    (
        """CREATE TABLE snapshot_jobs (
            image_id TEXT PRIMARY KEY REFERENCES images(id),
            domain TEXT NOT NULL,
            domain_uuid TEXT NOT NULL,
            mode TEXT NOT NULL,
            disks TEXT NOT NULL,
            started_at TEXT NOT NULL
        )""",
        """CREATE TABLE image_volumes (
            image_id TEXT NOT NULL REFERENCES images(id),
            device TEXT NOT NULL,
            path TEXT NOT NULL,
            virtual_size INTEGER NOT NULL,
            disk_size INTEGER NOT NULL,
            PRIMARY KEY (image_id, device)
        )""",
    ),
    # 3: how far a snapshot's background copy has got, in percent (NULL when not copying).
    (
        "ALTER TABLE images ADD COLUMN progress INTEGER",
    ),
    # 4: snapshot chains. parent_id is the image a file is stored on (its backing file); every
    # snapshot so far was stored on its ancestor, or standalone. chain_links records the
    # libvirt checkpoint made at a snapshot's instant, and which disk file it was made on.
    (
        "ALTER TABLE images ADD COLUMN parent_id TEXT",
        "UPDATE images SET parent_id = ancestor_id WHERE type = 'snapshot'",
        """CREATE TABLE chain_links (
            image_id TEXT PRIMARY KEY REFERENCES images(id),
            domain_uuid TEXT NOT NULL,
            checkpoint TEXT NOT NULL,
            device TEXT NOT NULL,
            disk_path TEXT NOT NULL,
            disk_identity TEXT NOT NULL
        )""",
        "CREATE INDEX chain_links_by_domain ON chain_links(domain_uuid)",
    ),
    # 5: snapshot schedules (`servers schedule`, `schedule run`): one per server, by UUID;
    # retention is the policy's rules as JSON; last_run is when a run last did the server.
    (
        """CREATE TABLE schedules (
            server_uuid TEXT PRIMARY KEY,
            server TEXT NOT NULL,
            every_seconds INTEGER NOT NULL,
            retention TEXT NOT NULL,
            quiesce INTEGER NOT NULL DEFAULT 1,
            created_at TEXT NOT NULL,
            last_run TEXT,
            last_result TEXT
        )""",
    ),
    # 6: registry layers (bbsnap/registry/records.py): which image a layer digest is, pulled
    # (found again by digest, so a second pull registers nothing) or pushed (not hashed again
    # while its file is unchanged: file_identity). Rows whose image is gone are ignored.
    (
        """CREATE TABLE registry_layers (
            digest TEXT NOT NULL,
            image_id TEXT NOT NULL,
            parent_digest TEXT,
            size INTEGER NOT NULL,
            origin TEXT NOT NULL,
            file_identity TEXT,
            repository TEXT,
            PRIMARY KEY (digest, image_id)
        )""",
    ),
    # 7: memory-state snapshots (`servers snapshot --memory`): the file in images/ holding the
    # guest's saved RAM and device state, compressed; NULL for disk-only images.
    (
        "ALTER TABLE images ADD COLUMN memory_path TEXT",
    ),
    # 8: registry layers of further disks (multi-disk images, bbsnap/registry/disk_layout.py):
    # ``device`` is the volume's ('' for an image's own file), in the key, as two disks of
    # one image may be the same layer. SQLite changes a key only by copying the table.
    (
        """CREATE TABLE registry_layers_8 (
            digest TEXT NOT NULL,
            image_id TEXT NOT NULL,
            device TEXT NOT NULL DEFAULT '',
            parent_digest TEXT,
            size INTEGER NOT NULL,
            origin TEXT NOT NULL,
            file_identity TEXT,
            repository TEXT,
            PRIMARY KEY (digest, image_id, device)
        )""",
        "INSERT INTO registry_layers_8 (digest, image_id, parent_digest, size, origin, "
        "file_identity, repository) SELECT digest, image_id, parent_digest, size, origin, "
        "file_identity, repository FROM registry_layers",
        "DROP TABLE registry_layers",
        "ALTER TABLE registry_layers_8 RENAME TO registry_layers",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)

"""The hub's database schema (``$PAS_HUB_HOME/hub.sqlite``), an append-only migration list.

Owns: table definitions of the hub only (the embedded archive uses the appliance's own
:mod:`appliance.store.schema`). May not touch: data. Append; never edit a released entry.
"""

from __future__ import annotations

HUB_MIGRATIONS: list[str] = [
    # 1: enrolment tokens, issued certificates (revocation), transfers, buckets held.
    """
    CREATE TABLE enrol_tokens (
        secret_sha256 TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        created_at REAL NOT NULL,
        used_at REAL
    );

    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        issued_at REAL NOT NULL,
        not_after TEXT NOT NULL,
        revoked_at REAL
    );
    CREATE INDEX certificates_site ON certificates (site);

    CREATE TABLE transfers (
        id TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        study_uid TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        bucket_count INTEGER NOT NULL,
        instance_count INTEGER NOT NULL,
        manifest TEXT NOT NULL,
        manifest_sha256 TEXT NOT NULL,
        created_at REAL NOT NULL,
        committed_at REAL,
        receipt TEXT,
        bytes_received INTEGER NOT NULL DEFAULT 0,
        bytes_stored INTEGER NOT NULL DEFAULT 0,
        puts INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX transfers_site ON transfers (site, created_at);

    CREATE TABLE buckets (
        transfer_id TEXT NOT NULL REFERENCES transfers (id),
        idx INTEGER NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        path TEXT NOT NULL,
        received_at REAL NOT NULL,
        PRIMARY KEY (transfer_id, idx)
    );
    """,
]

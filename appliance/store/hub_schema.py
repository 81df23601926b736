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
    # 2: the fleet (appliance.store.fleet): latest heartbeat per site and a bounded history.
    """
    CREATE TABLE fleet_sites (
        site TEXT PRIMARY KEY,
        first_seen_at REAL NOT NULL,
        last_seen_at REAL NOT NULL,             -- hub clock, when the latest heartbeat arrived
        last_sent_at REAL NOT NULL,             -- appliance clock, as it said
        version TEXT,
        backlog_studies INTEGER NOT NULL DEFAULT 0,
        backlog_oldest_s REAL NOT NULL DEFAULT 0,
        urgent_oldest_s REAL NOT NULL DEFAULT 0,
        disk_used_percent REAL,
        cert_days_left REAL,
        failed_jobs INTEGER NOT NULL DEFAULT 0,
        errors TEXT NOT NULL DEFAULT '[]',      -- JSON list of short strings
        status TEXT NOT NULL                    -- the whole latest heartbeat, JSON
    );

    CREATE TABLE fleet_heartbeats (
        site TEXT NOT NULL,
        sent_at REAL NOT NULL,
        received_at REAL NOT NULL,
        backlog_studies INTEGER NOT NULL,
        backlog_oldest_s REAL NOT NULL,
        disk_used_percent REAL,
        received_bytes INTEGER NOT NULL,        -- cumulative, from the appliance's store
        received_instances INTEGER NOT NULL,
        failed_jobs INTEGER NOT NULL,
        PRIMARY KEY (site, sent_at)
    ) WITHOUT ROWID;
    CREATE INDEX fleet_heartbeats_received ON fleet_heartbeats (received_at);
    """,
    # 3: instances already handed to the regional archive and confirmed by it, while their
    # transfer's buckets were still arriving (appliance.hub.archiver): the commit archives only
    # the rest, and a restarted hub does not archive them again.
    """
    CREATE TABLE archived_instances (
        transfer_id TEXT NOT NULL REFERENCES transfers (id),
        sop_instance_uid TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        archived_at REAL NOT NULL,
        PRIMARY KEY (transfer_id, sop_instance_uid)
    ) WITHOUT ROWID;
    """,
    # 4: abandoned uploads (appliance.hub.expiry): the last manifest POST or bucket PUT (NULL:
    # none since created_at), and when the staging of a transfer never committed was removed.
    """
    ALTER TABLE transfers ADD COLUMN last_activity_at REAL;
    ALTER TABLE transfers ADD COLUMN expired_at REAL;
    CREATE INDEX transfers_open ON transfers (created_at)
        WHERE receipt IS NULL AND expired_at IS NULL;
    """,
    # 5: the transfers migration 4 found open had no last activity, and were counted idle from
    # their creation: a transfer begun long ago whose site sent buckets lately expired at the
    # first start after the upgrade. Their last bucket received is their last activity known.
    # (A transfer created since has its last_activity_at set by its first bucket.)
    """
    UPDATE transfers SET last_activity_at = (
        SELECT max(b.received_at) FROM buckets b WHERE b.transfer_id = transfers.id)
    WHERE last_activity_at IS NULL AND receipt IS NULL;
    """,
    # 6: the committed transfers of one study of one site (appliance.hub.holdings): what the
    # region already holds of a study an appliance asks about after its index was rebuilt or
    # restored. Without it the question read every transfer the site ever sent, once per
    # study: the whole history again for each of a rebuilt cache's studies.
    """
    CREATE INDEX transfers_committed_study ON transfers (site, study_uid)
        WHERE receipt IS NOT NULL;
    """,
    # 7: where the hub's own backups stand (appliance.hub.backup, appliance.hub.fleet): one
    # row, ``since`` when the hub began being watched (this migration: a new or upgraded hub
    # counts its backup age from then), the last whole backup's time, folder and who wrote
    # it (NULL: never). Before it the hub recorded nothing, and a stopped backup timer went
    # unnoticed until a restore was needed.
    """
    CREATE TABLE hub_backup (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        since REAL NOT NULL,
        written_at REAL,
        folder TEXT,
        actor TEXT
    );
    INSERT INTO hub_backup (id, since) VALUES (1, (julianday('now') - 2440587.5) * 86400.0);
    """,
    # 8: the transfers of one study of one site, committed or not (appliance.store.hub
    # ``archived_for_site``: what a holdings question with the embedded archive leaves out as
    # the site's own). Migration 6's index holds the committed ones only, and SQLite takes a
    # partial index only when the query implies its WHERE, which that question cannot (it
    # wants the transfers not committed too): it read every transfer of the site, once per
    # study asked (20,000 transfers: 100,019 SQLite instructions a question, 20,000 questions
    # after a rebuilt cache). This index serves both questions (a study has a few transfers:
    # ``receipt IS NOT NULL`` is checked on those), and replaces migration 6's.
    """
    DROP INDEX transfers_committed_study;
    CREATE INDEX transfers_study ON transfers (site, study_uid);
    """,
    # 9: enrolment tokens expire (appliance.hub.pki.DEFAULT_TOKEN_VALIDITY, ``pas hub token
    # --valid-for``). Before it a token never expired: one printed for a site never installed
    # stayed good for ever, and leaked, enrolled a rogue appliance years later. The tokens
    # already issued get what they would have had, 7 days from their issue: an unspent one
    # older than that is refused as expired from the upgrade on (regional ops issue a new
    # one), rather than left a standing key for 7 more days. The default 0 (expired) is for a
    # row written without a validity, which no code of this version does.
    """
    ALTER TABLE enrol_tokens ADD COLUMN expires_at REAL NOT NULL DEFAULT 0;
    UPDATE enrol_tokens SET expires_at = created_at + 7 * 86400;
    """,
    # 10: the fleet's history bounded per site (appliance.store.fleet, appliance.hub.fleet).
    # Every heartbeat with a new sent_at was a row: a site posting thousands a second (a bug,
    # a loop, a stolen certificate) grew the table, and the disk, without bound for 8 days,
    # and its site page read them all (200,000 rows: 91 ms a page, each 30 s refresh). A row
    # now stands for a window of HISTORY_EVERY_S seconds of arrivals: ``beats`` counts the
    # heartbeats it holds (1 for the rows written before), its figures are the window's
    # largest. The index serves the window's look-up at each heartbeat and the site page's
    # bounded read, one seek per chart slot.
    """
    ALTER TABLE fleet_heartbeats ADD COLUMN beats INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX fleet_heartbeats_site_received ON fleet_heartbeats (site, received_at);
    """,
    # 11: a token ``pas hub revoke`` voided is marked so (``voided_at``, beside ``used_at``,
    # which the hub still answers as a spent token's): ``pas hub tokens`` listed it "spent",
    # like one an appliance enrolled with, and an operator checking whether a spare token
    # was used got the wrong answer. Those voided before stay "spent" (nothing tells them).
    """
    ALTER TABLE enrol_tokens ADD COLUMN voided_at REAL;
    """,
    # 12: a site holds one certificate in use (appliance.store.hub.retire_older_certificates):
    # the first request made with a site's newest certificate retires its older ones, and
    # ``superseded_by`` names the one that did. Two appliances enrolled as one site (a token
    # spent on a second box, a spare in a seed file) both uploaded as that site, unseen.
    """
    ALTER TABLE certificates ADD COLUMN superseded_by TEXT;
    """,
    # 13: a committed transfer keeps its receipt and counters, not what only its upload
    # needed (appliance.store.hub.set_receipt): the manifest's text, the bucket rows and the
    # archived_instances rows went on growing for ever, ~400 bytes an instance. Freed pages
    # are reused by new rows (the file shrinks only by a VACUUM, hub stopped).
    """
    UPDATE transfers SET manifest = '' WHERE receipt IS NOT NULL AND manifest != '';
    DELETE FROM buckets WHERE transfer_id IN (SELECT id FROM transfers WHERE receipt IS NOT NULL);
    DELETE FROM archived_instances
        WHERE transfer_id IN (SELECT id FROM transfers WHERE receipt IS NOT NULL);
    """,
    # 14: which site archived which SOP Instance UID, with the SHA-256 of the last version it
    # archived (appliance.store.hub.record_archived, archived_by_other_sites). Before it any
    # enrolled site could replace another site's instances in the region: a manifest naming
    # UIDs site A archived, with B's own bytes, was archived (the embedded archive made B's
    # the current version, an overwriting PACS replaced A's), and nothing asked whose UID it
    # was. The hub now refuses a UID another site archived with other bytes. One row per
    # (UID, site) for years: WITHOUT ROWID, the key is the look-up by UID (~150 bytes a row,
    # the UID and the hex SHA-256 most of it). Backfilled from the receipts (commit order:
    # the last version a site had receipted wins) and from what transfers not committed yet
    # had archived ahead.
    """
    CREATE TABLE archived_by_site (
        sop_instance_uid TEXT NOT NULL,
        site TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (sop_instance_uid, site)
    ) WITHOUT ROWID;
    INSERT INTO archived_by_site (sop_instance_uid, site, sha256)
    SELECT uid, site, sha256 FROM (
        SELECT json_extract(j.value, '$.sop_instance_uid') AS uid, t.site AS site,
               json_extract(j.value, '$.sha256') AS sha256, t.committed_at AS at,
               t.rowid AS n, j.key AS k
        FROM transfers t, json_each(t.receipt, '$.instances') j
        WHERE t.receipt IS NOT NULL
        UNION ALL
        SELECT a.sop_instance_uid, t.site, a.sha256, a.archived_at, t.rowid, 0
        FROM archived_instances a JOIN transfers t ON t.id = a.transfer_id
        WHERE t.receipt IS NULL
    ) WHERE uid IS NOT NULL AND sha256 IS NOT NULL ORDER BY at, n, k
    ON CONFLICT (sop_instance_uid, site) DO UPDATE SET sha256 = excluded.sha256;
    """,
    # 15: what spent an enrolment token (appliance.store.hub.use_token, answer_again): the
    # SHA-256 of the public key of the CSR it was spent with, and the certificate issued for
    # it. An enrolment whose answer was lost on the way back (a timeout, a cut link, a
    # Ctrl-C) found its token spent when run again and was refused: only a new token from
    # regional ops helped. The same token with the same key now gets the same certificate
    # again while the token is valid; another key is still refused. A token spent before
    # has NULLs: answered as spent.
    """
    ALTER TABLE enrol_tokens ADD COLUMN spent_key_sha256 TEXT;
    ALTER TABLE enrol_tokens ADD COLUMN spent_serial TEXT;
    ALTER TABLE enrol_tokens ADD COLUMN spent_certificate TEXT;
    """,
]

"""The appliance database schema, as an ordered list of migrations.

Owns: table definitions only. ``PRAGMA user_version`` records how many migrations ran; a
migration is never edited once on main, a new one is appended (tests/test_migrations_frozen.py
holds each one's digest). May not touch: data (what a migration must do in Python is the
owning module's code, named by :func:`data_step`).
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[str] = [
    # 1: the index (patient / study / series / instance), the job queue and the audit trail.
    """
    CREATE TABLE patients (
        id INTEGER PRIMARY KEY,
        patient_id TEXT NOT NULL,
        issuer TEXT NOT NULL DEFAULT '',
        name TEXT,
        birth_date TEXT,
        sex TEXT,
        UNIQUE (patient_id, issuer)
    );
    CREATE INDEX patients_name ON patients (name COLLATE NOCASE);

    CREATE TABLE studies (
        id INTEGER PRIMARY KEY,
        study_uid TEXT NOT NULL UNIQUE,
        patient_fk INTEGER NOT NULL REFERENCES patients (id),
        study_date TEXT,
        study_time TEXT,
        accession_number TEXT,
        study_id TEXT,
        description TEXT,
        referring_physician TEXT,
        origin TEXT NOT NULL DEFAULT 'local',        -- 'local' (a modality) or 'regional'
        first_received_at REAL NOT NULL,
        last_received_at REAL NOT NULL,
        last_accessed_at REAL,
        pinned_until REAL
    );
    CREATE INDEX studies_patient ON studies (patient_fk);
    CREATE INDEX studies_date ON studies (study_date);
    CREATE INDEX studies_accession ON studies (accession_number);
    CREATE INDEX studies_last_received ON studies (last_received_at);

    CREATE TABLE series (
        id INTEGER PRIMARY KEY,
        series_uid TEXT NOT NULL UNIQUE,
        study_fk INTEGER NOT NULL REFERENCES studies (id),
        series_number INTEGER,
        modality TEXT,
        description TEXT,
        body_part TEXT
    );
    CREATE INDEX series_study ON series (study_fk);
    CREATE INDEX series_modality ON series (modality);

    -- One row per stored version of an instance. The same SOP Instance UID with other bytes
    -- is a conflict: both are kept, the newest (is_current = 1) serves.
    CREATE TABLE instances (
        id INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL,
        series_fk INTEGER NOT NULL REFERENCES series (id),
        study_fk INTEGER NOT NULL REFERENCES studies (id),
        sop_class_uid TEXT NOT NULL,
        transfer_syntax_uid TEXT NOT NULL,
        instance_number INTEGER,
        path TEXT NOT NULL,                          -- relative to the spool directory
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,                        -- of the stored file, exactly as kept
        calling_ae TEXT,
        called_ae TEXT,
        source_address TEXT,
        received_at REAL NOT NULL,
        version INTEGER NOT NULL DEFAULT 1,
        is_current INTEGER NOT NULL DEFAULT 1,
        routed_at REAL,                              -- NULL: not yet handed to routing
        confirmed_at REAL,                           -- the region's receipt named it
        UNIQUE (sop_instance_uid, sha256)
    );
    CREATE INDEX instances_series ON instances (series_fk, is_current);
    CREATE INDEX instances_study ON instances (study_fk, is_current);
    CREATE INDEX instances_unrouted ON instances (study_fk) WHERE routed_at IS NULL;
    CREATE INDEX instances_sop ON instances (sop_instance_uid);

    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,                          -- the destination kind: dicom, hub, stowrs
        destination TEXT NOT NULL,
        study_fk INTEGER NOT NULL REFERENCES studies (id),
        priority INTEGER NOT NULL,                   -- 0 urgent, 1 high, 2 routine
        state TEXT NOT NULL DEFAULT 'pending',       -- pending, running, done, failed
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        lease_owner TEXT,
        lease_until REAL,
        last_error TEXT,
        progress TEXT,                               -- destination-specific, JSON
        rule TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX jobs_ready ON jobs (state, priority, next_attempt_at);
    CREATE INDEX jobs_study ON jobs (study_fk);

    CREATE TABLE job_instances (
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        instance_fk INTEGER NOT NULL REFERENCES instances (id),
        sent_at REAL,
        PRIMARY KEY (job_id, instance_fk)
    ) WITHOUT ROWID;

    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        event TEXT NOT NULL,                         -- store, query, retrieve, export, ...
        actor TEXT,                                  -- calling AE, user, or 'system'
        source TEXT,                                 -- network address
        target TEXT,                                 -- study / instance UID, destination
        outcome TEXT NOT NULL,                       -- success, failure: reason
        detail TEXT
    );
    CREATE INDEX audit_at ON audit (at);
    CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    """,
    # 2 (cache lifecycle, appliance/store/cache.py): integrity problems found by start-up
    # recovery, `pas verify` and the scrub (flagged, never silently dropped), and where the
    # rate-limited background scrub stands.
    """
    CREATE TABLE integrity_issues (
        id INTEGER PRIMARY KEY,
        found_at REAL NOT NULL,
        kind TEXT NOT NULL,            -- missing, size_mismatch, hash_mismatch, orphan, ...
        path TEXT NOT NULL,            -- relative to the spool directory
        instance_fk INTEGER,           -- no foreign key: the row may be evicted later
        detail TEXT,
        resolved_at REAL,
        resolution TEXT
    );
    CREATE INDEX integrity_open ON integrity_issues (resolved_at, kind, path);
    CREATE TABLE scrub_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        last_instance_id INTEGER NOT NULL DEFAULT 0,
        pass_started_at REAL,
        passes INTEGER NOT NULL DEFAULT 0
    );
    """,
    # prefetch (appliance/store/prefetch.py): HL7 messages seen (idempotence by control id),
    # prefetch requests (one per order: dedup_key), and the prior studies each one fetches.
    """
    CREATE TABLE prefetch_messages (
        message_key TEXT PRIMARY KEY,  -- sending application|facility|MSH-10 control id
        received_at REAL NOT NULL,
        message_type TEXT NOT NULL,
        request_fk INTEGER,
        ack_code TEXT NOT NULL,
        detail TEXT
    );
    CREATE TABLE prefetch_requests (
        id INTEGER PRIMARY KEY,
        dedup_key TEXT NOT NULL UNIQUE,  -- the order, appointment or visit it came from
        trigger TEXT NOT NULL,           -- hl7, arrival, manual, mwl
        patient_id TEXT NOT NULL,
        issuer TEXT NOT NULL DEFAULT '',
        accession_number TEXT,
        modality TEXT,
        body_part TEXT,
        scheduled_at REAL,               -- when the patient is expected (NULL: unknown)
        due_at REAL NOT NULL,            -- scheduled_at - lead time, or the time received
        state TEXT NOT NULL DEFAULT 'pending',  -- pending, running, fetched, failed, cancelled
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        rule TEXT,
        studies_found INTEGER NOT NULL DEFAULT 0,
        studies_fetched INTEGER NOT NULL DEFAULT 0,
        instances_fetched INTEGER NOT NULL DEFAULT 0,
        bytes_fetched INTEGER NOT NULL DEFAULT 0,
        times_requested INTEGER NOT NULL DEFAULT 1,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX prefetch_requests_ready ON prefetch_requests (state, next_attempt_at);
    CREATE TABLE prefetch_studies (
        request_fk INTEGER NOT NULL REFERENCES prefetch_requests (id),
        study_uid TEXT NOT NULL,
        study_date TEXT,
        modalities TEXT,
        instances_expected INTEGER,
        state TEXT NOT NULL DEFAULT 'pending',  -- pending, fetched, on_site, failed
        PRIMARY KEY (request_fk, study_uid)
    ) WITHOUT ROWID;
    """,
    # uplink: the state of each destination's link (last good contact, last error), for
    # `pas status`; one row per destination, overwritten.
    """
    CREATE TABLE uplink_state (
        destination TEXT PRIMARY KEY,
        last_ok_at REAL,
        last_error TEXT,
        last_error_at REAL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # instances by path: start-up recovery walks the index in path order beside the spool (a
    # merge in bounded memory, appliance/store/cache.py's reconcile); look-ups by file too.
    """
    CREATE INDEX instances_path ON instances (path);
    """,
    # What the cache holds, kept up to date by triggers on every change of an instance row
    # (index.totals, index.spool_bytes): the status page, the heartbeat and the metrics read
    # one row instead of summing every instance (0.47 s at two million, each time).
    """
    CREATE TABLE instance_totals (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        files INTEGER NOT NULL,       -- instance rows, every version
        bytes INTEGER NOT NULL,
        instances INTEGER NOT NULL,   -- current versions
        conflicts INTEGER NOT NULL,   -- versions after the first
        confirmed INTEGER NOT NULL    -- current versions the region confirmed
    );
    INSERT INTO instance_totals (id, files, bytes, instances, conflicts, confirmed)
        SELECT 1, count(*), coalesce(sum(size), 0), coalesce(sum(is_current), 0),
               coalesce(sum(version > 1), 0),
               coalesce(sum(confirmed_at IS NOT NULL AND is_current = 1), 0)
        FROM instances;
    CREATE TRIGGER instance_totals_insert AFTER INSERT ON instances BEGIN
        UPDATE instance_totals SET files = files + 1, bytes = bytes + NEW.size,
            instances = instances + NEW.is_current,
            conflicts = conflicts + (NEW.version > 1),
            confirmed = confirmed + (NEW.confirmed_at IS NOT NULL AND NEW.is_current = 1)
        WHERE id = 1;
    END;
    CREATE TRIGGER instance_totals_delete AFTER DELETE ON instances BEGIN
        UPDATE instance_totals SET files = files - 1, bytes = bytes - OLD.size,
            instances = instances - OLD.is_current,
            conflicts = conflicts - (OLD.version > 1),
            confirmed = confirmed - (OLD.confirmed_at IS NOT NULL AND OLD.is_current = 1)
        WHERE id = 1;
    END;
    CREATE TRIGGER instance_totals_update
        AFTER UPDATE OF size, is_current, version, confirmed_at ON instances BEGIN
        UPDATE instance_totals SET bytes = bytes + NEW.size - OLD.size,
            instances = instances + NEW.is_current - OLD.is_current,
            conflicts = conflicts + (NEW.version > 1) - (OLD.version > 1),
            confirmed = confirmed + (NEW.confirmed_at IS NOT NULL AND NEW.is_current = 1)
                                  - (OLD.confirmed_at IS NOT NULL AND OLD.is_current = 1)
        WHERE id = 1;
    END;
    """,
    # Cumulative counters for the metrics (pas_received_*_total, pas_wan_bytes_total{up},
    # pas_upload_original_bytes_total): they were sums over the instance and job rows, which
    # eviction and purge delete, so the counters went down (Prometheus reads a reset, rate()
    # a false spike). Triggers add to these rows in the transaction of the insert or update
    # and nothing ever subtracts; seeded from the rows present at upgrade.
    """
    CREATE TABLE counters (
        name TEXT NOT NULL,
        label TEXT NOT NULL DEFAULT '',
        value INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (name, label)
    ) WITHOUT ROWID;
    INSERT INTO counters (name, label, value)
        SELECT 'received_instances', coalesce(calling_ae, ''), count(*) FROM instances
        GROUP BY coalesce(calling_ae, '');
    INSERT INTO counters (name, label, value)
        SELECT 'received_bytes', coalesce(calling_ae, ''), coalesce(sum(size), 0)
        FROM instances GROUP BY coalesce(calling_ae, '');
    INSERT INTO counters (name, label, value)
        SELECT 'upload_wire_bytes', '',
               coalesce(sum(json_extract(progress, '$.bytes_sent')), 0) FROM jobs
        WHERE kind = 'hub' AND progress IS NOT NULL AND json_valid(progress);
    INSERT INTO counters (name, label, value)
        SELECT 'upload_original_bytes', '',
               coalesce(sum(json_extract(progress, '$.original_bytes_sent')), 0) FROM jobs
        WHERE kind = 'hub' AND progress IS NOT NULL AND json_valid(progress);
    CREATE TRIGGER counters_received AFTER INSERT ON instances BEGIN
        INSERT INTO counters (name, label, value)
            VALUES ('received_instances', coalesce(NEW.calling_ae, ''), 1)
            ON CONFLICT (name, label) DO UPDATE SET value = value + excluded.value;
        INSERT INTO counters (name, label, value)
            VALUES ('received_bytes', coalesce(NEW.calling_ae, ''), NEW.size)
            ON CONFLICT (name, label) DO UPDATE SET value = value + excluded.value;
    END;
    CREATE TRIGGER counters_upload AFTER UPDATE OF progress ON jobs
        WHEN NEW.kind = 'hub' AND json_valid(NEW.progress) BEGIN
        -- What this update added; a transfer restarted from scratch sets its progress back
        -- (0, nothing subtracted) and what it sends again is counted again: it crossed the
        -- link again.
        INSERT INTO counters (name, label, value)
            VALUES ('upload_wire_bytes', '', max(
                coalesce(json_extract(NEW.progress, '$.bytes_sent'), 0)
                - CASE WHEN json_valid(OLD.progress)
                       THEN coalesce(json_extract(OLD.progress, '$.bytes_sent'), 0)
                       ELSE 0 END, 0))
            ON CONFLICT (name, label) DO UPDATE SET value = value + excluded.value;
        INSERT INTO counters (name, label, value)
            VALUES ('upload_original_bytes', '', max(
                coalesce(json_extract(NEW.progress, '$.original_bytes_sent'), 0)
                - CASE WHEN json_valid(OLD.progress)
                       THEN coalesce(json_extract(OLD.progress, '$.original_bytes_sent'), 0)
                       ELSE 0 END, 0))
            ON CONFLICT (name, label) DO UPDATE SET value = value + excluded.value;
    END;
    """,
    # 8: when a local destination's current outage began (its first try that found no
    # connection since its last delivery; NULL when none): the dispatcher's link delay grows
    # with it. It was kept in memory, so a restart during a weekend's PACS maintenance set
    # the waits back to their shortest and logged the outage's start again.
    """
    ALTER TABLE uplink_state ADD COLUMN unreachable_since REAL;
    """,
    # 9 (the audit trail, appliance/store/audit.py): the patients each row is about, looked
    # up when it is written (PatientIDs separated by a backslash; NULL when it names none).
    # Rows named studies only, and a study's patient is known only while the study is in the
    # index: after an eviction or a purge, `pas audit --patient` lost that study's rows.
    # Older rows are not filled in (the table is append-only; its triggers stay).
    """
    ALTER TABLE audit ADD COLUMN patient TEXT;
    """,
    # 10 (the audit outbox, appliance/store/audit.py): how far each copy of the trail
    # (journald, one syslog collector) has read the audit table, by row id. The copies were
    # fed from memory in the daemon: rows the `pas` CLI wrote never left the table, and rows
    # queued when the daemon was killed, or dropped by a full queue, were never sent. A copy
    # with no row here starts at the table's last id when it first runs (no flood of history
    # at the upgrade). With it, the SOP Class a query asked under (its information model,
    # e.g. Patient Root FIND): the ATNA Query message names it (PS3.15 A.5.3.2), and the row
    # did not record it. NULL for every other event, and for rows from before.
    """
    ALTER TABLE audit ADD COLUMN sop_class TEXT;
    CREATE TABLE audit_outbox (
        sink TEXT PRIMARY KEY,         -- 'journal', 'syslog host:port'
        last_id INTEGER NOT NULL,      -- audit rows up to this id were handed to the sink
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 11 (the audit trail): DICOM associations storing right now. A C-STORE association's
    # ``store`` row is written when it ends; one cut by a crash or a power loss ended with
    # no row, its instances stored with no trace of who sent them in the trail. The row here
    # is written at its first C-STORE and deleted with its ``store`` row (one transaction);
    # one left at start-up is an association the daemon's end cut (audit.close_cut_associations).
    """
    CREATE TABLE open_associations (
        id INTEGER PRIMARY KEY,
        calling_ae TEXT NOT NULL,
        source_address TEXT,
        opened_at REAL NOT NULL
    );
    """,
    # 12 (the index, appliance/store/index.py): a patient's row (name, birth date, sex) is
    # deleted with the last study filed under it (eviction, purge, a correction filing the
    # study under another patient: index.forget_patient_if_unused). Before, it stayed for
    # ever: the ones left behind by earlier versions go now.
    """
    DELETE FROM patients WHERE NOT EXISTS (SELECT 1 FROM studies WHERE patient_fk = patients.id);
    """,
    # 13 (the audit trail): a query's own words. The ATNA Query message carries the query
    # (PS3.15 A.5.3.2 ParticipantObjectQuery): for C-FIND the identifier as the viewer
    # encoded it, with its transfer syntax; the row kept only a text summary, which no
    # collector decodes as DICOM. NULL for other events and for rows from before.
    """
    ALTER TABLE audit ADD COLUMN query BLOB;
    ALTER TABLE audit ADD COLUMN query_syntax TEXT;
    """,
    # 14 (queries, appliance/store/person_names.py): the person names that hold several values
    # or component groups (``DOE^JOHN\\DOE^J``, ``YAMADA^TAROU=山田^太郎``), which a query
    # matches value by value and group by group in Python. These partial indexes list just
    # those rows, so that a query of one name keeps the name index for the others (a scan of
    # every name cost 57 ms a query for 100,000 patients, the index 0.03 ms).
    """
    CREATE INDEX patients_name_separated ON patients (id)
        WHERE instr(name, '=') > 0 OR instr(name, char(92)) > 0;
    CREATE INDEX studies_referring_separated ON studies (id)
        WHERE instr(referring_physician, '=') > 0 OR instr(referring_physician, char(92)) > 0;
    """,
    # 15 (prefetch, appliance/store/prefetch.py): an HL7 order's request is found by its order
    # (order_key: ``order:PID|issuer|order number``) and requested procedure (procedure_key:
    # JSON [accession, requested procedure ID]), no longer by dedup_key alone: IHE SWF gives
    # one order's procedures (a CT chest, an MR knee) one order number, and keyed by it they
    # were one request, the second modality's priors never fetched. dedup_key stays unique
    # (the first procedure keeps the order's key). Requests from before get their order key;
    # their procedure is not known (NULL): the first procedure of the order to come takes it.
    """
    ALTER TABLE prefetch_requests ADD COLUMN order_key TEXT;
    ALTER TABLE prefetch_requests ADD COLUMN procedure_key TEXT;
    UPDATE prefetch_requests SET order_key = dedup_key
        WHERE trigger = 'hl7' AND substr(dedup_key, 1, 6) = 'order:';
    CREATE INDEX prefetch_requests_order ON prefetch_requests (order_key)
        WHERE order_key IS NOT NULL;
    """,
    # 16 (Storage Commitment, appliance/store/commitment.py): a modality's request that PAS
    # commit to holding instances, with the answer PAS decided when it came (which instances
    # the index holds with their file, which not and why) and the delivery of that answer,
    # the N-EVENT-REPORT: pending until the modality acknowledged it, retried with backoff
    # across restarts until give_up_at. One row per calling AE and Transaction UID: the same
    # request again is the same row and the same answer.
    """
    CREATE TABLE commitment_requests (
        id INTEGER PRIMARY KEY,
        transaction_uid TEXT NOT NULL,
        calling_ae TEXT NOT NULL,
        source_address TEXT,
        requested_at REAL NOT NULL,
        committed TEXT NOT NULL,       -- JSON [[SOP Class UID, SOP Instance UID], ...]
        failed TEXT NOT NULL,          -- JSON [[SOP Class UID, SOP Instance UID, reason], ...]
        state TEXT NOT NULL DEFAULT 'pending',   -- pending, sent, given-up
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        give_up_at REAL NOT NULL,
        sent_at REAL,
        sent_how TEXT,                 -- 'same association' or 'new association to host:port'
        last_error TEXT,
        updated_at REAL NOT NULL,      -- last write (a wall-clock step re-bases older rows)
        UNIQUE (calling_ae, transaction_uid)
    );
    CREATE INDEX commitment_requests_due ON commitment_requests (state, next_attempt_at);
    """,
    # 17 (the index, appliance/store/index.py): a patient with no PatientID (an issuer alone
    # names nobody) is one row per study. Patients were unique on (PatientID, issuer), so
    # every study sent without a PatientID went under ONE row, whose name, birth date and
    # sex the newest such instance overwrote: FIRST^PATIENT's study was listed as
    # SECOND^PATIENT's, and a search for FIRST found nothing. The key is now unique only
    # where it names someone. The table is rebuilt (SQLite cannot drop a table's UNIQUE);
    # studies keep their patient ids. Studies merged before share their row until one of
    # them is sent again, which then takes a row of its own (index.py, _file_study).
    """
    CREATE TABLE patients_keyed (
        id INTEGER PRIMARY KEY,
        patient_id TEXT NOT NULL,
        issuer TEXT NOT NULL DEFAULT '',
        name TEXT,
        birth_date TEXT,
        sex TEXT
    );
    INSERT INTO patients_keyed (id, patient_id, issuer, name, birth_date, sex)
        SELECT id, patient_id, issuer, name, birth_date, sex FROM patients;
    DROP TABLE patients;
    ALTER TABLE patients_keyed RENAME TO patients;
    CREATE UNIQUE INDEX patients_key ON patients (patient_id, issuer) WHERE patient_id != '';
    CREATE INDEX patients_name ON patients (name COLLATE NOCASE);
    CREATE INDEX patients_name_separated ON patients (id)
        WHERE instr(name, '=') > 0 OR instr(name, char(92)) > 0;
    """,
    # 18 (the index, appliance/store/index.py): an image's Rows, Columns, BitsAllocated and
    # NumberOfFrames, which QIDO-RS returns for each instance (PS3.18 Table 10.6.3-5) and a
    # C-FIND at IMAGE level when asked: web viewers list a multi-frame instance's frames from
    # NumberOfFrames and lay images out from Rows and Columns. Ingest fills them from the
    # header it already reads (NULL: the instance has no such attribute). Rows from before
    # are NULL until the background backfill (appliance/ops/backfill.py) has read their
    # files' headers: ``header_backfill`` is where it stands, the rows up to ``last_id``
    # (those present now; every row after is filed by ingest with its values) in id order,
    # a batch at a time, surviving restarts. Why not at the upgrade: reading two million
    # headers takes the better part of an hour, and the daemon would not serve meanwhile.
    """
    ALTER TABLE instances ADD COLUMN image_rows INTEGER;
    ALTER TABLE instances ADD COLUMN image_columns INTEGER;
    ALTER TABLE instances ADD COLUMN bits_allocated INTEGER;
    ALTER TABLE instances ADD COLUMN number_of_frames INTEGER;
    CREATE TABLE header_backfill (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        after_id INTEGER NOT NULL,     -- the rows up to this id are done
        last_id INTEGER NOT NULL,      -- the last row to read (the newest at the upgrade)
        started_at REAL,
        finished_at REAL
    );
    INSERT INTO header_backfill (id, after_id, last_id)
        SELECT 1, 0, coalesce(max(id), 0) FROM instances;
    """,
    # 19 (the audit trail): the newest disk alert and the newest backup are looked up by the
    # status page, /api/status, pas status, pas doctor and the heartbeat. Without an index
    # each look-up read the trail backwards until it met one, the whole trail when there was
    # none (the usual case): 0.2 s for 2 million rows, every refresh of the page. Partial
    # indexes: a few rows each, nothing added to the cost of filing a store row, and the
    # plans of every other audit query unchanged.
    """
    CREATE INDEX audit_alerts ON audit (id) WHERE event = 'alert';
    CREATE INDEX audit_exports ON audit (id) WHERE event = 'export';
    """,
    # 20 (appliance/store/readers.py): the studies the daemon's retrieves (C-MOVE, C-GET,
    # WADO-RS) are reading, for the other processes that evict (pas cache evict, pas cache
    # purge): the daemon's in-memory readers (appliance.locks.StudyReaders) are not theirs
    # to see, and pas cache evict deleted a study under a viewer's C-GET. One row per study
    # and daemon, written when the first reader comes and when the last goes; the rows of a
    # daemon that died are cleared at the next start. ``audit_deletes``: the newest
    # ``delete`` row, which a retrieve reads before its plan and after its row: a deletion
    # committed in between (another process's) means the plan is made again.
    """
    CREATE TABLE study_readers (
        study_uid TEXT NOT NULL,
        pid INTEGER NOT NULL,          -- the daemon whose retrieve reads it
        reader TEXT NOT NULL,          -- who reads: 'C-GET by VIEWER at 127.0.0.1'
        since REAL NOT NULL,           -- read without a break since then
        PRIMARY KEY (study_uid, pid)
    ) WITHOUT ROWID;
    CREATE INDEX audit_deletes ON audit (id) WHERE event = 'delete';
    """,
    # 21 (appliance/store/backups.py): the backups ``pas restore`` put back. A backup's
    # index is copied before ``pas backup`` writes its ``export`` audit row, so the restored
    # index did not hold it: pas status, pas doctor, the status page and the heartbeat said
    # no backup was ever written (or named the one before). One row per restore, keyed by
    # its ``recovery`` audit row: its place among the export rows says which came last.
    """
    CREATE TABLE restored_backups (
        audit_id INTEGER PRIMARY KEY REFERENCES audit (id),
        made_at REAL NOT NULL,         -- when the backup was written (its MANIFEST.json)
        folder TEXT NOT NULL           -- the backup folder it was restored from
    );
    """,
    # 22 (appliance/store/awaiting_hub.py): the instances routed while the appliance was not
    # enrolled that no rule and no fallback sent anywhere: the default route, to the hub, did
    # not exist yet, and they were never sent once it did. The first enrolled start hands
    # them back to routing. Filled from the rows before: an instance routed, current, of a
    # local study, never confirmed and in no job was routed nowhere (an enrolled appliance
    # sends every such instance to the hub by default, so it was routed before enrolment).
    """
    CREATE TABLE awaiting_hub (
        instance_fk INTEGER PRIMARY KEY,   -- instances.id
        since REAL NOT NULL                -- when routing found no destination for it
    );
    INSERT INTO awaiting_hub (instance_fk, since)
        SELECT i.id, i.routed_at FROM instances i JOIN studies s ON s.id = i.study_fk
        WHERE i.routed_at IS NOT NULL AND i.is_current = 1 AND i.confirmed_at IS NULL
          AND s.origin = 'local'
          AND i.id NOT IN (SELECT instance_fk FROM job_instances);
    """,
    # 23 (appliance/store/eviction.py prune_settled_evictions): an eviction's settled
    # ``evicting`` rows, one per file evicted, found by age without reading the others.
    """
    CREATE INDEX integrity_issues_settled_evictions ON integrity_issues (resolved_at)
        WHERE kind = 'evicting' AND resolved_at IS NOT NULL;
    """,
    # 24 (appliance/store/awaiting_hub.py): an instance's waiting row goes with the instance.
    # ``pas cache purge`` of a study waiting for the enrolment left its rows; an instance
    # received later took a freed id (``instances.id`` is reused once the highest rows are
    # deleted) and was counted waiting before it was even routed, then routed twice at the
    # enrolment. Rows left so are dropped: those of no instance, and those older than the
    # instance of their id (it arrived after the row was written: not the one that waited).
    """
    DELETE FROM awaiting_hub WHERE instance_fk NOT IN (SELECT id FROM instances)
        OR since < (SELECT received_at FROM instances WHERE id = instance_fk);
    CREATE TRIGGER instances_leave_awaiting_hub AFTER DELETE ON instances
    BEGIN
        DELETE FROM awaiting_hub WHERE instance_fk = OLD.id;
    END;
    """,
    # 25 (appliance/store/prefetch_retention.py): the prefetch's rows older than
    # prefetch.keep_days are deleted, found without reading those kept: finished requests by
    # age, a request's messages by request_fk, messages by age. Measured on three years of
    # 1,000 orders a day (1M requests, 4M priors, 1.5M messages, 90 days kept): the hourly
    # prune held the write lock 35 ms without them (reading the kept requests), 2 ms with
    # them; without the request_fk index the first prune, each request deleting its
    # messages, had not ended after ten minutes (a tenth of those rows); with all three,
    # 28 s in transactions of ~15 ms.
    """
    CREATE INDEX prefetch_requests_finished ON prefetch_requests (finished_at)
        WHERE state IN ('fetched', 'failed', 'cancelled');
    CREATE INDEX prefetch_messages_request ON prefetch_messages (request_fk)
        WHERE request_fk IS NOT NULL;
    CREATE INDEX prefetch_messages_received ON prefetch_messages (received_at);
    """,
    # 26 (the index, appliance/store/index.py): a series row per (SeriesInstanceUID, study).
    # Series were unique on their UID alone, and a known UID arriving under another study (a
    # correction re-sending an instance with a new StudyInstanceUID and the same series, a
    # modality reusing a series UID across studies) was filed in the first study's row: the
    # instance's study was the new one, its series the old study's. C-FIND listed the new
    # study with no series, and deleting the old study failed on a foreign key, which
    # stopped every eviction pass (a full disk). The table is rebuilt (SQLite cannot drop a
    # table's UNIQUE); series keep their ids. Instances filed so before get a series row in
    # their own study, a copy of the one they were in.
    """
    CREATE TABLE series_by_study (
        id INTEGER PRIMARY KEY,
        series_uid TEXT NOT NULL,
        study_fk INTEGER NOT NULL REFERENCES studies (id),
        series_number INTEGER,
        modality TEXT,
        description TEXT,
        body_part TEXT
    );
    INSERT INTO series_by_study (id, series_uid, study_fk, series_number, modality,
                                 description, body_part)
        SELECT id, series_uid, study_fk, series_number, modality, description, body_part
        FROM series;
    INSERT INTO series_by_study (series_uid, study_fk, series_number, modality, description,
                                 body_part)
        SELECT DISTINCT se.series_uid, i.study_fk, se.series_number, se.modality,
               se.description, se.body_part
        FROM instances i JOIN series se ON se.id = i.series_fk
        WHERE i.study_fk != se.study_fk;
    UPDATE instances SET series_fk = (
            SELECT n.id FROM series o JOIN series_by_study n ON n.series_uid = o.series_uid
            WHERE o.id = instances.series_fk AND n.study_fk = instances.study_fk)
        WHERE study_fk != (SELECT o.study_fk FROM series o WHERE o.id = instances.series_fk);
    DROP TABLE series;
    ALTER TABLE series_by_study RENAME TO series;
    CREATE UNIQUE INDEX series_key ON series (series_uid, study_fk);
    CREATE INDEX series_study ON series (study_fk);
    CREATE INDEX series_modality ON series (modality);
    """,
    # 27 (the index): what a parent row's delete costs, and the dates the index keeps.
    # job_instances(instance_fk) gets the index every other declared foreign key's child
    # column has (studies.patient_fk, series.study_fk, instances.series_fk and .study_fk,
    # jobs.study_fk: migration 1; job_instances.job_id, prefetch_studies.request_fk: their
    # primary keys). With foreign keys on, each instance row deleted (eviction, purge) had
    # SQLite read job_instances whole for a row naming it: 1,000,000 rows, one study of 500
    # instances evicted in 29 s inside BEGIN IMMEDIATE (C-STOREs waiting 30 s for the lock
    # failed "database is locked"); with the index, 0.07 s. Then the legacy DA and TM forms
    # (PS3.5 6.2: yyyy.mm.dd, hh:mm:ss.frac) that ingest kept as received, missed by every
    # date match and range: rewritten as ingest now indexes them (appliance/ingest/
    # attributes.py). The stored files are not touched. A scan of the patients and studies
    # rows, a few milliseconds for 100,000 studies; only the legacy rows are written.
    """
    CREATE INDEX job_instances_instance ON job_instances (instance_fk);
    UPDATE studies SET study_date = replace(study_date, '.', '')
        WHERE study_date GLOB '[0-9][0-9][0-9][0-9].[0-9][0-9].[0-9][0-9]';
    UPDATE patients SET birth_date = replace(birth_date, '.', '')
        WHERE birth_date GLOB '[0-9][0-9][0-9][0-9].[0-9][0-9].[0-9][0-9]';
    UPDATE studies SET study_time = replace(study_time, ':', '')
        WHERE study_time GLOB '[0-9][0-9]:[0-9][0-9]'
           OR study_time GLOB '[0-9][0-9]:[0-9][0-9]:[0-9][0-9]'
           OR (study_time GLOB '[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*'
               AND substr(study_time, 10) NOT GLOB '*[^0-9]*' AND length(study_time) <= 15);
    """,
    # 28 (the index, appliance/store/index.py and query.py): each study keeps the patient
    # attributes its own instances carry (PatientName, PatientBirthDate, PatientSex). One
    # patients row per (PatientID, issuer) held them for every study of the patient, written
    # by the last instance received: after a name change (a marriage, a corrected
    # registration) a prior prefetched after the current study relabelled every study with
    # the old name, and a search by the current name found nothing (review s40, finding 1;
    # PS3.4 C.2.2.2: a study is matched and answered on its own values). STUDY, SERIES and
    # IMAGE queries match and return these columns; a PATIENT query answers its newest
    # study's and matches a value any of its studies carries. The studies from before get
    # their patient row's values at once, the best known without reading a file (the row's,
    # which may be another study's), then their own: the header backfill of migration 18
    # (appliance/ops/backfill.py) reads every file filed before again, each study taking the
    # values of its newest instance read (not those of a study filed after the upgrade,
    # whose ingest gave it its own). The two partial indexes are those of query.py's person
    # name matching (person_names.py: SEPARATED, FOLDING, whose letters case folding turns
    # into ASCII ones are written out here).
    """
    ALTER TABLE studies ADD COLUMN patient_name TEXT;
    ALTER TABLE studies ADD COLUMN patient_birth_date TEXT;
    ALTER TABLE studies ADD COLUMN patient_sex TEXT;
    UPDATE studies SET
        patient_name = (SELECT p.name FROM patients p WHERE p.id = studies.patient_fk),
        patient_birth_date = (SELECT p.birth_date FROM patients p
                              WHERE p.id = studies.patient_fk),
        patient_sex = (SELECT p.sex FROM patients p WHERE p.id = studies.patient_fk);
    CREATE INDEX studies_patient_name ON studies (patient_name COLLATE NOCASE);
    CREATE INDEX studies_patient_name_separated ON studies (id)
        WHERE instr(patient_name, '=') > 0 OR instr(patient_name, char(92)) > 0;
    CREATE INDEX studies_patient_name_folding ON studies (id)
        WHERE patient_name GLOB '*[ß\u017f\u1e9e\u212a\ufb00\ufb01\ufb02\ufb03\ufb04\ufb05\ufb06]*';
    UPDATE header_backfill SET after_id = 0, started_at = NULL, finished_at = NULL,
        last_id = (SELECT coalesce(max(id), 0) FROM instances);
    """,
    # 29 (appliance/store/index.py, header_backfill.py): which of a study's three patient
    # attributes are still migration 28's copy of its patient row (1 name, 2 birth date,
    # 4 sex). An instance filed after the upgrade clears the bit of each it carries (its word
    # is the newer); the header backfill fills only those still set, and clears them all
    # when it ends. The backfill skipped the whole of a study an instance reached after the
    # upgrade, which then kept the copy of the values that instance lacked (Type 2, often
    # empty in an SR or a secondary capture: another study's birth date and sex; review
    # s40/2a). Set while the backfill has not finished (migration 28 restarts it).
    """
    ALTER TABLE studies ADD COLUMN patient_values_provisional INTEGER NOT NULL DEFAULT 0;
    UPDATE studies SET patient_values_provisional = 7
        WHERE (SELECT finished_at FROM header_backfill) IS NULL;
    """,
    # 30 (the audit trail, appliance/store/audit.py): a hash chain. Each row's ``chain`` is
    # the SHA-256 of the previous row's chain and of its own fields (audit.chain_link),
    # written with the row; ``pas audit verify`` recomputes it. Anyone who could write the
    # file could drop the append-only triggers and rewrite or delete rows unseen. The rows
    # written before keep a NULL chain: rewriting them all in this transaction took 42 s
    # and a 1.17 GB WAL for 2 million rows, and failed on a nearly full disk, so the daemon
    # could not start. The data step (audit.chain_anchor, see data_step below: SQLite has
    # no SHA-256) reads them in id order, in batches, and writes only the chain they would
    # have (``head``) after the last of them (``before_id``) in audit_chain_start: the
    # first row written after follows on from it, and verify checks them against it. IF
    # NOT EXISTS: a database taken back to an older schema by hand (a test's) keeps it. The
    # UPDATE trigger of migration 1 forbids changing the chain as any other column.
    """
    ALTER TABLE audit ADD COLUMN chain TEXT;
    CREATE TABLE IF NOT EXISTS audit_chain_start (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        before_id INTEGER NOT NULL,
        head TEXT NOT NULL
    );
    CREATE TRIGGER IF NOT EXISTS audit_chain_start_fixed BEFORE UPDATE ON audit_chain_start
        BEGIN SELECT RAISE(ABORT, 'audit_chain_start is written once'); END;
    CREATE TRIGGER IF NOT EXISTS audit_chain_start_kept BEFORE DELETE ON audit_chain_start
        BEGIN SELECT RAISE(ABORT, 'audit_chain_start is written once'); END;
    """,
]


def data_step(conn: sqlite3.Connection, script: str) -> None:
    """What a migration does that SQL cannot, run by the migration runner
    (:meth:`appliance.store.db.Database._migrate`) right after ``script``'s statements, in
    the same transaction; the code is the owning module's. Migration 30: the chain the audit
    rows written before it would have, recorded once (:func:`appliance.store.audit.
    chain_anchor`; read only, no row rewritten). Not run by
    :mod:`appliance.store.schema_drift`'s reference (an empty database in memory)."""
    if len(MIGRATIONS) >= 30 and script == MIGRATIONS[29]:
        from appliance.store.audit import chain_anchor

        chain_anchor(conn)

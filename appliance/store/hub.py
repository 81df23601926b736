"""The hub's state: enrolment tokens, certificates, transfers, buckets held, receipts, and the
expiry of abandoned transfers' buckets.

Owns: every SQL statement on ``hub.sqlite`` and the durable writes of bucket files under
``$PAS_HUB_HOME/buckets``. Each state change is one transaction (invariant 3). May not touch:
the network, cryptography (callers hand over already verified bytes).

A bucket is acknowledged only after :func:`write_bucket_file` returned (file fsynced, renamed,
directory fsynced) and :func:`record_bucket` committed, so a hub restart loses nothing it
acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from appliance.store.db import Database, now
from appliance.store.hub_schema import HUB_MIGRATIONS
from appliance.store.spool import fsync_dir

T = TypeVar("T")


def open_hub_db(path: Path) -> Database:
    return Database(path, HUB_MIGRATIONS)


# --- enrolment -----------------------------------------------------------------------------


def add_token(db: Database, site: str, secret_sha256: str, expires_at: float) -> None:
    with db.transaction() as conn:
        conn.execute("INSERT INTO enrol_tokens (secret_sha256, site, created_at, expires_at) "
                     "VALUES (?, ?, ?, ?)", (secret_sha256, site, now(), expires_at))


def enrol_token(db: Database, secret_sha256: str) -> sqlite3.Row | None:
    """The token row (site, created_at, used_at, expires_at), or None if unknown. The caller
    tells a spent or foreign token (answered alike) from an expired one (answered with when)."""
    return db.query_one("SELECT site, created_at, used_at, expires_at FROM enrol_tokens "
                        "WHERE secret_sha256 = ?", (secret_sha256,))


def issued_anything(db: Database) -> bool:
    """Whether this hub ever issued an enrolment token or a certificate: a home that did is
    a hub in use, which ``pas hub init`` never rebuilds (its CA is pinned, its transfer key
    held by the appliances)."""
    row = db.query_one("SELECT EXISTS (SELECT 1 FROM enrol_tokens) "
                       "OR EXISTS (SELECT 1 FROM certificates) AS issued")
    return bool(row and row["issued"])


def list_tokens(db: Database, limit: int = 200) -> list[dict[str, Any]]:
    """The latest tokens issued, newest first, with their digest (for the keyed identifier
    the caller shows; never printed as is) and ``state``: ``voided`` (``pas hub revoke``),
    ``spent``, ``expired`` or ``unspent``."""
    return [dict(r) for r in db.query(
        "SELECT secret_sha256, site, created_at, used_at, expires_at, voided_at, "
        "CASE WHEN voided_at IS NOT NULL THEN 'voided' WHEN used_at IS NOT NULL THEN 'spent' "
        "WHEN expires_at <= ? THEN 'expired' ELSE 'unspent' END AS state FROM enrol_tokens "
        "ORDER BY created_at DESC LIMIT ?", (now(), limit))]


def use_token(db: Database, secret_sha256: str, site: str, key_sha256: str,
              issue: Callable[[], tuple[str, str, bytes, T]]) -> T | None:
    """Spend the token and record the certificate ``issue()`` made, in one transaction.

    ``issue`` returns (serial, not_after, certificate PEM, result). None when the token was
    spent meanwhile (two enrolments racing with one token: exactly one wins) or expired
    since the caller looked: the expiry is checked here too, in the transaction that spends
    it. The token row keeps what spent it (``key_sha256``, the SHA-256 of the CSR's public
    key, and the certificate) for :func:`answer_again`.
    """
    with db.transaction() as conn:
        at = now()
        spent = conn.execute(
            "UPDATE enrol_tokens SET used_at = ? WHERE secret_sha256 = ? AND site = ? "
            "AND used_at IS NULL AND expires_at > ?", (at, secret_sha256, site, at)).rowcount
        if spent != 1:
            return None
        serial, not_after, pem, result = issue()
        conn.execute("INSERT INTO certificates (serial, site, issued_at, not_after) "
                     "VALUES (?, ?, ?, ?)", (serial, site, now(), not_after))
        conn.execute("UPDATE enrol_tokens SET spent_key_sha256 = ?, spent_serial = ?, "
                     "spent_certificate = ? WHERE secret_sha256 = ?",
                     (key_sha256, serial, pem.decode(), secret_sha256))
        return result


def answer_again(db: Database, secret_sha256: str, site: str,
                 key_sha256: str) -> tuple[str, str] | None:
    """(serial, certificate PEM) the token was spent on, when it was spent with this same
    key (``key_sha256``, the SHA-256 of the CSR's public key), is still within its validity
    and its certificate is still valid (neither revoked nor superseded): an enrolment run
    again after its answer was lost on the way back, answered the same certificate. None
    otherwise: unknown, unspent, voided, expired, spent with another key or by a version
    that did not record it, or a certificate no longer in force."""
    row = db.query_one(
        "SELECT t.spent_serial, t.spent_certificate FROM enrol_tokens t "
        "JOIN certificates c ON c.serial = t.spent_serial "
        "WHERE t.secret_sha256 = ? AND t.site = ? AND t.used_at IS NOT NULL "
        "AND t.voided_at IS NULL AND t.expires_at > ? AND t.spent_key_sha256 = ? "
        "AND c.site = t.site AND c.revoked_at IS NULL AND c.superseded_by IS NULL",
        (secret_sha256, site, now(), key_sha256))
    if row is None or not row["spent_certificate"]:
        return None
    return str(row["spent_serial"]), str(row["spent_certificate"])


def revoke_site(db: Database, site: str) -> tuple[int, int]:
    """Revoke every certificate of ``site`` and void its unspent enrolment tokens, in one
    transaction; returns (certificates newly revoked, tokens voided).

    Why the tokens: a token issued before (a first one reported lost, a spare in a seed file
    or a mail) enrolled after the revocation, and its holder got a fresh, valid certificate
    of the revoked site. A voided token is marked spent (``used_at``): the hub answers it as
    any used token; ``voided_at`` tells ``pas hub tokens`` it was voided, not spent. A
    token issued after the revocation is the site's way back in. An
    expired one is left as it is: it enrols nothing already, and counted it would make the
    operator believe a spare was still out there."""
    with db.transaction() as conn:
        at = now()
        certificates = conn.execute("UPDATE certificates SET revoked_at = ? WHERE site = ? "
                                    "AND revoked_at IS NULL", (at, site)).rowcount
        tokens = conn.execute("UPDATE enrol_tokens SET used_at = ?, voided_at = ? "
                              "WHERE site = ? AND used_at IS NULL AND expires_at > ?",
                              (at, at, site, at)).rowcount
        return certificates, tokens


def last_revoked_at(db: Database, site: str) -> float | None:
    """When the last of ``site``'s certificates was revoked; None when it has none revoked
    (never enrolled, or every certificate still valid)."""
    row = db.query_one("SELECT max(revoked_at) AS at FROM certificates WHERE site = ?",
                       (site,))
    return None if row is None or row["at"] is None else float(row["at"])


def revoked_sites(db: Database) -> set[str]:
    """Sites whose every certificate is revoked (``pas hub revoke``; enrolled again since:
    not in it). The fleet shows them as revoked, not as silent."""
    rows = db.query("SELECT site FROM certificates GROUP BY site "
                    "HAVING sum(revoked_at IS NULL) = 0")
    return {r["site"] for r in rows}


def enrolled_sites(db: Database) -> dict[str, float]:
    """Sites holding a certificate not revoked, with when the first of those was issued:
    what the fleet shows of a site that enrolled and never sent a heartbeat."""
    rows = db.query("SELECT site, min(issued_at) AS issued_at FROM certificates "
                    "WHERE revoked_at IS NULL GROUP BY site")
    return {r["site"]: float(r["issued_at"]) for r in rows}


def certificate_state(db: Database, serial: str
                      ) -> Literal["valid", "revoked", "superseded", "unknown"]:
    row = db.query_one("SELECT revoked_at, superseded_by FROM certificates WHERE serial = ?",
                       (serial,))
    if row is None:
        return "unknown"
    if row["superseded_by"] is not None:
        return "superseded"
    return "revoked" if row["revoked_at"] is not None else "valid"


def retire_older_certificates(db: Database, serial: str) -> list[str]:
    """The site of certificate ``serial`` uses it: its certificates issued before it and
    still valid are revoked, ``superseded_by`` it, in one transaction. Returns their serials.

    Why at the first use and not at the enrolment: ``pas enroll --replace`` writes the new
    certificate beside a running daemon, which uploads with the old one until it restarts;
    a renewal must not cut it off before then. Why at all: one site is one appliance to
    the region. A second box enrolled as the site (a token spent twice over the years, a
    spare token in a seed file) uploaded and sent heartbeats as that site beside the first,
    and nothing showed it. Now the older box is refused (403 ``certificate_superseded``),
    its queue waits and says so, and the hub's log names both certificates. An older
    certificate's use never retires a newer one."""
    with db.transaction() as conn:
        row = conn.execute("SELECT rowid, site FROM certificates WHERE serial = ? "
                           "AND revoked_at IS NULL", (serial,)).fetchone()
        if row is None:
            return []
        older = [r[0] for r in conn.execute(
            "SELECT serial FROM certificates WHERE site = ? AND rowid < ? "
            "AND revoked_at IS NULL", (row[1], row[0]))]
        conn.executemany("UPDATE certificates SET revoked_at = ?, superseded_by = ? "
                         "WHERE serial = ?", [(now(), serial, old) for old in older])
        return older


def list_certificates(db: Database) -> list[dict[str, Any]]:
    """Every certificate issued, oldest first, with ``state``: ``superseded`` (by a newer
    one of its site, :func:`retire_older_certificates`), ``revoked`` or ``valid``."""
    return [dict(r) for r in db.query(
        "SELECT *, CASE WHEN superseded_by IS NOT NULL THEN 'superseded' WHEN revoked_at IS "
        "NOT NULL THEN 'revoked' ELSE 'valid' END AS state FROM certificates "
        "ORDER BY issued_at")]


# --- transfers -----------------------------------------------------------------------------


def create_transfer(db: Database, site: str, manifest: dict[str, Any],
                    manifest_sha256: str, text: str | None = None
                    ) -> Literal["created", "same", "conflict"]:
    """Record a transfer; the same id with the same manifest is a repeat, else a conflict.
    ``text``: the manifest's JSON as sent, stored as is (a 20 MB manifest's ``json.dumps``
    held the GIL 0.1 s, the hub's event loop with it); else ``manifest`` written."""
    with db.transaction() as conn:
        row = conn.execute("SELECT site, manifest_sha256 FROM transfers WHERE id = ?",
                           (manifest["transfer_id"],)).fetchone()
        if row is not None:
            same = row["site"] == site and row["manifest_sha256"] == manifest_sha256
            if same:  # a site resuming: the transfer is in use again
                conn.execute("UPDATE transfers SET last_activity_at = ? WHERE id = ?",
                             (now(), manifest["transfer_id"]))
            return "same" if same else "conflict"
        conn.execute(
            "INSERT INTO transfers (id, site, study_uid, priority, bucket_count, instance_count,"
            " manifest, manifest_sha256, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (manifest["transfer_id"], site, manifest["study_uid"], manifest.get("priority", 0),
             manifest["bucket_count"], len(manifest["instances"]),
             json.dumps(manifest) if text is None else text, manifest_sha256, now()))
        return "created"


def get_transfer(db: Database, transfer_id: str, site: str | None = None) -> sqlite3.Row | None:
    """The transfer, or None (also when it belongs to another site: sites never see each
    other's transfers)."""
    row = db.query_one("SELECT * FROM transfers WHERE id = ?", (transfer_id,))
    if row is None or (site is not None and row["site"] != site):
        return None
    return row


def held_buckets(db: Database, transfer_id: str) -> list[int]:
    """The bucket indexes held for a transfer. Every index, for a committed one: its bucket
    rows went with the commit (:func:`set_receipt`), and a site resuming it, or a PUT that
    comes late, must be told that nothing is missing."""
    row = db.query_one("SELECT bucket_count, receipt IS NOT NULL AS committed FROM transfers "
                       "WHERE id = ?", (transfer_id,))
    if row is not None and row["committed"]:
        return list(range(int(row["bucket_count"])))
    return [int(r["idx"]) for r in db.query(
        "SELECT idx FROM buckets WHERE transfer_id = ? ORDER BY idx", (transfer_id,))]


def bucket_rows(db: Database, transfer_id: str) -> list[sqlite3.Row]:
    return db.query("SELECT * FROM buckets WHERE transfer_id = ? ORDER BY idx", (transfer_id,))


def count_received(db: Database, transfer_id: str, size: int) -> None:
    """Every authenticated bucket body counts, stored or not: resume tests read how much
    travelled twice."""
    with db.transaction() as conn:
        conn.execute("UPDATE transfers SET bytes_received = bytes_received + ?, puts = puts + 1, "
                     "last_activity_at = ? WHERE id = ?", (size, now(), transfer_id))


def record_bucket(db: Database, transfer_id: str, index: int, size: int, sha256: str,
                  path: str) -> bool:
    """Record a durably written bucket; False when that index was already held (kept as is)."""
    with db.transaction() as conn:
        try:
            conn.execute("INSERT INTO buckets (transfer_id, idx, size, sha256, path, received_at)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (transfer_id, index, size, sha256, path, now()))
        except sqlite3.IntegrityError:
            return False
        # A bucket of an expired transfer: its site came back; it is staged again.
        conn.execute("UPDATE transfers SET bytes_stored = bytes_stored + ?, expired_at = NULL, "
                     "last_activity_at = ? WHERE id = ?", (size, now(), transfer_id))
        return True


def open_transfers_by_site(db: Database) -> dict[str, tuple[int, float]]:
    """Site -> (transfers neither committed nor expired, the oldest one's created_at): read
    through the ``transfers_open`` partial index, so its cost is the open ones', not the
    history's (the hub's /metrics at every scrape)."""
    rows = db.query("SELECT site, count(*) AS n, min(created_at) AS first FROM transfers "
                    "INDEXED BY transfers_open WHERE receipt IS NULL AND expired_at IS NULL "
                    "GROUP BY site")
    return {r["site"]: (int(r["n"]), float(r["first"])) for r in rows}


# What a committed transfer's row keeps of its manifest: nothing (NOT NULL column). Its
# ``manifest_sha256`` still tells a re-posted manifest's repeat from a conflict.
SPENT_MANIFEST = ""


def set_receipt(db: Database, transfer_id: str, receipt: dict[str, Any]) -> bool:
    """Store the receipt once; False if another commit stored one first.

    In the same transaction, what only the upload needed goes: the manifest's text (as
    long as the receipt: a megabyte for a 5,000-image study), the bucket rows and the
    ``archived_instances`` rows (the receipt names the same pairs, signed). Kept for ever,
    they were most of ``hub.sqlite``: ~400 bytes an instance, ~100 GB in five years of a
    30-site region sending 5,000 images a site a day, backed up every night."""
    with db.transaction() as conn:
        if conn.execute(
                "UPDATE transfers SET receipt = ?, committed_at = ?, manifest = ? "
                "WHERE id = ? AND receipt IS NULL",
                (json.dumps(receipt), now(), SPENT_MANIFEST, transfer_id)).rowcount != 1:
            return False
        conn.execute("DELETE FROM buckets WHERE transfer_id = ?", (transfer_id,))
        conn.execute("DELETE FROM archived_instances WHERE transfer_id = ?", (transfer_id,))
        return True


def record_archived(db: Database, transfer_id: str, site: str,
                    pairs: list[tuple[str, str]]) -> None:
    """Instances (SOP Instance UID, SHA-256) the regional archive confirmed for a transfer of
    ``site``; one transaction per batch, repeats kept as they were. In the same one, each
    UID's row of ``archived_by_site`` (hub schema 14) takes the SHA-256 ``site`` archived
    last: what :func:`archived_by_other_sites` reads before another site's batch."""
    if not pairs:
        return
    with db.transaction() as conn:
        conn.executemany("INSERT OR IGNORE INTO archived_instances (transfer_id, "
                         "sop_instance_uid, sha256, archived_at) VALUES (?, ?, ?, ?)",
                         [(transfer_id, uid, sha, now()) for uid, sha in pairs])
        conn.executemany("INSERT INTO archived_by_site (sop_instance_uid, site, sha256) "
                         "VALUES (?, ?, ?) ON CONFLICT (sop_instance_uid, site) DO UPDATE "
                         "SET sha256 = excluded.sha256 WHERE sha256 != excluded.sha256",
                         [(uid, site, sha) for uid, sha in pairs])


def archived_by_other_sites(db: Database, site: str, pairs: dict[str, str]
                            ) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (site, SHA-256) for each UID of ``pairs`` (UID -> the SHA-256
    about to be archived) that a site other than ``site`` archived last with other bytes
    (the first such site by name when several did). The same bytes from another site are
    not in it (a prior, a study both sent). One key look-up per UID, 500 at a time."""
    found: dict[str, tuple[str, str]] = {}
    uids = list(pairs)
    for start in range(0, len(uids), 500):
        chunk = uids[start:start + 500]
        for row in db.query(
                "SELECT sop_instance_uid, site, sha256 FROM archived_by_site WHERE "
                f"sop_instance_uid IN ({', '.join('?' * len(chunk))}) AND site != ? "
                "ORDER BY site", (*chunk, site)):
            uid = str(row["sop_instance_uid"])
            if row["sha256"] != pairs[uid]:
                found.setdefault(uid, (str(row["site"]), str(row["sha256"])))
    return found


def archived_instances(db: Database, transfer_id: str) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of what the archive already confirmed for this transfer."""
    return {str(r["sop_instance_uid"]): str(r["sha256"]) for r in db.query(
        "SELECT sop_instance_uid, sha256 FROM archived_instances WHERE transfer_id = ?",
        (transfer_id,))}


def receipted_instances(db: Database, site: str, study_uid: str
                        ) -> dict[tuple[str, str], tuple[str, bool]]:
    """(SOP Instance UID, SHA-256) -> (transfer id, last), for every instance the hub signed
    a receipt for in a committed transfer of ``site`` for ``study_uid`` (the study and its
    late deltas). Read from the stored receipts themselves: exactly what the hub confirmed,
    nothing else. The transfer is the last whose receipt named the pair; ``last``: no later
    receipt named the UID with other bytes (the version the archive took last: the one an
    overwriting archive still holds, the current one of an archive that keeps versions)."""
    held: dict[tuple[str, str], str] = {}
    last: dict[str, tuple[str, str]] = {}
    for row in db.query("SELECT id, receipt FROM transfers WHERE site = ? AND study_uid = ? "
                        "AND receipt IS NOT NULL ORDER BY committed_at, rowid",
                        (site, study_uid)):
        for instance in json.loads(row["receipt"]).get("instances", []):
            pair = (str(instance["sop_instance_uid"]), str(instance["sha256"]))
            held[pair] = str(row["id"])
            last[pair[0]] = pair
    return {pair: (transfer, last[pair[0]] == pair) for pair, transfer in held.items()}


def receipted_since(db: Database, site: str, study_uid: str, created_at: float,
                    transfer_id: str) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (SHA-256, transfer id) of the last receipt (in commit order) that
    named the UID among the committed transfers of ``site`` for ``study_uid`` created after
    ``created_at`` (``transfer_id``'s own excepted): what the site sent of the study after
    that transfer began, its last version of each UID it named. Usually empty
    (a live transfer is its study's newest), one indexed look-up (``transfers_study``)."""
    last: dict[str, tuple[str, str]] = {}
    for row in db.query("SELECT id, receipt FROM transfers WHERE site = ? AND study_uid = ? "
                        "AND receipt IS NOT NULL AND created_at > ? AND id != ? "
                        "ORDER BY committed_at, rowid",
                        (site, study_uid, created_at, transfer_id)):
        for instance in json.loads(row["receipt"]).get("instances", []):
            last[str(instance["sop_instance_uid"])] = (str(instance["sha256"]), str(row["id"]))
    return last


def archived_for_site(db: Database, site: str, study_uid: str) -> set[tuple[str, str]]:
    """(SOP Instance UID, SHA-256) of every instance the archive took from a transfer of
    ``site`` for ``study_uid`` not committed yet (archived while its buckets arrived): the
    site's own, which a holdings statement never presents as the region's from elsewhere.
    A committed transfer's rows went with its commit; its receipt names them
    (:func:`receipted_instances`), which the statement reads first."""
    return {(str(r[0]), str(r[1])) for r in db.query(
        "SELECT a.sop_instance_uid, a.sha256 FROM archived_instances a "
        "JOIN transfers t ON t.id = a.transfer_id WHERE t.site = ? AND t.study_uid = ?",
        (site, study_uid))}


def unfinished_transfers(db: Database) -> list[tuple[str, int]]:
    """(id, priority) of transfers holding buckets but no receipt: what a restarted hub's
    archiver resumes."""
    return [(str(r["id"]), int(r["priority"])) for r in db.query(
        "SELECT id, priority FROM transfers t WHERE receipt IS NULL AND EXISTS "
        "(SELECT 1 FROM buckets b WHERE b.transfer_id = t.id) ORDER BY priority, created_at")]


def abandoned_transfers(db: Database, idle_since: float) -> list[sqlite3.Row]:
    """Transfers with no receipt, not expired yet, with no manifest POST nor bucket PUT since
    ``idle_since``: id, site, study_uid, last activity, buckets held, bytes stored."""
    return db.query(
        "SELECT id, site, study_uid, coalesce(last_activity_at, created_at) AS idle_from, "
        "bytes_stored, (SELECT count(*) FROM buckets b WHERE b.transfer_id = t.id) AS held "
        "FROM transfers t WHERE receipt IS NULL AND expired_at IS NULL "
        "AND coalesce(last_activity_at, created_at) < ? ORDER BY created_at", (idle_since,))


def expire_transfer(db: Database, transfer_id: str, idle_since: float) -> bool:
    """Forget the buckets of an abandoned transfer (still without receipt and idle since
    before ``idle_since``, checked in the same transaction): their rows go, ``bytes_stored``
    is 0, ``expired_at`` is set; the row and its manifest stay (a site that comes back is
    answered the empty held list and sends every bucket again). False if it no longer
    qualifies. The caller removes the files after (:func:`remove_bucket_files`)."""
    with db.transaction() as conn:
        if conn.execute(
                "UPDATE transfers SET expired_at = ?, bytes_stored = 0 WHERE id = ? AND "
                "receipt IS NULL AND expired_at IS NULL AND "
                "coalesce(last_activity_at, created_at) < ?",
                (now(), transfer_id, idle_since)).rowcount != 1:
            return False
        conn.execute("DELETE FROM buckets WHERE transfer_id = ?", (transfer_id,))
        return True


def list_transfers(db: Database, site: str | None = None, study_uid: str | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` transfers, of ``site`` and of ``study_uid`` when given (``pas
    hub transfers``), with ``state``: ``committed``, ``expired`` or ``open``. The study
    alone reads the whole table (its index leads with the site): an operator's question,
    asked once, not a request path."""
    where, params = _transfers_where(site, study_uid)
    sql = ("SELECT id, site, study_uid, priority, bucket_count, instance_count, created_at, "
           "committed_at, expired_at, bytes_received, bytes_stored, puts, "
           "CASE WHEN receipt IS NOT NULL THEN bucket_count "  # its bucket rows are gone
           "ELSE (SELECT COUNT(*) FROM buckets b WHERE b.transfer_id = t.id) END AS held, "
           "CASE WHEN receipt IS NOT NULL THEN 'committed' WHEN expired_at IS NOT NULL "
           "THEN 'expired' ELSE 'open' END AS state "
           f"FROM transfers t{where} ORDER BY created_at DESC LIMIT ?")
    return [dict(r) for r in db.query(sql, (*params, limit))]


def count_transfers(db: Database, site: str | None = None, study_uid: str | None = None) -> int:
    """How many transfers :func:`list_transfers` shows a part of: its title said "100
    transfers" of a hub holding thousands, which read as the total."""
    where, params = _transfers_where(site, study_uid)
    return int(db.query(f"SELECT count(*) FROM transfers{where}", params)[0][0])


def _transfers_where(site: str | None, study_uid: str | None) -> tuple[str, tuple[str, ...]]:
    named = [(column, value) for column, value in (("site", site), ("study_uid", study_uid))
             if value is not None]
    if not named:
        return "", ()
    return (" WHERE " + " AND ".join(f"{column} = ?" for column, _ in named),
            tuple(value for _, value in named))


def site_known(db: Database, site: str) -> bool:
    """Whether this hub ever enrolled ``site`` (a certificate, revoked or not) or holds a
    transfer of it: a name that is neither is a typo (names are case-sensitive), which a
    listing answered "0 transfers", as of a site that sent nothing yet."""
    return db.query("SELECT EXISTS (SELECT 1 FROM certificates WHERE site = ?) OR "
                    "EXISTS (SELECT 1 FROM transfers WHERE site = ?)", (site, site))[0][0] == 1


# --- backup (appliance.hub.backup) --------------------------------------------------------


def forget_staging_in_copy(path: Path, at: float) -> int:
    """In a backup's copy of ``hub.sqlite`` (one file, rollback journal, no one else writing
    it): the transfers not committed that hold buckets lose them as an expiry does
    (:func:`expire_transfer`: rows gone, ``bytes_stored`` 0, ``expired_at`` set), because
    the backup does not hold their bucket files. A hub restored from it answers their sites
    an empty held list and they send every bucket again, instead of promising buckets it
    does not have. Their manifests, the instances already archived ahead, and every
    committed transfer stay. Returns how many transfers were so marked."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            staged = [str(r[0]) for r in conn.execute(
                "SELECT id FROM transfers t WHERE receipt IS NULL AND EXISTS "
                "(SELECT 1 FROM buckets b WHERE b.transfer_id = t.id)")]
            conn.executemany("UPDATE transfers SET expired_at = ?, bytes_stored = 0 "
                             "WHERE id = ?", [(at, transfer_id) for transfer_id in staged])
            conn.executemany("DELETE FROM buckets WHERE transfer_id = ?",
                             [(transfer_id,) for transfer_id in staged])
        return len(staged)
    finally:
        conn.close()


def backup_counts(db: Database) -> dict[str, int]:
    """What a hub backup's manifest says it holds: sites with a certificate not revoked,
    certificates (and revoked ones), transfers committed (receipt kept) and not."""
    row = db.query_one(
        "SELECT (SELECT count(DISTINCT site) FROM certificates WHERE revoked_at IS NULL)"
        " AS sites_enrolled, (SELECT count(*) FROM certificates) AS certificates, "
        "(SELECT count(*) FROM certificates WHERE revoked_at IS NOT NULL) "
        "AS certificates_revoked, "
        "(SELECT count(*) FROM transfers WHERE receipt IS NOT NULL) AS transfers_committed, "
        "(SELECT count(*) FROM transfers WHERE receipt IS NULL) AS transfers_not_committed")
    assert row is not None
    return {key: int(value) for key, value in dict(row).items()}


def record_hub_backup(db: Database, written_at: float, folder: Path, actor: str) -> bool:
    """The live hub's note of a whole backup just written (migration 7's one row): what its
    ``/metrics`` and ``/fleet`` read to say how old the hub's last backup is. Only moves
    forward: a backup made earlier that finished after a later one (two runs at once) leaves
    the later one recorded; returns whether this one was.

    A record dated in the future (the clock ran ahead when it was written and was set back
    since) is replaced all the same: kept, it refused every later backup until the clock
    caught up with it, its age reading 0 meanwhile (a stopped timer unseen that long). A row
    gone (the database edited by hand) is written again: an UPDATE alone never recorded a
    backup again."""
    with db.transaction() as conn:
        return conn.execute(
            "INSERT INTO hub_backup (id, since, written_at, folder, actor) VALUES (1, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at, "
            "folder = excluded.folder, actor = excluded.actor WHERE written_at IS NULL OR "
            "written_at <= excluded.written_at OR written_at > ?",
            (written_at, written_at, str(folder), actor, max(now(), written_at))).rowcount == 1


def name_restored_backup(path: Path, made_at: float, folder: Path, actor: str) -> bool:
    """In the copy of a backup's ``hub.sqlite`` that ``pas hub restore`` is about to put in
    place (one file, no one else writing it): migration 7's row names that backup as the
    last one, ``written_at`` its manifest's ``made_at``, ``actor`` "restored by <actor>".

    Why: the backup copied ``hub.sqlite`` before it recorded itself in the live one, so the
    copy's row named the backup before it (or none), and the restored hub's ``/fleet``,
    ``pas_hub_backup_age_seconds`` and ``PasHubBackupOld`` counted from that older one. The
    row is replaced whatever it holds: the restored hub's state is this backup's. ``since``
    stays (``made_at`` if the row was gone). Returns False, nothing written, for a copy
    older than migration 7 (no such table): the hub's start adds the row, counting from
    then."""
    conn = sqlite3.connect(path)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                        "name = 'hub_backup'").fetchone() is None:
            return False
        with conn:
            conn.execute(
                "INSERT INTO hub_backup (id, since, written_at, folder, actor) "
                "VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "written_at = excluded.written_at, folder = excluded.folder, "
                "actor = excluded.actor",
                (made_at, made_at, str(folder), f"restored by {actor}"))
        return True
    finally:
        conn.close()


def hub_backup_record(db: Database) -> dict[str, Any]:
    """``since`` (when the hub began being watched), and the last backup's ``written_at``,
    ``folder``, ``actor`` (None: never backed up). All None when migration 7's row is gone
    (a database edited by hand): asserted, it failed every scrape of ``/metrics``, the
    sites' families with it, and ``/fleet``."""
    row = db.query_one("SELECT since, written_at, folder, actor FROM hub_backup WHERE id = 1")
    if row is None:
        return {"since": None, "written_at": None, "folder": None, "actor": None}
    return dict(row)


# --- bucket files --------------------------------------------------------------------------


def write_bucket_file(root: Path, transfer_id: str, index: int, data: bytes) -> str:
    """Write a sealed bucket durably (temp, fsync, rename, fsync directory); returns its path
    relative to ``root``. The same index written twice lands on the same name."""
    directory = root / transfer_id
    new_dir = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    relative = f"{transfer_id}/{index:06d}.bkt"
    temp = directory / f".{index:06d}.{uuid.uuid4().hex}.part"
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, root / relative)
        fsync_dir(directory)
        if new_dir:
            fsync_dir(root)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return relative


def remove_bucket_files(root: Path, transfer_id: str) -> int:
    """After the receipt: the archive holds the instances, the sealed buckets are spent (their
    rows stay, so the held list and the byte counters still answer). After an expiry
    (:func:`expire_transfer`): the rows went first. Half-written temp files go too."""
    directory = root / transfer_id
    removed = 0
    for path in directory.glob("*.bkt"):
        path.unlink(missing_ok=True)
        removed += 1
    for temp in directory.glob(".*.part"):
        temp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()
    return removed


def remove_temp_buckets(root: Path) -> int:
    """Start-up: half-written buckets were never acknowledged."""
    removed = 0
    for temp in root.glob("*/.*.part"):
        temp.unlink(missing_ok=True)
        removed += 1
    return removed


def staging_folders(root: Path) -> list[Path]:
    """The folders under ``root`` (``buckets/``): a transfer's staging each, named by its
    id. A symbolic link or a file there is not one (never the hub's own)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())


def remove_staging_folder(folder: Path) -> int:
    """A staging folder with what it holds (sealed buckets, half-written ones, anything
    else); returns the bytes freed. Only for a transfer no live row stands for: its files
    are never read again."""
    freed = sum(os.lstat(os.path.join(top, name)).st_size
                for top, _dirs, names in os.walk(folder) for name in names)
    shutil.rmtree(folder)
    fsync_dir(folder.parent)
    return freed

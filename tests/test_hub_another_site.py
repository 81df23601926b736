"""One site's upload never replaces another site's instances in the region (hub schema 14).

Found by a review (2026-12-07, /work/scratch/s37/review-c/cross_site_overwrite.py): site B
posted a manifest naming a SOP Instance UID site A had archived, with B's own bytes; the hub
archived it (ahead of the commit or at it) and nothing asked whose UID it was. The embedded
archive made B's bytes the current version, served to A's radiologists; a DICOMweb PACS set to
overwrite replaced A's original, which A, holding its receipt, may have evicted. Now the hub
records which site archived which UID with which bytes (``archived_by_site``) and refuses a
UID another site archived with other bytes: the background round leaves it, the commit answers
``422 another_site`` naming the UIDs only. The same bytes from another site (a prior, a study
both sent) and a site's own correction of its UID are taken as before.

Real peers: ``pas hub run`` (mutual TLS, embedded archive), sites enrolled as the appliance
does, sealed buckets; the last test runs a real appliance (``pas run``) as site B, fed by
DCMTK storescu.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from appliance.store import hub as store
from appliance.store.db import Database
from appliance.store.hub_schema import HUB_MIGRATIONS
from appliance.transfer.enrolment import Enrolment
from tests.support.hub import HubProcess, Shipment, client, enroll, pack_items, ship
from tests.support.objects import tiny_ct
from tests.support.peers import read_rows, storescu, wait_for
from tests.test_uplink_hub import enrolled_pas, jobs


@pytest.fixture(scope="module")
def site_a(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> Enrolment:
    return enroll(hub, tmp_path_factory.mktemp("site-a"), "CHU-A")


@pytest.fixture(scope="module")
def site_b(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> Enrolment:
    return enroll(hub, tmp_path_factory.mktemp("site-b"), "CHU-B")


def _instance(folder: Path, name: str, uid: str, study: str, comment: str) -> Path:
    """A small CT image of ``study`` under SOP Instance UID ``uid``; ``comment`` makes its
    bytes (the same comment, the same series and time: the same bytes)."""
    ds = tiny_ct(study, "2.25.77", SOPInstanceUID=uid, ImageComments=comment)
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions(hub: HubProcess, uid: str) -> list[tuple[str, int, str]]:
    """The embedded archive's versions of ``uid``: (SHA-256, is_current, site), oldest first."""
    return [(r["sha256"], r["is_current"], r["source_address"]) for r in read_rows(
        hub.home / "archive" / "pas.sqlite", "SELECT sha256, is_current, source_address "
        "FROM instances WHERE sop_instance_uid = ? ORDER BY version", (uid,))]


def _send(http: httpx.Client, shipment: Shipment) -> httpx.Response:
    """Manifest, every bucket, commit: the commit's answer."""
    assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
    assert shipment.put_all(http) == [201] * len(shipment.buckets)
    return http.post(shipment.url + "/commit")


def _commit(enrolment: Enrolment, files: list[Path], study: str) -> dict[str, Any]:
    with client(enrolment) as http:
        answer = _send(http, ship(pack_items(files), enrolment.hub_transfer_key, 1 << 20, study))
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _owners(hub: HubProcess, uid: str) -> list[tuple[str, str]]:
    return [(r["site"], r["sha256"]) for r in read_rows(
        hub.home / "hub.sqlite", "SELECT site, sha256 FROM archived_by_site "
        "WHERE sop_instance_uid = ? ORDER BY site", (uid,))]


def test_another_sites_uid_with_other_bytes_is_refused_at_the_commit_and_not_archived(
        hub: HubProcess, site_a: Enrolment, site_b: Enrolment, tmp_path: Path) -> None:
    study, uid = generate_uid(), generate_uid()
    a = _instance(tmp_path, "a", uid, study, "site A original")
    b = _instance(tmp_path, "b", uid, study, "site B's own bytes")
    _commit(site_a, [a], study)
    assert _versions(hub, uid) == [(_sha(a), 1, "CHU-A")]

    # B's transfer: the UID with B's bytes, and an instance of B's own.
    own = _instance(tmp_path, "own", generate_uid(), study, "B's own instance")
    shipment = ship(pack_items([b, own]), site_b.hub_transfer_key, 1 << 20, study)
    with client(site_b) as http:
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        put = http.put(shipment.bucket_url(0) + "?commit=true", content=shipment.buckets[0])
        assert put.status_code == 201, put.text
        assert put.json().get("commit_refused") == "another_site" and "receipt" not in put.json()
        answer = http.post(shipment.url + "/commit")
        assert answer.status_code == 422, answer.text
        refusal = answer.json()
        assert refusal["error"] == "another_site"
        assert refusal["another_site"] == [{"sop_instance_uid": uid, "sha256": _sha(b)}]
        assert uid in refusal["detail"] and "other bytes" in refusal["detail"]
        assert "CHU-A" not in answer.text  # another hospital is never named to a site
        assert http.get(shipment.url + "/receipt").status_code == 404
        again = http.post(shipment.url + "/commit")  # the same refusal on a retry
        assert again.status_code == 422 and again.json()["error"] == "another_site"

    assert _versions(hub, uid) == [(_sha(a), 1, "CHU-A")]  # the region still serves A's
    assert _owners(hub, uid) == [("CHU-A", _sha(a))]
    # The hub's log names the other site for regional ops.
    assert f"site CHU-B: transfer {shipment.transfer_id}: commit refused, 1 instance not " \
        f"archived: another site archived its SOP Instance UID with other bytes: {uid} " \
        "(site CHU-A)" in hub.log()


def test_the_archive_ahead_of_the_commit_leaves_another_sites_uid(
        hub: HubProcess, site_a: Enrolment, site_b: Enrolment, tmp_path: Path) -> None:
    """B's buckets all PUT without a commit: the archiver's rounds archive B's own instance
    and leave the UID A archived, said once in the hub's log."""
    study, uid, own_uid = generate_uid(), generate_uid(), generate_uid()
    a = _instance(tmp_path, "a", uid, study, "site A original")
    _commit(site_a, [a], study)
    b = _instance(tmp_path, "b", uid, study, "site B's own bytes")
    own = _instance(tmp_path, "own", own_uid, study, "B's own instance")
    # One instance a bucket (none split): B's own instance is archived ahead whichever
    # round meets B's version of A's UID.
    shipment = ship(pack_items([own, b]), site_b.hub_transfer_key,
                    max(own.stat().st_size, b.stat().st_size), study)
    assert len(shipment.buckets) == 2
    left = f"site CHU-B: transfer {shipment.transfer_id}: 1 instance not archived ahead"
    with client(site_b) as http:
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        assert shipment.put_all(http) == [201, 201]
        wait_for(lambda: left in hub.log(), 30, what="the round that leaves B's version")
        wait_for(lambda: _versions(hub, own_uid), 30, what="B's own instance archived ahead")
        line = next(x for x in hub.log().splitlines() if left in x)
        assert f"{uid} (site CHU-A)" in line and "said once for this transfer" in line, line
        assert _versions(hub, uid) == [(_sha(a), 1, "CHU-A")]  # no row of B's
        # The archive holds B's own instance before the hub records the batch it confirmed
        # (a moment later, in hub.sqlite): awaited, not read at once (failed under load).
        recorded = wait_for(lambda: [tuple(r) for r in read_rows(
            hub.home / "hub.sqlite", "SELECT sop_instance_uid FROM archived_instances "
            "WHERE transfer_id = ?", (shipment.transfer_id,))], 30,
            what="the archived batch recorded by the hub")
        assert recorded == [(own_uid,)]
        answer = http.post(shipment.url + "/commit")
        assert answer.status_code == 422 and answer.json()["error"] == "another_site", \
            answer.text
    assert _versions(hub, uid) == [(_sha(a), 1, "CHU-A")]
    assert _versions(hub, own_uid) == [(_sha(own), 1, "CHU-B")]
    assert hub.log().count(left) == 1


def test_the_same_bytes_from_another_site_and_a_sites_own_correction_are_archived(
        hub: HubProcess, site_a: Enrolment, site_b: Enrolment, tmp_path: Path) -> None:
    study, uid = generate_uid(), generate_uid()
    a = _instance(tmp_path, "a", uid, study, "site A original")
    _commit(site_a, [a], study)

    # B holds A's very bytes (a study both sent): taken, receipted to B, nothing changes.
    receipt = _commit(site_b, [a], study)
    assert receipt["instances"] == [{"sop_instance_uid": uid, "sha256": _sha(a)}]
    assert _versions(hub, uid) == [(_sha(a), 1, "CHU-A")]
    assert _owners(hub, uid) == [("CHU-A", _sha(a)), ("CHU-B", _sha(a))]

    # A's correction of it is refused now: B archived that UID too (with the first bytes),
    # and one site's upload must not change what the region serves for another's images.
    corrected = _instance(tmp_path, "a2", uid, study, "site A corrected")
    with client(site_a) as http:
        answer = _send(http, ship(pack_items([corrected]), site_a.hub_transfer_key, 1 << 20,
                                  study))
    assert answer.status_code == 422 and answer.json()["error"] == "another_site", answer.text
    assert _versions(hub, uid) == [(_sha(a), 1, "CHU-A")]

    # A UID only A ever sent: its correction is taken and becomes the current version.
    alone = generate_uid()
    first = _instance(tmp_path, "first", alone, study, "version 1")
    second = _instance(tmp_path, "second", alone, study, "version 2: corrected")
    _commit(site_a, [first], study)
    receipt = _commit(site_a, [second], study)
    assert receipt["instances"] == [{"sop_instance_uid": alone, "sha256": _sha(second)}]
    assert _versions(hub, alone) == [(_sha(first), 0, "CHU-A"), (_sha(second), 1, "CHU-A")]
    assert _owners(hub, alone) == [("CHU-A", _sha(second))]  # the latest only
    # And B sending A's first version now (the old bytes) would make it current: refused.
    with client(site_b) as http:
        answer = _send(http, ship(pack_items([first]), site_b.hub_transfer_key, 1 << 20, study))
    assert answer.status_code == 422 and answer.json()["error"] == "another_site", answer.text
    assert _versions(hub, alone) == [(_sha(first), 0, "CHU-A"), (_sha(second), 1, "CHU-A")]


def test_migration_14_records_who_archived_what_from_the_receipts(tmp_path: Path) -> None:
    """A hub database of schema 13: receipts of two sites (A's second version of a UID
    committed after its first, its row inserted before), and a transfer not committed that
    archived an instance ahead. Migration 14 records the latest version per (UID, site)."""
    path = tmp_path / "hub.sqlite"
    old = Database(path, HUB_MIGRATIONS[:13])

    def receipt(*pairs: tuple[str, str]) -> str:
        return json.dumps({"transfer_id": "x", "instances": [
            {"sop_instance_uid": u, "sha256": s} for u, s in pairs]})

    with old.transaction() as conn:
        for tid, site, committed_at, text in (
                ("T-a2", "CHU-A", 20.0, receipt(("1.1", "c" * 64))),
                ("T-a1", "CHU-A", 10.0, receipt(("1.1", "a" * 64), ("1.2", "b" * 64))),
                ("T-b", "CHU-B", 30.0, receipt(("1.2", "b" * 64))),
                ("T-open", "CHU-C", None, None)):
            conn.execute(
                "INSERT INTO transfers (id, site, study_uid, bucket_count, instance_count, "
                "manifest, manifest_sha256, created_at, committed_at, receipt) "
                "VALUES (?, ?, '2.25.1', 1, 1, '', 'x', 1, ?, ?)",
                (tid, site, committed_at, text))
        conn.execute("INSERT INTO archived_instances (transfer_id, sop_instance_uid, sha256, "
                     "archived_at) VALUES ('T-open', '1.3', ?, 5)", ("d" * 64,))
    old.close()

    new = Database(path, HUB_MIGRATIONS)
    try:
        assert new.schema_version() == len(HUB_MIGRATIONS) >= 14
        assert [tuple(r) for r in new.query(
            "SELECT sop_instance_uid, site, sha256 FROM archived_by_site "
            "ORDER BY sop_instance_uid, site")] == [
            ("1.1", "CHU-A", "c" * 64), ("1.2", "CHU-A", "b" * 64),
            ("1.2", "CHU-B", "b" * 64), ("1.3", "CHU-C", "d" * 64)]
        # What the archiver asks before a batch.
        asked = {"1.1": "a" * 64, "1.2": "b" * 64, "1.3": "d" * 64, "1.4": "e" * 64}
        assert store.archived_by_other_sites(new, "CHU-B", asked) == {"1.1": ("CHU-A", "c" * 64)}
        assert store.archived_by_other_sites(new, "CHU-A", asked) == {}
        assert store.archived_by_other_sites(new, "CHU-D", {"1.2": "f" * 64}) == {
            "1.2": ("CHU-A", "b" * 64)}
        # A batch archived later moves the site's row to its latest version.
        store.record_archived(new, "T-open", "CHU-C", [("1.3", "e" * 64)])
        assert store.archived_by_other_sites(new, "CHU-A", {"1.3": "e" * 64}) == {}
    finally:
        new.close()


def test_an_appliance_refused_for_another_sites_uids_says_so_and_keeps_the_study(
        pas_factory: Any, hub: HubProcess, site_a: Enrolment, tmp_path: Path) -> None:
    """Site B is a real appliance: a study imported with A's UIDs kept and its contents
    changed fails for good, with words a hospital's IT can act on; nothing is confirmed."""
    study, uid = generate_uid(), generate_uid()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _instance(tmp_path / "a", "a", uid, study, "site A original")
    b = _instance(tmp_path / "b", "b", uid, study, "re-imported, changed")
    _commit(site_a, [a], study)

    pas = enrolled_pas(pas_factory, hub, tmp_path / "chu-e",
                       {"PAS_STUDY__STABLE_AFTER_S": "1"})
    storescu([b], pas.port)
    job = wait_for(lambda: next((j for j in jobs(pas) if j["state"] == "failed"), None), 60,
                   what=f"the hub job failed (log {pas.log_path})")
    error = job["last_error"]
    assert f"the region refuses 1 instance of study {study}: another site already archived " \
        "those SOP Instance UIDs with other bytes" in error, error
    assert "contact regional ops" in error and uid in error and "cannot rebuild" not in error
    assert "CHU-A" not in error
    assert read_rows(pas.home / "pas.sqlite", "SELECT count(*) FROM instances WHERE "
                     "confirmed_at IS NOT NULL")[0][0] == 0
    assert _versions(hub, uid) == [(_sha(a), 1, "CHU-A")]

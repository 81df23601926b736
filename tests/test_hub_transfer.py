"""The transfer API against a real hub process (embedded archive), with real sealed buckets.

Real peers: ``pas hub run`` (TLS 1.3, mutual TLS) and an appliance identity from ``pas enroll``;
buckets are packed and sealed with ``appliance.transfer.pack``/``seal`` from the real MR set.
Each bad input of issue 3 is a test: a clear 4xx, logged, and nothing stored.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.hub.pki import verify_receipt
from appliance.transfer.client import verify_receipt as uplink_verify_receipt
from appliance.transfer.enrolment import Enrolment
from tests.support.hub import HubProcess, Shipment, client, enroll, pack_items, ship
from tests.support.peers import CT_DIR, MR_DIR, wait_for

MAX_BUCKET = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path_factory.mktemp("hub") / "home",
                         {"PAS_HUB_LIMITS__MAX_BUCKET_BYTES": str(MAX_BUCKET)}).init()
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def site(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> Enrolment:
    return enroll(hub, tmp_path_factory.mktemp("site"), "CHU-EST")


@pytest.fixture(scope="module")
def http(site: Enrolment) -> Iterator[httpx.Client]:
    with client(site) as session:
        yield session


@pytest.fixture(scope="module")
def mr_files() -> list[Path]:
    return sorted(p for p in MR_DIR.rglob("*") if p.is_file())


@pytest.fixture
def small(site: Enrolment, mr_files: list[Path]) -> Shipment:
    """20 MR instances in 2-3 buckets: enough to exercise every path quickly."""
    return ship(pack_items(mr_files[:20]), site.hub_transfer_key, target_bytes=512 * 1024)


def _status(http: httpx.Client, shipment: Shipment) -> dict:
    answer = http.get(shipment.url)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _archive_rows(hub: HubProcess, study_uid: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(hub.home / "archive" / "pas.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(
            "SELECT i.sop_instance_uid, i.sha256, i.path, s.origin FROM instances i "
            "JOIN series se ON i.series_fk = se.id JOIN studies s ON se.study_fk = s.id "
            "WHERE s.study_uid = ?", (study_uid,)).fetchall()
    finally:
        conn.close()


def test_whole_mr_study_arrives_bit_exact_with_a_signed_receipt(
        hub: HubProcess, site: Enrolment, http: httpx.Client, mr_files: list[Path]) -> None:
    from pydicom import dcmread

    study_uid = str(dcmread(mr_files[0], stop_before_pixels=True).StudyInstanceUID)
    shipment = ship(pack_items(mr_files), site.hub_transfer_key, 6 << 20, study_uid)
    assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
    assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 200
    assert shipment.put_all(http) == [201] * len(shipment.buckets)
    held = http.get(shipment.url + "/buckets").json()
    # The manifest's SHA-256 as the appliance computes it over what it would post: the same
    # manifest resumed is not posted again.
    canonical = json.dumps(shipment.manifest, sort_keys=True, separators=(",", ":")).encode()
    assert held == {"held": list(range(len(shipment.buckets))), "count": len(shipment.buckets),
                    "manifest_sha256": hashlib.sha256(canonical).hexdigest()}
    assert http.get(shipment.url + "/receipt").status_code == 404

    answer = http.post(shipment.url + "/commit")
    assert answer.status_code == 200, answer.text
    receipt = answer.json()
    assert receipt["archive"] == "embedded" and receipt["study_uid"] == study_uid
    assert {(i["sop_instance_uid"], i["sha256"]) for i in receipt["instances"]} == \
        set(shipment.originals.items())
    server_pem = (hub.home / "server.crt").read_bytes()
    assert verify_receipt(receipt, server_pem)
    uplink_verify_receipt(receipt, x509.load_pem_x509_certificate(server_pem)
                          .public_bytes(serialization.Encoding.DER))
    assert not verify_receipt({**receipt, "study_uid": "1.2.3"}, server_pem)

    rows = _archive_rows(hub, study_uid)
    assert len(rows) == len(mr_files) == 520
    for row in rows:
        assert row["origin"] == "regional"
        stored = hub.home / "archive" / "spool" / row["path"]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["sha256"] == \
            shipment.originals[row["sop_instance_uid"]]

    assert not (hub.home / "buckets" / shipment.transfer_id).exists()  # spent once receipted
    # Idempotent: commit again returns the same receipt; the archive holds no duplicate.
    assert http.post(shipment.url + "/commit").json() == receipt
    assert http.get(shipment.url + "/receipt").json() == receipt
    assert len(_archive_rows(hub, study_uid)) == 520
    late = http.put(shipment.bucket_url(0), content=shipment.buckets[0])
    assert late.status_code == 409 and late.json()["error"] == "committed"
    status = _status(http, shipment)
    assert status["committed"] and status["bytes_stored"] == sum(map(len, shipment.buckets))

    # The region read back through the hub (embedded archive: the serving DICOMweb routes).
    qido = http.get("/api/v1/region/dicom-web/studies", params={"StudyInstanceUID": study_uid})
    assert qido.status_code == 200, qido.text
    assert qido.json()[0]["0020000D"]["Value"] == [study_uid]
    row = rows[0]
    series_uid = str(dcmread(hub.home / "archive" / "spool" / row["path"],
                             stop_before_pixels=True).SeriesInstanceUID)
    wado = http.get(f"/api/v1/region/dicom-web/studies/{study_uid}/series/{series_uid}/"
                    f"instances/{row['sop_instance_uid']}",
                    headers={"Accept": 'multipart/related; type="application/dicom"; '
                             'transfer-syntax=*'})
    assert wado.status_code == 200, wado.text[:300]
    assert (hub.home / "archive" / "spool" / row["path"]).read_bytes() in wado.content
    assert http.post("/api/v1/region/dicom-web/studies", content=b"x").status_code == 405


def test_same_id_with_another_manifest_is_409(http: httpx.Client, small: Shipment) -> None:
    assert http.post("/api/v1/transfers", json=small.manifest).status_code == 201
    other = {**small.manifest, "study_uid": "1.2.999"}
    answer = http.post("/api/v1/transfers", json=other)
    assert answer.status_code == 409 and answer.json()["error"] == "conflict"


def test_a_bucket_sent_twice_is_stored_once_and_counted_twice(
        http: httpx.Client, small: Shipment) -> None:
    http.post("/api/v1/transfers", json=small.manifest)
    assert http.put(small.bucket_url(0), content=small.buckets[0]).status_code == 201
    assert http.put(small.bucket_url(0), content=small.buckets[0]).status_code == 200
    status = _status(http, small)
    assert status["bytes_received"] == 2 * len(small.buckets[0])
    assert status["bytes_stored"] == len(small.buckets[0]) and status["puts"] == 2


def _refused_and_nothing_stored(http: httpx.Client, hub: HubProcess, shipment: Shipment,
                                answer: httpx.Response, status: int, error: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == error and answer.json()["detail"]
    assert http.get(shipment.url + "/buckets").json()["held"] == []
    assert _status(http, shipment)["bytes_stored"] == 0
    assert not list((hub.home / "buckets").glob(f"{shipment.transfer_id}/*"))


def test_a_bucket_with_one_flipped_byte_is_rejected(
        hub: HubProcess, http: httpx.Client, small: Shipment) -> None:
    http.post("/api/v1/transfers", json=small.manifest)
    tampered = bytearray(small.buckets[0])
    tampered[len(tampered) // 2] ^= 0x01
    answer = http.put(small.bucket_url(0), content=bytes(tampered))
    _refused_and_nothing_stored(http, hub, small, answer, 400, "bucket_rejected")
    assert f"transfer {small.transfer_id} bucket 0 rejected" in hub.log()


def test_a_truncated_bucket_is_rejected(hub: HubProcess, http: httpx.Client,
                                        small: Shipment) -> None:
    http.post("/api/v1/transfers", json=small.manifest)
    answer = http.put(small.bucket_url(0), content=small.buckets[0][:-100])
    _refused_and_nothing_stored(http, hub, small, answer, 400, "bucket_rejected")


def test_a_bucket_replayed_into_another_transfer_or_index_is_rejected(
        hub: HubProcess, site: Enrolment, http: httpx.Client, small: Shipment,
        mr_files: list[Path]) -> None:
    victim = ship(pack_items(mr_files[:20]), site.hub_transfer_key, target_bytes=512 * 1024)
    http.post("/api/v1/transfers", json=small.manifest)
    http.post("/api/v1/transfers", json=victim.manifest)
    into_other_transfer = http.put(victim.bucket_url(0), content=small.buckets[0])
    _refused_and_nothing_stored(http, hub, victim, into_other_transfer, 400, "bucket_rejected")
    into_other_index = http.put(small.bucket_url(1), content=small.buckets[0])
    _refused_and_nothing_stored(http, hub, small, into_other_index, 400, "bucket_rejected")


def test_a_manifest_sha256_that_does_not_match_fails_the_commit_naming_the_instance(
        hub: HubProcess, site: Enrolment, http: httpx.Client) -> None:
    from pydicom import dcmread

    files = sorted(p for p in CT_DIR.rglob("*") if p.is_file())[:4]  # not archived elsewhere
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    shipment = ship(pack_items(files), site.hub_transfer_key, 1 << 20, study_uid)
    wrong = shipment.manifest["instances"][2]
    wrong["sha256"] = hashlib.sha256(b"not this file").hexdigest()
    assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
    assert shipment.put_all(http) == [201] * len(shipment.buckets)
    answer = http.post(shipment.url + "/commit")
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["error"] == "sha256_mismatch"
    assert [m["sop_instance_uid"] for m in body["mismatch"]] == [wrong["sop_instance_uid"]]
    assert body["mismatch"][0]["actual"] == shipment.originals[wrong["sop_instance_uid"]]
    assert wrong["sop_instance_uid"] in body["detail"]
    assert http.get(shipment.url + "/receipt").status_code == 404
    # Instances that passed their check may have been archived ahead of the commit (bit-exact:
    # the archive holds their original SHA-256); the one that differs never is.
    archived = {r["sop_instance_uid"]: r["sha256"] for r in _archive_rows(hub, study_uid)}
    assert wrong["sop_instance_uid"] not in archived
    assert all(shipment.originals[uid] == sha for uid, sha in archived.items())
    assert "commit refused" in hub.log()


def test_an_oversized_bucket_is_413(hub: HubProcess, http: httpx.Client,
                                    small: Shipment) -> None:
    http.post("/api/v1/transfers", json=small.manifest)
    answer = http.put(small.bucket_url(0), content=b"\0" * (MAX_BUCKET + 1))
    _refused_and_nothing_stored(http, hub, small, answer, 413, "too_large")

    def no_length() -> Iterator[bytes]:  # chunked: the limit is enforced while reading
        for _ in range(5):
            yield b"\0" * (MAX_BUCKET // 4)

    answer = http.put(small.bucket_url(0), content=no_length())
    _refused_and_nothing_stored(http, hub, small, answer, 413, "too_large")


def test_garbage_json_and_malformed_manifests_are_refused(
        hub: HubProcess, http: httpx.Client, small: Shipment) -> None:
    garbage = http.post("/api/v1/transfers", content=b"{not json",
                        headers={"Content-Type": "application/json"})
    assert garbage.status_code == 400 and garbage.json()["error"] == "bad_json"
    missing = {k: v for k, v in small.manifest.items() if k != "bucket_count"}
    answer = http.post("/api/v1/transfers", json=missing)
    assert answer.status_code == 422 and "bucket_count" in answer.json()["detail"]
    bad_sha = json.loads(json.dumps(small.manifest))
    bad_sha["instances"][0]["sha256"] = "xyz"
    answer = http.post("/api/v1/transfers", json=bad_sha)
    assert answer.status_code == 422 and "instances.0.sha256" in answer.json()["detail"]
    foreign_key = {**small.manifest, "wrapped_key": small.manifest["wrapped_key"][:-8] + "AAAAAAA="}
    answer = http.post("/api/v1/transfers", json=foreign_key)
    assert answer.status_code == 422 and answer.json()["error"] == "bad_wrapped_key"
    assert http.get(small.url).status_code == 404  # nothing was created
    assert "manifest is not JSON" in hub.log() and "malformed manifest" in hub.log()


def test_a_gzip_manifest_is_the_same_manifest_and_the_receipt_comes_gzipped(
        hub: HubProcess, http: httpx.Client, small: Shipment) -> None:
    import gzip
    import zlib

    plain = json.dumps(small.manifest).encode()
    zipped = http.post("/api/v1/transfers", content=gzip.compress(plain),
                       headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert zipped.status_code == 201, zipped.text
    assert http.post("/api/v1/transfers", json=small.manifest).status_code == 200  # the same
    assert small.put_all(http) == [201] * len(small.buckets)
    for answer in (http.post(small.url + "/commit"), http.get(small.url + "/receipt")):
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-encoding"] == "gzip"  # httpx asked for gzip
        assert len(answer.json()["instances"]) == len(small.originals)
    # Without Accept-Encoding: plain JSON.
    bare = http.get(small.url + "/receipt", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in bare.headers and bare.json() == answer.json()

    bad = http.post("/api/v1/transfers", content=b"\x1f\x8bnot gzip",
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_encoding"
    brotli = http.post("/api/v1/transfers", content=plain,
                       headers={"Content-Type": "application/json", "Content-Encoding": "br"})
    assert brotli.status_code == 400 and "not supported" in brotli.json()["detail"]
    # A small body that inflates past limits.max_manifest_bytes (32 MiB) is refused unread.
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = squeeze.compress(b" " * (40 << 20)) + squeeze.flush()
    assert len(bomb) < 100_000
    answer = http.post("/api/v1/transfers", content=bomb,
                       headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert answer.status_code == 413 and answer.json()["error"] == "too_large"
    assert "gzip body does not decode" in hub.log()


def test_wrong_index_unknown_transfer_missing_buckets(
        http: httpx.Client, small: Shipment) -> None:
    unknown = http.put(small.bucket_url(0), content=small.buckets[0])
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_transfer"
    http.post("/api/v1/transfers", json=small.manifest)
    out = http.put(small.bucket_url(len(small.buckets)), content=small.buckets[0])
    assert out.status_code == 416
    http.put(small.bucket_url(0), content=small.buckets[0])
    answer = http.post(small.url + "/commit")
    assert answer.status_code == 409
    assert answer.json()["missing"] == list(range(1, len(small.buckets)))


def test_sites_do_not_see_each_others_transfers(
        hub: HubProcess, http: httpx.Client, small: Shipment, tmp_path: Path) -> None:
    http.post("/api/v1/transfers", json=small.manifest)
    with client(enroll(hub, tmp_path / "other", "CHU-OUEST")) as other:
        assert other.get(small.url + "/buckets").status_code == 404
        assert other.put(small.bucket_url(0), content=small.buckets[0]).status_code == 404
    assert _status(http, small)["bytes_received"] == 0


def test_a_file_the_embedded_archive_cannot_file_means_502_and_no_receipt(
        hub: HubProcess, site: Enrolment, http: httpx.Client, mr_files: list[Path],
        tmp_path: Path) -> None:
    from appliance.transfer.pack import PackItem

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not DICOM at all\n" * 64)
    items = [*pack_items(mr_files[:2]),
             PackItem("1.2.826.0.1.3680043.8.498.77", junk, junk.stat().st_size,
                      hashlib.sha256(junk.read_bytes()).hexdigest())]
    shipment = ship(items, site.hub_transfer_key, study_uid="1.2.826.0.1.3680043.8.498.78")
    http.post("/api/v1/transfers", json=shipment.manifest)
    shipment.put_all(http)
    answer = http.post(shipment.url + "/commit")
    assert answer.status_code == 502, answer.text
    assert answer.json()["refused"] == ["1.2.826.0.1.3680043.8.498.77"]
    assert http.get(shipment.url + "/receipt").status_code == 404
    assert "embedded archive refused 1.2.826.0.1.3680043.8.498.77" in hub.log()


def test_acknowledged_buckets_survive_kill_9_of_the_hub(
        hub: HubProcess, site: Enrolment, small: Shipment) -> None:
    with client(site) as http:
        http.post("/api/v1/transfers", json=small.manifest)
        assert http.put(small.bucket_url(0), content=small.buckets[0]).status_code == 201
    hub.kill()
    hub.start()
    with client(site) as http:
        assert http.get(small.url + "/buckets").json()["held"] == [0]
        for index in range(1, len(small.buckets)):
            assert http.put(small.bucket_url(index), content=small.buckets[index]).status_code \
                == 201
        answer = http.post(small.url + "/commit")
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["instances"]) == 20


def test_two_commits_at_once_give_one_receipt_and_one_copy(
        hub: HubProcess, site: Enrolment, small: Shipment) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with client(site) as http:
        http.post("/api/v1/transfers", json=small.manifest)
        small.put_all(http)
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: http.post(small.url + "/commit"), range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json() == answers[1].json()
    assert hub.log().count(f"transfer {small.transfer_id} committed") == 1


def test_a_put_cut_mid_body_stores_nothing(hub: HubProcess, site: Enrolment,
                                           small: Shipment) -> None:
    import socket

    with client(site) as http:
        http.post("/api/v1/transfers", json=small.manifest)
    sealed = small.buckets[0]
    raw = socket.create_connection(("127.0.0.1", hub.port))
    tls = site.ssl_context().wrap_socket(raw, server_hostname="localhost")
    tls.sendall(f"PUT {small.bucket_url(0)} HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(sealed)}\r\n\r\n"
                .encode() + sealed[: len(sealed) // 2])
    tls.close()  # the link drops half-way through the bucket
    wait_for(lambda: "client went away mid-body; nothing stored" in hub.log(), 10,
             what="the cut logged")
    with client(site) as http:
        assert http.get(small.url + "/buckets").json()["held"] == []
        status = _status(http, small)
        assert status["bytes_received"] == 0 and status["bytes_stored"] == 0
        assert http.put(small.bucket_url(0), content=sealed).status_code == 201


def _complete_in(shipment: Shipment, buckets: int) -> set[str]:
    """The instances all of whose pieces travel in the first ``buckets`` buckets."""
    return {i["sop_instance_uid"] for i in shipment.manifest["instances"]
            if max(i["buckets"]) < buckets}


def _ct_shipment(site: Enrolment, first: int, count: int) -> Shipment:
    """CT files no other test of this module sends, in 1 MiB buckets (several per study)."""
    files = sorted(p for p in CT_DIR.rglob("*") if p.is_file())[first:first + count]
    return ship(pack_items(files), site.hub_transfer_key, 1 << 20,
                f"1.2.826.0.1.3680043.8.498.{900 + first}")


def _archived_by_sha(hub: HubProcess, shipment: Shipment) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the transfer's instances the embedded archive holds."""
    conn = sqlite3.connect(hub.home / "archive" / "pas.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT sop_instance_uid, sha256 FROM instances").fetchall()
    finally:
        conn.close()
    return {r["sop_instance_uid"]: r["sha256"] for r in rows
            if r["sop_instance_uid"] in shipment.originals}


def test_instances_are_archived_while_buckets_arrive_and_the_commit_finishes_the_tail(
        hub: HubProcess, site: Enrolment, http: httpx.Client) -> None:
    shipment = _ct_shipment(site, 4, 12)
    assert len(shipment.buckets) >= 3
    assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
    half = len(shipment.buckets) // 2
    for index in range(half):
        assert http.put(shipment.bucket_url(index), content=shipment.buckets[index]) \
            .status_code == 201
    ahead = _complete_in(shipment, half)
    assert ahead
    # Archived before any commit, each bit-exact; still no receipt.
    wait_for(lambda: set(_archived_by_sha(hub, shipment)) >= ahead, 30,
             what="the complete instances archived ahead of the commit")
    assert http.get(shipment.url + "/receipt").status_code == 404
    for index in range(half, len(shipment.buckets)):
        assert http.put(shipment.bucket_url(index), content=shipment.buckets[index]) \
            .status_code == 201
    answer = http.post(shipment.url + "/commit")
    assert answer.status_code == 200, answer.text
    assert {(i["sop_instance_uid"], i["sha256"]) for i in answer.json()["instances"]} == \
        set(shipment.originals.items())
    assert _archived_by_sha(hub, shipment) == shipment.originals
    # One line at the commit, naming the site and the study (a line per batch archived ahead
    # was ~70 lines for a handful of transfers; those are DEBUG now).
    assert "archived ahead of the commit" not in hub.log()
    assert (f"site {site.site}: transfer {shipment.transfer_id} committed, study "
            f"{shipment.manifest['study_uid']}: ") in hub.log()
    assert not (hub.home / "work" / shipment.transfer_id).exists()


def test_kill_9_of_the_hub_while_archiving_ahead_resumes_on_start(
        hub: HubProcess, site: Enrolment) -> None:
    shipment = _ct_shipment(site, 16, 12)
    half = len(shipment.buckets) // 2
    with client(site) as http:
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        for index in range(half):
            assert http.put(shipment.bucket_url(index), content=shipment.buckets[index]) \
                .status_code == 201
    hub.kill()  # the archiver may be anywhere: mid-rebuild, mid-file, between archive and row
    hub.start()
    # No request after the restart: the hub resumes the held buckets' complete instances.
    ahead = _complete_in(shipment, half)
    wait_for(lambda: set(_archived_by_sha(hub, shipment)) >= ahead, 30,
             what="archiving resumed after kill -9")
    with client(site) as http:
        for index in range(half, len(shipment.buckets)):
            assert http.put(shipment.bucket_url(index), content=shipment.buckets[index]) \
                .status_code == 201
        answer = http.post(shipment.url + "/commit")
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["instances"]) == 12
    assert _archived_by_sha(hub, shipment) == shipment.originals
    conn = sqlite3.connect(hub.home / "archive" / "pas.sqlite")
    try:
        uids = [r[0] for r in conn.execute("SELECT sop_instance_uid FROM instances")]
    finally:
        conn.close()
    # No duplicate however often an instance was handed to the archive.
    assert sorted(u for u in uids if u in shipment.originals) == sorted(shipment.originals)


def test_put_with_commit_answers_the_receipt_only_when_it_completes_the_set(
        hub: HubProcess, site: Enrolment, http: httpx.Client, small: Shipment) -> None:
    """``?commit=true`` on every PUT: the ones before the last answer as plain PUTs, the one
    that completes the set answers with the signed receipt (the commit's own)."""
    assert len(small.buckets) >= 2
    assert http.post("/api/v1/transfers", json=small.manifest).status_code == 201
    last = len(small.buckets) - 1
    for index in range(last):
        answer = http.put(small.bucket_url(index), params={"commit": "true"},
                          content=small.buckets[index])
        assert answer.status_code == 201 and "receipt" not in answer.json()
    assert http.get(small.url + "/receipt").status_code == 404  # nothing committed yet
    answer = http.put(small.bucket_url(last), params={"commit": "true"},
                      content=small.buckets[last])
    assert answer.status_code == 201, answer.text
    receipt = answer.json()["receipt"]
    assert receipt == http.get(small.url + "/receipt").json()
    assert receipt == http.post(small.url + "/commit").json()  # a repeat gives the same one
    assert {(i["sop_instance_uid"], i["sha256"]) for i in receipt["instances"]} == set(
        small.originals.items())
    assert verify_receipt(receipt, (hub.home / "server.crt").read_bytes())
    # Committed: a further PUT is refused as before.
    assert http.put(small.bucket_url(0), params={"commit": "true"},
                    content=small.buckets[0]).status_code == 409


def test_put_with_commit_that_cannot_commit_stores_the_bucket_and_gives_no_receipt(
        hub: HubProcess, site: Enrolment, http: httpx.Client) -> None:
    files = sorted(p for p in CT_DIR.rglob("*") if p.is_file())[4:6]
    shipment = ship(pack_items(files), site.hub_transfer_key, 8 << 20)
    wrong = shipment.manifest["instances"][0]
    wrong["sha256"] = hashlib.sha256(b"not this file").hexdigest()
    assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
    answer = http.put(shipment.bucket_url(0), params={"commit": "true"},
                      content=shipment.buckets[0])
    assert answer.status_code == 201, answer.text
    assert "receipt" not in answer.json() and answer.json()["commit_refused"] == "sha256_mismatch"
    assert http.get(shipment.url + "/buckets").json()["held"] == [0]
    assert http.get(shipment.url + "/receipt").status_code == 404
    assert http.post(shipment.url + "/commit").status_code == 422  # the reason, in full


def test_a_bucket_that_comes_before_its_manifest_waits_for_it(
        hub: HubProcess, site: Enrolment, http: httpx.Client, small: Shipment) -> None:
    """The appliance sends a new transfer's manifest and first buckets at once, on separate
    connections: a bucket read first is held until the manifest is in, then stored (a
    transfer that never comes still gets its 404: test_wrong_index_unknown_transfer...)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool, client(site) as other:
        early = pool.submit(other.put, small.bucket_url(0), params={"commit": "true"},
                            content=small.buckets[0])
        wait_for(lambda: f"a bucket of transfer {small.transfer_id} came before its manifest"
                 in hub.log(), 10, what="the hub holding the early bucket")
        assert http.post("/api/v1/transfers", json=small.manifest).status_code == 201
        answer = early.result()
    assert answer.status_code == 201, answer.text
    assert "receipt" not in answer.json()  # the set is not complete
    assert http.get(small.url + "/buckets").json()["held"] == [0]
    assert _status(http, small)["bytes_received"] == len(small.buckets[0])


def _bucket_with_one_piece(uid: str, offset: int, total: int, data: bytes) -> bytes:
    """A well-formed bucket payload (pack.py's format v1) carrying one piece of ``uid``:
    ``data`` at ``offset`` of a file of ``total`` bytes, in the zstd stream. What a packer
    that disagrees with its own manifest (or a hostile site, with the transfer's key) sends."""
    import struct

    import zstandard

    from appliance.transfer import pack

    frame = zstandard.ZstdCompressor().compress(data)
    header = json.dumps({"v": 1, "raw": len(data), "blobs": [len(frame)], "entries": [
        {"uid": uid, "offset": offset, "length": len(data), "total": total,
         "segs": [[0, len(data)]]}]}, separators=(",", ":")).encode()
    return pack.MAGIC + struct.pack(">I", len(header)) + header + frame


def test_a_piece_past_the_size_the_manifest_gives_is_refused_naming_it(
        hub: HubProcess, site: Enrolment, http: httpx.Client, mr_files: list[Path]) -> None:
    """A sealed bucket that authenticates and unpacks, but whose piece lies past the size the
    manifest gives its instance (its own header says a file of 32 TiB): the commit is a 422
    bad_bucket naming the instance and both sizes, nothing is written past that size under
    the hub's work folder, and the hub keeps serving. Before, the archiver wrote the piece
    where it said: a sparse file of that size, hashed whole by the background round and again
    by the commit (a piece at 8 GiB: the commit answered sha256_mismatch after 37 s; at 1 TiB
    it would take hours, an archiver thread and the transfer's lock held all along); past the
    file system's limit (this one) the write failed, OSError [Errno 22], and the commit
    answered 500 Internal Server Error, which a site retries as a passing fault."""
    from appliance.transfer import seal

    shipment = ship(pack_items(mr_files[:1]), site.hub_transfer_key)
    instance = shipment.manifest["instances"][0]
    far = 1 << 45  # past ext4's 16 TiB largest file: the write itself fails
    payload = _bucket_with_one_piece(instance["sop_instance_uid"], far, far + 10, b"x" * 10)
    sealed = seal.seal_bucket(shipment.key, shipment.transfer_id, 0, payload)
    assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
    assert http.put(shipment.bucket_url(0), content=sealed).status_code == 201
    answer = http.post(shipment.url + "/commit")
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["error"] == "bad_bucket" and body["bucket"] == 0, body
    assert instance["sop_instance_uid"] in body["detail"]
    assert str(instance["size"]) in body["detail"] and str(far + 10) in body["detail"]
    assert http.get(shipment.url + "/receipt").status_code == 404
    work = hub.home / "work" / shipment.transfer_id
    written = [p.stat().st_size for p in work.rglob("*") if p.is_file()] if work.exists() else []
    assert all(size <= instance["size"] for size in written), written
    assert _status(http, shipment)["held"] == 1  # still serving; the bucket stays held
    assert "commit refused" in hub.log()


def test_a_resume_asking_for_a_transfer_the_hub_does_not_hold_is_no_warning(
        hub: HubProcess, site: Enrolment, http: httpx.Client) -> None:
    """A site asks which buckets the hub holds before it resumes; a transfer the hub never
    created (or expired) was a WARNING, followed at once by "created", on every resume."""
    asked = http.get("/api/v1/transfers/never-made-here/buckets")
    assert asked.status_code == 404 and asked.json()["error"] == "unknown_transfer"
    line = next(line for line in hub.log().splitlines()
                if "/api/v1/transfers/never-made-here/buckets" in line)
    assert " INFO " in line and line.endswith(
        "unknown transfer (not held here: the site sends it anew)"), line
    refused = http.put("/api/v1/transfers/never-made-here/buckets/0", content=b"x")
    assert refused.status_code == 404  # a PUT for it is still a WARNING (not the resume way)


def _versions(hub: HubProcess, uid: str) -> list[tuple[str, int]]:
    """The embedded archive's versions of ``uid``: (SHA-256, is_current), oldest first."""
    conn = sqlite3.connect(hub.home / "archive" / "pas.sqlite")
    try:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT sha256, is_current FROM instances WHERE sop_instance_uid = ? "
            "ORDER BY version", (uid,))]
    finally:
        conn.close()


def _renamed(source: Path, target: Path, uid: str, comment: str | None = None) -> Path:
    """``source`` saved as ``target`` under SOP Instance UID ``uid`` (a corrected version
    when ``comment`` is given: same UID, other bytes)."""
    from pydicom import dcmread

    ds = dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    if comment is not None:
        ds.ImageComments = comment
    ds.save_as(target, enforce_file_format=True)
    return target


def test_a_transfer_the_site_left_never_archives_a_version_it_replaced_since_after_a_restart(
        hub: HubProcess, site: Enrolment, http: httpx.Client, mr_files: list[Path],
        tmp_path: Path) -> None:
    """T1 archived nothing ahead (the archive refused its first batch) and its commit met a
    SHA-256 mismatch; the site left it, sent the study again in T2, then a correction of one
    of its instances in T3. A restart resumes T1 (buckets held, no receipt): archiving its
    good instance again made the stale version current in the region."""
    from pydicom.uid import generate_uid

    from appliance.transfer.pack import PackItem

    a_uid, b_uid, c_uid = generate_uid(), generate_uid(), generate_uid()
    x = _renamed(mr_files[30], tmp_path / "x.dcm", a_uid)
    y = _renamed(mr_files[30], tmp_path / "y.dcm", a_uid, "version Y: corrected")
    b = _renamed(mr_files[31], tmp_path / "b.dcm", b_uid)
    junk = tmp_path / "junk.bin"  # the embedded archive refuses it: T1 archives nothing ahead
    junk.write_bytes(b"not DICOM at all\n" * 6000)
    study = generate_uid()
    t1 = ship([PackItem(c_uid, junk, junk.stat().st_size,
                        hashlib.sha256(junk.read_bytes()).hexdigest()), *pack_items([x, b])],
              site.hub_transfer_key, 128 * 1024, study)
    assert len(t1.buckets) == 3 and t1.manifest["instances"][0]["buckets"] == [0]
    t1.manifest["instances"][2]["sha256"] = hashlib.sha256(b"spoiled").hexdigest()
    refused_ahead = f"transfer {t1.transfer_id}: the embedded archive refused"
    assert http.post("/api/v1/transfers", json=t1.manifest).status_code == 201
    assert http.put(t1.bucket_url(0), content=t1.buckets[0]).status_code == 201
    wait_for(lambda: refused_ahead in hub.log(), 30, what="T1's first batch refused")
    assert [http.put(t1.bucket_url(i), content=t1.buckets[i]).status_code
            for i in (1, 2)] == [201, 201]
    answer = http.post(t1.url + "/commit")
    assert answer.status_code == 422 and answer.json()["error"] == "sha256_mismatch"
    assert _versions(hub, a_uid) == []  # nothing of T1 archived

    x_sha, y_sha = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (x, y))
    for files in ([x, b], [y]):  # T2: the study again, then T3: the correction of A
        shipment = ship(pack_items(files), site.hub_transfer_key, 1 << 20, study)
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        shipment.put_all(http)
        answer = http.post(shipment.url + "/commit")
        assert answer.status_code == 200, answer.text
    assert _versions(hub, a_uid) == [(x_sha, 0), (y_sha, 1)]

    hub.kill()
    hub.start()  # resumes T1: it holds buckets and no receipt
    wait_for(lambda: hub.log().count(refused_ahead) == 2, 30,
             what="T1's round after the restart")
    assert _versions(hub, a_uid) == [(x_sha, 0), (y_sha, 1)]  # the correction stays current
    # B too: T1's manifest named it with other bytes than T2's receipt.
    assert f"transfer {t1.transfer_id}: 2 instances superseded" in hub.log()
    with client(site) as again:  # nor does T1's commit archive the stale version
        answer = again.post(t1.url + "/commit")
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "superseded"
    assert {"sop_instance_uid": a_uid, "sha256": x_sha, "current_sha256": y_sha,
            "transfer_id": shipment.transfer_id} in answer.json()["superseded"]
    assert _versions(hub, a_uid) == [(x_sha, 0), (y_sha, 1)]

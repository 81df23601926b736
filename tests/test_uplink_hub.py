"""The ``hub`` destination end to end, real peers only.

storescu -> PAS (enrolled through the real ``pas enroll``, so the hub is its default route,
no rule written) -> mutual TLS 1.3 -> ``pas hub run`` (embedded archive, or dicomweb into a
real Orthanc). Each instance must arrive bit-exact (SHA-256 of the file PAS stored), become
confirmed from the signed receipt only, and a cut link or a kill -9 of the appliance mid-upload
must resume the *same* transfer, re-sending no more than the buckets that were in flight.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from pydicom import dcmread

from appliance.hub.pki import HubPKI
from tests.support.archived import orthanc_hashes
from tests.support.hub import HubProcess, enroll
from tests.support.peers import (
    CT_DIR,
    MR_DIR,
    Orthanc,
    PasProcess,
    storescu,
    wait_for,
)
from tests.support.peers import read_rows as rows
from tests.support.tcpproxy import TcpProxy

PARALLEL = 3
# The resume tests: one MR study of 300 instances (25.8 MB) in ~50 buckets of 0.5 MiB.
RESUME_FILES = sorted(MR_DIR.glob("*.dcm"))[:300]
# A send of one image (or a few) is over in well under a second: its study need not wait
# enrolled_pas's 3 s (there for the hundreds of images of the other tests) to be stable. One
# image cannot make a delta job at all; a few take the 1 s the rest of the suite gives.
ONE_IMAGE_STABLE = {"PAS_STUDY__STABLE_AFTER_S": "0.5"}
FEW_FILES_STABLE = {"PAS_STUDY__STABLE_AFTER_S": "1"}




def jobs(pas: PasProcess) -> list[sqlite3.Row]:
    return rows(pas.home / "pas.sqlite", "SELECT * FROM jobs ORDER BY id")


def first_try(pas: PasProcess, what: str) -> sqlite3.Row:
    """One CT image sent; the job once its first try recorded an error."""
    storescu(sorted(CT_DIR.glob("*.dcm"))[:1], pas.port)
    return wait_for(lambda: next((j for j in jobs(pas) if j["last_error"]), None), 60,
                    what=f"{what}'s first try (log {pas.log_path})")


def distinct_uids(folder: Path) -> tuple[set[str], set[str]]:
    sops, studies = set(), set()
    for path in folder.glob("*.dcm"):
        ds = dcmread(path, stop_before_pixels=True)
        sops.add(str(ds.SOPInstanceUID))
        studies.add(str(ds.StudyInstanceUID))
    return sops, studies


def stored_hashes(pas: PasProcess) -> dict[str, str]:
    return {r["sop_instance_uid"]: r["sha256"] for r in
            rows(pas.home / "pas.sqlite", "SELECT sop_instance_uid, sha256 FROM instances")}


def wait_jobs_finished(pas: PasProcess, instances: int, timeout: float = 180
                       ) -> list[sqlite3.Row]:
    """Wait until all ``instances`` are received and routed and no job is left to run (a
    study may get a second, delta job when it looked stable half-way through the send)."""
    db = pas.home / "pas.sqlite"

    def finished() -> bool:
        row = rows(db, "SELECT count(*) AS n, count(routed_at) AS routed FROM instances")[0]
        busy = rows(db, "SELECT count(*) AS n FROM jobs WHERE state IN ('pending', 'running')")
        return bool(row["n"] == instances == row["routed"] and busy[0]["n"] == 0)

    wait_for(finished, timeout, interval=0.2, what=f"{instances} instances delivered "
             f"(log {pas.log_path})")
    return jobs(pas)


def enrolled_pas(pas_factory: Any, hub: HubProcess, home: Path, env: dict[str, str] | None = None,
                 via: TcpProxy | None = None,
                 before_start: Callable[[Path], None] | None = None) -> PasProcess:
    """Enrol ``home`` with the real CLI, optionally point it at the hub through ``via``, and
    start PAS there with no rule and no fallback: the hub must be the default route."""
    enroll(hub, home, home.name.upper())
    if via is not None:  # the same hub name (localhost, in the certificate), another port
        hub_json = home / "pki" / "hub.json"
        info = json.loads(hub_json.read_text())
        info["url"] = f"https://localhost:{via.port}"
        hub_json.write_text(json.dumps(info))
    if before_start is not None:
        before_start(home)
    return pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_QUEUE__BACKOFF_INITIAL_S": "0.3",
                        "PAS_QUEUE__BACKOFF_MAX_S": "1", "PAS_HUB__PARALLEL_BUCKETS": str(PARALLEL),
                        # Durable ingest is the ingest tests' subject; here it only costs time.
                        "PAS_STORAGE__FSYNC": "false",
                        # One job per study even when storescu stalls on a loaded machine.
                        "PAS_STUDY__STABLE_AFTER_S": "3",
                        # Priors fetched from the region (the prefetch area) would add
                        # instances to the counts asserted here.
                        "PAS_PREFETCH__ON_ARRIVAL": "false",
                        **(env or {})}, home=home)


def hub_transfers(hub: HubProcess) -> list[sqlite3.Row]:
    return rows(hub.home / "hub.sqlite", "SELECT * FROM transfers")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path_factory.mktemp("hub-embedded") / "home").init()
    process.start()
    yield process
    process.kill()  # its orderly stop is the hub tests' subject (and takes 15 s here)


def test_ct_set_to_embedded_hub_is_confirmed_bit_exact(pas_factory: Any, hub: HubProcess,
                                                       tmp_path: Path) -> None:
    # pack_level "auto": the level is chosen per bucket from the rate the PUTs measure.
    # Studies of 1-4 images: the 1 s of FEW_FILES_STABLE, not 3 s (a study stable half-way
    # through its send gets a delta job, which the counts below allow: a transfer per job).
    pas = enrolled_pas(pas_factory, hub, tmp_path / "site-ct",
                       {"PAS_HUB__PACK_LEVEL": "auto", **FEW_FILES_STABLE})
    storescu(CT_DIR, pas.port)
    sop_uids, study_uids = distinct_uids(CT_DIR)
    finished = wait_jobs_finished(pas, len(sop_uids))
    assert {(j["kind"], j["destination"], j["state"]) for j in finished} == {
        ("hub", "hub", "done")}, [j["last_error"] for j in finished]

    stored = stored_hashes(pas)
    assert set(stored) == sop_uids
    archived = {r["sop_instance_uid"]: (r["sha256"], r["path"]) for r in rows(
        hub.home / "archive" / "pas.sqlite", "SELECT sop_instance_uid, sha256, path "
        "FROM instances")}
    for uid, sha in stored.items():
        recorded, path = archived[uid]
        data = (hub.home / "archive" / "spool" / path).read_bytes()
        assert recorded == sha and hashlib.sha256(data).hexdigest() == sha, uid
    confirmed = rows(pas.home / "pas.sqlite",
                     "SELECT count(*) AS n FROM instances WHERE confirmed_at IS NOT NULL")
    assert confirmed[0]["n"] == len(sop_uids)

    status = pas.status()
    assert status["confirmed_instances"] == len(sop_uids)
    assert status["links"]["hub"]["state"] == "up"
    assert not [b for b in status["backlog"] if b["destination"] == "hub"]
    # One transfer per study, each committed once; compression made the wire smaller.
    transfers = [t for t in hub_transfers(hub) if t["study_uid"] in study_uids]
    assert len(transfers) == len(finished)  # one per job (a study, or a late delta of it)
    assert all(t["receipt"] for t in transfers)
    progress = [json.loads(j["progress"]) for j in finished]
    assert not [p for p in progress if "key" in p]  # dropped once delivered
    assert all(sum(p["pack_levels"].values()) == p["buckets_sent"] for p in progress)
    assert set().union(*(p["pack_levels"] for p in progress)) <= {"fast", "default", "max"}
    assert sum(p["bytes_sent"] for p in progress) < sum(p["original_bytes_sent"]
                                                        for p in progress)


def _metric(pas: PasProcess, name: str) -> float:
    """One unlabelled sample of the appliance's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "_total ")]
    assert values, f"{name} not in /metrics"
    return values[0]


def _resume_setup(pas_factory: Any, hub: HubProcess, home: Path, proxy: TcpProxy | None
                  ) -> tuple[PasProcess, int]:
    """An MR study (300 instances) in small buckets at a capped rate, so that the upload
    lasts a few seconds and can be interrupted half-way."""
    pas = enrolled_pas(pas_factory, hub, home, {
        "PAS_HUB__BUCKET_MB": "0.5", "PAS_HUB__MAX_MBPS": "6", "PAS_HUB__RETRIES": "1",
        "PAS_QUEUE__LEASE_S": "6"}, via=proxy)
    storescu(RESUME_FILES, pas.port)

    def half_sent() -> int | None:
        current = jobs(pas)
        if current and current[0]["progress"]:
            progress = json.loads(current[0]["progress"])
            if progress.get("buckets_sent", 0) >= progress["bucket_count"] // 2:
                return int(progress["bucket_count"])
        return None

    bucket_count = wait_for(half_sent, 120, interval=0.05, what="half of the buckets sent")
    return pas, bucket_count


def _in_flight_behind_a_dead_link(pas: PasProcess, hub: HubProcess, proxy: TcpProxy,
                                  transfer_id: str) -> float:
    """Drop what the appliance sends towards the hub, then wait until the in-flight gauge
    can no longer change before the cut, and return it: no PUT can complete any more (every
    body the hub received is stored, and every bucket it stored is counted in the job's
    progress, so its answer came back and its PUT left the gauge), and at least one PUT is
    stuck behind the dead link. Those stay in flight until the cut; a PUT that starts later
    only adds to the gauge (the value returned is then a lower bound). Two polls in a row
    must agree, so that a body the hub has whole but not yet read is not missed."""
    proxy.drop_upward()
    last: tuple[Any, ...] | None = None

    def settled() -> float | None:
        nonlocal last
        hub_db = hub.home / "hub.sqlite"
        query = "SELECT bytes_received, bytes_stored FROM transfers WHERE id = ?"
        before = rows(hub_db, query, (transfer_id,))[0]
        sent = json.loads(jobs(pas)[0]["progress"]).get("bytes_sent", 0)
        gauge = _metric(pas, "pas_upload_inflight_bytes")
        after = rows(hub_db, query, (transfer_id,))[0]
        snapshot = (tuple(before), tuple(after), sent, gauge)
        quiet = (before["bytes_received"] == before["bytes_stored"] == sent
                 == after["bytes_received"] == after["bytes_stored"])
        previous, last = last, snapshot
        return gauge if quiet and gauge > 0 and previous == snapshot else None

    return float(wait_for(settled, 60, interval=0.2,
                          what="the PUTs under way to be stuck behind the dead link"))


def _assert_resumed_once(pas: PasProcess, hub: HubProcess, transfer_id: str) -> int:
    """Checks the resumed transfer; returns the most bytes one of its sealed buckets can be."""
    finished = wait_jobs_finished(pas, len(RESUME_FILES))
    assert finished[0]["state"] == "done", finished[0]["last_error"]
    assert json.loads(finished[0]["progress"])["transfer_id"] == transfer_id  # same transfer
    # One worker owned the job to the end (the lease was renewed through the long commit).
    # (Its line follows the job's commit, which the wait above saw: awaited.)
    said = f"job {finished[0]['id']}: study"
    wait_for(lambda: said in pas.log(), 10, what="the job's line")
    assert pas.log().count(said) == 1
    assert pas.status()["confirmed_instances"] == len(RESUME_FILES)
    transfer = rows(hub.home / "hub.sqlite", "SELECT * FROM transfers WHERE id = ?",
                    (transfer_id,))[0]
    assert transfer["receipt"] is not None
    # The bucket rows went with the commit (hub schema 13). A sealed bucket is at most the
    # original bytes the appliance cuts a bucket to (its bucket size, saved with the
    # transfer), compressed or as they are, plus its packing and seal: a few kB.
    assert not rows(hub.home / "hub.sqlite", "SELECT 1 FROM buckets WHERE transfer_id = ?",
                    (transfer_id,))
    target, first = json.loads(finished[0]["progress"])["bucket_sizes"]
    largest = max(target, first or 0) + 64 * 1024
    assert 0 < transfer["bytes_stored"] <= transfer["bucket_count"] * largest
    # Re-sent: at most the buckets that were on the wire when the link died.
    resent = transfer["bytes_received"] - transfer["bytes_stored"]
    assert 0 <= resent <= PARALLEL * largest, (resent, largest)
    archived = {r["sop_instance_uid"]: r["sha256"] for r in rows(
        hub.home / "archive" / "pas.sqlite", "SELECT sop_instance_uid, sha256 FROM instances")}
    for uid, sha in stored_hashes(pas).items():
        assert archived[uid] == sha, uid
    return largest


def test_cut_link_at_half_resumes_the_same_transfer(pas_factory: Any, hub: HubProcess,
                                                    tmp_path: Path) -> None:
    proxy = TcpProxy("127.0.0.1", hub.port).start()
    try:
        pas, _count = _resume_setup(pas_factory, hub, tmp_path / "site-cut", proxy)
        transfer_id = json.loads(jobs(pas)[0]["progress"])["transfer_id"]
        # The PUTs under way at the cut, from the appliance's own gauge. Read after the cut it
        # was often 0 on a loaded machine: the cut resets the connections, and the PUTs failed
        # (and left the gauge) before the test read it. So the link first dies towards the
        # hub only, the gauge is read once it can no longer change, and then the cut.
        in_flight = _in_flight_behind_a_dead_link(pas, hub, proxy, transfer_id)
        proxy.cut()
        assert in_flight > 0
        wait_for(lambda: pas.status()["links"]["hub"]["state"] == "down", 60,
                 what="the link to be seen down")
        assert jobs(pas)[0]["state"] != "done"
        assert pas.status()["confirmed_instances"] == 0  # nothing confirmed without receipt
        proxy.restore()
        biggest = _assert_resumed_once(pas, hub, transfer_id)
        assert pas.status()["links"]["hub"]["state"] == "up"
        # What crossed the link itself (TLS records, both attempts), not only the hub's count:
        # the buckets once, at most the in-flight ones again, plus the protocol's small change
        # (handshakes, headers, the manifest re-posted by each attempt, heartbeats).
        transfer = rows(hub.home / "hub.sqlite", "SELECT * FROM transfers WHERE id = ?",
                        (transfer_id,))[0]
        overhead = proxy.bytes_up - transfer["bytes_stored"]
        print(f"link bytes {proxy.bytes_up}, buckets {transfer['bytes_stored']}, overhead "
              f"{overhead} (biggest bucket {biggest})")
        assert 0 < overhead <= PARALLEL * biggest + 512 * 1024, (overhead, biggest)
        # Bucket bytes sent again, from the appliance's counter of what its PUT bodies handed to
        # the network (every attempt) against one copy of each bucket at the hub: the PUTs
        # under way at the cut, plus at most one that started on a connection opened before
        # the cut (its body went into the socket, the link never carried it): each of the
        # job's PARALLEL threads has one bucket at a time.
        resent = _metric(pas, "pas_upload_put_bytes") - transfer["bytes_stored"]
        print(f"in flight at the cut {in_flight:.0f}, re-sent {resent:.0f}")
        assert in_flight <= resent <= PARALLEL * biggest, (resent, in_flight, biggest)
    finally:
        proxy.stop()


def test_kill_9_mid_upload_resumes_the_same_transfer(pas_factory: Any, hub: HubProcess,
                                                     tmp_path: Path) -> None:
    pas, _count = _resume_setup(pas_factory, hub, tmp_path / "site-kill", None)
    pas.kill()
    transfer_id = json.loads(jobs(pas)[0]["progress"])["transfer_id"]
    held = rows(hub.home / "hub.sqlite", "SELECT count(*) AS n FROM buckets "
                "WHERE transfer_id = ?", (transfer_id,))[0]["n"]
    transfer = rows(hub.home / "hub.sqlite", "SELECT * FROM transfers WHERE id = ?",
                    (transfer_id,))[0]
    assert 0 < held < transfer["bucket_count"]
    pas.start()
    _assert_resumed_once(pas, hub, transfer_id)
    # The resumed attempt asked what the hub holds, found its manifest there (the same
    # SHA-256) and did not post it again: megabytes for a large study on a slow line.
    assert f"transfer {transfer_id}: the hub holds its manifest already: not sent again" \
        in pas.log()
    assert f"transfer {transfer_id}: its manifest posted again" not in hub.log()


def test_both_sets_through_dicomweb_hub_arrive_bit_exact_in_orthanc(
        pas_factory: Any, tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")
    regional = HubProcess(tmp_path / "hub-dicomweb", {
        "PAS_HUB_ARCHIVE__KIND": "dicomweb"})
    try:
        orthanc.start()
        regional.env["PAS_HUB_ARCHIVE__URL"] = orthanc.dicomweb
        regional.init().start()
        pas = enrolled_pas(pas_factory, regional, tmp_path / "site-web")
        storescu([CT_DIR, MR_DIR], pas.port)
        ct_sops, _ = distinct_uids(CT_DIR)
        mr_sops, _ = distinct_uids(MR_DIR)
        finished = wait_jobs_finished(pas, len(ct_sops | mr_sops), 300)
        assert {j["state"] for j in finished} == {"done"}, [j["last_error"] for j in finished]
        stored = stored_hashes(pas)
        assert set(stored) == ct_sops | mr_sops
        assert orthanc_hashes(orthanc) == stored  # downloaded back, each one hashed
        assert pas.status()["confirmed_instances"] == len(stored)
    finally:
        regional.kill()
        orthanc.stop()


def test_urgent_study_overtakes_a_long_routine_upload(pas_factory: Any, hub: HubProcess,
                                                      tmp_path: Path) -> None:
    """One ordinary worker, busy with a routine MR upload on a capped link; a CT routed
    ``urgent`` arrives: it is delivered (receipt in hand) while the MR is still uploading."""
    pas = enrolled_pas(pas_factory, hub, tmp_path / "site-urgent", {
        "PAS_QUEUE__WORKERS": "1", "PAS_HUB__MAX_MBPS": "2", "PAS_HUB__BUCKET_MB": "1",
        "PAS_STUDY__STABLE_AFTER_S": "1",
        "PAS_ROUTING__RULES": '[{name="ct-urgent", match={modality="CT"}, '
                              'destinations=["hub"], priority="urgent"}]'})
    mr_files = sorted(MR_DIR.glob("*.dcm"))[:260]
    storescu(mr_files, pas.port)
    wait_for(lambda: (j := jobs(pas)) and j[0]["state"] == "running" and j[0]["progress"]
             and json.loads(j[0]["progress"]).get("buckets_sent", 0) >= 1, 60,
             what="the routine MR upload under way")
    ct_study = sorted(CT_DIR.glob("A002304_*19001231*.dcm"))[:1]  # a one-image study
    storescu(ct_study, pas.port)
    urgent = wait_for(lambda: [j for j in jobs(pas) if j["priority"] == 0
                               and j["state"] == "done"], 60, what="the urgent CT delivered")
    routine = [j for j in jobs(pas) if j["priority"] == 2]
    assert routine and routine[0]["state"] == "running"  # still on the wire
    assert urgent[0]["kind"] == "hub"
    finished = wait_jobs_finished(pas, len(mr_files) + len(ct_study))
    assert {j["state"] for j in finished} == {"done"}
    routine_done = [j for j in finished if j["priority"] == 2][0]
    assert urgent[0]["finished_at"] < routine_done["finished_at"]
    assert pas.status()["confirmed_instances"] == len(mr_files) + len(ct_study)


def test_a_manifest_the_hub_refuses_fails_the_job_with_the_hubs_reason(
        pas_factory: Any, tmp_path: Path) -> None:
    """A new transfer's buckets go while its manifest is on the way; when the hub refuses the
    manifest (here: more buckets than its limit), the job fails for good naming that reason,
    not the 404 its early buckets got, and nothing is confirmed."""
    strict = HubProcess(tmp_path / "hub-strict", {"PAS_HUB_LIMITS__MAX_BUCKETS": "2",
                                                  "PAS_HUB_LIMITS__EARLY_BUCKET_WAIT_S": "0.5"})
    strict.init().start()
    try:
        # (A delta job, were storescu to stall, would fail the same way: nothing changes.)
        pas = enrolled_pas(pas_factory, strict, tmp_path / "site-strict",
                           {"PAS_HUB__BUCKET_MB": "0.5", **FEW_FILES_STABLE})
        files = sorted(MR_DIR.glob("*.dcm"))[:40]  # 3.4 MB: 7 buckets of 0.5 MiB
        storescu(files, pas.port)
        failed = wait_for(lambda: [j for j in jobs(pas) if j["state"] == "failed"], 60,
                          what=f"the hub job to fail (log {pas.log_path})")
        assert "bucket_count" in failed[0]["last_error"], failed[0]["last_error"]
        assert "over the limit 2" in failed[0]["last_error"]
        assert failed[0]["attempts"] == 1  # refused: not retried
        assert pas.status()["confirmed_instances"] == 0
        assert not hub_transfers(strict)
    finally:
        strict.kill()


def test_a_revoked_certificate_makes_the_uploads_wait_and_a_new_one_sends_them(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """The hub revoking the appliance's certificate (a replacement, ops' mistake) answers
    403 certificate_revoked to each upload: every queued study failed for good, to be
    retried by hand one by one. Now they wait, their attempts not counted, the error logged
    once; after ``pas enroll --replace`` and a restart they go, with no ``queue retry``."""
    home = tmp_path / "site-revoked"
    # The default-like wait between tries (a minute): the restart, not the wait's end, must
    # send them.
    pas = enrolled_pas(pas_factory, hub, home, {"PAS_QUEUE__BACKOFF_MAX_S": "300",
                                                **FEW_FILES_STABLE})
    hub.cli("revoke", "SITE-REVOKED")
    files = sorted(CT_DIR.glob("*.dcm"))[:3]
    sops, _studies = distinct_uids(CT_DIR)
    storescu(files, pas.port)
    # One reading of the jobs, awaited and asserted: on a loaded machine the three files
    # may straddle the 1 s stability, and a delta's job appear between two readings with
    # no try yet (a CI run).
    waiting = wait_for(lambda: (lambda found: found if found and all(
        j["last_error"] for j in found) else None)(jobs(pas)), 60,
        what=f"the upload's first try (log {pas.log_path})")
    assert all(j["state"] == "pending" and j["attempts"] == 0 for j in waiting), \
        [dict(j) for j in waiting]
    for job in waiting:
        assert job["last_error"].startswith("waiting for credentials: hub: the hub refuses "
                                            "this appliance's certificate "
                                            "(certificate_revoked)"), job["last_error"]
        assert "pas enroll --replace" in job["last_error"]
        assert job["next_attempt_at"] - job["updated_at"] >= 59  # a minute, not backoff_max
    # Logged after the jobs' rows are written, which the wait above saw: awaited.
    wait_for(lambda: "waits for its credentials to be put right" in pas.log(), 10,
             what="the worker's line")
    assert "ERROR" in pas.log()
    assert pas.status()["confirmed_instances"] == 0
    # pas doctor: the certificate row said "ok, valid for 825 more days" above the hub's
    # refusal, and the hub row was the hub's JSON cut at 200 characters.
    doctor = {c["name"]: c for c in json.loads(pas.cli("doctor", "--json", check=False).stdout)}
    assert (doctor["certificate"]["verdict"], doctor["hub"]["verdict"]) == ("fail", "fail")
    assert doctor["certificate"]["detail"].startswith(
        "valid by its dates, but the hub refuses it (certificate_revoked): the certificate of "
        "site 'SITE-REVOKED' (serial "), doctor["certificate"]
    assert doctor["hub"]["detail"].startswith(
        "the hub refuses this appliance's certificate (certificate_revoked): the certificate "
        "of site 'SITE-REVOKED'"), doctor["hub"]
    assert "pas enroll --replace" in doctor["certificate"]["fix"]

    pas.stop()
    pas.cli("enroll", "--hub", hub.url, "--token", hub.token("SITE-REVOKED"), "--replace")
    pas.start()
    done = wait_jobs_finished(pas, len(files))
    assert {j["state"] for j in done} == {"done"}, [j["last_error"] for j in done]
    assert "waiting for credentials due now (start-up)" in pas.log()
    stored = stored_hashes(pas)
    assert set(stored) <= sops and len(stored) == len(files)
    assert pas.status()["confirmed_instances"] == len(files)


def resign_client_certificate(home: Path, signer: HubPKI, not_before: datetime,
                              not_after: datetime) -> None:
    """The appliance's client certificate, the same key and name, signed by ``signer``."""
    ca_key = serialization.load_pem_private_key(signer.ca_key_path.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(signer.ca_cert_path.read_bytes())
    path = home / "pki" / "client.crt"
    current = x509.load_pem_x509_certificate(path.read_bytes())
    cert = (x509.CertificateBuilder().subject_name(current.subject)
            .issuer_name(ca_cert.subject).public_key(current.public_key())
            .serial_number(current.serial_number)
            .not_valid_before(not_before).not_valid_after(not_after)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_an_expired_certificate_is_named_not_taken_for_a_link_down(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """The hub refuses an expired client certificate at the TLS 1.3 handshake, and the
    appliance saw only a closed connection: its uploads waited "for the link" for ever,
    the status saying the WAN was down. Now the job names the expiry and what to do."""
    expired_on = datetime.now(UTC) - timedelta(days=2)
    pas = enrolled_pas(pas_factory, hub, tmp_path / "site-expired",
                       ONE_IMAGE_STABLE, before_start=lambda home: resign_client_certificate(
                           home, HubPKI(hub.home), expired_on - timedelta(days=365), expired_on))
    job = first_try(pas, "the upload")
    assert job["last_error"].startswith(
        f"waiting for credentials: hub: this appliance's certificate expired on "
        f"{expired_on:%Y-%m-%d %H:%M} UTC"), job["last_error"]
    assert "pas enroll --replace" in job["last_error"] and job["attempts"] == 0
    assert "TLS handshake refused (alert certificate_expired)" in hub.log()


@pytest.mark.parametrize(("ca_name", "meaning"), [
    ("Another fleet CA", "issued by a CA the peer does not trust (tlsv1_alert_unknown_ca)"),
    ("PAS fleet CA", "its signature does not verify against the peer's CA"),
])
def test_a_certificate_of_another_ca_is_named_not_taken_for_a_link_down(
        pas_factory: Any, hub: HubProcess, tmp_path: Path, ca_name: str, meaning: str) -> None:
    """A client certificate the hub's CA did not sign (restored from another appliance, a
    fleet CA re-created under the same name) and that is not expired: the hub refuses it at
    the TLS 1.3 handshake, and asyncio dropped the hub's alert with the connection, so the
    appliance saw "Server disconnected" and waited for the link for ever. The hub now sends
    its alert, and the job names the refusal and what to do."""
    other = HubPKI(tmp_path / "another-ca")
    other.init(name=ca_name)
    now = datetime.now(UTC)
    pas = enrolled_pas(pas_factory, hub, tmp_path / "site-other-ca", ONE_IMAGE_STABLE,
                       before_start=lambda home: resign_client_certificate(
                           home, other, now - timedelta(days=1), now + timedelta(days=300)))
    job = first_try(pas, "the upload")
    assert job["last_error"].startswith(
        "waiting for credentials: hub: the peer refused this appliance's certificate at the "
        f"TLS handshake: {meaning}"), job["last_error"]
    assert "pas enroll --replace" in job["last_error"] and job["attempts"] == 0
    assert "TLS handshake refused (alert " in hub.log()
    # pas doctor names the same refusal, and sends the operator to enrolment, not the WAN.
    doctor = pas.cli("doctor", "--json", check=False)
    [check] = [c for c in json.loads(doctor.stdout) if c["name"] == "hub"]
    assert doctor.returncode != 0 and check["verdict"] == "fail", check
    assert f"the peer refused this appliance's certificate at the TLS handshake: {meaning}" \
        in check["detail"], check
    assert "pas enroll --replace" in check["fix"], check


def test_a_hub_certificate_the_appliance_cannot_verify_is_named_not_retried_as_a_link(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """The pinned fleet CA no longer matching the hub's certificate (a CA rolled over, a
    hub reinstalled, an interception proxy): the uploads waited "for the link" for ever,
    retrying the handshake. Now the job names the verification failure and waits for a fix."""
    other = HubPKI(tmp_path / "another-fleet")
    other.init()

    def distrust(home: Path) -> None:
        (home / "pki" / "ca.crt").write_bytes(other.ca_cert_path.read_bytes())

    pas = enrolled_pas(pas_factory, hub, tmp_path / "site-distrust", ONE_IMAGE_STABLE,
                       before_start=distrust)
    job = first_try(pas, "the upload")
    assert job["last_error"].startswith(
        "waiting for credentials: hub: this appliance does not trust the peer's "
        "certificate: "), job["last_error"]
    assert job["attempts"] == 0 and job["state"] in ("pending", "running")
    assert "attempt 1 failed" not in pas.log()  # a refused certificate is not retried at once


def test_a_stowrs_archive_whose_certificate_fails_verification_waits_for_a_fix(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """The same for a ``stowrs`` destination over HTTPS (the hub's TLS port serves as the
    archive here; the handshake fails before any HTTP): ``ca_file`` names another CA."""
    other = HubPKI(tmp_path / "another-ca")
    other.init()
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                       "PAS_DESTINATIONS__ARCHIVE__KIND": "stowrs",
                       "PAS_DESTINATIONS__ARCHIVE__URL": f"{hub.url}/dicom-web",
                       "PAS_DESTINATIONS__ARCHIVE__CA_FILE": str(other.ca_cert_path),
                       "PAS_ROUTING__FALLBACK__DESTINATIONS": '["archive"]',
                       "PAS_STUDY__STABLE_AFTER_S": "1"})
    job = first_try(pas, "the STOW-RS job")
    assert job["last_error"].startswith(
        "waiting for credentials: archive: this appliance does not trust the peer's "
        "certificate: "), job["last_error"]
    assert "check destinations.archive's ca_file" in job["last_error"]
    assert job["attempts"] == 0
    assert pas.status()["links"]["archive"]["state"] == "down"


def test_rule_naming_the_hub_on_a_non_enrolled_appliance_says_how_to_enrol(
        pas_factory: Any) -> None:
    """The job waits for the enrolment (no attempt counted, never failed: it failed for good
    at once before) and says how to enrol (tests/test_routing_enrol_later.py sends it once
    enrolled)."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                       "PAS_ROUTING__FALLBACK__DESTINATIONS": '["hub"]'})
    storescu(sorted(CT_DIR.glob("A002304_*19001231*.dcm"))[:1], pas.port)
    waiting = wait_for(lambda: [j for j in jobs(pas) if j["last_error"]], 30,
                       what="the hub job tried")
    assert "not enrolled" in waiting[0]["last_error"] and "pas enroll" in waiting[0]["last_error"]
    assert (waiting[0]["state"], waiting[0]["attempts"]) == ("pending", 0)
    assert pas.status()["confirmed_instances"] == 0
    storescu(sorted(CT_DIR.glob("A002304_*19001231*.dcm"))[1:2], pas.port)  # still serving
    assert len(rows(pas.home / "pas.sqlite", "SELECT id FROM instances")) == 2


def test_damaged_enrolment_stops_start_up_naming_the_file(pas_factory: Any, hub: HubProcess,
                                                          tmp_path: Path) -> None:
    """Running without the hub would route stable studies nowhere: refuse to start instead."""
    home = tmp_path / "site-damaged"
    enroll(hub, home, "SITE-DAMAGED")
    (home / "pki" / "hub.json").write_text("{not json")
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true"}, home=home, start=False)
    result = pas.cli("run", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "cannot start" in output and "hub.json" in output and "Traceback" not in output


def test_verify_repair_restores_confirmed_instances_from_the_region(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """A damaged and a missing file of a study the region confirmed come back byte for byte
    from the region (through the hub's proxy of its archive) with `pas verify --repair`."""
    pas = enrolled_pas(pas_factory, hub, tmp_path / "site-repair", FEW_FILES_STABLE)
    files = sorted(CT_DIR.glob("A046441_*_19001111-*.dcm"))  # one study, 3 instances
    storescu(files, pas.port)
    wait_jobs_finished(pas, len(files))
    db = pas.home / "pas.sqlite"
    held = rows(db, "SELECT path, sha256, confirmed_at FROM instances ORDER BY id")
    assert len(held) == 3 and all(r["confirmed_at"] for r in held)
    pas.stop()
    spool = pas.home / "spool"
    damaged, missing = spool / held[0]["path"], spool / held[1]["path"]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    missing.unlink()

    found = pas.cli("verify", "--json", check=False)
    assert found.returncode == 1
    assert json.loads(found.stdout)["hash_mismatch"] == 1
    repaired = pas.cli("verify", "--repair", "--json", check=False)
    report = json.loads(repaired.stdout)
    assert report["restored_from_region"] == 2, repaired.stdout + repaired.stderr
    assert (report["missing"], report["hash_mismatch"]) == (0, 0)
    for row in held:
        content = (pas.home / "spool" / row["path"]).read_bytes()
        assert hashlib.sha256(content).hexdigest() == row["sha256"]
    assert pas.cli("verify", check=False).returncode == 0

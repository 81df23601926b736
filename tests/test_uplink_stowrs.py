"""Destination kind ``stowrs`` end to end: storescu -> PAS -> STOW-RS -> a real Orthanc.

Every instance must arrive with the SHA-256 of the file PAS stored (downloaded back from
Orthanc's /instances/{id}/file), be marked sent per instance, and the link state must show
the archive as up. A wrong URL (the archive answers 404) fails the job for good with a message
naming the HTTP status, and the daemon keeps serving.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.support.archived import orthanc_hashes
from tests.support.peers import CT_DIR, MR_DIR, Orthanc, PasProcess, storescu, wait_for


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("orthanc-stow"))
    try:
        yield peer.start()
    finally:
        peer.stop()


def _rows(home: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(home / "pas.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _jobs(home: Path) -> list[sqlite3.Row]:
    return _rows(home, "SELECT * FROM jobs")


def _settled(home: Path, instances: int) -> bool:
    """All instances received and routed, and no job left to run. (A study may get a second,
    delta job when it looked stable half-way through the send on a loaded machine.)"""
    row = _rows(home, "SELECT count(*) AS n, count(routed_at) AS routed FROM instances")[0]
    busy = _rows(home, "SELECT count(*) AS n FROM jobs WHERE state IN ('pending', 'running')")
    return bool(row["n"] == instances == row["routed"] and busy[0]["n"] == 0)


def _uids(folder: Path) -> tuple[set[str], set[str]]:
    """The distinct SOP Instance UIDs and Study UIDs of a folder (the CT set holds two
    byte-identical re-sent copies: 62 files, 60 instances, 20 studies)."""
    sops, studies = set(), set()
    for path in folder.glob("*.dcm"):
        ds = dcmread(path, stop_before_pixels=True)
        sops.add(str(ds.SOPInstanceUID))
        studies.add(str(ds.StudyInstanceUID))
    return sops, studies


def _stow_env(url: str, per_request: int = 8) -> dict[str, str]:
    return {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_DESTINATIONS__ARCHIVE__KIND": "stowrs",
        "PAS_DESTINATIONS__ARCHIVE__URL": url,
        # Orthanc's HTTP in its namespace (198.18.x.x), as an archive on the hospital's network.
        "PAS_DESTINATIONS__ARCHIVE__ALLOW_CLEARTEXT": "true",
        "PAS_DESTINATIONS__ARCHIVE__INSTANCES_PER_REQUEST": str(per_request),
        "PAS_ROUTING__FALLBACK__DESTINATIONS": '["archive"]',
        "PAS_QUEUE__BACKOFF_INITIAL_S": "0.5",
    }


def test_ct_set_arrives_bit_exact_in_orthanc(pas_factory, orthanc: Orthanc) -> None:
    pas: PasProcess = pas_factory(_stow_env(orthanc.dicomweb))
    storescu(CT_DIR, pas.port)
    sop_uids, _study_uids = _uids(CT_DIR)
    wait_for(lambda: _settled(pas.home, len(sop_uids)), 120, what="every instance routed "
             "and every job finished")
    jobs = _jobs(pas.home)
    assert {j["state"] for j in jobs} == {"done"}, [j["last_error"] for j in jobs]
    stored = {r["sop_instance_uid"]: r["sha256"]
              for r in _rows(pas.home, "SELECT sop_instance_uid, sha256 FROM instances")}
    assert set(stored) == sop_uids
    unsent = _rows(pas.home, "SELECT count(*) AS n FROM job_instances WHERE sent_at IS NULL")
    assert unsent[0]["n"] == 0

    arrived = orthanc_hashes(orthanc)  # downloaded back, each one hashed
    assert {uid: arrived.get(uid) for uid in stored} == stored

    status = pas.status()
    assert status["links"]["archive"]["state"] == "up"
    assert status["links"]["archive"]["last_ok_at"] is not None
    assert not [b for b in status["backlog"] if b["destination"] == "archive"]


def test_wrong_url_fails_the_job_with_the_http_status(pas_factory, orthanc: Orthanc) -> None:
    pas: PasProcess = pas_factory(_stow_env(f"{orthanc.url}/no-such-root"))
    files = sorted(CT_DIR.glob("*.dcm"))[:3]
    storescu(files, pas.port)
    # The three files may be of two studies (two jobs): every job must fail, each for the 404.
    jobs = wait_for(lambda: (lambda js: js if js and all(j["state"] == "failed" for j in js)
                             else None)(_jobs(pas.home)), 60, what="every stowrs job to fail")
    for job in jobs:
        assert "HTTP 404" in job["last_error"], job["last_error"]
        assert job["attempts"] == 1  # a 4xx is not retried
    sent = _rows(pas.home, "SELECT count(*) AS n FROM job_instances WHERE sent_at IS NOT NULL")
    assert sent[0]["n"] == 0
    # The daemon keeps serving: another study is still received and indexed.
    storescu(sorted(CT_DIR.glob("*.dcm"))[3:4], pas.port)
    assert len(_rows(pas.home, "SELECT id FROM instances")) == 4


def test_credentials_the_archive_refuses_make_the_jobs_wait_until_put_right(
        pas_factory, tmp_path: Path) -> None:
    """A password changed on the archive's side: each STOW-RS got 401 and every queued study
    failed for good (to be retried by hand, one by one). Now the jobs wait, their attempts
    not counted, the error logged once; with the password put right and PAS restarted, they
    go, bit-exact, with no ``pas queue retry``."""
    users = {"pas": "the-right-one"}
    orthanc = Orthanc(tmp_path / "orthanc-auth", extra_config={
        "AuthenticationEnabled": True, "RegisteredUsers": users}).start()
    try:
        env = {**_stow_env(orthanc.dicomweb), "PAS_DESTINATIONS__ARCHIVE__USERNAME": "pas",
               "PAS_DESTINATIONS__ARCHIVE__PASSWORD": "an-old-one",
               "PAS_QUEUE__BACKOFF_MAX_S": "0.5"}
        home = tmp_path / "pas-auth"
        pas: PasProcess = pas_factory(env, home=home)
        files = sorted(CT_DIR.glob("*.dcm"))[:3]
        storescu(files, pas.port)
        wait_for(lambda: pas.log().count("waits for its credentials to be put right") >= 3,
                 60, what=f"three tries (log {pas.log_path})")
        # Between two tries (one may be under way when the log is read): none failed.
        waiting = wait_for(lambda: (lambda js: js if js and all(
            j["state"] == "pending" and j["attempts"] == 0 for j in js) else None)(
                _jobs(home)), 30, what="every job waiting, no attempt counted")
        for job in waiting:
            assert job["last_error"].startswith(
                "waiting for credentials: archive: STOW-RS answered HTTP 401, the archive "
                "refuses this appliance's credentials"), job["last_error"]
        # Such jobs never fail, so the failed-jobs signals miss them: status, metric and
        # the line of pas status say it instead.
        (refused,) = pas.status()["credentials_refused"]
        assert (refused["destination"], refused["waiting"], refused["what"]) == (
            "archive", len(waiting), "job"), refused
        assert refused["error"].startswith("archive: STOW-RS answered HTTP 401"), refused
        assert f"archive: {len(waiting)} job" in pas.cli("status").stdout
        scraped = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
        assert (f'pas_jobs_waiting_for_credentials{{destination="archive"}} '
                f"{float(len(waiting))}") in scraped
        errors = [line for line in pas.log().splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "waits for its credentials" in errors[0], errors
        assert not orthanc.instances()

        pas.stop()
        fixed = pas_factory({**env, "PAS_DESTINATIONS__ARCHIVE__PASSWORD": users["pas"]},
                            home=home)
        wait_for(lambda: _settled(home, len(files)), 60, what="the jobs to go")
        assert {j["state"] for j in _jobs(home)} == {"done"}
        stored = {r["sop_instance_uid"]: r["sha256"]
                  for r in _rows(home, "SELECT sop_instance_uid, sha256 FROM instances")}
        assert orthanc_hashes(orthanc) == stored
        assert fixed.status()["links"]["archive"]["state"] == "up"
        assert fixed.status()["credentials_refused"] == []
    finally:
        orthanc.stop()


def test_kill_9_mid_stow_resumes_per_instance(pas_factory, orthanc: Orthanc) -> None:
    """A 200-instance MR study, 4 per request: kill -9 once some requests were accepted; the
    restarted daemon sends only the instances not yet marked sent, and Orthanc ends with all
    of them, bit-exact."""
    files = sorted(MR_DIR.glob("*.dcm"))[:200]
    env = {**_stow_env(orthanc.dicomweb, per_request=4), "PAS_STORAGE__FSYNC": "false",
           "PAS_QUEUE__LEASE_S": "3", "PAS_STUDY__STABLE_AFTER_S": "2",
           "PAS_PREFETCH__ON_ARRIVAL": "false"}
    pas: PasProcess = pas_factory(env)
    storescu(files, pas.port)

    def sent() -> int:
        return int(_rows(pas.home, "SELECT count(*) AS n FROM job_instances "
                                   "WHERE sent_at IS NOT NULL")[0]["n"])

    wait_for(lambda: sent() >= 8, 60, interval=0.02, what="a few STOW-RS requests accepted")
    pas.kill()
    before = {r["instance_fk"]: r["sent_at"] for r in _rows(
        pas.home, "SELECT instance_fk, sent_at FROM job_instances WHERE sent_at IS NOT NULL")}
    assert 0 < len(before) < len(files)
    pas.start()
    wait_for(lambda: _settled(pas.home, len(files)), 120, what="the job finished")
    job = _jobs(pas.home)[0]
    assert job["state"] == "done", job["last_error"]
    assert sent() == len(files)
    after = {r["instance_fk"]: r["sent_at"] for r in _rows(
        pas.home, "SELECT instance_fk, sent_at FROM job_instances")}
    # What was accepted before the kill was not sent again (its stamp is the old one).
    assert {fk: after[fk] for fk in before} == before
    stored = {r["sop_instance_uid"]: r["sha256"]
              for r in _rows(pas.home, "SELECT sop_instance_uid, sha256 FROM instances")}
    arrived = orthanc_hashes(orthanc)
    assert {uid: arrived.get(uid) for uid in stored} == stored


def test_a_client_key_others_can_read_is_refused_and_the_jobs_wait(pas_factory,
                                                                    tmp_path: Path) -> None:
    """``client_key`` of a stowrs destination was used whatever its mode (``dicom.tls.key``,
    a dicom destination's ``tls_key`` and ``audit.syslog_key`` are refused unless 0600): the
    jobs waited for the archive as for a link down, the key's mode never said. Now they
    wait for the credentials, the key and its fix named, none fails for it."""
    from tests.support.peers import free_port
    from tests.test_serving_dicomweb import _issue, _write

    crt, key = _write(tmp_path, "pas-client", *_issue("pas", None, None))
    Path(key).chmod(0o644)
    pas: PasProcess = pas_factory({
        **_stow_env(f"https://127.0.0.1:{free_port()}/dicom-web"),  # nothing listens there
        "PAS_DESTINATIONS__ARCHIVE__CLIENT_CERT": crt,
        "PAS_DESTINATIONS__ARCHIVE__CLIENT_KEY": key})
    storescu(sorted(CT_DIR.glob("*.dcm"))[:1], pas.port)
    jobs = wait_for(lambda: [j for j in _jobs(pas.home) if j["last_error"]] or None, 60,
                    what="the stowrs job's first try")
    error = jobs[0]["last_error"]
    assert error.startswith("waiting for credentials: "), error
    assert f"destinations.archive.client_key {key}" in error and f"chmod 600 {key}" in error
    assert jobs[0]["state"] == "pending" and jobs[0]["attempts"] == 0, dict(jobs[0])
    assert "PRIVATE KEY" not in error

"""A corrected version of an instance (same SOP Instance UID, other bytes) and the jobs that
carry its versions to a local node: the node must end up with the sender's last word."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from tests.support.objects import tiny_ct
from tests.support.peers import StoreSCP, storescu, wait_for
from tests.test_ingest import sop_uid
from tests.test_routing import jobs_of, write_config


def test_a_superseded_version_is_not_sent_after_its_correction(pas_factory,
                                                                 tmp_path: Path) -> None:
    """Version X of an instance is routed to the PACS, whose first try fails (the node
    rejects the association: counted, retried after a backoff). Meanwhile the modality sends
    a corrected version Y, routed as a delta and delivered at once. X's job, retried after
    its backoff, used to send X then: the PACS held the stale version, the correction
    overwritten. Now routing Y to the PACS takes X out of the older job, unsent."""
    refusing = StoreSCP(tmp_path / "refusing").start(["--refuse"])
    config = write_config(tmp_path / "appliance.toml", refusing)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                       "PAS_QUEUE__BACKOFF_INITIAL_S": "8", "PAS_QUEUE__BACKOFF_MAX_S": "16"})
    first = tiny_ct(ImageComments="version X")
    corrected = tiny_ct(first.StudyInstanceUID, first.SeriesInstanceUID,
                        SOPInstanceUID=first.SOPInstanceUID, ImageComments="version Y")
    corrected.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    first.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    corrected.save_as(tmp_path / "y.dcm", enforce_file_format=True)
    try:
        storescu(tmp_path / "x.dcm", pas.port, calling="CT_URG")
        wait_for(lambda: [(j["state"], j["attempts"]) for j in jobs_of(pas.home)]
                 == [("pending", 1)], 60, what="X's job failed once, waiting for its retry")
    finally:
        refusing.stop()
    pacs = StoreSCP(tmp_path / "pacs")
    pacs.port = refusing.port  # the node, back, on the same port
    pacs.start()
    try:
        storescu(tmp_path / "y.dcm", pas.port, calling="CT_URG")
        wait_for(lambda: len(jobs_of(pas.home)) == 2 and jobs_of(pas.home)[1]["state"] == "done",
                 60, what="Y's job delivered")
        # X's job comes due after its backoff (8-16 s) and has nothing left to send.
        wait_for(lambda: jobs_of(pas.home)[0]["state"] == "done", 60, what="X's job over")
        received = [dcmread(p).ImageComments for p in pacs.files()]
        assert received == ["version Y"], received
        with sqlite3.connect(pas.home / "pas.sqlite") as conn:
            carried = conn.execute("SELECT job_id, count(*) FROM job_instances "
                                   "GROUP BY job_id ORDER BY job_id").fetchall()
        assert carried == [(2, 1)], carried  # X's job carries nothing now
    finally:
        pacs.stop()


def test_a_correction_routed_while_the_first_job_is_sending_arrives_last(
        pas_factory, tmp_path: Path) -> None:
    """A slow PACS (a second per C-STORE) is receiving a study of six instances, the last of
    which is X, when the modality sends X's correction Y. Y's delta job used to be claimed by
    the second worker at once and delivered while the first job was still on its way to X:
    the first job then sent X, and the PACS held the stale version. Now a job to a local
    node does not start while another job of the same study to that node is being sent."""
    scp = StoreSCP(tmp_path / "slow").start(["--fork", "--sleep-after", "1"])
    config = write_config(tmp_path / "appliance.toml", scp)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    last, _corrected = _study_and_its_correction(tmp_path, other_study=False)
    try:
        storescu(tmp_path / "study", pas.port, calling="CT_URG")
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["running"], 60,
                 what="the study's job being sent")
        storescu(tmp_path / "y.dcm", pas.port, calling="CT_URG")
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["done", "done"], 90,
                 what="both jobs done")
        arrivals = sorted(scp.files(), key=lambda p: p.stat().st_mtime_ns)
        by_uid = [(str(dcmread(p).SOPInstanceUID), dcmread(p).ImageComments) for p in arrivals]
        last_word = [c for uid, c in by_uid if uid == last.SOPInstanceUID][-1]
        assert last_word == "version Y", by_uid
    finally:
        scp.stop()


def test_a_correction_under_another_study_routed_while_the_first_job_sends_arrives_last(
        pas_factory, tmp_path: Path) -> None:
    """As above, but the correction puts the study UID right: Y, same SOP Instance UID as
    X, comes under another Study Instance UID, so its delta is a job of another study. It
    was claimed by the second worker at once (only a job of the same study held it back)
    and delivered while the first job was still on its way to X, which it then sent: the
    PACS received Y, then X, and held the stale version. Now a job to a local node also
    waits while a job of another study to that node, holding another version of one of its
    instances, is being sent; `pas queue list` says which."""
    scp = StoreSCP(tmp_path / "slow").start(["--fork", "--sleep-after", "1"])
    config = write_config(tmp_path / "appliance.toml", scp)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    last, corrected = _study_and_its_correction(tmp_path, other_study=True)
    try:
        storescu(tmp_path / "study", pas.port, calling="CT_URG")
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["running"], 60,
                 what="the study's job being sent")
        storescu(tmp_path / "y.dcm", pas.port, calling="CT_URG")
        wait_for(lambda: len(jobs_of(pas.home)) == 2, 60, what="Y's job routed")
        listing = json.loads(pas.cli("queue", "list", "--json").stdout)
        states = {j["id"]: (j["state"], j["waits_for_job"]) for j in listing}
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["done", "done"], 90,
                 what="both jobs done")
        arrivals = sorted(scp.files(), key=lambda p: p.stat().st_mtime_ns)
        versions = [(dcmread(p).ImageComments, str(dcmread(p).StudyInstanceUID))
                    for p in arrivals if sop_uid(p) == last.SOPInstanceUID]
        assert versions[-1] == ("version Y", corrected.StudyInstanceUID), versions
        if states[1][0] == "running":  # Y's job waits for it, and says so
            assert states[2] == ("pending", 1), states
    finally:
        scp.stop()


def test_the_stale_version_leaves_the_older_jobs_of_its_node_only(tmp_path: Path) -> None:
    """Which jobs lose the older version: the unsent ones to the same local node, also when
    the correction came under another study (a study UID put right); not a job to another
    node that routing did not send the correction to, not a hub transfer, not a version
    already sent."""
    from appliance.store import index
    from appliance.store import jobs as job_store
    from appliance.store.db import Database
    from appliance.store.index import InstanceRecord, StoredFile

    db = Database(tmp_path / "pas.sqlite")
    ct = "1.2.840.10008.5.1.4.1.1.2"
    first = index.record_instance(db, InstanceRecord("1.2.9.1", ct, "1.2.840.10008.1.2.1",
                                                     "1.2.9", "1.2.9.2", patient_id="P"),
                                  StoredFile("x", 1, "1" * 64))
    sent = index.record_instance(db, InstanceRecord("1.2.9.3", ct, "1.2.840.10008.1.2.1",
                                                    "1.2.9", "1.2.9.2", patient_id="P"),
                                 StoredFile("s", 1, "3" * 64))
    ids = [first.instance_id, sent.instance_id]
    job_store.route_study(db, 1, ids, [job_store.NewJob("dicom", "pacs", 2, "r", ids),
                                       job_store.NewJob("dicom", "other", 2, "r", ids),
                                       job_store.NewJob("hub", "hub", 2, "r", ids)])
    job_store.mark_sent(db, 1, [sent.instance_id])
    moved = InstanceRecord("1.2.9.1", ct, "1.2.840.10008.1.2.1", "1.2.10", "1.2.10.2",
                           patient_id="P")
    corrected = index.record_instance(db, moved, StoredFile("y", 1, "2" * 64))
    resent = index.record_instance(db, InstanceRecord("1.2.9.3", ct, "1.2.840.10008.1.2.1",
                                                      "1.2.10", "1.2.10.2", patient_id="P"),
                                   StoredFile("t", 1, "4" * 64))
    assert corrected.conflict and resent.conflict
    new = [corrected.instance_id, resent.instance_id]
    job_store.route_study(db, 2, new, [job_store.NewJob("dicom", "pacs", 2, "r", new),
                                       job_store.NewJob("hub", "hub", 2, "r", new)])
    carried = {j: sorted(r["id"] for r in job_store.job_files(db, j, unsent_only=False))
               for j in (1, 2, 3, 4, 5)}
    assert carried == {1: [sent.instance_id],  # the sent one stays, the stale one left
                       2: ids, 3: ids,         # another node, the hub: as routed
                       4: sorted(new), 5: sorted(new)}


def test_a_failed_job_whose_rest_was_superseded_is_over(tmp_path: Path) -> None:
    """A job failed with one instance left, whose correction is routed to the same node in a
    new job: nothing is left for the failed one, which stayed failed (pas status, the
    failed-jobs alert) though the node gets the correction."""
    from appliance.store import index
    from appliance.store import jobs as job_store
    from appliance.store.db import Database
    from appliance.store.index import InstanceRecord, StoredFile

    db = Database(tmp_path / "pas.sqlite")
    record = InstanceRecord("1.2.11.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                            "1.2.11", "1.2.11.2", patient_id="P")
    first = index.record_instance(db, record, StoredFile("x", 1, "1" * 64)).instance_id
    job_store.route_study(db, 1, [first], [job_store.NewJob("dicom", "pacs", 2, "r", [first])])
    job = job_store.claim_next(db, "worker", lease_s=60)
    assert job is not None
    job_store.fail_attempt(db, job.id, "worker", "pacs: no C-STORE response", retry_at=None)
    corrected = index.record_instance(db, record, StoredFile("y", 1, "2" * 64)).instance_id
    job_store.route_study(db, 1, [corrected],
                          [job_store.NewJob("dicom", "pacs", 2, "r", [corrected])])
    states = {j["id"]: (j["state"], j["last_error"]) for j in job_store.list_jobs(db)}
    assert states == {
        1: ("done", "what was left to send was superseded by newer versions (job 2)"),
        2: ("pending", None)}


def _hub_versions_db(tmp_path: Path):
    """An index with instance X in study S1 (version 1) and its hub job; returns the
    database, a function filing a version of X (or of another instance) and routing it to
    the hub as a new job, and S1's job id."""
    from appliance.store import index
    from appliance.store import jobs as job_store
    from appliance.store.db import Database
    from appliance.store.index import InstanceRecord, StoredFile

    db = Database(tmp_path / "pas.sqlite")

    def routed(sop: str, study: str, sha: str) -> tuple[int, int]:
        """(instance id, job id) of ``sop`` filed under ``study`` with bytes ``sha``."""
        record = InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                study, f"{study}.2", patient_id="P")
        outcome = index.record_instance(db, record, StoredFile(sha[:8], 1, sha * 64))
        study_fk = db.query_one("SELECT study_fk FROM instances WHERE id = ?",
                                (outcome.instance_id,))[0]
        job_store.route_study(db, study_fk, [outcome.instance_id],
                              [job_store.NewJob("hub", "hub", 2, "r", [outcome.instance_id])])
        return outcome.instance_id, int(db.query_one("SELECT max(id) FROM jobs")[0])

    return db, routed


def test_a_hub_job_waits_for_an_earlier_one_of_another_study_with_another_version(
        tmp_path: Path) -> None:
    """X (version 1) of study S1 goes to the hub in job J1, which starts, then waits for the
    link. The modality sends X again, other bytes, under a corrected Study Instance UID: S2,
    job J2. J2 was claimed beside J1 (only an earlier hub job of its own study held a hub job
    back), committed first, and J1 then archived the stale version 1 after it: the region's
    current X. Now J2 waits while J1 is running or pending, and pas queue list says so; an
    unrelated hub job of another study does not wait."""
    from appliance.store import jobs as job_store

    db, routed = _hub_versions_db(tmp_path)
    _, first = routed("1.2.20.1", "1.2.20", "1")
    j1 = job_store.claim_next(db, "w1", lease_s=600)
    assert j1 is not None and j1.id == first
    moved, second = routed("1.2.20.1", "1.2.21", "2")  # X corrected, now study S2's
    assert job_store.claim_next(db, "w2", lease_s=600) is None  # not beside J1
    waits = {r["id"]: r["waits_for_job"] for r in job_store.list_jobs(db)}
    assert waits == {first: None, second: first}
    job_store.wait_for_link(db, first, "w1", "hub: connection refused", retry_at=4e9)
    _, unrelated = routed("1.2.22.1", "1.2.22", "3")  # another study, no other version
    claimed = job_store.claim_next(db, "w2", lease_s=600)
    assert claimed is not None and claimed.id == unrelated, claimed  # J2 still waits
    assert job_store.claim_next(db, "w3", lease_s=600) is None
    waits = {r["id"]: r["waits_for_job"] for r in job_store.list_jobs(db)}
    assert waits == {first: None, second: first, unrelated: None}
    assert job_store.wake_waiting_for_link(db, "hub") == 1
    claimed = job_store.claim_next(db, "w1", lease_s=600)
    assert claimed is not None and claimed.id == first
    job_store.mark_sent(db, first, [r["id"] for r in job_store.job_files(db, first)])
    job_store.finish(db, first, "w1")
    claimed = job_store.claim_next(db, "w2", lease_s=600)
    assert claimed is not None and claimed.id == second  # the correction commits last
    assert [r["id"] for r in job_store.job_files(db, second)] == [moved]


def test_a_hub_job_waits_across_studies_whichever_version_is_current(
        tmp_path: Path) -> None:
    """A correction taken back (X version 1 in S1, version 2 in S2, version 1 again: current
    again, routed again in S1): the job of version 2, no longer current, still waits for
    the first job, and the last job, version 1 again, for both. A version the earlier job
    has already delivered (its receipt named it) holds nothing back."""
    from appliance.store import jobs as job_store

    db, routed = _hub_versions_db(tmp_path)
    first_version, first = routed("1.2.30.1", "1.2.30", "1")
    _, second = routed("1.2.30.1", "1.2.31", "2")
    again, third = routed("1.2.30.1", "1.2.30", "1")
    assert again == first_version
    waits = {r["id"]: r["waits_for_job"] for r in job_store.list_jobs(db)}
    assert waits == {first: None, second: first, third: first}
    job = job_store.claim_next(db, "w1", lease_s=600)
    assert job is not None and job.id == first
    assert job_store.claim_next(db, "w2", lease_s=600) is None
    job_store.mark_sent(db, first, [first_version])  # the receipt came; not finished yet
    waits = {r["id"]: r["waits_for_job"] for r in job_store.list_jobs(db)}
    assert waits == {first: None, second: None, third: first}  # J3: its study's order
    claimed = job_store.claim_next(db, "w2", lease_s=600)
    assert claimed is not None and claimed.id == second
    job_store.finish(db, first, "w1")
    assert job_store.claim_next(db, "w3", lease_s=600) is None  # J3 waits for J2 now
    assert {r["id"]: r["waits_for_job"] for r in job_store.list_jobs(db)}[third] == second


def _study_and_its_correction(tmp_path: Path, *,
                              other_study: bool) -> tuple[Dataset, Dataset]:
    """Six tiny CT instances of one study, "version X", in ``tmp_path/study``, and a
    correction of the last, "version Y" (its SOP Instance UID), in ``tmp_path/y.dcm``: in
    the same study, or under another Study Instance UID. Returns the last of X, and Y."""
    study = [tiny_ct(InstanceNumber=n, ImageComments="version X") for n in range(1, 7)]
    for ds in study[1:]:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study[0].StudyInstanceUID, \
            study[0].SeriesInstanceUID
    last = study[-1]
    where = (generate_uid(), generate_uid()) if other_study \
        else (last.StudyInstanceUID, last.SeriesInstanceUID)
    corrected = tiny_ct(*where, InstanceNumber=6, SOPInstanceUID=last.SOPInstanceUID,
                        ImageComments="version Y")
    corrected.file_meta.MediaStorageSOPInstanceUID = last.SOPInstanceUID
    (tmp_path / "study").mkdir()
    for n, ds in enumerate(study):
        ds.save_as(tmp_path / "study" / f"{n}.dcm", enforce_file_format=True)
    corrected.save_as(tmp_path / "y.dcm", enforce_file_format=True)
    return last, corrected

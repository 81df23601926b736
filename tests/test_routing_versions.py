"""A corrected version of an instance (same SOP Instance UID, other bytes) and the jobs that
carry its versions to a local node: the node must end up with the sender's last word."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pydicom import dcmread

from tests.support.objects import tiny_ct
from tests.support.peers import StoreSCP, storescu, wait_for
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
    study = [tiny_ct(InstanceNumber=n, ImageComments="version X") for n in range(1, 7)]
    for ds in study[1:]:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study[0].StudyInstanceUID, \
            study[0].SeriesInstanceUID
    last = study[-1]
    corrected = tiny_ct(last.StudyInstanceUID, last.SeriesInstanceUID, InstanceNumber=6,
                        SOPInstanceUID=last.SOPInstanceUID, ImageComments="version Y")
    corrected.file_meta.MediaStorageSOPInstanceUID = last.SOPInstanceUID
    (tmp_path / "study").mkdir()
    for n, ds in enumerate(study):
        ds.save_as(tmp_path / "study" / f"{n}.dcm", enforce_file_format=True)
    corrected.save_as(tmp_path / "y.dcm", enforce_file_format=True)
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

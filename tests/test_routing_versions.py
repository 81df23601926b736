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

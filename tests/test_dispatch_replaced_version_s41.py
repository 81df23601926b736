"""A local node's job never sends a version the sender replaced, whatever route the
correction took.

Routing a correction (the same SOP Instance UID, other bytes) takes the stale version out of
the earlier jobs to the destinations the correction goes to. When the correction goes
elsewhere (here: it comes from a QA workstation's AE, which no rule sends to the PACS), the
first job kept the stale version and sent it at its next attempt: the PACS ended with
version 1, the one the sender had replaced (review s41, F3). Each attempt now leaves out the
job's unsent versions that are no longer current; the PACS has no version of that instance
(the correction is not routed there: the rules decide where the current version goes) and
the study's other instances as before.

Real peers: the daemon, DCMTK's storescu as the CT and the QA workstation, DCMTK's storescp
as the PACS (down while the correction arrives, then started on the port the job aims at).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tests.support.dispatch_steps import ct1_queued_then_corrected
from tests.support.peers import read_rows, wait_for
from tests.test_ingest import dataset_part, sop_uid
from tests.test_routing import CT_PATIENT


def test_a_version_replaced_by_a_correction_routed_elsewhere_is_not_sent(
        pas_factory: Any, tmp_path: Path) -> None:
    # The study's job waiting for the PACS (down), then the correction of one instance,
    # from the QA workstation: no rule sends its AE's to the PACS (and the appliance is not
    # enrolled: it stays here).
    corrected = ct1_queued_then_corrected(pas_factory, tmp_path, CT_PATIENT)
    scp, pas, replaced_uid, jobs = corrected.scp, corrected.pas, corrected.uid, corrected.jobs
    database = corrected.database
    versions = wait_for(lambda: (rows := read_rows(
        database, "SELECT is_current, routed_at, sha256 FROM instances "
                  "WHERE sop_instance_uid = ? ORDER BY version", (replaced_uid,)))
        and len(rows) == 2 and rows[1]["routed_at"] is not None and rows, 60,
        what="the correction received and routed")
    assert [v["is_current"] for v in versions] == [0, 1]
    assert len(jobs()) == 1, jobs()  # the correction's routing named no destination

    scp.start()  # the PACS back, on the port the job aims at
    try:
        wait_for(lambda: jobs()[0]["state"] == "done", 60, what="the job delivered")
        received = {sop_uid(p): hashlib.sha256(dataset_part(p)).hexdigest()
                    for p in scp.files()}
    finally:
        scp.stop()
    # What PAS stored of the other instances, from the dataset on (storescp writes its own
    # file meta).
    others = {r["sop_instance_uid"]: hashlib.sha256(
                  dataset_part(pas.home / "spool" / r["path"])).hexdigest()
              for r in read_rows(database, "SELECT sop_instance_uid, path FROM instances "
                                           "WHERE sop_instance_uid != ?", (replaced_uid,))}
    assert len(others) == len(CT_PATIENT) - 1
    assert received == others  # no version of the corrected instance, the others intact
    job = jobs()[0]
    assert "1 version the sender replaced after this job was routed left out" in \
        job["last_error"] and replaced_uid in job["last_error"], job["last_error"]
    sent = read_rows(database, "SELECT i.sop_instance_uid FROM job_instances ji "
                               "JOIN instances i ON i.id = ji.instance_fk WHERE ji.job_id = ? "
                               "AND ji.sent_at IS NOT NULL", (job["id"],))
    assert {r["sop_instance_uid"] for r in sent} == set(others)

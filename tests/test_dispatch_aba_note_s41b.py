"""A, then its correction B, then A again: the done job's note does not say A was left out.

The first job's attempt left A out (replaced by B, which no rule sends to the PACS); the CT
then sent A again, current again and routed anew: its own job delivered it. The first job's
note still said "1 version the sender replaced ... left out, not sent: <A>", when the PACS
held A as the current version (review s41, F-E). At the end of the job, the versions
current again are no longer named.

Real peers: the daemon, DCMTK's storescu as the CT and the QA workstation, DCMTK's storescp
as the PACS (down until A is routed anew).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from appliance.store.jobs import LEFT_OUT
from tests.support.dispatch_steps import ct1_queued_then_corrected
from tests.support.peers import read_rows, storescu, wait_for
from tests.test_ingest import dataset_part, sop_uid
from tests.test_routing import CT_PATIENT


def test_a_version_current_again_is_not_named_as_left_out(pas_factory: Any,
                                                         tmp_path: Path) -> None:
    corrected = ct1_queued_then_corrected(pas_factory, tmp_path, CT_PATIENT)
    scp, pas, uid, jobs = corrected.scp, corrected.pas, corrected.uid, corrected.jobs
    database = corrected.database
    wait_for(lambda: LEFT_OUT in (jobs()[0]["progress"] or ""), 60,
             what="an attempt leaving A out")
    storescu(CT_PATIENT[0], pas.port, calling="CT1")  # A again: current again
    wait_for(lambda: len(jobs()) == 2, 60, what="A routed anew")

    scp.start()
    try:
        wait_for(lambda: all(j["state"] == "done" for j in jobs()), 60, what="jobs done")
        received = {sop_uid(p): hashlib.sha256(dataset_part(p)).hexdigest()
                    for p in scp.files()}
    finally:
        scp.stop()
    # A as PAS stored it (storescp writes its own file meta), not the correction.
    [a] = read_rows(database, "SELECT path FROM instances WHERE sop_instance_uid = ? "
                              "AND version = 1 AND is_current = 1", (uid,))
    assert received[uid] == hashlib.sha256(
        dataset_part(pas.home / "spool" / a["path"])).hexdigest()
    assert len(received) == len(CT_PATIENT)
    first, again = jobs()
    assert first["last_error"] is None, first  # nothing it left out is still replaced
    assert again["last_error"] is None, again

"""A correction filed while a dicom job's attempt is running: the replaced version is not sent.

The attempt's start leaves out the versions the sender replaced by then (68395e7); one
replaced while the attempt ran (a slow PACS, a long study) was still sent, and the PACS kept
the version the sender had replaced (review s41, F-D). The target now checks, just before
each instance, that it is still current; one that is not is left out and counted in the
done job's ``last_error``.

Real peers: the daemon, DCMTK's storescu as the CT and as the QA workstation (whose AE no
rule sends to the PACS), DCMTK's storescp as a slow PACS (``--sleep-after 2``: each C-STORE
answered two seconds after it is stored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread

from tests.support.configs import ct1_to
from tests.support.peers import StoreSCP, read_rows, storescu, wait_for
from tests.test_ingest import sop_uid
from tests.test_routing import CT_PATIENT


def test_a_version_replaced_during_the_attempt_is_not_sent(pas_factory: Any,
                                                          tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "pacs", ae_title="PACS")
    config = ct1_to(tmp_path / "appliance.toml", scp)
    scp.start(extra=["--sleep-after", "2"])
    try:
        pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
                           "PAS_STUDY__STABLE_AFTER_S": "0.5"})
        database = pas.home / "pas.sqlite"

        def jobs() -> list[dict[str, Any]]:
            return [dict(r) for r in read_rows(database, "SELECT * FROM jobs ORDER BY id")]

        storescu(CT_PATIENT, pas.port, calling="CT1")
        wait_for(lambda: jobs() and jobs()[0]["state"] == "running", 60, what="job running")
        order = [r["sop_instance_uid"] for r in read_rows(
            database, "SELECT i.sop_instance_uid FROM job_instances ji JOIN instances i "
                      "ON i.id = ji.instance_fk WHERE ji.job_id = 1 "
                      "ORDER BY i.series_fk, i.instance_number, i.id")]
        assert len(order) == 3
        # The attempt is under way: the PACS holds the first instance (and answers it two
        # seconds later; the last one goes at least two seconds after that).
        wait_for(lambda: len(scp.files()) >= 1, 60, what="the first instance at the PACS")
        last = next(p for p in CT_PATIENT if sop_uid(p) == order[-1])
        corrected = dcmread(last)
        corrected.ImageComments = "corrected at the QA workstation"
        correction = tmp_path / "correction.dcm"
        corrected.save_as(correction)
        storescu(correction, pas.port, calling="QA_WS")
        versions = read_rows(database, "SELECT is_current FROM instances "
                                       "WHERE sop_instance_uid = ? ORDER BY version",
                             (order[-1],))
        assert [v["is_current"] for v in versions] == [0, 1]
        assert jobs()[0]["state"] == "running"  # filed during the attempt

        wait_for(lambda: jobs()[0]["state"] == "done", 60, what="job done")
        job = jobs()[0]
        assert job["attempts"] == 1, job
        received = {sop_uid(p) for p in scp.files()}
        assert received == set(order[:2]), (received, order)  # not the replaced version
        assert job["last_error"].startswith("1 version the sender replaced after this job "
                                            "was routed left out, not sent"), job
        assert order[-1] in job["last_error"]
        assert len(jobs()) == 1  # the correction's routing named no destination
    finally:
        scp.stop()

"""A job is refused for lost files only when its own unsent instances lost them.

Before a job is sent, the dispatcher fails it at once if instances the region has not
confirmed lost their file (flagged ``missing``): no try can send them. It looked at the
whole study, not the job: a delta job carrying a late instance whose file is fine failed
for good because an instance the study's first job had already delivered lost its file.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.configs import everything_to, quick_retries
from tests.support.peers import StoreSCP, read_rows, storescu, wait_for
from tests.test_ingest import sop_uid
from tests.test_routing import CT_PATIENT, jobs_of


def test_a_delta_is_sent_when_an_instance_already_delivered_lost_its_file(
        pas_factory, tmp_path: Path) -> None:
    """Before the fix: the delta job failed at its first try, "1 instance of study ... lost
    their file on this appliance", and its late instance never reached the node."""
    scp = StoreSCP(tmp_path / "pacs", ae_title="PACS").start()
    try:
        config = everything_to(tmp_path / "appliance.toml", scp, timeout_s=10,
                               before=quick_retries(3))
        pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
        storescu(CT_PATIENT, pas.port)
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["done"], 60,
                 what="the study's first job done")
        # An instance the node already holds loses its file here; the start-up check flags it.
        lost = read_rows(pas.home / "pas.sqlite",
                         "SELECT path, sop_instance_uid FROM instances ORDER BY id")[0]
        pas.stop()
        (pas.home / "spool" / lost["path"]).unlink()
        pas.start()
        late = dcmread(CT_PATIENT[0])
        late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        late.InstanceNumber = 999
        late.save_as(tmp_path / "late.dcm")
        storescu(tmp_path / "late.dcm", pas.port)
        wait_for(lambda: len(jobs_of(pas.home)) == 2
                 and jobs_of(pas.home)[1]["state"] in ("done", "failed"), 60,
                 what="the delta job over")
        delta = jobs_of(pas.home)[1]
        assert (delta["state"], delta["last_error"]) == ("done", None), delta
        assert str(late.SOPInstanceUID) in {sop_uid(p) for p in scp.files()}
    finally:
        scp.stop()

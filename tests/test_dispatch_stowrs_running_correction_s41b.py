"""A correction filed while a stowrs job's attempt is running: the replaced version is not
POSTed.

As for a dicom node (``tests/test_dispatch_running_correction_s41b.py``): the attempt's
start left out the versions replaced by then, and a version replaced while the attempt ran
went in a later request (review s41, F-D). The target now checks each batch just before
its request; an instance no longer current is left out and counted in the done job's
``last_error``.

The archive is a small real HTTP server on loopback that holds its answer to each POST
until the test lets it go (the correction is filed while the first request is out), then
lists the instances as stored. PAS is the real daemon, fed by DCMTK's storescu as the CT and
as the QA workstation (whose AE no rule sends to the archive).
"""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Any

from tests.support.dispatch_steps import file_correction, jobs_of, start_pas
from tests.support.peers import read_rows, storescu, wait_for
from tests.support.stowrs_archive import StowArchive
from tests.test_ingest import sop_uid
from tests.test_routing import CT_PATIENT


class HeldArchive(StowArchive):
    """Stores what each POST carries (``stored``: the SOP Instance UIDs, in order) and
    answers once ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__()

    def answer(self, uids: list[str]) -> tuple[bytes, str]:
        listed = super().answer(uids)  # stored now, answered once released
        self.release.wait(60)
        return listed

    def stop(self) -> None:
        self.release.set()
        super().stop()


def test_a_version_replaced_during_the_attempt_is_not_posted(pas_factory: Any,
                                                            tmp_path: Path) -> None:
    archive = HeldArchive()
    try:
        config = tmp_path / "appliance.toml"
        config.write_text(textwrap.dedent(f"""
            [queue]
            poll_interval_s = 0.1

            [[routing.rules]]
            name = "CT to the archive"
            match = {{ calling_ae = "^CT1$" }}
            destinations = ["archive"]

            [destinations.archive]
            kind = "stowrs"
            url = "{archive.url}"
            instances_per_request = 1
            """))
        pas = start_pas(pas_factory, config)
        database = pas.home / "pas.sqlite"

        storescu(CT_PATIENT, pas.port, calling="CT1")
        wait_for(lambda: len(archive.stored) == 1, 60, what="the first request out")
        order = [r["sop_instance_uid"] for r in read_rows(
            database, "SELECT i.sop_instance_uid FROM job_instances ji JOIN instances i "
                      "ON i.id = ji.instance_fk WHERE ji.job_id = 1 "
                      "ORDER BY i.series_fk, i.instance_number, i.id")]
        assert len(order) == 3 and archive.stored == order[:1]
        file_correction(pas, next(p for p in CT_PATIENT if sop_uid(p) == order[-1]), tmp_path)
        versions = read_rows(database, "SELECT is_current FROM instances "
                                       "WHERE sop_instance_uid = ? ORDER BY version",
                             (order[-1],))
        assert [v["is_current"] for v in versions] == [0, 1]
        assert jobs_of(pas)[0]["state"] == "running"  # filed while the first request is out

        archive.release.set()
        wait_for(lambda: jobs_of(pas)[0]["state"] == "done", 60, what="job done")
        job = jobs_of(pas)[0]
        assert job["attempts"] == 1, job
        assert archive.stored == order[:2]  # not the replaced version
        assert job["last_error"].startswith("1 version the sender replaced after this job "
                                            "was routed left out, not sent"), job
        assert order[-1] in job["last_error"]
        assert len(jobs_of(pas)) == 1
    finally:
        archive.stop()

"""Fetch-through reads the region's list of a study a page at a time (invariant 8).

Found in review (2026-12-04): to tell whether the region holds more of a study than the cache,
fetch-through asked the region for the study's whole instance list in one QIDO-RS answer and
held it (its bytes and every object parsed from it): 157 MB of JSON for a study of 200,000
instances. The list is now asked with limit and offset, a page at a time, each checked
against the index as it comes.

The region here is a second `pas run` (its DICOMweb root as ``prefetch.dicomweb_url``) holding
the same study: its QIDO-RS honours limit and offset as the hub's embedded archive does.
"""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

from tests.support.peers import PasProcess, read_rows, wait_for
from tests.test_serving_memory import (
    NO_SCRUB,
    _study_get_growth,
    _study_of_many_instances,
)

INSTANCES = 50_000


def test_fetch_through_lists_a_study_of_50000_instances_a_page_at_a_time(
        tmp_path: Path) -> None:
    home = tmp_path / "pas"
    home.mkdir()
    study, real = _study_of_many_instances(home, INSTANCES)
    # The region holds the same 50,001: the spool, and the index by SQLite's backup (its
    # WAL may still hold the rows just written).
    shutil.copytree(home, tmp_path / "region", ignore=shutil.ignore_patterns("pas.sqlite*"))
    with closing(sqlite3.connect(home / "pas.sqlite")) as source, \
            closing(sqlite3.connect(tmp_path / "region" / "pas.sqlite")) as copy:
        source.backup(copy)
    # Neither daemon scrubs (NO_SCRUB says why): the region's pages took 0.37 s each beside it.
    region = PasProcess(tmp_path / "region", {"PAS_DICOM__ACCEPT_UNKNOWN": "true", **NO_SCRUB})
    root = f"http://127.0.0.1:{region.http_port}/dicom-web"
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true", **NO_SCRUB,
                            "PAS_PREFETCH__DICOMWEB_URL": root,
                            # The whole list is awaited: the check is what is measured.
                            "PAS_SERVING__REGION_QUERY_TIMEOUT_S": "30"})
    try:  # both stopped whatever happens (a failed start left the region running)
        region.start()
        pas.start()
        growth, final = _study_get_growth(pas, study, real)
        print(f"C-GET of {INSTANCES + 1} instances, fetch-through listing the region's "
              f"{INSTANCES + 1}: peak RSS +{growth:.1f} MB")
        assert final.Status == 0xFE00 and final.NumberOfCompletedSuboperations >= 1
        # The region was asked, a page at a time, and nothing was missing here.
        log = pas.log()
        assert "region unavailable" not in log and "fetched" not in log
        assert growth < 30, growth  # the whole list in one answer: +354 MB
        # The region writes each page's row once that answer is over, which on a loaded
        # machine can be after PAS has read it and moved on (3 rows late in a CI run).
        pages = ["1000 results (QIDO-RS)"] * 50 + ["1 result (QIDO-RS)"]

        def details() -> list[str]:
            return [q["detail"] for q in read_rows(
                tmp_path / "region" / "pas.sqlite",
                "SELECT detail FROM audit WHERE event = 'query' ORDER BY id")]
        wait_for(lambda: len(details()) >= len(pages), 30, what="the region's page rows")
        assert details() == pages
        # That the pages are the list one answer gives (the same instances) is
        # tests/test_serving_fetch.py's, against Orthanc through the hub: not asked again
        # here, for the suite's time (two more listings of 50,001).
    finally:
        pas.stop()
        region.stop()

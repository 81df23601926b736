"""A study a whole regional STUDY answer did not list is browsed from the index alone
(``RegionFind.saw_absent``, appliance/serving/fetch.py and qr.py).

A study received here and not sent yet is not at the region. A viewer lists it first (a
STUDY C-FIND on its exact Study Instance UID): the region's answer, whole and on exact keys,
does not name it, which proves the study is held whole here; its SERIES and IMAGE browses
then skip the region, WAN up or down. A STUDY search with a wildcard proves nothing of the
studies it did not list (the region may cut or match otherwise): those still ask. Session
42 built this and left it untested on its own.

Real peers: Orthanc as the region (plain DICOMweb) in its network namespace, whose link the
test takes down; DCMTK findscu as the viewer and storescu as the modality; the audit
trail's query rows say whether the region was asked ("region not asked: no answer within").
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.findscu import find
from tests.support.objects import tiny_ct
from tests.support.peers import Orthanc, PasProcess, audit_rows, storescu

pytestmark = pytest.mark.root


def test_a_study_the_regions_exact_answer_did_not_list_is_browsed_locally(
        tmp_path: Path, orthanc_factory: Any) -> None:
    region: Orthanc = orthanc_factory()
    listed, wildcard = tiny_ct(PatientID="PIDAB1"), tiny_ct(PatientID="PIDAB2")
    paths = []
    for name, ds in (("listed", listed), ("wildcard", wildcard)):
        paths.append(tmp_path / f"{name}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    pas = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
        "PAS_PREFETCH__DICOMWEB_URL": region.dicomweb, "PAS_PREFETCH__ALLOW_CLEARTEXT": "true",
        "PAS_SERVING__QUERY_REGION": "true", "PAS_SERVING__REGION_QUERY_TIMEOUT_S": "5"}).start()
    ns = region.ns
    try:
        storescu(paths, pas.port)  # here only: not sent to the region (no route)
        # The viewer lists each study first: one on its exact UID, one by a wildcard.
        for keys, study in (([f"StudyInstanceUID={listed.StudyInstanceUID}"], listed),
                            (["PatientID=PIDAB2*", "StudyInstanceUID"], wildcard)):
            answers, final = find(pas.port, "-S", "STUDY", [*keys, "InstanceAvailability"],
                                  tmp_path / f"study-{study.PatientID}")
            assert final == 0x0000
            assert [(str(a.StudyInstanceUID), a.InstanceAvailability) for _, a in answers] == [
                (str(study.StudyInstanceUID), "ONLINE")]
            assert "region not asked" not in (audit_rows(pas.home, "query")[-1]["detail"] or "")

        subprocess.run(["ip", "-n", ns.name, "link", "set", ns.inner_if, "down"], check=True)

        def browse(ds: Any, name: str) -> str:
            answers, final = find(pas.port, "-S", "SERIES", [
                f"StudyInstanceUID={ds.StudyInstanceUID}", "SeriesInstanceUID",
                "InstanceAvailability"], tmp_path / name)
            assert final == 0x0000
            assert [(str(a.SeriesInstanceUID), a.InstanceAvailability) for _, a in answers] == [
                (str(ds.SeriesInstanceUID), "ONLINE")]
            return audit_rows(pas.home, "query")[-1]["detail"] or ""

        # Proven whole by the exact answer: the region is not asked, nothing waited.
        assert "region not asked" not in browse(listed, "series-listed")
        # Not proven by a wildcard search: asked, the 5 s deadline waited out, said.
        assert "region not asked: no answer within 5.0 s" in browse(wildcard, "series-wild")
    finally:
        subprocess.run(["ip", "-n", ns.name, "link", "set", ns.inner_if, "up"], check=False)
        pas.stop()

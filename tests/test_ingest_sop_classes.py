"""Storage SOP classes a modality may send: the retired image classes that ultrasound carts
and gamma cameras still in service use (docs/ingest.md, "Association").

Found in review (2026-12-04): pynetdicom does not know the retired classes, so PAS rejected
their presentation contexts (abstract syntax not supported) and DCMTK's storescu sending a
retired Ultrasound Image Storage object failed with "No presentation context" while DCMTK's
storescp and Orthanc take it: such a modality could not send to PAS at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.support.objects import tiny_ct
from tests.support.peers import PasProcess, storescu
from tests.test_ingest import assert_spool_consistent, dataset_part, index_rows

RETIRED = {
    "1.2.840.10008.5.1.4.1.1.6": "US",     # Ultrasound Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.3": "US",     # Ultrasound Multi-frame Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.5": "NM",     # Nuclear Medicine Image Storage (retired)
}


@pytest.fixture
def pas(tmp_path: Path) -> PasProcess:
    daemon = PasProcess(tmp_path / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
    }).start()
    yield daemon
    daemon.stop()


def test_retired_image_storage_classes_are_accepted_and_stored_as_sent(
        pas: PasProcess, tmp_path: Path) -> None:
    sent = {}
    folder = tmp_path / "modality"
    folder.mkdir()
    for number, (sop_class, modality) in enumerate(RETIRED.items()):
        path = folder / f"retired{number}.dcm"
        ds = tiny_ct(SOPClassUID=sop_class, Modality=modality)
        ds.save_as(path, enforce_file_format=True)
        sent[str(ds.SOPInstanceUID)] = (sop_class, dataset_part(path))

    # -R: propose the files' own SOP classes, as a modality does (storescu's default list
    # has no retired class in it).
    result = storescu(folder, pas.port, extra=["-R"], check=False)

    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["sop_instance_uid"]: row for row in index_rows(pas.home)}
    assert set(rows) == set(sent)
    for uid, (sop_class, dataset) in sent.items():
        assert rows[uid]["sop_class_uid"] == sop_class
        stored = (pas.home / "spool" / rows[uid]["path"]).read_bytes()
        assert stored.endswith(dataset)  # the dataset byte for byte, behind PAS's meta
        assert hashlib.sha256(stored).hexdigest() == rows[uid]["sha256"]
    assert_spool_consistent(pas.home)

"""Rows, Columns and BitsAllocated (schema 18) of an instance whose modality wrote them out
of a US value's range, on a real ``pas run`` asked by real findscu and QIDO-RS.

A modality (or an anonymiser) now and then writes Rows with another VR than US: SS -1 here.
Ingest kept -1 in the index; a C-FIND at IMAGE level asking for Rows then failed (0xC312,
"unable to encode": pydicom cannot write -1 as a US) at that instance, the matches after it
never sent and most viewers dropping the ones before; before schema 18 the same query was a
Success with Rows empty. QIDO-RS gave it as ``{"vr": "US", "Value": [-1]}``. A value out of
the range of its VR is no value for the index, as an IS past 32 bits is not
(appliance/ingest/attributes.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from tests.support.peers import PasProcess, storescu
from tests.test_serving_qr import dcmtk

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]


def _instance(folder: Path, name: str, study: str, rows: RawDataElement | None) -> str:
    """CT_small in ``study`` (a new SOP Instance UID), its Rows replaced by ``rows``."""
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if rows is not None:
        ds[0x00280010] = rows
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    (folder / name).write_bytes(buffer.getvalue())
    return str(ds.SOPInstanceUID)


def test_a_rows_value_out_of_the_us_range_is_answered_empty_not_a_failed_c_find(
        tmp_path: Path) -> None:
    study = generate_uid()
    files = tmp_path / "files"
    files.mkdir()
    negative = RawDataElement(Tag(0x00280010), "SS", 2, (-1).to_bytes(2, "little", signed=True),
                              0, False, True)
    odd = _instance(files, "a-odd.dcm", study, negative)
    plain = _instance(files, "b-plain.dcm", study, None)
    pas = PasProcess(tmp_path / "pas", {"PAS_PREFETCH__ENABLED": "false",
                                             "PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        storescu(files, pas.port)
        out = tmp_path / "find"
        keys = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", "SOPInstanceUID=",
                "Rows=", "Columns="]
        result = dcmtk("findscu", "127.0.0.1", pas.port, "PAS", keys, "-S", "-X", out=out)
        assert "Received Final Find Response (Success)" in result.stderr, result.stderr[-2000:]
        answers = {str(ds.SOPInstanceUID): (ds.Rows, ds.Columns)
                   for ds in map(dcmread, sorted(out.glob("rsp*.dcm")))}
        assert answers == {odd: (None, 128), plain: (128, 128)}  # Rows asked, empty

        searched = httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{study}"
                             "/instances", timeout=10)
        assert searched.status_code == 200, searched.text[:300]
        given = {item["00080018"]["Value"][0]: item.get("00280010")
                 for item in searched.json()}
        assert given == {odd: None, plain: {"vr": "US", "Value": [128]}}
    finally:
        pas.stop()

"""A Study, Series or SOP Instance UID that is not made of digits and dots is refused at
ingest (invariant 7): a failure status whose Error Comment names the attribute, nothing
stored, the association goes on; a UID with leading zeros in a component is still stored.

Found in review (s38): such an object was answered Success and filed, then could not be
named by any query (appliance/store/query.py matches UIDs as digits and dots): its SERIES
C-FIND failed 0xA900 and its C-GET was refused. Ingest and queries now share one pattern
(query.UID_PATTERN).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from appliance.ingest.attributes import InvalidInstance, instance_record, record_from_raw
from appliance.ingest.header import read_header
from appliance.store import query
from appliance.store.db import Database
from tests.support.objects import tiny_ct
from tests.support.peers import half_written, read_rows, storescu

# Each bad object has one attribute wrong (the others valid), so the refusal must name it.
BAD_UIDS = {
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.ABC",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.12x",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.7-1",
}
# Not PS3.5 9.1 (a component with a leading zero) but in real hospital data: stored.
LEADING_ZEROS = "1.2.826.0.1.3680043.8.498.0012.05"

# pydicom warns when these objects are written and read; that is their point.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def _write(tmp_path: Path, name: str, **uids: str) -> Path:
    ds = tiny_ct(PatientID="BADUID1", **uids)
    if "SOPInstanceUID" in uids:
        ds.file_meta.MediaStorageSOPInstanceUID = uids["SOPInstanceUID"]
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_ingest_and_queries_share_one_uid_pattern(tmp_path: Path) -> None:
    """What ingest refuses is exactly what a query cannot name (leading zeros pass both)."""
    db = Database(tmp_path / "index.sqlite")
    assert query.is_uid(LEADING_ZEROS)
    assert list(query.find(db, "SERIES", {"StudyInstanceUID": LEADING_ZEROS})) == []
    for bad in BAD_UIDS.values():
        assert not query.is_uid(bad)
        with pytest.raises(query.QueryError):
            list(query.find(db, "SERIES", {"StudyInstanceUID": bad}))


@pytest.mark.parametrize("keyword", sorted(BAD_UIDS))
def test_both_ingest_paths_refuse_a_uid_with_letters(tmp_path: Path, keyword: str) -> None:
    """The raw-header path (record_from_raw) and pydicom's (instance_record) both refuse,
    naming the attribute in a message that fits a 64-character Error Comment."""
    path = _write(tmp_path, keyword, **{keyword: BAD_UIDS[keyword]})
    content = path.read_bytes()
    ds = dcmread(path)
    with pytest.raises(InvalidInstance, match=f"^{keyword} is not a UID") as pydicom_path:
        instance_record(ds, str(ds.file_meta.TransferSyntaxUID))
    header = read_header(_dataset_bytes(content), implicit_vr=False, little_endian=True)
    assert header is not None
    with pytest.raises(InvalidInstance, match=f"^{keyword} is not a UID") as raw_path:
        record_from_raw(header.dataset, str(ds.file_meta.TransferSyntaxUID))
    assert str(pydicom_path.value) == str(raw_path.value)
    assert len(str(raw_path.value)) <= 64


def _store_responses(output: str) -> list[tuple[int, str | None]]:
    """(status, Error Comment) of each C-STORE-RSP in storescu's ``-d`` output, in order."""
    answers = []
    for response in output.split("I: Received Store Response")[1:]:
        status = re.search(r"DIMSE Status\s*: 0x([0-9a-fA-F]{4})", response)
        comment = re.search(r"\(0000,0902\) LO \[(.*?)\]", response.split("Sending file")[0])
        assert status, response[:2000]
        answers.append((int(status.group(1), 16), comment.group(1) if comment else None))
    return answers


def _dataset_bytes(content: bytes) -> bytes:
    """The dataset after a Part 10 file's preamble and file meta (explicit VR LE)."""
    group_length = int.from_bytes(content[140:144], "little")
    return content[144 + group_length:]


@pytest.mark.parametrize("direct_receive", ["true", "false"])
def test_a_c_store_with_a_non_uid_is_refused_and_nothing_stored(
        pas_factory, tmp_path: Path, direct_receive: str) -> None:
    """storescu sends three bad objects then two good ones on one association, on either
    receive path (dicom.direct_receive): each bad one gets 0xC210 with an Error Comment
    naming its attribute and leaves nothing in the index or the spool; the good ones after
    it, one of them with leading zeros in its UIDs, are stored. Before: all five Success."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_HTTP__ENABLED": "false",
                       "PAS_DICOM__DIRECT_RECEIVE": direct_receive})
    bad = [_write(tmp_path, keyword, **{keyword: uid}) for keyword, uid in BAD_UIDS.items()]
    zeros = _write(tmp_path, "zeros", StudyInstanceUID=LEADING_ZEROS,
                   SeriesInstanceUID=LEADING_ZEROS + ".1", SOPInstanceUID=LEADING_ZEROS + ".1.1")
    good = _write(tmp_path, "good", StudyInstanceUID=generate_uid())
    result = storescu([*bad, zeros, good], pas.port, check=False, extra=["-d", "-nh"])
    output = result.stdout + result.stderr
    assert output.count("Association Accepted") == 1, output[-3000:]  # one association
    answers = _store_responses(output)
    assert answers == [(0xC210, f"{keyword} is not a UID (digits and dots only)")
                       for keyword in BAD_UIDS] + [(0, None), (0, None)], output[-3000:]
    rows = read_rows(pas.home / "pas.sqlite",
                     "SELECT s.study_uid, se.series_uid, i.sop_instance_uid FROM instances i "
                     "JOIN series se ON se.id = i.series_fk JOIN studies s ON s.id = i.study_fk")
    stored = {uid for row in rows for uid in row}
    assert LEADING_ZEROS in stored and len(rows) == 2
    assert not stored & set(BAD_UIDS.values())
    assert len(list((pas.home / "spool").rglob("*.dcm"))) == 2
    assert not half_written(pas.home / "spool")
    for keyword in BAD_UIDS:
        assert f"refused: {keyword} is not a UID" in pas.log()

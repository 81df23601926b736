"""C-FIND keys PAS cannot match: answered with Pending 0xFF01, not 0xFF00.

Found in review (2026-12-05): a key the index does not hold (InstitutionName, PatientAge,
a sequence with a value in its item...), or one of a level below the query's, given a value
was ignored: every study was answered, each with Pending 0xFF00, which PS3.4 C.4.1.1.4
(Table C.4-1) defines as "any Optional Keys were supported in the same manner as Required
Keys". A viewer filtering on ``InstitutionName=ZZZ`` got every study of the cache, told that
its filter applied (Orthanc, same data: none). The status for "one or more Optional Keys
were not supported for existence and/or matching" is 0xFF01: each answer now carries it
(the matches are still sent, the keys returned empty), and the audit row names the keys.
Asked empty or ``*`` (universal matching: return keys) they change nothing: 0xFF00.

pynetdicom as the viewer (it gives each response's status), on the direct answer path and on
pynetdicom's own (``dicom.event_driven = false``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.support.objects import tiny_ct
from tests.support.peers import PasProcess, read_rows, storescu

STUDIES = {"P1": {"InstitutionName": "HOSP NORD", "StudyDescription": "Chest CT",
                  "StudyTime": "012345.000"},
           "P2": {"InstitutionName": "HOSP SUD", "StudyDescription": "Head CT",
                  "StudyTime": "1500"}}


@pytest.fixture(scope="module", params=["direct", "pynetdicom"])
def pas(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasProcess]:
    home = tmp_path_factory.mktemp("unmatched") / "pas"
    home.mkdir()
    paths = []
    for patient_id, attributes in STUDIES.items():
        paths.append(home / f"{patient_id}.dcm")
        tiny_ct(PatientID=patient_id, PatientName=f"DOE^{patient_id}",
                **attributes).save_as(paths[-1], enforce_file_format=True)
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false"}
    if request.param == "pynetdicom":
        env["PAS_DICOM__EVENT_DRIVEN"] = "false"
    pas = PasProcess(home, env).start()
    try:
        storescu(paths, pas.port)
        yield pas
    finally:
        pas.stop()


def find(pas: PasProcess, level: str, keys: dict[str, object],
         model: str = StudyRootQueryRetrieveInformationModelFind
         ) -> tuple[list[tuple[int, Dataset]], int]:
    """([(Pending status, identifier)...], final status) of one C-FIND by pynetdicom."""
    pending, final = find_final(pas, level, keys, model)
    return pending, int(final.Status)


def find_final(pas: PasProcess, level: str, keys: dict[str, object],
               model: str = StudyRootQueryRetrieveInformationModelFind,
               extra: Callable[[Dataset], object] | None = None
               ) -> tuple[list[tuple[int, Dataset]], Dataset]:
    """([(Pending status, identifier)...], the final status dataset) of one C-FIND;
    ``extra`` adds to the query what a keyword cannot name (a private element)."""
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS")
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = level
        query.PatientID = ""
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        if extra is not None:
            extra(query)
        responses = list(assoc.send_c_find(query, model))
    finally:
        assoc.release()
    pending = [(int(status.Status), identifier) for status, identifier in responses[:-1]]
    return pending, responses[-1][0]


def last_query_detail(pas: PasProcess) -> str:
    rows = read_rows(pas.home / "pas.sqlite", "SELECT outcome, detail FROM audit WHERE "
                                              "event = 'query' ORDER BY id DESC LIMIT 1")
    assert rows[0]["outcome"] == "success", rows[0]["outcome"]
    return str(rows[0]["detail"])


@pytest.mark.parametrize(("level", "keys", "unmatched"), [
    ("STUDY", {"InstitutionName": "ZZZ"}, "InstitutionName"),
    ("STUDY", {"InstitutionName": "HOSP*", "PatientAge": "050Y"},
     "InstitutionName, PatientAge"),
    ("STUDY", {"Modality": "MR"}, "Modality"),  # a SERIES key in a STUDY query
    ("PATIENT", {"StudyDescription": "Chest*"}, "StudyDescription"),
])
def test_a_key_pas_cannot_match_is_answered_pending_ff01(
        pas: PasProcess, level: str, keys: dict[str, object], unmatched: str) -> None:
    model = (PatientRootQueryRetrieveInformationModelFind if level == "PATIENT"
             else StudyRootQueryRetrieveInformationModelFind)
    pending, final = find(pas, level, keys, model)
    assert final == 0x0000
    # Every study still answered (the key was not applied), each saying so.
    assert sorted(str(ds.PatientID) for _, ds in pending) == ["P1", "P2"]
    assert [status for status, _ in pending] == [0xFF01, 0xFF01]
    # The keys asked are returned, empty: not dropped.
    for _, ds in pending:
        for keyword in keys:
            assert keyword in ds and ds[keyword].value in (None, ""), ds
    detail = last_query_detail(pas)
    assert detail == f"keys not matched (answered 0xFF01): {unmatched}; 2 results", detail


@pytest.mark.parametrize("keys", [
    {"InstitutionName": ""},
    {"InstitutionName": "*", "PatientAge": ""},
    {"StudyDescription": "Chest*"},
    {"StudyDescription": "", "ModalitiesInStudy": "CT"},
])
def test_keys_pas_matches_or_only_returns_are_answered_pending_ff00(
        pas: PasProcess, keys: dict[str, object]) -> None:
    pending, final = find(pas, "STUDY", keys)
    assert final == 0x0000
    assert pending and {status for status, _ in pending} == {0xFF00}
    expected = ["P1"] if keys.get("StudyDescription") == "Chest*" else ["P1", "P2"]
    assert sorted(str(ds.PatientID) for _, ds in pending) == expected
    assert last_query_detail(pas) == f"{len(expected)} result" + ("s" if len(expected) > 1
                                                                   else "")


def test_a_sequence_key_with_a_value_in_its_item_is_answered_pending_ff01(
        pas: PasProcess) -> None:
    """Sequence matching (PS3.4 C.2.2.2.6) is not offered: an item with a value is a key
    not matched; an empty sequence or an empty item is a return key (returned empty)."""
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    pending, final = find(pas, "STUDY", {"ReferencedStudySequence": [item]})
    assert final == 0x0000
    assert [status for status, _ in pending] == [0xFF01, 0xFF01]
    assert all(ds.ReferencedStudySequence == [] for _, ds in pending)
    assert last_query_detail(pas).startswith(
        "keys not matched (answered 0xFF01): ReferencedStudySequence;")
    empty_item = Dataset()
    empty_item.ReferencedSOPInstanceUID = ""
    for value in ([], [empty_item]):
        pending, final = find(pas, "STUDY", {"ReferencedStudySequence": value})
        assert final == 0x0000
        assert [status for status, _ in pending] == [0xFF00, 0xFF00]


@pytest.mark.parametrize(("keys", "expected", "status"), [
    # Not filters PAS applies: answered 0xFF00 with every study ONLINE, as if matched.
    ({"InstanceAvailability": "OFFLINE"}, ["P1", "P2"], 0xFF01),
    ({"RetrieveAETitle": "OTHERAE"}, ["P1", "P2"], 0xFF01),
    ({"InstanceAvailability": "", "RetrieveAETitle": "*"}, ["P1", "P2"], 0xFF00),
    # Matched on the study's instances (it was refused, 0xA900).
    ({"SOPClassesInStudy": "1.2.840.10008.5.1.4.1.1.2"}, ["P1", "P2"], 0xFF00),
    ({"SOPClassesInStudy": "1.2.840.10008.5.1.4.1.1.4\\1.2.840.10008.5.1.4.1.1.88.22"}, [],
     None),
    # A lone "*" on a UID key is universal matching (it was refused, 0xA900).
    ({"StudyInstanceUID": "*"}, ["P1", "P2"], 0xFF00),
    # One time matches it stored with fractional seconds, or at a lower precision.
    ({"StudyTime": "012345"}, ["P1"], 0xFF00),
    ({"StudyTime": "150013"}, ["P2"], 0xFF00),
    ({"StudyTime": "012346"}, [], None),
])
def test_keys_matched_or_said_unmatched_as_ps3_4_asks(
        pas: PasProcess, keys: dict[str, object], expected: list[str],
        status: int | None) -> None:
    pending, final = find(pas, "STUDY", keys)
    assert final == 0x0000
    assert sorted(str(ds.PatientID) for _, ds in pending) == expected
    assert {s for s, _ in pending} == ({status} if status is not None else set())


@pytest.mark.parametrize(("keys", "offending", "comment"), [
    ({"StudyDate": "2020-01-01"}, 0x00080020, "StudyDate: '2020-01-01' is not a valid DA"),
    ({"StudyInstanceUID": "1.2.x"}, 0x0020000D, "StudyInstanceUID: '1.2.x' is not a UID"),
    ({"NumberOfStudyRelatedInstances": "3"}, 0x00201208,
     "NumberOfStudyRelatedInstances: a count, returned, not matched"),
])
def test_a_refused_find_names_the_key_in_offending_element(
        pas: PasProcess, keys: dict[str, object], offending: int, comment: str) -> None:
    """0xA900 carried only the Error Comment, cut at 64 characters; PS3.4 C.4.1.1.4 pairs it
    with the Offending Element (0000,0901), which PAS's C-MOVE and C-GET refusals gave."""
    pending, final = find_final(pas, "STUDY", keys)
    assert pending == [] and int(final.Status) == 0xA900
    tags = final.OffendingElement  # one tag, or a MultiValue of them
    assert [int(t) for t in (tags if isinstance(tags, list | MultiValue) else [tags])] == [
        offending], final
    assert str(final.ErrorComment).startswith(comment), final.ErrorComment
    if "count" in comment:  # said whole within the comment's 64 characters
        assert str(final.ErrorComment) == comment, final.ErrorComment
    # The association's next request is served.
    assert len(find(pas, "STUDY", {})[0]) == 2


def test_a_private_key_with_a_value_is_answered_pending_ff01(pas: PasProcess) -> None:
    """A private attribute (no keyword) given a value is not matched: 0xFF01, named in the
    audit row by its tag. It was dropped unseen, 0xFF00. Its private creator alone reserves
    a block and matches nothing: 0xFF00."""
    for with_key, status in ((True, 0xFF01), (False, 0xFF00)):
        def private(query: Dataset, with_key: bool = with_key) -> None:
            query.add_new(0x00110010, "LO", "ACME")
            if with_key:
                query.add_new(0x00111001, "LO", "X")
        pending, final = find_final(pas, "STUDY", {}, extra=private)
        assert int(final.Status) == 0x0000
        assert [s for s, _ in pending] == [status, status]
        detail = last_query_detail(pas)
        assert detail == ("keys not matched (answered 0xFF01): (0011,1001); 2 results"
                          if with_key else "2 results"), detail

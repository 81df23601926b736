"""A C-FIND, C-GET or C-MOVE whose key holds a list of more values than SQLite takes variables
is refused with a comment naming the key, the count and the bound; the daemon keeps serving.

Found in review (2026-12-07): a study-level C-FIND of 300,001 StudyInstanceUIDs (an 8.6 MB
identifier, under the 64 MiB a held message may be) was answered 0xA900 "query failed: too
many SQL variables" (SQLite binds 250,000 at most), and the C-GET of the same identifier
ended in pynetdicom's 0xC413 with no comment and a traceback in the journal. A list of more
than ``MAX_LIST_VALUES`` (10,000) values is now refused before any SQL. QIDO-RS cannot carry
such a list: the HTTP server resets a request head of ~240 kB (9,000 UIDs).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from appliance.store.query import MAX_LIST_VALUES
from tests.support.peers import PasProcess
from tests.test_serving_refusal_comments import serving_one_tiny_ct

TOO_MANY = 250_001  # one past SQLite's default SQLITE_MAX_VARIABLE_NUMBER
STUDY_UID_TAG = 0x0020000D


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PasProcess, str]]:
    with serving_one_tiny_ct(tmp_path_factory.mktemp("uid_lists") / "pas") as serving:
        yield serving


@pytest.fixture
def assoc(pas: tuple[PasProcess, str]) -> Iterator[Association]:
    ae = AE(ae_title="VIEWER")
    ae.maximum_pdu_size = 0
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for context in (StudyRootQueryRetrieveInformationModelFind, Verification,
                    StudyRootQueryRetrieveInformationModelGet,
                    StudyRootQueryRetrieveInformationModelMove):
        ae.add_requested_context(context)
    association = ae.associate("127.0.0.1", pas[0].port, ae_title="PAS")
    assert association.is_established
    try:
        yield association
    finally:
        association.release()


def _uids(count: int, last: str) -> str:
    """``count`` valid UIDs, ``last`` among them, as one backslash-separated value."""
    return "\\".join([*(f"1.2.826.0.1.3680043.2.{n}" for n in range(count - 1)), last])


def _identifier(value: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = value
    return ds


@functools.cache
def _too_many(study_uid: str) -> Dataset:
    """Built once: pydicom checks each of the values as it is set (1.4 s)."""
    return _identifier(_uids(TOO_MANY, study_uid))


def _still_serving(assoc: Association, study_uid: str) -> None:
    assert assoc.send_c_echo().Status == 0
    found = [(s.Status, i.StudyInstanceUID if i else None) for s, i in
             assoc.send_c_find(_identifier(study_uid), StudyRootQueryRetrieveInformationModelFind)]
    assert found == [(0xFF00, study_uid), (0x0000, None)]


@pytest.mark.parametrize("service", ["C-FIND", "C-GET", "C-MOVE"])
def test_a_list_past_the_bound_is_refused_by_name(pas: tuple[PasProcess, str],
                                                  assoc: Association, service: str) -> None:
    _, study_uid = pas
    identifier = _too_many(study_uid)
    if service == "C-FIND":
        answers = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
    elif service == "C-GET":
        answers = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
    else:
        answers = assoc.send_c_move(identifier, "SWITCHEDOFF",
                                    StudyRootQueryRetrieveInformationModelMove)
    statuses = [status for status, _ in answers]
    assert len(statuses) == 1, statuses
    final = statuses[0]
    assert final.Status == 0xA900, final
    assert final.ErrorComment == (f"StudyInstanceUID: {TOO_MANY} values, "
                                  f"more than {MAX_LIST_VALUES}")
    assert final.OffendingElement == STUDY_UID_TAG
    _still_serving(assoc, study_uid)


def test_a_list_at_the_bound_still_matches(pas: tuple[PasProcess, str],
                                           assoc: Association) -> None:
    _, study_uid = pas
    found = [(s.Status, i.StudyInstanceUID if i else None) for s, i in assoc.send_c_find(
        _identifier(_uids(MAX_LIST_VALUES, study_uid)),
        StudyRootQueryRetrieveInformationModelFind)]
    assert found == [(0xFF00, study_uid), (0x0000, None)]

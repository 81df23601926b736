"""A refused C-MOVE/C-GET says why in its Error Comment (0000,0902), DCMTK as the viewer
(pynetdicom for an identifier DCMTK cannot be made to send).

Found in review (2026-12-04): pynetdicom sends these refusals itself (0xA801 for a move
destination unknown, down or refusing the association; 0xC514/0xC413 when the handler
refuses the identifier) and the viewer got the bare status: only PAS's audit row said why.
The final response now carries the reason; the daemon keeps serving. (Since 2026-12-05 a
known destination that is down is 0xA702, every sub-operation failed:
tests/test_serving_move_not_up.py.)

Found in review (2026-12-04, later): an identifier that does not match the SOP class (no,
unknown or foreign QueryRetrieveLevel, no unique key, a malformed or wildcard one) ended in
pynetdicom's 0xC514/0xC413 ("exception in handler", with a traceback in the journal) where
C-FIND answers 0xA900; one that does not decode ended so with no comment and no audit row;
PatientID=* beside a StudyInstanceUID answered Success with nothing sent. Now 0xA900 (PS3.4
C.4.2.1.5, C.4.3.1.5) with the Error Comment and the Offending Element naming the key, or
0xC000 (unable to process) for an identifier that does not decode; audited; the association
serves the next request.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pynetdicom.association
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.support.cleanup import started
from tests.support.objects import tiny_ct
from tests.support.peers import DCMTK_ENV, PasProcess, closed_port, read_rows, storescu


@contextlib.contextmanager
def serving_one_tiny_ct(home: Path) -> Iterator[tuple[PasProcess, str]]:
    """A daemon holding one tiny CT (its Study Instance UID given with it), with one known
    move destination, SWITCHEDOFF, that refuses connections while it runs."""
    home.mkdir()
    ds = tiny_ct()
    ds.save_as(home / "one.dcm", enforce_file_format=True)
    with contextlib.ExitStack() as stack:  # a step that raises stops those started
        switched_off = closed_port()  # refuses connections while the module runs
        stack.callback(switched_off.close)
        pas = started(stack, PasProcess(home, {
            "PAS_DICOM__ACCEPT_UNKNOWN": "true",
            "PAS_SERVING__MOVE_DESTINATIONS":
                f'[{{title = "SWITCHEDOFF", host = "127.0.0.1", '
                f'port = {switched_off.getsockname()[1]}}}]',
        }))
        storescu(home / "one.dcm", pas.port)
        yield pas, str(ds.StudyInstanceUID)


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PasProcess, str]]:
    with serving_one_tiny_ct(tmp_path_factory.mktemp("refusals") / "pas") as serving:
        yield serving


def _final(tool: str, pas: PasProcess, keys: list[str], *extra: str,
           out: Path) -> tuple[str, str | None, str | None]:
    """(final response's status, its Error Comment or None, its Offending Element or None)
    as DCMTK's ``tool`` -d prints them."""
    args = [tool, "-d", "-aet", "VIEWER", "-aec", "PAS", "-S", *extra]
    if tool == "getscu":  # movescu writes nothing without a port of its own
        args += ["-od", str(out)]
    for key in keys:
        args += ["-k", key]
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([*args, "127.0.0.1", str(pas.port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    log = result.stdout + result.stderr
    # -d dumps each response: its command set, then the status detail (Error Comment).
    statuses = re.findall(r"DIMSE Status\s*: (0x[0-9a-f]{4}: [^\n]*)", log)
    assert statuses, log[-3000:]
    final = log[log.rindex("DIMSE Status"):]
    comment = re.search(r"\(0000,0902\) LO \[(.*)\]\s+#", final)
    offending = re.search(r"\(0000,0901\) AT (\([0-9a-f]{4},[0-9a-f]{4}\))", final)
    return (statuses[-1], comment.group(1) if comment else None,
            offending.group(1) if offending else None)


def _last_retrieve_outcome(pas: PasProcess) -> str:
    rows = read_rows(pas.home / "pas.sqlite",
                     "SELECT outcome FROM audit WHERE event = 'retrieve' ORDER BY id")
    return str(rows[-1]["outcome"])


LEVEL, PATIENT_ID = "(0008,0052)", "(0010,0020)"
STUDY_UID, SERIES_UID = "(0020,000d)", "(0020,000e)"


@pytest.mark.parametrize(("tool", "keys", "extra", "status", "comment", "offending"), [
    ("movescu", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID={study}"],
     ["-aem", "NOWHERE"], "0xa801", "unknown move destination 'NOWHERE'", None),
    ("movescu", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID={study}"],
     ["-aem", "SWITCHEDOFF"], "0xa702",  # known, not reached: every sub-operation failed
     "SWITCHEDOFF: could not connect (refused or no answer)", None),
    ("movescu", ["QueryRetrieveLevel=STUDY", "PatientID=*"], ["-aem", "SWITCHEDOFF"],
     "0xa900", "StudyInstanceUID: required for a STUDY-level retrieve", STUDY_UID),
    ("movescu", ["StudyInstanceUID={study}"], ["-aem", "SWITCHEDOFF"],
     "0xa900", "QueryRetrieveLevel missing: PATIENT, STUDY, SERIES or IMAGE", LEVEL),
    ("movescu", ["QueryRetrieveLevel=PATIENT", "PatientID=P1"], ["-aem", "SWITCHEDOFF"],
     "0xa900", "QueryRetrieveLevel PATIENT is only valid in the Patient Root ...", LEVEL),
    ("movescu", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID={study}", "PatientID=*"],
     ["-aem", "SWITCHEDOFF"], "0xa900", "PatientID: no wildcard in a retrieve ('*')",
     PATIENT_ID),
    ("getscu", ["QueryRetrieveLevel=STUDY", "PatientID=*"], [],
     "0xa900", "StudyInstanceUID: required for a STUDY-level retrieve", STUDY_UID),
    ("getscu", ["QueryRetrieveLevel=SERIES", "SeriesInstanceUID=1.2.3.x"], [],
     "0xa900", "SeriesInstanceUID: '1.2.3.x' is not a UID or a list of UIDs", SERIES_UID),
    ("getscu", ["QueryRetrieveLevel=SERIES", "SeriesInstanceUID=1.2.*"], [],
     "0xa900", "SeriesInstanceUID: no wildcard in a retrieve ('1.2.*')", SERIES_UID),
    ("getscu", ["QueryRetrieveLevel=FRAME", "StudyInstanceUID={study}"], [],
     "0xa900", "QueryRetrieveLevel 'FRAME' is not PATIENT, STUDY, SERIES or I...", LEVEL),
])
def test_a_refused_retrieve_names_why_in_its_error_comment(
        pas: tuple[PasProcess, str], tmp_path: Path, tool: str, keys: list[str],
        extra: list[str], status: str, comment: str, offending: str | None) -> None:
    daemon, study = pas
    keys = [k.format(study=study) for k in keys]
    final, said, element = _final(tool, daemon, keys, *extra, out=tmp_path / "refused")
    assert final.startswith(status), final
    assert said == comment
    assert element == offending
    assert list((tmp_path / "refused").iterdir()) == []
    if not comment.startswith("SWITCHEDOFF"):  # refused before any sub-association
        # The audit row has the whole reason (the comment is cut at 64 characters).
        outcome = _last_retrieve_outcome(daemon)
        assert outcome.startswith(f"failure: {comment.removesuffix('...')}"), outcome
    # The daemon keeps serving: the one study, retrieved on a new association.
    final, said, _ = _final("getscu", daemon, ["QueryRetrieveLevel=STUDY",
                                               f"StudyInstanceUID={study}"],
                            out=tmp_path / "ok")
    assert final.startswith("0x0000") and said is None, (final, said)
    assert len(list((tmp_path / "ok").iterdir())) == 1


# An identifier that does not decode: a sequence of undefined length whose item is cut short.
UNDECODABLE = (b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "
               b"\x08\x00\x15\x11\xff\xff\xff\xff\x01\x02\x03\x04\x05\x06\x07\x08")


def test_an_identifier_that_does_not_decode_is_refused_and_the_association_serves_on(
        pas: tuple[PasProcess, str]) -> None:
    """pynetdicom as a viewer that sends bytes pydicom cannot read as an identifier (DCMTK
    cannot be made to): C-MOVE and C-GET end in 0xC000 naming it (they ended in 0xC514/
    0xC413 with no comment and no audit row), C-FIND too (0xC000 with no comment); then, on
    the same association, a refused wildcard, a C-FIND and a C-GET are answered."""
    daemon, study = pas
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="GARBLED")
    for model in (StudyRootQueryRetrieveInformationModelMove,
                  StudyRootQueryRetrieveInformationModelGet,
                  StudyRootQueryRetrieveInformationModelFind):
        ae.add_requested_context(model, "1.2.840.10008.1.2")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="PAS",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    original = pynetdicom.association.encode
    try:
        pynetdicom.association.encode = lambda *args, **kwargs: UNDECODABLE
        finals = [
            list(assoc.send_c_move(Dataset(), "SWITCHEDOFF",
                                   StudyRootQueryRetrieveInformationModelMove))[-1][0],
            list(assoc.send_c_get(Dataset(), StudyRootQueryRetrieveInformationModelGet))[-1][0],
            list(assoc.send_c_find(Dataset(),
                                   StudyRootQueryRetrieveInformationModelFind))[-1][0],
        ]
    finally:
        pynetdicom.association.encode = original
    try:
        expected = "identifier does not decode: No tag to read at file position 1E"
        assert [(int(f.Status), f.ErrorComment) for f in finals] == [(0xC000, expected)] * 3
        rows = read_rows(daemon.home / "pas.sqlite",
                         "SELECT event, actor, outcome FROM audit WHERE actor = 'GARBLED' "
                         "ORDER BY id")
        assert [tuple(r) for r in rows] == [
            ("retrieve", "GARBLED", f"failure: {expected}"),
            ("retrieve", "GARBLED", f"failure: {expected}"),
            ("query", "GARBLED", f"failure: {expected}")]
        # The same association serves on: a refusal, a query, a retrieve.
        wildcard = Dataset()
        wildcard.QueryRetrieveLevel = "STUDY"
        wildcard.StudyInstanceUID = f"{study[:-3]}*"
        final = list(assoc.send_c_get(wildcard, StudyRootQueryRetrieveInformationModelGet))
        assert int(final[-1][0].Status) == 0xA900
        assert final[-1][0].ErrorComment.startswith("StudyInstanceUID: no wildcard")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        matches = [i for s, i in assoc.send_c_find(query,
                                                   StudyRootQueryRetrieveInformationModelFind)
                   if s and s.Status == 0xFF00]
        assert [str(m.StudyInstanceUID) for m in matches] == [study]
        retrieve = Dataset()
        retrieve.QueryRetrieveLevel = "STUDY"
        retrieve.StudyInstanceUID = study
        final = list(assoc.send_c_get(retrieve, StudyRootQueryRetrieveInformationModelGet))
        assert (int(final[-1][0].Status), len(received)) == (0x0000, 1)
        assert "Traceback" not in daemon.log()
    finally:
        assoc.release()

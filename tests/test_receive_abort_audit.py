"""An association PAS aborts itself (a PDU breaking the P-DATA rules, a message on a context
not accepted, one that does not decode) ends like any other: its audit row is written and
its open note closed (docs/ingest.md, the audit trail).

Found in review (2027-01, s38): the reactor's own abort ended the association directly,
without the A-P-ABORT indication pynetdicom's own aborts give: EVT_ABORTED never fired, so
the association's ``store`` row was missing, its ``open_associations`` row stayed until the
next start, and its note stayed in a dict keyed by id(assoc): a later association given the
same id() took it over ("1 cut by the association's end" on a clean association's row, 20
of 200 in the reviewer's run).
"""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from appliance.config import DicomSection
from appliance.dicomnet.direct_receive import p_data_tf
from appliance.dicomnet.direct_store import c_store_rq
from appliance.ingest import scp
from tests.support import raw_ul
from tests.support.peers import CT_DIR, PasProcess, read_rows, wait_for
from tests.test_ingest import dataset_part
from tests.test_ingest_refusals import echo_accepted

EXPLICIT = "1.2.840.10008.1.2.1"


def test_an_association_pas_aborts_gets_its_audit_row_and_closes_its_note(
        tmp_path: Path) -> None:
    """One instance stored, a second one's dataset broken by a command fragment: PAS aborts
    (A-ABORT), and the association's ``store`` row says what happened (1 stored, 1 cut), its
    ``open_associations`` row is gone. Before, neither: no row at all."""
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_HTTP__ENABLED": "false"}).start()
    try:
        first, second = sorted(CT_DIR.glob("*.dcm"))[:2]
        raw = raw_ul.associate(pas.port, [(1, str(CTImageStorage), EXPLICIT)],
                               calling="BROKEN")
        uid = str(dcmread(first, stop_before_pixels=True).SOPInstanceUID)
        answer = raw.c_store(1, str(CTImageStorage), uid, dataset_part(first))
        assert struct.unpack("<H", answer[0x0900])[0] == 0x0000
        cut_uid = str(dcmread(second, stop_before_pixels=True).SOPInstanceUID)
        raw.sock.sendall(p_data_tf(1, 0x03, c_store_rq(str(CTImageStorage), cut_uid, 2))
                         + p_data_tf(1, 0x00, dataset_part(second)[:1000])
                         + p_data_tf(1, 0x01, b"\0" * 8))  # a command inside the dataset
        assert raw.read_pdu(10)[0] == 0x07  # A-ABORT
        raw.sock.close()
        db = pas.home / "pas.sqlite"
        wait_for(lambda: read_rows(db, "SELECT 1 FROM audit WHERE event = 'store' "
                                       "AND actor = 'BROKEN'"), 10,
                 what="the aborted association's store row")
        [row] = read_rows(db, "SELECT outcome, detail FROM audit WHERE event = 'store' "
                              "AND actor = 'BROKEN'")
        assert row["outcome"] == "failure: 1 cut", dict(row)
        assert row["detail"] == ("1 instance stored, 0 refused, 1 cut by the association's "
                                 "end"), dict(row)
        assert not read_rows(db, "SELECT 1 FROM open_associations")
        assert "Traceback" not in pas.log()
        assert echo_accepted(pas)
    finally:
        pas.stop()


class _Receiver:
    db = None


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Any:
    rows: list[dict[str, Any]] = []
    monkeypatch.setattr(scp.audit, "association_closed",
                        lambda db, opened, **row: rows.append(row))
    made = scp.DicomListener(DicomSection(), _Receiver())  # type: ignore[arg-type]
    made.rows = rows
    return made


def _association(title: str) -> Any:
    return SimpleNamespace(requestor=SimpleNamespace(ae_title=title, address="127.0.0.1"),
                           pas_opened_note=0)


def test_a_note_belongs_to_its_association_not_to_its_id(
        listener: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An association whose end was never seen, with a C-STORE cut, then another one with
    the very same id() (CPython hands an id out again once its object is collected; here
    made to collide at once): the second's audit row is its own. Before, it took over the
    first's note (keyed by id()) and said "1 cut"."""
    lost, clean = _association("LOST"), _association("CLEAN")
    listener.note_cut(lost, "1.2.3", 1000)
    same = {id(clean): id(lost)}
    monkeypatch.setattr(scp, "id", lambda obj: same.get(id(obj), id(obj)), raising=False)
    listener._note_store(clean, scp.SUCCESS, False)
    listener._on_association_end(SimpleNamespace(assoc=clean))
    [row] = listener.rows
    assert row["outcome"] == "success", row
    assert row["detail"] == "1 instance stored, 0 refused", row

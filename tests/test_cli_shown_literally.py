"""What a peer chose (an AE title, a study description, a patient's name) is shown by the
``pas`` commands literally, never read as Rich markup (appliance/cli/common.py ``shown`` and
``literal``).

Found in review: a modality calling as ``[/CT]`` (a valid AE title) asked for Storage
Commitment and released at once; its report stayed pending, and ``pas status`` ended in a
MarkupError traceback, exit 1, for 24 h, ``pas doctor`` for 7 days (the AE title is a cell
of their tables). A study description ``[contrast]`` vanished from ``pas studies``.

A real daemon; pynetdicom is the modality.
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel

from appliance.cli.common import error_cell, literal, shown
from tests.support.objects import tiny_ct
from tests.support.peers import PasProcess, read_rows, wait_for

pytestmark = pytest.mark.usefixtures("pynetdicom_senders_fixed")

WELL_KNOWN = "1.2.840.10008.1.20.1.1"  # the Storage Commitment Push Model SOP Instance
AE_TITLE = "[/CT]"


def _store_and_ask_commitment(pas: PasProcess) -> str:
    """As the modality ``[/CT]``: one CT stored (described ``[contrast]``), its commitment
    asked, then released before any report: the report stays pending."""
    ae = AE(ae_title=AE_TITLE)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", pas.port, ae_title=pas.ae_title)
    assert assoc.is_established
    try:
        ct = tiny_ct(StudyDescription="[contrast] abdomen", PatientName="[bold]Doe^Jane",
                     PatientID="[/P1]")
        assert assoc.send_c_store(ct).Status == 0x0000
        info = Dataset()
        info.TransactionUID = generate_uid()
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = ct.SOPInstanceUID
        info.ReferencedSOPSequence = Sequence([item])
        status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    return str(ct.StudyInstanceUID)


def test_a_peers_bracketed_ae_title_and_description_are_shown_not_read_as_markup(
        pas: PasProcess) -> None:
    _store_and_ask_commitment(pas)
    wait_for(lambda: read_rows(pas.home / "pas.sqlite",
                               "SELECT 1 FROM commitment_requests WHERE calling_ae = ?",
                               (AE_TITLE,)), 10, what="the commitment request recorded")
    status = pas.cli("status", check=False)
    assert status.returncode == 0, status.stderr
    assert "Storage Commitment reports pending" in status.stdout
    assert AE_TITLE in status.stdout, status.stdout

    doctor = pas.cli("doctor", check=False)  # exit 1 is a check's verdict, not a crash
    assert "Traceback" not in doctor.stderr and "MarkupError" not in doctor.stderr, doctor.stderr
    assert doctor.returncode in (0, 1)
    assert f"storage commitment {AE_TITLE}" in doctor.stdout, doctor.stdout
    assert f"give {AE_TITLE} host and port" in doctor.stdout

    studies = pas.cli("studies", check=False)
    assert studies.returncode == 0, studies.stderr
    for said in ("[contrast] abdomen", "[bold]Doe^Jane", "[/P1]"):
        assert said in studies.stdout, studies.stdout


def test_data_in_cells_and_markup_lines_keeps_its_brackets_and_shows_control_characters(
        ) -> None:
    """The helpers themselves: a cell is plain text (no markup read), a value put into a
    markup line is escaped, a terminal's control characters are shown as ``\\xNN``."""
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(shown("[/CT] [contrast]\x1b[2J"))
    console.print(f"[red]refused:[/red] {literal('[/CT] and [contrast]')}")
    console.print(error_cell("[/x]" + "e" * 400))
    text = console.export_text()
    assert "[/CT] [contrast]\\x1b[2J" in text
    assert "refused: [/CT] and [contrast]" in text
    assert "[/x]eee" in text and "…" in text
    assert shown("two\nlines").plain == "two\nlines"
    assert shown("two\nlines", one_line=True).plain == "two\\x0alines"

"""A retrieve whose instances are purged while it runs: the counts and the Failed SOP Instance
UID List of its responses.

Found in review (2026-12-05): an instance whose row was gone when its C-STORE came (``pas
cache purge --force`` of the study while a viewer retrieved it) was yielded to pynetdicom as
a bare string, which it counts failed but not done: a C-GET of 4 instances purged after the
first answered Pending 1 completed, 3 failed, 3 remaining, then a final 0xB000 still saying
3 remaining, with a Failed SOP Instance UID List of three empty UIDs (``\\\\``). Now each
such sub-operation is one fewer remaining, and the list names the instances (their UIDs are
read a page ahead of the C-STOREs).

pynetdicom as the viewer (C-GET, SCP role for CT), the purge run by the real ``pas`` CLI from
its C-STORE handler, after the first instance.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
)

from tests.support.objects import tiny_ct
from tests.support.peers import PasProcess, read_rows, storescu

COUNTS = ("NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
          "NumberOfFailedSuboperations", "NumberOfWarningSuboperations")


def test_instances_purged_during_a_c_get_are_counted_done_and_named_failed(
        tmp_path: Path) -> None:
    home = tmp_path / "pas"
    home.mkdir()
    study = generate_uid()
    paths, uids = [], []
    for n in range(4):
        ds = tiny_ct(study, PatientID="PURGED", InstanceNumber=n + 1)
        uids.append(str(ds.SOPInstanceUID))
        paths.append(home / f"{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                            "PAS_PREFETCH__ENABLED": "false",
                            # a Pending response after each sub-operation
                            "PAS_SERVING__RETRIEVE_PENDING_INTERVAL_S": "0"}).start()
    try:
        storescu(paths, pas.port)
        received: list[str] = []

        def on_store(event: evt.Event) -> int:
            received.append(str(event.dataset.SOPInstanceUID))
            if len(received) == 1:
                pas.cli("cache", "purge", "--force", study)
            return 0x0000

        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS",
                             ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        try:
            responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
        finally:
            assoc.release()
        assert received == uids[:1]
        counts = [tuple(int(status.get(k) or 0) for k in COUNTS) for status, _ in responses]
        # (remaining, completed, failed, warning): each sub-operation done once.
        assert counts == [(3, 1, 0, 0), (2, 1, 1, 0), (1, 1, 2, 0), (0, 1, 3, 0), (0, 1, 3, 0)]
        final, identifier = responses[-1]
        assert int(final.Status) == 0xB000
        assert list(identifier.FailedSOPInstanceUIDList) == uids[1:]
        rows = read_rows(pas.home / "pas.sqlite",
                         "SELECT outcome, detail FROM audit WHERE event = 'retrieve'")
        assert [tuple(r) for r in rows] == [(
            "failure: 3 of 4 instances not stored by VIEWER (instance row 2 removed during "
            "the retrieve)", "C-GET: 1 completed, 3 failed, 0 warning")]
    finally:
        pas.stop()

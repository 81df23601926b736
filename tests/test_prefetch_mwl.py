"""Modality Worklist polling of a real ``pas run`` against a real worklist SCP (pynetdicom).

The RIS is a pynetdicom Modality Worklist SCP in this process, serving scheduled procedure
steps. Proven: PAS polls it, each step becomes one prefetch request (trigger ``mwl``) due
``lead_time_h`` before the step, repeated polls schedule nothing more, a rescheduled step moves
its pending request, the modality filter reaches the RIS, and a RIS answering with a failure
status changes nothing while PAS keeps polling.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind

from tests.support.peers import PasProcess, free_port, wait_for
from tests.support.peers import prefetch_requests as requests


class WorklistSCP:
    """A RIS worklist: answers every C-FIND with the items whose modality matches."""

    def __init__(self) -> None:
        self.port = free_port()
        self.items: list[Dataset] = []
        self.queries: list[Dataset] = []
        self.fail = False
        self.lock = threading.Lock()
        ae = AE(ae_title="RIS")
        ae.add_supported_context(ModalityWorklistInformationFind)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_FIND, self._find)])

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        with self.lock:
            self.queries.append(query)
            if self.fail:
                yield 0xC001, None
                return
            items = list(self.items)
        wanted = query.ScheduledProcedureStepSequence[0].get("Modality", "")
        for item in items:
            if not wanted or item.ScheduledProcedureStepSequence[0].Modality == wanted:
                yield 0xFF00, item

    def add(self, patient: str, accession: str, modality: str, when: dt.datetime) -> None:
        item = Dataset()
        item.PatientID = patient
        item.IssuerOfPatientID = "HOSP"
        item.PatientName = "DOE^JOHN"
        item.AccessionNumber = accession
        item.StudyInstanceUID = f"1.2.3.{len(self.items) + 1}"
        item.RequestedProcedureID = f"RP-{accession}"
        step = Dataset()
        step.ScheduledProcedureStepStartDate = when.strftime("%Y%m%d")
        step.ScheduledProcedureStepStartTime = when.strftime("%H%M%S")
        step.Modality = modality
        step.ScheduledStationAETitle = "CT1"
        step.ScheduledProcedureStepID = f"SPS-{accession}"
        item.ScheduledProcedureStepSequence = [step]
        with self.lock:
            self.items.append(item)

    def stop(self) -> None:
        self.server.shutdown()




@pytest.fixture
def ris() -> Iterator[WorklistSCP]:
    scp = WorklistSCP()
    yield scp
    scp.stop()


def start_pas(pas_factory: Any, ris: WorklistSCP, **extra: str) -> PasProcess:
    return pas_factory({
        "PAS_HL7__ENABLED": "false",
        "PAS_PREFETCH__DICOMWEB_URL": f"http://127.0.0.1:{free_port()}/dicom-web",
        "PAS_PREFETCH__RETRY_AFTER_S": "3600", "PAS_PREFETCH__LEAD_TIME_H": "12",
        "PAS_PREFETCH__MWL__ENABLED": "true", "PAS_PREFETCH__MWL__PORT": str(ris.port),
        "PAS_PREFETCH__MWL__INTERVAL_S": "0.3", **extra,
    })


def test_worklist_steps_become_one_request_each(pas_factory: Any, ris: WorklistSCP) -> None:
    tomorrow = (dt.datetime.now() + dt.timedelta(hours=20)).replace(microsecond=0)
    ris.add("P1", "ACC1", "CT", tomorrow)
    ris.add("P2", "ACC2", "MR", tomorrow + dt.timedelta(hours=1))
    ris.add("P3", "ACC3", "CT", tomorrow + dt.timedelta(hours=2))
    with ris.lock:
        ris.fail = True
    pas = start_pas(pas_factory, ris, PAS_PREFETCH__MWL__MODALITY="CT")

    # A RIS answering with a failure status: nothing scheduled, the reason logged, PAS polls on.
    wait_for(lambda: len(ris.queries) >= 2, 30, what="polls of a failing RIS")
    assert requests(pas) == []
    wait_for(lambda: "worklist poll failed: worklist C-FIND failed with status 0xC001"
             in pas.log(), 10, what="the failure in the log")
    with ris.lock:
        ris.fail = False

    # Each CT step is one request (the modality filter reached the RIS), however often polled.
    wait_for(lambda: len(requests(pas)) == 2, 30, what="two worklist requests")
    polls = len(ris.queries)
    wait_for(lambda: len(ris.queries) >= polls + 3, 30, what="three more polls")
    rows = {r["patient_id"]: r for r in requests(pas)}
    assert set(rows) == {"P1", "P3"}
    assert ris.queries[-1].ScheduledProcedureStepSequence[0].Modality == "CT"
    p1 = rows["P1"]
    assert p1["trigger"] == "mwl" and p1["times_requested"] == 1
    assert (p1["accession_number"], p1["modality"], p1["issuer"]) == ("ACC1", "CT", "HOSP")
    assert p1["dedup_key"] == "worklist:P1|HOSP|ACC1|SPS-ACC1"
    assert p1["scheduled_at"] == tomorrow.timestamp()
    assert p1["due_at"] == pytest.approx(tomorrow.timestamp() - 12 * 3600)
    # The query asked for the coming hours only.
    sps = ris.queries[-1].ScheduledProcedureStepSequence[0]
    assert sps.ScheduledProcedureStepStartDate.startswith(dt.date.today().strftime("%Y%m%d"))

    # The RIS moves P1's exam: the pending request follows, still one request.
    later = tomorrow + dt.timedelta(hours=3)
    with ris.lock:
        ris.items[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime = \
            later.strftime("%H%M%S")
        ris.items[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate = \
            later.strftime("%Y%m%d")
    wait_for(lambda: [r["scheduled_at"] for r in requests(pas) if r["patient_id"] == "P1"]
             == [later.timestamp()], 30, what="the rescheduled step")
    assert len(requests(pas)) == 2


def test_a_step_whose_date_does_not_exist_does_not_cost_the_others(
        pas_factory: Any, ris: WorklistSCP) -> None:
    """A RIS's step dated 20261301 made strptime raise inside the poll: the whole answer was
    lost, the other steps never scheduled, on every poll. Now that step is a request due at
    once (no time to count back from), and the others are scheduled as usual."""
    tomorrow = (dt.datetime.now() + dt.timedelta(hours=20)).replace(microsecond=0)
    ris.add("P1", "ACC1", "CT", tomorrow)
    ris.add("P2", "ACC2", "CT", tomorrow)
    ris.add("P3", "ACC3", "CT", tomorrow)
    with ris.lock:
        ris.items[1].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate = \
            "20261301"
        ris.items[2].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate = \
            "2026\u00b2101"  # '²'.isdigit() is True
    pas = start_pas(pas_factory, ris)
    wait_for(lambda: len(requests(pas)) == 3, 30, what="three worklist requests")
    rows = {r["patient_id"]: r for r in requests(pas)}
    assert rows["P1"]["scheduled_at"] == tomorrow.timestamp()
    assert rows["P2"]["scheduled_at"] is None and rows["P3"]["scheduled_at"] is None
    assert "worklist poll failed" not in pas.log()

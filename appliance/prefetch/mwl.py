"""Modality Worklist polling: the RIS's scheduled procedure steps become prefetch requests.

Owns: one C-FIND (Modality Worklist Information Model - FIND) against the RIS per poll, for
the steps scheduled from now to ``hours_ahead`` hours ahead (optionally one modality or one
station), and turning each answer into a :class:`appliance.store.prefetch.NewRequest` whose
dedup key is the worklist item (patient, accession, step id), so polling every few minutes
schedules each exam once. May not touch: SQL (the caller stores), the spool.

For sites whose RIS offers a worklist but no HL7 feed to PAS.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

from appliance.config import PrefetchMwl
from appliance.store.prefetch import NewRequest, request_key

log = logging.getLogger("pas.prefetch.mwl")


class WorklistError(Exception):
    """The RIS could not be queried; the message says why."""


@dataclass(frozen=True)
class WorklistItem:
    patient_id: str
    issuer: str
    accession_number: str
    modality: str
    step_id: str
    scheduled_at: float | None
    study_uid: str


def build_query(settings: PrefetchMwl, moment: dt.datetime) -> Dataset:
    """The C-FIND identifier: return keys empty, matching keys on the scheduled step."""
    end = moment + dt.timedelta(hours=settings.hours_ahead)
    query = Dataset()
    for keyword in ("PatientID", "IssuerOfPatientID", "PatientName", "AccessionNumber",
                    "StudyInstanceUID", "RequestedProcedureID"):
        setattr(query, keyword, "")
    step = Dataset()
    step.ScheduledProcedureStepStartDate = f"{moment:%Y%m%d}-{end:%Y%m%d}"
    step.ScheduledProcedureStepStartTime = ""
    step.Modality = settings.modality or ""
    step.ScheduledStationAETitle = settings.station_ae_title or ""
    step.ScheduledProcedureStepID = ""
    query.ScheduledProcedureStepSequence = [step]
    return query


def item_from(identifier: Dataset) -> WorklistItem | None:
    patient_id = str(identifier.get("PatientID", "") or "").strip()
    if not patient_id:
        return None
    steps = identifier.get("ScheduledProcedureStepSequence") or [Dataset()]
    step = steps[0]
    date = str(step.get("ScheduledProcedureStepStartDate", "") or "")
    time_ = str(step.get("ScheduledProcedureStepStartTime", "") or "").split(".")[0]
    scheduled = None
    if len(date) == 8 and date.isascii() and date.isdigit():
        stamp = date + (time_ + "000000")[:6] \
            if time_.isascii() and time_.isdigit() else date + "000000"
        # A date or time that does not exist (20261301, 2560) is no time to count back from:
        # the step is due at once. Raised, it lost the whole answer, every poll.
        with contextlib.suppress(ValueError):
            scheduled = dt.datetime.strptime(stamp, "%Y%m%d%H%M%S").timestamp()
    return WorklistItem(
        patient_id, str(identifier.get("IssuerOfPatientID", "") or ""),
        str(identifier.get("AccessionNumber", "") or ""), str(step.get("Modality", "") or ""),
        str(step.get("ScheduledProcedureStepID", "") or
            identifier.get("RequestedProcedureID", "") or ""),
        scheduled, str(identifier.get("StudyInstanceUID", "") or ""))


def to_request(item: WorklistItem, lead_time_h: float, now: float) -> NewRequest:
    due = now if item.scheduled_at is None else max(now, item.scheduled_at - lead_time_h * 3600)
    return NewRequest(
        request_key("worklist", item.patient_id, item.issuer, item.accession_number,
                    item.step_id),
        "mwl", item.patient_id, item.issuer, item.accession_number or None,
        item.modality.upper() or None, None, item.scheduled_at, due)


def query_worklist(settings: PrefetchMwl, calling_ae: str,
                   moment: dt.datetime | None = None) -> list[WorklistItem]:
    """One association, one C-FIND; every pending answer that names a patient."""
    ae = AE(ae_title=settings.calling_ae_title or calling_ae)
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout_s
    assoc = ae.associate(settings.host, settings.port, ae_title=settings.ae_title)
    if not assoc.is_established:
        raise WorklistError(f"worklist {settings.ae_title}@{settings.host}:{settings.port}: "
                            "association rejected or the RIS is unreachable")
    items: list[WorklistItem] = []
    try:
        for status, identifier in assoc.send_c_find(
                build_query(settings, moment or dt.datetime.now()),
                ModalityWorklistInformationFind):
            if not status:
                raise WorklistError("worklist C-FIND: no answer (timeout or aborted)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                item = item_from(identifier)
                if item is not None:
                    items.append(item)
            elif code != 0x0000:
                raise WorklistError(f"worklist C-FIND failed with status 0x{code:04X}")
    finally:
        assoc.release()
    return items

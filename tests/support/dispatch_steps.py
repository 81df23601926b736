"""Steps of the dispatch tests, written once: the daemon started for a quick study, its jobs
read, a correction filed from the QA workstation.

Why: the corrections tests of review s41 (a version the sender replaced, not sent; the same
version current again) each started PAS, sent the CT's study as ``CT1`` to a PACS that is down
and filed a correction from ``QA_WS`` in the same dozen lines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from appliance.store.jobs import WAITING_FOR_LINK
from tests.support.configs import BACKOFF_QUICK, ct1_to
from tests.support.peers import PasProcess, StoreSCP, read_rows, storescu, wait_for

# A study is stable (and routed) half a second after its last instance; any calling AE.
QUICK_STUDIES = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_STUDY__STABLE_AFTER_S": "0.5"}


def start_pas(pas_factory: Callable[..., PasProcess], config: Path) -> PasProcess:
    """The daemon (``pas_factory``'s) with ``config``, any calling AE, a study routed half a
    second after its last instance."""
    return pas_factory({"PAS_CONFIG": str(config), **QUICK_STUDIES})


def jobs_of(pas: PasProcess) -> list[dict[str, Any]]:
    """``pas``'s jobs, oldest first, each a dict of its row."""
    return [dict(r) for r in read_rows(pas.home / "pas.sqlite",
                                       "SELECT * FROM jobs ORDER BY id")]


def file_correction(pas: PasProcess, original: Path, folder: Path) -> str:
    """Send ``pas`` a correction of ``original`` (the same SOP Instance UID, other bytes: an
    ImageComments) from the QA workstation's AE, ``QA_WS``, written in ``folder``; returns
    its SOP Instance UID."""
    corrected = dcmread(original)
    corrected.ImageComments = "corrected at the QA workstation"
    correction = folder / "correction.dcm"
    corrected.save_as(correction)
    storescu(correction, pas.port, calling="QA_WS")
    return str(corrected.SOPInstanceUID)


@dataclass
class QueuedThenCorrected:
    """What :func:`ct1_queued_then_corrected` left: the PACS (not started), the daemon, and
    the SOP Instance UID of the instance corrected."""

    scp: StoreSCP
    pas: PasProcess
    uid: str

    @property
    def database(self) -> Path:
        return self.pas.home / "pas.sqlite"

    def jobs(self) -> list[dict[str, Any]]:
        return jobs_of(self.pas)


def ct1_queued_then_corrected(pas_factory: Callable[..., PasProcess], tmp_path: Path,
                              study: list[Path]) -> QueuedThenCorrected:
    """PAS sending what ``CT1`` sends to a PACS whose port is chosen but that is not started
    (:func:`tests.support.configs.ct1_to`, retries quick); ``study`` sent as ``CT1``, its
    job waiting for the link; then the correction of its first instance filed from
    ``QA_WS``, which no rule sends to the PACS (and the appliance is not enrolled: it stays
    here)."""
    scp = StoreSCP(tmp_path / "pacs", ae_title="PACS")  # its port chosen, not started yet
    pas = start_pas(pas_factory, ct1_to(tmp_path / "appliance.toml", scp,
                                        queue=BACKOFF_QUICK))
    storescu(study, pas.port, calling="CT1")
    wait_for(lambda: (jobs := jobs_of(pas))
             and (jobs[0]["last_error"] or "").startswith(WAITING_FOR_LINK),
             60, what="the job to the PACS waiting for it")
    return QueuedThenCorrected(scp, pas, file_correction(pas, study[0], tmp_path))

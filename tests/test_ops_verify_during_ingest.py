"""``pas verify`` beside a daemon that is receiving (appliance/ops/recovery.py, ``_orphans``).

The receive path writes an instance's file, then commits its row (invariant 1). ``pas verify``
walked the spool and the index side by side and named every file it found without a row an
"orphan": run while a modality sent, it reported 1 or 2 instances in flight as orphans, exit 1,
in 68 of 89 runs (a nightly verify timer alerting for nothing, an operator told the cache is
inconsistent when it is not). Here a real ``pas run`` receives new instances from a pynetdicom
SCU the whole time while ``pas verify`` runs again and again: every run exits 0 with no
problem, and once the sending stops a last verify counts every instance the SCU was answered
success for.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from appliance import dicomnet
from tests.support.peers import MR_DIR, PasProcess, wait_for

VERIFY_RUNS = 6


def _send_until(stop: threading.Event, port: int, answered: list[int]) -> None:
    """New instances (a new study per association), one C-STORE after the other."""
    dicomnet.install()  # pynetdicom's own SCU loop can lose a C-STORE-RSP (dicomnet/__init__)
    datasets = [dcmread(path) for path in sorted(MR_DIR.glob("*.dcm"))[:40]]
    ae = AE(ae_title="MODALITY")
    ae.dimse_timeout = 60
    ae.add_requested_context(datasets[0].SOPClassUID,
                             [datasets[0].file_meta.TransferSyntaxUID])
    while not stop.is_set():
        assoc = ae.associate("127.0.0.1", port, ae_title="PAS")
        assert assoc.is_established
        study = generate_uid()
        try:
            for dataset in datasets:
                if stop.is_set():
                    break
                dataset.StudyInstanceUID = study
                dataset.SOPInstanceUID = generate_uid()
                answered.append(int(assoc.send_c_store(dataset).Status))
        finally:
            assoc.release()


def test_verify_during_ingest_reports_no_instance_in_flight_as_an_orphan(
        tmp_path: Path) -> None:
    pas = PasProcess(tmp_path / "pas", {"PAS_PREFETCH__ENABLED": "false",
                                        "PAS_HTTP__ENABLED": "false",
                                        "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    pas.start()
    stop = threading.Event()
    answered: list[int] = []
    sender = threading.Thread(target=_send_until, args=(stop, pas.port, answered))
    try:
        sender.start()
        wait_for(lambda: answered or not sender.is_alive(), 30, what="the first C-STORE")
        reports = []
        for _ in range(VERIFY_RUNS):
            result = pas.cli("verify", "--json", check=False)
            reports.append((result.returncode, json.loads(result.stdout)))
        during = len(answered)
        assert sender.is_alive(), "the sender ended before the verifies did"
        stop.set()
        sender.join(120)
        final = pas.cli("verify", "--json", check=False)
    finally:
        stop.set()
        pas.stop()
    assert not sender.is_alive()
    assert during > 0 and set(answered) == {0}, "every instance answered success"
    problems = [(code, report["problems"]) for code, report in reports
                if code != 0 or report["problems"]]
    assert problems == [], f"instances in flight named as problems: {problems}"
    last = json.loads(final.stdout)
    assert final.returncode == 0 and last["problems"] == []
    assert last["files"] == last["ok"] == len(answered)

"""``pas verify`` beside a daemon that is receiving (appliance/ops/recovery.py, ``_orphans``).

The receive path writes an instance's file, then commits its row (invariant 1). ``pas verify``
walked the spool and the index side by side and named every file it found without a row an
"orphan": run while a modality sent, it reported 1 or 2 instances in flight as orphans, exit 1,
in 68 of 89 runs (a nightly verify timer alerting for nothing, an operator told the cache is
inconsistent when it is not). Here a real ``pas run`` receives new instances from a pynetdicom
SCU the whole time while ``pas verify`` runs again and again: every run exits 0 with no
problem, and once the sending stops a last verify counts every instance the SCU was answered
success for.

The second test makes the CI failure of 2026-12-05 happen every time: a file written just
*before* the verify began, whose row commits only after the verify's walk (its commit waits
for the write lock, which the test holds), was reported as an orphan.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from appliance import dicomnet
from tests.support.peers import MR_DIR, PAS_BIN, PasProcess, read_rows, wait_for

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


def _holds_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (its /proc fd table)."""
    try:
        return any(fd.resolve() == path for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


@pytest.mark.parametrize("repair", [False, True], ids=["verify", "verify-repair"])
def test_a_file_written_just_before_verify_whose_row_commits_after_its_walk_is_no_orphan(
        tmp_path: Path, repair: bool) -> None:
    """``--repair`` adopts orphans: it took the in-flight file as one, and counted it
    repaired; had its adoption committed first, the row would have had no calling AE (what
    routing rules match), the daemon's receive finding it a duplicate."""
    pas = PasProcess(tmp_path / "pas", {"PAS_PREFETCH__ENABLED": "false",
                                        "PAS_HTTP__ENABLED": "false",
                                        "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    pas.start()
    db_path = (tmp_path / "pas" / "pas.sqlite").resolve()
    spool = tmp_path / "pas" / "spool"
    first, second = (dcmread(path) for path in sorted(MR_DIR.glob("*.dcm"))[:2])
    answered: list[int] = []
    first_answered, locked = threading.Event(), threading.Event()
    lock = sqlite3.connect(db_path, isolation_level=None, timeout=30)

    def send() -> None:
        """Two C-STOREs on one association: the first opens it (the daemon writes its audit
        row then), the second is filed while the test holds the write lock."""
        dicomnet.install()
        ae = AE(ae_title="MODALITY")
        ae.dimse_timeout = 60
        ae.add_requested_context(first.SOPClassUID, [first.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS")
        assert assoc.is_established
        try:
            answered.append(int(assoc.send_c_store(first).Status))
            first_answered.set()
            locked.wait(30)
            answered.append(int(assoc.send_c_store(second).Status))
        finally:
            assoc.release()

    sender = threading.Thread(target=send)
    try:
        sender.start()
        wait_for(first_answered.is_set, 30, what="the first C-STORE's answer")
        lock.execute("BEGIN IMMEDIATE")  # the daemon's commit of the second row waits behind it
        locked.set()
        wait_for(lambda: len(list(spool.glob("??/*.dcm"))) == 2, 30,
                 what="the second instance's spool file")
        verify = subprocess.Popen([str(PAS_BIN), "verify", *(["--repair"] if repair else []),
                                   "--json"], env=pas.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The verify opens the database just before its walk; the walk of a two-file spool
        # takes milliseconds, and a second more lets it end (nothing says so from outside).
        # The code under test waits up to 35 s for the row: this wait cannot make it flaky.
        wait_for(lambda: _holds_open(verify.pid, db_path), 30, what="verify's database")
        time.sleep(1.0)
        lock.execute("ROLLBACK")  # the daemon's row commits now
        out, err = verify.communicate(timeout=120)
        sender.join(60)
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        pas.stop()
    assert answered == [0, 0], "the second C-STORE was answered success once its row committed"
    report = json.loads(out)
    assert (verify.returncode, report["problems"]) == (0, []), err
    # Checked: the rows committed when its walk began (the second is not, unless this machine
    # was slow enough for the lock to go first; then the case is not made, but nothing fails).
    assert report["files"] == report["ok"] in (1, 2)
    assert report["repaired"] == 0, report
    rows = read_rows(db_path, "SELECT calling_ae FROM instances")
    assert [row["calling_ae"] for row in rows] == ["MODALITY", "MODALITY"]
    after = json.loads(pas.cli("verify", "--json").stdout)
    assert (after["files"], after["ok"], after["problems"]) == (2, 2, [])

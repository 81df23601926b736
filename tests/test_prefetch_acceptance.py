"""Acceptance of issue 6: priors on site before the patient arrives, end to end, real peers.

The regional archive is a real Orthanc (DICOMweb plugin, in its own network namespace) behind
a real hub (``pas hub run``: TLS 1.3, mutual TLS, the ``/api/v1/region/dicom-web`` proxy); PAS
is enrolled with ``pas enroll``. The older CT study of each of the 10 patients of
ct-covid19-ny-sbu is loaded into Orthanc with DCMTK storescu; one ORM^O01 per patient goes
through the ``hl7`` package's MLLP client. Proven: every prior lands in the PAS cache byte for
byte (SHA-256 of each file equals the original), pinned, marked confirmed and never routed back
to the region; a duplicate order fetches nothing again; garbage HL7 gets a NAK; a new local
study triggers its patient's priors; a rule pushes priors to a workstation (DCMTK storescp);
then the hub and Orthanc stop, findscu on PAS lists every prior and movescu retrieves each one
with the original dataset bytes. The tests share one region (module scope) and run in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hl7.client import MLLPClient
from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble

from tests.support.cleanup import started
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    PAS_BIN,
    Orthanc,
    PasProcess,
    StoreSCP,
    free_port,
    port_open,
    run_pas,
    storescu,
    wait_for,
)
from tests.support.peers import prefetch_requests as prefetch_rows

pytestmark = pytest.mark.root


def ct_studies() -> dict[str, list[tuple[str, list[Path]]]]:
    """PatientID -> [(StudyDate, files)] oldest first (file names <PatientID>_..._<date>-n)."""
    by_study: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for path in sorted(CT_DIR.glob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        by_study[(str(ds.PatientID), str(ds.StudyDate))].append(path)
    patients: dict[str, list[tuple[str, list[Path]]]] = defaultdict(list)
    for (patient, date), files in sorted(by_study.items()):
        patients[patient].append((date, files))
    return patients


class Hub:
    """``pas hub`` as a child process: init, one token, run on loopback."""

    def __init__(self, home: Path, archive_url: str):
        self.home = home
        self.port = free_port()
        self.env = {**os.environ, "PAS_HUB_HOME": str(home),
                    "PAS_HUB_HTTP__HOST": "127.0.0.1", "PAS_HUB_HTTP__PORT": str(self.port),
                    "PAS_HUB_ARCHIVE__KIND": "dicomweb", "PAS_HUB_ARCHIVE__URL": archive_url,
                    # the test's Orthanc speaks plain HTTP inside its network namespace
                    "PAS_HUB_ARCHIVE__ALLOW_CLEARTEXT": "true"}
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        result = run_pas(["hub", *args], self.env, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def start(self) -> Hub:
        self.home.mkdir(parents=True, exist_ok=True)
        if not (self.home / "hub.sqlite").exists():
            self.cli("init")
        log = open(self.home / "hub.log", "ab")
        self.proc = subprocess.Popen([str(PAS_BIN), "hub", "run"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc is not None and self.proc.poll() is None
                 and port_open("127.0.0.1", self.port), 30, what="the hub")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # open keep-alive connections delay uvicorn
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.fail("Orthanc runs in a network namespace: the tests must run as root")
    base = tmp_path_factory.mktemp("prefetch_region")
    with contextlib.ExitStack() as stack:  # a step that raises stops those started
        orthanc = started(stack, Orthanc(base / "orthanc"))
        hub = started(stack, Hub(base / "hub", orthanc.dicomweb))
        patients = ct_studies()
        priors = {patient: studies[0] for patient, studies in patients.items()}
        # Through Orthanc's REST API, which keeps the file byte for byte (storescu would
        # rewrite undefined-length sequences, so the region would not hold the originals').
        for _, files in priors.values():
            for path in files:
                answer = httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(),
                                    timeout=60)
                assert answer.status_code == 200, answer.text
        token = hub.cli("token", "SITEA").strip()
        workstation = started(stack, StoreSCP(base / "workstation", ae_title="READING1"))
        viewer = started(stack, StoreSCP(base / "viewer", ae_title="VIEWER"))
        pas = PasProcess(base / "pas", {
            # The viewer that retrieves the priors by C-MOVE once the region is gone.
            "PAS_SERVING__MOVE_DESTINATIONS":
                f'[{{title = "VIEWER", host = "127.0.0.1", port = {viewer.port}}}]',
            # An MR exam's priors are also pushed to the reading workstation; others stay
            # cached.
            "PAS_DESTINATIONS__WS__KIND": "dicom", "PAS_DESTINATIONS__WS__AE_TITLE": "READING1",
            "PAS_DESTINATIONS__WS__HOST": "127.0.0.1",
            "PAS_DESTINATIONS__WS__PORT": str(workstation.port),
            "PAS_PREFETCH__RULES": '[{name = "mr-reading", modality = "^MR$", '
                                   'push_to = ["ws"]}, {name = "default"}]',
            "PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(free_port()),
            "PAS_PREFETCH__RETRY_AFTER_S": "1", "PAS_PREFETCH__PIN_DAYS": "30",
            "PAS_PREFETCH__CHECK_INTERVAL_S": "0.2", "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        })
        pas.home.mkdir(parents=True, exist_ok=True)
        pas.cli("enroll", "--hub", f"https://127.0.0.1:{hub.port}", "--token", token)
        started(stack, pas)
        hl7_port = int(pas.env["PAS_HL7__PORT"])
        wait_for(lambda: port_open("127.0.0.1", hl7_port), 15, what="the HL7 listener")
        yield {"orthanc": orthanc, "hub": hub, "pas": pas, "priors": priors,
               "patients": patients, "hl7_port": hl7_port, "workstation": workstation,
               "viewer": viewer}


def orm(control: str, patient: str, order: str) -> str:
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261123120000||ORM^O01|{control}|P|2.5",
        f"PID|1||{patient}^^^^MR||DOE^JOHN",
        f"ORC|NW|{order}|||SC",
        f"OBR|1|{order}||CTCHEST^CT chest||||||||||||||ACC-{order}||||||CT",
    ])


def send(port: int, message: str) -> str:
    with MLLPClient("127.0.0.1", port) as client:
        return client.send_message(message).decode()




def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_orders_bring_every_prior_on_site_then_served_without_the_hub(
        region: dict[str, Any]) -> None:
    pas: PasProcess = region["pas"]
    port = region["hl7_port"]
    priors: dict[str, tuple[str, list[Path]]] = region["priors"]
    assert len(priors) == 10
    for n, patient in enumerate(sorted(priors)):
        answer = send(port, orm(f"M{n}", patient, f"O{n}"))
        assert "MSA|AA|" + f"M{n}" in answer

    def all_fetched() -> bool:
        rows = prefetch_rows(pas)
        return len(rows) == 10 and all(r["state"] == "fetched" for r in rows)

    wait_for(all_fetched, 180, interval=0.5, what="10 prefetch requests fetched")
    rows = {r["patient_id"]: r for r in prefetch_rows(pas)}
    # A072894's older study holds one file under two names (same bytes): count distinct.
    expected_files = len({sha256(p) for _, files in priors.values() for p in files})
    assert sum(r["instances_fetched"] for r in rows.values()) == expected_files
    assert all(r["studies_found"] == 1 and r["studies_fetched"] == 1 for r in rows.values())

    # Byte for byte: each original file's SHA-256 is in the PAS index, under its patient.
    studies = json.loads(pas.cli("studies", "--json").stdout)
    assert {s["patient_id"] for s in studies} == set(priors)
    assert all(s["origin"] == "regional" for s in studies)
    assert sum(s["instances"] for s in studies) == expected_files
    assert all(s["confirmed"] == s["instances"] for s in studies)

    with sqlite3.connect(pas.home / "pas.sqlite") as conn:
        held = {row[0]: row[1] for row in conn.execute(
            "SELECT sha256, path FROM instances WHERE is_current = 1")}
        unrouted = conn.execute("SELECT count(*) FROM instances WHERE routed_at IS NULL"
                                ).fetchone()[0]
        unpinned = conn.execute("SELECT count(*) FROM studies WHERE pinned_until IS NULL OR "
                                "pinned_until < strftime('%s','now') + 29 * 86400"
                                ).fetchone()[0]
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
    for _, files in priors.values():
        for path in files:
            digest = sha256(path)
            assert digest in held, f"{path.name} not in the PAS cache byte for byte"
            assert sha256(pas.home / "spool" / held[digest]) == digest
    assert unrouted == 0 and jobs == 0  # never sent back to the region
    assert unpinned == 0

    # /metrics counts what came down the WAN: the answers' bytes as sent (Orthanc gzips
    # them, so fewer than the files' bytes, never none).
    metrics = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=30).text
    (down,) = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith('pas_wan_bytes_total{direction="down"}')]
    assert 0 < down < sum(p.stat().st_size for _, files in priors.values() for p in files)

    # A duplicate order (new control id, same order) fetches nothing again.
    before = {p: (r["instances_fetched"], r["id"]) for p, r in rows.items()}
    first = sorted(priors)[0]
    assert "MSA|AA|" in send(port, orm("DUP1", first, "O0"))
    again = {r["patient_id"]: r for r in prefetch_rows(pas)}
    assert len(again) == 10
    assert again[first]["times_requested"] == 2
    assert {p: (r["instances_fetched"], r["id"]) for p, r in again.items()} == before

    # Garbage gets a NAK with a reason, and changes nothing.
    nak = send(port, "this is not HL7")
    assert "MSA|AR|" in nak and "MSH" in nak
    assert len(prefetch_rows(pas)) == 10

    # By hand, for a patient whose prior is complete on site: found, 'on_site', 0 fetched.
    patient = sorted(priors)[1]
    pas.cli("prefetch", "patient", patient)

    def manual_done() -> dict[str, Any] | None:
        manual = [r for r in prefetch_rows(pas) if r["trigger"] == "manual"]
        return manual[0] if manual and manual[0]["state"] in ("fetched", "failed") else None

    row = wait_for(manual_done, 60, interval=0.3, what="the manual request")
    assert row["state"] == "fetched", row["last_error"]
    assert row["studies_found"] == 1 and row["instances_fetched"] == 0
    detail = json.loads(pas.cli("prefetch", "show", str(row["id"]), "--json").stdout)
    assert [st["state"] for st in detail["studies"]] == ["on_site"]




def test_new_local_study_triggers_its_priors_and_a_rule_pushes_them(
        region: dict[str, Any]) -> None:
    """On arrival: the modality sends patient P's newer CT to PAS; once stable, PAS asks the
    region for P's priors, never counting the new study itself (the region holds it too here).
    Then a manual MR request for P uses the "mr-reading" rule: P's studies go to READING1."""
    pas: PasProcess = region["pas"]
    patient = sorted(region["priors"])[2]
    (_, prior_files), (_, current_files) = region["patients"][patient]
    prior_uid = str(dcmread(prior_files[0], stop_before_pixels=True).StudyInstanceUID)
    current_uid = str(dcmread(current_files[0], stop_before_pixels=True).StudyInstanceUID)
    for path in current_files:
        httpx.post(f"{region['orthanc'].url}/instances", content=path.read_bytes(), timeout=60)
    storescu(current_files, pas.port, calling="MODALITY1")

    def arrival_done() -> dict[str, Any] | None:
        rows = [r for r in prefetch_rows(pas) if r["trigger"] == "arrival"]
        return rows[0] if rows and rows[0]["state"] in ("fetched", "failed") else None

    row = wait_for(arrival_done, 60, interval=0.3, what="the on-arrival prefetch")
    assert row["state"] == "fetched", row["last_error"]
    assert row["dedup_key"] == f"arrival:{current_uid}" and row["patient_id"] == patient
    detail = json.loads(pas.cli("prefetch", "show", str(row["id"]), "--json").stdout)
    assert [(st["study_uid"], st["state"]) for st in detail["studies"]] == \
        [(prior_uid, "on_site")]

    pas.cli("prefetch", "patient", patient, "--modality", "MR")
    # By hand there is no current exam: both of P's studies are priors and both are pushed.
    expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in prior_files + current_files}
    workstation: StoreSCP = region["workstation"]

    def pushed() -> set[str]:
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for p in workstation.files()}
        return got if got == expected else set()

    wait_for(pushed, 60, interval=0.3, what="the prior pushed to READING1")
    rows = [r for r in prefetch_rows(pas) if r["trigger"] == "manual" and r["rule"] ==
            "mr-reading"]
    assert len(rows) == 1 and rows[0]["state"] == "fetched"


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta: what travels in a C-STORE (the meta is each writer's)."""
    data = path.read_bytes()
    stream = io.BytesIO(data)
    read_preamble(stream, False)
    _read_file_meta_info(stream)
    return data[stream.tell():]


def dcmtk(tool: str, port: int, keys: list[str], *extra: str,
          out: Path | None = None) -> subprocess.CompletedProcess[str]:
    args = [tool, "-aet", "VIEWER", "-aec", "PAS", "-S", *extra]
    for key in keys:
        args += ["-k", key]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        args += ["-od", str(out)]
    return subprocess.run([*args, "127.0.0.1", str(port)], env=DCMTK_ENV,
                          capture_output=True, text=True, timeout=120)


def test_priors_are_served_by_pas_when_the_region_is_gone(region: dict[str, Any],
                                                          tmp_path: Path) -> None:
    """Hub and Orthanc stop: findscu on PAS lists every prior, movescu retrieves each one
    with the original dataset bytes, and the cache files are still bit-exact."""
    pas: PasProcess = region["pas"]
    region["hub"].stop()
    region["orthanc"].stop()
    priors = {str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID): files
              for _, files in region["priors"].values()}

    found = dcmtk("findscu", pas.port, ["QueryRetrieveLevel=STUDY", "PatientID=A*",
                                        "StudyInstanceUID=", "NumberOfStudyRelatedInstances="],
                  "-X", out=tmp_path / "find")
    assert found.returncode == 0, found.stderr[-2000:]
    answers = {str(d.StudyInstanceUID): d for d in
               (dcmread(p) for p in (tmp_path / "find").glob("rsp*.dcm"))}
    assert set(priors) <= set(answers)
    viewer: StoreSCP = region["viewer"]
    for study_uid, files in priors.items():
        assert int(answers[study_uid].NumberOfStudyRelatedInstances) == \
            len({sha256(p) for p in files})
        moved = dcmtk("movescu", pas.port, ["QueryRetrieveLevel=STUDY",
                                            f"StudyInstanceUID={study_uid}"], "-aem", "VIEWER")
        assert moved.returncode == 0, moved.stderr[-2000:]
    originals = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID):
                 hashlib.sha256(dataset_bytes(p)).hexdigest()
                 for files in priors.values() for p in files}

    def received() -> dict[str, str]:
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID):
               hashlib.sha256(dataset_bytes(p)).hexdigest() for p in viewer.files()}
        return got if len(got) >= len(originals) else {}

    assert wait_for(received, 60, what="every prior moved to VIEWER") == originals

    studies = {s["study_uid"]: s for s in json.loads(pas.cli("studies", "--json").stdout)}

    with sqlite3.connect(pas.home / "pas.sqlite") as conn:
        held = {row[0]: row[1] for row in conn.execute(
            "SELECT sha256, path FROM instances WHERE is_current = 1")}
    for study_uid, files in priors.items():
        assert studies[study_uid]["origin"] == "regional"
        for path in files:
            digest = sha256(path)
            assert sha256(pas.home / "spool" / held[digest]) == digest

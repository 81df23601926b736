"""The bucketed download path of the prefetch (issue 6), real peers end to end.

The regional archive is a real Orthanc (DICOMweb plugin, its own network namespace) behind a
real hub (``pas hub run``, mutual TLS); PAS (``pas run``) is enrolled with it. Priors come down
through ``POST /api/v1/downloads``: the hub reads the study from Orthanc, packs it as uploads
are packed (JPEG-LS + zstd buckets) and streams it; PAS rebuilds every file, checks it against
the SHA-256 of the region's file and files it through the ingest Receiver. Proven: every prior
lands byte for byte by that path (buckets small enough that files span several); a download
cut in the middle resumes and the hub packs only what the site does not hold yet; bad requests
(unknown study, garbage, no certificate) get a clear error and change nothing.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hl7.client import MLLPClient
from pydicom import dcmread

from tests.support.hub import HubProcess, client, enroll
from tests.support.peers import (
    CT_DIR,
    Orthanc,
    PasProcess,
    port_open,
    read_rows,
    wait_for,
)
from tests.support.peers import prefetch_requests as prefetch_rows
from tests.support.tcpproxy import TcpProxy, _reset

pytestmark = pytest.mark.root

# Three patients' older studies in the region; the third one is fetched through a link
# that is cut once in the middle of its download.
PATIENTS = ("A002304", "A027284", "A046441")


def older_study(patient: str) -> tuple[str, list[Path]]:
    by_date: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(CT_DIR.glob(f"{patient}_*.dcm")):
        by_date[str(dcmread(path, stop_before_pixels=True).StudyDate)].append(path)
    files = by_date[min(by_date)]
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CuttingProxy(TcpProxy):
    """Cuts the connection that carries the ``after``-th byte towards the site, once: the WAN
    dropping in the middle of a download (the next connections pass)."""

    def __init__(self, upstream_host: str, upstream_port: int, after: int):
        super().__init__(upstream_host, upstream_port)
        self.after = after
        self.bytes_down = 0
        self.cuts = 0

    def _pump(self, source: socket.socket, sink: socket.socket, upward: bool) -> None:
        if upward:
            super()._pump(source, sink, upward)
            return
        try:
            while chunk := source.recv(16384):
                sink.sendall(chunk)
                with self._lock:
                    self.bytes_down += len(chunk)
                    cut = self.cuts == 0 and self.bytes_down >= self.after
                    if cut:
                        self.cuts += 1
                if cut:
                    _reset(sink)
                    _reset(source)
                    return
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                sock.close()


def orm(control: str, patient: str, order: str) -> str:
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261123120000||ORM^O01|{control}|P|2.5",
        f"PID|1||{patient}^^^^MR", f"ORC|NW|{order}|||SC",
        f"OBR|1|{order}||CT^CT||||||||||||||ACC-{order}||||||CT"])


def pas_for(hub: HubProcess, home: Path, site: str, hub_url: str | None = None) -> PasProcess:
    enrolment = enroll(hub, home, site)
    if hub_url:  # through a proxy: the enrolment's hub URL points at it
        path = home / "pki" / "hub.json"
        path.write_text(path.read_text().replace(enrolment.url, hub_url))
    return PasProcess(home, {
        "PAS_PREFETCH__RETRY_AFTER_S": "1", "PAS_PREFETCH__CHECK_INTERVAL_S": "0.2",
        # Buckets of 64 KiB of original bytes: each 0.5 MB CT file spans several.
        "PAS_PREFETCH__DOWNLOAD_BUCKET_KB": "64", "PAS_OPS__HEARTBEAT": "false",
    }).start()


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("bucketed")
    priors = {patient: older_study(patient) for patient in PATIENTS}
    orthanc = Orthanc(base / "orthanc").start()
    hub = HubProcess(base / "hub", {"PAS_HUB_ARCHIVE__KIND": "dicomweb",
                                    "PAS_HUB_ARCHIVE__URL": orthanc.dicomweb})
    try:
        # Through Orthanc's REST API, which keeps every file byte for byte.
        for _, files in priors.values():
            for path in files:
                httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(),
                           timeout=60).raise_for_status()
        hub.init().start()
        yield {"orthanc": orthanc, "hub": hub, "priors": priors, "base": base}
    finally:
        hub.stop()
        orthanc.stop()


def order_and_wait(pas: PasProcess, patient: str, n: int) -> dict[str, Any]:
    port = int(pas.env["PAS_HL7__PORT"])
    wait_for(lambda: port_open("127.0.0.1", port), 30, what="the HL7 listener")
    with MLLPClient("127.0.0.1", port) as mllp:
        assert "MSA|AA|" in mllp.send_message(orm(f"C{n}", patient, f"O{n}")).decode()

    def done() -> dict[str, Any] | None:
        rows = [r for r in prefetch_rows(pas) if r["patient_id"] == patient]
        return rows[0] if rows and rows[0]["state"] in ("fetched", "failed") else None

    return wait_for(done, 120, interval=0.2, what=f"the prefetch of {patient}")


def assert_on_site_byte_for_byte(pas: PasProcess, files: list[Path]) -> None:
    held = {row["sha256"]: row["path"] for row in read_rows(
        pas.home / "pas.sqlite", "SELECT sha256, path FROM instances WHERE is_current = 1")}
    for path in files:
        digest = sha256(path.read_bytes())
        assert digest in held, f"{path.name} is not on site byte for byte"
        assert sha256((pas.home / "spool" / held[digest]).read_bytes()) == digest


def bucketed_audits(pas: PasProcess) -> list[str]:
    return [row["detail"] for row in read_rows(
        pas.home / "pas.sqlite", "SELECT detail FROM audit WHERE event = 'retrieve'")
        if "bucketed download" in (row["detail"] or "")]


def test_priors_land_byte_for_byte_through_buckets(region: dict[str, Any]) -> None:
    hub: HubProcess = region["hub"]
    pas = pas_for(hub, region["base"] / "pas", "SITE-B")
    try:
        for n, patient in enumerate(PATIENTS[:2]):
            row = order_and_wait(pas, patient, n)
            assert row["state"] == "fetched", row["last_error"]
            _, files = region["priors"][patient]
            assert row["instances_fetched"] == len({sha256(p.read_bytes()) for p in files})
            assert_on_site_byte_for_byte(pas, files)
        assert len(bucketed_audits(pas)) == 2
        # The hub's lines follow the stream's end, after the site has read it: awaited.
        def both_sent() -> list[str] | None:
            found = re.findall(r"download of study \S+ for SITE-B sent: (\d+) instances?",
                               hub.log())
            return found if len(found) == 2 else None

        sent = wait_for(both_sent, 10, what="the hub's line for each study")
        assert all(int(n) > 0 for n in sent)
        assert not list((hub.home / "downloads").iterdir()) or wait_for(
            lambda: not list((hub.home / "downloads").iterdir()), 30,
            what="the hub's staging folders removed")
    finally:
        pas.stop()


def test_a_cut_download_resumes_without_fetching_held_instances_again(
        region: dict[str, Any]) -> None:
    hub: HubProcess = region["hub"]
    patient = PATIENTS[2]
    study_uid, files = region["priors"][patient]
    expected = len({sha256(p.read_bytes()) for p in files})
    assert expected >= 2  # the cut must fall after a first instance is complete
    # Past the enrolment's and the QIDO answers, in the middle of the download: the first
    # 0.5 MB CT file is about 150 kB of buckets.
    proxy = CuttingProxy("127.0.0.1", hub.port, after=300_000).start()
    pas = pas_for(hub, region["base"] / "pas-cut", "SITE-C", f"https://localhost:{proxy.port}")
    try:
        row = order_and_wait(pas, patient, 10)
        assert proxy.cuts == 1
        assert row["state"] == "fetched", row["last_error"]
        # Tried again; a link cut is not counted as an attempt (it waits for the link).
        assert "cut after" in pas.log() and "waiting for the link" in pas.log()
        # Every instance once: the retry asked only for what the first attempt had not filed.
        assert row["instances_fetched"] == expected
        assert_on_site_byte_for_byte(pas, files)
        # The retry's line follows its stream's end, after the site has read it: awaited.
        def retry_sent() -> list[tuple[str, str, str]] | None:
            found = re.findall(rf"download of study {re.escape(study_uid)} for SITE-C (sent|"
                               r"ended early): (\d+) instances? \((\d+) held at the site",
                               hub.log())
            return found if found and found[-1][0] == "sent" else None

        lines = wait_for(retry_sent, 10, what="the retry's line")
        resumed, skipped = int(lines[-1][1]), int(lines[-1][2])
        assert skipped >= 1 and resumed + skipped == expected
    finally:
        pas.stop()
        proxy.stop()


def test_a_revoked_certificate_makes_orders_wait_and_a_new_one_fetches_them(
        region: dict[str, Any]) -> None:
    """The hub revoking the appliance's certificate answered 403 certificate_revoked to each
    prior's request, counted as an attempt: after five, every order received meanwhile
    failed for good, its priors never fetched. Now the orders wait, no attempt counted, the
    error logged once and shown by the status, the metric and the CLI; after ``pas enroll
    --replace`` and a restart they are fetched, with no retry by hand."""
    hub: HubProcess = region["hub"]
    patient = PATIENTS[1]
    _, files = region["priors"][patient]
    pas = pas_for(hub, region["base"] / "pas-revoked", "SITE-R")
    try:
        hub.cli("revoke", "SITE-R")
        port = int(pas.env["PAS_HL7__PORT"])
        wait_for(lambda: port_open("127.0.0.1", port), 30, what="the HL7 listener")
        with MLLPClient("127.0.0.1", port) as mllp:
            assert "MSA|AA|" in mllp.send_message(orm("C30", patient, "O30")).decode()

        def waiting() -> dict[str, Any] | None:
            rows = [r for r in prefetch_rows(pas) if r["patient_id"] == patient]
            return rows[0] if rows and (rows[0]["last_error"] or "").startswith(
                "waiting for credentials") else None

        row = wait_for(waiting, 60, interval=0.2, what=f"the order's first try ({pas.log_path})")
        assert (row["state"], row["attempts"]) == ("pending", 0), row
        assert row["last_error"].startswith(
            "waiting for credentials: the region: the hub refuses this appliance's "
            "certificate (certificate_revoked)"), row["last_error"]
        assert "pas enroll --replace" in row["last_error"]
        # PAS_PREFETCH__RETRY_AFTER_S is 1 here: a refused certificate waits a minute.
        assert row["next_attempt_at"] - row["updated_at"] >= 59
        (refused,) = pas.status()["credentials_refused"]
        assert (refused["destination"], refused["waiting"], refused["what"]) == (
            "prefetch", 1, "prefetch request"), refused
        assert "1 prefetch request waiting for credentials" in pas.cli("status").stdout
        scraped = httpx.get(f"http://127.0.0.1:{pas.http_port}/metrics", timeout=10).text
        assert "pas_prefetch_waiting_for_credentials 1.0" in scraped
        errors = [line for line in pas.log().splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "waits for its credentials" in errors[0], errors
        assert not [r for r in read_rows(pas.home / "pas.sqlite", "SELECT id FROM instances")]

        pas.stop()
        pas.cli("enroll", "--hub", hub.url, "--token", hub.token("SITE-R"), "--replace")
        pas.start()

        def settled() -> dict[str, Any] | None:
            rows = [r for r in prefetch_rows(pas) if r["patient_id"] == patient]
            return rows[0] if rows and rows[0]["state"] in ("fetched", "failed") else None

        row = wait_for(settled, 120, interval=0.2, what=f"the prefetch of {patient}")
        assert row["state"] == "fetched", row["last_error"]
        assert "1 prefetch request waiting for credentials due now" in pas.log()
        assert row["instances_fetched"] == len({sha256(p.read_bytes()) for p in files})
        assert_on_site_byte_for_byte(pas, files)
        assert pas.status()["credentials_refused"] == []
    finally:
        pas.stop()


def test_bad_requests_get_a_clear_error_and_change_nothing(region: dict[str, Any],
                                                           tmp_path: Path) -> None:
    hub: HubProcess = region["hub"]
    orthanc: Orthanc = region["orthanc"]
    before = sorted(orthanc.instances())
    enrolment = enroll(hub, tmp_path / "site", "SITE-D")
    with client(enrolment) as http:
        cases = [
            (b"not json at all", 400, "bad_json"),
            (b'["a list"]', 422, "bad_request"),
            (b'{"study_uid": "1.2.3; DROP TABLE"}', 422, "bad_request"),
            (b'{"study_uid": "1.2.3", "have": "everything"}', 422, "bad_request"),
            (b'{"study_uid": "1.2.3", "bucket_bytes": 1}', 422, "bad_request"),
            (b'{"study_uid": "1.2.826.0.1.3680043.2.1125.404"}', 404, "unknown_study"),
        ]
        for body, status, error in cases:
            answer = http.post("/api/v1/downloads", content=body,
                               headers={"content-type": "application/json"})
            assert answer.status_code == status, (body, answer.text)
            problem = answer.json()
            assert problem["error"] == error and problem["detail"], problem
        assert "study_uid" in http.post("/api/v1/downloads", json={"study_uid": "x"}).json()[
            "detail"]
    # A hub without the route (an older one): the client says so, and the prefetch then
    # uses WADO-RS; a known route with another method is 405, the same signal.
    from appliance.transfer.download import DownloadUnavailable, HubDownloads

    older = HubDownloads(enrolment.url + "/api/v1/not-offered", enrolment.ssl_context())
    with pytest.raises(DownloadUnavailable):
        older.fetch("1.2.3", lambda uid, data: None)
    older.close()
    anonymous = httpx.post(f"{hub.url}/api/v1/downloads", json={"study_uid": "1.2.3"},
                           verify=hub.anonymous_context(), timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"] == "client_certificate_required"
    assert sorted(orthanc.instances()) == before
    wait_for(lambda: not list((hub.home / "downloads").iterdir()), 30,
             what="no staging folder left on the hub")
    assert hub.proc is not None and hub.proc.poll() is None  # still serving


def test_the_embedded_archive_downloads_what_was_uploaded_bit_exact(tmp_path: Path) -> None:
    """A hub with its embedded archive: a CT study uploaded through the transfer API comes
    back through the bucketed download byte for byte; a series alone, and with ``have``, only
    the rest."""
    from appliance.transfer.download import HubDownloads
    from tests.support.hub import pack_items, ship

    hub = HubProcess(tmp_path / "hub").init().start()
    try:
        site = enroll(hub, tmp_path / "site", "SITE-E")
        study_uid, files = older_study(PATIENTS[0])
        items = pack_items(files)
        shipment = ship(items, site.hub_transfer_key, study_uid=study_uid)
        with client(site) as http:
            assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
            assert set(shipment.put_all(http)) == {201}
            assert http.post(shipment.url + "/commit").status_code == 200
        downloads = HubDownloads(site.url, site.ssl_context())
        got: dict[str, str] = {}
        result = downloads.fetch(study_uid, lambda uid, data: got.setdefault(uid, sha256(data)),
                                 bucket_bytes=128 * 1024)
        assert got == shipment.originals and result.instances == len(got)
        assert result.buckets > len(got)  # 0.5 MB files in 128 kB buckets: split instances

        series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        held = {items[0].sop_instance_uid}
        rest: dict[str, str] = {}
        downloads.fetch(study_uid, lambda uid, data: rest.setdefault(uid, sha256(data)),
                        series_uid=series_uid, have=held)
        in_series = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files
                     if str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID) == series_uid}
        assert set(rest) == in_series - held and rest.items() <= shipment.originals.items()
        downloads.close()
    finally:
        hub.stop()

"""The WAN's hard failure: the hub's address stops answering at all (a black hole).

Real processes only: the regional Orthanc and ``pas hub run`` in a network namespace of their
own (198.18.0.0/15), PAS enrolled with that hub across a veth, DCMTK viewers and modality,
HL7 over MLLP. The black hole is ``nft`` dropping every packet to and from the hub's port
inside the hub's namespace (tests/support/netns.py ``BlackHole``): no refusal, no RST, no
ICMP, so a connect waits for its timeout and a connection under way goes silent. (A hub
stopped is the easy case: connections are refused at once. tests/test_serving_fetch.py's
"WAN down" takes the link between the hub and the regional archive down: the hub still
answers PAS.)

What must hold while the hub is black-holed (docs/reliability.md, "Faults tried"):
local viewers, the RIS and the operators are answered in about the time they take with
the WAN up; a retrieve that needs the region fails within the connect bound with a clear
status; studies received are acknowledged at once and sent exactly once when the link
returns, a PUT cut in the middle included; ``systemctl stop`` ends within its budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hl7.client import MLLPClient
from pydicom import dcmread
from pynetdicom.dsutils import split_dataset

from tests.support.cleanup import started
from tests.support.hub import HubProcess, enroll
from tests.support.netns import BlackHole
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    NetNamespace,
    Orthanc,
    PasProcess,
    StoreSCP,
    prefetch_requests,
    read_rows,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.root
REGIONAL = "A002304"   # both of its studies are only at the region
LOCAL = "A027284"      # stored at PAS (and uploaded) before the link goes black
RECEIVED = "A046441"   # stored at PAS while an upload is cut mid-body by the black hole
LATE = "A048383"       # stored while black-holed, just before a systemctl stop
# Local work must not wait for the WAN: the region's C-FIND/retrieve check has a 0.5 s
# deadline (serving.region_query_timeout_s), the rest does not ask it. Generous for a
# loaded 2-core machine; a TCP connect or read timeout to the hub is 5-120 s.
LOCAL_S = 3.0
# A connection the hub does not accept is given up after this (transfer/client.py
# CONNECT_TIMEOUT_S), and `pas run` waits at most this for busy parts when stopping
# (daemon.py STOP_BUDGET_S): the bounds docs/serving.md and docs/operations.md state.
CONNECT_TIMEOUT_S = 10.0
STOP_BUDGET_S = 20.0


def _files(patient: str) -> list[Path]:
    return sorted(CT_DIR.glob(f"{patient}_*.dcm"))


def _studies(patient: str) -> list[str]:
    return sorted({str(dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                   for p in _files(patient)})


def _by_study(patient: str) -> list[list[Path]]:
    """The patient's files, one list per study (in study UID order)."""
    studies: dict[str, list[Path]] = {}
    for path in _files(patient):
        uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        studies.setdefault(uid, []).append(path)
    return [studies[uid] for uid in sorted(studies)]


def _dataset_sha(content: bytes, scratch: Path) -> str:
    """SHA-256 of the dataset after the file meta (an archive writes its own file meta)."""
    scratch.write_bytes(content)
    _, offset = split_dataset(scratch)
    return hashlib.sha256(content[offset:]).hexdigest()


def _viewers_connected(pas: PasProcess) -> int:
    """Established TCP connections to PAS's DICOM port (from here: the kernel's count)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{pas.port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


class Wan:
    """Orthanc + hub in one namespace, the hub's port black-holed on demand; PAS enrolled."""

    def __init__(self, root: Path):
        self.root = root
        with contextlib.ExitStack() as stack:  # a step that raises stops those started
            self._start(root, stack)
            stack.pop_all()  # set up: stop() stops them from now on

    def _start(self, root: Path, stack: contextlib.ExitStack) -> None:
        self.ns = NetNamespace("pasbh").create()
        stack.callback(self.ns.delete)
        self.region = started(stack, Orthanc(root / "region", ns=self.ns))
        for path in _files(REGIONAL):  # the REST API keeps every byte (docs/prefetch.md)
            httpx.post(f"{self.region.url}/instances", content=path.read_bytes(),
                       timeout=60).raise_for_status()
        self.hub = started(stack, HubProcess(root / "hub", {
            "PAS_HUB_ARCHIVE__KIND": "dicomweb",
            "PAS_HUB_ARCHIVE__URL": "http://127.0.0.1:8042/dicom-web"}, ns=self.ns).init())
        self.hole = BlackHole(self.ns, self.hub.port)
        self.scp = started(stack, StoreSCP(root / "scp"))
        self.home = root / "pas"
        enroll(self.hub, self.home, "SITE-A")
        self.env = {
            "PAS_DICOM__ACCEPT_UNKNOWN": "true",
            # Under the fetch below (10 s connect bound): the association must not be
            # aborted for PAS's own time spent on the region.
            "PAS_DICOM__NETWORK_TIMEOUT_S": "3",
            "PAS_SERVING__QUERY_REGION": "true",
            "PAS_SERVING__MOVE_DESTINATIONS":
                f'[{{title = "STORESCP", host = "127.0.0.1", port = {self.scp.port}}}]',
            "PAS_OPS__HEARTBEAT_INTERVAL_S": "1",
            # A prefetch black-holed gives up after 3 s (its connect, or its read on a
            # connection opened before) and tries again 0.5 s later: each try of the tests'
            # "tried three times" costs ~3.5 s, not 6 s (a try at 5 s + 1 s was most of
            # their time). The hub answers a priors request within 0.1-0.3 s.
            "PAS_PREFETCH__RETRY_AFTER_S": "0.5", "PAS_PREFETCH__CHECK_INTERVAL_S": "0.2",
            "PAS_PREFETCH__TIMEOUT_S": "3", "PAS_PREFETCH__MAX_ATTEMPTS": "2",
            "PAS_QUEUE__BACKOFF_INITIAL_S": "0.5", "PAS_QUEUE__BACKOFF_MAX_S": "1",
            "PAS_QUEUE__MAX_ATTEMPTS": "2",
            # A PUT takes ~1 s (the black hole can land in its middle) and a silent one
            # fails after 2 s (its connect too: hub.timeout_s bounds it under
            # CONNECT_TIMEOUT_S); then the job backs off (0.5-1 s) and tries again: ~3 s a
            # try, the "tried three times" below in ~13 s (at 5 s and 1-2 s: ~34 s). The hub
            # answers a PUT or a commit here in well under a second; one slower than 2 s on
            # a loaded machine is only a try more (the link taken for down, the job resumed),
            # within the bounds asserted. The hub is frozen (below) for one scrape of
            # /metrics: milliseconds, far under the 2 s.
            "PAS_HUB__MAX_MBPS": "2", "PAS_HUB__BUCKET_MB": "0.4", "PAS_HUB__TIMEOUT_S": "2",
            "PAS_HUB__RETRIES": "0",
        }
        self.pas = started(stack, PasProcess(self.home, self.env))
        storescu(_files(LOCAL), self.pas.port)
        wait_for(lambda: self.unconfirmed() == 0 and self.instances() == 6, 60,
                 what="the local studies confirmed by the region")

    @property
    def db(self) -> Path:
        return self.home / "pas.sqlite"

    def instances(self, patient: str | None = None) -> int:
        """Instances held (of that patient's studies)."""
        if patient is None:
            return int(read_rows(self.db, "SELECT count(*) AS n FROM instances")[0]["n"])
        studies = _studies(patient)
        return int(read_rows(self.db, "SELECT count(*) AS n FROM instances i JOIN studies s "
                             f"ON s.id = i.study_fk WHERE s.study_uid IN "
                             f"({','.join('?' * len(studies))})", tuple(studies))[0]["n"])

    def unconfirmed(self) -> int:
        return int(read_rows(self.db, "SELECT count(*) AS n FROM instances "
                                      "WHERE confirmed_at IS NULL")[0]["n"])

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.pas.http_port}/metrics", timeout=10).text

    def stop(self) -> None:
        # The hub killed, not stopped: its orderly stop gives the requests in flight 5 s,
        # and the last test leaves two PUTs black-holed at it (5 s for every run). Its
        # stop is tests/test_hub_*'s subject, not this module's.
        for step in (self.hole.off, self.pas.stop, self.hub.kill, self.scp.stop,
                     self.region.stop):
            try:
                step()
            except Exception as exc:  # every step runs: the namespace must go
                print(f"clean-up: {exc}")
        self.ns.delete()


@pytest.fixture(scope="module")
def wan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wan]:
    root = tmp_path_factory.mktemp("blackhole")
    setup: Wan | None = None
    try:
        setup = Wan(root)
        yield setup
    finally:
        if setup is not None:
            setup.stop()


def _timed(args: list[str], timeout: float = 60) -> tuple[subprocess.CompletedProcess[str],
                                                         float]:
    started = time.monotonic()
    result = subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.monotonic() - started


def _find(pas: PasProcess) -> tuple[subprocess.CompletedProcess[str], float]:
    return _timed(["findscu", "-v", "-S", "-aet", "VIEWER", "-aec", "PAS", "-k",
                   "QueryRetrieveLevel=STUDY", "-k", "PatientID=A0*", "-k",
                   "StudyInstanceUID=", "127.0.0.1", str(pas.port)])


def _move(pas: PasProcess, study: str,
          timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    return _timed(["movescu", "-v", "-S", "-aet", "VIEWER", "-aec", "PAS", "-aem", "STORESCP",
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                   "127.0.0.1", str(pas.port)], timeout)


def _orm(control: str, patient: str) -> str:
    return "\r".join([
        f"MSH|^~\\&|RIS|HOSP|PAS|HOSP|20261123120000||ORM^O01|{control}|P|2.5",
        f"PID|1||{patient}^^^^MR", f"ORC|NW|{control}|||SC",
        f"OBR|1|{control}||CT^CT||||||||||||||ACC-{control}||||||CT"])


def test_fetch_through_with_the_hub_black_holed_fails_fast_and_holds_no_one(wan: Wan) -> None:
    regional = _studies(REGIONAL)
    local = _studies(LOCAL)[0]
    wado = f"http://127.0.0.1:{wan.pas.http_port}/dicom-web/studies"
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    with wan.hole.down():
        moved: dict[str, Any] = {}
        viewer = threading.Thread(target=lambda: moved.update(zip(
            ("result", "seconds"), _move(wan.pas, regional[0]), strict=True)))
        viewer.start()
        # Meanwhile other viewers are served from the cache, on their own associations.
        wait_for(lambda: _viewers_connected(wan.pas) >= 1 or not viewer.is_alive(), 10,
                 what="the regional C-MOVE under way")
        found, seconds = _find(wan.pas)
        assert "Final Find Response (Success)" in found.stderr, found.stderr[-2000:]
        assert seconds < LOCAL_S, seconds
        for old in wan.scp.files():
            old.unlink()
        result, seconds = _move(wan.pas, local)
        assert "Final Move Response (Success)" in result.stderr, result.stderr[-2000:]
        assert seconds < LOCAL_S, seconds
        assert len(wan.scp.files()) == 3
        # WADO-RS of a study only the region holds: a clear 503, within the connect bound.
        started = time.monotonic()
        answer = httpx.get(f"{wado}/{regional[1]}", headers=accept, timeout=150)
        seconds = time.monotonic() - started
        assert answer.status_code == 503, (answer.status_code, answer.text[:300])
        assert "region could not provide it" in answer.json()["detail"]
        assert seconds < CONNECT_TIMEOUT_S + 5, seconds
        viewer.join(150)
    print(f"WADO-RS 503 after {seconds:.1f} s, C-MOVE 0xC000 after {moved['seconds']:.1f} s")
    # The C-MOVE failed within the connect bound (fetch_timeout_s is 120 s: it used to spend
    # it all on a TCP connect), with Unable to process, and the association was released,
    # not aborted for the time PAS spent on the region (dicom.network_timeout_s = 3 here).
    stderr = moved["result"].stderr
    assert "Failed: UnableToProcess" in stderr, stderr[-2000:]
    assert "Peer aborted" not in stderr and "Release Failed" not in stderr, stderr[-2000:]
    assert moved["seconds"] < CONNECT_TIMEOUT_S + 5, moved["seconds"]
    log = wan.pas.log()
    assert "region unavailable" in log and "ConnectTimeout" in log
    assert "network timeout reached" not in log
    assert wan.instances(REGIONAL) == 0


def test_black_holed_hub_local_work_status_and_orders_answer_at_once(wan: Wan,
                                                                     tmp_path: Path) -> None:
    local = _studies(LOCAL)[0]
    base = f"http://127.0.0.1:{wan.pas.http_port}"
    with wan.hole.down():
        went_down = time.monotonic()
        found, seconds = _find(wan.pas)
        assert "Final Find Response (Success)" in found.stderr and seconds < LOCAL_S
        got = tmp_path / "get"
        got.mkdir()
        result, seconds = _timed(["getscu", "-S", "-aet", "VIEWER", "-aec", "PAS", "-od",
                                  str(got), "-k", "QueryRetrieveLevel=STUDY", "-k",
                                  f"StudyInstanceUID={local}", "127.0.0.1", str(wan.pas.port)])
        assert result.returncode == 0 and len(list(got.iterdir())) == 3, result.stderr[-2000:]
        assert seconds < LOCAL_S, seconds
        for url, check in ((f"{base}/dicom-web/studies?PatientID={LOCAL}",
                            lambda r: len(r.json()) == 2),
                           (f"{base}/dicom-web/studies/{local}",
                            lambda r: r.content.count(b"Content-Type: application/dicom") == 3),
                           (f"{base}/healthz", lambda r: r.json() == {"status": "ok"})):
            started = time.monotonic()
            answer = httpx.get(url, timeout=60, headers={
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
                if "/studies/" in url else None)
            assert answer.status_code == 200 and check(answer), url
            assert time.monotonic() - started < LOCAL_S, url
        # An order while the region is out of reach: ACKed at once, fetched later.
        started = time.monotonic()
        with MLLPClient("127.0.0.1", int(wan.pas.env["PAS_HL7__PORT"])) as mllp:
            ack = mllp.send_message(_orm("BH1", REGIONAL)).decode()
        assert "MSA|AA|BH1" in ack and time.monotonic() - started < LOCAL_S, ack
        # `pas doctor` waits out its 10 s hub timeout: run meanwhile (it reads nothing the
        # daemon writes), after the answers timed against LOCAL_S, and checked below.
        doctored: dict[str, Any] = {}

        def doctor() -> None:
            began = time.monotonic()
            doctored["result"] = wan.pas.cli("doctor", "--json", check=False)
            doctored["seconds"] = time.monotonic() - began

        doctor_thread = threading.Thread(target=doctor, daemon=True)
        doctor_thread.start()
        # `pas status` (another process, reading the store) says the hub is down: the
        # heartbeat (every 1 s here, 10 s connect bound) records it. It said "up" for as long
        # as the outage lasted when nothing was being uploaded.
        link = wait_for(lambda: (h := wan.pas.status()["links"]["hub"])["state"] == "down"
                        and h, 30, interval=0.5, what="pas status saying the hub is down")
        assert "unreachable" in link["last_error"], link
        print(f"hub seen down after {time.monotonic() - went_down:.1f} s")
        for path, pattern in (("/", r'class="state down">down: hub unreachable'),
                              ("/metrics", r'pas_hub_link_up 0\.0'),
                              ("/metrics", r'pas_destination_link_up\{destination="hub"\} 0\.0')):
            started = time.monotonic()
            text = httpx.get(base + path, timeout=60).text
            assert time.monotonic() - started < LOCAL_S
            assert re.search(pattern, text), (path, pattern)
        doctor_thread.join(150)
        assert "result" in doctored, "pas doctor did not end"
        diagnosed = doctored["result"]
        hub = [c for c in json.loads(diagnosed.stdout) if c["name"] == "hub"]
        assert diagnosed.returncode == 1 and hub and hub[0]["verdict"] == "fail", \
            diagnosed.stdout
        assert "no answer from" in hub[0]["detail"] and "unreachable" in hub[0]["detail"]
        assert doctored["seconds"] < 30
        # The order is tried again and again, more often than prefetch.max_attempts (2 here):
        # it waits for the link, never failed, and says what cut it (it used to say "the
        # hub's priors answer ended without a word of this patient": no answer came).
        def order() -> dict[str, Any]:
            return [q for q in prefetch_requests(wan.pas) if q["dedup_key"].endswith("|BH1")][0]

        tried = f"prefetch {order()['id']} for {REGIONAL}: "
        wait_for(lambda: wan.pas.log().count(tried) >= 3 or order()["state"] == "failed", 60,
                 interval=0.2, what="the order tried three times")
        request = order()
        assert request["state"] in ("pending", "running"), request
        assert request["last_error"].startswith("waiting for the link: "), request
        assert "without a word" not in request["last_error"], request["last_error"]
        assert "Timeout" in request["last_error"], request["last_error"]
    # The link is back: the priors come, byte for byte the region's files.
    wait_for(lambda: [q for q in prefetch_requests(wan.pas)
                      if q["dedup_key"].endswith("|BH1") and q["state"] == "fetched"], 60,
             interval=0.2, what="the order's priors fetched once the link is back")
    region = {hashlib.sha256(wan.region.instance_file(i)).hexdigest()
              for i in wan.region.instances()}
    held = {r["sha256"] for r in read_rows(
        wan.db, "SELECT i.sha256 FROM instances i JOIN studies s ON s.id = i.study_fk "
                "WHERE s.study_uid IN (?, ?)", tuple(_studies(REGIONAL)))}
    assert len(held) == 6 and held <= region
    wait_for(lambda: wan.pas.status()["links"]["hub"]["state"] == "up", 30,
             what="pas status saying the hub is up again")


def test_uploads_wait_out_the_black_hole_then_go_once_and_a_cut_put_resumes(
        wan: Wan, tmp_path: Path) -> None:
    hub_db = wan.hub.home / "hub.sqlite"

    def metric(name: str, text: str | None = None) -> float:
        found = re.search(rf"^{name} (\S+)", text or wan.metrics(), re.M)
        return float(found.group(1)) if found else 0.0

    put_before = metric("pas_upload_put_bytes_total")
    first, late = _by_study(RECEIVED)  # one study sent before the black hole, one during
    storescu(first, wan.pas.port)
    wait_for(lambda: metric("pas_upload_inflight_bytes") > 0, 30, interval=0.02,
             what="a PUT under way")
    # The hub frozen while the link is cut: a PUT under way cannot end in between (it did
    # once, under load: the cut landed after the study's last PUT, and nothing was cut).
    with wan.hub.frozen():
        scrape = wait_for(
            lambda: metric("pas_upload_inflight_bytes", t := wan.metrics()) > 0 and t,
            10, interval=0.02, what="a PUT under way with the hub frozen")
        put_at_cut = metric("pas_upload_put_bytes_total", scrape)
        wan.hole.on()
    with wan.hole.down():  # already down: lifted at the block's end, also on failure
        # Received while the hub is out of reach: acknowledged at once, then queued.
        started = time.monotonic()
        storescu(late, wan.pas.port)
        assert time.monotonic() - started < LOCAL_S
        assert wan.instances(RECEIVED) == 6
        # The uplink tries again and again while black-holed: more often than
        # queue.max_attempts (2 here: an outage longer than the attempts' backoff, ~45 min
        # with the defaults), and the jobs still wait for the link, none failed.
        def jobs() -> list[Any]:
            return read_rows(wan.db, "SELECT j.* FROM jobs j JOIN studies s ON "
                             "s.id = j.study_fk WHERE s.study_uid IN (?, ?)",
                             tuple(_studies(RECEIVED)))

        def tries(job_id: int) -> int:
            return len(re.findall(rf"job {job_id} to hub(:| attempt)", wan.pas.log()))

        wait_for(lambda: len(j := jobs()) == 2 and (min(tries(r["id"]) for r in j) >= 3
                                                     or "failed" in {r["state"] for r in j}),
                 60, interval=0.2, what="both studies' uploads tried three times")
        for job in jobs():
            assert job["state"] in ("pending", "running"), dict(job)
        assert wan.unconfirmed() == 6
        waited = [j for j in jobs() if j["state"] == "pending"]
        assert all(j["last_error"].startswith("waiting for the link: ") for j in waited)
        put_in_hole = metric("pas_upload_put_bytes_total") - put_at_cut
    # Back: the heartbeat's first success makes them due (not at their backoff's end).
    wait_for(lambda: wan.unconfirmed() == 0, 30, interval=0.2,
             what="everything confirmed once the link is back")
    # Exactly once at the hub: one transfer per study, each bucket stored once, committed.
    studies = _studies(RECEIVED)
    new = read_rows(hub_db, "SELECT * FROM transfers WHERE study_uid IN (?, ?)", tuple(studies))
    assert sorted(t["study_uid"] for t in new) == studies
    for transfer in new:
        assert transfer["committed_at"] is not None
        # Its bucket rows went with the commit (hub schema 13); its counters stay.
        assert not read_rows(hub_db, "SELECT 1 FROM buckets WHERE transfer_id = ?",
                             (transfer["id"],))
    stored = sum(t["bytes_stored"] for t in new)
    # Bucket bytes handed to the network and not stored: what the PUTs under way at the cut
    # (hub.parallel_buckets, 4) had handed before it, and what the tries handed into the
    # dead link; each bucket was then sent again whole (a bucket is the unit of resume).
    resent = metric("pas_upload_put_bytes_total") - put_before - stored
    # A sealed bucket is at most the original bytes the appliance cuts one to (its bucket
    # sizes, saved with each transfer) plus its packing and seal: a few kB.
    biggest = max(max(size or 0 for size in json.loads(j["progress"])["bucket_sizes"])
                  for j in jobs()) + 64 * 1024
    print(f"resent {resent:.0f} bytes ({put_in_hole:.0f} handed into the black hole), "
          f"biggest bucket {biggest}")
    # None at all is right too: a bucket whose bytes were all in the hub's socket buffer at
    # the cut is stored by the hub once it runs again, and the resume (the hub lists what it
    # holds) does not send it again (seen in CI: 0 resent, 0 handed into the hole).
    assert 0 <= resent <= put_in_hole + 4 * biggest, (resent, put_in_hole, biggest)
    # The hub checked every file against PAS's SHA-256 (what the modality's C-STOREs
    # carried, as PAS filed them), and the region holds each instance once with that dataset.
    kept = read_rows(wan.db, "SELECT i.sop_instance_uid, i.sha256, i.path FROM instances i "
                             "JOIN studies s ON s.id = i.study_fk WHERE s.study_uid IN (?, ?)",
                     tuple(studies))
    archived = {(i["sop_instance_uid"], i["sha256"]) for t in new
                for i in json.loads(t["receipt"])["instances"]}  # what each receipt names
    assert archived == {(r["sop_instance_uid"], r["sha256"]) for r in kept}
    originals = {_dataset_sha((wan.home / "spool" / r["path"]).read_bytes(),
                              tmp_path / "o.dcm") for r in kept}
    in_region = []
    for study in _studies(RECEIVED):
        orthanc_id = httpx.post(f"{wan.region.url}/tools/lookup", content=study,
                                timeout=10).json()[0]["ID"]
        for instance in wan.region.get(f"/studies/{orthanc_id}/instances").json():
            in_region.append(_dataset_sha(wan.region.instance_file(instance["ID"]),
                                          tmp_path / "r.dcm"))
    assert len(in_region) == 6 and set(in_region) == originals


def test_stop_while_hub_calls_hang_ends_within_the_budget_and_loses_nothing(wan: Wan) -> None:
    # The daemon's own hub timeouts this time (60 s a read, 10 s a connect, 4 retries).
    wan.pas.stop()
    env = {k: v for k, v in wan.env.items() if not k.startswith("PAS_HUB__")}
    wan.pas = PasProcess(wan.home, env).start()
    wan.hole.on()
    try:
        storescu(_files(LATE), wan.pas.port)  # acknowledged: its upload hangs on the hole
        wait_for(lambda: "sending" in wan.pas.log().split("PAS ready")[-1], 30,
                 what="an upload under way")
        viewer = subprocess.Popen(  # a fetch-through hanging on a connect to the hub
            ["movescu", "-S", "-aet", "VIEWER", "-aec", "PAS", "-aem", "STORESCP", "-k",
             "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.4.5.6.7.8",
             "127.0.0.1", str(wan.pas.port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        wait_for(lambda: _viewers_connected(wan.pas) >= 1, 10, what="the viewer's C-MOVE")
        assert wan.pas.proc is not None
        started = time.monotonic()
        wan.pas.proc.send_signal(signal.SIGTERM)
        try:
            wan.pas.proc.wait(STOP_BUDGET_S + 10)
        except subprocess.TimeoutExpired:
            wan.pas.kill()
            pytest.fail(f"pas run still running {STOP_BUDGET_S + 10:.0f} s after SIGTERM "
                        "(systemd would kill it at TimeoutStopSec = 60 s)")
        finally:
            viewer.kill()
            viewer.wait()
        print(f"stopped {time.monotonic() - started:.1f} s after SIGTERM")
        assert wan.pas.proc.returncode == 0
        assert "PAS stopped" in wan.pas.log()
    finally:
        wan.hole.off()
    # Nothing lost: the study acknowledged before the stop goes up once the daemon is back.
    wan.pas = PasProcess(wan.home, env).start()
    wait_for(lambda: wan.unconfirmed() == 0 and wan.instances(LATE) == 6, 60, interval=0.2,
             what="the late study confirmed after the restart")
    hub_db = wan.hub.home / "hub.sqlite"
    for study in _studies(LATE):
        transfers = read_rows(hub_db, "SELECT id FROM transfers WHERE study_uid = ? "
                                      "AND committed_at IS NOT NULL", (study,))
        assert len(transfers) == 1, study

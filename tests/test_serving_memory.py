"""DICOMweb over a large object costs bounded memory (invariant 8), and what is served or kept
is still the bytes stored or sent.

Found in review (2026-12-03), peak RSS of `pas run` for one 300 MB multi-frame instance
(300 frames of 1 MB): STOW-RS of it +612 MB (the part held, then copied); its /bulkdata
+1,190 MB; /frames/1 +300 MB; /rendered +624 MB; /metadata +300 MB (get_item read the
deferred Pixel Data). The bytes now go to a spill file as they arrive (STOW-RS), or are read
from where they lie in the file (bulk data, frames), one frame decoded for a rendering.

C-GET of it (getscu +B, measured 2026-12): +12 to +171 MB per run and the baseline creeping
up 105 -> 193 MB: pynetdicom read the file into 16 kB P-DATA primitives faster than the viewer
took them and queued them all for the DUL (8,000 queued seen); a viewer that paused held the
whole object. The C-STOREs of a C-GET now go straight to the socket, as C-MOVE's do.

C-FIND of 100,000 studies to a findscu reading more slowly than PAS answers (measured 2026-12):
+68 MB, ~0.7 kB per answer: pynetdicom queued every Pending C-FIND-RSP for the DUL as fast as
the handler yielded them. The handler now waits while more than a few dozen are queued.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
)

from appliance.ingest.receive import Receiver
from appliance.store.db import Database
from appliance.store.spool import Spool
from bench.qr import MODALITIES, synthesize
from tests.support.answer_files import text, top_level_values
from tests.support.objects import tiny_ct
from tests.support.peers import DCMTK_ENV, PasProcess, read_rows, storescu, wait_for
from tests.test_ingest_spill import _big_secondary_capture, _sha256, peak_rss_mb

MEGABYTES = 300
STUDY_INSTANCE_UID = 0x0020000D


def _reset_peak(pid: int) -> None:
    """VmHWM back to the current RSS (proc(5), clear_refs 5): one peak per operation."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _growth(pas: PasProcess, operation) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    assert pas.proc is not None
    _reset_peak(pas.proc.pid)
    before = peak_rss_mb(pas.proc.pid)
    result = operation()
    return peak_rss_mb(pas.proc.pid) - before, result


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            yield chunk


def _single_part(url: str) -> tuple[int, str, int]:
    """(status, SHA-256, size) of the one part of a multipart answer, read as it streams."""
    digest, size = hashlib.sha256(), 0
    with httpx.stream("GET", url, timeout=120) as response:
        if response.status_code != 200:
            return response.status_code, "", 0
        boundary = response.headers["content-type"].split("boundary=")[1].strip('"')
        closing = len(f"\r\n--{boundary}--\r\n")
        pending, started = b"", False
        for chunk in response.iter_bytes(1 << 20):
            pending += chunk
            if not started and b"\r\n\r\n" in pending:
                pending, started = pending[pending.index(b"\r\n\r\n") + 4:], True
            if started and len(pending) > closing:
                digest.update(pending[:-closing])
                size += len(pending) - closing
                pending = pending[-closing:]
        assert pending == f"\r\n--{boundary}--\r\n".encode(), pending[-80:]
    return 200, digest.hexdigest(), size


def _pixel_data_sha(path: Path, megabytes: int) -> str:
    """SHA-256 of the Pixel Data value: the file's last ``megabytes`` MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(-(megabytes << 20), 2)
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _frame(path: Path, number: int, megabytes: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(-(megabytes << 20) + ((number - 1) << 20), 2)
        return handle.read(1 << 20)


def test_stow_rs_of_a_300_mb_part_goes_to_disk_as_it_arrives(tmp_path: Path) -> None:
    big = _big_secondary_capture(tmp_path / "big.dcm", MEGABYTES)
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__SPILL_ABOVE_MB": "32"}).start()
    try:
        boundary = "pas-memory-test"

        def body() -> Iterator[bytes]:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            yield from _file_chunks(big)
            yield f"\r\n--{boundary}--\r\n".encode()

        growth, response = _growth(pas, lambda: httpx.post(
            f"http://127.0.0.1:{pas.http_port}/dicom-web/studies", content=body(),
            headers={"content-type": f'multipart/related; type="application/dicom"; '
                                     f'boundary={boundary}'}, timeout=120))
        print(f"STOW-RS of {MEGABYTES} MB: peak RSS +{growth:.0f} MB")
        assert response.status_code == 200, response.text  # type: ignore[attr-defined]
        assert growth < 100, growth  # the 32 MB threshold and a copy; not 300 MB (was +612)
        (stored,) = list((pas.home / "spool").rglob("??/*.dcm"))
        assert _sha256(stored) == _sha256(big) == stored.stem  # the part, byte for byte
        assert pas.status()["instances"] == 1
        assert not [p for p in (pas.home / "spool" / "tmp").glob("*") if p.stat().st_size]

        # A cut body: nothing stored, and its spill file does not stay behind.
        def cut() -> Iterator[bytes]:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            for n, chunk in enumerate(_file_chunks(big)):
                if n == 64:
                    return
                yield chunk

        answer = httpx.post(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies",
                            content=cut(), timeout=120, headers={
                                "content-type": f"multipart/related; boundary={boundary}"})
        assert answer.status_code == 400, answer.text
        assert pas.status()["instances"] == 1
        assert not [p for p in (pas.home / "spool" / "tmp").glob("*") if p.stat().st_size]
    finally:
        pas.stop()


def test_bulkdata_frames_rendered_metadata_of_a_300_mb_instance(tmp_path: Path) -> None:
    big = _big_secondary_capture(tmp_path / "big.dcm", MEGABYTES)
    header = dcmread(big, stop_before_pixels=True)
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        storescu([big], pas.port)
        base = (f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/"
                f"{header.StudyInstanceUID}/series/{header.SeriesInstanceUID}/instances/"
                f"{header.SOPInstanceUID}")
        growths: dict[str, float] = {}
        bound = 64  # a frame or two, and the rendering's arrays; not 300 MB

        def check(name: str) -> None:
            assert growths[name] < bound, growths

        growths["bulkdata"], (status, sha, size) = _growth(  # type: ignore[misc]
            pas, lambda: _single_part(base + "/bulkdata/7FE00010"))
        check("bulkdata")  # was +1,190 MB
        assert (status, size) == (200, MEGABYTES << 20)
        assert sha == _pixel_data_sha(big, MEGABYTES)

        growths["frames"], answer = _growth(pas, lambda: httpx.get(
            base + "/frames/2,300", timeout=60))
        check("frames")  # was +300 MB
        assert answer.status_code == 200  # type: ignore[attr-defined]
        for number in (2, 300):
            assert _frame(big, number, MEGABYTES) in answer.content  # type: ignore[attr-defined]

        growths["rendered"], answer = _growth(pas, lambda: httpx.get(
            base + "/frames/150/rendered", headers={"accept": "image/png"}, timeout=60))
        check("rendered")  # was +624 MB
        # /frames/{n}/rendered answered 500 whatever the object: the audit joined the frame
        # number, an int, into its target text.
        assert answer.status_code == 200, answer.text  # type: ignore[attr-defined]
        frame = np.frombuffer(_frame(big, 150, MEGABYTES), dtype=np.uint8)
        rendered = np.asarray(Image.open(BytesIO(answer.content)))  # type: ignore[attr-defined]
        low, high = int(frame.min()), int(frame.max())
        expected = ((frame.astype(np.float64) - low) / (high - low) * 255.0).astype(np.uint8)
        assert np.array_equal(rendered.reshape(-1), expected)

        growths["metadata"], answer = _growth(pas, lambda: httpx.get(
            base + "/metadata", timeout=60))
        check("metadata")  # was +300 MB
        assert answer.status_code == 200  # type: ignore[attr-defined]
        (item,) = answer.json()  # type: ignore[attr-defined]
        assert item["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")

        print(f"peak RSS growth for a {MEGABYTES} MB instance: {growths}")
    finally:
        pas.stop()


def _pause_viewer(viewer: subprocess.Popen[str], out: Path, seconds: float,
                  still_receiving: bool = False) -> tuple[int, str]:
    """Stop a DCMTK viewer for ``seconds`` once its first answer is written to ``out`` (a
    viewer that reads more slowly than PAS sends), then let it finish: its exit code and
    stderr. ``still_receiving``: the viewer must not have finished before the pause."""
    try:
        wait_for(lambda: any(out.iterdir()) or viewer.poll() is not None, 30,
                 interval=0.002, what=f"{viewer.args[0]} receiving")
        if still_receiving:
            assert viewer.poll() is None, viewer.communicate()[1][-2000:]
        os.kill(viewer.pid, signal.SIGSTOP)
        time.sleep(seconds)  # the pause itself is what is measured, not a wait for a state
        os.kill(viewer.pid, signal.SIGCONT)
        _, errors = viewer.communicate(timeout=120)
    finally:
        if viewer.poll() is None:
            viewer.kill()
            viewer.wait()
    return viewer.returncode, errors


def test_c_get_of_a_300_mb_instance_to_a_viewer_that_pauses(tmp_path: Path) -> None:
    """The viewer (getscu, writing as it receives: +B) is stopped for 2 s as the C-STORE
    starts: PAS waits for its socket instead of reading the rest of the file into memory
    (was +300 MB and more: the whole object queued for pynetdicom's DUL thread)."""
    big = _big_secondary_capture(tmp_path / "big.dcm", MEGABYTES)
    header = dcmread(big, stop_before_pixels=True)
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        storescu([big], pas.port)
        out = tmp_path / "get"
        out.mkdir()

        def get() -> tuple[int, str]:
            viewer = subprocess.Popen(
                ["getscu", "-aet", "VIEWER", "-aec", "PAS", "-S", "+B", "-od", str(out),
                 "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={header.StudyInstanceUID}",
                 "127.0.0.1", str(pas.port)],
                env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            return _pause_viewer(viewer, out, 2)

        growth, (code, errors) = _growth(pas, get)  # type: ignore[misc]
        print(f"C-GET of {MEGABYTES} MB, viewer paused 2 s: peak RSS +{growth:.0f} MB")
        assert code == 0, errors[-2000:]
        (received,) = [p for p in out.rglob("*") if p.is_file()]
        # What getscu wrote is the stored dataset, byte for byte.
        assert _sha256(received, dataset_only=True) == _sha256(big, dataset_only=True)
        assert growth < 32, growth  # a fragment in flight; not the object
    finally:
        pas.stop()


STUDIES = 25_000


def test_c_find_of_25000_studies_to_a_viewer_that_pauses(tmp_path: Path) -> None:
    """findscu (each answer written as it arrives: -X) is stopped for 3 s once the answers
    flow: PAS waits for it instead of queueing the rest of the matches for pynetdicom's DUL
    (was +19.8 MB for 40,000, +68 MB for 100,000), and every match still arrives. 25,000
    (was 40,000: 90 s of the suite's budget, PAS answering ~1.5 ms per match here)."""
    home = tmp_path / "pas"
    home.mkdir()
    synthesize(home, STUDIES)
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        out = tmp_path / "find"
        out.mkdir()

        def findscu(*keys: str) -> subprocess.Popen[str]:
            return subprocess.Popen(
                ["findscu", "-S", "-aet", "VIEWER", "-aec", "PAS", "-X", "-od", str(out),
                 "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                 "-k", "PatientID", "-k", "AccessionNumber", "-k", "ModalitiesInStudy",
                 *[arg for key in keys for arg in ("-k", key)], "127.0.0.1", str(pas.port)],
                env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        # A first C-FIND pays once for what any query costs (modules, the thread's database
        # connection, its page cache filled by a scan of every study; no match): not what is
        # measured here.
        warm_up = findscu("ModalitiesInStudy=XA")
        assert warm_up.wait(30) == 0, warm_up.communicate()[1]
        for path in out.iterdir():
            path.unlink()

        def find() -> tuple[int, str]:
            return _pause_viewer(findscu(), out, 3, still_receiving=True)

        growth, (code, errors) = _growth(pas, find)  # type: ignore[misc]
        print(f"C-FIND of {STUDIES} studies, viewer paused 3 s: peak RSS +{growth:.1f} MB")
        assert code == 0, errors[-2000:]
        answers = list(out.glob("rsp*.dcm"))
        assert len(answers) == STUDIES + 1  # and the real CT synthesize() filed first
        # Every study once, with what was synthesized for it. Each answer's element headers
        # walked for its Study Instance UID (dcmread of the 25,001 took 11 s on CI), three
        # read whole by pydicom.
        by_uid = {text(top_level_values(p)[STUDY_INSTANCE_UID]): p for p in answers}
        assert len(by_uid) == STUDIES + 1
        assert {f"2.25.1{n:09d}.1" for n in range(STUDIES)} <= set(by_uid)
        for n in (0, STUDIES // 2, STUDIES - 1):
            ds = dcmread(by_uid[f"2.25.1{n:09d}.1"])
            assert ds.StudyInstanceUID == f"2.25.1{n:09d}.1"
            assert ds.AccessionNumber == f"ACC{n:08d}"
            assert ds.PatientID.startswith("P") and ds.ModalitiesInStudy in MODALITIES
        # A few dozen answers in flight and the query's own buffers (+3.5 MB for 40,000,
        # measured); not every match pynetdicom had queued (+19.8 MB before).
        assert growth < 8, growth
    finally:
        pas.stop()


RETRIEVED = 65_000  # the final response's counts are US: at most 65,535 sub-operations


# The daemon of a home _study_of_many_instances made runs without its scrub: the scrub
# re-hashes the spool row by row, and there every row names one small file, which its rate
# in MB/s does not slow down. It took the GIL from what is measured (a QIDO-RS page of 1,000
# instances answered in 0.37 s beside it, 0.15 s without); a real spool's rows each name
# their own file.
NO_SCRUB = {"PAS_CACHE__SCRUB_MB_PER_S": "0"}


def _study_of_many_instances(home: Path, count: int) -> tuple[str, str]:
    """A PAS home whose index holds one study of ``count`` instances: one real tiny CT
    filed by PAS's receive path (in this process, as bench/qr.py's synthesize files its real
    CT: a daemon started and stopped for one storescu cost ~1.5 s of each of six tests),
    then its index row copied under new SOP Instance UIDs (the same file: only the index
    matters before the first C-STORE), by one INSERT ... SELECT over a counter in SQL: an
    executemany of ``count`` statements took 4.3 s for 50,000 (0.8 s so). (study UID, the
    real SOP UID)."""
    ds = tiny_ct()
    ds.save_as(home / "one.dcm", enforce_file_format=True)
    db = Database(home / "pas.sqlite")
    try:
        Receiver(db, Spool(home / "spool")).receive_file((home / "one.dcm").read_bytes(),
                                                          calling_ae="STORESCU")
    finally:
        db.close()
    prefix = generate_uid()[:40]
    with sqlite3.connect(home / "pas.sqlite") as conn:
        columns = ("series_fk, study_fk, sop_class_uid, transfer_syntax_uid, instance_number, "
                   "path, size, sha256, received_at")
        conn.execute(
            "WITH RECURSIVE copies (n) AS (SELECT 0 WHERE ? > 0 UNION ALL "
            "SELECT n + 1 FROM copies WHERE n + 1 < ?) "
            f"INSERT INTO instances (sop_instance_uid, {columns}, routed_at, confirmed_at) "
            f"SELECT ? || '.' || copies.n, {columns}, received_at, received_at "
            "FROM copies, instances WHERE sop_instance_uid = ? ORDER BY copies.n",
            (count, count, prefix, str(ds.SOPInstanceUID)))
        conn.execute("UPDATE instances SET routed_at = received_at WHERE routed_at IS NULL")
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def _cancelled_get(pas: PasProcess, level: str, key: str, uid: str) -> Any:
    """The final C-GET-RSP of a C-GET (pynetdicom as the viewer) that it cancels as soon
    as its first image arrives."""
    ae = AE(ae_title="VIEWER")
    # What is measured is memory, not time: a fetch-through listing 50,001 instances from
    # the region took over pynetdicom's default 30 s on a loaded CI machine (final: an empty
    # Dataset after "DIMSE timeout reached").
    ae.dimse_timeout = 180
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    held: list[Any] = []

    def on_store(event: Any) -> int:
        if not held[1:]:
            held.append(True)
            held[0].send_c_cancel(11, context_id=1)
        return 0x0000

    assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    held.append(assoc)
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        setattr(identifier, key, uid)
        return [s for s, _ in assoc.send_c_get(
            identifier, StudyRootQueryRetrieveInformationModelGet, msg_id=11)][-1]
    finally:
        assoc.release()


def _study_get_growth(pas: PasProcess, study: str, real: str) -> tuple[float, Any]:
    """Peak RSS growth of ``pas`` for a study-level C-GET cancelled at its first image, after
    a warm-up (modules, the association thread's database connection) of one image; and
    the final C-GET-RSP."""
    assert _cancelled_get(pas, "IMAGE", "SOPInstanceUID", real).Status == 0x0000
    growth, final = _growth(pas, lambda: _cancelled_get(pas, "STUDY", "StudyInstanceUID",
                                                        study))
    return growth, final


def test_c_get_of_a_study_of_65000_instances_does_not_hold_its_rows(tmp_path: Path) -> None:
    """A retrieve held every instance's index row (about 1.2 kB in Python) from its start
    to its end: a C-GET or C-MOVE of 65,000 instances took +78 MB before its first
    C-STORE. It now holds their row ids (8 bytes each) and reads each row as it is sent.
    pynetdicom as the viewer, which cancels once the first image has arrived."""
    home = tmp_path / "pas"
    home.mkdir()
    study, real = _study_of_many_instances(home, RETRIEVED)
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true", **NO_SCRUB}).start()
    try:
        def get(level: str, key: str, uid: str) -> tuple[int, int, int]:
            """(final status, completed, remaining) of a C-GET cancelled at its first image."""
            final = _cancelled_get(pas, level, key, uid)
            return (int(final.Status), int(final.get("NumberOfCompletedSuboperations", -1)),
                    int(final.get("NumberOfRemainingSuboperations") or 0))

        # Warm-up (modules, the association thread's database connection): one image.
        assert get("IMAGE", "SOPInstanceUID", real)[:2] == (0x0000, 1)
        growth, (status, completed, remaining) = _growth(  # type: ignore[misc]
            pas, lambda: get("STUDY", "StudyInstanceUID", study))
        print(f"C-GET of {RETRIEVED + 1} instances, cancelled at the first: "
              f"peak RSS +{growth:.1f} MB")
        assert status == 0xFE00 and completed >= 1
        assert completed + remaining == RETRIEVED + 1
        assert growth < 15, growth  # the ids: 0.5 MB; the rows were +78 MB
    finally:
        pas.stop()


def test_c_get_of_more_than_65535_instances_is_refused_naming_why(tmp_path: Path) -> None:
    """A C-MOVE/C-GET response counts its sub-operations in US fields: pynetdicom refuses a
    retrieve of more than 65,535 instances (0xC416, no comment), and the audit row said
    "failure: C-GET did not complete (association lost)". PAS refuses it first, the row
    naming the count and what to do; the daemon keeps serving (the one real image)."""
    home = tmp_path / "pas"
    home.mkdir()
    study, real = _study_of_many_instances(home, 65535)
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true", **NO_SCRUB}).start()
    try:
        final = _cancelled_get(pas, "STUDY", "StudyInstanceUID", study)
        assert 0xC000 <= int(final.Status) <= 0xCFFF, hex(final.Status)
        # The viewer is told why too (Error Comment, LO: 64 characters).
        assert final.ErrorComment == ("65536 instances match, more than the 65535 "
                                      "sub-operations a C...")
        rows = read_rows(home / "pas.sqlite",
                         "SELECT outcome FROM audit WHERE event = 'retrieve' ORDER BY id")
        assert rows[-1]["outcome"] == (
            "failure: 65536 instances match, more than the 65535 sub-operations a "
            "C-MOVE/C-GET response can count (US); retrieve the series one by one")
        final = _cancelled_get(pas, "IMAGE", "SOPInstanceUID", real)
        assert (int(final.Status), int(final.NumberOfCompletedSuboperations)) == (0x0000, 1)
    finally:
        pas.stop()

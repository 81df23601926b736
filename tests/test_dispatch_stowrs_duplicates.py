"""Destination kind ``stowrs`` against an archive that refuses duplicates (409, FailureReason
45070 = 0xB00E, as Microsoft's DICOM service documents; Google's answers 409 too): a refusal
as "held already" is checked by reading the instance back, never taken as final on its own.

Found in review (s39): PAS POSTed a batch, the archive stored it, and the answer was lost (a
cut link, a proxy timeout; or a kill -9 between the archive storing and ``mark_sent``). The
re-POST met "45070" for every instance and the job failed for good ("archive refused 2
instances ... (0xB00E)"), its instances never marked sent although the archive held them
bit-exact. The existing kill -9 test passes only because Orthanc accepts duplicates. Here the
archive is a small real HTTP server answering as Azure documents
(tests/support/refusing_archive.py), and PAS is the real daemon fed by storescu.

One daemon, three studies, one per outcome (each its own job):
- A: the answer to its POST lost; the re-POST refused as duplicates; read back with PAS's
  SHA-256: done in one attempt, every instance sent.
- B: one UID held already with other bytes: failed for good, ``last_error`` naming the UID and
  both SHA-256; the other instances sent.
- C: as A, and the archive answers the first read-back 503: retried, then done.
"""

from __future__ import annotations

import hashlib
import io
import textwrap
from pathlib import Path

from pydicom import dcmread

from appliance.dispatch.target_types.stowrs import PartDigests
from tests.support.configs import quick_retries
from tests.support.peers import CT_DIR, read_rows, storescu, wait_for
from tests.support.refusing_archive import RefusingArchive

LOST = sorted(CT_DIR.glob("A002304_*_19001231-*.dcm"))
OTHER = sorted(CT_DIR.glob("A002304_*_19010112-*.dcm"))
FLAKY = sorted(CT_DIR.glob("A027284_*_19000925-*.dcm"))


def _uid(path: Path, tag: str = "SOPInstanceUID") -> str:
    return str(getattr(dcmread(path, stop_before_pixels=True), tag))


def _jobs(home: Path) -> dict[str, dict]:
    """{study UID: its job, with ``unsent`` instances}."""
    rows = read_rows(home / "pas.sqlite", """
        SELECT j.id, j.state, j.attempts, j.last_error, s.study_uid,
               (SELECT count(*) FROM job_instances ji
                WHERE ji.job_id = j.id AND ji.sent_at IS NULL) AS unsent
        FROM jobs j JOIN studies s ON s.id = j.study_fk""")
    return {r["study_uid"]: dict(r) for r in rows}


def test_a_refusal_as_held_already_is_read_back_before_the_job_is_judged(
        pas_factory, tmp_path: Path) -> None:
    """Before the fix: A and C failed after one attempt with "(0xB00E)", none of their
    instances marked sent; B failed with "(0xB00E)" and no word of other bytes."""
    archive = RefusingArchive()
    try:
        archive.lose_answer_for = {_uid(LOST[0]), _uid(FLAKY[0])}
        archive.wado_failures[_uid(FLAKY[1])] = 1
        other = dcmread(OTHER[1])
        other.ImageComments = "another version, held by the archive"
        held = io.BytesIO()
        other.save_as(held, enforce_file_format=True)
        other_uid = archive.hold(held.getvalue())
        config = tmp_path / "appliance.toml"
        config.write_text(quick_retries(3) + textwrap.dedent(f"""
            [routing.fallback]
            destinations = ["archive"]

            [destinations.archive]
            kind = "stowrs"
            url = "{archive.url}"
            instances_per_request = 8
            timeout_s = 10
            """))
        pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
        storescu(LOST + OTHER + FLAKY, pas.port)
        studies = {name: _uid(paths[0], "StudyInstanceUID")
                   for name, paths in (("A", LOST), ("B", OTHER), ("C", FLAKY))}
        wait_for(lambda: len(_jobs(pas.home)) == 3 and all(
            j["state"] in ("done", "failed") for j in _jobs(pas.home).values()), 60,
            what="the three jobs over")
        jobs = {name: _jobs(pas.home)[uid] for name, uid in studies.items()}
        sha = {r["sop_instance_uid"]: r["sha256"] for r in read_rows(
            pas.home / "pas.sqlite", "SELECT sop_instance_uid, sha256 FROM instances")}

        lost = jobs["A"]
        assert (lost["state"], lost["attempts"], lost["unsent"]) == ("done", 1, 0), lost
        for path in LOST:
            assert hashlib.sha256(archive.held[_uid(path)][2]).hexdigest() == sha[_uid(path)]
            assert _uid(path) in archive.reads  # confirmed by its bytes, not by the refusal

        refused = jobs["B"]
        assert (refused["state"], refused["unsent"]) == ("failed", 1), refused
        error = refused["last_error"]
        assert other_uid in error and "with other bytes" in error and "0xB00E" in error, error
        assert hashlib.sha256(held.getvalue()).hexdigest() in error
        assert sha[other_uid] in error
        assert archive.held[other_uid][2] == held.getvalue()

        flaky = jobs["C"]
        assert (flaky["state"], flaky["attempts"], flaky["unsent"]) == ("done", 2, 0), flaky
        assert archive.reads.count(_uid(FLAKY[1])) == 2
    finally:
        archive.stop()


def test_the_read_back_is_hashed_as_it_streams_whatever_the_chunks() -> None:
    """The read-back's multipart reader: one part's SHA-256 across chunks that cut the
    delimiter anywhere (a byte at a time), a preamble and part headers skipped."""
    data = bytes(range(256)) * 40 + b"\r\n-" + b"\r\n--"  # a delimiter's start, twice
    body = (b"preamble\r\n--b\r\nContent-Type: application/dicom\r\n\r\n" + data
            + b"\r\n--b--\r\n")
    for size in (1, 7, len(body)):
        parts = PartDigests(b"b")
        for start in range(0, len(body), size):
            parts.feed(body[start:start + size])
        assert parts.digests == [hashlib.sha256(data).hexdigest()], size

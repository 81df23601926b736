"""The dicom destination against real DCMTK storescp peers: stored bytes when the peer accepts
the stored transfer syntax, a little endian re-encoding (same instance, same pixels) when it
does not, and a clear permanent error when it accepts no context for a SOP class."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import numpy
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from appliance.dispatch.target_types.dicom import plan_associations
from appliance.store.spool import Spool
from appliance.store.transcode import transcoded
from tests.support.configs import everything_to, quick_retries
from tests.support.peers import StoreSCP, storescu, wait_for
from tests.test_ingest import dataset_part, index_rows, sop_uid
from tests.test_routing import CT_PATIENT, jobs_of

MR_BIG_ENDIAN = Path(get_testdata_file("MR_small_bigendian.dcm"))  # Explicit VR Big Endian
CT_IMAGE, MR_IMAGE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


def write_config(path: Path, scp: StoreSCP) -> Path:
    """Everything goes to the peer (fallback route); a failed job is retried once."""
    return everything_to(path, scp, timeout_s=10, before=quick_retries(2))


def send_ct_and_big_endian_mr(pas_factory, scp: StoreSCP, tmp_path: Path):  # type: ignore[no-untyped-def]
    pas = pas_factory({"PAS_CONFIG": str(write_config(tmp_path / "appliance.toml", scp)),
                       "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    storescu(CT_PATIENT, pas.port)
    storescu(MR_BIG_ENDIAN, pas.port, extra=["-xb"])  # kept big endian by PAS
    wait_for(lambda: len(jobs_of(pas.home)) == 2
             and all(j["state"] in ("done", "failed") for j in jobs_of(pas.home)), 60,
             what="both jobs finished")
    stored = {r["sop_instance_uid"]: r for r in index_rows(pas.home)}
    assert {r["transfer_syntax_uid"] for r in stored.values()} == {
        str(ExplicitVRLittleEndian), str(ExplicitVRBigEndian)}
    return pas, stored


def pixels(path: Path) -> numpy.ndarray:
    return dcmread(path).pixel_array


def test_implicit_only_peer_gets_explicit_le_ct_and_big_endian_mr(pas_factory,
                                                                  tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "implicit", ae_title="OLDPACS").start(["+xi"])
    try:
        pas, stored = send_ct_and_big_endian_mr(pas_factory, scp, tmp_path)
        assert [(j["state"], j["attempts"]) for j in jobs_of(pas.home)] == [("done", 1)] * 2
        received = {sop_uid(p): p for p in scp.files()}
        originals = {sop_uid(p): p for p in [*CT_PATIENT, MR_BIG_ENDIAN]}
        assert set(received) == set(originals) == set(stored)  # same SOP Instance UIDs
        for uid, path in received.items():
            ds = dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
            assert ds.SOPInstanceUID == uid
            assert numpy.array_equal(ds.pixel_array, pixels(originals[uid]))
    finally:
        scp.stop()


def test_a_peer_accepting_the_stored_syntax_gets_the_stored_bytes(pas_factory, storescp: StoreSCP,
                                                                  tmp_path: Path) -> None:
    pas, stored = send_ct_and_big_endian_mr(pas_factory, storescp, tmp_path)
    assert [j["state"] for j in jobs_of(pas.home)] == ["done", "done"]
    received = {sop_uid(p): p for p in storescp.files()}
    assert set(received) == set(stored)
    for uid, path in received.items():  # bit-exact, the big endian file included
        spool = pas.home / "spool" / stored[uid]["path"]
        assert (hashlib.sha256(dataset_part(path)).hexdigest()
                == hashlib.sha256(dataset_part(spool)).hexdigest())
        assert dcmread(path).file_meta.TransferSyntaxUID == stored[uid]["transfer_syntax_uid"]


def test_no_context_for_a_sop_class_fails_the_job_at_once_and_clearly(pas_factory,
                                                                       tmp_path: Path) -> None:
    """A CT-only peer: a CT+MR study delivers its CT then fails naming MR Image Storage; an
    MR-only study (every context refused, the association aborted) fails the same way, not
    as a network error retried."""
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(textwrap.dedent("""
        [[TransferSyntaxes]]
        [Uncompressed]
        TransferSyntax1 = LocalEndianExplicit
        TransferSyntax2 = LittleEndianImplicit
        [[PresentationContexts]]
        [CTOnly]
        PresentationContext1 = VerificationSOPClass\\Uncompressed
        PresentationContext2 = CTImageStorage\\Uncompressed
        [[Profiles]]
        [CT]
        PresentationContexts = CTOnly
        """))
    scp = StoreSCP(tmp_path / "ctonly", ae_title="CTONLY").start(["-xf", str(profile), "CT"])
    try:
        ct_study = dcmread(CT_PATIENT[0], stop_before_pixels=True)
        mixed = dcmread(MR_BIG_ENDIAN)  # an MR instance filed in the CT's study
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate"):
            setattr(mixed, keyword, ct_study.get(keyword, ""))
        mixed.SOPInstanceUID = mixed.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        mixed.save_as(tmp_path / "mixed-mr.dcm")
        pas = pas_factory({"PAS_CONFIG": str(write_config(tmp_path / "appliance.toml", scp)),
                           "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
        storescu(CT_PATIENT, pas.port)
        storescu(tmp_path / "mixed-mr.dcm", pas.port, extra=["-xb"])
        storescu(get_testdata_file("MR_small.dcm"), pas.port)
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["failed", "failed"], 60,
                 what="both jobs failed")
        for job in jobs_of(pas.home):
            assert job["attempts"] == 1, job  # permanent: not retried
            error = job["last_error"]
            assert "CTONLY@127.0.0.1" in error and "accepted no presentation context" in error
            assert f"MR Image Storage ({MR_IMAGE})" in error and "CT Image" not in error
            assert "Implicit VR Little Endian" in error and "Explicit VR Little Endian" in error
            assert "; 1 instance not sent" in error and "not established" not in error
        # The stored syntax is proposed too: big endian for the mixed study's MR only.
        assert sorted("Explicit VR Big Endian" in j["last_error"]
                      for j in jobs_of(pas.home)) == [False, True]
        assert {sop_uid(p) for p in scp.files()} == {sop_uid(p) for p in CT_PATIENT}
    finally:
        scp.stop()


def test_contexts_stored_syntax_alone_plus_little_endian_within_128() -> None:
    jpeg_ls = "1.2.840.10008.1.2.4.80"
    [contexts] = plan_associations({(CT_IMAGE, str(ExplicitVRLittleEndian)),
                                    (CT_IMAGE, jpeg_ls), (MR_IMAGE, str(ExplicitVRBigEndian))})
    proposed = [(str(c.abstract_syntax), [str(t) for t in c.transfer_syntax]) for c in contexts]
    little = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    assert proposed == [(CT_IMAGE, [str(ExplicitVRLittleEndian)]), (CT_IMAGE, [jpeg_ls]),
                        (CT_IMAGE, little), (MR_IMAGE, [str(ExplicitVRBigEndian)]),
                        (MR_IMAGE, little)]
    # 70 SOP classes need 140 contexts: two associations, no SOP class split between them.
    classes = {(f"1.2.3.{n}", str(ExplicitVRLittleEndian)) for n in range(70)}
    groups = plan_associations(classes)
    assert [len(g) for g in groups] == [128, 12]
    seen = [{str(c.abstract_syntax) for c in g} for g in groups]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 70


def test_big_endian_rewritten_little_endian_keeps_the_instance(tmp_path: Path) -> None:
    """The copy sent to a peer without the stored syntax (appliance/store/transcode.py; its
    byte-for-byte checks are in tests/test_transcode.py): same instance, same pixels."""
    spool = Spool(tmp_path / "spool", fsync=False)
    with transcoded(spool, MR_BIG_ENDIAN, str(ExplicitVRLittleEndian)) as path:
        ds = dcmread(path)  # read whole while the copy exists
    original = dcmread(MR_BIG_ENDIAN)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.original_encoding == (False, True)
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert numpy.array_equal(ds.pixel_array, original.pixel_array)
    jpeg_ls = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))  # type: ignore[arg-type]
    with transcoded(spool, jpeg_ls, str(ExplicitVRLittleEndian)) as path:
        compressed = dcmread(path)
    assert compressed.SOPInstanceUID == dcmread(jpeg_ls).SOPInstanceUID  # not a new UID
    assert numpy.array_equal(compressed.pixel_array, dcmread(get_testdata_file("MR_small.dcm"))
                             .pixel_array)
    assert not [p for p in spool.tmp.iterdir() if p.stat().st_size]  # the copies are gone


def test_a_slow_peer_keeps_the_job_with_one_worker_sending_each_instance_once(
        pas_factory, tmp_path: Path) -> None:
    """A node that takes a second per C-STORE, a 2 s lease: the study takes longer than the
    lease, yet the job stays with its worker (one attempt) and each instance is received once
    (the peer's ``+uf`` writes one file per C-STORE it receives). The lease was renewed only
    every 25 instances: it expired, the second worker claimed the job and sent the study
    again over a second association, twice."""
    scp = StoreSCP(tmp_path / "slow").start(["--sleep-after", "1"])
    try:
        pas = pas_factory({"PAS_CONFIG": str(write_config(tmp_path / "appliance.toml", scp)),
                           "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_QUEUE__LEASE_S": "2",
                           "PAS_QUEUE__MAX_ATTEMPTS": "10"})
        storescu(CT_PATIENT, pas.port)
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["done"], 60,
                 what="the job done")
        [job] = jobs_of(pas.home)
        assert job["attempts"] == 1, job
        received = [sop_uid(p) for p in scp.files()]
        assert sorted(received) == sorted(sop_uid(p) for p in CT_PATIENT)
    finally:
        scp.stop()


def test_one_instance_refused_does_not_hold_back_the_rest_of_the_study(pas_factory,
                                                                       tmp_path: Path) -> None:
    """storescp cannot write the study's first instance (a directory holds its file name) and
    answers that C-STORE 0xA700: the other two are delivered anyway, the job is retried for
    the refused one only, fails once its attempts are spent naming it, and goes through in
    full after `pas queue retry` once the node is fixed. The first refusal ended every
    attempt: nothing of the study reached the node."""
    folder = tmp_path / "picky"
    blocked = folder / f"CT.{sop_uid(CT_PATIENT[0])}"  # storescp -uf: <modality>.<SOP UID>
    blocked.mkdir(parents=True)
    scp = StoreSCP(folder).start(["-uf"])
    try:
        pas = pas_factory({"PAS_CONFIG": str(write_config(tmp_path / "appliance.toml", scp)),
                           "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
        storescu(CT_PATIENT, pas.port)  # the blocked one first: its series is filed first
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["failed"], 60,
                 what="the job failed")
        assert {sop_uid(p) for p in scp.files()} == {sop_uid(p) for p in CT_PATIENT[1:]}
        [job] = jobs_of(pas.home)
        assert job["attempts"] == 2, job
        assert "failure status for 1 of the 1 instance still to send" in job["last_error"]
        assert f"{sop_uid(CT_PATIENT[0])} (0xA700)" in job["last_error"], job
        blocked.rmdir()
        # --json: the job's row as pas queue list --json gives it, right after the retry.
        retried = json.loads(pas.cli("queue", "retry", str(job["id"]), "--json").stdout)
        assert {k: retried[k] for k in ("id", "waits_for_job", "destination", "priority",
                                        "instances")} == {
            "id": job["id"], "waits_for_job": None, "destination": job["destination"],
            "priority": job["priority"], "instances": len(CT_PATIENT)}, retried
        assert retried["priority_name"] in ("urgent", "high", "routine"), retried
        # Its attempts reset, unless the worker took it up between the retry and the read.
        assert (retried["state"], retried["attempts"]) in (
            ("pending", 0), ("running", 1), ("done", 1)), retried
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["done"], 60,
                 what="the retried job done")
        assert {sop_uid(p) for p in scp.files()} == {sop_uid(p) for p in CT_PATIENT}
    finally:
        scp.stop()


def test_a_daemon_killed_mid_study_sends_again_only_what_it_had_not_recorded(
        pas_factory, tmp_path: Path) -> None:
    """kill -9 of `pas run` while it forwards a study to a node taking a second per C-STORE
    (storescp ``+uf`` keeps one file per C-STORE received), then a restart on the same home:
    the job resumes and the node gets the whole study, and what it had acknowledged before
    the kill again at most once (the one the kill may have caught between its answer and
    its record). Progress was recorded every 25 instances only: every instance acknowledged
    before the kill (measured: 4 of 4) was sent again."""
    from collections import Counter


    scp = StoreSCP(tmp_path / "slow").start(["--sleep-after", "1"])
    try:
        env = {"PAS_CONFIG": str(write_config(tmp_path / "appliance.toml", scp)),
               "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_QUEUE__MAX_ATTEMPTS": "5"}
        pas = pas_factory(env)
        storescu(tiny_study(tmp_path / "study", 8), pas.port)
        wait_for(lambda: len(scp.files()) >= 3, 60, what="3 instances at the node")
        pas.kill()
        before_kill = len(scp.files())
        again = pas_factory(env, home=pas.home)
        wait_for(lambda: [j["state"] for j in jobs_of(again.home)] == ["done"], 60,
                 what="the job done after the restart")
        received = Counter(sop_uid(p) for p in scp.files())
        assert set(received) == {sop_uid(p) for p in (tmp_path / "study").iterdir()}
        sent_again = sum(n - 1 for n in received.values())
        assert sent_again <= 1, (before_kill, received)
    finally:
        scp.stop()


def test_an_unreadable_stored_file_does_not_hold_back_the_rest_of_the_study(
        pas_factory, tmp_path: Path) -> None:
    """The stored file of the second of five instances is gone (a bad sector, a slip of an
    operator) while the study waits for the node to come back: the node gets the other
    four, and the job, retried, fails naming the instance and why; `pas queue list` says
    4/5 sent. The read error ended every attempt at that instance: the node got 1 of 5 and
    the three after it were never sent."""
    from tests.support.peers import free_port

    scp = StoreSCP(tmp_path / "pacs")
    scp.port = free_port()  # nothing listens there yet: the job waits for the link
    config = write_config(tmp_path / "appliance.toml", scp)
    pas = pas_factory({"PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true"})
    storescu(tiny_study(tmp_path / "study", 5), pas.port)
    wait_for(lambda: (jobs_of(pas.home) or [{}])[0].get("last_error", "") and jobs_of(
        pas.home)[0]["last_error"].startswith("waiting for the link"), 60,
        what="the job waiting for the node")
    victim = sorted(index_rows(pas.home), key=lambda r: int(r["instance_number"]))[1]
    (pas.home / "spool" / victim["path"]).unlink()
    scp.start()
    try:
        wait_for(lambda: [j["state"] for j in jobs_of(pas.home)] == ["failed"], 60,
                 what="the job failed")
        received = {sop_uid(p) for p in scp.files()}
        everything = {sop_uid(p) for p in (tmp_path / "study").iterdir()}
        assert received == everything - {victim["sop_instance_uid"]}, len(received)
        [job] = json.loads(pas.cli("queue", "list", "--json").stdout)
        assert (job["sent"], job["instances"]) == (4, 5), job
        assert f"{victim['sop_instance_uid']} (FileNotFoundError" in job["last_error"], job
        assert "stored file cannot be read" in job["last_error"], job
    finally:
        scp.stop()


def tiny_study(folder: Path, count: int) -> Path:
    """``count`` tiny CT instances of one new study and series, written to ``folder``."""
    from tests.support.objects import tiny_ct

    first = tiny_ct(InstanceNumber=1)
    folder.mkdir()
    for n in range(count):
        tiny_ct(first.StudyInstanceUID, first.SeriesInstanceUID, InstanceNumber=n + 1
                ).save_as(folder / f"{n}.dcm", enforce_file_format=True)
    return folder

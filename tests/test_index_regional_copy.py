"""A copy fetched from the region (fetch-through, prefetch: ``origin="regional"``) never
replaces a correction the region has not confirmed yet (invariant 2), and a prefetch rule's
``push_to`` never marks the site's own unrouted instances routed (review s41).

On a real index, spool and receiver (the functions the daemon's fetch-through and prefetch
call: :meth:`Receiver.receive_file` with ``origin="regional"``), DICOM objects built by
pydicom. Before the fix the region's copy became current and confirmed: the correction was
excused from the eviction's rule as a replaced version, taken out of its hub job, and the
cache evicted it without ``--force``; it never reached the region.
"""

from __future__ import annotations

import io
import time
import types
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from appliance.ingest.receive import Receiver
from appliance.prefetch.fetcher import PriorsFetcher
from appliance.store import eviction, index, jobs
from appliance.store.db import Database
from appliance.store.spool import Spool
from tests.support.objects import tiny_ct


def _part10(dataset: object) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)  # type: ignore[attr-defined]
    return buffer.getvalue()


class Site:
    def __init__(self, home: Path) -> None:
        self.db = Database(home / "pas.sqlite")
        self.spool = Spool(home / "spool")
        self.receiver = Receiver(self.db, self.spool)

    def study_fk(self, study_uid: str) -> int:
        return int(self.db.query_one("SELECT id FROM studies WHERE study_uid = ?",
                                     (study_uid,))["id"])

    def route(self, study_uid: str) -> int:
        """The stability pass's routing: every unrouted row routed, the current ones in a
        hub job (returned)."""
        fk = self.study_fk(study_uid)
        rows = index.unrouted_instances(self.db, fk)
        jobs.route_study(self.db, fk, [r["id"] for r in rows],
                         [jobs.NewJob("hub", "hub", 2, "default",
                                      [r["id"] for r in rows if r["is_current"]])])
        return int(self.db.query_one("SELECT max(id) AS id FROM jobs")["id"])

    def done(self, job_id: int) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE jobs SET state = 'done' WHERE id = ?", (job_id,))

    def row(self, sha256: str) -> dict[str, object]:
        return dict(self.db.query_one(
            "SELECT i.is_current, i.routed_at IS NOT NULL AS routed, "
            "i.confirmed_at IS NOT NULL AS confirmed, s.study_uid FROM instances i "
            "JOIN studies s ON s.id = i.study_fk WHERE i.sha256 = ?", (sha256,)))


def test_a_regional_copy_does_not_replace_a_correction_moved_to_another_study(
        tmp_path: Path) -> None:
    """X sent in S1, confirmed, S1 evicted; the technologist moves X to S2 (new bytes), its
    hub job waiting; a viewer opens S1 and fetch-through files the region's X. The
    correction stays current, in its job, and S2 may not be evicted until it is
    confirmed."""
    site = Site(tmp_path)
    s1, s2, x = generate_uid(), generate_uid(), generate_uid()
    first = _part10(tiny_ct(s1, generate_uid(), SOPInstanceUID=x, PatientID="P1",
                            StudyDescription="wrong order"))
    moved = _part10(tiny_ct(s2, generate_uid(), SOPInstanceUID=x, PatientID="P1",
                            StudyDescription="corrected"))
    sent = site.receiver.receive_file(first, calling_ae="CT1")
    job = site.route(s1)
    jobs.confirm_instances(site.db, [(x, sent.sha256)])
    site.done(job)
    assert eviction.evict_study(site.db, site.spool, s1).instances == 1
    correction = site.receiver.receive_file(moved, calling_ae="CT1")
    s2_job = site.route(s2)

    fetched = site.receiver.receive_file(first, calling_ae="REGION", source="region",
                                         expect_sop_instance_uid=x, origin="regional")
    assert not fetched.duplicate
    assert site.row(correction.sha256) == {"is_current": 1, "routed": 1, "confirmed": 0,
                                           "study_uid": s2}
    assert site.row(sent.sha256)["is_current"] == 0
    assert site.row(sent.sha256)["confirmed"] == 1
    # The hub job still carries the correction: nothing dropped as "replaced".
    assert jobs.drop_replaced_versions(site.db, s2_job, new_transfer=True) == []
    assert [r["sha256"] for r in jobs.job_files(site.db, s2_job)] == [correction.sha256]
    site.done(s2_job)
    assert s2 not in [c.study_uid for c in eviction.eviction_candidates(
        site.db, time.time() + 60)]
    with pytest.raises(eviction.NotEvictable, match="1 instance not confirmed"):
        eviction.evict_study(site.db, site.spool, s2)
    path = site.db.query_one("SELECT path FROM instances WHERE sha256 = ?",
                             (correction.sha256,))["path"]
    assert (site.spool.root / path).is_file()


def test_a_regional_copy_filed_after_a_resent_correction_stays_behind_it(
        tmp_path: Path) -> None:
    """Fetch-through downloads an evicted study while the modality re-sends a corrected X
    into it: the region's older copy, filed last, is kept as an older version held by the
    region; the correction serves, is routed and is not evictable unconfirmed. The same
    for bytes the index already holds as an older version (A, then B, then the region's
    A)."""
    site = Site(tmp_path)
    study, series, x = generate_uid(), generate_uid(), generate_uid()
    first = _part10(tiny_ct(study, series, SOPInstanceUID=x, PatientID="P1",
                            PatientName="DOE^JON"))
    corrected = _part10(tiny_ct(study, series, SOPInstanceUID=x, PatientID="P1",
                                PatientName="DOE^JOHN"))
    sent = site.receiver.receive_file(first, calling_ae="CT1")
    job = site.route(study)
    jobs.confirm_instances(site.db, [(x, sent.sha256)])
    site.done(job)
    eviction.evict_study(site.db, site.spool, study)
    correction = site.receiver.receive_file(corrected, calling_ae="CT1")
    site.receiver.receive_file(first, calling_ae="REGION", source="region", origin="regional")
    assert site.row(correction.sha256)["is_current"] == 1
    assert site.row(sent.sha256) == {"is_current": 0, "routed": 1, "confirmed": 1,
                                     "study_uid": study}
    again = site.route(study)
    assert [r["sha256"] for r in jobs.job_files(site.db, again)] == [correction.sha256]
    site.done(again)
    with pytest.raises(eviction.NotEvictable):
        eviction.evict_study(site.db, site.spool, study)
    # The region's copy once more (a second viewer): a duplicate, nothing changes.
    repeat = site.receiver.receive_file(first, calling_ae="REGION", source="region",
                                        origin="regional")
    assert repeat.duplicate and site.row(correction.sha256)["is_current"] == 1
    # Confirmed at last: the region's copy of the correction may now replace nothing
    # and the study goes as any other.
    jobs.confirm_instances(site.db, [(x, correction.sha256)])
    assert eviction.evict_study(site.db, site.spool, study).instances == 2


def test_a_prefetch_push_does_not_mark_the_sites_own_delta_routed(tmp_path: Path) -> None:
    """A study already complete on site gets a late delta (not yet stable); an HL7 order
    whose rule pushes priors to a viewer reaches it: the push's job carries the delta, and
    the delta is still the stability pass's to route to the hub (it was marked routed, with
    the viewer's job alone: it never reached the region)."""
    site = Site(tmp_path)
    study, series = generate_uid(), generate_uid()
    first = [site.receiver.receive_file(_part10(tiny_ct(study, series, PatientID="P1",
                                                        InstanceNumber=n)), calling_ae="CT1")
             for n in (1, 2)]
    job = site.route(study)
    jobs.confirm_instances(site.db, [(r.sop_instance_uid, r.sha256) for r in first])
    site.done(job)
    delta = site.receiver.receive_file(_part10(tiny_ct(study, generate_uid(), PatientID="P1",
                                                       SeriesNumber=9)), calling_ae="WS1")
    fetcher = types.SimpleNamespace(
        db=site.db, settings=types.SimpleNamespace(
            destinations={"viewer": types.SimpleNamespace(kind="dicom")}),
        _pin_until=lambda: time.time() + 86400, on_jobs_created=lambda: None)
    PriorsFetcher._pin_and_push(fetcher, study, ["viewer"], "priors")  # type: ignore[arg-type]
    pushed = int(site.db.query_one("SELECT max(id) AS id FROM jobs")["id"])
    assert {r["sha256"] for r in jobs.job_files(site.db, pushed)} == \
        {r.sha256 for r in [*first, delta]}
    unrouted = index.unrouted_instances(site.db, site.study_fk(study))
    assert [r["id"] for r in unrouted] == [delta.instance_id]
    hub_job = site.route(study)
    assert [r["sha256"] for r in jobs.job_files(site.db, hub_job)] == [delta.sha256]

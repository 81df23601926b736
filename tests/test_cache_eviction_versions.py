"""What the cache may evict on its own when an instance has several versions (same SOP
Instance UID, other bytes), on a real SQLite index and spool: the region must hold the
sender's last word before the study goes (invariant 2), and a version the sender replaced
before it travelled must not keep its study in the cache for ever. Found in review
(2026-12-07)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.store import eviction, index, jobs
from appliance.store.db import Database
from appliance.store.spool import Spool

STUDY = "1.2.826.0.1.3680043.8.498.7001"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


class Site:
    """An index and a spool, and the steps of routing and receipts as the daemon takes them
    (the store's own functions; the hub's receipt is :func:`jobs.confirm_instances`)."""

    def __init__(self, home: Path) -> None:
        self.db = Database(home / "pas.sqlite")
        self.spool = Spool(home / "spool")

    def receive(self, uid: str, payload: bytes) -> str:
        stored, _ = self.spool.write([payload])
        index.record_instance(self.db, index.InstanceRecord(
            sop_instance_uid=uid, sop_class_uid=CT_IMAGE,
            transfer_syntax_uid="1.2.840.10008.1.2.1", study_uid=STUDY,
            series_uid=f"{STUDY}.1", patient_id="P-7001"), stored)
        return stored.sha256

    def route(self) -> int:
        """What routing does once the study is stable: every unrouted row marked routed, the
        current ones carried by one hub job. Returns the job's id."""
        study_fk = self.db.query_one("SELECT id FROM studies WHERE study_uid = ?",
                                     (STUDY,))["id"]
        rows = index.unrouted_instances(self.db, study_fk)
        current = [r["id"] for r in rows if r["is_current"]]
        assert current, "nothing to route"
        jobs.route_study(self.db, study_fk, [r["id"] for r in rows],
                         [jobs.NewJob("hub", "hub", 5, "default", current)])
        return int(self.db.query_one("SELECT max(id) AS id FROM jobs")["id"])

    def receipt(self, job_id: int, pairs: list[tuple[str, str]]) -> None:
        """The hub's receipt for ``job_id``: its pairs confirmed, the job over."""
        jobs.confirm_instances(self.db, pairs)
        with self.db.transaction() as conn:
            conn.execute("UPDATE jobs SET state = 'done' WHERE id = ?", (job_id,))

    def candidates(self) -> list[str]:
        return [c.study_uid for c in eviction.eviction_candidates(self.db, time.time() + 60)]

    def files(self) -> int:
        return sum(1 for _ in self.spool.root.glob("*/*.dcm"))


def test_a_version_sent_again_is_not_evicted_before_it_goes_up_even_if_a_late_receipt_confirms_it(
        tmp_path: Path) -> None:
    """A, then B (a correction) while A's job is on its way, then A again (the correction
    taken back). A's job's receipt arrives next and confirms A's bytes (the region took them),
    B's job is confirmed: every row confirmed, no job left, but A, the sender's last word, was
    never routed again. Evicted then, it never went up after B, and an archive that keeps the
    version it took last holds B only: the sender's last word was lost on both sides."""
    site = Site(tmp_path)
    a = site.receive("X", b"version A")
    other = site.receive("Y", b"another image")
    first = site.route()
    b = site.receive("X", b"version B")
    second = site.route()
    assert site.receive("X", b"version A") == a  # current again, to be routed again
    site.receipt(first, [("X", a), ("Y", other)])
    site.receipt(second, [("X", b)])
    assert site.db.query_one("SELECT count(*) AS n FROM instances WHERE confirmed_at IS NULL"
                             )["n"] == 0

    assert site.candidates() == []
    with pytest.raises(eviction.NotEvictable,
                       match="1 instance received again since the study was routed, not "
                             "sent yet"):
        eviction.evict_study(site.db, site.spool, STUDY)
    assert site.files() == 3

    third = site.route()  # the delta: A goes up again, after B
    assert [r["sha256"] for r in jobs.job_files(site.db, third)] == [a]
    assert site.candidates() == []  # its job still to run
    site.receipt(third, [("X", a)])
    assert site.candidates() == [STUDY]


def test_a_version_replaced_before_its_study_was_routed_does_not_keep_the_study_for_ever(
        tmp_path: Path) -> None:
    """A then B before the study is stable: routing sends B only, so no receipt will ever
    confirm A. Eviction waited for every version's confirmation, and such a study stayed in
    the cache for good (a modality that sends an image twice, in two transfer syntaxes)."""
    site = Site(tmp_path)
    site.receive("X", b"version A")
    b = site.receive("X", b"version B")
    other = site.receive("Y", b"another image")
    job = site.route()
    assert sorted(r["sha256"] for r in jobs.job_files(site.db, job)) == sorted([b, other])

    assert site.candidates() == []  # B not confirmed yet: A is still the only copy of X
    with pytest.raises(eviction.NotEvictable, match="not confirmed at the region"):
        eviction.evict_study(site.db, site.spool, STUDY)

    site.receipt(job, [("X", b), ("Y", other)])
    assert site.candidates() == [STUDY]
    evicted = eviction.evict_study(site.db, site.spool, STUDY)
    assert (evicted.instances, evicted.unconfirmed) == (3, 1)
    assert site.files() == 0


def test_an_older_version_waits_while_the_current_one_is_not_confirmed(tmp_path: Path) -> None:
    """The rule excuses a superseded version only once its instance's current version is
    confirmed: with Y's correction unconfirmed, a confirmed Y elsewhere does not count."""
    site = Site(tmp_path)
    a = site.receive("X", b"version A")
    job = site.route()
    site.receipt(job, [("X", a)])
    assert site.candidates() == [STUDY]

    site.receive("X", b"version B")  # a correction: current, not confirmed
    assert site.candidates() == []
    site.route()
    assert site.candidates() == []  # its job pending, and B unconfirmed
    with site.db.transaction() as conn:  # the job over without a receipt (failed for good)
        conn.execute("UPDATE jobs SET state = 'failed'")
    assert site.candidates() == []

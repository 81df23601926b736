"""An urgent study reaches the region while it is still arriving (``study.urgent_batch_s``;
DESIGN.md: "Sending need not wait for the study to be stable ... the difference between at
the region seconds after the last slice and a minute later").

Every study waited ``study.stable_after_s`` (60 s) of quiet before its first job: the
emergency CT left a minute after its last slice, whatever its priority, while docs/routing.md
said its buckets left as it arrived (review s41). A real ``pas run`` enrolled to a real
``pas hub run``, DCMTK storescu as the CT: with ``stable_after_s`` at 300 s, the urgent
study's first image is confirmed by the hub before its others are sent, then the others,
each instance carried once; a routine study sent meanwhile is not routed at all.
"""

from __future__ import annotations

import collections
import contextlib
import textwrap
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.cleanup import started
from tests.support.hub import HubProcess, enroll
from tests.support.peers import CT_DIR, PasProcess, read_rows, storescu, wait_for


def _two_studies() -> tuple[list[Path], list[Path]]:
    by_study: dict[str, list[Path]] = collections.defaultdict(list)
    seen: set[str] = set()  # the set holds two byte-identical copies: one each
    for path in sorted(CT_DIR.glob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        if str(ds.SOPInstanceUID) not in seen:
            seen.add(str(ds.SOPInstanceUID))
            by_study[str(ds.StudyInstanceUID)].append(path)
    studies = sorted(by_study.values(), key=len, reverse=True)
    return studies[0], studies[1]


def _confirmed(db: Path, files: list[Path]) -> int:
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    rows = read_rows(db, f"SELECT count(*) AS n FROM instances WHERE confirmed_at IS NOT NULL "
                         f"AND sop_instance_uid IN ({','.join('?' * len(uids))})", tuple(uids))
    return int(rows[0]["n"])


def test_an_urgent_study_is_at_the_region_before_it_is_stable(tmp_path: Path) -> None:
    urgent, routine = _two_studies()
    assert len(urgent) >= 2, len(urgent)
    first, second = urgent[:1], urgent[1:]
    config = tmp_path / "appliance.toml"
    config.write_text(textwrap.dedent("""
        [[routing.rules]]
        name = "emergency CT"
        match = { calling_ae = "^CT_URG$" }
        destinations = ["hub"]
        priority = "urgent"
        """))
    with contextlib.ExitStack() as stack:
        hub = started(stack, HubProcess(tmp_path / "hub").init())
        home = tmp_path / "site"
        enroll(hub, home, "SITE-A")
        pas = started(stack, PasProcess(home, {
            "PAS_CONFIG": str(config), "PAS_DICOM__ACCEPT_UNKNOWN": "true",
            "PAS_PREFETCH__ON_ARRIVAL": "false", "PAS_STORAGE__FSYNC": "false",
            # Stable only after 5 min: anything at the region before is an urgent batch.
            "PAS_STUDY__STABLE_AFTER_S": "300", "PAS_STUDY__URGENT_BATCH_S": "1"}))
        db = home / "pas.sqlite"
        storescu(first, pas.port, calling="CT_URG")
        storescu(routine, pas.port, calling="MR1")
        wait_for(lambda: _confirmed(db, first) == len(first), 60,
                 what="the urgent study's first image confirmed by the hub")
        assert _confirmed(db, second) == 0  # not sent yet: still "arriving"
        storescu(second, pas.port, calling="CT_URG")
        wait_for(lambda: _confirmed(db, urgent) == len(urgent), 60,
                 what="the urgent study's other images confirmed")
        # Each instance carried once, in batches (deltas) of the hub's urgent priority.
        carried = read_rows(db, "SELECT j.priority, j.destination, count(*) AS n, "
                                "count(DISTINCT ji.instance_fk) AS distinct_n FROM jobs j "
                                "JOIN job_instances ji ON ji.job_id = j.id GROUP BY j.id")
        assert sum(r["n"] for r in carried) == len(urgent)
        assert all(r["n"] == r["distinct_n"] and (r["priority"], r["destination"]) ==
                   (0, "hub") for r in carried), carried
        assert len(carried) >= 2  # two batches at least: sent while arriving
        # The routine study waits to be stable (300 s): nothing routed of it.
        routine_uid = str(dcmread(routine[0], stop_before_pixels=True).StudyInstanceUID)
        assert read_rows(db, "SELECT count(*) AS n FROM instances i JOIN studies s "
                             "ON s.id = i.study_fk WHERE s.study_uid = ? "
                             "AND i.routed_at IS NOT NULL", (routine_uid,))[0]["n"] == 0
        assert "arriving, urgent batch" in pas.log()
        # The hub archived the study once, bit-exact (its receipts' SHA-256 are the index's).
        hub_rows = read_rows(hub.home / "hub.sqlite",
                             "SELECT count(*) AS n FROM transfers WHERE receipt IS NOT NULL")
        assert hub_rows[0]["n"] == len(carried)


def test_urgent_batches_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's own decisions on a real index, the clock moved by hand (no waiting): a
    batch waits until its oldest instance is ``urgent_batch_s`` old; a study no urgent rule
    takes is not routed before it is stable; ``urgent_batch_s = 0`` turns batches off."""
    import time

    from appliance.config import Settings
    from appliance.ingest.receive import Receiver
    from appliance.routing.stability import Router
    from appliance.store.db import Database
    from appliance.store.spool import Spool

    urgent, routine = _two_studies()
    db = Database(tmp_path / "pas.sqlite")
    receiver = Receiver(db, Spool(tmp_path / "spool"))
    for path in urgent[:2]:
        receiver.receive_file(path.read_bytes(), calling_ae="CT_URG")
    for path in routine[:2]:
        receiver.receive_file(path.read_bytes(), calling_ae="MR1")

    def router(batch_s: float) -> Router:
        return Router(Settings.model_validate({
            **_router_settings(batch_s)}), db)

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 0.5)
    assert router(1.0).route_ready() == 0  # half a second old: not a batch yet
    monkeypatch.setattr(time, "time", lambda: real() + 2)
    assert router(0).route_ready() == 0  # batches off: waits to be stable
    assert router(1.0).route_ready() == 1  # the urgent study's batch, one job
    jobs = db.query("SELECT priority, destination FROM jobs")
    assert [(r["priority"], r["destination"]) for r in jobs] == [(0, "pacs")]
    assert db.query_one("SELECT count(*) AS n FROM instances WHERE routed_at IS NULL")["n"] \
        == 2  # the routine study's: not urgent, waits to be stable
    monkeypatch.setattr(time, "time", lambda: real() + 301)
    assert router(1.0).route_ready() == 1  # stable now: routed, routine
    db.close()


def _router_settings(batch_s: float = 1.0) -> dict[str, object]:
    return {"study": {"stable_after_s": 300, "urgent_batch_s": batch_s},
            "destinations": {"pacs": {"kind": "dicom", "ae_title": "PACS",
                                      "host": "127.0.0.1", "port": 104}},
            "routing": {"rules": [{"name": "emergency CT", "match": {"calling_ae": "^CT_URG$"},
                                   "destinations": ["pacs"], "priority": "urgent"}],
                        "fallback": {"destinations": ["pacs"]}}}


def test_urgent_batches_grow_while_one_is_under_way_and_the_study_is_told_stable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Review s41 of the batches: a new batch every few seconds whatever the link did (600
    images over 10 min: 100 transfers run one after another); a series no urgent rule takes
    waited for stability though its study was urgent; the study routed whole by batches was
    never said stable nor told to on_stable at stability, and stayed in memory."""
    import logging
    import time

    from appliance.config import Settings
    from appliance.ingest.receive import Receiver
    from appliance.routing.stability import Router
    from appliance.store.db import Database
    from appliance.store.spool import Spool

    urgent, _routine = _two_studies()
    assert len(urgent) >= 3
    db = Database(tmp_path / "pas.sqlite")
    receiver = Receiver(db, Spool(tmp_path / "spool"))
    real = time.time
    clock = {"offset": 0.0}
    monkeypatch.setattr(time, "time", lambda: real() + clock["offset"])
    router = Router(Settings.model_validate(_router_settings()), db)
    told: list[int] = []
    router.on_stable.append(told.append)

    receiver.receive_file(urgent[0].read_bytes(), calling_ae="CT_URG")
    clock["offset"] = 2
    assert router.route_ready() == 1 and len(told) == 1  # told at the first batch
    # Two more images while batch 1 waits (its PACS not reached yet); the second from a
    # workstation no urgent rule names: the study is urgent until it is quiet.
    receiver.receive_file(urgent[1].read_bytes(), calling_ae="CT_URG")
    receiver.receive_file(urgent[2].read_bytes(), calling_ae="WS1")
    clock["offset"] = 5
    assert router.route_ready() == 0  # batch 1 under way: no new batch, this one grows
    with db.transaction() as conn:
        conn.execute("UPDATE jobs SET state = 'done'")
    assert router.route_ready() == 1  # batch 1 sent: the next holds both images
    batches = [int(r["n"]) for r in db.query(
        "SELECT count(*) AS n FROM job_instances GROUP BY job_id ORDER BY job_id")]
    assert batches == [1, 2]
    with db.transaction() as conn:
        conn.execute("UPDATE jobs SET state = 'done'")
    # Quiet for stable_after_s: said stable, on_stable told, forgotten.
    clock["offset"] = 5 + 301
    with caplog.at_level(logging.INFO, logger="pas.routing"):
        assert router.route_ready() == 0
    assert len(told) == 2
    assert "stable: routed in urgent batches while it arrived" in caplog.text
    assert router._urgent_told == set()
    db.close()


def test_a_study_still_arriving_is_not_evicted(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An urgent study's first batch confirmed while it still arrives: over the high
    watermark, the cache evicted it (retention 0 by default) and its next image began a new
    partial study (review s41). Not before it is quiet for stable_after_s."""
    import time

    from appliance.config import Settings
    from appliance.ingest.receive import Receiver
    from appliance.ops.cache_policy import CachePolicy
    from appliance.store import jobs as job_store
    from appliance.store.db import Database
    from appliance.store.spool import Spool

    urgent, _routine = _two_studies()
    db = Database(tmp_path / "pas.sqlite")
    spool = Spool(tmp_path / "spool")
    received = Receiver(db, spool).receive_file(urgent[0].read_bytes(), calling_ae="CT_URG")
    study_fk = db.query_one("SELECT id FROM studies")["id"]
    job_store.route_study(db, study_fk, [received.instance_id], [])
    job_store.confirm_instances(db, [(received.sop_instance_uid, received.sha256)])
    settings = Settings.model_validate({
        "home": str(tmp_path), "study": {"stable_after_s": 60},
        "storage": {"quota_mb": 1, "min_free_mb": 0},
        "cache": {"high_watermark_percent": 1, "low_watermark_percent": 0.5}})
    policy = CachePolicy(settings, db, spool)
    study_uid = str(db.query_one("SELECT study_uid FROM studies")["study_uid"])
    assert policy.evict_if_needed().evicted == []  # still arriving: kept
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 61)
    assert policy.evict_if_needed().evicted == [study_uid]
    db.close()

"""Restoring ``pas backup`` after the appliance's disk is lost (docs/operations.md, "Backup
and restore"), as hospital IT lives it: real peers only.

A real ``pas run`` enrolled to a real ``pas hub run``; DCMTK storescu sends three studies,
two confirmed by the region, one still queued (the hub down) when the backup is taken. The
disk is lost: a fresh home, ``pas restore`` puts the index and the enrolment back, the hub
up again, PAS started. Every indexed file is then missing (start-up recovery flags them).

What a viewer gets: the confirmed studies are fetched again from the region, bit-exact, by
WADO-RS and by C-GET (their rows were counted as "on site", so fetch-through never asked the
region: a WADO-RS answer was cut after its 200 status line, a C-GET failed every
sub-operation with ``No such file or directory``), and so are they when a viewer asks for one
series or one instance (a series-level C-GET, an instance-level C-MOVE, WADO-RS of a series or
an instance: the study-level fetch was all there was, these failed their sub-operations); the
study the region never had is a clear 404 naming the way out, said before any byte of an
answer, and a clear refusal (0xC000, the cause in its Error Comment) to a C-GET.

``pas restore`` refuses, before it changes anything, another site's backup, a truncated or
damaged one and one a newer version wrote; a start on a newer version's database is one line.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from tests.support.cleanup import started
from tests.support.hub import HubProcess, enroll
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    PasProcess,
    StoreSCP,
    read_rows,
    run_pas,
    storescu,
    wait_for,
)

ENV = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_QUEUE__BACKOFF_INITIAL_S": "0.3",
       "PAS_QUEUE__BACKOFF_MAX_S": "1", "PAS_PREFETCH__ON_ARRIVAL": "false",
       "PAS_STORAGE__FSYNC": "false", "PAS_SITE": "SITE-A"}


def _studies(count: int) -> list[list[Path]]:
    """The first ``count`` studies of the CT set (three files each), their files."""
    by_study: dict[str, list[Path]] = collections.defaultdict(list)
    for path in sorted(CT_DIR.glob("*.dcm")):
        by_study[str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)].append(path)
    return list(by_study.values())[:count]


def _uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _sha256s(blobs: list[bytes]) -> set[str]:
    return {hashlib.sha256(b).hexdigest() for b in blobs}


def _parts(answer: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related answer."""
    boundary = answer.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    return [chunk.partition(b"\r\n\r\n")[2][:-2]
            for chunk in answer.content.split(b"--" + boundary.encode())[1:-1]]


def _indexed(db: Path, study_uid: str) -> set[str]:
    """The SHA-256 the index recorded of each instance of a study (what the modality sent,
    stored bit-exact)."""
    return {r["sha256"] for r in read_rows(
        db, "SELECT i.sha256 FROM instances i JOIN studies s ON s.id = i.study_fk "
            "WHERE s.study_uid = ?", (study_uid,))}


def _count(db: Path, sql: str) -> int:
    return int(read_rows(db, sql)[0][0])


def _dataset_sha256(data: bytes) -> str:
    """The SHA-256 of a DICOM file's data set, its file meta left out: what a C-STORE carries
    (getscu and storescp write a file meta of their own before the bytes they received)."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00", data[:140]
    return hashlib.sha256(data[144 + int.from_bytes(data[140:144], "little"):]).hexdigest()


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _series_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _stored(home: Path, sop_uid: str) -> bytes:
    """The file the spool holds of an instance, checked against the SHA-256 its index row
    recorded (the row restored from the backup: what the modality sent)."""
    [row] = read_rows(home / "pas.sqlite", "SELECT path, sha256 FROM instances "
                                           "WHERE sop_instance_uid = ?", (sop_uid,))
    data = (home / "spool" / row["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == row["sha256"]
    return data


def _one_series_or_instance_each(home: Path, port: int, http_port: int,
                                 by_series: list[Path], by_image: list[Path],
                                 web_series: list[Path], web_image: list[Path],
                                 mover: StoreSCP, out: Path) -> None:
    """Four lost studies, one asked for each way below the study level; the viewer gets the
    bytes the modality sent each time (each study's lost instances fetched from the region).
    The index's SHA-256 is of the file as stored (DCMTK's storescu re-encodes sequences)."""
    get = subprocess.run(["getscu", "-S", "+B", "-aet", "VIEWER", "-aec", "PAS", "-od",
                          str(out), "-k", "QueryRetrieveLevel=SERIES",
                          "-k", f"StudyInstanceUID={_uid(by_series)}",
                          "-k", f"SeriesInstanceUID={_series_uid(by_series[0])}",
                          "127.0.0.1", str(port)],
                         capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
    assert get.returncode == 0, get.stderr
    got = list(out.iterdir())  # was none: its sub-operation failed, file not found
    assert len(got) == 1, get.stderr
    assert _dataset_sha256(got[0].read_bytes()) == \
        _dataset_sha256(_stored(home, _sop_uid(by_series[0])))

    move = subprocess.run(["movescu", "-S", "-aet", "VIEWER", "-aec", "PAS", "-aem",
                           mover.ae_title, "-k", "QueryRetrieveLevel=IMAGE",
                           "-k", f"StudyInstanceUID={_uid(by_image)}",
                           "-k", f"SeriesInstanceUID={_series_uid(by_image[1])}",
                           "-k", f"SOPInstanceUID={_sop_uid(by_image[1])}",
                           "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
    assert move.returncode == 0, move.stderr
    moved = mover.files()
    assert len(moved) == 1, move.stderr
    assert _dataset_sha256(moved[0].read_bytes()) == \
        _dataset_sha256(_stored(home, _sop_uid(by_image[1])))

    web = f"http://127.0.0.1:{http_port}/dicom-web/studies/"
    accept = {"Accept": 'multipart/related; type="application/dicom"'}
    for path in (f"{_uid(web_series)}/series/{_series_uid(web_series[2])}",
                 f"{_uid(web_image)}/series/{_series_uid(web_image[0])}/instances/"
                 f"{_sop_uid(web_image[0])}"):
        answer = httpx.get(web + path, headers=accept, timeout=60)
        assert answer.status_code == 200, answer.text[:300]
        wanted = web_series[2] if "/instances/" not in path else web_image[0]
        assert _sha256s(_parts(answer)) == _sha256s([_stored(home, _sop_uid(wanted))])


def _get(port: int, study_uid: str, series_uid: str | None = None) -> tuple[int, str, int]:
    """A C-GET by pynetdicom, of a series (``series_uid``) or else of the study: the final
    status, its Error Comment, and how many instances arrived."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
    )

    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    received: list[Any] = []

    def on_store(event: Any) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    from pynetdicom import evt
    assoc = ae.associate("127.0.0.1", port, ae_title="PAS",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
        identifier.StudyInstanceUID = study_uid
        if series_uid:
            identifier.SeriesInstanceUID = series_uid
        final = list(assoc.send_c_get(identifier,
                                      StudyRootQueryRetrieveInformationModelGet))[-1][0]
    finally:
        assoc.release()
    return int(final.Status), str(final.get("ErrorComment", "")), len(received)


def test_a_backup_restored_on_a_new_disk_serves_the_confirmed_studies_from_the_region(
        tmp_path: Path) -> None:
    confirmed_a, confirmed_b, queued, by_series, by_image, web_series, web_image = _studies(7)
    below_study = by_series + by_image + web_series + web_image
    destination = tmp_path / "backups"
    destination.mkdir()
    with contextlib.ExitStack() as stack:
        hub = started(stack, HubProcess(tmp_path / "hub").init())
        home = tmp_path / "site"
        enroll(hub, home, "SITE-A")
        pas = started(stack, PasProcess(home, ENV))
        storescu(confirmed_a + confirmed_b + below_study, pas.port)
        wait_for(lambda: _count(home / "pas.sqlite", "SELECT count(*) FROM instances "
                                "WHERE confirmed_at IS NOT NULL") == 18, 60,
                 what="18 confirmed")
        hub.stop()  # the WAN down: the third study waits in the queue
        storescu(queued, pas.port)
        wait_for(lambda: _count(home / "pas.sqlite", "SELECT count(*) FROM jobs "
                                "WHERE last_error IS NOT NULL") >= 1, 60, what="a job waiting")
        folder = Path(json.loads(pas.cli("backup", str(destination), "--json").stdout)
                      ["folder"])
        pas.stop()

        # The disk lost: a new one, the backup put back as the docs say, the WAN back.
        new_home = tmp_path / "new-disk"
        mover = started(stack, StoreSCP(tmp_path / "moved"))
        restored = PasProcess(new_home, {**ENV, "PAS_SERVING__MOVE_DESTINATIONS": (
            f'[{{title = "{mover.ae_title}", host = "127.0.0.1", port = {mover.port}}}]')})
        restored.cli("restore", str(folder))
        hub.start()
        started(stack, restored)
        db = new_home / "pas.sqlite"
        # The status page and /api/status: the restored backup is the last one.
        status_page = f"http://127.0.0.1:{restored.http_port}/"
        assert f"{folder} (restored from it " in httpx.get(status_page, timeout=10).text
        assert httpx.get(status_page + "api/status", timeout=10).json()["backup"][
            "folder"] == str(folder)
        assert len(_indexed(db, _uid(confirmed_a)) | _indexed(db, _uid(confirmed_b))) == 6
        assert _count(db, "SELECT count(*) FROM integrity_issues WHERE kind = 'missing' "
                          "AND resolved_at IS NULL") == 21

        web = f"http://127.0.0.1:{restored.http_port}/dicom-web/studies/"
        answer = httpx.get(web + _uid(confirmed_a), timeout=60,
                           headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert answer.status_code == 200
        assert _sha256s(_parts(answer)) == _indexed(folder / "pas.sqlite", _uid(confirmed_a))

        out = tmp_path / "viewer"
        out.mkdir()
        got = subprocess.run(["getscu", "-S", "-aet", "VIEWER", "-aec", "PAS", "-od", str(out),
                              "-k", "QueryRetrieveLevel=STUDY",
                              "-k", f"StudyInstanceUID={_uid(confirmed_b)}",
                              "127.0.0.1", str(restored.port)],
                             capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
        assert got.returncode == 0, got.stderr
        # getscu writes its own file meta: the instances by UID, and the spool's files put
        # back with the bytes the index recorded.
        assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in out.iterdir()} == {str(dcmread(p, stop_before_pixels=True)
                                                .SOPInstanceUID) for p in confirmed_b}
        rows = read_rows(db, "SELECT i.path, i.sha256 FROM instances i JOIN studies s "
                             "ON s.id = i.study_fk WHERE s.study_uid = ?", (_uid(confirmed_b),))
        assert len(rows) == 3
        for row in rows:
            assert _sha256s([(new_home / "spool" / row["path"]).read_bytes()]) == \
                {row["sha256"]}

        series_out = tmp_path / "viewer-series"
        series_out.mkdir()
        _one_series_or_instance_each(new_home, restored.port, restored.http_port, by_series,
                                     by_image, web_series, web_image, mover, series_out)

        # The region never had the queued study: a clear answer before the status line.
        lost = httpx.get(web + _uid(queued), timeout=60,
                         headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert lost.status_code == 404
        assert lost.json()["detail"] == (
            f"3 instances of study {_uid(queued)} asked for lost their file on this "
            "appliance (flagged missing: pas cache status) and the region does not hold "
            "them (never confirmed there): send the study again from its modality")
        # And to a C-GET of one of its series: refused before any sub-operation, the
        # cause first in the Error Comment (it failed its sub-operation: file not found).
        status, comment, arrived = _get(restored.port, _uid(queued), _series_uid(queued[0]))
        assert (status, comment, arrived) == (
            0xC000, "1 instance lost here, not at the region: send study 1.3.6.1.4...", 0)
        # The files fetched again are whole: their flags resolved (the whole of each study
        # asked for below the study level), the lost study's open.
        assert _count(db, "SELECT count(*) FROM integrity_issues WHERE kind = 'missing' "
                          "AND resolved_at IS NULL") == 3
        assert _count(db, "SELECT count(*) FROM integrity_issues WHERE kind = 'missing' "
                          "AND resolution = 'fetched again from the region'") == 18

        # Its job cannot send what is gone: it fails at once saying so (it failed each try
        # on FileNotFoundError, for queue.max_attempts tries and hours of backoff).
        job = wait_for(lambda: next(iter(read_rows(
            db, "SELECT j.* FROM jobs j JOIN studies s ON s.id = j.study_fk "
                "WHERE s.study_uid = ? AND j.state = 'failed'", (_uid(queued),))), None), 60,
            what="the lost study's job failed")
        # One try, or two on a loaded machine: a try begun before the restored daemon had
        # flagged the files missing meets a bare FileNotFoundError and waits its backoff
        # (2 tries in a local run at 1,281 s); never queue.max_attempts.
        assert job["attempts"] in (1, 2) and job["last_error"] == (
            f"3 instances of study {_uid(queued)} not yet confirmed by the region lost their "
            "file on this appliance (flagged missing: pas cache status): this appliance held "
            "their only copy. Send the study again from its modality (the files come back), "
            f"then pas queue retry {job['id']}")
        # The modality sends it again, the operator retries: uploaded once, confirmed.
        storescu(queued, restored.port)
        restored.cli("queue", "retry", str(job["id"]))
        wait_for(lambda: _count(db, "SELECT count(*) FROM instances WHERE confirmed_at "
                                "IS NOT NULL") == 21, 60, what="the re-sent study confirmed")
        assert _count(db, "SELECT count(*) FROM integrity_issues WHERE resolved_at IS NULL") \
            == 0
        assert [r["n"] for r in read_rows(
            hub.home / "hub.sqlite", "SELECT count(*) AS n FROM transfers WHERE study_uid = ? "
                                     "AND receipt IS NOT NULL", (_uid(queued),))] == [1]


def _tree(home: Path) -> dict[str, str]:
    """Every file of a home with its SHA-256: what a refused restore must leave as it was."""
    return {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(home.rglob("*")) if p.is_file() and p.name != "pas.lock"}


def test_a_backup_that_is_not_this_sites_whole_sound_and_known_is_refused(
        tmp_path: Path) -> None:
    """``pas restore`` (the restore was a copy by hand, checked by nothing): another site's
    backup started without a word and spoke to the hub with that site's certificate; a
    newer version's stopped the start with a traceback; a truncated or damaged index was
    found once the home's own had been overwritten. Each is refused in one line, the home
    left as it was; a good one is restored, what the home held set aside."""
    from appliance.ops.home_lock import hold_home_lock
    from appliance.store.db import Database
    from appliance.store.schema import MIGRATIONS

    site = tmp_path / "site"
    Database(site / "pas.sqlite").close()
    (site / "pki").mkdir(mode=0o700)
    (site / "pki" / "client.key").write_bytes(b"the enrolment's key\n")
    (site / "pki" / "client.key").chmod(0o600)
    destination = tmp_path / "backups"
    destination.mkdir()
    backup = Path(json.loads(PasProcess(site, {"PAS_SITE": "SITE-A"}).cli(
        "backup", str(destination), "--json").stdout)["folder"])

    # The appliance the backup goes back on: its own index and enrolment, say a new one.
    home = tmp_path / "home"
    Database(home / "pas.sqlite").close()
    (home / "pki").mkdir(mode=0o700)
    (home / "pki" / "client.key").write_bytes(b"a new enrolment's key\n")
    before = _tree(home)

    def variant(name: str, change: Callable[[Path], None]) -> Path:
        folder = tmp_path / name / backup.name
        shutil.copytree(backup, folder)
        change(folder)
        return folder

    def truncate(folder: Path) -> None:
        index = folder / "pas.sqlite"
        index.write_bytes(index.read_bytes()[:4096])

    def damage(folder: Path) -> None:
        index = folder / "pas.sqlite"
        data = bytearray(index.read_bytes())
        data[4096:4196] = bytes(100)
        index.write_bytes(bytes(data))

    def newer(folder: Path) -> None:  # as a newer PAS writes it: its manifest agrees
        index = folder / "pas.sqlite"
        with sqlite3.connect(index) as conn:
            conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
        conn.close()
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        manifest["software"] = "9.0.0"
        manifest["files"]["pas.sqlite"] = {"bytes": index.stat().st_size,
                                           "sha256": _sha256s([index.read_bytes()]).pop()}
        (folder / "MANIFEST.json").write_text(json.dumps(manifest))

    def undated(folder: Path) -> None:  # the time pas status would give it, unreadable
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        manifest["made_at"] = "yesterday"
        (folder / "MANIFEST.json").write_text(json.dumps(manifest))

    this_site = PasProcess(home, {"PAS_SITE": "SITE-A"})
    refusals = [
        (PasProcess(home, {"PAS_SITE": "SITE-B"}), backup,
         f"{backup} is the backup of site 'SITE-A', and this appliance is site 'SITE-B' (site "
         "in its configuration): restored, it would speak to the hub as that site. Restore a "
         "pas-backup-SITE-B-... folder (or put this site's configuration back first). Nothing "
         "restored"),
        (this_site, variant("truncated", truncate),
         f"{tmp_path}/truncated/{backup.name}/pas.sqlite is 4096 bytes, the manifest says "
         f"{(backup / 'pas.sqlite').stat().st_size} (truncated or damaged): restore an older "
         "backup. Nothing restored"),
        (this_site, variant("damaged", damage),
         f"{tmp_path}/damaged/{backup.name}/pas.sqlite does not have the SHA-256 the manifest "
         "gives (damaged): restore an older backup. Nothing restored"),
        (this_site, variant("newer", newer),
         f"{tmp_path}/newer/{backup.name} was written by a newer PAS (version 9.0.0, index "
         f"schema {len(MIGRATIONS) + 1}; this one knows {len(MIGRATIONS)}): install that "
         "version or a later one, then restore. Nothing restored"),
        (this_site, variant("undated", undated),
         f"{tmp_path}/undated/{backup.name}/MANIFEST.json: made_at 'yesterday' is not a UTC "
         "time (YYYY-MM-DDTHH:MM:SSZ): the manifest is damaged; nothing restored"),
    ]
    for pas, folder, said in refusals:
        refused = pas.cli("restore", str(folder), check=False)
        assert refused.returncode == 1, refused.stdout
        assert " ".join(refused.stderr.split()) == f"refused: {said}"
        assert _tree(home) == before
    lock = hold_home_lock(home)  # as pas run holds it
    try:
        refused = this_site.cli("restore", str(backup), check=False)
    finally:
        lock.close()
    assert refused.returncode == 1
    assert " ".join(refused.stderr.split()) == (
        f"refused: another pas run (pid {os.getpid()}) is using {home}: one daemon per "
        "PAS_HOME; stop it first (systemctl stop pas)")
    assert _tree(home) == before

    done = this_site.cli("restore", str(backup))
    assert done.returncode == 0, done.stderr
    assert _sha256s([(home / "pas.sqlite").read_bytes()]) != {before["pas.sqlite"]}
    assert (home / "pki" / "client.key").read_bytes() == b"the enrolment's key\n"
    assert stat.S_IMODE((home / "pki" / "client.key").stat().st_mode) == 0o600
    [index_aside] = home.glob("pas.sqlite.before-restore-*")
    [pki_aside] = home.glob("pki.before-restore-*")
    assert _sha256s([index_aside.read_bytes()]) == {before["pas.sqlite"]}
    assert (pki_aside / "client.key").read_bytes() == b"a new enrolment's key\n"
    [row] = read_rows(home / "pas.sqlite", "SELECT actor, detail FROM audit "
                                           "WHERE event = 'recovery'")
    assert row["actor"].startswith("operator")
    assert row["detail"].startswith(f"pas restore: the index and the enrolment of {backup}")


def test_a_newer_versions_database_stops_the_start_in_one_line(tmp_path: Path) -> None:
    """A backup a newer PAS wrote, put back by hand (or a downgrade): ``pas run`` and
    ``pas hub run`` refused it with a traceback; one line now, exit 1, the file untouched."""
    from appliance.store.db import Database
    from appliance.store.hub import open_hub_db
    from appliance.store.hub_schema import HUB_MIGRATIONS
    from appliance.store.schema import MIGRATIONS

    home = tmp_path / "pas"
    Database(home / "pas.sqlite").close()
    hub = HubProcess(tmp_path / "hub").init()
    open_hub_db(hub.home / "hub.sqlite").close()
    for process, path, known in ((PasProcess(home), home / "pas.sqlite", len(MIGRATIONS)),
                                 (hub, hub.home / "hub.sqlite", len(HUB_MIGRATIONS))):
        with sqlite3.connect(path) as conn:
            conn.execute(f"PRAGMA user_version = {known + 1}")
        conn.close()
        refused = process.cli("run", check=False)
        said = " ".join(refused.stderr.split())
        assert refused.returncode == 1, refused.stderr
        assert "Traceback" not in refused.stderr and said.endswith(
            f"{path}: database schema version {known + 1} is newer than this software knows "
            f"({known}); refusing to run an old version on it: a newer PAS wrote it "
            "(reinstall that version)"), said
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == known + 1
        conn.close()


def test_a_lost_file_sent_again_is_served_without_a_region(tmp_path: Path) -> None:
    """An appliance with no region to fetch from: a file lost (flagged missing at the
    start) is a WADO-RS 404 and a C-GET refused saying so (its sub-operation failed, file
    not found); sent again by its modality it is served, its flag resolved, not taken for
    lost until the next ``pas verify``."""
    [files] = _studies(1)
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_PREFETCH__ENABLED": "false"})
    with contextlib.ExitStack() as stack:
        started(stack, pas)
        storescu(files[:1], pas.port)
        pas.stop()
        db = pas.home / "pas.sqlite"
        [row] = read_rows(db, "SELECT path, sha256 FROM instances")
        (pas.home / "spool" / row["path"]).unlink()
        pas.start()
        web = f"http://127.0.0.1:{pas.http_port}/dicom-web/studies/{_uid(files)}"
        accept = {"Accept": 'multipart/related; type="application/dicom"'}
        assert httpx.get(web, headers=accept, timeout=60).status_code == 404
        assert _get(pas.port, _uid(files)) == (
            0xC000, "1 instance lost here, no region to fetch from: send study 1.3...", 0)
        storescu(files[:1], pas.port)
        answer = httpx.get(web, headers=accept, timeout=60)
        assert answer.status_code == 200
        assert _get(pas.port, _uid(files)) == (0x0000, "", 1)
        assert _sha256s(_parts(answer)) == {row["sha256"]}
        assert [r["resolution"] for r in read_rows(
            db, "SELECT resolution FROM integrity_issues")] == ["file present again"]


def test_status_and_doctor_name_the_restored_backup_as_the_last_one(tmp_path: Path) -> None:
    """A backup's index is copied before ``pas backup`` writes its ``export`` audit row, so
    the restored index did not hold it: ``pas status`` and ``pas doctor`` then said "never"
    (an index three days old: "no pas backup was ever written of this index"), or named the
    backup before. The restore records the backup it put back, with its manifest's time; a
    backup written after the restore is the last one again."""
    import calendar
    import time

    from appliance.store.db import Database

    site = tmp_path / "site"
    Database(site / "pas.sqlite").close()
    with sqlite3.connect(site / "pas.sqlite") as conn:  # an index in use for three days
        conn.execute("INSERT INTO audit (at, event, actor, outcome, detail) VALUES "
                     "(?, 'config', 'operator:test', 'success', 'first start')",
                     (time.time() - 3 * 86400,))
    conn.close()
    destination = tmp_path / "backups"
    destination.mkdir()
    backup = Path(json.loads(PasProcess(site, {"PAS_SITE": "SITE-A"}).cli(
        "backup", str(destination), "--json").stdout)["folder"])
    made_at = calendar.timegm(time.strptime(
        json.loads((backup / "MANIFEST.json").read_text())["made_at"], "%Y-%m-%dT%H:%M:%SZ"))

    restored = PasProcess(tmp_path / "home", {"PAS_SITE": "SITE-A"})
    said = " ".join(restored.cli("restore", str(backup)).stdout.split())
    # Not enrolled when it was written: said so (it said "and the enrolment").
    assert ("the index (0 instances); it held no enrolment (not enrolled when it was "
            "written)") in said and "and the enrolment" not in said, said
    [row] = read_rows(tmp_path / "home" / "pas.sqlite",
                      "SELECT detail FROM audit WHERE event = 'recovery'")
    assert row["detail"].startswith(f"pas restore: the index of {backup}"), row["detail"]
    state = restored.status()["backup"]
    assert (state["last_at"], state["folder"], state["stale"]) == (made_at, str(backup), False)
    assert state["restored_at"] is not None and state["restored_at"] >= made_at
    said = restored.cli("status").stdout
    assert f"{backup}, restored" in " ".join(said.replace("│", " ").split())
    checks = {c["name"]: c for c in json.loads(
        restored.cli("doctor", "--json", check=False).stdout)}
    assert checks["backup"]["verdict"] == "ok", checks["backup"]
    assert checks["backup"]["detail"].startswith(f"0 min ago: {backup} (restored from it "), \
        checks["backup"]
    # The next backup, of the restored index: the last one again, not the restored one.
    after = tmp_path / "after"
    after.mkdir()
    newer = Path(json.loads(restored.cli("backup", str(after), "--json").stdout)["folder"])
    state = restored.status()["backup"]
    assert (state["folder"], state["restored_at"]) == (str(newer), None)


def test_a_backup_to_a_relative_folder_is_found_from_anywhere(tmp_path: Path) -> None:
    """``pas backup b`` recorded the folder as given, relative to where it ran: ``pas status``
    and ``pas doctor``, run from another directory, then named a backup that was not there.
    The folder is recorded absolute."""
    from appliance.store.db import Database

    site = tmp_path / "site"
    Database(site / "pas.sqlite").close()
    pas = PasProcess(site, {"PAS_SITE": "SITE-A"})
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "b").mkdir(parents=True)
    elsewhere.mkdir()
    made = run_pas([*pas.cli_prefix, "backup", "b", "--json"], pas.env, cwd=work, timeout=60,
                   check=True)
    folder = Path(json.loads(made.stdout)["folder"])
    assert folder.is_absolute() and folder.parent == work / "b", folder
    status = run_pas([*pas.cli_prefix, "status", "--json"], pas.env, cwd=elsewhere, timeout=60,
                     check=True)
    assert json.loads(status.stdout)["backup"]["folder"] == str(folder)


def _backup_of_site_a(tmp_path: Path, *options: str) -> Path:
    """A real ``pas backup`` of a home of site SITE-A, written by this version."""
    from appliance.store.db import Database

    site = tmp_path / "site"
    Database(site / "pas.sqlite").close()
    destination = tmp_path / "backups"
    destination.mkdir()
    return Path(json.loads(PasProcess(site, {"PAS_SITE": "SITE-A"}).cli(
        "backup", str(destination), "--json", *options).stdout)["folder"])


def _edit_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    change(manifest)
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def test_a_backup_written_before_manifests_named_their_kind_is_restored(
        tmp_path: Path) -> None:
    """Every backup written before 2026-12-05 (its ``MANIFEST.json`` has no ``kind``, nor
    ``site_from``) was refused: "is not a pas backup (its MANIFEST.json says kind None)". It
    is restored; a hub's backup is refused naming it as one and its command, and a folder
    whose manifest has neither a kind nor what a pas backup's has is refused naming what it
    lacks."""
    backup = _backup_of_site_a(tmp_path)
    _edit_manifest(backup, lambda m: (m.pop("kind"), m.pop("site_from")))
    home = tmp_path / "home"
    pas = PasProcess(home, {"PAS_SITE": "SITE-A"})
    done = pas.cli("restore", str(backup), check=False)
    assert done.returncode == 0, done.stderr
    assert f"restored {backup} in {home}: the index (0 instances)" in \
        " ".join(done.stdout.split())
    [row] = read_rows(home / "pas.sqlite", "SELECT detail FROM audit WHERE event = 'recovery'")
    assert row["detail"].startswith(f"pas restore: the index of {backup}"), row["detail"]

    hub = HubProcess(tmp_path / "hub").init()
    hub.token("SITE-A")  # its hub.sqlite
    (tmp_path / "hub-backups").mkdir()
    hub_backup = Path(json.loads(hub.cli("backup", str(tmp_path / "hub-backups"),
                                         "--json").stdout)["folder"])
    kindless_hub = tmp_path / "kindless-hub" / hub_backup.name
    shutil.copytree(hub_backup, kindless_hub)
    _edit_manifest(kindless_hub, lambda m: m.pop("kind"))
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "MANIFEST.json").write_text(json.dumps({"files": {"a.jpg": {}}}))
    other = PasProcess(tmp_path / "other", {"PAS_SITE": "SITE-A"})
    for folder, said in (
            (hub_backup, f"{hub_backup} is a hub's backup (its MANIFEST.json says kind 'pas hub "
                         "backup'), not an appliance's: pas hub restore puts it back on the "
                         "hub; nothing restored"),
            (kindless_hub, f"{kindless_hub} is not a pas backup: its MANIFEST.json names no "
                           "kind, nor has it what an older pas backup's has (no site, "
                           "instances, studies): nothing restored"),
            (unrelated, f"{unrelated} is not a pas backup: its MANIFEST.json names no kind, "
                        "nor has it what an older pas backup's has (no site, made_at, "
                        "software, schema, instances, studies): nothing restored")):
        refused = other.cli("restore", str(folder), check=False)
        assert refused.returncode == 1, refused.stdout
        assert " ".join(refused.stderr.split()) == f"refused: {said}"
        assert not (other.home / "pas.sqlite").exists()


def test_restoring_an_older_versions_backup_migrates_the_restored_index_not_the_backup(
        tmp_path: Path) -> None:
    """What docs/operations.md says of a backup an older version wrote: the index ``pas
    restore`` puts in the home is migrated to this version's schema there (an older version
    then refuses to run on it); the backup's own ``pas.sqlite`` is copied, never changed, so
    that version's ``pas restore`` can put it back again."""
    from appliance.store.db import Database, SchemaTooNew
    from appliance.store.ops import schema_version_of
    from appliance.store.schema import MIGRATIONS

    backup = _backup_of_site_a(tmp_path)
    index = backup / "pas.sqlite"
    index.unlink()
    Database(index, migrations=MIGRATIONS[:1]).close()  # as the first release wrote it
    written = index.read_bytes()

    def older(manifest: dict[str, Any]) -> None:
        manifest.update(software="0.1.0", schema=1)
        manifest["files"]["pas.sqlite"] = {"bytes": len(written),
                                           "sha256": _sha256s([written]).pop()}

    _edit_manifest(backup, older)
    home = tmp_path / "home"
    PasProcess(home, {"PAS_SITE": "SITE-A"}).cli("restore", str(backup))
    assert schema_version_of(home / "pas.sqlite") == len(MIGRATIONS)
    assert index.read_bytes() == written and schema_version_of(index) == 1
    with pytest.raises(SchemaTooNew):  # the first release refuses it
        Database(home / "pas.sqlite", migrations=MIGRATIONS[:1])


def test_restore_names_where_this_pas_reads_its_configuration(tmp_path: Path) -> None:
    """``pas restore`` said to put the backup's configuration back at the path it had on the
    appliance that wrote it (its manifest's ``config_file``), which may be no place this PAS
    reads. It names where this PAS reads it: the ``--config`` given, else the file found as
    ``pas run`` finds it, else where one would be read (here ``$PAS_HOME/appliance.toml``)."""
    written_with = tmp_path / "old-etc" / "appliance.toml"
    written_with.parent.mkdir()
    written_with.write_text('site = "SITE-A"\n')
    backup = _backup_of_site_a(tmp_path, "--config", str(written_with))
    assert json.loads((backup / "MANIFEST.json").read_text())["config_file"] == \
        str(written_with)
    read_here = tmp_path / "etc" / "pas.toml"
    read_here.parent.mkdir()
    read_here.write_text('site = "SITE-A"\n')
    for name, options, where in (
            ("given", ("--config", str(read_here)), f"{read_here}, its --config"),
            ("none", (), f"{tmp_path / 'none' / 'appliance.toml'}: none there now, it runs on "
                         "its defaults and PAS_* variables")):
        pas = PasProcess(tmp_path / name, {"PAS_SITE": "SITE-A"})
        pas.env.pop("PAS_CONFIG", None)
        said = " ".join(pas.cli("restore", str(backup), *options).stdout.split())
        assert (f"the backup's configuration is {backup / 'appliance.toml'}: put it back "
                f"where this PAS reads it ({where}) if it is lost") in said, said
        assert str(written_with) not in said
    # Found as pas run finds it: $PAS_HOME/appliance.toml.
    pas = PasProcess(tmp_path / "found", {"PAS_SITE": "SITE-A"})
    pas.env.pop("PAS_CONFIG", None)
    pas.home.mkdir()
    (pas.home / "appliance.toml").write_text('site = "SITE-A"\n')
    said = " ".join(pas.cli("restore", str(backup)).stdout.split())
    assert f"put it back where this PAS reads it ({pas.home / 'appliance.toml'}) if" in said

"""``pas hub backup`` (appliance/hub/backup.py; docs/operations.md, "Backing up the hub").

The hub's home holds what no other place does: the fleet CA and its key (lost, every appliance
of the region is enrolled again), the transfer key, the enrolments and revocations, the signed
receipts, the fleet's heartbeats. ``pas hub run`` on a damaged ``hub.sqlite`` tells regional
ops to restore the home from a backup, and there was no tool to make one (``cp`` of a WAL
database being written can be torn).

A real hub, an appliance enrolled through it, a committed transfer, another one half sent, a
revoked site, a heartbeat: the backup is taken while the hub serves, restored into an empty
home, a hub started on it; the same client certificate is still let in, the receipt still
served, the revoked site still refused, the half-sent transfer asked for again whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from appliance.hub.pki import verify_receipt
from appliance.store.hub import open_hub_db, revoke_site
from appliance.transfer.enrolment import Enrolment
from tests.support.hub import HubProcess, enroll, pack_items, ship
from tests.support.peers import MR_DIR, PAS_BIN

PKI_FILES = {"ca.key", "ca.crt", "server.key", "server.crt", "transfer.key", "transfer.pub"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _session(hub: HubProcess, enrolment: Enrolment) -> httpx.Client:
    """The enrolled appliance's own identity (its key, its certificate, the CA it pinned),
    talking to ``hub`` wherever it now listens."""
    return httpx.Client(base_url=hub.url, verify=enrolment.ssl_context(), timeout=60)


def _beat(site: str) -> dict:
    return {"site": site, "sent_at": time.time(), "version": "0.1.0", "uptime_s": 5,
            "backlog": {"studies": 0, "bytes": 0, "oldest_age_s": 0.0,
                        "urgent_oldest_age_s": 0.0, "routine_oldest_age_s": 0.0},
            "jobs": {"pending": 0, "running": 0, "failed": 0},
            "disk": {"used_percent": 40.0, "free_bytes": 10 << 30},
            "received": {"instances": 12, "bytes": 12000}, "confirmed_instances": 6,
            "cert_days_left": 800.0, "errors": []}


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub").init()
    yield process
    process.stop()


def test_a_hub_backup_taken_while_it_serves_restores_the_fleet(
        hub: HubProcess, tmp_path: Path) -> None:
    (hub.home / "hub.toml").write_text("[transfers]\nabandoned_after_days = 20\n")
    hub.start()
    site = enroll(hub, tmp_path / "site", "CHU-NORD")
    gone = enroll(hub, tmp_path / "gone", "CHU-SUD")
    live = open_hub_db(hub.home / "hub.sqlite")
    try:
        assert revoke_site(live, "CHU-SUD") == (1, 0)
    finally:
        live.close()
    mr = sorted(p for p in MR_DIR.rglob("*") if p.is_file())
    study_uid = str(dcmread(mr[0], stop_before_pixels=True).StudyInstanceUID)
    committed = ship(pack_items(mr[:6]), site.hub_transfer_key, 256 << 10, study_uid)
    half_sent = ship(pack_items(mr[6:12]), site.hub_transfer_key, 128 << 10, "1.2.3.4")
    assert len(half_sent.buckets) >= 2
    with _session(hub, site) as http:
        assert http.post("/api/v1/heartbeat", json=_beat("CHU-NORD")).status_code == 201
        assert http.post("/api/v1/transfers", json=committed.manifest).status_code == 201
        assert committed.put_all(http) == [201] * len(committed.buckets)
        answer = http.post(committed.url + "/commit")
        assert answer.status_code == 200, answer.text
        receipt = answer.json()
        assert http.post("/api/v1/transfers", json=half_sent.manifest).status_code == 201
        assert http.put(half_sent.bucket_url(0), content=half_sent.buckets[0]).status_code \
            == 201

        destination = tmp_path / "backups"
        destination.mkdir()
        made = hub.cli("backup", str(destination), "--json")  # the hub serving meanwhile
        # The live hub changed nothing: the half-sent transfer's bucket is still held there.
        assert http.get(half_sent.url + "/buckets").json()["held"] == [0]
    # Enrolled after the backup: the restored hub never issued that certificate.
    late_site = enroll(hub, tmp_path / "late", "CHU-EST")
    manifest = json.loads(made.stdout)
    folder = Path(manifest["folder"])
    assert folder.parent == destination and folder.name.startswith("pas-hub-backup-")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in destination.iterdir()) == [folder.name]  # no partial left
    # The export is said, with who and where (the hub has no audit table).
    assert "WARNING" in made.stderr and f"hub backup written to {folder} by operator" \
        in made.stderr

    # Every file the manifest names, with its SHA-256, the home's own layout; nothing else.
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*")
               if p.is_file() and p.name != "MANIFEST.json"}
    assert on_disk == set(manifest["files"]) == PKI_FILES | {"hub.sqlite", "hub.toml",
                                                             "archive/pas.sqlite"}
    for name, entry in manifest["files"].items():
        assert _sha256(folder / name) == entry["sha256"], name
        assert (folder / name).stat().st_size == entry["bytes"], name
    for name in PKI_FILES:
        assert _sha256(folder / name) == _sha256(hub.home / name), name
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    assert (folder / "hub.toml").read_bytes() == (hub.home / "hub.toml").read_bytes()
    assert manifest["config_file"] == str(hub.home / "hub.toml")
    assert (manifest["sites_enrolled"], manifest["certificates"],
            manifest["certificates_revoked"]) == (1, 2, 1)
    assert (manifest["transfers_committed"], manifest["transfers_not_committed"],
            manifest["transfers_staging_not_in_backup"]) == (1, 1, 1)
    assert (manifest["fleet_sites"], manifest["heartbeats"]) == (1, 1)
    assert manifest["schema"] >= 5 and manifest["missing"] == []
    with sqlite3.connect(folder / "hub.sqlite") as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        ahead = copy.execute("SELECT count(*) FROM archived_instances WHERE transfer_id = ?",
                             (half_sent.transfer_id,)).fetchone()[0]
    # The archive's index is copied after the hub's database: every instance the hub says
    # it archived (ahead of a commit, from the half-sent transfer's first bucket) is in it.
    assert manifest["archive"]["kind"] == "embedded"
    assert 6 + ahead <= manifest["archive"]["instances"] <= 12

    # The hub host lost: an empty home, the backup's files put back, a hub started on it.
    hub.stop()
    restored = HubProcess(tmp_path / "restored")
    shutil.copytree(folder, restored.home, ignore=shutil.ignore_patterns("MANIFEST.json"))
    restored.start()
    try:
        with _session(restored, site) as http:
            # The same appliance, with the certificate it was enrolled with: still let in.
            assert http.get("/api/v1/whoami").json() == {"site": "CHU-NORD"}
            kept = http.get(committed.url + "/receipt")
            assert kept.status_code == 200 and kept.json() == receipt
            assert verify_receipt(kept.json(), (restored.home / "server.crt").read_bytes())
            qido = http.get("/api/v1/region/dicom-web/studies",
                            params={"StudyInstanceUID": study_uid})
            assert qido.status_code == 200 and qido.json()[0]["0020000D"]["Value"] == \
                [study_uid]
            assert 'data-site="CHU-NORD"' in http.get("/fleet").text
            # The half-sent transfer: no bucket promised that the backup does not hold; the
            # site sends them all and commits.
            assert http.get(half_sent.url + "/buckets").json()["held"] == []
            assert half_sent.put_all(http) == [201] * len(half_sent.buckets)
            late = http.post(half_sent.url + "/commit")
            assert late.status_code == 200, late.text
            assert {i["sha256"] for i in late.json()["instances"]} == \
                set(half_sent.originals.values())
        with _session(restored, gone) as http:  # its revocation came back with the rest
            refused = http.get("/api/v1/whoami")
            assert refused.status_code == 403
            assert refused.json()["error"] == "certificate_revoked"
        with _session(restored, late_site) as http:  # docs: it enrols again
            refused = http.get("/api/v1/whoami")
            assert refused.status_code == 403
            assert refused.json()["error"] == "certificate_unknown"
    finally:
        restored.stop()


def test_a_destination_that_cannot_hold_the_backup_is_refused(
        hub: HubProcess, tmp_path: Path) -> None:
    before = _sha256(hub.home / "hub.sqlite")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    subprocess.run(["chattr", "+i", str(locked)], check=True)  # not even root writes in it
    try:
        for destination, said in [
                (a_file, f"{a_file} is not a folder"),
                (tmp_path / "nowhere", f"{tmp_path / 'nowhere'} is not a folder (it does "
                                       "not exist)"),
                (locked, f"cannot write in {locked}: Operation not permitted"),
                # Inside the hub's home: emptied at the next start (downloads/), while the
                # fleet page named it the last good backup; lost with the home anyway.
                (hub.home / "downloads", f"{hub.home / 'downloads'} is inside the hub's home "
                 f"{hub.home}: a backup there is lost with the home (and the hub empties "
                 "downloads/ at each start); write it on another disk or a share"),
                (hub.home, f"{hub.home} is inside the hub's home")]:
            refused = hub.cli("backup", str(destination), check=False)
            assert refused.returncode == 1, refused.stdout
            assert f"refused: {said}" in " ".join(refused.stderr.split()), refused.stderr
        assert list(locked.iterdir()) == []
        assert not list((hub.home / "downloads").glob("pas-hub-backup-*"))
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert a_file.read_text() == "not a folder\n" and not (tmp_path / "nowhere").exists()
    assert _sha256(hub.home / "hub.sqlite") == before


def test_a_home_that_is_not_a_hubs_is_refused(tmp_path: Path) -> None:
    destination = tmp_path / "backups"
    destination.mkdir()
    missing = HubProcess(tmp_path / "no-home")
    refused = missing.cli("backup", str(destination), check=False)
    assert refused.returncode == 1
    assert f"refused: no hub home at {missing.home}" in " ".join(refused.stderr.split())
    # An appliance's home, or any folder: no fleet CA in it.
    other = HubProcess(tmp_path / "pas-home")
    other.home.mkdir()
    (other.home / "pas.sqlite").write_bytes(b"")
    refused = other.cli("backup", str(destination), check=False)
    assert refused.returncode == 1
    assert f"refused: {other.home} is not a hub's home: no ca.crt" in \
        " ".join(refused.stderr.split())
    # A hub's home this user may not read (root here: the test drops the capabilities that
    # let root read any file): the hub's user is named, not the appliance's.
    closed = HubProcess(tmp_path / "closed").init()
    (closed.home / "ca.key").chmod(0)
    blind = "-dac_override,-dac_read_search"
    drop = (["setpriv", f"--bounding-set={blind}", f"--inh-caps={blind}"]
            if os.geteuid() == 0 else [])
    refused = subprocess.run([*drop, str(PAS_BIN), "hub", "backup", str(destination)],
                             env=closed.env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert f"permission denied: {closed.home / 'ca.key'}: run as the hub's user (sudo -u " \
        "pas-hub env PAS_HUB_HOME=/var/lib/pas-hub pas hub ...)" in \
        " ".join(refused.stderr.split())
    assert list(destination.iterdir()) == []


@pytest.mark.parametrize("step", [-1, 1])
def test_a_hub_database_of_another_schema_is_refused_naming_the_way_out(
        tmp_path: Path, step: int) -> None:
    """The CLI upgraded (a new hub migration) while the running hub, not restarted, keeps
    the schema before: the backup was refused on the copy, naming the temporary folder's
    file (removed by then) and the appliance's daemon (``pas run, systemctl restart pas``)
    as what migrates it. An older CLI on a newer database: the same. Refused before
    anything is copied."""
    from appliance.store.hub_schema import HUB_MIGRATIONS

    known = len(HUB_MIGRATIONS)
    hub = HubProcess(tmp_path / "hub").init()
    database = hub.home / "hub.sqlite"
    with sqlite3.connect(database) as conn:
        conn.execute(f"PRAGMA user_version = {known + step}")
    conn.close()
    destination = tmp_path / "backups"
    destination.mkdir()
    refused = hub.cli("backup", str(destination), check=False)
    assert refused.returncode == 1, refused.stdout
    said = " ".join(refused.stderr.split())
    if step < 0:
        assert (f"refused: the hub database {database} is at schema {known - 1}, older than "
                f"this software's ({known}): the pas-hub service is the version before the "
                "upgrade (or stopped); restart it (systemctl restart pas-hub: it migrates the "
                "database at its start), then back up again. No backup written") in said, said
    else:
        assert (f"refused: the hub database {database} is at schema {known + 1}, newer than "
                f"this software knows ({known}): run the pas hub backup of the version the "
                "pas-hub service runs. No backup written") in said, said
    assert list(destination.iterdir()) == []


def test_images_committed_after_the_backup_are_found_again_by_the_restored_hub(
        hub: HubProcess, tmp_path: Path) -> None:
    """The documented hub restore: the backup's files in an empty home, ``archive/spool``
    back from the storage's backup. A transfer committed after the backup had its files in
    that spool and no row in the restored archive index: the region's QIDO-RS listed 3 of the
    6 instances its sites hold receipts for. The hub indexes them again at its start."""
    hub.start()
    site = enroll(hub, tmp_path / "site", "CHU-NORD")
    mr = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:6]
    study_uid = str(dcmread(mr[0], stop_before_pixels=True).StudyInstanceUID)
    destination = tmp_path / "backups"
    destination.mkdir()
    with _session(hub, site) as http:
        for index, files in enumerate((mr[:3], mr[3:])):
            shipment = ship(pack_items(files), site.hub_transfer_key, 256 << 10, study_uid)
            assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
            assert shipment.put_all(http) == [201] * len(shipment.buckets)
            assert http.post(shipment.url + "/commit").status_code == 200
            if index == 0:
                folder = Path(json.loads(hub.cli("backup", str(destination), "--json").stdout)
                              ["folder"])
    hub.stop()
    restored = HubProcess(tmp_path / "restored")
    shutil.copytree(folder, restored.home, ignore=shutil.ignore_patterns("MANIFEST.json"))
    shutil.copytree(hub.home / "archive" / "spool", restored.home / "archive" / "spool")
    restored.start()
    try:
        with _session(restored, site) as http:
            listed = http.get(f"/api/v1/region/dicom-web/studies/{study_uid}/instances")
            assert listed.status_code == 200, listed.text
            assert {i["00080018"]["Value"][0] for i in listed.json()} == \
                {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in mr}
        assert "embedded archive: 3 instances in its spool but in no row of its index" \
            in restored.log()
    finally:
        restored.stop()

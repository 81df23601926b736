"""``pas hub restore`` (appliance/hub/restore.py; docs/operations.md, "Backing up the hub").

The hub's restore was a copy by hand ("copy the backup's files except MANIFEST.json into the
empty home"), checked by nothing: a truncated or damaged backup, one a newer version wrote, a
copy beside a hub still serving or over another hub's fleet CA were found, if at all, once the
hub ran on them. A real ``pas hub run`` with an enrolled site and a committed transfer is
backed up by ``pas hub backup``, restored by ``pas hub restore`` into the empty home of a
rebuilt host, and a hub started on it lets the same site in with the certificate it was
enrolled with. Each refusal is one line, exit 1, and the home byte for byte as it was.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from appliance.hub.pki import verify_receipt
from appliance.ops.backup_folder import utc_stamp
from appliance.store.db import Database
from appliance.store.hub_schema import HUB_MIGRATIONS
from appliance.transfer.enrolment import Enrolment
from tests.support.hub import HubProcess, Shipment, enroll, pack_items, ship
from tests.support.peers import MR_DIR, run_pas, wait_for

NOBODY = 65534  # the rebuilt host's home belongs to the hub's user, not to root


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(home: Path) -> dict[str, str]:
    """Every file of a home with its SHA-256 (its log, its lock and SQLite's shared-memory
    index, which a reader rewrites, left out): what a refused restore must leave as it was."""
    return {str(p.relative_to(home)): _sha256(p) for p in sorted(home.rglob("*"))
            if p.is_file() and p.name not in ("hub.log", "hub.lock")
            and not p.name.endswith("-shm")}


def _rows(database: Path) -> tuple[list[str], dict]:
    """A database's schema and rows as SQL text (migration 7's row left out), and that row."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rest = [line for line in conn.iterdump() if not line.startswith('INSERT INTO "hub_backup"')]
        return rest, dict(conn.execute("SELECT * FROM hub_backup").fetchone())
    finally:
        conn.close()


def _as_backed_up_naming(placed: Path, folder: Path, manifest: dict) -> None:
    """The restored ``hub.sqlite`` holds the backup's rows, but for migration 7's: it names
    the backup restored as the last one (its folder, its ``made_at``), ``since`` unchanged."""
    rest, record = _rows(placed)
    backed_up, before = _rows(folder / "hub.sqlite")
    assert rest == backed_up
    assert record["written_at"] == calendar.timegm(time.strptime(manifest["made_at"],
                                                                 "%Y-%m-%dT%H:%M:%SZ"))
    assert record["folder"] == str(folder) and record["since"] == before["since"]
    assert record["actor"].startswith("restored by operator:"), record


def _session(hub: HubProcess, enrolment: Enrolment) -> httpx.Client:
    """The enrolled appliance's own identity (its key, its certificate, the CA it pinned),
    talking to ``hub`` wherever it now listens."""
    return httpx.Client(base_url=hub.url, verify=enrolment.ssl_context(), timeout=60)


def _backup(hub: HubProcess, destination: Path) -> tuple[Path, dict]:
    destination.mkdir(exist_ok=True)
    manifest = json.loads(hub.cli("backup", str(destination), "--json").stdout)
    return Path(manifest["folder"]), manifest


def test_a_hub_restored_into_the_empty_home_of_a_rebuilt_host_lets_its_sites_in(
        tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub").init()
    (hub.home / "hub.toml").write_text("[transfers]\nabandoned_after_days = 20\n")
    mr = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:3]
    study_uid = str(dcmread(mr[0], stop_before_pixels=True).StudyInstanceUID)
    hub.start()
    try:
        site = enroll(hub, tmp_path / "site", "CHU-NORD")
        shipment = ship(pack_items(mr), site.hub_transfer_key, 256 << 10, study_uid)
        with _session(hub, site) as http:
            assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
            assert shipment.put_all(http) == [201] * len(shipment.buckets)
            answer = http.post(shipment.url + "/commit")
            assert answer.status_code == 200, answer.text
            receipt = answer.json()
        folder, manifest = _backup(hub, tmp_path / "backups")  # the hub serving meanwhile
    finally:
        hub.stop()
    assert manifest["archive"]["instances"] == 3

    # The rebuilt host: the hub's home, empty, belongs to the hub's user; root restores.
    restored = HubProcess(tmp_path / "restored")
    restored.home.mkdir(mode=0o750)
    os.chown(restored.home, NOBODY, NOBODY)
    done = restored.cli("restore", str(folder))
    said = " ".join(done.stdout.split())
    assert said == (
        f"hub restored in {restored.home} from {folder} (written {manifest['made_at']}): the "
        "database (1 site enrolled, 0 certificates revoked, 1 transfer committed, 0 "
        f"heartbeats), the fleet CA ({manifest['ca_fingerprint'][:16]}...) and keys, the "
        f"embedded archive's index (3 instances of {manifest['archive']['studies']} "
        f"{'study' if manifest['archive']['studies'] == 1 else 'studies'}) "
        f"configuration put back: {restored.home / 'hub.toml'} "
        f"not in it, done at the hub after {manifest['made_at']}: sites enrolled (or enrolled "
        "again) since must enrol again (pas hub token SITE, then pas enroll --replace at the "
        "site: /fleet shows them refused), tokens issued since are gone, revocations since "
        "must be done again "
        f"next: put {restored.home / 'archive' / 'spool'} back from the storage's backup (the "
        "embedded archive's images are not in a hub backup); then systemctl start pas-hub")
    assert "WARNING" in done.stderr and \
        f"hub restored from {folder} by operator:" in done.stderr, done.stderr
    # Every file of the backup in its place, byte for byte, the hub's user's; keys 0600.
    assert set(manifest["files"]) == {"ca.key", "ca.crt", "server.key", "server.crt",
                                      "transfer.key", "transfer.pub", "hub.sqlite",
                                      "archive/pas.sqlite", "hub.toml"}
    for name, entry in manifest["files"].items():
        placed = restored.home / name
        if name == "hub.sqlite":  # the same rows, but for the one naming this backup
            _as_backed_up_naming(placed, folder, manifest)
        else:
            assert _sha256(placed) == entry["sha256"], name
        assert (placed.stat().st_uid, placed.stat().st_gid) == (NOBODY, NOBODY), name
        if name != "hub.toml":  # the configuration keeps its own mode
            assert stat.S_IMODE(placed.stat().st_mode) == 0o600, name
    assert (restored.home / "archive").stat().st_uid == NOBODY
    assert not [p for p in restored.home.rglob("*") if "restoring" in p.name]

    shutil.copytree(hub.home / "archive" / "spool", restored.home / "archive" / "spool")
    restored.start()
    try:
        with _session(restored, site) as http:
            assert http.get("/api/v1/whoami").json() == {"site": "CHU-NORD"}
            kept = http.get(shipment.url + "/receipt")
            assert kept.status_code == 200 and kept.json() == receipt
            assert verify_receipt(kept.json(), (restored.home / "server.crt").read_bytes())
            listed = http.get(f"/api/v1/region/dicom-web/studies/{study_uid}/instances")
            assert listed.status_code == 200, listed.text
            assert {i["00080018"]["Value"][0] for i in listed.json()} == \
                set(shipment.originals)
    finally:
        restored.stop()


def _tear_the_root_page_of(db: Path, table: str) -> None:
    """What a failing disk leaves: ``table``'s root page overwritten."""
    with sqlite3.connect(db) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                            (table,)).fetchone()[0]
    conn.close()
    with open(db, "r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xa5" * page_size)


def _agree(folder: Path, name: str, **fields: str) -> None:
    """The manifest rewritten to agree with ``name`` as it now is (a backup written so, not
    damaged on its way): only the deeper check can find what is wrong."""
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    path = folder / name
    manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest.update(fields)
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def test_a_hub_backup_that_may_not_be_restored_here_is_refused_and_the_home_left_as_it_was(
        tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub").init()
    hub.token("SITE-A")  # a row in enrol_tokens, so that the table has a page of its own
    (hub.home / "archive").mkdir(mode=0o700)
    Database(hub.home / "archive" / "pas.sqlite").close()  # the embedded archive's index
    (hub.home / "hub.toml").write_text("[transfers]\nabandoned_after_days = 20\n")
    backup, manifest = _backup(hub, tmp_path / "backups")
    other = HubProcess(tmp_path / "other").init()  # another hub: its own fleet CA
    known = len(HUB_MIGRATIONS)

    def variant(name: str, change: Callable[[Path], None]) -> Path:
        folder = tmp_path / name / backup.name
        shutil.copytree(backup, folder)
        change(folder)
        return folder

    def appliance_backup(folder: Path) -> None:
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        (folder / "MANIFEST.json").write_text(json.dumps({**manifest, "kind": "pas backup"}))

    def older_appliance_backup(folder: Path) -> None:  # before manifests named their kind
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        del manifest["kind"]
        (folder / "MANIFEST.json").write_text(json.dumps(
            {**manifest, "site": "CHU-TEST", "instances": 0, "studies": 0,
             "files": {**manifest["files"], "pas.sqlite": manifest["files"]["hub.sqlite"]}}))

    def undated(folder: Path) -> None:  # the restored hub's last backup would be unknown
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        (folder / "MANIFEST.json").write_text(json.dumps({**manifest, "made_at": "yesterday"}))

    def truncate(folder: Path) -> None:
        (folder / "hub.sqlite").write_bytes((folder / "hub.sqlite").read_bytes()[:4096])

    def damage(folder: Path) -> None:
        key = bytearray((folder / "ca.key").read_bytes())
        key[40:50] = b"0123456789"
        (folder / "ca.key").write_bytes(bytes(key))

    def torn(name: str, table: str) -> Callable[[Path], None]:
        def change(folder: Path) -> None:
            _tear_the_root_page_of(folder / name, table)
            _agree(folder, name)
        return change

    def newer(folder: Path) -> None:  # as a newer PAS writes it: its manifest agrees
        with sqlite3.connect(folder / "hub.sqlite") as conn:
            conn.execute(f"PRAGMA user_version = {known + 1}")
        conn.close()
        _agree(folder, "hub.sqlite", software="9.0.0")

    empty = tmp_path / "empty"
    empty.mkdir()
    refusals = [
        (hub, empty, f"{empty} holds no MANIFEST.json: not a pas hub backup (or one cut "
                     "short); nothing restored"),
        (hub, variant("appliance", appliance_backup),
         f"{tmp_path}/appliance/{backup.name} is an appliance's backup (its MANIFEST.json says "
         "kind 'pas backup'), not a hub's: pas restore puts it back on its appliance; nothing "
         "restored"),
        (hub, variant("older-appliance", older_appliance_backup),
         f"{tmp_path}/older-appliance/{backup.name} is an appliance's backup (its MANIFEST.json "
         "names no kind, as an appliance's written before 2026-12-05), not a hub's: pas "
         "restore puts it back on its appliance; nothing restored"),
        (hub, variant("undated", undated),
         f"{tmp_path}/undated/{backup.name}/MANIFEST.json: made_at 'yesterday' is not a UTC "
         "time (YYYY-MM-DDTHH:MM:SSZ): the manifest is damaged; nothing restored"),
        (hub, variant("missing", lambda f: (f / "transfer.key").unlink()),
         f"{tmp_path}/missing/{backup.name}/transfer.key is missing (the manifest names it): "
         "the backup is not whole; nothing restored"),
        (hub, variant("truncated", truncate),
         f"{tmp_path}/truncated/{backup.name}/hub.sqlite is 4096 bytes, the manifest says "
         f"{manifest['files']['hub.sqlite']['bytes']} (truncated or damaged): restore an "
         "older backup. Nothing restored"),
        (hub, variant("damaged", damage),
         f"{tmp_path}/damaged/{backup.name}/ca.key does not have the SHA-256 the manifest "
         "gives (damaged): restore an older backup. Nothing restored"),
        (hub, variant("torn", torn("hub.sqlite", "enrol_tokens")),
         f"the hub database {tmp_path}/torn/{backup.name}/hub.sqlite is damaged ("),
        (hub, variant("torn-archive", torn("archive/pas.sqlite", "instances")),
         f"the embedded archive's index {tmp_path}/torn-archive/{backup.name}/archive/"
         "pas.sqlite is damaged ("),
        (hub, variant("newer", newer),
         f"{tmp_path}/newer/{backup.name} was written by a newer PAS (version 9.0.0, hub "
         f"database schema {known + 1}; this one knows {known}): install that version or a "
         "later one, then restore. Nothing restored"),
        (other, backup,
         f"{other.home} holds another fleet CA than the backup's (fingerprint "
         f"{_fingerprint(other.home)[:16]}..., the backup's "
         f"{manifest['ca_fingerprint'][:16]}...): restoring would replace the CA that every "
         "appliance enrolled with this home's hub pins, and each would have to enrol again. "
         "If this home is the one to replace, run it again with --force (its CA is set "
         "aside, not deleted). Nothing restored"),
    ]
    for target, folder, expected in refusals:
        before = _tree(target.home)
        refused = target.cli("restore", str(folder), check=False)
        said = " ".join(refused.stderr.split())
        assert refused.returncode == 1, refused.stdout
        if expected.endswith("damaged ("):  # then SQLite's own words for the damage
            assert said.startswith(f"refused: {expected}") and said.endswith(
                "): restore an older backup. Nothing restored"), said
        else:
            assert said == f"refused: {expected}"
        assert _tree(target.home) == before, folder
        assert not (target.home / "hub.lock").exists()

    # No home named (sudo pas hub restore FOLDER, PAS_HUB_HOME forgotten; or --config with a
    # file naming none): was restored into ./var-hub where the command ran, exit 0, "then
    # systemctl start pas-hub" (whose home had none of it). Refused, nothing created; a
    # default home that holds a hub (a developer's) is still restored, and named whole.
    unnamed = {k: v for k, v in hub.env.items() if k != "PAS_HUB_HOME"}
    config = tmp_path / "hub-without-home.toml"
    config.write_text("[transfers]\nabandoned_after_days = 20\n")
    here = tmp_path / "cwd"
    here.mkdir()
    for extra in ([], ["--config", str(config)]):
        refused = run_pas(["hub", "restore", str(backup), *extra], unnamed, cwd=here,
                          timeout=120)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert " ".join(refused.stderr.split()) == (
            "refused: no hub home named: neither PAS_HUB_HOME nor the configuration names "
            f"one, and the default, var-hub in this folder ({here}/var-hub), holds no hub. "
            "Name the home to put the backup in, as pas-hub.service does: sudo env "
            "PAS_HUB_HOME=/var/lib/pas-hub pas hub restore FOLDER. Nothing restored")
        assert list(here.iterdir()) == []
    shutil.copytree(hub.home, here / "var-hub")
    restored = run_pas(["hub", "restore", str(backup)], unnamed, cwd=here, timeout=120)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert restored.stdout.startswith(f"hub restored in {here}/var-hub from {backup} "), \
        restored.stdout

    # A hub serving on the home: its database and keys are not replaced under it.
    hub.start()
    try:
        before = _tree(hub.home)
        refused = hub.cli("restore", str(backup), check=False)
        assert refused.returncode == 1, refused.stdout
        assert " ".join(refused.stderr.split()) == (
            f"refused: a pas hub run (pid {hub.proc.pid}) is using {hub.home}: one hub per "
            "PAS_HUB_HOME; stop it first (systemctl stop pas-hub). Nothing restored")
        assert _tree(hub.home) == before
        # The lock is the hub's: a second pas hub run on the home (another port) is refused.
        second = HubProcess(hub.home)
        again = second.cli("run", check=False)
        assert again.returncode == 1, again.stdout
        assert " ".join(again.stderr.split()) == (
            f"cannot start the hub: a pas hub run (pid {hub.proc.pid}) is using {hub.home}: "
            "one hub per PAS_HUB_HOME; stop it first (systemctl stop pas-hub)")
        assert _tree(hub.home) == before
    finally:
        hub.stop()

    # Stopped, the same hub's home (its database damaged, say): what differs is set aside,
    # the same keys kept, the operator's configuration left.
    before = _tree(hub.home)
    done = hub.cli("restore", str(backup))
    said = " ".join(done.stdout.split())
    assert "already as in the backup, kept: ca.key, ca.crt, server.key, server.crt, " \
        "transfer.key, transfer.pub" in said, said
    [database_aside] = hub.home.glob("hub.sqlite.before-restore-*Z")  # its -wal beside it
    [archive_aside] = (hub.home / "archive").glob("pas.sqlite.before-restore-*Z")
    assert f"set aside in {hub.home}, not deleted: archive/{archive_aside.name}, " \
        f"{database_aside.name}" in said, said
    assert _sha256(database_aside) == before["hub.sqlite"]
    assert _sha256(archive_aside) == before["archive/pas.sqlite"]
    _as_backed_up_naming(hub.home / "hub.sqlite", backup, manifest)
    assert f"configuration: {hub.home / 'hub.toml'} exists, left as it is (the backup's is " \
        f"{backup / 'hub.toml'})" in said, said

    # Another hub's home, with --force: its CA set aside, the backup's in place. A restore
    # stopped half-way (a folder it cannot write in) says what it put back and set aside,
    # the home's database not replaced yet; run again, it finishes.
    other_ca = _sha256(other.home / "ca.crt")
    other_database = _sha256(other.home / "hub.sqlite")
    (other.home / "archive").mkdir(mode=0o700)
    subprocess.run(["chattr", "+i", str(other.home / "archive")], check=True)
    try:
        stopped = other.cli("restore", "--force", str(backup), check=False)
    finally:
        subprocess.run(["chattr", "-i", str(other.home / "archive")], check=True)
    assert stopped.returncode == 1, stopped.stdout
    assert "ERROR" in stopped.stderr and \
        f"pas.hub.restore: hub restore from {backup} by operator:" in stopped.stderr
    said = " ".join(stopped.stderr.split())
    said = said[said.index("not finished: "):]
    keys = ("ca.key", "ca.crt", "server.key", "server.crt", "transfer.key", "transfer.pub")
    incoming = other.home / "archive" / ".pas.sqlite.restoring"
    assert re.fullmatch(
        rf"not finished: the restore stopped at archive/pas\.sqlite \(Operation not "
        rf"permitted: {re.escape(str(incoming))}\); put back: {re.escape(', '.join(keys))}; "
        "set aside: " + ", ".join(rf"{re.escape(key)}\.before-restore-\d{{8}}T\d{{6}}Z"
                                  for key in keys)
        + r"\. Fix the cause and run pas hub restore again \(what it sets aside stays\)",
        said), said
    assert _sha256(other.home / "hub.sqlite") == other_database
    assert list((other.home / "archive").iterdir()) == []
    done = other.cli("restore", "--force", str(backup))
    [ca_aside] = other.home.glob("ca.crt.before-restore-*Z")
    assert _sha256(ca_aside) == other_ca
    assert _fingerprint(other.home) == manifest["ca_fingerprint"]
    assert (other.home / "hub.toml").read_bytes() == (hub.home / "hub.toml").read_bytes()
    assert f"configuration put back: {other.home / 'hub.toml'}" in " ".join(done.stdout.split())


def _fingerprint(home: Path) -> str:
    from appliance.transfer.enrolment import ca_fingerprint

    return ca_fingerprint((home / "ca.crt").read_bytes())


def _scrape(hub: HubProcess) -> tuple[dict[str, float], str]:
    """The hub's ``/metrics`` (its samples by name) and ``/fleet`` page, as regional ops
    read them (no client certificate)."""
    with httpx.Client(base_url=hub.url, verify=hub.anonymous_context(), timeout=30) as viewer:
        metrics = {sample.name: float(sample.value)
                   for family in text_string_to_metric_families(viewer.get("/metrics").text)
                   for sample in family.samples if not sample.labels}
        return metrics, viewer.get("/fleet").text


def _in_spool(hub: HubProcess, shipment: Shipment) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the embedded archive's file for each instance of
    ``shipment`` (content-addressed ``archive/spool/ab/<sha256>.dcm``), read back."""
    spool = hub.home / "archive" / "spool"
    files = {uid: spool / sha[:2] / f"{sha}.dcm" for uid, sha in shipment.originals.items()}
    return {uid: _sha256(path) for uid, path in files.items() if path.is_file()}


def test_a_hub_restored_in_place_names_that_backup_and_drops_staging_it_no_longer_knows(
        tmp_path: Path) -> None:
    """Backed up twice, then busy, then restored from the second backup in its own home.

    The backup's copy of hub.sqlite is taken before the backup records itself in the live
    one: the restored hub named the backup before the one restored (``/fleet``,
    ``pas_hub_last_backup_timestamp_seconds``, the age ``PasHubBackupOld`` watches). And the
    ``buckets/<id>`` of a transfer begun after the backup, unknown to the restored database,
    stayed on disk for ever: the hub cleaned only the folders of transfers it had a row
    for. Both are asserted on a real ``pas hub run``; a live transfer's folder stays through
    restarts and its upload completes, bit-exact in the archive."""
    hub = HubProcess(tmp_path / "hub").init()
    mr = sorted(p for p in MR_DIR.rglob("*") if p.is_file())
    hub.start()
    try:
        site = enroll(hub, tmp_path / "site", "CHU-NORD")
        key = site.hub_transfer_key
        expired = ship(pack_items(mr[0:8]), key, 128 << 10, "1.2.826.0.1.3680043.8.498.901")
        late = ship(pack_items(mr[8:16]), key, 128 << 10, "1.2.826.0.1.3680043.8.498.902")
        live = ship(pack_items(mr[16:24]), key, 128 << 10, "1.2.826.0.1.3680043.8.498.903")
        assert min(len(s.buckets) for s in (expired, late, live)) >= 3
        with _session(hub, site) as http:
            for shipment in (expired, live):
                assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
            assert http.put(expired.bucket_url(0), content=expired.buckets[0]).status_code == 201
        first, _ = _backup(hub, tmp_path / "backups")
        stamp = utc_stamp()
        wait_for(lambda: utc_stamp() != stamp, 5, what="the next second")  # another name
        folder, manifest = _backup(hub, tmp_path / "backups")
        with _session(hub, site) as http:  # after the backup: an upload cut short, and more
            assert http.post("/api/v1/transfers", json=late.manifest).status_code == 201
            assert [http.put(late.bucket_url(i), content=late.buckets[i]).status_code
                    for i in (0, 1)] == [201, 201]
            assert http.put(live.bucket_url(0), content=live.buckets[0]).status_code == 201
    finally:
        hub.stop()
    buckets = hub.home / "buckets"
    assert {p.name for p in buckets.iterdir()} == {expired.transfer_id, late.transfer_id,
                                                   live.transfer_id}
    (buckets / "lost+found").mkdir()  # not a transfer's: a mount point's, left alone
    (hub.home / "work" / late.transfer_id).mkdir(exist_ok=True)  # its rebuild's, say
    (hub.home / "work" / late.transfer_id / "0.dcm").write_bytes(b"rebuilt")

    done = " ".join(hub.cli("restore", str(folder)).stdout.split())
    # In place: the images are there; "put the spool back" read as if they were lost.
    assert done.endswith(f"the embedded archive's images: {hub.home / 'archive' / 'spool'} "
                         "is used as it is (not in a hub backup; put it back from the "
                         "storage's backup only if it was lost) next: systemctl start "
                         "pas-hub"), done
    hub.start()
    try:
        # (1) The restored hub's last backup is the one restored: its folder, its time.
        made_at = calendar.timegm(time.strptime(manifest["made_at"], "%Y-%m-%dT%H:%M:%SZ"))
        metrics, page = _scrape(hub)
        assert metrics["pas_hub_last_backup_timestamp_seconds"] == made_at
        assert 0 <= metrics["pas_hub_backup_age_seconds"] <= time.time() - made_at + 1
        assert re.search(rf"<p id=hub-backup><span>hub backup: \d+ min ago, "
                         rf"{re.escape(str(folder))}</span></p>", page), page
        assert str(first) not in page

        # (2) At start: the late transfer's folder (unknown to the restored database) and the
        # expired one's went, in one line with the bytes freed; the live one's stayed.
        assert {p.name for p in buckets.iterdir()} == {live.transfer_id, "lost+found"}
        assert list((hub.home / "work").iterdir()) == []  # emptied at each start
        freed = len(late.buckets[0]) + len(late.buckets[1]) + len(expired.buckets[0])
        assert ("staging removed at start: 2 folders with no live transfer row (1 unknown to "
                "hub.sqlite, as a transfer begun after the backup it was restored from; 1 "
                f"expired; 0 committed), {freed} bytes freed") in hub.log(), hub.log()[-3000:]
        with _session(hub, site) as http:
            assert http.get(live.url + "/buckets").json()["held"] == []  # sent after the backup
            assert [http.put(live.bucket_url(i), content=live.buckets[i]).status_code
                    for i in (0, 1)] == [201, 201]
            # The late transfer's site resumes it: unknown, so posted again, and sent whole.
            assert http.post("/api/v1/transfers", json=late.manifest).status_code == 201
            assert late.put_all(http) == [201] * len(late.buckets)
            assert http.post(late.url + "/commit").status_code == 200
    finally:
        hub.stop()

    # A restart: the live transfer's folder, with its buckets held, is not an orphan.
    hub.start()
    try:
        assert {p.name for p in buckets.iterdir()} == {live.transfer_id, "lost+found"}
        assert hub.log().count("staging removed at start") == 1
        with _session(hub, site) as http:
            assert http.get(live.url + "/buckets").json()["held"] == [0, 1]
            rest = [http.put(live.bucket_url(i), content=live.buckets[i]).status_code
                    for i in range(2, len(live.buckets))]
            assert rest == [201] * (len(live.buckets) - 2)
            answer = http.post(live.url + "/commit")
            assert answer.status_code == 200, answer.text
            assert {i["sop_instance_uid"]: i["sha256"] for i in answer.json()["instances"]} \
                == live.originals
    finally:
        hub.stop()
    assert _in_spool(hub, live) == live.originals and _in_spool(hub, late) == late.originals


def test_a_restore_stopped_while_it_named_the_backup_leaves_nothing_the_next_run_replays(
        tmp_path: Path) -> None:
    """The restore changes its copy of ``hub.sqlite`` (the row naming the backup) before
    putting it in place. Killed during that change, it leaves SQLite's rollback journal
    beside the copy (``.hub.sqlite.restoring-journal``), and the next run's fresh copy, at
    its first open, got that journal's pages rolled back into it: another database's. The
    journal is a real one, left by a process that exits in the middle of a transaction."""
    hub = HubProcess(tmp_path / "hub").init()
    hub.token("SITE-A")
    folder, manifest = _backup(hub, tmp_path / "backups")
    incoming = hub.home / ".hub.sqlite.restoring"
    with sqlite3.connect(incoming) as conn:  # what a stopped run was changing: not the backup
        conn.execute("CREATE TABLE filler (x BLOB)")
        conn.executemany("INSERT INTO filler VALUES (randomblob(3000))", [()] * 50)
    conn.close()
    killed = subprocess.run(
        [sys.executable, "-c", "import os, sqlite3\n"
         f"conn = sqlite3.connect({str(incoming)!r})\n"
         "conn.execute('PRAGMA cache_size = 1')\n"
         "conn.execute('BEGIN')\n"
         "conn.execute('UPDATE filler SET x = randomblob(3000)')\n"
         "os._exit(9)\n"], check=False)
    assert killed.returncode == 9
    assert incoming.with_name(incoming.name + "-journal").stat().st_size > 0
    hub.cli("restore", str(folder))
    _as_backed_up_naming(hub.home / "hub.sqlite", folder, manifest)
    assert not [p for p in hub.home.iterdir() if "restoring" in p.name]

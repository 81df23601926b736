"""Hub backups sealed for a key regional ops keep off the hub (the hub's ``backup.recipient``;
appliance/hub/backup.py, appliance/hub/restore.py; docs/operations.md, "Backing up the hub").

A hub backup holds the fleet CA's private key (whoever has it issues certificates every
appliance of the region trusts) and ``hub.sqlite`` (the region's sites, their transfers), and
with the embedded archive its index (every patient's name). Written in clear, all of it was
readable by whoever reads the backup folder. Sealed, nothing of it is in the folder, and only
the private half of the backup key opens it again: a real ``pas hub run`` with an enrolled
site and a committed transfer, backed up sealed while it serves, restored into the empty home
of a rebuilt host with the key (refused without it, with another one, or altered), and the
same site uploading to the restored hub with the certificate it was enrolled with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import httpx
from pydicom import dcmread

from appliance.ops import backup_seal
from appliance.store.hub_schema import HUB_MIGRATIONS
from appliance.transfer.enrolment import Enrolment
from tests.support.cleanup import started
from tests.support.hub import HubProcess, enroll, pack_items, ship
from tests.support.peers import MR_DIR, run_pas, wait_for

PKI = ("ca.key", "ca.crt", "server.key", "server.crt", "transfer.key", "transfer.pub")


def _new_key(path: Path, passphrase_file: Path | None = None) -> str:
    """``pas backup-key``, through the CLI: the recipient line it prints."""
    args = ["backup-key", str(path)]
    if passphrase_file is not None:
        args += ["--passphrase-file", str(passphrase_file)]
    result = run_pas(args, {**os.environ, "PAS_HOME": str(path.parent / "unused")})
    assert result.returncode == 0, result.stderr
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("recipient = ")]
    return line.split('"')[1]


def _fingerprint(recipient: str) -> str:
    return backup_seal.fingerprint(backup_seal.parse_recipient(recipient))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(home: Path) -> dict[str, str]:
    """Every file of a home with its SHA-256, hidden ones included (its log, its lock and
    the shared-memory index a reader rewrites left out): what a refused restore leaves as it
    was."""
    return {str(p.relative_to(home)): _sha256(p) for p in sorted(home.rglob("*"))
            if p.is_file() and p.name not in ("hub.log", "hub.lock")
            and not p.name.endswith("-shm")}


def _said(result: object) -> str:
    return " ".join((result.stdout + result.stderr).split())  # type: ignore[attr-defined]


def _rows(database: Path) -> list[str]:
    """A database's schema and rows as SQL text, migration 7's row (the last backup, which a
    restore names) left out."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return [line for line in conn.iterdump()
                if not line.startswith('INSERT INTO "hub_backup"')]
    finally:
        conn.close()


def _session(hub: HubProcess, enrolment: Enrolment) -> httpx.Client:
    """The enrolled appliance's own identity, talking to ``hub`` wherever it now listens."""
    return httpx.Client(base_url=hub.url, verify=enrolment.ssl_context(), timeout=60)


def _upload(hub: HubProcess, site: Enrolment, files: list[Path], study_uid: str) -> dict:
    """One transfer sent and committed as the uplink does; its receipt."""
    shipment = ship(pack_items(files), site.hub_transfer_key, 256 << 10, study_uid)
    with _session(hub, site) as http:
        assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        assert shipment.put_all(http) == [201] * len(shipment.buckets)
        answer = http.post(shipment.url + "/commit")
        assert answer.status_code == 200, answer.text
        return {"url": shipment.url, "receipt": answer.json(),
                "originals": shipment.originals}


def test_a_sealed_hub_backup_holds_nothing_in_clear_and_restores_with_its_key_only(
        tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    vault.mkdir()
    key, other_key = vault / "pas-hub-backup.pem", vault / "other.pem"
    recipient = _new_key(key)
    _new_key(other_key)
    fingerprint = _fingerprint(recipient)
    mr = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:5]
    header = dcmread(mr[0], stop_before_pixels=True)
    study_uid = str(header.StudyInstanceUID)
    share = tmp_path / "share"
    share.mkdir()
    with contextlib.ExitStack() as stack:
        hub = HubProcess(tmp_path / "hub").init()
        (hub.home / "hub.toml").write_text(f'[backup]\nrecipient = "{recipient}"\n')
        started(stack, hub)
        # The hub says at its start that its backups are sealed, for which key.
        wait_for(lambda: f"hub backups are sealed for the backup key {fingerprint}" in
                 hub.log(), what="the sealed backups' line")
        site = enroll(hub, tmp_path / "site", "CHU-NORD-SEALED")
        first = _upload(hub, site, mr[:3], study_uid)
        made = hub.cli("backup", str(share))  # the hub serving meanwhile
        hub.stop()
    [folder] = list(share.iterdir())
    assert f"hub backup written to {folder}, sealed for the backup key {fingerprint}: " \
           "the database (1 site enrolled, 1 transfer committed)" in _said(made), _said(made)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["sealed"] == {"format": "pas-backup-seal-1", "key": fingerprint,
                                  "backup_id": manifest["sealed"]["backup_id"]}
    assert manifest["kind"] == "pas hub backup" and manifest["sites_enrolled"] == 1
    clear_names = {*PKI, "hub.sqlite", "archive/pas.sqlite", "hub.toml"}
    held = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert held == {f"{name}.sealed" for name in clear_names} | {"MANIFEST.json"}, held
    assert set(manifest["files"]) == held - {"MANIFEST.json"}

    # Nothing of the keys, the databases or the fleet in clear, in any byte of the folder.
    everything = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
    assert b"PRIVATE KEY" not in everything and b"SQLite format 3" not in everything
    assert b"CHU-NORD-SEALED" not in everything and b"BEGIN CERTIFICATE" not in everything
    ca_key = (hub.home / "ca.key").read_bytes()
    assert ca_key[40:80] not in everything
    patient = str(header.PatientName).encode()
    assert len(patient) >= 4 and patient not in everything, patient
    # The clear copy it sealed was made in the hub's home, and is gone.
    assert not [p for p in hub.home.iterdir() if p.name.startswith(".backup-")]

    # The rebuilt host: its hub home is not there yet. Without the key, with another key:
    # refused in one line naming the key(s), nothing created.
    restored = HubProcess(tmp_path / "restored")
    refused = restored.cli("restore", str(folder), check=False)
    assert refused.returncode == 1
    assert _said(refused) == (f"refused: {folder} is sealed for the backup key {fingerprint}: "
                              "give its private key (pas hub restore --key FILE); nothing "
                              "restored")
    other = _fingerprint(backup_seal.recipient_of(backup_seal.load_key(other_key)))
    refused = restored.cli("restore", str(folder), "--key", str(other_key), check=False)
    assert refused.returncode == 1
    assert _said(refused) == (f"refused: {folder} is sealed for the backup key {fingerprint}, "
                              f"and the key given is {other}: give the private key of "
                              f"{fingerprint} (the one the hub's backup.recipient named when "
                              "it was written); nothing restored")
    assert not restored.home.exists()

    done = restored.cli("restore", str(folder), "--key", str(key))
    said = _said(done)
    assert f"hub restored in {restored.home} from {folder}" in said, said
    assert f"a sealed backup: opened with the backup key {fingerprint} in a hidden folder " \
           f"of {restored.home} (removed), checked there, put back from it" in said, said
    assert f"configuration put back: {restored.home / 'hub.toml'}" in said, said
    assert f"opened with the backup key {fingerprint}" in done.stderr  # the WARNING line
    # The keys and the archive's index byte for byte the hub's; hub.sqlite its rows (but
    # for the row naming the backup restored); nothing opened left in the home.
    for name in PKI:
        assert (restored.home / name).read_bytes() == (hub.home / name).read_bytes(), name
        assert oct((restored.home / name).stat().st_mode & 0o777) == "0o600", name
    opened = tmp_path / "opened"
    opened.mkdir()
    private = backup_seal.load_key(key)
    for name in ("hub.sqlite", "archive/pas.sqlite", "hub.toml"):
        (opened / name).parent.mkdir(exist_ok=True)
        backup_seal.open_file(folder / f"{name}.sealed", opened / name, private, name,
                              manifest["sealed"]["backup_id"],
                              backup_seal.listing_of(manifest["files"]))
    assert _sha256(restored.home / "archive/pas.sqlite") == _sha256(opened / "archive/pas.sqlite")
    assert _rows(restored.home / "hub.sqlite") == _rows(opened / "hub.sqlite")
    assert (restored.home / "hub.toml").read_text() == (hub.home / "hub.toml").read_text()
    assert not [p for p in restored.home.rglob("*") if p.name.startswith(".backup-")
                or "restoring" in p.name]

    # The restored hub runs, and the site enrolled before the backup uploads to it with
    # the certificate and the CA it has: its old receipt served, a new study committed.
    shutil.copytree(hub.home / "archive" / "spool", restored.home / "archive" / "spool")
    with contextlib.ExitStack() as stack:
        started(stack, restored)
        with _session(restored, site) as http:
            assert http.get("/api/v1/whoami").json() == {"site": "CHU-NORD-SEALED"}
            kept = http.get(first["url"] + "/receipt")
            assert kept.status_code == 200 and kept.json() == first["receipt"]
        second = _upload(restored, site, mr[3:], study_uid)
        assert second["receipt"]["transfer_id"] != first["receipt"]["transfer_id"]
        with _session(restored, site) as http:
            listed = http.get(f"/api/v1/region/dicom-web/studies/{study_uid}/instances")
            assert listed.status_code == 200, listed.text
            assert {i["00080018"]["Value"][0] for i in listed.json()} == \
                set(first["originals"]) | set(second["originals"])


def _agree(folder: Path, name: str) -> None:
    """The manifest rewritten to agree with ``name`` as it now is (so the SHA-256 check
    passes: only the sealed file's own tags can find what was changed)."""
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    path = folder / name
    manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def test_a_sealed_hub_backup_altered_or_its_key_unopened_is_refused_the_home_as_it_was(
        tmp_path: Path) -> None:
    """The key file encrypted: no passphrase, a wrong one, one that cannot be read, each
    refused. The sealed files altered with their manifest made to agree: refused naming the
    part (or the file) that does not open, after other files were opened; one that opens
    but holds a database this version cannot run: refused by the clear backup's check. The
    home it was to replace as it was, byte for byte, nothing opened left; a home the
    restore made for it removed again."""
    vault = tmp_path / "vault"
    vault.mkdir()
    secret = vault / "passphrase"
    secret.write_text("correct horse battery staple\n")
    wrong = vault / "wrong"
    wrong.write_text("Tr0ub4dor&3\n")
    key = vault / "pas-hub-backup.pem"
    recipient = _new_key(key, secret)
    hub = HubProcess(tmp_path / "hub", env={"PAS_HUB_BACKUP__RECIPIENT": recipient}).init()
    hub.token("SITE-A")  # a row naming a site in hub.sqlite
    share = tmp_path / "share"
    share.mkdir()
    made = json.loads(hub.cli("backup", str(share), "--json").stdout)
    backup = Path(made["folder"])
    assert made["sealed"]["key"] == _fingerprint(recipient)
    home = hub.home
    before = _tree(home)

    for extra, expected in (
            ([], f"refused: {key} is encrypted: give its passphrase (--passphrase-file)"),
            (["--passphrase-file", str(wrong)],
             f"refused: {key}: the passphrase does not open it (or it is not a PEM private "
             "key)"),
            (["--passphrase-file", str(vault / "absent")],
             f"refused: cannot read {vault / 'absent'}: No such file or directory")):
        refused = hub.cli("restore", str(backup), "--key", str(key), *extra, check=False)
        assert refused.returncode == 1 and _said(refused) == expected, _said(refused)
        assert _tree(home) == before

    def variant(name: str) -> Path:
        folder = tmp_path / name / backup.name
        shutil.copytree(backup, folder)
        return folder

    flipped = variant("flipped")  # hub.sqlite.sealed: opened after ca.*, which were opened
    data = bytearray((flipped / "hub.sqlite.sealed").read_bytes())
    data[-100] ^= 0xFF
    (flipped / "hub.sqlite.sealed").write_bytes(bytes(data))
    _agree(flipped, "hub.sqlite.sealed")
    swapped = variant("swapped")  # another file's sealed bytes under ca.key's name
    shutil.copyfile(swapped / "server.key.sealed", swapped / "ca.key.sealed")
    _agree(swapped, "ca.key.sealed")
    cut = variant("cut")  # the last part dropped: the file ends where it should not
    data = bytearray((cut / "hub.sqlite.sealed").read_bytes())
    (cut / "hub.sqlite.sealed").write_bytes(bytes(data[:backup_seal.HEADER_BYTES + 1000]))
    _agree(cut, "hub.sqlite.sealed")
    # Sealed whole, for the right key, but what it holds is not restorable: checked once
    # opened as a clear backup is (here: a database of a newer schema, as a newer PAS
    # writes it), named by its sealed file's folder.
    newer = variant("newer")
    private = backup_seal.load_key(key, b"correct horse battery staple")
    clear = tmp_path / "hub.sqlite"
    backup_id = made["sealed"]["backup_id"]
    listing = backup_seal.listing_of(made["files"])
    backup_seal.open_file(newer / "hub.sqlite.sealed", clear, private, "hub.sqlite", backup_id,
                          listing)
    known = len(HUB_MIGRATIONS)
    with sqlite3.connect(clear) as conn:
        conn.execute(f"PRAGMA user_version = {known + 1}")
    conn.close()
    (newer / "hub.sqlite.sealed").unlink()
    backup_seal.seal_file(clear, newer / "hub.sqlite.sealed",
                          backup_seal.parse_recipient(recipient), "hub.sqlite", backup_id,
                          listing)
    _agree(newer, "hub.sqlite.sealed")
    for folder, expected in (
            (newer, f"{newer} was written by a newer PAS (version {made['software']}, hub "
                    f"database schema {known + 1}; this one knows {known}): install that "
                    "version or a later one, then restore. Nothing restored"),
            (flipped, f"{flipped}/hub.sqlite.sealed: part 0 does not open (altered, or the "
                      "file is cut short or spliced): restore an older backup. Nothing "
                      "restored"),
            (swapped, f"{swapped}/ca.key.sealed does not open with this key: sealed for "
                      "another key, altered, another file's renamed, another backup's, or "
                      "the backup's list of files changed (a file removed with its manifest "
                      "line): restore an older backup. Nothing restored"),
            (cut, f"{cut}/hub.sqlite.sealed: part 0 does not open (altered, or the file is "
                  "cut short or spliced): restore an older backup. Nothing restored")):
        refused = hub.cli("restore", str(folder), "--key", str(key), "--passphrase-file",
                          str(secret), check=False)
        assert refused.returncode == 1 and _said(refused) == f"refused: {expected}", \
            _said(refused)
        assert _tree(home) == before, folder
        # Into a home not there yet: refused the same, and not left behind.
        absent = HubProcess(tmp_path / f"absent-{folder.parent.name}")
        refused = absent.cli("restore", str(folder), "--key", str(key), "--passphrase-file",
                             str(secret), check=False)
        assert refused.returncode == 1 and _said(refused) == f"refused: {expected}"
        assert not absent.home.exists()

    # A backup in clear given with a key (a sealed one was expected: replaced on the share?).
    in_clear = HubProcess(home)  # no recipient
    (tmp_path / "clear-share").mkdir()
    clear_folder = Path(json.loads(in_clear.cli("backup", str(tmp_path / "clear-share"),
                                                "--json").stdout)["folder"])
    assert (clear_folder / "ca.key").read_bytes() == (home / "ca.key").read_bytes()
    before = _tree(home)  # the live database records each backup
    refused = in_clear.cli("restore", str(clear_folder), "--key", str(key),
                           "--passphrase-file", str(secret), check=False)
    assert refused.returncode == 1 and _said(refused) == (
        f"refused: {clear_folder} is not sealed (written in clear), and a key was given: "
        "restore it without --key if it is the backup meant; nothing restored")
    assert _tree(home) == before

    # The whole backup, with the key and its passphrase, in place: the hub's own keys kept,
    # its database set aside, the configuration opened left for the operator (none in the
    # home to compare: the recipient came from the environment, so the backup holds none).
    done = hub.cli("restore", str(backup), "--key", str(key), "--passphrase-file", str(secret))
    said = _said(done)
    assert f"already as in the backup, kept: {', '.join(PKI)}" in said, said
    assert "set aside in" in said and "hub.sqlite.before-restore-" in said, said
    assert not [p for p in home.iterdir() if p.name.startswith(".backup-")]


def _start_says(hub: HubProcess, words: str) -> str:
    """``hub`` started, stopped once its start said ``words``: what this start logged."""
    earlier = len(hub.log())
    with contextlib.ExitStack() as stack:
        started(stack, hub)
        return wait_for(lambda: (text := " ".join(hub.log()[earlier:].split()))
                        and words in text and text, what=words)


def test_the_hub_says_whether_its_backups_are_sealed_and_keep_prunes_sealed_ones(
        tmp_path: Path) -> None:
    """The hub's own check of its backups (``pas doctor``'s "backup sealing" row on an
    appliance), logged at ``pas hub run``'s start: a WARNING while backups are in clear, or
    while the last one is in clear or sealed for another key; the key named once they are
    sealed. ``pas hub backup`` says which it wrote; a recipient that is no backup key is
    refused by its key path. ``--keep`` removes this hub's older backups, sealed ones too
    (their manifest, in clear, keeps the kind and the CA), and leaves a sealed backup of
    another hub alone."""
    hub = HubProcess(tmp_path / "hub").init()
    share = tmp_path / "share"
    share.mkdir()
    said = _start_says(hub, "hub backups are written in clear: the fleet CA's private key")
    assert "WARNING pas.hub: hub backups are written in clear" in said, said
    clear = hub.cli("backup", str(share))
    assert "in clear (backup.recipient is not set" in _said(clear), _said(clear)
    [in_clear] = list(share.iterdir())
    assert (in_clear / "ca.key").is_file()
    assert "sealed" not in json.loads((in_clear / "MANIFEST.json").read_text())

    recipient, other_recipient = _new_key(tmp_path / "k.pem"), _new_key(tmp_path / "o.pem")
    fingerprint = _fingerprint(recipient)
    sealed_hub = HubProcess(hub.home, env={"PAS_HUB_BACKUP__RECIPIENT": recipient})
    said = _start_says(sealed_hub, f"the last hub backup, {in_clear}, is in clear (written "
                                   "before backup.recipient was set)")
    assert f"WARNING pas.hub: hub backups are sealed for the backup key {fingerprint}, " \
           "but the last hub backup" in said, said
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    sealed = Path(json.loads(sealed_hub.cli("backup", str(scratch), "--json").stdout)
                  ["folder"])
    # What a sealed backup or restore killed before its end left in clear, removed at the
    # start (the hub's lock held: no restore runs then), said.
    leftovers = [hub.home / ".backup-opening", hub.home / ".backup-staging-999999999-1"]
    for leftover in leftovers:
        leftover.mkdir()
        shutil.copyfile(hub.home / "ca.key", leftover / "ca.key")
    said = _start_says(sealed_hub, f"hub backups are sealed for the backup key {fingerprint}")
    for leftover in leftovers:
        assert not leftover.exists() and f"start-up: removed {leftover}, a clear copy" in said
    assert "INFO pas.hub: hub backups are sealed" in said and ", but" not in said, said
    rekeyed = HubProcess(hub.home, env={"PAS_HUB_BACKUP__RECIPIENT": other_recipient})
    said = _start_says(rekeyed, f"the last hub backup, {sealed}, is sealed for the backup key "
                                f"{fingerprint}, not {_fingerprint(other_recipient)} "
                                "(backup.recipient changed)")

    # --keep 1: this hub's older backups, the one in clear and a sealed one, removed; a
    # sealed backup of another hub (its own fleet CA) left alone.
    older = share / "pas-hub-backup-20200101T000000Z"
    in_clear.rename(older)
    sealed_older = share / "pas-hub-backup-20200101T000002Z"
    shutil.copytree(sealed, sealed_older)
    other = HubProcess(tmp_path / "other", env={"PAS_HUB_BACKUP__RECIPIENT": recipient}).init()
    other_scratch = tmp_path / "other-scratch"
    other_scratch.mkdir()
    foreign = share / "pas-hub-backup-20200101T000001Z"
    shutil.copytree(json.loads(other.cli("backup", str(other_scratch), "--json").stdout)
                    ["folder"], foreign)
    kept = json.loads(sealed_hub.cli("backup", str(share), "--json", "--keep", "1").stdout)
    assert kept["sealed"]["key"] == fingerprint
    assert sorted(kept["pruned"]["removed"]) == [older.name, sealed_older.name], kept
    assert kept["pruned"]["left_alone"] == [foreign.name], kept
    assert sorted(p.name for p in share.iterdir()) == sorted(
        [foreign.name, Path(kept["folder"]).name])

    checked = run_pas(["hub", "config", "check"],
                      {**sealed_hub.env, "PAS_HUB_BACKUP__RECIPIENT": "not base64!"})
    assert checked.returncode == 2, _said(checked)
    assert "backup.recipient" in _said(checked) and "is not base64" in _said(checked), \
        _said(checked)

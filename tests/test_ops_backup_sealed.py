"""Backups sealed for a key the hospital keeps off the appliance (``backup.recipient``,
appliance/ops/backup_seal.py; docs/operations.md, "Backup and restore").

A backup holds the index (every patient's name) and the enrolment's private key (whoever has
it speaks to the hub as the site). Written in clear to a share, both were readable there, in
its snapshots and in its own backups. Sealed, nothing of either is in the backup folder, and
only the private half of the backup key (IT's vault) opens it again: a real ``pas run``
enrolled to a real hub, DCMTK storescu as the modality, a new disk restored with the key, the
restored enrolment then uploading to the hub again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import pytest
from pydicom import dcmread

from appliance.ops import backup_seal
from appliance.ops.backup_seal import SealedFileDamaged
from tests.support.cleanup import started
from tests.support.hub import HubProcess, enroll
from tests.support.peers import CT_DIR, PasProcess, read_rows, run_pas, storescu, wait_for

ENV = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_QUEUE__BACKOFF_INITIAL_S": "0.3",
       "PAS_QUEUE__BACKOFF_MAX_S": "1", "PAS_PREFETCH__ON_ARRIVAL": "false",
       "PAS_STORAGE__FSYNC": "false", "PAS_SITE": "SITE-A"}


def _new_key(path: Path, passphrase_file: Path | None = None) -> str:
    """``pas backup-key``, through the CLI: the recipient line it prints."""
    args = ["backup-key", str(path)]
    if passphrase_file is not None:
        args += ["--passphrase-file", str(passphrase_file)]
    result = run_pas(args, {**os.environ, "PAS_HOME": str(path.parent / "unused")})
    assert result.returncode == 0, result.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith("recipient = ")]
    return line.split('"')[1]


def _confirmed(db: Path) -> int:
    return int(read_rows(db, "SELECT count(*) AS n FROM instances "
                             "WHERE confirmed_at IS NOT NULL")[0]["n"])


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "pas.lock"}


def test_a_sealed_backup_holds_nothing_in_clear_and_restores_with_its_key_only(
        tmp_path: Path) -> None:
    files = sorted(CT_DIR.glob("*.dcm"))[:6]
    first, later = files[:3], files[3:]
    names = {str(dcmread(p, stop_before_pixels=True).PatientName) for p in first}
    key, other_key = tmp_path / "vault" / "pas-backup.pem", tmp_path / "vault" / "other.pem"
    key.parent.mkdir()
    recipient = _new_key(key)
    _new_key(other_key)
    destination = tmp_path / "share"
    destination.mkdir()
    env = {**ENV, "PAS_BACKUP__RECIPIENT": recipient}
    with contextlib.ExitStack() as stack:
        hub = started(stack, HubProcess(tmp_path / "hub").init())
        home = tmp_path / "site"
        enroll(hub, home, "SITE-A")
        pas = started(stack, PasProcess(home, env))
        storescu(first, pas.port)
        wait_for(lambda: _confirmed(home / "pas.sqlite") == 3, 60, what="3 confirmed")
        said = pas.cli("backup", str(destination))
        assert "sealed for the backup key " in said.stdout, said.stdout
        folder = next(destination.iterdir())
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        pas.stop()

        fingerprint = backup_seal.fingerprint(backup_seal.parse_recipient(recipient))
        assert manifest["sealed"] == {"format": "pas-backup-seal-1", "key": fingerprint,
                                      "backup_id": manifest["sealed"]["backup_id"]}
        assert len(manifest["sealed"]["backup_id"]) == 32
        held = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        # Each file of the home's pki/ sealed, and nothing else beside the manifest.
        pki = {f"pki/{p.relative_to(home / 'pki')}.sealed"
               for p in (home / "pki").rglob("*") if p.is_file()}
        assert "pki/client.key.sealed" in pki
        assert held == {"MANIFEST.json", "pas.sqlite.sealed"} | pki, held
        assert set(manifest["files"]) == held - {"MANIFEST.json"}
        # Nothing of the index or of the key in clear, anywhere in the folder.
        everything = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
        client_key = (home / "pki" / "client.key").read_bytes()
        assert b"PRIVATE KEY" not in everything and client_key[40:80] not in everything
        assert b"SQLite format 3" not in everything
        for name in names:
            assert name.encode() not in everything, name
        # The clear copy it sealed was made in the home, and is gone.
        assert not list(home.glob(".backup-staging-*"))

        # A new disk. Without the key, with another key: refused, the new home untouched.
        new_home = tmp_path / "new-disk"
        restored = PasProcess(new_home, env)
        refused = restored.cli("restore", str(folder), check=False)
        assert refused.returncode == 1
        assert f"is sealed for the backup key {fingerprint}: give its private key (pas " \
               "restore --key FILE); nothing restored" in " ".join(refused.stderr.split())
        refused = restored.cli("restore", str(folder), "--key", str(other_key), check=False)
        assert refused.returncode == 1
        other = backup_seal.fingerprint(backup_seal.public_of(backup_seal.load_key(other_key)))
        assert f"and the key given is {other}" in " ".join(refused.stderr.split())
        assert not new_home.exists() or _tree(new_home) == {}

        said = restored.cli("restore", str(folder), "--key", str(key))
        assert "and the enrolment" in said.stdout, said.stdout
        assert (new_home / "pki" / "client.key").read_bytes() == client_key
        assert oct((new_home / "pki" / "client.key").stat().st_mode & 0o777) == "0o600"
        assert {r["sha256"] for r in read_rows(new_home / "pas.sqlite",
                                               "SELECT sha256 FROM instances")} == \
            {r["sha256"] for r in read_rows(home / "pas.sqlite",
                                            "SELECT sha256 FROM instances")}
        assert not (new_home / ".backup-opening").exists()
        # The restored enrolment works: the hub takes the site's next study from it.
        started(stack, restored)
        storescu(later, restored.port)
        wait_for(lambda: _confirmed(new_home / "pas.sqlite") == 6, 60, what="6 confirmed")


def test_a_sealed_file_altered_cut_spliced_or_renamed_does_not_open(tmp_path: Path) -> None:
    """Every way a sealed file can be changed is refused naming the file, and leaves no
    opened file behind. Three chunks and a half: chunk boundaries are where a cut or a splice
    would go unseen without the chunk numbers and the last-chunk mark."""
    key_file = tmp_path / "k.pem"
    public = backup_seal.parse_recipient(backup_seal.new_key(key_file))
    private = backup_seal.load_key(key_file)
    clear = tmp_path / "clear"
    clear.write_bytes(os.urandom(3 * backup_seal.CHUNK_BYTES + 12345))
    sealed = tmp_path / "pas.sqlite.sealed"
    backup = backup_seal.new_backup_id()
    backup_seal.seal_file(clear, sealed, public, "pas.sqlite", backup)
    opened = tmp_path / "opened"
    assert backup_seal.open_file(sealed, opened, private, "pas.sqlite", backup) == \
        hashlib.sha256(clear.read_bytes()).hexdigest()
    assert opened.read_bytes() == clear.read_bytes()
    opened.unlink()

    data = sealed.read_bytes()
    chunk = backup_seal.CHUNK_BYTES + 16
    start = backup_seal.HEADER_BYTES
    cases = {
        "a byte flipped": data[:start + 5] + bytes([data[start + 5] ^ 1]) + data[start + 6:],
        "cut at a chunk's end": data[:start + 2 * chunk],
        "cut inside a chunk": data[:-7],
        "two chunks swapped": data[:start] + data[start + chunk:start + 2 * chunk]
        + data[start:start + chunk] + data[start + 2 * chunk:],
        "a chunk repeated": data[:start + chunk] + data[start:start + chunk]
        + data[start + chunk:],
        "bytes after the end": data + b"\0" * 16,
        "only the header": data[:start],
        "not a sealed file": b"SQLite format 3\0" + data[16:],
    }
    for what, changed in cases.items():
        sealed.write_bytes(changed)
        with pytest.raises(SealedFileDamaged) as refused:
            backup_seal.open_file(sealed, opened, private, "pas.sqlite", backup)
        assert str(sealed) in str(refused.value), what
        assert not opened.exists(), what
    # Another file's sealed bytes under this name (pas.sqlite's as pki/client.key), or
    # another backup's file of the same name (files of two backups mixed).
    sealed.write_bytes(data)
    for name, other_backup in (("pki/client.key", backup),
                               ("pas.sqlite", backup_seal.new_backup_id())):
        with pytest.raises(SealedFileDamaged, match="does not open with this key"):
            backup_seal.open_file(sealed, opened, private, name, other_backup)
        assert not opened.exists()
    # An empty file seals and opens (one empty last chunk); so does a name with "|" or
    # bytes that are not UTF-8 (a configuration file's: the transfer key wrap refuses "|").
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for name in ("empty", "etc|site.toml", "caf\udce9.toml"):
        target = tmp_path / "empty.sealed"
        target.unlink(missing_ok=True)
        backup_seal.seal_file(empty, target, public, name, backup)
        assert backup_seal.open_file(target, opened, private, name, backup) == \
            hashlib.sha256(b"").hexdigest()
        opened.unlink()


def test_a_damaged_sealed_backup_is_refused_and_the_home_is_left_as_it_was(
        tmp_path: Path) -> None:
    """The sealed index altered and its manifest made to agree (the SHA-256 check passes):
    the restore opens it, is refused naming the part that does not open, and the home it
    was to replace is as it was, with nothing opened left in it."""
    key = tmp_path / "k.pem"
    env = {"PAS_SITE": "SITE-A", "PAS_BACKUP__RECIPIENT": _new_key(key)}
    site = PasProcess(tmp_path / "site", env)
    from appliance.store.db import Database

    Database(site.home / "pas.sqlite").close()
    destination = tmp_path / "share"
    destination.mkdir()
    folder = Path(json.loads(site.cli("backup", str(destination), "--json").stdout)["folder"])
    sealed = folder / "pas.sqlite.sealed"
    data = bytearray(sealed.read_bytes())
    data[-100] ^= 0xFF
    sealed.write_bytes(bytes(data))
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["files"]["pas.sqlite.sealed"]["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))

    other = PasProcess(tmp_path / "other", env)
    Database(other.home / "pas.sqlite").close()
    before = _tree(other.home)
    refused = other.cli("restore", str(folder), "--key", str(key), check=False)
    assert refused.returncode == 1
    said = " ".join(refused.stderr.split())
    assert f"{sealed}: part 0 does not open (altered, or the file is cut short or spliced)" \
           ": restore an older backup. Nothing restored" in said, said
    assert _tree(other.home) == before
    assert not (other.home / ".backup-opening").exists()


def test_the_backup_key_its_passphrase_and_the_recipient_refused_clearly(
        tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    vault.mkdir()
    secret = vault / "passphrase"
    secret.write_text("correct horse battery staple\n")
    key = vault / "k.pem"
    recipient = _new_key(key, secret)
    # Encrypted under the passphrase stretched by scrypt (PKCS#8's own PBKDF2 as written
    # is 2,048 rounds: 0.4 ms a guess); the PEM block as any tool reads it.
    assert key.read_bytes().startswith(b"PAS-Scrypt: n=131072 r=8 p=1 salt=")
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in key.read_bytes()
    before = key.read_bytes()
    again = run_pas(["backup-key", str(key)], {**os.environ, "PAS_HOME": str(tmp_path / "h")})
    assert again.returncode == 1 and key.read_bytes() == before
    assert "exists: a key replaced is every backup sealed for it lost" in \
        " ".join(again.stderr.split())

    env = {"PAS_SITE": "SITE-A", "PAS_BACKUP__RECIPIENT": recipient}
    site = PasProcess(tmp_path / "site", env)
    from appliance.store.db import Database

    Database(site.home / "pas.sqlite").close()
    destination = tmp_path / "share"
    destination.mkdir()
    folder = Path(json.loads(site.cli("backup", str(destination), "--json").stdout)["folder"])
    new = PasProcess(tmp_path / "new", env)
    wrong = vault / "wrong"
    wrong.write_text("wrong\n")
    for extra, expected in (([], "is encrypted: give its passphrase (--passphrase-file)"),
                            (["--passphrase-file", str(wrong)],
                             "the passphrase does not open it")):
        refused = new.cli("restore", str(folder), "--key", str(key), *extra, check=False)
        assert refused.returncode == 1 and expected in " ".join(refused.stderr.split()), \
            refused.stderr
        assert not (new.home / "pas.sqlite").exists()
    new.cli("restore", str(folder), "--key", str(key), "--passphrase-file", str(secret))
    assert (new.home / "pas.sqlite").exists()

    # A recipient that is not a backup key's public half: named, with its key path.
    for value, expected in (("not base64!", "is not base64"),
                            ("AAAA", "is 3 bytes once decoded, a backup key's public half "
                                     "is 32"),
                            # A low-order point: every backup failed "Error computing
                            # shared key" while the configuration loaded and doctor said ok.
                            ("A" * 43 + "=", "is not the public half of a backup key")):
        checked = run_pas(["config", "check"], {**os.environ, "PAS_HOME": str(tmp_path / "c"),
                                                "PAS_BACKUP__RECIPIENT": value})
        assert checked.returncode != 0
        assert f"backup.recipient: {expected}" in " ".join(checked.stdout.split()
                                                           + checked.stderr.split())


def test_doctor_warns_of_backups_in_clear(tmp_path: Path) -> None:
    from appliance.store.db import Database

    pas = PasProcess(tmp_path / "site", {"PAS_SITE": "SITE-A"})
    Database(pas.home / "pas.sqlite").close()
    checks = {c["name"]: c for c in json.loads(pas.cli("doctor", "--json",
                                                       check=False).stdout)}
    assert checks["backup sealing"]["verdict"] == "warn"
    assert "backups are written in clear" in checks["backup sealing"]["detail"]
    recipient = _new_key(tmp_path / "k.pem")
    sealed = PasProcess(tmp_path / "site", {"PAS_SITE": "SITE-A",
                                            "PAS_BACKUP__RECIPIENT": recipient})
    checks = {c["name"]: c for c in json.loads(sealed.cli("doctor", "--json",
                                                          check=False).stdout)}
    assert checks["backup sealing"]["verdict"] == "ok"
    fingerprint = backup_seal.fingerprint(backup_seal.parse_recipient(recipient))
    assert checks["backup sealing"]["detail"].endswith(fingerprint)

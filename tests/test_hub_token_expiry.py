"""Enrolment tokens expire, and the hub names them by a keyed identifier.

Real peers: ``pas hub token/tokens/sites/run`` and ``pas enroll`` as child processes over
real TLS 1.3 on loopback. A token is issued with a real short validity (``--valid-for 2s``)
and the test waits for the clock to pass it: no injected clock, nothing patched. Before the
fix a token never expired (a leaked one enrolled a rogue appliance years later) and
``pas hub token`` had no ``--valid-for``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sqlite3
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.hub.pki import HubPKI, PKIError, parse_validity
from appliance.store.db import Database
from appliance.store.hub_schema import HUB_MIGRATIONS
from appliance.transfer.enrolment import load_enrolment
from tests.support.hub import HubProcess
from tests.support.peers import run_pas, wait_for

ISSUED = re.compile(r"token (?P<id>[0-9a-f]{24}) for site (?P<site>\S+), valid until "
                    r"(?P<until>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")


def _issue(hub: HubProcess, site: str, *valid_for: str) -> tuple[str, str, float]:
    """``pas hub token SITE [--valid-for X]`` -> (token, identifier, valid until as epoch)."""
    result = hub.cli("token", site, *valid_for)
    shown = ISSUED.search(result.stderr)
    assert shown is not None and shown["site"] == site, result.stderr
    until = datetime.strptime(shown["until"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return result.stdout.strip(), shown["id"], until.timestamp()


def _pas_enroll(home: Path, url: str, token: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PAS_HOME": str(home)}
    env.pop("PAS_CONFIG", None)
    return run_pas(["enroll", "--hub", url, "--token", token], env, timeout=60)


def _expected_id(hub_home: Path, secret: str) -> str:
    """The identifier as docs/protocol.md specifies it, computed here from the CA key."""
    key = serialization.load_pem_private_key((hub_home / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"pas-hub enrolment token id v1").derive(scalar)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return hmac.new(mac_key, digest.encode(), hashlib.sha256).hexdigest()[:24]


def _token_rows(hub_home: Path, site: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{hub_home / 'hub.sqlite'}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT used_at, expires_at FROM enrol_tokens WHERE site = ?",
                            (site,)).fetchall()


def _certificates(hub_home: Path, site: str) -> int:
    with sqlite3.connect(f"file:{hub_home / 'hub.sqlite'}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM certificates WHERE site = ?",
                                (site,)).fetchone()[0])


def test_an_expired_token_is_refused_saying_when_and_a_fresh_one_enrols(
        hub: HubProcess, tmp_path: Path) -> None:
    token, token_id, until = _issue(hub, "LATE", "--valid-for", "2s")
    secret = token.split(".")[1]
    assert token_id == _expected_id(hub.home, secret)
    # Keyed: not a plain hash of the secret, of its digest or of the token, which anyone
    # reading the journal could compute for a guessed token.
    digest = hashlib.sha256(secret.encode()).hexdigest()
    for plain in (digest, hashlib.sha256(digest.encode()).hexdigest(),
                  hashlib.sha256(token.encode()).hexdigest()):
        assert token_id not in plain
    wait_for(lambda: time.time() >= until + 1, timeout=15)  # shown to the second

    refused = _pas_enroll(tmp_path / "late", hub.url, token)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    said = " ".join(refused.stderr.split())
    assert "enrolment failed: hub refused the enrolment (403)" in said, said
    shown_until = datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"this enrolment token of site LATE expired at {shown_until}" in said, said
    assert "pas hub token LATE" in said
    assert not (tmp_path / "late" / "pki").exists()
    assert load_enrolment(tmp_path / "late") is None
    # Nothing changed at the hub: no certificate, the token not spent, no site listed.
    assert _certificates(hub.home, "LATE") == 0
    assert [used for used, _ in _token_rows(hub.home, "LATE")] == [None]
    assert "LATE" not in hub.cli("sites").stdout
    # Audited: the refusal names the site, the token's keyed identifier and when it expired;
    # the secret itself is nowhere in the log.
    wait_for(lambda: "enrolment refused for site LATE" in hub.log(), timeout=10)
    assert f"enrolment refused for site LATE: token {token_id} expired at {shown_until}" \
        in hub.log()
    assert secret not in hub.log() and digest not in hub.log()

    fresh, fresh_id, fresh_until = _issue(hub, "LATE")  # the default: 7 days
    assert 7 * 86400 - 120 < fresh_until - time.time() <= 7 * 86400
    enrolled = _pas_enroll(tmp_path / "late", hub.url, fresh)
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    enrolment = load_enrolment(tmp_path / "late")
    assert enrolment is not None and enrolment.site == "LATE"
    assert _certificates(hub.home, "LATE") == 1
    wait_for(lambda: f"token {fresh_id})" in hub.log(), timeout=10)
    assert re.search(rf"enrolled site LATE \(certificate [0-9a-f]+, token {fresh_id}\)",
                     hub.log())

    listed = {line.split("│")[2].strip(): [cell.strip() for cell in line.split("│")[1:-1]]
              for line in hub.cli("tokens").stdout.splitlines() if "│ LATE" in line}
    assert listed[token_id][3:] == [shown_until, "expired"]
    assert listed[fresh_id][4] == "spent"
    # Revoking the site voids no expired token: it enrols nothing already, and "voided 1
    # unspent enrolment token" would have the operator hunt for a spare still out there.
    revoked = hub.cli("revoke", "LATE").stdout
    assert "revoked 1 certificate of site LATE" in revoked and "voided" not in revoked, revoked
    assert [used for used, until in _token_rows(hub.home, "LATE") if until < time.time()] \
        == [None]


def test_a_validity_not_positive_too_long_or_without_unit_is_refused(hub: HubProcess) -> None:
    before = len(_token_rows(hub.home, "NEVER"))
    for wrong, said in (("0h", "must be positive"), ("91d", "at most 90d")):
        result = hub.cli("token", "NEVER", "--valid-for", wrong, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"bad --valid-for: validity {wrong!r}: {said}" in " ".join(result.stderr.split())
        assert result.stdout == ""
    assert len(_token_rows(hub.home, "NEVER")) == before == 0
    for wrong in ("7", "-1d", "1w", "1.5d", "", "10000000000000000000000d"):
        with pytest.raises(PKIError, match="validity"):
            parse_validity(wrong)
    assert parse_validity("72h").total_seconds() == 3 * 86400
    assert parse_validity("90d").days == 90


def test_tokens_issued_before_the_upgrade_expire_7_days_after_their_issue(
        tmp_path: Path) -> None:
    """Migration 9: an unspent token of a hub upgraded from schema 8 gets the default
    validity from its own issue (one printed a month ago is expired at once), and the
    listing names it by its keyed identifier too, from the digest the hub kept."""
    home = tmp_path / "hub"
    HubPKI(home).init()
    pki = HubPKI(home)
    old_db = Database(home / "hub.sqlite", HUB_MIGRATIONS[:8])
    now = time.time()
    made = {}
    for site, age_days in (("OLD", 30), ("RECENT", 1)):
        token, digest = pki.new_token(site)
        made[site] = (token, pki.token_id(digest))
        with old_db.transaction() as conn:
            conn.execute("INSERT INTO enrol_tokens (secret_sha256, site, created_at) "
                         "VALUES (?, ?, ?)", (digest, site, now - age_days * 86400))
    old_db.close()
    upgraded = Database(home / "hub.sqlite", HUB_MIGRATIONS)
    assert upgraded.schema_version() == len(HUB_MIGRATIONS)
    upgraded.close()
    for site, age_days in (("OLD", 30), ("RECENT", 1)):
        [(used, expires_at)] = _token_rows(home, site)
        assert used is None
        assert expires_at == pytest.approx(now - age_days * 86400 + 7 * 86400, abs=1)
    hub = HubProcess(home)
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[1:-1]]
            for line in hub.cli("tokens").stdout.splitlines() if line.startswith("│")}
    assert rows["OLD"][1] == made["OLD"][1] and rows["OLD"][4] == "expired"
    assert rows["RECENT"][1] == made["RECENT"][1] and rows["RECENT"][4] == "unspent"
    assert made["OLD"][1] == _expected_id(home, made["OLD"][0].split(".")[1])

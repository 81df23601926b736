"""What regional ops read and do with ``pas hub transfers``, ``sites``, ``tokens``, ``token``
and ``revoke``, from an ops engineer's walkthrough.

``pas hub transfers`` showed the newest 100 rows titled "100 transfers" (read as the total),
had no time, no way to ask for one study and no ``--json``, and answered a mistyped site
"0 transfers"; ``pas hub sites`` hid when a certificate was revoked; ``sites`` and ``tokens``
had no ``--json``; issuing a token and revoking a site left no trace of who did it; and a
token was issued for the shipped configuration's placeholder site ``CHANGE-ME``, which
``pas enroll`` refuses. Real ``pas hub run`` (mutual TLS, embedded archive), real CLI runs.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import time
from pathlib import Path

from appliance.cli.common import operator_actor
from appliance.hub.pki import utc_text
from appliance.transfer.enrolment import enroll as enroll_appliance
from tests.support.hub import HubProcess, client, enroll, pack_items, ship
from tests.support.peers import MR_DIR

NEVER_ENROLLED = ("no site 'NOPE' was ever enrolled on this hub (pas hub sites lists them; "
                  "names are case-sensitive)")
UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def _table(stdout: str) -> tuple[str, list[list[str]]]:
    """A Rich table as printed to a pipe: its title and its body rows' cells (the header's
    line is drawn with ┃)."""
    lines = stdout.splitlines()
    return lines[0].strip(), [[cell.strip() for cell in line.split("│")[1:-1]]
                              for line in lines if line.startswith("│")]


def _tokens_issued(hub: HubProcess) -> int:
    conn = sqlite3.connect(hub.home / "hub.sqlite")
    try:
        return int(conn.execute("SELECT count(*) FROM enrol_tokens").fetchone()[0])
    finally:
        conn.close()


def test_transfers_limit_study_times_json_and_an_unknown_site(hub: HubProcess,
                                                              tmp_path: Path) -> None:
    site = enroll(hub, tmp_path / "site", "CHU-LIST")
    enroll(hub, tmp_path / "quiet", "CHU-QUIET")  # enrolled, has sent nothing
    files = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:3]
    shipments = [ship(pack_items([f]), site.hub_transfer_key, study_uid=f"2.25.90{i}")
                 for i, f in enumerate(files)]
    with client(site) as http:
        for shipment in shipments:  # one after the other: created_at orders them
            assert http.post("/api/v1/transfers", json=shipment.manifest).status_code == 201
        first = shipments[0]
        assert first.put_all(http) == [201] * len(first.buckets)
        assert http.post(first.url + "/commit").status_code == 200

    # --json: every row, times as epoch seconds; newest first.
    rows = json.loads(hub.cli("transfers", "--site", "CHU-LIST", "--json").stdout)
    assert [r["id"] for r in rows] == [s.transfer_id for s in reversed(shipments)]
    assert [r["state"] for r in rows] == ["open", "open", "committed"]
    assert [r["study_uid"] for r in rows] == ["2.25.902", "2.25.901", "2.25.900"]
    committed = rows[2]
    assert isinstance(committed["created_at"], float)
    assert committed["committed_at"] >= committed["created_at"]
    assert rows[0]["committed_at"] is None and rows[0]["expired_at"] is None
    assert committed["held"] == committed["bucket_count"] == len(first.buckets)

    # The table: created and committed in UTC, as the hub's other tables print times.
    title, cells = _table(hub.cli("transfers", "--site", "CHU-LIST").stdout)
    assert title == "3 transfers"
    assert [c[:3] for c in cells] == [["CHU-LIST", r["id"], r["study_uid"]] for r in rows]
    assert [c[6:] for c in cells] == [
        [utc_text(rows[0]["created_at"]), "not yet"],
        [utc_text(rows[1]["created_at"]), "not yet"],
        [utc_text(committed["created_at"]), utc_text(committed["committed_at"])]]

    # --limit: the title says it is a part, of how many.
    title, cells = _table(hub.cli("transfers", "--site", "CHU-LIST", "--limit", "2").stdout)
    assert title == "the 2 newest of 3 transfers (--limit for more)"
    assert [c[1] for c in cells] == [rows[0]["id"], rows[1]["id"]]
    title, cells = _table(hub.cli("transfers", "--limit", "3").stdout)
    assert (title, len(cells)) == ("3 transfers", 3)  # all of them: no "newest of"

    # --study: did that study reach the region?
    title, cells = _table(hub.cli("transfers", "--study", "2.25.900").stdout)
    assert title == "1 transfer"
    assert cells == [["CHU-LIST", first.transfer_id, "2.25.900", "1",
                      f"{len(first.buckets)}/{len(first.buckets)}", cells[0][5],
                      utc_text(committed["created_at"]), utc_text(committed["committed_at"])]]
    assert json.loads(hub.cli("transfers", "--study", "2.25.999", "--json").stdout) == []
    assert json.loads(hub.cli("transfers", "--site", "CHU-QUIET", "--study", "2.25.900",
                              "--json").stdout) == []

    # A site enrolled that sent nothing: 0 transfers. A site never enrolled: a typo, exit 1.
    quiet = hub.cli("transfers", "--site", "CHU-QUIET")
    assert _table(quiet.stdout) == ("0 transfers", [])
    for extra in ((), ("--json",)):
        typo = hub.cli("transfers", "--site", "NOPE", *extra, check=False)
        assert (typo.returncode, typo.stdout) == (1, ""), typo.stdout + typo.stderr
        assert typo.stderr.splitlines() == [NEVER_ENROLLED]


def test_sites_show_when_revoked_and_sites_and_tokens_have_json(hub: HubProcess,
                                                                tmp_path: Path) -> None:
    enroll(hub, tmp_path / "site", "CHU-REV", cli=True)
    hub.cli("revoke", "CHU-REV")
    certificates = [c for c in json.loads(hub.cli("sites", "--json").stdout)
                    if c["site"] == "CHU-REV"]
    assert len(certificates) == 1
    (cert,) = certificates
    assert cert["state"] == "revoked" and cert["superseded_by"] is None
    assert isinstance(cert["revoked_at"], float) and cert["revoked_at"] > cert["issued_at"]
    assert 824 * 86400 < cert["not_after"] - cert["issued_at"] < 826 * 86400  # epoch too

    _, cells = _table(hub.cli("sites").stdout)
    assert [c for c in cells if c[0] == "CHU-REV"] == [
        ["CHU-REV", cert["serial"], utc_text(cert["not_after"])[:10],
         f"revoked {utc_text(cert['revoked_at'])}"]]
    again = hub.cli("revoke", "CHU-REV")  # the same time, in the same words
    assert again.stdout.strip() == (f"site CHU-REV: every certificate already revoked (the "
                                    f"last on {utc_text(cert['revoked_at'])}); nothing to do")

    tokens = [t for t in json.loads(hub.cli("tokens", "--json").stdout)
              if t["site"] == "CHU-REV"]
    assert [sorted(t) for t in tokens] == [["created_at", "expires_at", "site", "state",
                                            "token_id", "used_at", "voided_at"]]
    (token,) = tokens  # the identifier, never the digest of the secret
    assert re.fullmatch(r"[0-9a-f]{24}", token["token_id"]) and token["state"] == "spent"
    assert token["used_at"] >= token["created_at"] and token["voided_at"] is None
    _, cells = _table(hub.cli("tokens").stdout)
    assert [c for c in cells if c[0] == "CHU-REV"] == [
        ["CHU-REV", token["token_id"], utc_text(token["created_at"]),
         utc_text(token["expires_at"]), "spent"]]


def test_token_issue_and_revoke_are_logged_with_who_did_it(hub: HubProcess,
                                                           tmp_path: Path) -> None:
    who = f"by {operator_actor()} on {socket.gethostname()}"
    issued = hub.cli("token", "CHU-LOG", "--valid-for", "72h")
    secret = issued.stdout.strip()
    (token,) = [t for t in json.loads(hub.cli("tokens", "--json").stdout)
                if t["site"] == "CHU-LOG"]
    logged = [line.split(" ", 2)[2] for line in issued.stderr.splitlines()
              if " pas.hub.pki: " in line]
    assert logged == [f"WARNING pas.hub.pki: enrolment token {token['token_id']} issued for "
                      f"site CHU-LOG, valid until {utc_text(token['expires_at'])}, {who}"]
    assert secret not in issued.stderr and secret.split(".")[1] not in issued.stderr

    enroll_appliance(tmp_path / "site", hub.url, secret)
    hub.cli("token", "CHU-LOG")  # a spare, never spent
    revoked = hub.cli("revoke", "CHU-LOG")
    assert revoked.stdout.strip() == ("revoked 1 certificate of site CHU-LOG, voided 1 unspent "
                                      "enrolment token")
    assert [line.split(" ", 2)[2] for line in revoked.stderr.splitlines()] == [
        f"WARNING pas.hub.pki: site CHU-LOG revoked {who}: 1 certificate revoked, "
        "1 unspent enrolment token voided"]
    # Nothing changed, nothing logged: done already, or a site never enrolled.
    again = hub.cli("revoke", "CHU-LOG")
    assert "every certificate already revoked" in again.stdout and again.stderr == ""
    typo = hub.cli("revoke", "NOPE", check=False)
    assert (typo.returncode, typo.stderr.splitlines()) == (1, [NEVER_ENROLLED])


def test_no_token_for_the_shipped_placeholder_site(hub: HubProcess) -> None:
    before = _tokens_issued(hub)
    refused = hub.cli("token", "CHANGE-ME", check=False)
    assert (refused.returncode, refused.stdout) == (2, ""), refused.stdout + refused.stderr
    assert refused.stderr.splitlines() == [
        "refused: 'CHANGE-ME' is the placeholder site name of the shipped appliance.toml, "
        "not a site (pas enroll refuses it): issue the token for the site's own name, the one "
        "its appliance's configuration is to say; nothing written"]
    assert _tokens_issued(hub) == before
    # A real site's name that merely resembles it is a site like any other.
    assert UTC.search(hub.cli("token", "CHANGE-ME-NOT").stderr)
    assert _tokens_issued(hub) == before + 1


def test_a_stop_with_appliances_connected_says_so_without_an_error(
        hub: HubProcess, tmp_path: Path) -> None:
    """A ``systemctl stop`` of a hub whose appliances held their connections open left one
    line, uvicorn's ``ERROR: Cancel 0 running task(s), timeout graceful shutdown exceeded``
    (every routine restart an ERROR), and no line said the hub stopped or why. And it waited
    the whole grace (5 s) for the idle connection's TLS close, which an appliance answers
    only when it next uses it: the idle connection is dropped at once
    (appliance/web/bounded.py)."""
    from appliance import __version__

    site = enroll(hub, tmp_path / "site", "CHU-STOP")
    with client(site) as http:  # a kept-alive TLS connection, open through the stop
        assert http.get("/api/v1/whoami").status_code == 200
        started = time.monotonic()
        hub.stop()
        stopping = time.monotonic() - started
    said = hub.log()
    assert f"(archive: embedded), PAS {__version__}" in said
    assert "signal 15: stopping (requests in flight have 5 s)" in said
    assert said.rstrip().endswith("hub stopped"), said[-500:]
    assert "ERROR" not in said and "Cancel" not in said, said
    assert stopping < 3, (stopping, said[-500:])  # not the 5 s grace

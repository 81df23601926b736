"""Sites the hub refuses for a certificate its CA signed but it does not know are seen.

After ``pas hub restore``, a site enrolled (or enrolled again) after the backup is refused
(403 ``certificate_unknown``) until it enrols again, as documented; but the fleet page listed
only the restored database's sites (the new one gone, one revoked in the backup and enrolled
again since read "revoked", no problem), ``/metrics`` had nothing and no alert fired: a
WARNING line per request in the hub's journal was all. Asserted on a real ``pas hub run``,
backed up, restored in place and started again, with the sites' real certificates from its
CA: each such site is a ``refused`` row and a problem, with its gauge, ``pas_fleet_site_up``
0, one WARNING line for its run of refusals, and back to an ordinary site once enrolled again.

And the rows of a revoked site and of one never heard show "-", not figures of before
(``appliance/hub/fleet_refused.py``, ``appliance/hub/fleet.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.hub.fleet_refused import RefusedCertificates
from appliance.transfer.enrolment import Enrolment
from appliance.transfer.enrolment import enroll as enroll_appliance
from tests.support.hub import HubProcess, client, enroll
from tests.test_ops_fleet import metric

WHEN = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+"  # this host's time, its zone named


def _beat(studies: int = 0) -> dict[str, Any]:
    return {"sent_at": time.time(), "version": "0.9.1", "uptime_s": 5,
            "backlog": {"studies": studies, "bytes": 0, "oldest_age_s": 120.0,
                        "urgent_oldest_age_s": 0.0, "routine_oldest_age_s": 120.0},
            "jobs": {"pending": 0, "running": 0, "failed": 0},
            "disk": {"used_percent": 40.0, "free_bytes": 10 << 30},
            "received": {"instances": 12, "bytes": 12000}, "confirmed_instances": 6,
            "cert_days_left": 300.0, "last_backup_at": time.time(), "errors": []}


def _serial(enrolment: Enrolment) -> str:
    cert = x509.load_pem_x509_certificate((enrolment.pki_dir / "client.crt").read_bytes())
    return format(cert.serial_number, "x")


def _fingerprint(enrolment: Enrolment) -> str:
    cert = x509.load_pem_x509_certificate((enrolment.pki_dir / "client.crt").read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _row(page: str, site: str) -> str:
    row = page[page.index(f'<tr data-site="{site}">'):]
    return row[:row.index("</tr>") + 5]


def _cells(row: str) -> list[str]:
    """The text of each cell of a table row (tags dropped)."""
    return [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]


def test_a_site_enrolled_after_the_restored_backup_is_shown_refused_until_it_enrols_again(
        tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub").init()
    hub.start()
    try:
        # The default dashboard answers anyone: said at start (test_hub_dashboard_auth.py).
        assert ("WARNING pas.hub: the fleet dashboard and /metrics answer anyone who reaches "
                f"https://127.0.0.1:{hub.port}/ (dashboard.auth = \"none\")") in hub.log()
        kept = enroll(hub, tmp_path / "kept", "CHU-NORD")  # in the backup, and heard
        closed = enroll(hub, tmp_path / "closed", "CHU-OUEST")  # revoked, figures of before
        moved = enroll(hub, tmp_path / "moved", "CHU-SUD")  # revoked, enrolled again later
        enroll(hub, tmp_path / "quiet", "CHU-CENTRE")  # enrolled, never heard
        for enrolment in (kept, closed, moved):
            with client(enrolment) as http:
                answer = http.post("/api/v1/heartbeat", json=_beat(studies=7))
                assert answer.status_code == 201, answer.text
        hub.cli("revoke", "CHU-OUEST")
        hub.cli("revoke", "CHU-SUD")
        (tmp_path / "backups").mkdir()
        folder = json.loads(hub.cli("backup", str(tmp_path / "backups"), "--json").stdout)[
            "folder"]
        late = enroll(hub, tmp_path / "late", "CHU-EST")  # after the backup
        again = enroll(hub, tmp_path / "moved-again", "CHU-SUD")
        for enrolment in (late, again):
            with client(enrolment) as http:
                assert http.get("/api/v1/whoami").status_code == 200
    finally:
        hub.stop()
    hub.cli("restore", folder)
    logged_before = len(hub.log())
    hub.start()
    try:
        with client(late) as http:
            answers = [http.post("/api/v1/heartbeat", json=_beat()) for _ in range(12)]
        assert {a.status_code for a in answers} == {403}
        serial = _serial(late)
        assert answers[0].json() == {
            "error": "certificate_unknown",
            "detail": f"the certificate of site 'CHU-EST' (serial {serial}) is unknown: signed "
                      "by this hub's CA, but this hub has no record of it (its database "
                      "restored from a backup older than the enrolment?): ask regional ops "
                      "for a token and enrol again (pas enroll --replace)"}
        with client(again) as http:
            assert [http.get("/api/v1/whoami").status_code for _ in range(3)] == [403] * 3

        with httpx.Client(base_url=hub.url, verify=hub.anonymous_context(),
                          timeout=30) as viewer:
            page = viewer.get("/fleet").text
            # The site the restored database does not know: a row of its own, a problem.
            cells = _cells(_row(page, "CHU-EST"))
            assert cells[:10] == ["CHU-EST", "refused", "-", "-", "-", "-", "-", "-", "-",
                                  "-"], cells
            assert re.fullmatch(
                rf"refused: certificate {serial} unknown to this hub \(enrolled after the "
                r"restored backup\?\): issue a token and enrol it again \(pas hub token "
                r"CHU-EST, then pas enroll --replace at the site\); 12 requests refused "
                rf"since {WHEN}, the last \d+ s ago", cells[10]), cells[10]
            # Revoked in the backup, enrolled again since: refused too, not "revoked"; its
            # figures are its last heartbeat's, from before the revocation: "-".
            cells = _cells(_row(page, "CHU-SUD"))
            assert cells[1] == "refused" and cells[2].endswith(" ago"), cells
            assert cells[3:10] == ["-", "-", "-", "0.9.1", "-", "-", "-"], cells
            assert f"certificate {_serial(again)} unknown to this hub" in cells[10]
            assert "3 requests refused since" in cells[10]
            # Revoked and not calling: no problem, and no stale backlog or certificate days.
            cells = _cells(_row(page, "CHU-OUEST"))
            assert cells[1] == "revoked" and cells[3:] == ["-", "-", "-", "0.9.1", "-", "-",
                                                           "-", ""], cells
            # Enrolled, never heard: "-", not "backlog 0, oldest 0 s".
            cells = _cells(_row(page, "CHU-CENTRE"))
            assert cells[1] == "enrolled" and cells[3:] == ["-", "-", "-", "-", "-", "-",
                                                            "-", ""], cells
            cells = _cells(_row(page, "CHU-NORD"))  # heard, in the backup: as it was
            assert cells[1] in ("up", "down") and cells[3:5] == ["7", "2 min"], cells
            problems = viewer.get("/fleet", params={"state": "problems"}).text
            assert re.findall(r'<tr data-site="([^"]+)"', problems) == ["CHU-EST", "CHU-SUD"]
            refused = viewer.get("/fleet", params={"state": "refused"}).text
            assert re.findall(r'<tr data-site="([^"]+)"', refused) == ["CHU-EST", "CHU-SUD"]
            own = viewer.get("/fleet/sites/CHU-EST")
            assert own.status_code == 200, own.text
            assert f"refused: certificate {serial} (SHA-256 {_fingerprint(late)}) unknown " \
                "to this hub" in own.text
            assert "the last one refused: POST /api/v1/heartbeat from 127.0.0.1" in own.text

            scrape = viewer.get("/metrics").text
            assert metric(scrape, "pas_fleet_site_certificate_refused", site="CHU-EST") == 12
            assert metric(scrape, "pas_fleet_site_certificate_refused", site="CHU-SUD") == 3
            assert metric(scrape, "pas_fleet_site_certificate_refused", site="CHU-NORD") == 0
            assert metric(scrape, "pas_fleet_site_up", site="CHU-EST") == 0
            assert metric(scrape, "pas_fleet_site_up", site="CHU-SUD") == 0
            # PasSiteSilent: five minutes after the first refusal (the database knows no
            # heartbeat of it), at once for one whose last heartbeat is from before.
            first = metric(scrape, "pas_fleet_site_last_seen_timestamp_seconds",
                           site="CHU-EST")
            assert first is not None and time.time() - 60 < first <= time.time()
            assert metric(scrape, "pas_fleet_site_backlog_studies", site="CHU-SUD") is None
            assert metric(scrape, "pas_fleet_site_backlog_studies", site="CHU-CENTRE") is None
            assert metric(scrape, "pas_fleet_site_backlog_studies", site="CHU-NORD") == 7
            assert metric(scrape, "pas_fleet_sites") == 4  # CHU-OUEST revoked: left out

            # One WARNING line for CHU-EST's 12 refusals, not 12; one for CHU-SUD's 3.
            log = hub.log()[logged_before:]
            said = [line for line in log.splitlines() if "CHU-EST" in line]
            assert len(said) == 1, said
            assert "WARNING" in said[0] and (
                f"refused POST /api/v1/heartbeat from site CHU-EST (127.0.0.1): certificate "
                f"{serial} is unknown: signed by this hub's fleet CA but unknown to this hub "
                "(enrolled after the backup it was restored from?): issue a token (pas hub "
                "token CHU-EST) and enrol it again (pas enroll --replace at the site); further "
                "refusals of this certificate are logged once a minute at most") in said[0]
            assert len([line for line in log.splitlines() if "CHU-SUD" in line]) == 1

            # Enrolled again (a token, pas enroll --replace): an ordinary site at its first
            # request, said once in the journal.
            late = enroll_appliance(tmp_path / "late", hub.url, hub.token("CHU-EST"),
                                    replace=True)
            with client(late) as http:
                assert http.post("/api/v1/heartbeat", json=_beat()).status_code == 201
            page = viewer.get("/fleet").text
            cells = _cells(_row(page, "CHU-EST"))
            assert cells[1] == "up" and cells[3:5] == ["0", "2 min"], cells
            scrape = viewer.get("/metrics").text
            assert metric(scrape, "pas_fleet_site_certificate_refused", site="CHU-EST") == 0
            assert metric(scrape, "pas_fleet_site_up", site="CHU-EST") == 1
            log = hub.log()[logged_before:]
            assert len(re.findall(
                rf"site CHU-EST: let in again, with certificate {_serial(late)}; its "
                rf"certificate {serial}, unknown to this hub, was refused 12 times since "
                rf"{WHEN}", log)) == 1, log[-3000:]
    finally:
        hub.stop()


class _Clocks:
    """The tracker's two clocks, moved by hand."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_refusals_are_logged_at_once_then_once_a_minute_with_the_count_and_bounded(
        caplog: pytest.LogCaptureFixture) -> None:
    """The pacing the heartbeat gate's 429s have (hub/fleet_gate.LogPace): the first refusal
    of a certificate at once, then at most one line a minute saying how many meanwhile; and
    what is tracked is bounded, oldest forgotten first, each forgotten a day after its last
    refusal."""
    clocks = _Clocks()
    tracker = RefusedCertificates(max_tracked=3, clock=lambda: clocks.wall,
                                  pace_clock=lambda: clocks.mono)
    caplog.set_level(logging.INFO, logger="pas.hub")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records]

    tracker.refused("CHU-EST", "ab12", "f" * 64, "unknown", "PUT /api/v1/x", "10.0.0.5")
    assert len(lines()) == 1 and lines()[0].startswith(
        "refused PUT /api/v1/x from site CHU-EST (10.0.0.5): certificate ab12 is unknown")
    for _ in range(10):  # 10 more within the minute: not logged
        clocks.advance(5)
        tracker.refused("CHU-EST", "ab12", "f" * 64, "unknown", "PUT /api/v1/x", "10.0.0.5")
    assert len(lines()) == 1
    clocks.advance(10)  # 60 s after the first line: one line, counting this one too
    tracker.refused("CHU-EST", "ab12", "f" * 64, "unknown", "POST /api/v1/heartbeat",
                    "10.0.0.5")
    assert len(lines()) == 2 and re.fullmatch(
        rf"site CHU-EST: 11 requests with certificate ab12 \(unknown\) refused since the last "
        rf"such line \(12 since {WHEN}\), the last POST /api/v1/heartbeat from 10\.0\.0\.5",
        lines()[1]), lines()[1]
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    refusal = tracker.problems()["CHU-EST"]
    assert (refusal.count, refusal.serial, refusal.last_at - refusal.first_at) == \
        (12, "ab12", 60.0)

    # A revoked certificate is logged the same way, never shown as a problem.
    clocks.advance(1)
    tracker.refused("CHU-OUEST", "cd34", "e" * 64, "revoked", "GET /api/v1/whoami", "10.0.0.6")
    assert lines()[-1].endswith("certificate cd34 is revoked (pas hub revoke; pas hub sites "
                                "lists it); further refusals of this certificate are logged "
                                "once a minute at most")
    assert set(tracker.problems()) == {"CHU-EST"}

    # Bounded: a fourth certificate forgets the least recently refused.
    clocks.advance(1)
    tracker.refused("CHU-A", "01", "a" * 64, "unknown", "GET /api/v1/whoami", "10.0.0.7")
    clocks.advance(1)
    tracker.refused("CHU-B", "02", "b" * 64, "unknown", "GET /api/v1/whoami", "10.0.0.8")
    assert set(tracker.problems()) == {"CHU-A", "CHU-B"}  # CHU-EST's was the oldest
    # Let in with a new certificate: no longer a problem, said once; its old one refused
    # again (another box still holding it) does not make it one again.
    tracker.accepted("CHU-A", "99")
    tracker.accepted("CHU-A", "99")
    assert set(tracker.problems()) == {"CHU-B"}
    assert sum("site CHU-A: let in again, with certificate 99" in line
               for line in lines()) == 1
    tracker.refused("CHU-A", "01", "a" * 64, "unknown", "GET /api/v1/whoami", "10.0.0.7")
    assert set(tracker.problems()) == {"CHU-B"}
    # A day without a refusal: forgotten.
    clocks.advance(86401)
    assert tracker.problems() == {}

"""One site, one certificate in use: the first request made with a site's newest certificate
retires the older ones (``superseded_by`` it), so two boxes enrolled as one site do not both
upload as that site unseen, and a renewal (``pas enroll --replace``) does not cut off the
running daemon before its restart.

Real peers: ``pas hub run`` with real TLS 1.3 and client certificates, ``pas enroll``'s own
function, ``pas hub sites``, and a real ``pas run`` whose uploads meet the refusal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509

from tests.support.hub import HubProcess, client, enroll
from tests.support.peers import CT_DIR, storescu, wait_for
from tests.test_uplink_hub import enrolled_pas, jobs


def _serial(enrolment: Any) -> str:
    """The certificate's serial as the hub writes it (hex, as pas hub sites lists it)."""
    cert = x509.load_pem_x509_certificate((enrolment.pki_dir / "client.crt").read_bytes())
    return format(cert.serial_number, "x")


def _state(hub: HubProcess, serial: str) -> str:
    """The state column of ``pas hub sites`` for ``serial``."""
    listed = hub.cli("sites").stdout
    for line in listed.splitlines():
        cells = [cell.strip() for cell in line.split("│")]
        if len(cells) == 6 and cells[2] == serial:  # | site | serial | valid until | state |
            return cells[4]
    raise AssertionError(f"{serial} not listed: {listed}")


def test_a_second_box_enrolled_as_the_site_retires_the_first_at_its_first_request(
        hub: HubProcess, tmp_path: Path) -> None:
    first = enroll(hub, tmp_path / "first-box", "CHU-TWICE")
    with client(first) as http:
        assert http.get("/api/v1/whoami").json() == {"site": "CHU-TWICE"}
    second = enroll(hub, tmp_path / "second-box", "CHU-TWICE")
    old, new = _serial(first), _serial(second)
    assert old in hub.cli("sites").stdout

    with client(first) as http_first, client(second) as http_second:
        # Enrolled, not yet used: the first box still works (a renewal's daemon runs on).
        assert http_first.get("/api/v1/whoami").status_code == 200
        assert _state(hub, old) == "valid" and _state(hub, new) == "valid"
        # The new certificate's first request retires the old one, at once, even on the
        # first box's open connection.
        assert http_second.get("/api/v1/whoami").json() == {"site": "CHU-TWICE"}
        refused = http_first.get("/api/v1/whoami")
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "certificate_superseded"
        assert "a newer certificate of the site is in use" in refused.json()["detail"]
        assert "pas enroll --replace" in refused.json()["detail"]
        # The older certificate's use retires nothing: the newer one is still served.
        assert http_second.get("/api/v1/whoami").status_code == 200

    assert _state(hub, old) == f"superseded by {new}"
    assert _state(hub, new) == "valid"
    assert f"site CHU-TWICE: certificate {old} superseded by certificate {new}" in hub.log()


def test_an_older_certificate_used_after_a_newer_was_issued_retires_nothing(
        hub: HubProcess, tmp_path: Path) -> None:
    """The order of first uses is not the order of issue: the older box asking first (its
    daemon still running after the renewal) leaves the newer certificate valid; another
    site's certificates are never touched."""
    older = enroll(hub, tmp_path / "older", "CHU-ORDER")
    other_site = enroll(hub, tmp_path / "other", "CHU-OTHER")
    newer = enroll(hub, tmp_path / "newer", "CHU-ORDER")
    with client(older) as http:
        assert http.get("/api/v1/whoami").status_code == 200
    assert _state(hub, _serial(newer)) == "valid"
    with client(newer) as http:
        assert http.get("/api/v1/whoami").status_code == 200
    with client(other_site) as http:
        assert http.get("/api/v1/whoami").json() == {"site": "CHU-OTHER"}
    assert _state(hub, _serial(older)) == f"superseded by {_serial(newer)}"
    assert _state(hub, _serial(other_site)) == "valid"


def test_a_daemon_whose_certificate_was_superseded_keeps_its_studies_waiting_and_says_why(
        pas_factory: Any, hub: HubProcess, tmp_path: Path) -> None:
    """The first box's uploads meet 403 certificate_superseded: its jobs wait (no attempt
    counted, none failed), and the error says that a newer certificate of the site is in
    use and how to put it right."""
    home = tmp_path / "site-superseded"
    pas = enrolled_pas(pas_factory, hub, home, {"PAS_QUEUE__BACKOFF_MAX_S": "300",
                                                "PAS_STUDY__STABLE_AFTER_S": "1"})
    intruder = enroll(hub, tmp_path / "another-box", "SITE-SUPERSEDED")
    with client(intruder) as http:
        assert http.get("/api/v1/whoami").status_code == 200
    storescu(sorted(CT_DIR.glob("*.dcm"))[:2], pas.port)
    wait_for(lambda: jobs(pas) and all(j["last_error"] for j in jobs(pas)), 60,
             what=f"the upload's first try (log {pas.log_path})")
    waiting = jobs(pas)
    assert all(j["state"] == "pending" and j["attempts"] == 0 for j in waiting), \
        [dict(j) for j in waiting]
    for job in waiting:
        assert job["last_error"].startswith(
            "waiting for credentials: hub: the hub refuses this appliance's certificate "
            "(certificate_superseded): a newer certificate of this site is in use"), \
            job["last_error"]
        assert "pas enroll --replace" in job["last_error"]
    assert pas.status()["confirmed_instances"] == 0

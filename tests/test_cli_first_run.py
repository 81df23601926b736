"""What hospital IT reads on a first installation, against a real ``pas run``: why ``pas
send`` could not associate (an AE title PAS does not know, a wrong called AE, nothing
listening), and the daemon's disk alert in ``pas cache status``, ``pas status`` and on the
status page (it was only in ``pas status --json`` and the journal)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support.peers import MR_DIR, PasProcess, free_port, wait_for

FILES = sorted(p for p in MR_DIR.rglob("*") if p.is_file())[:5]


def test_send_says_why_the_association_failed(
        pas_factory: Callable[..., PasProcess]) -> None:
    pas = pas_factory({"PAS_DICOM__KNOWN_AES": '[{ title = "CT2" }]'})
    files = [str(p) for p in FILES]

    unknown = pas.cli("send", *files, check=False)  # pas send calls as PASSEND by default
    assert unknown.returncode == 1
    # PAS's log says what it did with the association (CI saw "aborted or not answered"
    # here once, under load, with nothing to tell why).
    assert "calling AE title 'PASSEND' not recognised" in unknown.stderr, \
        f"{unknown.stderr}\nPAS log:\n{pas.log()[-4000:]}"
    assert "dicom.known_aes" in unknown.stderr and "--calling-ae" in unknown.stderr

    wrong_called = pas.cli("send", *files, "--calling-ae", "CT2", "--called-ae", "NOT_PAS",
                           check=False)
    assert wrong_called.returncode == 1
    assert "called AE title 'NOT_PAS' not recognised" in wrong_called.stderr

    closed = pas.cli("send", *files, "--port", str(free_port()), check=False)
    assert closed.returncode == 1 and "no connection" in closed.stderr
    for result in (unknown, wrong_called, closed):
        assert "Traceback" not in result.stderr
    assert pas.status()["instances"] == 0  # nothing arrived from the refused sends

    sent = pas.cli("send", *files, "--calling-ae", "CT2")
    assert f"sent {len(FILES)} of {len(FILES)} files" in sent.stdout
    assert pas.status()["instances"] == len(FILES)


def test_the_daemons_disk_alert_is_shown_where_hospital_it_looks(
        pas_factory: Callable[..., PasProcess]) -> None:
    # A spool quota this small is within the alert's headroom at once: the daemon raises
    # the "hard limit" alert (C-STOREs about to be refused with 0xA700) at its first pass.
    pas = pas_factory({"PAS_STORAGE__QUOTA_MB": "1"})
    wait_for(lambda: "ALERT hard limit" in pas.log(), 15, what="the daemon's disk alert")

    cache = pas.cli("cache", "status")
    assert "{'" not in cache.stdout  # a table, not the Python dict it printed
    row = next(line for line in cache.stdout.splitlines() if "disk alert" in line)
    assert "hard limit" in row and "storage.quota_mb=1" in row
    as_json = json.loads(pas.cli("cache", "status", "--json").stdout)
    assert as_json["alert"].startswith("hard limit") and as_json["alert_since"] > 0

    status = pas.cli("status").stdout
    assert status.lstrip().startswith("PAS (AE PAS)")  # was "PAS PAS (PAS)" on defaults
    assert "Backlog: none" in status  # said when empty, not left out
    row = next(line for line in status.splitlines() if "disk alert" in line)
    assert "hard limit" in row

    page = httpx.get(f"http://127.0.0.1:{pas.http_port}/", timeout=10)
    assert page.status_code == 200
    assert 'id="disk-alert">hard limit' in page.text

    # pas doctor judged the file system alone ("ok"): the quota is what refuses C-STOREs.
    doctor = pas.cli("doctor", "--json", check=False)
    assert doctor.returncode == 1
    disk = next(c for c in json.loads(doctor.stdout) if c["name"] == "disk")
    assert disk["verdict"] == "fail" and "hard limit" in disk["detail"], disk


def test_no_alert_row_while_all_is_well(pas: PasProcess) -> None:
    cache = pas.cli("cache", "status").stdout
    row = next(line for line in cache.splitlines() if "disk alert" in line)
    assert row.split("│")[2].strip() == "none"
    assert "disk alert" not in pas.cli("status").stdout
    page = httpx.get(f"http://127.0.0.1:{pas.http_port}/", timeout=10).text
    assert 'id="disk"' in page and "disk-alert" not in page
    doctor = json.loads(pas.cli("doctor", "--json", check=False).stdout)
    assert "disk alert" not in next(c for c in doctor if c["name"] == "disk")["detail"]


def test_an_alert_the_space_came_back_from_is_cleared_by_the_next_start(
        pas_factory: Callable[..., PasProcess], tmp_path: Path) -> None:
    """The quota raised, then stop and start without it: the alert row stayed the latest,
    and the disk alert was shown for ever (only the process that raised one cleared it)."""
    home = tmp_path / "home"
    first = pas_factory({"PAS_STORAGE__QUOTA_MB": "1"}, home=home)
    wait_for(lambda: "ALERT hard limit" in first.log(), 15, what="the daemon's disk alert")
    first.stop()
    second = pas_factory(home=home)
    wait_for(lambda: "disk alert cleared" in second.log(), 15, what="the alert cleared")
    assert second.status()["cache"]["disk_alert"] is None
    assert "disk alert" not in second.cli("status").stdout
    page = httpx.get(f"http://127.0.0.1:{second.http_port}/", timeout=10).text
    assert "disk-alert" not in page

    # Raised again while it holds: one alert row, not one per start.
    second.stop()
    third = pas_factory({"PAS_STORAGE__QUOTA_MB": "1"}, home=home)
    wait_for(lambda: "ALERT hard limit" in third.log(), 15, what="the alert raised again")
    third.stop()
    fourth = pas_factory({"PAS_STORAGE__QUOTA_MB": "1"}, home=home)
    assert "hard limit" in fourth.status()["cache"]["disk_alert"]
    fourth.cli("cache", "evict")  # a pass of its own, done when it returns (the daemon's too)
    alerts = json.loads(fourth.cli("audit", "--event", "alert", "--json").stdout)
    assert [row["outcome"] for row in alerts] == ["failure: disk", "success", "failure: disk"]

"""``pas doctor``'s port checks tell this home's PAS from another program on its port.

A C-ECHO alone cannot: DCMTK's storescp (a test node left running, the old PACS gateway on
the same port) answers it as PAS does, and doctor said "PAS answers" while the modality's
studies went to that program. Real daemons, a real storescp; doctor reads /proc.

And the last backup's age: a failed pas-backup.timer showed only in ``systemctl --failed``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

from appliance.store.db import Database
from tests.support.peers import PasProcess, StoreSCP, free_port, run_pas, wait_for


def _doctor(env: dict[str, str]) -> tuple[int, dict[str, dict[str, str]]]:
    result = run_pas(["doctor", "--json"], env, timeout=120)
    return result.returncode, {c["name"]: c for c in json.loads(result.stdout)}


def _env(home: Path, dicom_port: int, http_port: int) -> dict[str, str]:
    return {**os.environ, "PAS_HOME": str(home), "PAS_DICOM__HOST": "127.0.0.1",
            "PAS_DICOM__PORT": str(dicom_port), "PAS_HTTP__PORT": str(http_port),
            "PAS_DICOM__ACCEPT_UNKNOWN": "true"}


def test_storescp_on_the_dicom_port_is_not_pas(tmp_path: Path) -> None:
    storescp = StoreSCP(tmp_path / "scp").start()
    try:
        code, checks = _doctor(_env(tmp_path / "home", storescp.port, free_port()))
    finally:
        storescp.stop()
    port_check = checks["DICOM port"]
    assert code == 1 and port_check["verdict"] == "fail", port_check
    assert "storescp" in port_check["detail"], port_check
    assert "no PAS daemon runs on this home" in port_check["detail"]


def test_the_port_of_a_pas_on_another_home_is_not_ours(tmp_path: Path) -> None:
    other = PasProcess(tmp_path / "other-home", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    mine = PasProcess(tmp_path / "home", {"PAS_DICOM__ACCEPT_UNKNOWN": "true"}).start()
    try:
        assert mine.proc is not None and other.proc is not None
        # This home's daemon runs, but the configuration names the other one's DICOM port.
        code, checks = _doctor(_env(tmp_path / "home", other.port, mine.http_port))
        port_check = checks["DICOM port"]
        assert code == 1 and port_check["verdict"] == "fail", port_check
        assert f"pid {other.proc.pid}" in port_check["detail"], port_check
        assert f"not this home's PAS (pid {mine.proc.pid})" in port_check["detail"]
        # Its own ports: both answer, and doctor names the daemon.
        code, checks = _doctor(_env(tmp_path / "home", mine.port, mine.http_port))
        assert checks["DICOM port"]["verdict"] == "ok", checks["DICOM port"]
        assert f"(pid {mine.proc.pid}) answers" in checks["DICOM port"]["detail"]
        assert checks["HTTP port"]["verdict"] == "ok", checks["HTTP port"]
        # The RIS's HL7 port too (it was not checked: another program there lost every
        # prefetch order): its own answers, the other home's is not ours.
        code, checks = _doctor({**_env(tmp_path / "home", mine.port, mine.http_port),
                                "PAS_HL7__HOST": "127.0.0.1",
                                "PAS_HL7__PORT": str(mine.hl7_port)})
        assert checks["HL7 port"] == {
            "name": "HL7 port", "verdict": "ok", "fix": "",
            "detail": f"127.0.0.1:{mine.hl7_port}: HL7 listener (pid {mine.proc.pid}) answers"}
        code, checks = _doctor({**_env(tmp_path / "home", mine.port, mine.http_port),
                                "PAS_HL7__HOST": "127.0.0.1",
                                "PAS_HL7__PORT": str(other.hl7_port)})
        assert code == 1 and checks["HL7 port"]["verdict"] == "fail", checks["HL7 port"]
        assert f"not this home's PAS (pid {mine.proc.pid})" in checks["HL7 port"]["detail"]
        # Asked with other settings (a port nothing listens on): it runs, not "not running".
        code, checks = _doctor(_env(tmp_path / "home", free_port(), mine.http_port))
        port_check = checks["DICOM port"]
        assert port_check["verdict"] == "warn", port_check
        assert f"yet PAS (pid {mine.proc.pid}) runs on this home: it was started with other " \
            "settings" in port_check["detail"], port_check
        assert f"/proc/{mine.proc.pid}/environ" in port_check["fix"], port_check
    finally:
        mine.stop()
        other.stop()


def test_a_daemon_on_ipv6_any_is_checked_not_a_traceback(tmp_path: Path) -> None:
    """dicom.host / http.host ``::`` (every address, IPv6 and IPv4): doctor probed
    ``http://:::PORT/healthz`` (an InvalidURL traceback, no check printed), and with the
    daemon stopped bound an IPv4 socket to "::" ("cannot bind", fail, for a free port)."""
    env = {"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_DICOM__HOST": "::", "PAS_HTTP__HOST": "::"}
    pas = PasProcess(tmp_path / "home", env).start()
    try:
        assert pas.proc is not None
        code, checks = _doctor({**pas.env})
        for name in ("DICOM port", "HTTP port"):
            assert checks[name]["verdict"] == "ok", checks[name]
            assert f"(pid {pas.proc.pid}) answers" in checks[name]["detail"], checks[name]
    finally:
        pas.stop()
    code, checks = _doctor({**pas.env})
    for name in ("DICOM port", "HTTP port"):
        assert checks[name]["verdict"] == "warn", checks[name]
        assert "is free: the daemon is not running" in checks[name]["detail"], checks[name]


def _audit_row_at(db_path: Path, at: float, event: str, target: str, detail: str) -> None:
    """A row as PAS writes it, dated ``at`` (the trail refuses only UPDATE and DELETE)."""
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO audit (at, event, actor, target, outcome, detail) "
                     "VALUES (?, ?, 'operator:test', ?, 'success', ?)",
                     (at, event, target, detail))
    conn.close()


def test_doctor_says_how_old_the_last_backup_is_and_warns_when_it_is_stale(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    db_path = home / "pas.sqlite"
    Database(db_path).close()
    env = _env(home, free_port(), free_port())
    _, checks = _doctor(env)
    assert checks["backup"]["verdict"] == "ok", checks["backup"]
    assert checks["backup"]["detail"].startswith("none yet"), checks["backup"]
    # An index in use for three days, never backed up.
    _audit_row_at(db_path, time.time() - 3 * 86400, "config", "appliance.toml", "first start")
    _, checks = _doctor(env)
    assert checks["backup"]["verdict"] == "warn", checks["backup"]
    assert checks["backup"]["detail"] == "no pas backup was ever written of this index"

    destination = tmp_path / "backups"
    destination.mkdir()
    made = run_pas(["backup", str(destination), "--json"], env, timeout=60, check=True)
    folder = json.loads(made.stdout)["folder"]
    _, checks = _doctor(env)
    assert checks["backup"]["verdict"] == "ok", checks["backup"]
    assert checks["backup"]["detail"].endswith(f"min ago: {folder}"), checks["backup"]
    # The timer failing since: the newest backup three days old.
    _audit_row_at(db_path, time.time() - 3 * 86400, "export", folder,
                  "pas backup: the index (0 instances, 0 studies), the enrolment and the "
                  "configuration")
    _, checks = _doctor(env)
    assert checks["backup"]["verdict"] == "warn", checks["backup"]
    assert checks["backup"]["detail"] == f"the last backup is 3 days ago: {folder}"
    assert "journalctl -u pas-backup" in checks["backup"]["fix"]
    # Its folder gone (a share no longer mounted, a disk replaced).
    shutil.rmtree(folder)
    _, checks = _doctor(env)
    assert checks["backup"]["verdict"] == "warn", checks["backup"]
    assert checks["backup"]["detail"] == (f"the last backup, {folder} (3 days ago), is no "
                                          "longer there")


def test_doctor_s_echo_from_this_machine_is_no_security_event(tmp_path: Path) -> None:
    """The appliance's default refuses unknown AEs, and doctor's C-ECHO (calling AE
    PASDOCTOR) was one: every check-up wrote a security warning and a failure row in the
    audit trail (copied to the ATNA collector). From this machine, Verification only, it is
    let through and answered; the same title asking for anything else is still refused."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

    pas = PasProcess(tmp_path / "home", {"PAS_DICOM__ACCEPT_UNKNOWN": "false"}).start()
    try:
        env = {**_env(tmp_path / "home", pas.port, pas.http_port),
               "PAS_DICOM__ACCEPT_UNKNOWN": "false"}
        _code, checks = _doctor(env)
        assert checks["DICOM port"]["verdict"] == "ok", checks["DICOM port"]
        assert "association rejected" not in pas.log()

        def security_rows() -> list[tuple[str, str]]:
            with contextlib.closing(sqlite3.connect(tmp_path / "home" / "pas.sqlite")) as db:
                return db.execute("SELECT actor, outcome FROM audit "
                                  "WHERE event = 'security'").fetchall()

        assert security_rows() == []
        # The exception is doctor's echo, nothing more: storage under its title is refused.
        storing = AE(ae_title="PASDOCTOR")
        storing.add_requested_context(Verification)
        storing.add_requested_context(CTImageStorage)
        assoc = storing.associate("127.0.0.1", pas.port, ae_title="PAS")
        assert assoc.is_rejected
        echoing = AE(ae_title="PASDOCTOR")
        echoing.add_requested_context(Verification)
        assoc = echoing.associate("127.0.0.1", pas.port, ae_title="PAS")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        wait_for(lambda: len(security_rows()) == 1, 10, what="the refused storage's row")
        assert security_rows()[0][1].startswith("failure"), security_rows()
    finally:
        pas.stop()


def test_a_bad_variable_is_named_with_its_fix_not_the_toml_file(tmp_path: Path) -> None:
    """``PAS_DICOM__PORT=abc`` was reported as the key alone, with "fix this key in the TOML
    file" (there may be no file): the variable is named, and what to do with it."""
    code, checks = _doctor({**_env(tmp_path / "home", free_port(), free_port()),
                            "PAS_DICOM__PORT": "abc"})
    check = checks["configuration"]
    assert code == 1 and check["verdict"] == "fail", check
    assert check["detail"] == "dicom.port: must be an integer, got 'abc' (set by PAS_DICOM__PORT)"
    assert check["fix"].startswith("fix or unset PAS_DICOM__PORT"), check


def test_doctor_says_whether_the_audit_trail_has_a_copy_off_the_appliance(
        tmp_path: Path) -> None:
    """The trail's table refuses changes by trigger, which root can drop: the copy at the
    hospital's ATNA repository is what an auditor trusts, and nothing said it was missing."""
    env = _env(tmp_path / "home", free_port(), free_port())
    _code, checks = _doctor(env)
    assert checks["audit trail"]["verdict"] == "warn", checks["audit trail"]
    assert checks["audit trail"]["detail"].startswith("kept on this appliance only")
    assert "[audit] syslog_host" in checks["audit trail"]["fix"]
    _code, checks = _doctor({**env, "PAS_AUDIT__SYSLOG_HOST": "atna.hospital.example",
                             "PAS_AUDIT__SYSLOG_CA": str(tmp_path / "ca.crt")})
    assert checks["audit trail"] == {
        "name": "audit trail", "verdict": "ok", "fix": "",
        "detail": "copied to atna.hospital.example:6514 (syslog over TLS)"}, checks


def test_doctor_warns_of_an_http_port_open_to_the_network_without_credentials(
        tmp_path: Path) -> None:
    """The image binds the HTTP port to every interface with serving.auth = "none": any host
    read every study and stored into the region, and nothing said so."""
    env = _env(tmp_path / "home", free_port(), free_port())
    _code, checks = _doctor(env)
    assert "HTTP access" not in checks  # 127.0.0.1, the default: this machine only
    _code, checks = _doctor({**env, "PAS_HTTP__HOST": "0.0.0.0"})
    found = checks["HTTP access"]
    assert found["verdict"] == "warn" and found["detail"].startswith(
        "0.0.0.0:"), found
    assert "with no credential (serving.auth = \"none\")" in found["detail"]
    assert "serving.auth = \"bearer\"" in found["fix"]
    _code, checks = _doctor({**env, "PAS_HTTP__HOST": "0.0.0.0", "PAS_SERVING__AUTH": "bearer",
                             "PAS_SERVING__BEARER_TOKENS": '["t"]'})
    assert "HTTP access" not in checks


def test_doctor_warns_of_an_hl7_port_open_to_every_host(tmp_path: Path) -> None:
    """Any host reaching the HL7 port sent orders (a named patient's priors pulled from
    the region) and merges; nothing said so."""
    env = {**_env(tmp_path / "home", free_port(), free_port()), "PAS_HL7__HOST": "0.0.0.0",
           "PAS_HL7__PORT": str(free_port())}
    _code, checks = _doctor(env)
    found = checks["HL7 access"]
    assert found["verdict"] == "warn" and "hl7.allowed_sources is empty" in found["detail"]
    assert "hl7.allowed_sources" in found["fix"]
    _code, checks = _doctor({**env, "PAS_HL7__ALLOWED_SOURCES": '["10.1.2.15"]'})
    assert "HL7 access" not in checks
    _code, checks = _doctor({**env, "PAS_PREFETCH__ENABLED": "false"})  # no listener runs
    assert "HL7 access" not in checks


def test_the_daemon_says_at_start_that_its_http_and_hl7_ports_are_open_to_the_network(
        tmp_path: Path) -> None:
    """What pas doctor warns of, said in the daemon's own log at each start too, as the hub
    says its open dashboard: an operator who never runs doctor (the image's first boot
    serves the HTTP port to every interface with no credential) reads it in the journal.
    Bound to the host's side of a test namespace's link: an address that is not loopback,
    inside 198.18.0.0/15."""
    from tests.support.netns import NetNamespace

    ns = NetNamespace("open").create()
    try:
        pas = PasProcess(tmp_path / "open", {
            "PAS_DICOM__HOST": ns.outer_address,  # the start is awaited there
            "PAS_HTTP__HOST": ns.outer_address, "PAS_HL7__HOST": ns.outer_address,
            "PAS_HL7__PORT": str(free_port())}).start()
        try:
            log = pas.log()
        finally:
            pas.stop()
        assert (f"WARNING pas.daemon: HTTP access: {ns.outer_address}:") in log, log
        assert "with no credential (serving.auth = \"none\"): set serving.auth" in log
        assert "WARNING pas.daemon: HL7 access: " in log
        assert "hl7.allowed_sources is empty" in log
        quiet = PasProcess(tmp_path / "quiet", {
            "PAS_HL7__HOST": "127.0.0.1", "PAS_HL7__PORT": str(free_port())}).start()
        try:  # loopback: this machine only, nothing said
            assert "access:" not in quiet.log()
        finally:
            quiet.stop()
    finally:
        ns.delete()


def test_doctor_help_names_the_time_zone_row(tmp_path: Path) -> None:
    """``pas doctor --help`` lists the checks: the time zone row (doctor_time.py) was not."""
    env = {**os.environ, "PAS_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    usage = " ".join(run_pas(["doctor", "--help"], env, check=True).stdout.split())
    assert "clock, time zone and destinations" in usage

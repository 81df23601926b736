"""A configuration that names no site is its enrolment's site, everywhere.

The hub knows an appliance by its certificate's CN. An appliance whose configuration has no
``site`` key (the shipped one, first boot without a name) enrolled as CHU-A was CHU-A to the
hub and "PAS" (the default) to its own audit trail (ATNA AuditEnterpriseSiteID), ``pas_info``,
``pas status``, ``pas config check`` and its backups (folder name and manifest).
``appliance.config.with_enrolled_site`` now decides the site once, where the settings are
loaded. A configuration naming its site keeps it (tests/test_site_guard.py), an appliance
not enrolled keeps the default. Real peers: ``pas hub run``, ``pas run``, the CLI as child
processes, a TLS syslog collector on loopback.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx

from appliance.store.schema import MIGRATIONS
from tests.faults.pki import make_pki
from tests.faults.test_audit import SyslogTlsCollector, _by_msgid
from tests.support.hub import HubProcess, enroll
from tests.support.peers import PasProcess, free_port, wait_for


def _site_of(message: ET.Element) -> tuple[str | None, str | None]:
    source = message.find("AuditSourceIdentification")
    assert source is not None
    users = [p.get("UserID") for p in message.findall("ActiveParticipant")]
    return source.get("AuditEnterpriseSiteID"), next(
        (u for u in users if u and u.startswith("PAS@")), None)


def test_no_site_in_the_configuration_is_the_enrolments_site_everywhere(
        hub: HubProcess, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "syslog-pki")
    home = tmp_path / "home"
    enroll(hub, home, "CHU-A")
    syslog_port = free_port()
    collector = SyslogTlsCollector(pki, syslog_port).start()
    pas = PasProcess(home, {"PAS_AUDIT__SYSLOG_HOST": "127.0.0.1",
                            "PAS_AUDIT__SYSLOG_PORT": str(syslog_port),
                            "PAS_AUDIT__SYSLOG_CA": str(pki / "ca.crt")})
    pas.env.pop("PAS_SITE", None)
    pas.env.pop("PAS_CONFIG", None)
    assert not (home / "appliance.toml").exists()  # no file, no PAS_SITE: no site named
    destination = tmp_path / "backups"
    destination.mkdir()
    try:
        pas.start()
        # The audit trail: the first start's configuration event, at the collector.
        wait_for(lambda: _by_msgid(collector.messages, "config"), 30,
                 what="the configuration event at the syslog collector")
        assert _site_of(_by_msgid(collector.messages, "config")[0]) == ("CHU-A", "PAS@CHU-A")

        web = f"http://127.0.0.1:{pas.http_port}"
        metrics = httpx.get(f"{web}/metrics", timeout=10).text
        (info,) = [line for line in metrics.splitlines() if line.startswith("pas_info{")]
        assert 'site="CHU-A"' in info, info
        assert httpx.get(f"{web}/api/status", timeout=10).json()["site"] == "CHU-A"
        assert "<title>PAS CHU-A</title>" in httpx.get(f"{web}/", timeout=10).text

        assert json.loads(pas.cli("status", "--json").stdout)["site"] == "CHU-A"
        assert pas.cli("status").stdout.strip().startswith("PAS CHU-A (AE PAS)")
        checked = " ".join(pas.cli("config", "check").stdout.split())
        assert "configuration OK: site CHU-A (its enrolment's)," in checked, checked
        # The region is where studies go: named, not left behind "0 destinations".
        assert checked.endswith(f"0 destinations besides the regional hub {hub.url} "
                                "(destination hub, enrolled); database schema "
                                f"{len(MIGRATIONS)} of {len(MIGRATIONS)} (current)"), checked
        answer = json.loads(pas.cli("config", "check", "--json").stdout)
        assert (answer["ok"], answer["site"], answer["site_from"], answer["enrolled_hub"],
                answer["destinations"]) == (True, "CHU-A", "enrolment", hub.url, {}), answer

        written = json.loads(pas.cli("backup", str(destination), "--json").stdout)
        folder = Path(written["folder"])
    finally:
        pas.stop()
        collector.stop()
    assert folder.name.startswith("pas-backup-CHU-A-"), folder
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert (manifest["site"], manifest["site_from"]) == ("CHU-A", "enrolment")

    # A new disk, the same configuration (no site), not enrolled: the backup is put back,
    # as a backup of such a configuration always was, and its enrolment names the site.
    new_disk = PasProcess(tmp_path / "new-disk")
    new_disk.env.pop("PAS_SITE", None)
    assert " ".join(new_disk.cli("config", "check").stdout.split()).startswith(
        "configuration OK: site PAS, AE")  # not enrolled: the default, as before
    new_disk.cli("restore", str(folder))
    assert json.loads(new_disk.cli("status", "--json").stdout)["site"] == "CHU-A"

    # An appliance enrolled as CHU-B (no site named either) refuses CHU-A's backup, and
    # says where its own name comes from.
    other = tmp_path / "chu-b"
    enroll(hub, other, "CHU-B")
    key_before = (other / "pki" / "client.crt").read_bytes()
    refused = PasProcess(other).cli("restore", str(folder), check=False)
    said = " ".join(refused.stderr.split())
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert (f"{folder} is the backup of site 'CHU-A', and this appliance is site 'CHU-B' "
            "(its enrolment's; its configuration names no site)") in said, said
    assert (other / "pki" / "client.crt").read_bytes() == key_before
    assert not (other / "pas.sqlite").exists()

    # A backup written before manifests said where the site came from ("PAS", the default,
    # no site_from) is of its certificate's site: taken back by CHU-A, refused by CHU-B.
    older = manifest.copy()
    older["site"] = "PAS"
    del older["site_from"]
    (folder / "MANIFEST.json").write_text(json.dumps(older))
    refused = PasProcess(other).cli("restore", str(folder), check=False)
    assert "is the backup of site 'CHU-A', and this appliance is site 'CHU-B'" in " ".join(
        refused.stderr.split()), refused.stderr
    PasProcess(home).cli("restore", str(folder))

    # A configuration naming its site keeps it (the enrolment is the same site).
    named = PasProcess(home, {"PAS_SITE": "CHU-A"})
    assert " ".join(named.cli("config", "check").stdout.split()).startswith(
        "configuration OK: site CHU-A, AE")

"""The shipped monitoring files: alert rules checked and unit-tested with promtool (Debian
``prometheus``), every Grafana expression parsed by promtool too. That the names they use are
really exported is checked against live scrapes in test_ops_fleet.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.support.peers import ROOT

MONITORING = ROOT / "image" / "monitoring"
NAME = re.compile(r"\bpas_[a-z_]+")


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def alert_rules() -> list[dict[str, object]]:
    document = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def grafana_expressions() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def referenced_metric_names() -> set[str]:
    """Every ``pas_...`` name an alert or a dashboard panel queries."""
    expressions = [str(rule["expr"]) for rule in alert_rules()] + grafana_expressions()
    return {name for expr in expressions for name in NAME.findall(expr)}


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 39 rules found" in result.stdout


def test_alert_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_what_the_issue_names() -> None:
    exprs = {str(rule["alert"]): str(rule["expr"]) for rule in alert_rules()}
    assert "> 300" in exprs["PasSiteSilent"]                 # silent > 5 min
    assert "> 480" in exprs["PasUrgentBacklogOld"]           # urgent backlog > 8 min
    assert "> 14400" in exprs["PasRoutineBacklogOld"]        # routine backlog > 4 h
    assert 'priority="routine"' in exprs["PasRoutineBacklogOld"]
    assert "> 0.85" in exprs["PasDiskAlmostFull"]            # disk > 85 %
    # The site's own disk alert (the file system's figure says capacity, not trouble).
    assert exprs["PasSiteDiskAlert"] == "pas_fleet_site_disk_alert == 1"
    assert exprs["PasSiteRefusingImages"] == "pas_fleet_site_disk_alert == 2"
    assert exprs["PasApplianceDiskAlert"] == "pas_disk_alert == 1"
    assert exprs["PasApplianceRefusingImages"] == "pas_disk_alert == 2"
    assert "< 30" in exprs["PasCertificateExpiring"]         # certificate < 30 days
    assert "> 0" in exprs["PasFailedJobs"]                   # failed jobs
    assert "pas_fleet_site_backup_age_seconds > 172800" in exprs["PasBackupOld"]  # 2 days
    assert "pas_hub_backup_age_seconds > 172800" in exprs["PasHubBackupOld"]  # the hub's own
    hub_backup = {str(rule["alert"]): rule for rule in alert_rules()}["PasHubBackupOld"]
    assert hub_backup["labels"] == {"severity": "warning"}
    says = str(hub_backup["annotations"]["description"])  # type: ignore[index]
    assert "systemctl status pas-hub-backup.timer" in says and \
        "journalctl -u pas-hub-backup" in says  # what to run on the hub host
    assert "pas_jobs_waiting_for_credentials > 0" in exprs["PasApplianceCredentialsRefused"]
    assert exprs["PasSiteCertificateUnknown"] == "pas_fleet_site_certificate_refused > 0"
    assert exprs["PasAppliancePrefetchRegionUnreachable"] == "pas_prefetch_waiting_for_link > 0"
    assert exprs["PasAppliancePrefetchLate"] == "pas_prefetch_late > 0"
    assert "pas_index_damaged == 1" in exprs["PasApplianceIndexDamaged"]
    assert "pas_fleet_site_index_damaged == 1" in exprs["PasSiteIndexDamaged"]
    # The hub's busy refusals (hub/bucket_bodies.py): sustained, one alert per hub.
    hub_busy = {str(rule["alert"]): rule for rule in alert_rules()}["PasHubBusy"]
    assert "sum without (site) (rate(pas_hub_bucket_puts_refused_busy_total[5m])) > 0" in \
        exprs["PasHubBusy"] and hub_busy["for"] == "15m"
    # A transfer open at the hub for hours (hub/transfer_metrics.py), per site.
    assert exprs["PasHubTransferOpenLong"] == \
        "pas_hub_transfer_oldest_open_age_seconds > 21600"  # 6 h
    # Files flagged missing (a lost disk under a restored index): no metric said it.
    files_missing = {str(rule["alert"]): rule for rule in alert_rules()}[
        "PasApplianceFilesMissing"]
    assert exprs["PasApplianceFilesMissing"] == "pas_spool_files_missing > 0"
    assert exprs["PasSiteFilesMissing"] == "pas_fleet_site_files_missing > 0"  # the hub's
    says = str(files_missing["annotations"]["description"])  # type: ignore[index]
    assert "pas cache status" in says and "pas verify --repair" in says and \
        "region" in says  # what to run, and where the files come back from
    # Files damaged (the scrub's finding): only the missing ones were exported.
    assert exprs["PasApplianceFilesDamaged"] == "pas_spool_files_damaged > 0"
    assert exprs["PasSiteFilesDamaged"] == "pas_fleet_site_files_damaged > 0"  # the hub's
    turning_away = exprs["PasApplianceDicomTurningAway"]  # capacity refusals, not security
    assert "too-many-associations|too-many-connections" in turning_away
    assert "unknown-ae" not in turning_away


def test_grafana_expressions_parse(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "grafana", "rules": [
        {"record": f"pas_check:{index}", "expr": expr.replace("$site", ".*")}
        for index, expr in enumerate(grafana_expressions())]}]}
    (tmp_path / "grafana_rules.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", "grafana_rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_missing_files_and_the_hubs_reservations() -> None:
    """The files flagged missing on the appliance, and the hub's bucket reservations next to
    its busy refusals: exported, alerted on or documented, and on no panel."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    panels = {str(panel["title"]): [str(t["expr"]) for t in panel["targets"]]
              for panel in dashboard["panels"]}
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    missing = [exprs for title, exprs in panels.items() if "files missing" in title.lower()]
    assert sorted(missing) == [['pas_fleet_site_files_missing{site=~"$site"}',
                                'pas_fleet_site_files_damaged{site=~"$site"}'],
                               ["pas_spool_files_missing", "pas_spool_files_damaged"]], panels
    busy = [exprs for exprs in panels.values()
            if any("pas_hub_bucket_puts_refused_busy_total" in e for e in exprs)]
    assert busy and any("pas_hub_bucket_reservations_refused_busy_total" in e
                        for e in busy[0]), busy
    held = {e for exprs in panels.values() for e in exprs}
    assert {"pas_hub_bucket_reservations_held", "pas_hub_bucket_reservations_held_bytes",
            "pas_hub_bucket_bodies_held_bytes", "pas_hub_bucket_bodies_budget_bytes"} <= held
    # Side by side: no two panels on the same place of the grid.
    places = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]]
    assert len(set(places)) == len(places), places


def test_dashboard_shows_what_the_hub_receives_commits_and_leaves_open() -> None:
    """The hub's transfer families (hub/transfer_metrics.py), per site of the $site choice."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = {str(t["expr"]) for panel in dashboard["panels"] for t in panel["targets"]}
    assert {'rate(pas_hub_bucket_bytes_received_total{site=~"$site"}[5m])',
            'rate(pas_hub_instances_committed_total{site=~"$site"}[5m])',
            'pas_hub_transfer_oldest_open_age_seconds{site=~"$site"}',
            'pas_hub_transfers_open{site=~"$site"}'} <= exprs


def test_dashboard_shows_the_disk_alerts() -> None:
    """The daemon's disk alert (ops/disk_alert.py), per site from its heartbeats and on an
    appliance scraped directly: the file system's figure alone says capacity, not trouble."""
    assert {'pas_fleet_site_disk_alert{site=~"$site"}', "pas_disk_alert"} <= \
        set(grafana_expressions())


def test_a_bad_expression_is_caught(tmp_path: Path) -> None:
    """The check above can fail: promtool refuses a broken expression."""
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"alert": "Broken", "expr": "pas_fleet_site_up >"}]}]}))
    assert promtool("check", "rules", "bad.yml", cwd=tmp_path).returncode != 0


def test_prefetch_lead_times_are_gauges_of_the_window() -> None:
    """They were a histogram computed over the last 7 days: its buckets and count fell as
    requests aged out of the window, which Prometheus reads as counter resets."""
    from appliance.ops.metrics import lead_time_families

    fetched, late, quantiles = lead_time_families([-600.0, 3600.0, 7200.0, 86400.0, 900.0])
    assert [f.type for f in (fetched, late, quantiles)] == ["gauge"] * 3
    assert fetched.samples[0].value == 5 and late.samples[0].value == 1
    assert {s.labels["quantile"]: s.value for s in quantiles.samples} == {
        "0.1": -600.0, "0.5": 3600.0, "0.9": 86400.0}
    empty = lead_time_families([])
    assert [f.samples[0].value for f in empty[:2]] == [0, 0] and empty[2].samples == []


def test_dashboard_shows_the_hub_dashboards_refused_sign_ins() -> None:
    """pas_hub_dashboard_refused_total (hub/dashboard_auth.py): alerted on, and on a panel
    by reason, so that a guessing run is seen before the alert's threshold."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [str(t["expr"]) for panel in dashboard["panels"] for t in panel["targets"]]
    assert "sum by (reason) (increase(pas_hub_dashboard_refused_total[10m]))" in exprs

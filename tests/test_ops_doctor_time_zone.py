"""``pas doctor``'s time zone row (appliance/ops/doctor_time.py).

PAS reads HL7 times sent without an offset, the WAN rate windows, the prefetch windows and the
worklist's day in the process's local zone, and the appliance image is UTC unless the site set
one: at a French site each ran 1 to 2 h late and doctor said nothing of it (clock review,
F4). Now doctor names the zone and warns when it is UTC while such settings are in use.

The zone is the process's: each case runs in a new interpreter with its own ``TZ`` (a forked
one keeps the C library's zone of its parent).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from appliance.ops.doctor_time import ZONE_FIX, local_zone
from tests.support.peers import run_pas

WINDOWS = '[[hub.windows]]\nstart = "08:00"\nend = "19:00"\nmax_mbps = 8\n'
NO_HL7 = "[hl7]\nenabled = false\n"


def _row(tmp_path: Path, config: str, tz: str) -> dict[str, str]:
    """The time zone row for ``config`` in a process whose ``TZ`` is ``tz``."""
    path = tmp_path / "appliance.toml"
    path.write_text(config)
    code = ("import json, sys\n"
            "from pathlib import Path\n"
            "from appliance.config import load_settings\n"
            "from appliance.ops.doctor_time import check_time_zone\n"
            "settings = load_settings(Path(sys.argv[1]), {'PAS_HOME': sys.argv[2]})\n"
            "print(json.dumps(check_time_zone(settings).as_dict()))\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PAS_")}
    result = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "home")],
                            env={**env, "TZ": tz}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    row: dict[str, str] = json.loads(result.stdout)
    return row


def test_utc_with_local_time_settings_in_use_warns_with_the_fix(tmp_path: Path) -> None:
    """Rate windows (and the HL7 listener, on by default with the prefetch) under Etc/UTC, the
    image's zone: a warning naming each setting read in local time, and the fix."""
    row = _row(tmp_path, WINDOWS, "Etc/UTC")
    assert row["verdict"] == "warn", row
    assert row["detail"].startswith("Etc/UTC (TZ=Etc/UTC in this process's environment"), row
    assert "the WAN rate windows (hub.windows)" in row["detail"], row
    assert "HL7 times sent without an offset (hl7)" in row["detail"], row
    assert row["fix"] == ZONE_FIX and "timedatectl set-timezone" in row["fix"]
    assert 'timezone = "Europe/Paris"' in row["fix"]
    # Prefetch windows and the worklist alone, HL7 off: still local time.
    row = _row(tmp_path, NO_HL7 + '[prefetch]\n[[prefetch.windows]]\nstart = "19:00"\n'
               'end = "07:00"\n[prefetch.mwl]\nenabled = true\n', "UTC")
    assert row["verdict"] == "warn", row
    assert "prefetch.windows" in row["detail"] and "prefetch.mwl" in row["detail"], row
    assert "hub.windows" not in row["detail"] and "hl7" not in row["detail"], row
    # A zone name the C library cannot load is UTC to it: said so.
    row = _row(tmp_path, WINDOWS, "Europe/Pariss")
    assert row["verdict"] == "warn", row
    assert row["detail"].startswith("Europe/Pariss is no time zone of /usr/share/zoneinfo, "
                                    "read as UTC"), row


def test_utc_without_local_time_settings_and_a_sites_zone_are_ok(tmp_path: Path) -> None:
    """UTC with nothing read in local time is fine; so is a site's zone, named with its offset
    now, even one of offset 0 all year (Africa/Abidjan is a real site's zone, not one unset)."""
    row = _row(tmp_path, NO_HL7, "Etc/UTC")
    assert row["verdict"] == "ok", row
    assert row["detail"].endswith("no setting in force reads local time"), row
    row = _row(tmp_path, WINDOWS, "Europe/Paris")
    assert row["verdict"] == "ok" and row["fix"] == "", row
    assert row["detail"].startswith("Europe/Paris, now UTC+0"), row  # +01:00 CET, +02:00 CEST
    assert "CET" in row["detail"] or "CEST" in row["detail"], row
    assert _row(tmp_path, WINDOWS, "Africa/Abidjan")["verdict"] == "ok"
    assert _row(tmp_path, WINDOWS, "America/Martinique")["detail"].startswith(
        "America/Martinique, now UTC-04:00 AST")


def test_the_zone_is_named_as_the_c_library_finds_it(tmp_path: Path) -> None:
    """TZ first; else /etc/localtime, a symlink into the zone files as timedatectl and first
    boot make it, or a copy named by /etc/timezone; no /etc/localtime at all is UTC."""
    localtime, timezone = tmp_path / "localtime", tmp_path / "timezone"
    assert local_zone({"TZ": ":Europe/Paris"}, localtime, timezone)[0] == "Europe/Paris"
    assert local_zone({"TZ": "/usr/share/zoneinfo/Europe/Paris"}, localtime,
                      timezone)[0] == "Europe/Paris"
    assert local_zone({"TZ": ""}, localtime, timezone)[0] == "UTC"
    assert local_zone({}, localtime, timezone) == ("UTC", f"no {localtime}")
    localtime.symlink_to("/usr/share/zoneinfo/Europe/Paris")
    assert local_zone({}, localtime, timezone) == (
        "Europe/Paris", f"{localtime} -> /usr/share/zoneinfo/Europe/Paris")
    localtime.unlink()
    localtime.write_bytes(Path("/usr/share/zoneinfo/Europe/Paris").read_bytes())
    assert local_zone({}, localtime, timezone)[0] == "unnamed"
    timezone.write_text("Europe/Paris\n")
    assert local_zone({}, localtime, timezone)[0] == "Europe/Paris"


def test_pas_doctor_shows_the_time_zone_row(tmp_path: Path) -> None:
    """The row is one of ``pas doctor``'s (a new interpreter: its TZ is its own)."""
    config = tmp_path / "appliance.toml"
    config.write_text(WINDOWS)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PAS_")}
    result = run_pas(["doctor", "--json", "--config", str(config)],
                     {**env, "PAS_HOME": str(tmp_path / "home"), "TZ": "Etc/UTC"},
                     exec_=True)
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["time zone"]["verdict"] == "warn", rows.get("time zone")
    assert "hub.windows" in rows["time zone"]["detail"]

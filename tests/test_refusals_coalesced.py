"""Refused attempts are one audit ``security`` row per source, reason and minute, also when
the peer chooses a value the reason quotes (appliance/ops/refusals.py, its ``value``).

Found in review: the window was keyed on the reason's whole text, and the text quoted the
request's Host header (appliance/web/hosts.py) or the called AE title (ingest/scp.py): one
client sending 300 GETs each naming another Host wrote 300 rows in 1.7 s, unauthenticated;
40 C-ECHOs each calling another AE title, 40 rows. Now the first attempt's row, then one
count naming a few of the other values.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from appliance.ops.refusals import RefusalAudit
from appliance.store.db import Database
from tests.support.peers import DCMTK_ENV, PasProcess, read_rows, wait_for


def _rows(db: Path) -> list[dict[str, object]]:
    return [dict(r) for r in read_rows(db, "SELECT * FROM audit WHERE event = 'security' "
                                           "ORDER BY id")]


def test_hosts_a_peer_chooses_share_one_window_and_the_count_names_a_few(
        tmp_path: Path) -> None:
    db = Database(tmp_path / "pas.sqlite")
    refusals = RefusalAudit(db)
    for k in range(300):
        shown = repr(f"h{k}.rebind.example")
        refusals.refused(channel="http", kind="host-header", source="10.0.0.9",
                         actor="anonymous", target="/",
                         reason=f"HTTP request refused (421): Host {shown} is not a name of "
                                "this appliance (DNS rebinding?)", value=shown)
    # Reasons of fixed words stay apart: each says something else.
    for reason in ("no bearer token", "a bearer token that is not one of "
                   "serving.bearer_tokens"):
        refusals.refused(channel="http", kind="bearer-token", source="10.0.0.9",
                         actor="anonymous", reason=f"HTTP request refused (401): {reason}")
    assert len(_rows(db.path)) == 3
    refusals.flush()
    rows = _rows(db.path)
    assert [r["outcome"] for r in rows] == [
        "failure: HTTP request refused (421): Host 'h0.rebind.example' is not a name of this "
        "appliance (DNS rebinding?)",
        "failure: HTTP request refused (401): no bearer token",
        "failure: HTTP request refused (401): a bearer token that is not one of "
        "serving.bearer_tokens",
        # The count keeps the first attempt's words, and names the others' first values.
        "failure: HTTP request refused (421): Host 'h0.rebind.example' is not a name of this "
        "appliance (DNS rebinding?)"]
    detail = str(rows[3]["detail"])
    assert detail.startswith("http; 299 more attempts refused in the 60 s from "), detail
    listed = ", ".join(repr(f"h{k}.rebind.example") for k in range(1, 6))
    assert detail.endswith(f", also {listed} and 294 attempts naming "
                           "others"), detail
    db.close()


def test_a_client_cycling_hosts_or_called_ae_titles_writes_one_row_each(
        tmp_path: Path) -> None:
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_PREFETCH__ENABLED": "false"}).start()
    try:
        with httpx.Client(timeout=10) as client:
            for k in range(30):
                answer = client.get(f"http://127.0.0.1:{pas.http_port}/",
                                    headers={"Host": f"h{k}.rebind.example"})
                assert answer.status_code == 421
        for k in range(8):
            echo = subprocess.run(["echoscu", "-aet", "CT01", "-aec", f"WRONG{k}", "127.0.0.1",
                                   str(pas.port)], env=DCMTK_ENV, capture_output=True,
                                  timeout=30)
            assert echo.returncode != 0
        # The HTTP rows are written once each 421 is answered: awaited (the count too).
        wait_for(lambda: len([r for r in _rows(pas.home / "pas.sqlite")
                              if "WRONG" in str(r["outcome"])]) == 1, 10,
                 what="the called AE refusal's row")
    finally:
        pas.stop()
    rows = [r for r in _rows(pas.home / "pas.sqlite") if str(r["outcome"]).startswith(
        "failure:")]
    host_rows = [r for r in rows if "rebind.example" in str(r["outcome"])]
    called_rows = [r for r in rows if "WRONG" in str(r["outcome"])]
    # The first attempt's row, and at the stop the count of the others.
    assert len(host_rows) == 2 and len(called_rows) == 2, rows
    assert "'h0.rebind.example'" in str(host_rows[0]["outcome"])
    assert str(host_rows[1]["detail"]).startswith("http; 29 more attempts refused in the 60 s")
    assert "'h1.rebind.example'" in str(host_rows[1]["detail"])
    assert called_rows[0]["outcome"] == ("failure: association rejected: called AE title "
                                         "'WRONG0' is not this appliance's (PAS)")
    assert (called_rows[0]["actor"], called_rows[0]["target"]) == ("CT01", "WRONG0")
    assert str(called_rows[1]["detail"]).startswith("dicom; 7 more attempts refused in the 60 s")
    assert "'WRONG1', 'WRONG2'" in str(called_rows[1]["detail"])

"""``pas audit`` on rows written the real way: a running daemon (WAL, the CLI beside it)
takes three associations from DCMTK storescu and three C-FINDs from findscu, and an operator
pins, tries to purge, then purges with ``pas cache``. Every listing is the CLI's, run as a
process. Each row records its patients as it is written: the MR study is purged, and its rows
are still found by patient."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from appliance.cli.common import login_name
from appliance.words import local_time
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    PasProcess,
    run_pas,
    storescu,
    wait_for,
)

CT_A, CT_B, MR = "A002304", "A027284", "FA191122"  # patients: the CT ones have two studies
OPERATOR = f"operator:{login_name()}"
COLUMNS = ["id", "at", "time", "event", "actor", "source", "target", "outcome", "detail",
           "patient", "sop_class", "query", "query_syntax", "chain"]


def _studies(folder: Path, patient: str, count: int | None = None) -> dict[str, list[Path]]:
    """The patient's files in ``folder`` by Study Instance UID (the first ``count`` only)."""
    by_study: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        ds = dcmread(path, stop_before_pixels=True)
        if ds.PatientID == patient:
            by_study.setdefault(str(ds.StudyInstanceUID), []).append(path)
        if count is not None and sum(map(len, by_study.values())) == count:
            break
    return by_study


def _rows(home: Path) -> list[dict[str, Any]]:
    """The audit table as stored, oldest first (read beside the daemon, as a check only)."""
    conn = sqlite3.connect(f"file:{home / 'pas.sqlite'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY id")]
    finally:
        conn.close()


@dataclass
class Trail:
    pas: PasProcess
    ct_a: list[str]  # CT_A's two study UIDs, sorted
    ct_b: str
    mr: str

    def audit(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``pas audit ARGS`` as a process, wide enough that nothing is folded."""
        result = run_pas(["audit", *args], {**self.pas.env, "COLUMNS": "400"}, timeout=120)
        if check:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def listed(self, *args: str) -> list[tuple[str, str | None, str | None, str]]:
        """``pas audit --json ARGS`` as (event, actor, target, outcome), newest first."""
        rows = json.loads(self.audit("--json", *args).stdout)
        return [(r["event"], r["actor"], r["target"], r["outcome"]) for r in rows]


def _store(pas: PasProcess, files: list[Path], calling: str) -> None:
    """One association; its audit row is written as it ends, maybe after storescu exits."""
    before = len(_rows(pas.home))
    storescu(files, pas.port, calling=calling)
    wait_for(lambda: any(r["event"] == "store" and r["actor"] == calling
                         for r in _rows(pas.home)[before:]), 10, what=f"{calling}'s store row")


def _find(pas: PasProcess, *keys: str) -> None:
    args = ["findscu", "-S", "-aet", "VIEWER", "-aec", "PAS"]
    for key in keys:
        args += ["-k", key]
    before = len(_rows(pas.home))
    subprocess.run([*args, "127.0.0.1", str(pas.port)], env=DCMTK_ENV, capture_output=True,
                   timeout=60, check=False)
    wait_for(lambda: len(_rows(pas.home)) > before, 10, what="the query's row")


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trail]:
    ct_a, ct_b = _studies(CT_DIR, CT_A), _studies(CT_DIR, CT_B)
    ct_b = dict([sorted(ct_b.items())[0]])  # one of that patient's two
    mr = _studies(MR_DIR, MR, count=3)
    pas = PasProcess(tmp_path_factory.mktemp("audit-cli") / "pas", {
        "PAS_DICOM__ACCEPT_UNKNOWN": "true",
        "PAS_CACHE__SCRUB_MB_PER_S": "0",  # no background pass: the rows are ours alone
    }).start()
    try:
        _store(pas, [p for files in ct_a.values() for p in files], "CT1")  # two studies
        _store(pas, [p for files in ct_b.values() for p in files], "CT2")
        _store(pas, [p for files in mr.values() for p in files], "MR1")
        (ct_b_uid,), (mr_uid,) = ct_b, mr
        _find(pas, "QueryRetrieveLevel=STUDY", f"PatientID={CT_A}", "StudyInstanceUID=")
        _find(pas, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={mr_uid}\\{ct_b_uid}")
        _find(pas, "QueryRetrieveLevel=FOO", "StudyInstanceUID=")
        first = sorted(ct_a)[0]
        pas.cli("cache", "pin", first, "--days", "1")
        assert pas.cli("cache", "pin", "1.2.3.4", check=False).returncode == 1
        assert pas.cli("cache", "purge", ct_b_uid, check=False).returncode == 1  # unconfirmed
        pas.cli("cache", "purge", mr_uid, "--force")  # gone from the index: MR's rows stay his
        yield Trail(pas, sorted(ct_a), ct_b_uid, mr_uid)
    finally:
        pas.stop()


def _expected(t: Trail) -> list[tuple[str, str | None, str | None, str]]:
    """Every row the fixture made, newest first, as (event, actor, target, outcome)."""
    return [
        ("delete", OPERATOR, t.mr, "success"),
        ("delete", OPERATOR, t.ct_b,
         f"failure: study {t.ct_b}: 3 instances not confirmed at the region"),
        ("pin", OPERATOR, "1.2.3.4", "failure: unknown study"),
        ("pin", OPERATOR, t.ct_a[0], "success"),
        ("query", "VIEWER", "FOO",
         "failure: QueryRetrieveLevel 'FOO' is not PATIENT, STUDY, SERIES or IMAGE"),
        ("query", "VIEWER", f"STUDY StudyInstanceUID={t.mr}\\{t.ct_b}", "success"),
        ("query", "VIEWER", f"STUDY PatientID={CT_A}", "success"),
        ("store", "MR1", t.mr, "success"),
        ("store", "CT2", t.ct_b, "success"),
        ("store", "CT1", ",".join(t.ct_a), "success"),
        ("start", "system", None, "success"),  # ATNA's Application Start
        ("config", "system", None, "success"),  # the daemon's first start
    ]


def _patients(t: Trail) -> list[str | None]:
    """The patients recorded with each row of :func:`_expected` (backslash-separated)."""
    return [MR, CT_B, None, CT_A, None, f"{CT_B}\\{MR}", CT_A, MR, CT_B, CT_A, None, None]


def test_lists_every_row_newest_first_with_every_column(trail: Trail) -> None:
    assert trail.listed() == _expected(trail)
    rows = json.loads(trail.audit("--json").stdout)
    assert [list(r) for r in rows] == [COLUMNS] * len(rows)
    stored = _rows(trail.pas.home)
    # A query's own bytes (a C-FIND identifier) in base64, as the ATNA message has them.
    as_json = [{k: base64.b64encode(v).decode() if isinstance(v, bytes) else v
                for k, v in r.items()} for r in stored]
    assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == as_json[::-1]
    assert any(r["query"] and r["query_syntax"] for r in rows if r["event"] == "query")
    for row in rows:
        assert dt.datetime.fromisoformat(row["time"]) == dt.datetime.fromtimestamp(
            row["at"], dt.UTC)
    details = {(r["event"], r["actor"]): r["detail"] for r in rows}
    assert details["store", "CT1"] == "6 instances stored, 0 refused"
    assert details["store", "MR1"] == "3 instances stored, 0 refused"
    assert [r["source"] for r in rows if r["event"] in ("store", "query")] == ["127.0.0.1"] * 6
    assert [r["patient"] for r in rows] == _patients(trail)

    table = trail.audit().stdout
    lines = table.splitlines()
    assert lines[0].strip() == "12 audit rows"
    # Its times this host's, the zone named (--json's are UTC).
    zone = time.strftime("%Z", time.localtime(rows[0]["at"]))
    assert f"│ {local_time(rows[0]['at'])} " in table and zone in local_time(rows[0]["at"])
    listed_ids = [int(line.split("│")[1]) for line in lines if line.startswith("│ ")
                  and line.split("│")[1].strip().isdigit()]
    assert listed_ids == [r["id"] for r in rows]
    for uid in (*trail.ct_a, trail.ct_b, trail.mr):
        assert uid in table
    # A row's patients on one line: one per line beside its studies one per line read as
    # pairs (which study is whose is not recorded).
    assert f"│ {CT_B}, {MR} " in table, table
    header = next(line for line in lines if "event" in line)
    assert [c.strip() for c in header.strip("┃").split("┃")] == [
        "id", "time", "event", "actor", "source", "patient", "target", "outcome", "detail"]
    assert MR in table and CT_B in table
    assert "shown" not in table  # nothing left out


def test_filters_by_event_outcome_study_and_patient(trail: Trail) -> None:
    expected = _expected(trail)
    assert trail.listed("--event", "store") == [r for r in expected if r[0] == "store"]
    assert trail.listed("--event", "pin", "--event", "delete") == expected[:4]
    assert trail.listed("--failures") == [r for r in expected if r[3] != "success"]
    assert len(trail.listed("--failures")) == 3
    assert trail.listed("--event", "hl7") == []

    # A study is found as a word of the target: alone, in a store row's list, in a query's
    # keys; never as a prefix (every CT UID begins with the first one's root).
    assert trail.listed("--study", trail.ct_a[0]) == [expected[3], expected[9]]
    assert trail.listed("--study", trail.ct_a[1]) == [expected[9]]
    assert trail.listed("--study", trail.mr) == [expected[0], expected[5], expected[7]]
    assert trail.listed("--study", trail.ct_b) == [expected[1], expected[5], expected[8]]
    assert trail.listed("--study", trail.ct_a[0].rsplit(".", 1)[0]) == []

    # A patient: the rows naming their studies, and the queries that asked for their
    # PatientID; the MR study's rows too, though it was purged (no index row left).
    assert trail.listed("--patient", CT_A) == [expected[3], expected[6], expected[9]]
    assert trail.listed("--patient", CT_B) == [expected[1], expected[5], expected[8]]
    assert trail.listed("--patient", MR) == [expected[0], expected[5], expected[7]]
    assert trail.listed("--patient", CT_A.lower()) == []  # IDs are case-sensitive
    assert trail.listed("--patient", CT_A[:-1]) == []  # and whole
    assert trail.listed("--patient", CT_A, "--event", "store") == [expected[9]]
    assert trail.listed("--patient", CT_B, "--failures") == [expected[1]]


def test_filters_by_period(trail: Trail) -> None:
    rows = json.loads(trail.audit("--json", "--event", "store").stdout)
    mr, ct_b, ct_a = (r["at"] for r in rows)
    assert ct_b - ct_a > 0.001 and mr - ct_b > 0.001  # distinct instants to cut between
    cut = dt.datetime.fromtimestamp((ct_a + ct_b) / 2, dt.UTC).isoformat()  # with +00:00
    assert [r[1] for r in trail.listed("--event", "store", "--since", cut)] == ["MR1", "CT2"]
    assert [r[1] for r in trail.listed("--event", "store", "--until", cut)] == ["CT1"]
    local = dt.datetime.fromtimestamp((ct_b + mr) / 2).isoformat()  # naive: local time
    assert [r[1] for r in trail.listed("--event", "store", "--since", cut,
                                       "--until", local)] == ["CT2"]

    everything = _expected(trail)
    assert trail.listed("--since", "1h") == everything
    assert trail.listed("--since", "2w", "--until", "1h") == []
    assert trail.listed("--until", "30m") == []
    day = dt.date.fromtimestamp(ct_a)
    assert trail.listed("--until", (day - dt.timedelta(days=1)).isoformat()) == []
    # A date alone: --since from its midnight, --until to the end of that day.
    same_day = [(r["event"], r["actor"], r["target"], r["outcome"])
                for r in json.loads(trail.audit("--json").stdout)
                if dt.date.fromtimestamp(r["at"]) == day]
    assert trail.listed("--since", day.isoformat(), "--until", day.isoformat()) == same_day
    assert "CT1" in [r[1] for r in same_day]


def test_limit_shows_the_newest_and_says_how_many_matched(trail: Trail) -> None:
    table = trail.audit("--limit", "2")
    assert table.stdout.splitlines()[0].strip() == "2 of 12 audit rows"  # as many as shown
    assert table.stdout.splitlines()[-1] == (
        "2 of 12 matching rows shown, the newest: --limit 12 to see them all")
    assert trail.mr in table.stdout and trail.ct_b in table.stdout
    assert "1.2.3.4" not in table.stdout and trail.ct_a[0] not in table.stdout

    as_json = trail.audit("--json", "--limit", "2", "--event", "store")
    assert [r["actor"] for r in json.loads(as_json.stdout)] == ["MR1", "CT2"]
    assert as_json.stderr.strip() == (
        "2 of 3 matching rows shown, the newest: --limit 3 to see them all")
    whole = trail.audit("--json", "--limit", "3", "--event", "store")
    assert len(json.loads(whole.stdout)) == 3 and whole.stderr == ""


def _plain(text: str) -> str:
    """A usage error as one line of words (typer draws it in a box wrapped at 80 columns)."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


BAD_INPUT = [
    (["--since", "yesterday"], "Invalid value for '--since': 'yesterday' is not a date"),
    (["--until", "2024-13-45"], "Invalid value for '--until': '2024-13-45' is not a date"),
    (["--since", "24 h"], "Invalid value for '--since': '24 h' is not a date"),
    (["--since", "2024-05-02", "--until", "2024-05-01"],
     "--since '2024-05-02' is not before --until '2024-05-01': no row can match"),
    (["--event", "login"], "Invalid value for '--event': Value error, 'login' is not one of "
                           "'store', 'query', 'retrieve', 'delete', 'refile', 'pin'"),
    (["--limit", "-5"], "Invalid value for '--limit': '-5' is not a number of rows (1 to "),
    (["--limit", "0"], "Invalid value for '--limit': '0' is not a number of rows"),
    (["--limit", "lots"], "Invalid value for '--limit': 'lots' is not a number of rows"),
    (["--study", "CT-2024-17"], "Invalid value for '--study': 'CT-2024-17' is not a UID"),
    (["--patient", " "], "Invalid value for '--patient': an empty patient ID matches nothing"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT,
                         ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_refused_naming_the_option_and_value(trail: Trail, tmp_path: Path,
                                                          args: list[str], message: str) -> None:
    before = _rows(trail.pas.home)
    for as_json in ([], ["--json"]):
        result = trail.audit(*as_json, *args, check=False)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stdout == ""
        assert message in _plain(result.stderr), _plain(result.stderr)
        assert "Traceback" not in result.stderr
    assert _rows(trail.pas.home) == before
    # Refused before any database is opened: a home that does not exist stays so.
    nowhere = tmp_path / "nowhere"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    result = run_pas(["audit", *args], {**environ, "PAS_HOME": str(nowhere)}, timeout=60)
    assert result.returncode == 2 and message in _plain(result.stderr)
    assert not nowhere.exists()


def test_rows_written_before_patients_were_recorded_are_found_through_the_index(
        tmp_path: Path) -> None:
    """A database from before migration 9: its rows have no patient column. After the
    upgrade they are still found by patient while the study is indexed, beside new rows
    that record it."""
    from appliance.store import audit
    from appliance.store.db import Database
    from appliance.store.index import InstanceRecord, StoredFile
    from appliance.store.schema import MIGRATIONS
    from tests.support.old_schema import record_before_18

    home = tmp_path / "pas"
    old = Database(home / "pas.sqlite", migrations=MIGRATIONS[:8])
    record_before_18(old, InstanceRecord(
        "1.2.9.1.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.9", "1.2.9.1",
        patient_id="P_1", modality="CT"), StoredFile("aa/1.dcm", 100, "0" * 64))
    with old.transaction() as conn:  # as the previous version's audit.record wrote it
        conn.execute("INSERT INTO audit (at, event, actor, source, target, outcome, detail) "
                     "VALUES (1, 'retrieve', 'VIEWER', '10.1.1.1', '1.2.9', 'success', NULL)")
    old.close()
    new = Database(home / "pas.sqlite")  # what pas run does first: migrations run
    audit.record(new, "pin", actor="operator:x", target="1.2.9")
    new.close()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PAS_")}
    result = run_pas(["audit", "--json", "--patient", "P_1"],
                     {**environ, "PAS_HOME": str(home)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [(r["event"], r["target"], r["patient"]) for r in json.loads(result.stdout)] == [
        ("pin", "1.2.9", "P_1"), ("retrieve", "1.2.9", None)]


def _stow(port: int, parts: list[bytes]) -> httpx.Response:
    """One STOW-RS request (POST /studies, multipart/related) holding ``parts``."""
    boundary = "pas-audit-stow"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()
    return httpx.post(f"http://127.0.0.1:{port}/dicom-web/studies", content=body, timeout=60,
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; '
                                               f"boundary={boundary}",
                               "Accept": "application/dicom+json",
                               # Not believed (the row names the connection's address):
                               # uvicorn believed it from loopback (security review,
                               # 2026-12-07), and the trail said what a client wrote.
                               "X-Forwarded-For": "198.18.0.77"})


def test_a_stow_rs_row_names_its_studies_and_is_found_by_study(tmp_path: Path) -> None:
    """A STOW-RS request of two studies (three instances) and one part that is not DICOM:
    its store row names the two Study Instance UIDs, comma-joined as a C-STORE
    association's row, so ``pas audit --study`` finds it. It named the SOP Instance UIDs,
    which no study search (nor the ATNA Study objects) could match. The counts and the
    refused part stay in the outcome and detail."""
    studies = _studies(CT_DIR, CT_A)
    assert len(studies) == 2
    first, second = sorted(studies)
    files = [*studies[first][:2], studies[second][0]]
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_CACHE__SCRUB_MB_PER_S": "0"}).start()
    try:
        response = _stow(pas.http_port, [*(f.read_bytes() for f in files), b"not DICOM"])
        assert response.status_code == 202, response.text  # stored, one part refused
        assert len(response.json()["00081199"]["Value"]) == 3
        [row] = [r for r in _rows(pas.home) if r["event"] == "store"]
        assert (row["actor"], row["source"], row["target"], row["outcome"], row["detail"],
                row["patient"]) == ("anonymous", "127.0.0.1", f"{first},{second}",
                                    "failure: 1 part refused (first: not a DICOM file: a "
                                    "STOW-RS part is a PS3.10 file, and this one (9 bytes) "
                                    "has no 'DICM' after a 128-byte preamble)",
                                    "3 stored (STOW-RS)", CT_A)
        for study in (first, second):
            found = json.loads(pas.cli("audit", "--json", "--study", study).stdout)
            assert [(r["id"], r["target"]) for r in found] == [(row["id"], row["target"])]
        assert [r["id"] for r in json.loads(
            pas.cli("audit", "--json", "--patient", CT_A, "--event", "store").stdout)] == \
            [row["id"]]
    finally:
        pas.stop()


def test_a_stow_rs_rows_study_list_is_cut_between_uids() -> None:
    """Past its length limit the list keeps whole UIDs only (a UID cut in the middle would
    name another study) and says how many were left out."""
    from appliance.store.audit import study_list

    assert study_list(set(), 40) == (None, 0)
    assert study_list({"1.2.3", "1.2.10"}, 40) == ("1.2.10,1.2.3", 0)
    assert study_list({"1.2.3", "1.2.10", "1.2.44"}, 13) == ("1.2.10,1.2.3", 1)
    assert study_list({"1.2.3"}, 4) == (None, 1)


def test_a_c_store_rows_study_list_is_cut_between_uids_and_says_how_many_more(
        tmp_path: Path) -> None:
    """One association (DCMTK storescu) of 70 studies with 64-character UIDs: 4549
    characters of list. The row keeps the 61 whole UIDs that fit in 4000 and says 9 more
    were not listed, as a STOW-RS row does; it cut the list at 4000 characters, in the
    middle of the 62nd UID (which then named no study, or another one)."""
    from tests.support.objects import tiny_ct

    studies = [f"1.2.826.0.1.3680043.8.498.9{n:037d}" for n in range(1, 71)]  # valid: no leading 0
    assert {len(uid) for uid in studies} == {64}
    files = []
    for n, uid in enumerate(studies):
        path = tmp_path / "in" / f"{n}.dcm"
        path.parent.mkdir(exist_ok=True)
        tiny_ct(uid, PatientID="CUT").save_as(path, enforce_file_format=True)
        files.append(path)
    pas = PasProcess(tmp_path / "pas", {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                                        "PAS_HTTP__ENABLED": "false",
                                        "PAS_CACHE__SCRUB_MB_PER_S": "0"}).start()
    try:
        _store(pas, files, "CT7")
        [row] = [r for r in _rows(pas.home) if r["event"] == "store"]
        listed = row["target"].split(",")
        assert listed == sorted(studies)[:61] and len(row["target"]) <= 4000
        assert row["detail"] == "70 instances stored, 0 refused, 9 more studies not listed"
        assert row["patient"] == "CUT"
    finally:
        pas.stop()


def test_the_configuration_s_fingerprints_are_keyed(tmp_path: Path) -> None:
    """Each start's ``config`` row held a plain SHA-256 of each section's JSON, bearer tokens
    and passwords included, in the trail, the journal and at the ATNA collector: whoever
    read them could test guesses of a token offline. Now an HMAC under a key of this home
    (0600); the same configuration again writes no row, another token names ``serving``."""
    import hashlib
    import os
    import stat

    from appliance.config import load_settings
    from appliance.ops.audit_trail import FINGERPRINT_KEY, config_fingerprint

    env = {"PAS_SERVING__AUTH": "bearer", "PAS_SERVING__BEARER_TOKENS": '["guess-me"]'}
    pas = PasProcess(tmp_path / "pas", env).start()
    pas.stop()
    key_file = pas.home / FINGERPRINT_KEY
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    (row,) = [r for r in _rows(pas.home) if r["event"] == "config"]
    sections = json.loads(row["detail"])["sections"]
    settings = load_settings(environ={**{k: v for k, v in os.environ.items()
                                         if not k.startswith("PAS_")}, **pas.env})
    assert sections == config_fingerprint(settings, key_file.read_bytes())
    served = json.loads(settings.model_dump_json())["serving"]
    plain = hashlib.sha256(json.dumps(served, sort_keys=True).encode()).hexdigest()[:16]
    assert sections["serving"] != plain  # no offline oracle
    pas.start()
    pas.stop()
    assert [r["event"] for r in _rows(pas.home)].count("config") == 1  # the same: no row
    pas.env["PAS_SERVING__BEARER_TOKENS"] = '["another"]'
    pas.start()
    pas.stop()
    last = [r for r in _rows(pas.home) if r["event"] == "config"][-1]
    assert json.loads(last["detail"])["changed"] == ["serving"], last

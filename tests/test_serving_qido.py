"""QIDO-RS (and the C-FIND matching it shares) against the standard, on a real PAS.

PAS holds the real CT and MR sets (C-STORE from DCMTK). Each test states the rule of PS3.18 or
PS3.4 it checks and compares what PAS answers with the files themselves.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from appliance.serving.dicomweb import QIDO_DEFAULT_LIMIT
from appliance.store import query as store_query
from appliance.store.db import Database
from tests.support.objects import tiny_ct
from tests.support.peers import (
    CT_DIR,
    DCMTK_ENV,
    MR_DIR,
    PasProcess,
    pas_holding_real_sets,
    read_rows,
    storescu,
    wait_for,
)


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasProcess]:
    pas = pas_holding_real_sets(tmp_path_factory.mktemp("qido") / "pas")
    try:
        yield pas
    finally:
        pas.stop()


@pytest.fixture(scope="module")
def files() -> list[Any]:
    return [dcmread(p, stop_before_pixels=True)
            for folder in (CT_DIR, MR_DIR) for p in sorted(folder.glob("*.dcm"))]


def qido(pas: PasProcess, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/{path}", params=params,
                     timeout=60)


def value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


def findscu(pas: PasProcess, level: str, keys: list[str], out: Path) -> list[Any]:
    """DCMTK findscu (Study Root) against PAS; the response identifiers as datasets."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["findscu", "-S", "-X", "-od", str(out), "-aet", "VIEWER", "-aec", "PAS",
            "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run([*args, "127.0.0.1", str(pas.port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_series_and_instance_searches_return_the_required_attributes(
        pas: PasProcess, files: list[Any]) -> None:
    """PS3.18 10.6.3.3: /series also returns the Study attributes; /instances the Study and
    Series attributes; the nested forms leave out only those of the entity in the path."""
    mr = next(f for f in files if f.Modality == "MR")
    instances = qido(pas, "instances", SOPInstanceUID=str(mr.SOPInstanceUID))
    assert instances.status_code == 200, instances.text
    [item] = instances.json()
    assert value(item, "00080060") == "MR"  # Modality
    assert value(item, "00200011") == int(mr.SeriesNumber)  # SeriesNumber
    assert "0008103E" in item and "00201209" in item  # SeriesDescription, NumberOfSeries...
    assert value(item, "00100020") == mr.PatientID and value(item, "00080020") == mr.StudyDate
    assert "00201208" in item  # NumberOfStudyRelatedInstances
    nested = qido(pas, f"studies/{mr.StudyInstanceUID}/instances",
                  SOPInstanceUID=str(mr.SOPInstanceUID))
    [item] = nested.json()
    assert value(item, "00080060") == "MR" and value(item, "00200011") == int(mr.SeriesNumber)
    series = qido(pas, "series", SeriesInstanceUID=str(mr.SeriesInstanceUID))
    assert series.status_code == 200, series.text
    [item] = series.json()
    assert value(item, "00080060") == "MR"
    assert value(item, "00100020") == mr.PatientID and value(item, "00080020") == mr.StudyDate
    assert value(item, "00100010")["Alphabetic"] == str(mr.PatientName)
    assert "00080050" in item and "00201206" in item  # AccessionNumber, NumberOfStudyRelatedSeries


def test_offset_without_limit_skips_the_first_results(pas: PasProcess) -> None:
    """PS3.18 8.3.4.4: offset skips that many results, with or without a limit."""
    everything = [value(s, "0020000D") for s in qido(pas, "studies").json()]
    assert len(everything) > 2
    skipped = qido(pas, "studies", offset=2)
    assert skipped.status_code == 200, skipped.text
    assert [value(s, "0020000D") for s in skipped.json()] == everything[2:]
    assert qido(pas, "studies", offset=len(everything)).json() == []
    paged = qido(pas, "studies", offset=1, limit=1).json()
    assert [value(s, "0020000D") for s in paged] == everything[1:2]


@pytest.mark.parametrize("modalities", ["*", "C*", "?R", "CT", "CT\\MR", "M?\\X*"])
def test_modalities_in_study_universal_and_wildcards(pas: PasProcess, files: list[Any],
                                                     modalities: str, tmp_path: Path) -> None:
    """PS3.4 C.2.2.2.3/C.2.2.2.4: "*" is universal matching and wildcards apply to CS; a study
    matches when any of its series matches any of the values (C-FIND and QIDO-RS alike)."""
    patterns = [m.replace("*", ".*").replace("?", ".") for m in modalities.split("\\")]
    expected = {str(f.StudyInstanceUID) for f in files
                if any(re.fullmatch(p, f.Modality) for p in patterns)}
    assert expected
    found = findscu(pas, "STUDY", [f"ModalitiesInStudy={modalities}", "StudyInstanceUID"],
                    tmp_path / "find")
    assert {str(d.StudyInstanceUID) for d in found} == expected
    response = qido(pas, "studies", ModalitiesInStudy=modalities)
    assert response.status_code == 200, response.text
    assert {value(s, "0020000D") for s in response.json()} == expected


def test_uid_lists_separated_by_commas(pas: PasProcess, files: list[Any]) -> None:
    """PS3.18 8.3.4.1: a UID list in a query parameter is separated by "," (or "\\")."""
    studies = sorted({str(f.StudyInstanceUID) for f in files})[:2]
    for joined in (",".join(studies), "\\".join(studies)):
        response = qido(pas, "studies", StudyInstanceUID=joined)
        assert response.status_code == 200, response.text
        assert sorted(value(s, "0020000D") for s in response.json()) == studies
    sops = sorted(str(f.SOPInstanceUID) for f in files)[:3]
    response = qido(pas, "instances", SOPInstanceUID=",".join(sops))
    assert sorted(value(i, "00080018") for i in response.json()) == sops
    bad = qido(pas, "studies", StudyInstanceUID=f"{studies[0]},not-a-uid")
    assert bad.status_code == 400 and "StudyInstanceUID" in bad.json()["detail"]


def test_instance_search_computes_study_counts_once_per_study(tmp_path: Path) -> None:
    """An /instances search returns NumberOfStudyRelatedInstances (and other study and series
    counts) for each row; computed per row it recounted the whole study for each of its
    instances (over 600 s for one 400,000-instance study). The work, in SQLite virtual
    machine steps, must grow with the rows returned plus the study once, not their product."""
    size, page = 4000, 200
    db = Database(tmp_path / "pas.sqlite")
    with db.transaction() as conn:
        conn.execute("INSERT INTO patients (id, patient_id, name) VALUES (1, 'P1', 'A^B')")
        conn.execute("INSERT INTO studies (id, study_uid, patient_fk, first_received_at, "
                     "last_received_at) VALUES (1, '1.2.3', 1, 0, 0)")
        conn.execute("INSERT INTO series (id, series_uid, study_fk, modality) "
                     "VALUES (1, '1.2.3.1', 1, 'MR')")
        conn.executemany(
            "INSERT INTO instances (sop_instance_uid, series_fk, study_fk, sop_class_uid, "
            "transfer_syntax_uid, path, size, sha256, received_at) "
            "VALUES (?, 1, 1, '1.2', '1.2.840.10008.1.2.1', ?, 1, ?, 0)",
            [(f"1.2.3.1.{n}", f"p{n}", f"h{n}") for n in range(size)])
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    db.connection().set_progress_handler(count, 1)
    keys = {"SOPInstanceUID": "", "NumberOfStudyRelatedInstances": "",
            "NumberOfStudyRelatedSeries": "", "ModalitiesInStudy": "",
            "NumberOfSeriesRelatedInstances": ""}
    rows = list(store_query.find(db, "IMAGE", keys, limit=page))
    db.connection().set_progress_handler(None, 1)
    assert len(rows) == page
    assert all(r["NumberOfStudyRelatedInstances"] == size and r["ModalitiesInStudy"] == "MR"
               and r["NumberOfSeriesRelatedInstances"] == size
               and r["NumberOfStudyRelatedSeries"] == 1 for r in rows)
    assert steps[0] < 10 * (page + size), steps[0]  # was ~1,200 per row per 1,000 instances


def _tiny_instances(folder: Path, studies: int, per_study: int) -> Path:
    """Small synthetic CT instances (8x8 pixels): ``studies`` studies of ``per_study`` each."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(studies):
        study, series = generate_uid(), generate_uid()
        for n in range(per_study):
            ds = tiny_ct(study, series, PatientID=f"TINY{s}", PatientName=f"TINY^{s}",
                         StudyDate="20260101", InstanceNumber=n + 1)
            ds.save_as(folder / f"{s:03d}-{n:05d}.dcm", enforce_file_format=True)
    return folder


def test_unbounded_instance_search_gets_a_default_page_and_a_warning(
        pas_factory: Any, tmp_path: Path) -> None:
    """A search not confined to one study with no limit returns QIDO_DEFAULT_LIMIT results
    and the PS3.18 8.3.4.4 Warning (it was unbounded); asking for more with offset or limit
    works; a search within a study is not cut (fetch-through lists a study that way)."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false"})
    size = QIDO_DEFAULT_LIMIT + 50
    storescu(_tiny_instances(tmp_path / "tiny", 1, size), pas.port)
    page = qido(pas, "instances")
    assert page.status_code == 200, page.text
    assert len(page.json()) == QIDO_DEFAULT_LIMIT
    assert page.headers["warning"].startswith("299 http://127.0.0.1:")
    assert "exceeded the maximum supported by the server" in page.headers["warning"]
    rest = qido(pas, "instances", offset=QIDO_DEFAULT_LIMIT)
    assert len(rest.json()) == 50 and "warning" not in rest.headers
    everything = qido(pas, "instances", limit=size)
    assert len(everything.json()) == size and "warning" not in everything.headers
    study = value(page.json()[0], "0020000D")
    within = qido(pas, f"studies/{study}/instances")
    assert len(within.json()) == size and "warning" not in within.headers


def test_explicit_limit_is_capped_at_qido_max_limit_with_a_warning(
        pas_factory: Any, tmp_path: Path) -> None:
    """An explicit limit above serving.qido_max_limit (limit=100000000 was unbounded: every
    row held and sent) gets that many results and the PS3.18 8.3.4.4 Warning, so that the
    viewer pages on with offset; the default page is never above the maximum either; a search
    within a study is bounded by the study, not cut."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
                       "PAS_SERVING__QIDO_MAX_LIMIT": "20"})
    storescu(_tiny_instances(tmp_path / "tiny", 1, 30), pas.port)
    huge = qido(pas, "instances", limit=100000000)
    assert huge.status_code == 200, huge.text
    assert len(huge.json()) == 20
    assert "exceeded the maximum supported by the server" in huge.headers["warning"]
    rest = qido(pas, "instances", limit=100000000, offset=20)
    assert len(rest.json()) == 10 and "warning" not in rest.headers
    exact = qido(pas, "instances", limit=20)  # the client's own limit, at the maximum
    assert len(exact.json()) == 20 and "warning" not in exact.headers
    default = qido(pas, "instances")
    assert len(default.json()) == 20 and "exceeded the maximum" in default.headers["warning"]
    found = {value(i, "00080018") for i in huge.json() + rest.json()}
    assert len(found) == 30  # the two pages are the whole answer, nothing twice
    study = value(huge.json()[0], "0020000D")
    for limit in (100000000, 10**30):
        within = qido(pas, f"studies/{study}/instances", limit=limit)
        assert within.status_code == 200, within.text
        assert len(within.json()) == 30 and "warning" not in within.headers


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "1.5", "", " 5", "1e3", "\u00b2", "\u0663"])
def test_a_limit_that_is_not_a_positive_integer_is_refused(pas: PasProcess, bad: str) -> None:
    """limit must be a positive integer (limit=0 answered an empty page, a superscript digit
    passed str.isdigit and failed in int()): 400 naming the parameter, whatever the level."""
    for path in ("studies", "instances"):
        response = qido(pas, path, limit=bad)
        assert response.status_code == 400, (bad, response.text)
        assert "limit" in response.json()["detail"], response.text


@pytest.mark.parametrize("bad", ["-1", "x", "\u00b2"])
def test_an_offset_that_is_not_a_non_negative_integer_is_refused(pas: PasProcess,
                                                                 bad: str) -> None:
    response = qido(pas, "studies", offset=bad)
    assert response.status_code == 400, (bad, response.text)
    assert "offset" in response.json()["detail"], response.text


@pytest.mark.parametrize(("query", "said"), [
    ("StudyDate=19010101-&StudyDate=-19001231", "StudyDate: given more than once "
     "('19010101-' and '-19001231'); give it once (a list: a,b)"),
    ("PatientID=A&00100020=B", "PatientID: given more than once ('A' and 'B')"),
    ("limit=2&limit=5", "limit: given 2 times; give it once"),
    ("offset=0&offset=3", "offset: given 2 times; give it once"),
])
def test_a_parameter_given_twice_is_refused_naming_it(pas: PasProcess, query: str,
                                                      said: str) -> None:
    """The last one was applied without a word: StudyDate=19010101-&StudyDate=-19001231
    answered the 13 studies of the second range, where both applied match none; limit=2&
    limit=5 gave 5. Includefield, which PS3.18 lets repeat, still may."""
    response = httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies?{query}",
                         timeout=60)
    assert response.status_code == 400, response.text
    assert said in response.json()["detail"], response.text
    fields = httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies?limit=1&"
                       "includefield=00081030&includefield=StudyID", timeout=60)
    assert fields.status_code == 200 and len(fields.json()) == 1, fields.text


def test_instance_availability_is_returned_online(pas: PasProcess, files: list[Any]) -> None:
    """PS3.18's study and instance tables return Instance Availability (0008,0056) if known;
    PAS knows (what it answers is on its disk: C-FIND says ONLINE) and never returned it,
    even asked by includefield. Series answer it when asked, and with their study's
    attributes."""
    mr = next(f for f in files if f.Modality == "MR")
    for path, params in (("studies", {}), (f"studies/{mr.StudyInstanceUID}/instances", {}),
                         ("series", {"includefield": "InstanceAvailability"})):
        answer = qido(pas, path, **params).json()
        assert answer and all(value(item, "00080056") == "ONLINE" for item in answer), path
        assert all(item["00080056"]["vr"] == "CS" for item in answer)
    # Not a series default (a series search outside a study returns the study's).
    assert "00080056" not in qido(pas, f"studies/{mr.StudyInstanceUID}/series").json()[0]


def test_a_refused_search_is_audited_as_a_failed_query(pas: PasProcess) -> None:
    """A QIDO-RS search refused for its parameters left no trace in the audit trail (C-FIND's
    refusals did): now one query row each, a failure naming the problem and what was asked."""
    marker = generate_uid()
    refused = [qido(pas, "studies", StudyInstanceUID=marker, limit="x"),
               qido(pas, "series", StudyInstanceUID=marker, SeriesNumber="one")]
    assert [r.status_code for r in refused] == [400, 400], [r.text for r in refused]
    rows = [r for r in read_rows(pas.home / "pas.sqlite",
                                 "SELECT * FROM audit WHERE event = 'query' ORDER BY id")
            if marker in (r["target"] or "")]
    assert [(r["target"].split()[0], r["outcome"]) for r in rows] == [
        ("STUDY", f"failure: {refused[0].json()['detail']}"),
        ("SERIES", f"failure: {refused[1].json()['detail']}")], \
        [dict(r) for r in rows]
    assert all(r["detail"] == "refused (QIDO-RS)" and r["actor"] == "anonymous"
               and r["source"] == "127.0.0.1" for r in rows), [dict(r) for r in rows]
    assert "limit=x" in rows[0]["target"] and "SeriesNumber=one" in rows[1]["target"]


def test_a_refused_search_names_the_patient_asked_as_a_search_does(pas: PasProcess) -> None:
    """A refused search's target was its query string as it came, keys joined by "&":
    ``PatientID=A002304&limit=abc`` was recorded as patient 'A002304&limit=abc', and
    ``pas audit --patient A002304`` missed it. Now ``LEVEL Key=value ...`` as a search's."""
    patient = f"P{generate_uid()[-12:]}"
    assert qido(pas, "studies", PatientID=patient, limit="abc").status_code == 400
    assert qido(pas, "studies", PatientID=patient).status_code in (200, 204)
    found = wait_for(lambda: len(rows := json.loads(pas.cli(
        "audit", "--patient", patient, "--event", "query", "--json").stdout)) == 2 and rows,
        10, what="both searches' rows")
    refused, answered = sorted(found, key=lambda r: r["id"])
    assert refused["target"] == f"STUDY PatientID={patient} limit=abc", refused
    assert refused["patient"] == patient and refused["outcome"].startswith("failure: ")
    assert answered["target"] == f"STUDY PatientID={patient}", answered


def test_a_search_s_atna_message_carries_the_request_as_asked(pas: PasProcess) -> None:
    """The ATNA Query message's ParticipantObjectQuery was the row's text summary ("STUDY
    PatientID=..."); for QIDO-RS it is now the request's path and query string, as sent, with
    no TransferSyntax detail (that is a C-FIND identifier's)."""
    import base64
    import xml.etree.ElementTree as ET

    from appliance.ops.audit_trail import atna_message

    marker = generate_uid()
    assert qido(pas, "studies", StudyInstanceUID=marker, includefield="StudyDescription"
                ).status_code in (200, 204)
    [row] = [r for r in read_rows(pas.home / "pas.sqlite",
                                  "SELECT * FROM audit WHERE event = 'query' ORDER BY id")
             if marker in (r["target"] or "")]
    asked = f"/dicom-web/studies?StudyInstanceUID={marker}&includefield=StudyDescription"
    assert row["query"] == asked.encode() and row["query_syntax"] is None, dict(row)
    root = ET.fromstring(atna_message(dict(row), "SITE", "host"))
    [queried] = root.findall("ParticipantObjectIdentification/ParticipantObjectQuery/..")
    assert base64.b64decode(queried.findtext("ParticipantObjectQuery") or "") == asked.encode()
    assert queried.find("ParticipantObjectDetail[@type='TransferSyntax']") is None


def test_a_c_find_identifier_is_kept_for_the_audit_up_to_a_bound(pas: PasProcess) -> None:
    """A C-FIND's identifier is kept in its audit row as sent (the ATNA message's
    ParticipantObjectQuery); one over AUDITED_IDENTIFIER_MAX bytes is not (the table is kept
    for years and a peer may send megabytes): that row keeps its text summary only."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from appliance.serving.qr import AUDITED_IDENTIFIER_MAX

    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    rows = []
    for size in (10, AUDITED_IDENTIFIER_MAX + 1000):
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", generate_uid()
        identifier.StudyDescription = "X" * size
        assoc = ae.associate("127.0.0.1", pas.port, ae_title="PAS")
        assert assoc.is_established
        try:
            statuses = [s.Status for s, _ in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind)]
        finally:
            assoc.release()
        assert statuses[-1] == 0x0000
        # The newest query row (a long target is cut, the marker with it: not searched).
        [row] = read_rows(pas.home / "pas.sqlite", "SELECT * FROM audit WHERE event = "
                          "'query' ORDER BY id DESC LIMIT 1")
        assert row["target"].startswith("STUDY StudyDescription=XXXXXXXXXX"), row["target"]
        assert not rows or row["id"] > rows[-1]["id"]
        rows.append(row)
    small, large = rows
    assert small["query"] is not None and b"X" * 10 in small["query"]
    assert small["query_syntax"] is not None
    assert large["query"] is None and large["query_syntax"] is None, len(large["query"])


@pytest.mark.parametrize(("key", "bad"), [
    ("StudyDate", "20201301"), ("StudyDate", "20200230"), ("StudyDate", "20200101-20201340"),
    ("StudyTime", "2500"), ("StudyTime", "1261"), ("StudyTime", "120061-"),
    # \d took any script's digits (int() reads them): searched as a date, matching nothing.
    ("StudyDate", "\u0662\u0660\u0662\u0660\u0660\u0661\u0660\u0661"),
])
def test_a_date_or_time_that_does_not_exist_is_refused_naming_it(pas: PasProcess, key: str,
                                                                 bad: str) -> None:
    """The shape alone was checked: StudyDate=20201301 matched nothing and answered an
    empty list, which reads as "no such study"; now 400 naming the key and the value."""
    response = qido(pas, "studies", **{key: bad})
    assert response.status_code == 400, (bad, response.text)
    assert response.json()["detail"].startswith(f"{key}: {bad!r} is not a valid"), response.text


def test_real_dates_and_times_at_their_limits_are_searched(pas: PasProcess) -> None:
    for key, value in [("StudyDate", "20200229"), ("StudyDate", "19000101-20991231"),
                       ("StudyTime", "235960"), ("StudyTime", "0000-2359")]:
        response = qido(pas, "studies", **{key: value})
        assert response.status_code in (200, 204), (value, response.text)


def test_a_huge_offset_is_an_empty_page(pas: PasProcess) -> None:
    """Beyond SQLite's 64-bit integers an offset (or a limit) is no error of the client's."""
    response = qido(pas, "studies", offset=10**30)
    assert response.status_code == 200, response.text
    assert response.json() == []


def test_max_results_cut_is_said_in_qido(pas_factory: Any, tmp_path: Path) -> None:
    """serving.max_results: QIDO-RS sends the Warning of PS3.18 8.3.4.4 when it cut the
    answer (it cut silently), and none when the client's own limit or the matches were less."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
                       "PAS_SERVING__MAX_RESULTS": "5"})
    storescu(_tiny_instances(tmp_path / "tiny", 7, 1), pas.port)
    cut = qido(pas, "studies")
    assert len(cut.json()) == 5 and "exceeded the maximum" in cut.headers["warning"]
    assert "warning" not in qido(pas, "studies", limit=5).headers  # the client's own limit
    assert "warning" not in qido(pas, "studies", offset=2).headers  # 5 of 5 left: complete
    assert "warning" not in qido(pas, "studies", PatientID="TINY1").headers


def test_max_results_cut_in_c_find_is_logged_and_audited(pas_factory: Any,
                                                         tmp_path: Path) -> None:
    """C-FIND has no warning status (PS3.4 C.4.1.1.4) and a failure would make viewers drop
    the matches: the cut at serving.max_results ends in Success but is logged and audited."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false",
                       "PAS_SERVING__MAX_RESULTS": "5"})
    storescu(_tiny_instances(tmp_path / "tiny", 7, 1), pas.port)
    found = findscu(pas, "STUDY", ["StudyInstanceUID"], tmp_path / "find")
    assert len(found) == 5
    wait_for(lambda: "more than serving.max_results = 5" in pas.log())
    # The row is written once the final response is sent: awaited, not read at once.
    audit = wait_for(lambda: (lambda rows: rows if rows and "truncated" in (
        rows[-1]["detail"] or "") else None)(read_rows(
            pas.home / "pas.sqlite", "SELECT outcome, detail FROM audit "
            "WHERE event = 'query' ORDER BY id")), 10, what="the query's audit row")
    assert "truncated" in audit[-1]["detail"] and audit[-1]["outcome"] == "success"
    exact = findscu(pas, "STUDY", ["PatientID=TINY1", "StudyInstanceUID"], tmp_path / "one")
    assert len(exact) == 1
    assert pas.log().count("C-FIND from VIEWER: truncated") == 1  # not for the exact match


def test_case_insensitive_person_names_beyond_ascii(pas_factory: Any, tmp_path: Path) -> None:
    """pn_case_sensitive = false (the default): case is ignored in the whole name, accented
    letters included (SQLite's LIKE and NOCASE fold ASCII only), in C-FIND and QIDO-RS."""
    pas = pas_factory({"PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false"})
    folder = _tiny_instances(tmp_path / "tiny", 3, 1)
    names = {}
    for path, name in zip(sorted(folder.glob("*.dcm")), ["HÉLÈNE^DUPONT", "Smith^Anne",
                                                          "ÇA^ÉTÉ"], strict=True):
        ds = dcmread(path)
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 100", name
        ds.save_as(path, enforce_file_format=True)
        names[name] = str(ds.StudyInstanceUID)
    storescu(folder, pas.port)
    cases = [("hélène*", "HÉLÈNE^DUPONT"), ("Hélène^Dupont", "HÉLÈNE^DUPONT"),
             ("h?l?ne*", "HÉLÈNE^DUPONT"), ("*dupont", "HÉLÈNE^DUPONT"),
             ("ça^été", "ÇA^ÉTÉ"), ("smith^anne", "Smith^Anne"), ("*É*", None)]
    for n, (asked, expected) in enumerate(cases):
        wanted = ({names[expected]} if expected else
                  {names["HÉLÈNE^DUPONT"], names["ÇA^ÉTÉ"]})
        response = qido(pas, "studies", PatientName=asked)
        assert {value(s, "0020000D") for s in response.json()} == wanted, asked
        found = findscu(pas, "STUDY", ["SpecificCharacterSet=ISO_IR 192",
                                       f"PatientName={asked}", "StudyInstanceUID"],
                        tmp_path / f"find{n}")
        assert {str(d.StudyInstanceUID) for d in found} == wanted, asked
    assert qido(pas, "studies", PatientName="hélène").json() == []  # no wildcard: whole name

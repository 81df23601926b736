"""Person name keys against names of several values or component groups, findscu and QIDO-RS.

Found in review (2026-12-04), each answered with no match and no error, which reads as "no
such patient":
- a key of several values (``PatientName=DOE^JOHN\\DOE^J``). PatientName is VM 1, and PS3.4
  C.2.2.2 lets a key hold more values than its VM only for List of UID Matching and Multiple
  Value Matching (C.2.2.2.8: attributes of VM > 1, after an extended negotiation PAS does
  not offer; "undefined" without it). Now refused: C-FIND 0xA900 and QIDO-RS 400, naming
  the key.
- a stored name of several values (``DOE^JOHN\\DOE^J``, a name given twice): PS3.4 C.2.2.3,
  it matches when any one of its values does, and every value is returned.
- a stored name of several component groups (``YAMADA^TAROU=山田^太郎=やまだ^たろう``, PS3.5
  6.2.1.1): ``PatientName=YAMADA^TAROU`` found nothing. A key of one group now matches any
  group; a key of several matches group by group.

Found in review (2026-12-07): names differing only by trailing empty components, which PS3.5
6.2.1.1 lets a sender leave out (``DOE^JANE^^^`` is ``DOE^JANE``, the form modalities filling
names from the worklist send): ``PatientName=DOE^JANE`` did not find a stored
``DOE^JANE^^^``, nor ``SMITH^JOHN^^^`` a stored ``smith^john``. And keys of several groups
against a name of one: ``*=*`` found nobody (it is everybody), ``smith*=*=*`` not
``smith^john``: only names holding ``=`` or ``\\`` were matched group by group.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from tests.support.objects import tiny_ct
from tests.support.peers import DCMTK_ENV, PasProcess, read_rows, storescu

NAMES = {
    "PMULTI": ("ISO_IR 100", ["DOE^JOHN", "DOE^J"]),
    "PGROUPS": ("ISO_IR 192", "YAMADA^TAROU=山田^太郎=やまだ^たろう"),
    "PPLAIN": ("ISO_IR 100", "DOE^JANE"),
    "PTRAIL": ("ISO_IR 100", "DOE^JANE^^^"),  # the same name as PPLAIN's
    "PLOWER": ("ISO_IR 100", "smith^john"),
}


@pytest.fixture(scope="module")
def pas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasProcess]:
    home = tmp_path_factory.mktemp("names") / "pas"
    home.mkdir()
    paths = []
    for patient_id, (charset, name) in NAMES.items():
        ds = tiny_ct(PatientID=patient_id, PatientName=name, SpecificCharacterSet=charset)
        paths.append(home / f"{patient_id}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    pas = PasProcess(home, {"PAS_DICOM__ACCEPT_UNKNOWN": "true",
                            "PAS_PREFETCH__ENABLED": "false"}).start()
    try:
        storescu(paths, pas.port)
        yield pas
    finally:
        pas.stop()


def findscu(pas: PasProcess, name: str, out: Path) -> tuple[list[Any], str]:
    """findscu -d (Study Root, STUDY level, in UTF-8) with PatientName=``name``: the answers
    and the final status's Error Comment ("" for none)."""
    out.mkdir(parents=True)
    args = ["findscu", "-d", "-S", "-X", "-od", str(out), "-aet", "VIEWER", "-aec", "PAS",
            "-k", "QueryRetrieveLevel=STUDY", "-k", "SpecificCharacterSet=ISO_IR 192",
            "-k", f"PatientName={name}", "-k", "PatientID"]
    result = subprocess.run([*args, "127.0.0.1", str(pas.port)], env=DCMTK_ENV,
                            capture_output=True, text=True, timeout=60)
    log = result.stdout + result.stderr
    assert "DIMSE Status" in log, log[-2000:]
    final = log[log.rindex("DIMSE Status"):]
    comment = re.search(r"\(0000,0902\) LO \[(.*)\]\s+#", final)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], comment.group(1) if comment else ""


def qido(pas: PasProcess, name: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{pas.http_port}/dicom-web/studies",
                     params={"PatientName": name, "includefield": "PatientID"}, timeout=30)


def found(pas: PasProcess, name: str, tmp_path: Path) -> tuple[set[str], set[str]]:
    """The patients matched by PatientName=``name``: (by findscu, by QIDO-RS)."""
    answers, comment = findscu(pas, name, tmp_path / f"find{len(list(tmp_path.iterdir()))}")
    assert comment == ""
    response = qido(pas, name)
    assert response.status_code == 200, response.text
    # One study per patient: a patient is answered once.
    patients = [str(ds.PatientID) for ds in answers]
    by_qido = [item["00100020"]["Value"][0] for item in response.json()]
    assert len(patients) == len(set(patients)) and len(by_qido) == len(set(by_qido))
    return set(patients), set(by_qido)


@pytest.mark.parametrize("name", ["DOE^JOHN\\DOE^J", "DOE*\\*", "YAMADA^TAROU\\"])
def test_a_person_name_key_of_several_values_is_refused_naming_it(
        pas: PasProcess, tmp_path: Path, name: str) -> None:
    answers, comment = findscu(pas, name, tmp_path / "find")
    assert answers == []
    assert comment.startswith("PatientName: a person name key takes one value, not 2"), comment
    response = qido(pas, name)
    assert response.status_code == 400
    assert response.json()["detail"].startswith(
        "PatientName: a person name key takes one value, not 2 (PS3.4 C.2.2.2: VM 1, "
        "no multiple value matching)"), response.text
    rows = read_rows(pas.home / "pas.sqlite", "SELECT outcome FROM audit WHERE "
                                              "event = 'query' ORDER BY id DESC LIMIT 2")
    assert all(r["outcome"].startswith("failure: PatientName: a person name key takes one")
               for r in rows), [r["outcome"] for r in rows]
    # The daemon keeps serving.
    assert found(pas, "DOE^JANE", tmp_path) == ({"PPLAIN", "PTRAIL"}, {"PPLAIN", "PTRAIL"})


@pytest.mark.parametrize(("name", "patients"), [
    ("DOE^J", {"PMULTI"}),
    ("doe^john", {"PMULTI"}),
    ("*^J", {"PMULTI"}),
    ("DOE^JANE", {"PPLAIN", "PTRAIL"}),
    ("DOE*", {"PMULTI", "PPLAIN", "PTRAIL"}),
    ("DOE^JO", set()),
    ("DOE^J^^", {"PMULTI"}),
])
def test_a_stored_name_of_several_values_matches_any_of_them(
        pas: PasProcess, tmp_path: Path, name: str, patients: set[str]) -> None:
    assert found(pas, name, tmp_path) == (patients, patients)


def test_every_value_of_a_matched_name_is_returned(pas: PasProcess, tmp_path: Path) -> None:
    """PS3.4 C.2.2.3: when any value matches, all values are returned."""
    (answer,), _ = findscu(pas, "DOE^J", tmp_path / "find")
    assert list(answer.PatientName) == ["DOE^JOHN", "DOE^J"]
    (item,) = qido(pas, "DOE^J").json()
    assert item["00100010"]["Value"] == [{"Alphabetic": "DOE^JOHN"}, {"Alphabetic": "DOE^J"}]


@pytest.mark.parametrize(("name", "patients"), [
    ("YAMADA^TAROU", {"PGROUPS"}),
    ("yamada^tarou", {"PGROUPS"}),
    ("山田^太郎", {"PGROUPS"}),
    ("やまだ*", {"PGROUPS"}),
    ("*TAROU", {"PGROUPS"}),
    ("=山田*", {"PGROUPS"}),
    ("YAMADA*=山田^太郎", {"PGROUPS"}),
    ("YAMADA^TAROU=山田^太郎=やまだ^たろう", {"PGROUPS"}),
    ("YAMADA^TAROU=鈴木*", set()),
    ("山田", set()),
])
def test_a_name_of_several_component_groups_matches_each_group(
        pas: PasProcess, tmp_path: Path, name: str, patients: set[str]) -> None:
    assert found(pas, name, tmp_path) == (patients, patients)


EVERYONE = set(NAMES)


@pytest.mark.parametrize(("name", "patients"), [
    # Trailing empty components do not count, on either side (PS3.5 6.2.1.1).
    ("DOE^JANE^^^", {"PPLAIN", "PTRAIL"}),
    ("doe^jane^==", {"PPLAIN", "PTRAIL"}),
    ("SMITH^JOHN^^^", {"PLOWER"}),
    ("SMITH^JOHN", {"PLOWER"}),
    ("*^JANE", {"PPLAIN", "PTRAIL"}),
    ("DOE^JAN?", {"PPLAIN", "PTRAIL"}),
    ("DOE^JANE^*", {"PPLAIN", "PTRAIL"}),  # DOE^JANE written out: DOE^JANE^^^
    ("SMITH^JOHN^^^X", set()),
    ("DOE^JANE^^^^J", set()),
    # Several groups against a name of one: its first group, the others absent.
    ("*=*", EVERYONE),
    ("=*", EVERYONE),
    ("smith*=*=*", {"PLOWER"}),
    ("SMITH^JOHN^=", {"PLOWER"}),
    ("smith*=山田*", set()),
    ("YAMADA^TAROU^^=山田^太郎^=", {"PGROUPS"}),
])
def test_trailing_empty_components_and_groups_do_not_count(
        pas: PasProcess, tmp_path: Path, name: str, patients: set[str]) -> None:
    assert found(pas, name, tmp_path) == (patients, patients)


def test_a_name_is_returned_as_it_was_stored(pas: PasProcess, tmp_path: Path) -> None:
    """Matched without its trailing ``^``, a name is still answered as sent."""
    answers, _ = findscu(pas, "DOE^JANE", tmp_path / "find")
    assert sorted(str(ds.PatientName) for ds in answers) == ["DOE^JANE", "DOE^JANE^^^"]

"""Character sets end to end: names in Latin-1, UTF-8, ISO 2022 (Japanese, Korean), and
objects whose bytes do not match what they declare, from storescu to findscu and QIDO-RS.

One PAS holds one small object per case (pydicom makes them; the odd ones are patched byte by
byte). What is checked: the dataset is stored exactly as sent (SHA-256), the index holds the
decoded name, C-FIND matches names and date/time ranges as PS3.4 C.2.2.2 says and answers in
a character set the workstation asked in, QIDO-RS splits the name into its component groups.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.charset import encode_string
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble

from tests.support.cleanup import started
from tests.support.objects import tiny_ct
from tests.support.peers import DCMTK_ENV, PasProcess, read_rows, storescu, wait_for

LATIN1 = "LEFÈVRE-ÇELIK^Hélène"
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
KOREAN = "Hong^Gildong=洪^吉洞=홍^길동"
# PatientID -> (how the object is written, the name the index should hold)
CASES: dict[str, tuple[str, str]] = {
    "LAT1": ("ISO_IR 100", LATIN1),
    "UTF8": ("ISO_IR 192", "O'Brien^Zoë"),
    "ASCII": ("", "D'ARTAGNAN^Charles"),
    "LEFEVRE": ("", "LEFEVRE^Paul"),
    "HELENE": ("ISO_IR 100", "HÉLÈNE^Martin"),
    "JP": ("\\ISO 2022 IR 87", JAPANESE),
    "KR": ("\\ISO 2022 IR 149", KOREAN),
    # No Specific Character Set, Latin-1 bytes: read as Latin-1 (pydicom's default).
    "NOCS": ("raw:", "MÜLLER^Jürgen"),
    # No Specific Character Set, UTF-8 bytes (what many modalities write): indexed as UTF-8.
    "NOCS8": ("raw:", "GRÜNBERG^Aurélie"),
    # Declares UTF-8, holds Latin-1 bytes: kept as sent, indexed with replacement characters.
    "BADUTF8": ("raw:ISO_IR 192", "GAR\ufffdON^\ufffdmile"),
}
RAW_NAMES = {"NOCS": "MÜLLER^Jürgen".encode("latin-1"),
             "NOCS8": "GRÜNBERG^Aurélie".encode(),
             "BADUTF8": "GARÇON^Émile".encode("latin-1")}
DATES = {"LAT1": ("20200101", "083000"), "UTF8": ("20201231", "235959"),
         "ASCII": ("20191231", "120000"), "LEFEVRE": ("20210101", "000000"),
         "JP": ("20200301", "140000"), "KR": ("20200302", "1500")}


def _object(patient_id: str, folder: Path) -> Path:
    charset, name = CASES[patient_id]
    date, time = DATES.get(patient_id, ("20200615", "101500"))
    ds = tiny_ct(PatientID=patient_id, StudyDate=date, StudyTime=time)
    path = folder / f"{patient_id}.dcm"
    if charset.startswith("raw:"):
        raw = RAW_NAMES[patient_id]
        placeholder = "X" * len(raw)
        ds.PatientName = placeholder
        if charset[4:]:
            ds.SpecificCharacterSet = charset[4:]
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        assert data.count(placeholder.encode()) == 1
        path.write_bytes(data.replace(placeholder.encode(), raw))
        return path
    if charset:
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    ds.PatientName = name
    ds.save_as(path, enforce_file_format=True)
    return path


def _dataset_bytes(path: Path) -> bytes:
    with path.open("rb") as handle:
        read_preamble(handle, False)
        _read_file_meta_info(handle)
        return handle.read()


class Site:
    def __init__(self, root: Path):
        self.root = root
        folder = root / "objects"
        folder.mkdir(parents=True)
        self.files = {pid: _object(pid, folder) for pid in CASES}
        with contextlib.ExitStack() as stack:  # a step that raises stops the daemon
            self.pas = started(stack, PasProcess(root / "pas", {
                "PAS_DICOM__ACCEPT_UNKNOWN": "true", "PAS_PREFETCH__ENABLED": "false"}))
            storescu(sorted(self.files.values()), self.pas.port)
            stack.pop_all()  # set up: the fixture stops it from now on
        self.finds = 0

    def findscu(self, keys: list[str | bytes], level: str = "STUDY",
                charset: str | bytes | None = None) -> list[tuple[Dataset, bytes]]:
        """findscu (Study Root) with ``keys`` as given (bytes: already encoded in the
        query's ``charset``); each response as (dataset, its raw bytes)."""
        self.finds += 1
        out = self.root / f"find{self.finds}"
        out.mkdir()
        args: list[str | bytes] = ["findscu", "-S", "-X", "-od", str(out), "-aet", "VIEWER",
                                   "-aec", "PAS", "-k", f"QueryRetrieveLevel={level}"]
        if charset is not None:
            args += ["-k", "SpecificCharacterSet=" + charset if isinstance(charset, str)
                     else b"SpecificCharacterSet=" + charset]
        for key in keys:
            args += ["-k", key]
        result = subprocess.run([*args, "127.0.0.1", str(self.pas.port)], env=DCMTK_ENV,
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        paths = sorted(out.glob("rsp*.dcm"))
        return [(dcmread(p), _dataset_bytes(p)) for p in paths]

    def ids(self, keys: list[str | bytes], charset: str | bytes | None = None) -> set[str]:
        return {str(ds.PatientID) for ds, _ in self.findscu([*keys, "PatientID"], charset=charset)}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    site = Site(tmp_path_factory.mktemp("charsets"))
    try:
        yield site
    finally:
        site.pas.stop()


def test_objects_are_stored_as_sent_and_names_indexed_decoded(site: Site) -> None:
    """The dataset PAS keeps has the SHA-256 of the one sent, whatever its character set
    (or its errors); the index holds the name decoded as its Specific Character Set says."""
    stored = {hashlib.sha256(_dataset_bytes(p)).hexdigest()
              for p in (site.pas.home / "spool").rglob("*.dcm")}
    for patient_id, path in site.files.items():
        assert hashlib.sha256(_dataset_bytes(path)).hexdigest() in stored, patient_id
    rows = read_rows(site.pas.home / "pas.sqlite", "SELECT patient_id, name FROM patients")
    assert {r["patient_id"]: r["name"] for r in rows} == {
        pid: name for pid, (_, name) in CASES.items()}


@pytest.mark.parametrize(("charset", "encoding"), [("ISO_IR 100", "latin-1"),
                                                   ("ISO_IR 192", "utf-8")])
def test_person_name_matching_in_the_query_character_set(site: Site, charset: str,
                                                         encoding: str) -> None:
    """PS3.4 C.2.2.2: the query is decoded in its own character set; wildcards over the whole
    name, case ignored (accents included) but accents not removed."""
    cases = [("HÉL*", {"HELENE"}), ("hél*", {"HELENE"}), ("Hél*", {"HELENE"}),
             ("LEFEVRE*", {"LEFEVRE"}), ("LEFÈVRE*", {"LAT1"}), ("lefèvre*", {"LAT1"}),
             ("*zoë", {"UTF8"}), ("O'Brien^Zoë", {"UTF8"}), ("d'artagnan^charles", {"ASCII"}),
             ("*Hélène", {"LAT1"}), ("hélène", set()), ("grünberg^aur*", {"NOCS8"}),
             ("*AURÉLIE", {"NOCS8"})]
    for asked, expected in cases:
        key = f"PatientName={asked}".encode(encoding)
        assert site.ids([key], charset=charset) == expected, (charset, asked)


def test_c_find_answers_in_the_character_set_of_the_query(site: Site) -> None:
    """A workstation asking in ISO_IR 100 gets Latin-1 names (ISO_IR 100 in the response),
    not UTF-8 it would show as mojibake; a name Latin-1 cannot hold comes in UTF-8; a query
    in UTF-8 or without Specific Character Set gets UTF-8."""
    [(ds, raw)] = site.findscu(["PatientID=LAT1", "PatientName"], charset="ISO_IR 100")
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert LATIN1.encode("latin-1") in raw and str(ds.PatientName) == LATIN1
    [(ds, raw)] = site.findscu(["PatientID=JP", "PatientName"], charset="ISO_IR 100")
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == JAPANESE
    for charset in ("ISO_IR 192", None):
        [(ds, raw)] = site.findscu(["PatientID=LAT1", "PatientName"], charset=charset)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert LATIN1.encode("utf-8") in raw and str(ds.PatientName) == LATIN1
    # Sent as UTF-8 without a Specific Character Set: answered as the name it is.
    [(ds, raw)] = site.findscu(["PatientID=NOCS8", "PatientName"], charset="ISO_IR 100")
    assert ds.SpecificCharacterSet == "ISO_IR 100" and str(ds.PatientName) == "GRÜNBERG^Aurélie"
    [(ds, raw)] = site.findscu(["PatientID=ASCII", "PatientName"], charset="ISO_IR 100")
    assert "SpecificCharacterSet" not in ds and str(ds.PatientName) == "D'ARTAGNAN^Charles"


@pytest.mark.parametrize(("term", "codec", "patient_id", "ideographic"),
                         [("ISO 2022 IR 87", "iso2022_jp", "JP", "山田"),
                          ("ISO 2022 IR 149", "euc_kr", "KR", "洪")])
def test_iso_2022_query_is_matched_and_answered_in_iso_2022(
        site: Site, term: str, codec: str, patient_id: str, ideographic: str) -> None:
    """A Japanese (Korean) workstation asking in ISO 2022 IR 87 (IR 149), code extensions in
    the query: matched on the ideographic group, answered in the same character set, with
    the escape sequences of PS3.5 6.1.2.5, decoding to the same name."""
    encoded = encode_string(ideographic, ["iso8859", codec])
    assert encoded.startswith(b"\x1b$")
    found = site.findscu([b"PatientName=*" + encoded + b"*", "PatientID"],
                         charset="\\" + term)
    assert [str(ds.PatientID) for ds, _ in found] == [patient_id]
    [(ds, raw)] = found
    assert list(ds.SpecificCharacterSet) == ["", term]
    assert str(ds.PatientName) == CASES[patient_id][1]
    assert encoded in raw and "=".join(CASES[patient_id][1].split("=")[1:]).encode() not in raw


@pytest.mark.parametrize(("key", "expected"), [
    ("StudyDate=20200101-20201231", {"LAT1", "UTF8", "HELENE", "JP", "KR", "NOCS", "NOCS8",
                                     "BADUTF8"}),
    ("StudyDate=-20201231", {"LAT1", "UTF8", "ASCII", "HELENE", "JP", "KR", "NOCS", "NOCS8",
                             "BADUTF8"}),
    ("StudyDate=20200101-", {"LAT1", "UTF8", "LEFEVRE", "HELENE", "JP", "KR", "NOCS",
                             "NOCS8", "BADUTF8"}),
    ("StudyDate=20191231", {"ASCII"}),
    ("StudyTime=080000-100000", {"LAT1"}),
    ("StudyTime=-120000", {"LAT1", "ASCII", "LEFEVRE", "HELENE", "NOCS", "NOCS8",
                           "BADUTF8"}),
    ("StudyTime=140000-", {"JP", "KR", "UTF8"}),
    ("StudyTime=0830-0830", {"LAT1"}),
    # KR's StudyTime is "1500" (HHMM, PS3.5 6.2 allows it): 15:00 is inside both ranges.
    ("StudyTime=145959-150001", {"KR"}),
    ("StudyTime=150000-", {"KR", "UTF8"}),
    ("StudyTime=150030-150100", {"KR"}),
    ("StudyTime=150100-", {"UTF8"}),
])
def test_date_and_time_ranges(site: Site, key: str, expected: set[str]) -> None:
    """PS3.4 C.2.2.2.5: closed and open ranges, bounds included, a bound of lower precision
    covering everything it is a prefix of, and so a stored time of lower precision (KR's
    "1500" is in "150000-": it was missed, "1500" < "150000" as text)."""
    assert site.ids([key]) == expected


def test_qido_person_name_component_groups(site: Site) -> None:
    """PS3.18 F.2.2: a PN in DICOM JSON has its Alphabetic, Ideographic and Phonetic groups."""
    url = f"http://127.0.0.1:{site.pas.http_port}/dicom-web/studies"
    for patient_id in ("JP", "KR", "LAT1"):
        [item] = httpx.get(url, params={"PatientID": patient_id}, timeout=30).json()
        groups = CASES[patient_id][1].split("=")
        expected = dict(zip(["Alphabetic", "Ideographic", "Phonetic"], groups, strict=False))
        assert item["00100010"]["Value"] == [expected]
    [item] = httpx.get(url, params={"PatientName": "hél*"}, timeout=30).json()
    assert item["00100020"]["Value"] == ["HELENE"]


def _log_names(site: Site, patient_id: str) -> Any:
    uid = str(dcmread(site.files[patient_id]).SOPInstanceUID)
    return [line for line in site.pas.log().splitlines() if uid in line]


def test_names_not_in_the_declared_character_set_are_logged(site: Site) -> None:
    """Non-ASCII bytes without Specific Character Set, or bytes invalid in the declared one:
    stored as sent (SHA-256 above), indexed as read, and a warning names the instance, the
    attribute and what PAS made of it."""
    [line] = wait_for(lambda: _log_names(site, "NOCS"), 10, what="a warning for NOCS")
    assert "PatientName" in line and "no Specific Character Set" in line and "Latin-1" in line
    [line] = wait_for(lambda: _log_names(site, "NOCS8"), 10, what="a warning for NOCS8")
    assert "PatientName" in line and "no Specific Character Set" in line
    assert "indexed as UTF-8" in line and "Latin-1" not in line
    [line] = wait_for(lambda: _log_names(site, "BADUTF8"), 10,
                      what="a warning for BADUTF8")
    assert "PatientName" in line and "ISO_IR 192" in line and "replacement" in line
    for patient_id in ("LAT1", "JP", "KR", "UTF8"):
        assert not _log_names(site, patient_id)
